//! The owner side of replication as a state machine: what is opened, which catch-ups run and
//! how far they got, which writes go to which replicas, and what a missed write leaves to report.
//!
//! ## Design
//! The [`Engine`] owns this state and nothing else: no tasks, no clocks, no network, no store.
//! The metadata table is an input of every decision that reads it (the runner passes its latest
//! copy), and every decision returns what to do, which the runner ([`super::Replication`]) does:
//! it spawns the jobs [`Engine::on_table`] starts, asks the replicas [`Engine::targets`] names,
//! reports the replicas [`Engine::answered`] says missed a write. The runner keeps the engine
//! behind one short-held lock and never holds it across an await, so no network round trip
//! waits on another task's bookkeeping.
//!
//! Golden scripts in `testscripts/` drive the engine one input at a time and compare what it
//! decides and the state it is left in with the expected text (`UPDATE_GOLDENFILES=1` rewrites
//! them; review the diff).
//!
//! ## Turns: pages against writes
//! A catch-up page and a write of the same key must reach the replica in the order they
//! happened. Each shard has a gate ([`Engine::enter`], [`Engine::leave`]): writes take turns
//! together (from before their local write until their replicas answered), a page alone (while
//! it is read and sent), first come first served, so a waiting page holds back later writes
//! and cannot starve. The gate is engine state, shown by [`Engine::describe`] and driven by the
//! scripts; the runner only parks a task until its turn comes.
//!
//! ## Openings
//! An opening is a state machine of its own ([`Engine::open_step`]): the runner feeds it the
//! outcome of each step (the local fence, a mark, the replicas' fences) and does what it answers.
//!
//! ## Catch-ups
//! A catch-up job is a state machine too ([`Engine::catch_up_step`]): pages, pacing at the
//! node's bandwidth, the in-sync mark, the settling of a mark whose outcome is unknown, and the
//! pauses between attempts; the runner reads and sends pages, waits and asks the leader.
//!
//! ## Caveats
//! - How many catch-ups run at once is the runner's (a semaphore of `CATCH_UPS_MAX` permits).
//! - A page that is not answered holds its shard's writes until the ask times out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

use crate::meta::{MetaState, ShardEntry};
use crate::storage::{Fence, Key, StorageError};

mod catch_up;
mod open;
pub(crate) use catch_up::{MarkOutcome, SyncCmd, SyncInput};
pub(crate) use open::{OpenCmd, OpenInput, RETRY_MS, RETRY_MS_MAX};

/// Work the runner does for the engine, one task each; registered until [`Engine::job_done`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Job {
    pub shard: u32,
    pub epoch: u64,
    pub kind: JobKind,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum JobKind {
    /// Fence the local store and the in-sync replicas at the epoch, then serve the shard.
    Open,
    /// Copy the shard to this replica, then have it marked in sync.
    CatchUp { to: String },
}

/// A replica a write goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub node: String,
    /// Port 0 when the table has no usable address: the ask then fails at once.
    pub addr: SocketAddr,
    /// Its answer is required for the write to be acknowledged (in sync, or being marked so).
    pub in_sync: bool,
}

/// Why a catch-up attempt cannot begin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("{to} is not a replica of shard {shard}")]
    NotAReplica { shard: u32, to: String },
    #[error("the in-sync mark of an earlier attempt is still pending")]
    MarkPending,
    #[error("the catch-up was dropped")]
    Dropped,
}

/// A catch-up in progress, as writes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SyncProgress {
    epoch: u64,
    /// The replica's generation when this attempt began (its `ReplicaSynced` names it).
    generation: u64,
    /// The in-sync mark was asked for: until the table shows it (or a newer generation), writes
    /// must be acknowledged by this replica as by an in-sync one (the mark may commit at any time).
    required: bool,
    /// Keys up to this one are on the replica (`None`: none yet).
    through: Option<Key>,
    /// Every key is.
    done: bool,
    /// A forwarded write failed: this attempt cannot mark the replica in sync.
    broken: bool,
    keys: u64,
    bytes: u64,
}

impl SyncProgress {
    fn covers(&self, key: &Key) -> bool {
        self.done || self.through.as_ref().is_some_and(|t| key <= t)
    }
}

/// What takes a turn on a shard's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// A write, from before its local write until its replicas answered (with other writes).
    Write,
    /// A catch-up page, or the in-sync mark after the last one (alone).
    Page,
}

/// Names one turn, from [`Engine::enter`] until [`Engine::leave`].
pub(crate) type Ticket = u64;

/// Whether a turn may go at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    Go(Ticket),
    /// It goes once a [`Engine::leave`] returns its ticket.
    Wait(Ticket),
}

/// A shard's gate: the turns going now, and those waiting, first come first served.
#[derive(Debug, Clone, Default)]
struct Gate {
    going: HashMap<Ticket, Turn>,
    writes: u32,
    page: bool,
    waiting: VecDeque<(Ticket, Turn)>,
}

impl Gate {
    fn may(&self, turn: Turn) -> bool {
        match turn {
            Turn::Write => !self.page,
            Turn::Page => !self.page && self.writes == 0,
        }
    }

    fn admit(&mut self, ticket: Ticket, turn: Turn) {
        debug_assert!(self.may(turn), "a turn admitted against the gate");
        match turn {
            Turn::Write => self.writes += 1,
            Turn::Page => self.page = true,
        }
        self.going.insert(ticket, turn);
    }

    fn is_idle(&self) -> bool {
        self.going.is_empty() && self.waiting.is_empty()
    }
}

/// The owner side of replication on one node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Engine {
    name: String,
    /// Shard → the epoch this node has opened it at.
    opened: BTreeMap<u32, u64>,
    /// (shard, replica) → its catch-up.
    syncs: BTreeMap<(u32, String), SyncProgress>,
    /// Shards closed after a write whose missed replicas could not be marked out of sync:
    /// shard → (epoch, those replicas).
    unreported: BTreeMap<u32, (u64, BTreeSet<String>)>,
    jobs: BTreeSet<Job>,
    /// Shard → its gate, while any turn goes or waits.
    gates: BTreeMap<u32, Gate>,
    /// (shard, epoch) → its opening, while one runs.
    openings: BTreeMap<(u32, u64), open::Opening>,
    /// (shard, replica) → where its catch-up job is, while one runs.
    catch_ups: BTreeMap<(u32, String), catch_up::CatchUp>,
    /// The node's catch-up bandwidth, shared by its jobs.
    sync_bytes_per_s: u64,
    /// When (the runner's clock, µs) that bandwidth is next free.
    bandwidth_next_us: u64,
    last_ticket: Ticket,
}

pub(crate) fn shard_entry(st: &MetaState, shard: u32) -> Option<&ShardEntry> {
    st.shards.get(shard as usize)
}

/// `node`'s address in `st`; port 0 when it has none that parses, so an ask fails at once.
fn addr_of(st: &MetaState, node: &str) -> SocketAddr {
    let addr = st.members.get(node).and_then(|m| m.addr.parse().ok());
    addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Engine {
    /// The engine of node `name`, its catch-ups unpaced (see [`Engine::paced`]).
    pub(crate) fn new(name: String) -> Engine {
        Engine { name, sync_bytes_per_s: u64::MAX, ..Engine::default() }
    }

    /// Catch-ups share `bytes_per_s` of bandwidth.
    pub(crate) fn paced(self, bytes_per_s: u64) -> Engine {
        Engine { sync_bytes_per_s: bytes_per_s.max(1), ..self }
    }

    fn owner_is_me(&self, e: &ShardEntry) -> bool {
        e.owner.as_deref() == Some(self.name.as_str())
    }

    /// Whether this node may serve `shard` at `epoch`.
    pub(crate) fn is_open(&self, shard: u32, epoch: u64) -> bool {
        self.opened.get(&shard) == Some(&epoch)
    }

    /// Whether this node owns `shard` at `epoch` in `st`.
    pub(crate) fn owns(&self, st: &MetaState, shard: u32, epoch: u64) -> bool {
        shard_entry(st, shard).is_some_and(|e| e.epoch == epoch && self.owner_is_me(e))
    }

    /// Whether `st` still wants `to` caught up for `shard` at `epoch` by this node.
    pub(crate) fn wants_sync(&self, st: &MetaState, shard: u32, epoch: u64, to: &str) -> bool {
        shard_entry(st, shard)
            .is_some_and(|e| e.epoch == epoch && self.owner_is_me(e) && e.replica(to).is_some_and(|r| !r.in_sync))
    }

    /// A new table: forgets what it ended, and returns the jobs it needs that are not running
    /// (registered now), in shard order.
    pub(crate) fn on_table(&mut self, st: &MetaState) -> Vec<Job> {
        let mine: BTreeMap<u32, &ShardEntry> =
            st.shards.iter().enumerate().filter(|(_, e)| self.owner_is_me(e)).map(|(s, e)| (s as u32, e)).collect();
        self.opened.retain(|s, epoch| mine.get(s).is_some_and(|e| e.epoch == *epoch));
        // A catch-up's entry goes once the table shows its outcome: in sync (the table then
        // requires the replica), a newer generation (out of sync again, committed), or gone.
        self.syncs.retain(|(s, to), p| {
            mine.get(s).is_some_and(|e| {
                e.epoch == p.epoch && e.replica(to).is_some_and(|r| !r.in_sync && r.generation == p.generation)
            })
        });
        // A job ends on its own once the table no longer wants it, and then leaves `jobs`: a
        // replica dropped and added again at the same epoch gets a new catch-up.
        let mut started = Vec::new();
        for (&shard, e) in &mine {
            let epoch = e.epoch;
            if !self.is_open(shard, epoch) {
                started.extend(self.register(Job { shard, epoch, kind: JobKind::Open }));
            }
            for r in e.replicas.iter().filter(|r| !r.in_sync) {
                started.extend(self.register(Job { shard, epoch, kind: JobKind::CatchUp { to: r.node.clone() } }));
            }
        }
        started
    }

    fn register(&mut self, job: Job) -> Option<Job> {
        self.jobs.insert(job.clone()).then_some(job)
    }

    /// A job finished: forgets it, then looks at the table again (a change it needed may have
    /// come while it was finishing, and found it still registered).
    pub(crate) fn job_done(&mut self, job: &Job, st: &MetaState) -> Vec<Job> {
        self.jobs.remove(job);
        match &job.kind {
            JobKind::Open => {
                self.openings.remove(&(job.shard, job.epoch));
            }
            JobKind::CatchUp { to } => {
                self.catch_ups.remove(&(job.shard, to.clone()));
            }
        }
        self.on_table(st)
    }

    /// An opening job fenced everything: serve the shard, if this node still owns it.
    pub(crate) fn opened(&mut self, st: &MetaState, shard: u32, epoch: u64) -> bool {
        let owns = self.owns(st, shard, epoch);
        if owns {
            self.opened.insert(shard, epoch);
        }
        owns
    }

    /// The replicas a write of `key` at `fence` goes to: the in-sync ones, and those being caught
    /// up whose copy has the key already (or whose in-sync mark was asked for).
    pub(crate) fn targets(&mut self, st: &MetaState, fence: Fence, key: &Key) -> Result<Vec<Target>, StorageError> {
        let e = shard_entry(st, fence.shard).ok_or_else(|| StorageError::Backend("no shard table".into()))?;
        if e.epoch != fence.epoch || !self.owner_is_me(e) {
            return Err(StorageError::Fenced { shard: fence.shard, epoch: fence.epoch, current: e.epoch });
        }
        let mut out = Vec::new();
        for r in &e.replicas {
            // A catch-up of this replica's current generation at this epoch: forward the write if
            // the key was copied already; require its answer once the in-sync mark was asked for.
            let progress = self.syncs.get_mut(&(fence.shard, r.node.clone())).filter(|p| p.epoch == fence.epoch);
            let (forward, required) = match progress {
                Some(p) if p.generation != r.generation => {
                    p.broken = true;
                    (false, p.required)
                }
                Some(p) => (p.covers(key), p.required),
                None => (false, false),
            };
            let in_sync = r.in_sync || required;
            if !in_sync && !forward {
                continue;
            }
            out.push(Target { node: r.node.clone(), addr: addr_of(st, &r.node), in_sync });
        }
        // A catch-up whose replica is no longer listed cannot finish (its writes went nowhere).
        for ((shard, node), p) in self.syncs.iter_mut() {
            if *shard == fence.shard && e.replica(node).is_none() {
                p.broken = true;
            }
        }
        Ok(out)
    }

    /// The replicas' answers to a write at `fence`: returns the in-sync ones that missed it (to
    /// be marked out of sync before the write is acknowledged); a catch-up whose forwarded
    /// write failed cannot finish.
    pub(crate) fn answered(&mut self, fence: Fence, answers: Vec<(Target, bool)>) -> Vec<String> {
        let mut missed = Vec::new();
        for (t, ok) in answers {
            if ok {
                continue;
            }
            if t.in_sync {
                missed.push(t.node);
            } else if let Some(p) = self.syncs.get_mut(&(fence.shard, t.node)) {
                p.broken = true;
            }
        }
        missed
    }

    /// Stops serving a shard whose local store holds a write an in-sync replica (`node`) lacks:
    /// it opens again once `node` is marked out of sync.
    pub(crate) fn close(&mut self, fence: Fence, node: &str) {
        let entry = self.unreported.entry(fence.shard).or_insert_with(|| (fence.epoch, BTreeSet::new()));
        if entry.0 != fence.epoch {
            *entry = (fence.epoch, BTreeSet::new());
        }
        entry.1.insert(node.to_string());
        self.opened.remove(&fence.shard);
    }

    /// The replicas a closed shard's writes missed at `epoch`, still to be marked out of sync.
    pub(crate) fn unreported(&self, shard: u32, epoch: u64) -> Vec<String> {
        match self.unreported.get(&shard) {
            Some((e, nodes)) if *e == epoch => nodes.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// `node` was marked out of sync for `shard`.
    pub(crate) fn reported(&mut self, shard: u32, node: &str) {
        if let Some((_, left)) = self.unreported.get_mut(&shard) {
            left.remove(node);
            if left.is_empty() {
                self.unreported.remove(&shard);
            }
        }
    }

    /// Begins a catch-up attempt of `to`: its generation, which the in-sync mark will name.
    pub(crate) fn begin_attempt(
        &mut self,
        st: &MetaState,
        shard: u32,
        epoch: u64,
        to: &str,
    ) -> Result<u64, AttemptError> {
        let r = shard_entry(st, shard).and_then(|e| e.replica(to));
        let generation = r.map(|r| r.generation).ok_or_else(|| AttemptError::NotAReplica { shard, to: to.into() })?;
        let key = (shard, to.to_string());
        if self.syncs.get(&key).is_some_and(|p| p.required) {
            return Err(AttemptError::MarkPending);
        }
        let fresh = SyncProgress {
            epoch,
            generation,
            required: false,
            through: None,
            done: false,
            broken: false,
            keys: 0,
            bytes: 0,
        };
        self.syncs.insert(key, fresh);
        Ok(generation)
    }

    /// A page reached the replica: keys up to `through` (`None`: every key) are there now.
    pub(crate) fn page_sent(
        &mut self,
        shard: u32,
        to: &str,
        keys: u64,
        bytes: u64,
        through: Option<Key>,
    ) -> Result<(), AttemptError> {
        let p = self.syncs.get_mut(&(shard, to.to_string())).ok_or(AttemptError::Dropped)?;
        p.keys += keys;
        p.bytes += bytes;
        p.done = through.is_none();
        p.through = through;
        Ok(())
    }

    /// Whether the attempt can no longer mark its replica in sync (a forwarded write failed, or
    /// it was dropped).
    pub(crate) fn broken(&self, shard: u32, to: &str) -> bool {
        self.syncs.get(&(shard, to.to_string())).is_none_or(|p| p.broken)
    }

    /// The in-sync mark is about to be asked for: from now on the replica's answer is required
    /// for every write. `false` if the attempt cannot ask (broken or dropped).
    pub(crate) fn require(&mut self, shard: u32, to: &str) -> bool {
        match self.syncs.get_mut(&(shard, to.to_string())) {
            Some(p) if !p.broken => {
                p.required = true;
                true
            }
            _ => false,
        }
    }

    /// The generation of an asked-for in-sync mark whose outcome the table does not show yet.
    pub(crate) fn pending_mark(&self, shard: u32, to: &str) -> Option<u64> {
        self.syncs.get(&(shard, to.to_string())).filter(|p| p.required).map(|p| p.generation)
    }

    /// The pending in-sync mark can no longer apply (the metadata refused it, or an out-of-sync
    /// mark committed after it), so the attempt is over.
    pub(crate) fn mark_settled(&mut self, shard: u32, to: &str) {
        self.syncs.remove(&(shard, to.to_string()));
    }

    /// Forgets an attempt's progress unless its in-sync mark is pending.
    pub(crate) fn drop_progress(&mut self, shard: u32, to: &str) {
        let key = (shard, to.to_string());
        if self.syncs.get(&key).is_some_and(|p| !p.required) {
            self.syncs.remove(&key);
        }
    }

    /// Keys and bytes an attempt copied so far.
    pub(crate) fn progress(&self, shard: u32, to: &str) -> Option<(u64, u64)> {
        self.syncs.get(&(shard, to.to_string())).map(|p| (p.keys, p.bytes))
    }

    /// Catch-ups in progress, in shard and replica order.
    pub(crate) fn syncing(&self) -> Vec<super::SyncStatus> {
        let status = |((shard, to), p): (&(u32, String), &SyncProgress)| super::SyncStatus {
            shard: *shard,
            to: to.clone(),
            keys: p.keys,
            bytes: p.bytes,
        };
        self.syncs.iter().map(status).collect()
    }

    /// Asks for a turn on `shard`'s gate: it goes now if nothing goes that excludes it and
    /// nothing waits before it.
    pub(crate) fn enter(&mut self, shard: u32, turn: Turn) -> Entry {
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        let gate = self.gates.entry(shard).or_default();
        if gate.waiting.is_empty() && gate.may(turn) {
            gate.admit(ticket, turn);
            Entry::Go(ticket)
        } else {
            gate.waiting.push_back((ticket, turn));
            Entry::Wait(ticket)
        }
    }

    /// Ends a turn, going or still waiting (its waiter gave up); returns the waiting turns that
    /// go now, in order.
    pub(crate) fn leave(&mut self, shard: u32, ticket: Ticket) -> Vec<Ticket> {
        let Some(gate) = self.gates.get_mut(&shard) else { return Vec::new() };
        match gate.going.remove(&ticket) {
            Some(Turn::Write) => gate.writes -= 1,
            Some(Turn::Page) => gate.page = false,
            None => gate.waiting.retain(|(t, _)| *t != ticket),
        }
        let mut going = Vec::new();
        while let Some(&(t, turn)) = gate.waiting.front() {
            if !gate.may(turn) {
                break;
            }
            gate.waiting.pop_front();
            gate.admit(t, turn);
            going.push(t);
        }
        if gate.is_idle() {
            self.gates.remove(&shard);
        }
        going
    }

    /// The engine's state as text, for golden scripts.
    #[cfg(test)]
    pub(crate) fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let opened: Vec<String> = self.opened.iter().map(|(s, e)| format!("{s}@{e}")).collect();
        writeln!(out, "opened: [{}]", opened.join(" ")).expect("a string");
        for ((shard, to), p) in &self.syncs {
            let through = match (&p.through, p.done) {
                (_, true) => "all".to_string(),
                (Some(k), false) => format!("{}/{}", k.ty, k.id),
                (None, false) => "none".to_string(),
            };
            let flags = [(p.required, " required"), (p.broken, " broken")];
            let flags: String = flags.iter().filter(|(on, _)| *on).map(|(_, f)| *f).collect();
            writeln!(
                out,
                "sync {shard}→{to}: epoch={} generation={} through={through} keys={} bytes={}{flags}",
                p.epoch, p.generation, p.keys, p.bytes
            )
            .expect("a string");
        }
        for (shard, (epoch, nodes)) in &self.unreported {
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            writeln!(out, "unreported {shard}@{epoch}: {}", nodes.join(" ")).expect("a string");
        }
        for job in &self.jobs {
            writeln!(out, "job {}", describe_job(job)).expect("a string");
        }
        for ((shard, epoch), o) in &self.openings {
            writeln!(out, "opening {shard}@{epoch}: {:?} (next retry after {} ms)", o.step, o.retry_ms)
                .expect("a string");
        }
        for ((shard, to), c) in &self.catch_ups {
            writeln!(out, "catch-up {shard}@{}→{to}: {:?} (next retry after {} ms)", c.epoch, c.step, c.retry_ms)
                .expect("a string");
        }
        if self.bandwidth_next_us > 0 {
            writeln!(out, "bandwidth free at {} µs", self.bandwidth_next_us).expect("a string");
        }
        for (shard, g) in &self.gates {
            let mut going: Vec<_> = g.going.iter().collect();
            going.sort_by_key(|(t, _)| **t);
            let show =
                |(t, turn): (&Ticket, &Turn)| format!("#{t} {}", if *turn == Turn::Page { "page" } else { "write" });
            let going: Vec<String> = going.into_iter().map(show).collect();
            let waiting: Vec<String> = g.waiting.iter().map(|(t, turn)| show((t, turn))).collect();
            writeln!(out, "gate {shard}: going [{}] waiting [{}]", going.join(", "), waiting.join(", "))
                .expect("a string");
        }
        out
    }
}

#[cfg(test)]
pub(crate) fn describe_job(job: &Job) -> String {
    match &job.kind {
        JobKind::Open => format!("open {}@{}", job.shard, job.epoch),
        JobKind::CatchUp { to } => format!("catch-up {}@{}→{to}", job.shard, job.epoch),
    }
}

/// Whether the table shows the outcome of an in-sync mark of `to` at `generation`: in sync, a
/// newer generation, another epoch, or no longer a replica.
pub(crate) fn mark_outcome_known(st: &MetaState, shard: u32, epoch: u64, to: &str, generation: u64) -> bool {
    shard_entry(st, shard)
        .is_none_or(|e| e.epoch != epoch || e.replica(to).is_none_or(|r| r.in_sync || r.generation != generation))
}

#[cfg(test)]
mod tests;
