//! Exhaustive exploration of the replica and lease protocol over the engines.
//!
//! ## What it explores
//! A small cluster (three nodes, one shard, the owner and one or two replicas) whose every
//! reachable state is visited breadth first. Each node is the real [`Engine`] (openings,
//! catch-ups, targets, missed replicas) and its [`serves`] decision, with a store (a set of write
//! ids and a fence epoch) that survives crashes; the leader runs the real placement plan
//! ([`plan::plan`]) over a metadata log to which every command goes through [`MetaState::apply`].
//! Openings and catch-up jobs are the engine's step machines ([`Engine::open_step`],
//! [`Engine::catch_up_step`]); what the runners do for them and for writes (a write's local put,
//! its asks and reports, a catch-up's page, mark and settling, an opening's fences) is modelled
//! here step by step, with
//! each message able to arrive, be lost before it is applied, or be lost after (its effect
//! happened, its answer did not come back). Nodes learn the metadata late, in any order.
//!
//! ## Leases without a clock
//! Time is not a number here but what the lease guarantees about it: a node serves only while
//! its lease is valid; a renewal, granted only to a node that applied the table the leader had,
//! makes it valid and tells the leader the node is live; a lease may lapse at any moment (no
//! renewal came in time); and the leader may take a node for dead only once that node's lease
//! has lapsed (or the node crashed). That last rule is what `lease_ms + drift` buys with real
//! clocks ([`super::control::engine::Controller::live`]); the arithmetic itself (holds, a new
//! leader's wait, late grants) is driven by the controller's golden scripts. Abstracting it
//! leaves every ordering of lapses, renewals and timeouts to the search, at no cost in states.
//!
//! ## What it checks, in every state reached
//! - No acknowledged write is lost: every in-sync replica in the newest table, the owner in the
//!   newest table, and every node that serves the shard hold every acknowledged write.
//! - Never two nodes serving the shard at the same epoch (nor, in fact, at once).
//! - Epochs only grow: in the metadata log, in each node's table, in each store's fence.
//! - The metadata invariants ([`MetaState::check_invariants`]) after every commit.
//!
//! A violation fails the test with the trace of actions that reached it, shortest first (the
//! search is breadth first), which is its own replay.
//!
//! ## Caveats
//! - Bounded: writes, crashes, lapses, lost messages, leader changes and metadata changes are
//!   budgets of the configuration, and so is the depth (steps from the start): the tests visit
//!   every state within 11 to 13 steps (34,000 to 129,000 states, 7 to 27 s each in a debug
//!   build), enough for a write acknowledged, its owner crashed, its replica promoted and the
//!   next write served. Without the depth bound the space of the same configurations passes
//!   several million states (a debug build visits about 5,000 a second): not a test to run on
//!   every change. [`explore_all`] searches depth first without the bound, keeping only
//!   fingerprints and its path; its ignored test (one write, one crash, one lost message) ran
//!   past 15 million states and paths of 40 steps without a violation in an hour of a release
//!   build sharing the machine, and was stopped before it completed: completing it needs a
//!   smaller state (generations renumbered by rank, the memory of nodes that no longer matter). Breaking the protocol is found quickly: with `Engine::answered` ignoring a
//!   replica that missed a write, the crash test fails after 5 steps (a write acknowledged while
//!   the in-sync replica lacks it).
//! - The lease rule above is assumed (bounded clock drift), not checked.
//! - Raft is not modelled: a command commits at once or not at all (its answer may still be
//!   lost). Planned moves and hand-offs are off (`moves_per_tick_max` 0; hand-offs have their
//!   own scripts), so owners change only by promotion.
//! - One key, so a catch-up is one page.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::control::engine::serves;
use super::replica::engine::{Engine, Job, JobKind, MarkOutcome, OpenCmd, OpenInput, SyncCmd, SyncInput, Target};
use crate::meta::{Cmd, MetaState};
use crate::placement::plan::{self, Copies};
use crate::storage::{Fence, Key};

const NAMES: [&str; 3] = ["n1", "n2", "n3"];
const SHARD: u32 = 0;

fn key() -> Key {
    Key::new("counter", "k")
}

/// The budgets of one exploration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub writes: u8,
    pub crashes: u8,
    /// Leases that lapse (no renewal in time) on a node that is up.
    pub lapses: u8,
    pub losses: u8,
    pub leader_changes: u8,
    /// Metadata changes committed at most: retries that each commit a change (a catch-up whose
    /// owner's table lags marks its replica out of sync again and again) would otherwise make
    /// the space unbounded, with a new replica generation each time.
    pub commits: u8,
    /// Steps from the start at most (`usize::MAX`: until no new state is found).
    pub depth_max: usize,
    /// Nodes per shard, the owner included (2 or 3).
    pub copies: u32,
    /// Whether the replicas start in sync (else the owner must catch them up first).
    pub in_sync_at_start: bool,
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fate {
    Arrives,
    /// Lost on the way: nothing happened.
    LostBefore,
    /// Applied, but the answer was lost.
    LostAfter,
}

const FATES: [Fate; 3] = [Fate::Arrives, Fate::LostBefore, Fate::LostAfter];

/// One step of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Action {
    /// Another leader: it takes every member for live until their leases could have lapsed.
    LeaderChange,
    ControlTick,
    Learn {
        n: usize,
        latest: bool,
    },
    /// A renewal granted (to a node that applied the leader's table); its answer may be lost.
    Renew {
        n: usize,
        fate: Fate,
    },
    /// No renewal came in time: the node's lease lapses, and later the leader takes it for dead
    /// (the states between the two differ from those after only in what the leader may plan:
    /// one step here, to keep the search small).
    Lapse {
        n: usize,
    },
    /// The leader takes a node for dead whose lease is not valid (it crashed, or the answer to
    /// its renewal was lost).
    Timeout {
        n: usize,
    },
    Crash {
        n: usize,
    },
    Restart {
        n: usize,
    },
    /// A call served: the write's turn, its local put, its targets.
    WriteBegin {
        n: usize,
    },
    WriteSend {
        n: usize,
        i: usize,
        fate: Fate,
    },
    WriteFinish {
        n: usize,
        fates: Vec<Fate>,
    },
    OpenRun {
        n: usize,
        epoch: u64,
        i: usize,
        fate: Fate,
    },
    OpenResume {
        n: usize,
        epoch: u64,
    },
    SyncBegin {
        n: usize,
        to: usize,
    },
    SyncPage {
        n: usize,
        to: usize,
        fate: Fate,
    },
    SyncMark {
        n: usize,
        to: usize,
        fate: Fate,
    },
    SyncSettle {
        n: usize,
        to: usize,
        fate: Fate,
    },
    SyncResume {
        n: usize,
        to: usize,
    },
}

/// A committed table and its digest (the state's fingerprint hashes digests, not tables).
#[derive(Debug)]
struct Version {
    st: MetaState,
    digest: u64,
}

impl Version {
    fn new(st: MetaState) -> Arc<Version> {
        let bytes = postcard::to_allocvec(&st).expect("a table encodes");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        Arc::new(Version { st, digest: h.finish() })
    }
}

/// A write in progress on its owner.
#[derive(Debug, Clone)]
struct Write {
    id: u8,
    fence: Fence,
    /// After the local put: the value sent, the replicas and their answers so far.
    sent: Option<(u8, Vec<Target>, Vec<Option<bool>>)>,
}

/// A catch-up job's runner: the engine's last command ([`SyncCmd`]), not yet run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Sync {
    /// About to answer `Go` (first, or after a pause).
    Idle,
    /// The page (this value: the whole shard, one page) is out, holding the gate.
    Page { value: u8 },
    /// Copied: the page turn, then the in-sync mark.
    Turn,
    /// Mark the replica out of sync, voiding a pending in-sync mark.
    Settle,
    /// Pausing before the next `Go`.
    Paused,
}

/// An opening job's runner: the commands it has still to run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Opening {
    cmds: Vec<OpenCmd>,
    paused: bool,
}

#[derive(Debug, Clone)]
struct Node {
    up: bool,
    /// Index of the newest table it applied.
    seen: usize,
    /// The store: the write ids its value holds, and its fence.
    value: u8,
    fenced: u64,
    engine: Engine,
    /// Its lease is valid.
    lease: bool,
    openings: BTreeMap<u64, Opening>,
    /// Catch-up jobs by replica: the epoch they were started at, and where they are.
    syncs: BTreeMap<usize, (u64, Sync)>,
    write: Option<Write>,
}

#[derive(Debug, Clone)]
struct World {
    log: Vec<Arc<Version>>,
    /// Which members the leader takes for live.
    live: [bool; 3],
    nodes: Vec<Node>,
    acked: u8,
    writes: u8,
    crashes: u8,
    lapses: u8,
    losses: u8,
    leader_changes: u8,
    commits: u8,
}

fn index_of(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).expect("a node of the model")
}

impl World {
    fn new(b: &Bounds) -> World {
        let mut st = MetaState::default();
        let mut cmds = vec![Cmd::Init { shard_count: 1 }];
        for (i, n) in NAMES.iter().enumerate() {
            cmds.push(Cmd::Admit {
                name: n.to_string(),
                addr: format!("127.0.0.1:{}", 7001 + i),
                raft_id: i as u64 + 1,
            });
        }
        cmds.push(Cmd::Assign { shard: SHARD, owner: "n1".into(), expected_epoch: 0 });
        for r in &NAMES[1..b.copies as usize] {
            cmds.push(Cmd::AddReplica { shard: SHARD, node: r.to_string(), expected_epoch: 1 });
        }
        for c in &cmds {
            st.apply(c).expect("the initial table");
        }
        if b.in_sync_at_start {
            let replicas = st.shards[0].replicas.clone();
            for r in replicas {
                let synced =
                    Cmd::ReplicaSynced { shard: SHARD, node: r.node, expected_epoch: 1, generation: r.generation };
                st.apply(&synced).expect("the initial table");
            }
        }
        let node = |name: &str| Node {
            up: true,
            seen: 0,
            value: 0,
            fenced: 0,
            engine: Engine::new(name.to_string()),
            lease: true,
            openings: BTreeMap::new(),
            syncs: BTreeMap::new(),
            write: None,
        };
        let mut w = World {
            log: vec![Version::new(st)],
            live: [true; 3],
            nodes: NAMES.iter().map(|n| node(n)).collect(),
            acked: 0,
            writes: 0,
            crashes: 0,
            lapses: 0,
            losses: 0,
            leader_changes: 0,
            commits: 0,
        };
        for n in 0..NAMES.len() {
            w.on_table(n);
        }
        w
    }

    fn latest(&self) -> &MetaState {
        &self.log.last().expect("a table").st
    }

    fn table(&self, n: usize) -> &MetaState {
        &self.log[self.nodes[n].seen].st
    }

    fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let budgets = (self.crashes, self.lapses, self.losses, self.leader_changes, self.commits);
        (self.live, self.acked, self.writes, budgets).hash(&mut h);
        self.log.iter().map(|v| v.digest).collect::<Vec<_>>().hash(&mut h);
        for node in &self.nodes {
            (node.up, node.seen, node.value, node.fenced, node.lease).hash(&mut h);
            without_delays(&node.engine.describe()).hash(&mut h);
            without_delays(&format!("{:?} {:?} {:?}", node.openings, node.syncs, node.write)).hash(&mut h);
        }
        h.finish()
    }

    /// Commits `cmd` if it applies: whether it did.
    fn commit(&mut self, cmd: &Cmd) -> bool {
        let mut st = self.latest().clone();
        if st.apply(cmd).is_err() {
            return false;
        }
        if st != *self.latest() {
            self.log.push(Version::new(st));
            self.commits = self.commits.saturating_add(1);
        }
        true
    }

    /// A lost message spends the budget; `None` when it is spent.
    fn lose(&mut self, fate: Fate, b: &Bounds) -> Option<()> {
        if fate != Fate::Arrives {
            if self.losses >= b.losses {
                return None;
            }
            self.losses += 1;
        }
        Some(())
    }

    fn lease_valid(&self, n: usize) -> bool {
        self.nodes[n].up && self.nodes[n].lease
    }

    /// Whether node `n` serves the key now: the fence its writes would carry.
    fn serving(&self, n: usize) -> Option<Fence> {
        let node = &self.nodes[n];
        if !node.up {
            return None;
        }
        let open = |s, e| node.engine.is_open(s, e);
        serves(self.table(n), NAMES[n], &key(), false, self.lease_valid(n), open).ok()
    }

    /// The runner's reaction to a table: start the jobs the engine asks for.
    fn on_table(&mut self, n: usize) {
        let st = self.table(n).clone();
        let jobs = self.nodes[n].engine.on_table(&st);
        self.start(n, jobs);
    }

    fn start(&mut self, n: usize, jobs: Vec<Job>) {
        for job in jobs {
            match job.kind {
                JobKind::Open => {
                    let st = self.table(n).clone();
                    let cmds = self.nodes[n].engine.open_step(&st, job.shard, job.epoch, OpenInput::Go);
                    self.nodes[n].openings.insert(job.epoch, Opening { cmds, paused: false });
                    self.open_settle(n, job.epoch);
                }
                JobKind::CatchUp { to } => {
                    self.nodes[n].syncs.insert(index_of(&to), (job.epoch, Sync::Idle));
                }
            }
        }
    }

    fn job_done(&mut self, n: usize, job: Job) {
        let st = self.table(n).clone();
        let jobs = self.nodes[n].engine.job_done(&job, &st);
        self.start(n, jobs);
    }

    /// Runs an opening's local steps (the local fence, a retry's pause, its end) until what is
    /// left are asks of others.
    fn open_settle(&mut self, n: usize, epoch: u64) {
        loop {
            let Some(o) = self.nodes[n].openings.get_mut(&epoch) else { return };
            let Some(pos) = o
                .cmds
                .iter()
                .position(|c| matches!(c, OpenCmd::FenceLocal | OpenCmd::Retry { .. } | OpenCmd::Done { .. }))
            else {
                return;
            };
            let cmd = o.cmds.remove(pos);
            let input = match cmd {
                OpenCmd::FenceLocal => {
                    let node = &mut self.nodes[n];
                    let ok = epoch >= node.fenced;
                    if ok {
                        node.fenced = epoch;
                    }
                    OpenInput::LocalFenced { ok }
                }
                OpenCmd::Retry { .. } => {
                    o.paused = true;
                    return;
                }
                OpenCmd::Done { .. } => {
                    self.nodes[n].openings.remove(&epoch);
                    self.job_done(n, Job { shard: SHARD, epoch, kind: JobKind::Open });
                    return;
                }
                _ => unreachable!("only local steps are taken here"),
            };
            self.open_feed(n, epoch, input);
        }
    }

    fn open_feed(&mut self, n: usize, epoch: u64, input: OpenInput) {
        let st = self.table(n).clone();
        let cmds = self.nodes[n].engine.open_step(&st, SHARD, epoch, input);
        if let Some(o) = self.nodes[n].openings.get_mut(&epoch) {
            o.cmds.extend(cmds);
        }
        self.open_settle(n, epoch);
    }

    /// A replica request from `from` at `epoch` reaching node `to`: whether its table and store
    /// take it (then `apply` changes the store).
    fn replica_takes(&mut self, from: usize, to: usize, epoch: u64, apply: impl FnOnce(&mut Node)) -> bool {
        if !self.nodes[to].up {
            return false;
        }
        let e = &self.table(to).shards[SHARD as usize];
        if epoch < e.epoch || (epoch == e.epoch && e.owner.as_deref() != Some(NAMES[from])) {
            return false;
        }
        let node = &mut self.nodes[to];
        if epoch < node.fenced {
            return false;
        }
        node.fenced = epoch;
        apply(node);
        true
    }

    /// Asks the leader to mark `node` out of sync at `epoch`: whether the asker hears it committed.
    fn report_out(&mut self, node: &str, epoch: u64, fate: Fate) -> bool {
        if fate == Fate::LostBefore {
            return false;
        }
        let committed = self.commit(&Cmd::ReplicaOutOfSync { shard: SHARD, node: node.into(), expected_epoch: epoch });
        committed && fate == Fate::Arrives
    }

    fn gate_busy_with_page(&self, n: usize) -> bool {
        self.nodes[n].syncs.values().any(|(_, s)| matches!(s, Sync::Page { .. }))
    }

    fn writing(&self, n: usize) -> bool {
        self.nodes[n].write.as_ref().is_some_and(|w| w.sent.is_some())
    }

    fn actions(&self, b: &Bounds) -> Vec<Action> {
        let mut out = Vec::new();
        if self.leader_changes < b.leader_changes {
            out.push(Action::LeaderChange);
        }
        if self.control_tick_commits(b) {
            out.push(Action::ControlTick);
        }
        for n in 0..self.nodes.len() {
            if self.live[n] && !self.lease_valid(n) {
                out.push(Action::Timeout { n });
            }
        }
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            if !node.up {
                out.push(Action::Restart { n });
                continue;
            }
            if self.crashes < b.crashes {
                out.push(Action::Crash { n });
            }
            if node.seen + 1 < self.log.len() {
                out.push(Action::Learn { n, latest: false });
                if node.seen + 2 < self.log.len() {
                    out.push(Action::Learn { n, latest: true });
                }
            }
            // Granted only to a node that applied the leader's table (it learns it first); a
            // renewal lost on its way to the leader changes nothing.
            if node.seen + 1 == self.log.len() && !node.lease {
                out.extend([Fate::Arrives, Fate::LostAfter].map(|fate| Action::Renew { n, fate }));
            }
            if node.lease && self.lapses < b.lapses {
                out.push(Action::Lapse { n });
            }
            match &node.write {
                None if self.writes < b.writes && self.serving(n).is_some() && !self.gate_busy_with_page(n) => {
                    out.push(Action::WriteBegin { n })
                }
                Some(Write { sent: Some((_, _, answers)), .. }) => {
                    for (i, a) in answers.iter().enumerate() {
                        if a.is_none() {
                            out.extend(FATES.map(|fate| Action::WriteSend { n, i, fate }));
                        }
                    }
                    if answers.iter().all(Option::is_some) {
                        out.extend(self.finish_fates(n).into_iter().map(|fates| Action::WriteFinish { n, fates }));
                    }
                }
                _ => {}
            }
            for (&epoch, o) in &node.openings {
                if o.paused {
                    out.push(Action::OpenResume { n, epoch });
                    continue;
                }
                for (i, c) in o.cmds.iter().enumerate() {
                    if matches!(c, OpenCmd::Report { .. } | OpenCmd::FenceReplica { .. }) {
                        out.extend(FATES.map(|fate| Action::OpenRun { n, epoch, i, fate }));
                    }
                }
            }
            for (&to, (_, s)) in &node.syncs {
                match s {
                    Sync::Idle if !self.writing(n) && !self.gate_busy_with_page(n) => {
                        out.push(Action::SyncBegin { n, to })
                    }
                    Sync::Page { .. } => out.extend(FATES.map(|fate| Action::SyncPage { n, to, fate })),
                    Sync::Turn if !self.writing(n) && !self.gate_busy_with_page(n) => {
                        out.extend(FATES.map(|fate| Action::SyncMark { n, to, fate }))
                    }
                    Sync::Settle => out.extend(FATES.map(|fate| Action::SyncSettle { n, to, fate })),
                    Sync::Paused => out.push(Action::SyncResume { n, to }),
                    _ => {}
                }
            }
        }
        out
    }

    /// Every combination of fates of the reports a finishing write may send (one per missed
    /// replica, at most two).
    fn finish_fates(&self, n: usize) -> Vec<Vec<Fate>> {
        let Some(Write { sent: Some((_, targets, answers)), .. }) = &self.nodes[n].write else { return Vec::new() };
        let missed = targets.iter().zip(answers).filter(|(t, a)| t.in_sync && *a == &Some(false)).count();
        let mut all = vec![Vec::new()];
        for _ in 0..missed {
            all = all.into_iter().flat_map(|v: Vec<Fate>| FATES.map(|f| [v.clone(), vec![f]].concat())).collect();
        }
        all
    }

    /// The world after `a`, or `None` when `a` spends a budget that is spent.
    fn step(&self, a: &Action, b: &Bounds) -> Option<World> {
        let mut w = self.clone();
        match *a {
            Action::LeaderChange => {
                w.leader_changes += 1;
                w.live = [true; 3];
            }
            Action::ControlTick => w.control_tick(b),
            Action::Learn { n, latest } => {
                w.nodes[n].seen = if latest { w.log.len() - 1 } else { w.nodes[n].seen + 1 };
                w.on_table(n);
            }
            Action::Renew { n, fate } => {
                w.lose(fate, b)?;
                w.live[n] = true;
                w.nodes[n].lease |= fate == Fate::Arrives;
            }
            Action::Lapse { n } => {
                w.lapses += 1;
                w.nodes[n].lease = false;
                w.live[n] = false;
            }
            Action::Timeout { n } => w.live[n] = false,
            Action::Crash { n } => {
                w.crashes += 1;
                let node = &mut w.nodes[n];
                node.up = false;
                node.engine = Engine::new(NAMES[n].into());
                node.lease = false;
                node.openings.clear();
                node.syncs.clear();
                node.write = None;
            }
            Action::Restart { n } => {
                w.nodes[n].up = true;
                w.on_table(n);
            }
            Action::WriteBegin { n } => {
                let fence = w.serving(n).expect("serving");
                let id = w.writes;
                w.writes += 1;
                w.nodes[n].write = Some(Write { id, fence, sent: None });
                w.write_local(n);
            }
            Action::WriteSend { n, i, fate } => {
                w.lose(fate, b)?;
                let write = w.nodes[n].write.clone().expect("a write");
                let (value, targets, _) = write.sent.expect("sent");
                let to = index_of(&targets[i].node);
                let took =
                    fate != Fate::LostBefore && w.replica_takes(n, to, write.fence.epoch, |node| node.value = value);
                if let Some(Write { sent: Some((_, _, answers)), .. }) = &mut w.nodes[n].write {
                    answers[i] = Some(took && fate == Fate::Arrives);
                }
            }
            Action::WriteFinish { n, ref fates } => {
                for f in fates {
                    w.lose(*f, b)?;
                }
                w.write_finish(n, fates);
            }
            Action::OpenRun { n, epoch, i, fate } => {
                w.lose(fate, b)?;
                let cmd = w.nodes[n].openings.get_mut(&epoch).expect("an opening").cmds.remove(i);
                let input = match cmd {
                    OpenCmd::Report { node } => {
                        let ok = w.report_out(&node, epoch, fate);
                        OpenInput::Reported { node, ok }
                    }
                    OpenCmd::FenceReplica { node, .. } => {
                        let to = index_of(&node);
                        let took = fate != Fate::LostBefore && w.replica_takes(n, to, epoch, |_| {});
                        OpenInput::ReplicaFenced { node, ok: took && fate == Fate::Arrives }
                    }
                    other => unreachable!("not an ask: {other:?}"),
                };
                w.open_feed(n, epoch, input);
            }
            Action::OpenResume { n, epoch } => {
                w.nodes[n].openings.get_mut(&epoch).expect("an opening").paused = false;
                w.open_feed(n, epoch, OpenInput::Go);
            }
            Action::SyncBegin { n, to } => {
                w.sync_feed(n, to, SyncInput::Go);
            }
            Action::SyncPage { n, to, fate } => {
                w.lose(fate, b)?;
                w.sync_page(n, to, fate);
            }
            Action::SyncMark { n, to, fate } => {
                w.lose(fate, b)?;
                w.sync_mark(n, to, fate);
            }
            Action::SyncSettle { n, to, fate } => {
                w.lose(fate, b)?;
                w.sync_settle(n, to, fate);
            }
            Action::SyncResume { n, to } => w.set_sync(n, to, Sync::Idle),
        }
        if w.commits > b.commits {
            return None;
        }
        w.compact();
        Some(w)
    }

    /// Forgets the tables every node has gone past (the state is what nodes can still learn,
    /// not how the log got there).
    fn compact(&mut self) {
        let oldest = self.nodes.iter().map(|n| n.seen).min().expect("nodes");
        if oldest > 0 {
            self.log.drain(..oldest);
            for node in &mut self.nodes {
                node.seen -= oldest;
            }
        }
    }

    /// Whether a controller tick now would change the metadata.
    fn control_tick_commits(&self, b: &Bounds) -> bool {
        let mut w = self.clone();
        w.control_tick(b);
        w.log.len() > self.log.len()
    }

    /// The leader's plan over the members it takes for live (no planned moves: see the caveats).
    fn control_tick(&mut self, b: &Bounds) {
        let live: Vec<&str> = (0..NAMES.len()).filter(|&n| self.live[n]).map(|n| NAMES[n]).collect();
        let st = self.latest().clone();
        for c in plan::plan(&st, &live, 0, Copies::Replicated { factor: b.copies }) {
            self.commit(&c);
        }
    }

    /// The local put of a write (on its turn of the gate), then its targets.
    fn write_local(&mut self, n: usize) {
        let write = self.nodes[n].write.clone().expect("a write");
        let node = &mut self.nodes[n];
        if write.fence.epoch < node.fenced {
            node.write = None;
            return;
        }
        node.fenced = write.fence.epoch;
        node.value |= 1 << write.id;
        let value = node.value;
        let st = self.table(n).clone();
        match self.nodes[n].engine.targets(&st, write.fence, &key()) {
            Ok(targets) => {
                let answers = vec![None; targets.len()];
                self.nodes[n].write = Some(Write { sent: Some((value, targets, answers)), ..write });
            }
            Err(_) => self.write_failed(n),
        }
    }

    fn write_finish(&mut self, n: usize, fates: &[Fate]) {
        let write = self.nodes[n].write.clone().expect("a write");
        let (_, targets, answers) = write.sent.expect("sent");
        let answers: Vec<(Target, bool)> =
            targets.into_iter().zip(answers.into_iter().map(|a| a == Some(true))).collect();
        let missed = self.nodes[n].engine.answered(write.fence, answers);
        if !missed.is_empty() && !self.lease_valid(n) {
            return self.write_failed(n);
        }
        let mut failed = false;
        for (node, fate) in missed.iter().zip(fates) {
            if !self.report_out(node, write.fence.epoch, *fate) {
                self.nodes[n].engine.close(write.fence, node);
                failed = true;
            }
        }
        if failed {
            return self.write_failed(n);
        }
        self.acked |= 1 << write.id;
        self.nodes[n].write = None;
    }

    /// A write not acknowledged: a shard closed on the way reopens through an opening job.
    fn write_failed(&mut self, n: usize) {
        let fence = self.nodes[n].write.take().expect("a write").fence;
        if !self.nodes[n].engine.is_open(fence.shard, fence.epoch) {
            self.on_table(n);
        }
    }

    fn owned_epoch(&self, n: usize) -> u64 {
        self.table(n).shards[SHARD as usize].epoch
    }

    /// The catch-up job of `to` on `n`: its epoch and where it is.
    fn sync(&self, n: usize, to: usize) -> (u64, Sync) {
        self.nodes[n].syncs.get(&to).cloned().expect("a catch-up job")
    }

    fn set_sync(&mut self, n: usize, to: usize, s: Sync) {
        self.nodes[n].syncs.get_mut(&to).expect("a catch-up job").1 = s;
    }

    /// The job ends (the table no longer wants it, or the replica is caught up).
    fn sync_end(&mut self, n: usize, to: usize) {
        let (epoch, _) = self.nodes[n].syncs.remove(&to).expect("a catch-up job");
        self.job_done(n, Job { shard: SHARD, epoch, kind: JobKind::CatchUp { to: NAMES[to].into() } });
    }

    /// Feeds a catch-up job `input` and keeps the command it answers; `Some(generation)` when
    /// that is to ask for the in-sync mark (the caller does, holding the page turn).
    fn sync_feed(&mut self, n: usize, to: usize, mut input: SyncInput) -> Option<u64> {
        let (epoch, _) = self.sync(n, to);
        let st = self.table(n).clone();
        loop {
            let next = match self.nodes[n].engine.catch_up_step(&st, SHARD, epoch, NAMES[to], input) {
                SyncCmd::Page { .. } => Sync::Page { value: self.nodes[n].value },
                SyncCmd::Pace { .. } => {
                    input = SyncInput::Paced;
                    continue;
                }
                SyncCmd::TakeTurn => Sync::Turn,
                SyncCmd::Mark { generation } => return Some(generation),
                SyncCmd::Settle => Sync::Settle,
                SyncCmd::Retry { .. } => Sync::Paused,
                SyncCmd::Done { .. } => {
                    self.sync_end(n, to);
                    return None;
                }
            };
            self.set_sync(n, to, next);
            return None;
        }
    }

    fn sync_page(&mut self, n: usize, to: usize, fate: Fate) {
        let (epoch, Sync::Page { value }) = self.sync(n, to) else { unreachable!("a page") };
        let took = fate != Fate::LostBefore && self.replica_takes(n, to, epoch, |node| node.value = value);
        let input = if took && fate == Fate::Arrives {
            SyncInput::PageSent { keys: 1, bytes: 1, through: None, now_us: 0 }
        } else {
            SyncInput::PageFailed
        };
        self.sync_feed(n, to, input);
    }

    /// The page turn, then (if the attempt may still ask) the in-sync mark, with its fate.
    fn sync_mark(&mut self, n: usize, to: usize, fate: Fate) {
        let (epoch, _) = self.sync(n, to);
        let Some(generation) = self.sync_feed(n, to, SyncInput::Turn) else { return };
        let synced = Cmd::ReplicaSynced { shard: SHARD, node: NAMES[to].into(), expected_epoch: epoch, generation };
        let committed = fate != Fate::LostBefore && self.commit(&synced);
        let outcome = match (committed, fate) {
            (true, Fate::Arrives) => MarkOutcome::Committed,
            // Refused, and the owner hears so.
            (false, Fate::Arrives) => MarkOutcome::Refused,
            _ => MarkOutcome::Unknown,
        };
        let mark = self.sync_feed(n, to, SyncInput::Marked(outcome));
        assert!(mark.is_none(), "a mark's outcome asks for no other mark");
    }

    fn sync_settle(&mut self, n: usize, to: usize, fate: Fate) {
        let (epoch, _) = self.sync(n, to);
        let ok = self.report_out(NAMES[to], epoch, fate);
        self.sync_feed(n, to, SyncInput::Settled { ok });
    }

    /// What must hold in every state; the first violation found.
    fn check(&self, before: Option<&World>) -> Result<(), String> {
        let latest = self.latest();
        latest.check_invariants().map_err(|e| format!("metadata invariants: {e}"))?;
        let e = &latest.shards[SHARD as usize];
        let holds = |n: usize| self.nodes[n].value & self.acked == self.acked;
        if let Some(owner) = &e.owner {
            if !holds(index_of(owner)) {
                return Err(format!("the owner {owner} lacks acknowledged writes"));
            }
        }
        for r in e.replicas.iter().filter(|r| r.in_sync) {
            if !holds(index_of(&r.node)) {
                return Err(format!("in-sync replica {} lacks acknowledged writes", r.node));
            }
        }
        let serving: Vec<(usize, Fence)> =
            (0..self.nodes.len()).filter_map(|n| self.serving(n).map(|f| (n, f))).collect();
        for &(n, _) in &serving {
            if !holds(n) {
                return Err(format!("{} serves without every acknowledged write", NAMES[n]));
            }
        }
        // Stronger than asked (one owner per epoch): with the lease rule, never two at once.
        if let [(a, fa), (b, fb), ..] = serving[..] {
            return Err(format!("{} (epoch {}) and {} (epoch {}) both serve", NAMES[a], fa.epoch, NAMES[b], fb.epoch));
        }
        if let Some(before) = before {
            if latest.shards[0].epoch < before.latest().shards[0].epoch {
                return Err("the metadata's epoch went down".into());
            }
            for (n, name) in NAMES.iter().enumerate() {
                if self.owned_epoch(n) < before.owned_epoch(n) {
                    return Err(format!("{name}'s table went back an epoch"));
                }
                if self.nodes[n].fenced < before.nodes[n].fenced {
                    return Err(format!("{name}'s store fence went down"));
                }
            }
        }
        Ok(())
    }
}

/// `text` with the numbers of retry delays left out: time is not modelled (a paused job may
/// resume at any step), so states that differ only in the next delay are one state.
fn without_delays(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["retry after ", "after_ms: "].iter().filter_map(|p| rest.find(p).map(|i| (i, p.len()))).min()
    {
        let (i, len) = at;
        out.push_str(&rest[..i + len]);
        rest = rest[i + len..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// What an exploration covered.
#[derive(Debug)]
pub(crate) struct Report {
    pub states: usize,
    pub transitions: usize,
    pub depth: usize,
    /// States in which some write was acknowledged / the shard had failed over.
    pub acked_states: usize,
    pub failover_states: usize,
    /// No state was left unexplored: the depth bound was not reached.
    pub complete: bool,
}

/// Visits every state reachable within `b`, breadth first; the first violation with its trace.
pub(crate) fn explore(b: Bounds, states_max: usize) -> Result<Report, String> {
    let start = World::new(&b);
    start.check(None)?;
    let mut seen: HashMap<u64, Option<(u64, Action)>> = HashMap::new();
    seen.insert(start.fingerprint(), None);
    let mut queue = VecDeque::from([(start, 0usize)]);
    let mut report =
        Report { states: 1, transitions: 0, depth: 0, acked_states: 0, failover_states: 0, complete: true };
    while let Some((w, depth)) = queue.pop_front() {
        if depth > report.depth {
            eprintln!("explore: depth {depth}, {} states, {} queued", report.states, queue.len());
        }
        report.depth = report.depth.max(depth);
        if depth == b.depth_max {
            report.complete &=
                w.actions(&b).iter().all(|a| w.step(a, &b).is_none_or(|n| seen.contains_key(&n.fingerprint())));
            continue;
        }
        let here = w.fingerprint();
        for a in w.actions(&b) {
            let Some(next) = w.step(&a, &b) else { continue };
            report.transitions += 1;
            let f = next.fingerprint();
            if seen.contains_key(&f) {
                continue;
            }
            seen.insert(f, Some((here, a.clone())));
            if let Err(e) = next.check(Some(&w)) {
                return Err(format!("{e}\nafter {} steps:\n{}", depth + 1, trace(&seen, f)));
            }
            report.states += 1;
            report.acked_states += usize::from(next.acked != 0);
            report.failover_states += usize::from(next.latest().shards[0].epoch > 1);
            if report.states >= states_max {
                return Err(format!("more than {states_max} states: tighten the bounds"));
            }
            queue.push_back((next, depth + 1));
        }
    }
    Ok(report)
}

/// Visits every state reachable within `b` (its depth bound aside), depth first, keeping only
/// the fingerprints seen and the path it is on: the breadth-first search holds its whole
/// frontier, which passes gigabytes on the spaces this is for. The trace of a violation is one
/// path to it, not the shortest.
pub(crate) fn explore_all(b: Bounds, states_max: usize) -> Result<Report, String> {
    let start = World::new(&b);
    start.check(None)?;
    let mut seen: HashMap<u64, Option<(u64, Action)>> = HashMap::new();
    seen.insert(start.fingerprint(), None);
    let mut report =
        Report { states: 1, transitions: 0, depth: 0, acked_states: 0, failover_states: 0, complete: true };
    // Each frame: a state, its fingerprint, and the actions from it not yet taken.
    let mut stack = vec![(start.fingerprint(), start.actions(&b), start)];
    while let Some((here, actions, w)) = stack.last_mut() {
        let Some(a) = actions.pop() else {
            stack.pop();
            continue;
        };
        let Some(next) = w.step(&a, &b) else { continue };
        report.transitions += 1;
        let f = next.fingerprint();
        if seen.contains_key(&f) {
            continue;
        }
        seen.insert(f, Some((*here, a)));
        if let Err(e) = next.check(Some(w)) {
            return Err(format!("{e}\nafter {} steps:\n{}", stack.len(), trace(&seen, f)));
        }
        report.states += 1;
        report.acked_states += usize::from(next.acked != 0);
        report.failover_states += usize::from(next.latest().shards[0].epoch > 1);
        if report.states >= states_max {
            return Err(format!("more than {states_max} states: tighten the bounds"));
        }
        if report.states.is_multiple_of(1_000_000) {
            eprintln!("explore: {} states, {} deep", report.states, stack.len());
        }
        report.depth = report.depth.max(stack.len());
        stack.push((f, next.actions(&b), next));
    }
    Ok(report)
}

fn trace(seen: &HashMap<u64, Option<(u64, Action)>>, mut f: u64) -> String {
    let mut steps = Vec::new();
    while let Some(Some((parent, a))) = seen.get(&f) {
        steps.push(format!("  {a:?}"));
        f = *parent;
    }
    steps.reverse();
    steps.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: Bounds, failover: bool) -> Report {
        let t = std::time::Instant::now();
        let r = explore(b, 1_000_000).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        println!("{b:?}: {r:?} in {:.1} s", t.elapsed().as_secs_f64());
        assert!(r.acked_states > 0 && (r.failover_states > 0) == failover, "not what was to be reached: {r:?}");
        r
    }

    const BASE: Bounds = Bounds {
        writes: 2,
        crashes: 0,
        lapses: 0,
        losses: 0,
        leader_changes: 0,
        commits: 6,
        // Every state within this many steps (unbounded, the space passes ten million states).
        depth_max: 13,
        copies: 2,
        in_sync_at_start: true,
    };

    #[test]
    fn a_crash_of_any_node_at_any_step() {
        run(Bounds { crashes: 1, ..BASE }, true);
    }

    #[test]
    fn a_lost_message_during_a_catch_up() {
        run(Bounds { losses: 1, in_sync_at_start: false, ..BASE }, false);
    }

    #[test]
    fn a_lapse_and_a_lost_message_with_two_replicas() {
        run(Bounds { lapses: 1, losses: 1, copies: 3, depth_max: 11, ..BASE }, true);
    }

    #[test]
    fn delays_are_not_part_of_a_state() {
        assert_eq!(without_delays("Paused (next retry after 400 ms) x"), "Paused (next retry after  ms) x");
        assert_eq!(
            without_delays("Retry { after_ms: 3200 }, Retry { after_ms: 2 }"),
            "Retry { after_ms:  }, Retry { after_ms:  }"
        );
        assert_eq!(without_delays("no delay"), "no delay");
    }

    /// Every state of a configuration, without a depth bound (depth first). Minutes in a
    /// release build: `cargo test --release -p cadre --lib every_state -- --ignored --nocapture`.
    #[test]
    #[ignore = "minutes in a release build; run by hand"]
    fn every_state_of_a_write_a_crash_and_a_lost_message() {
        let b = Bounds { writes: 1, crashes: 1, losses: 1, depth_max: usize::MAX, ..BASE };
        let t = std::time::Instant::now();
        let r = explore_all(b, 200_000_000).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        println!("{b:?}: {r:?} in {:.1} s", t.elapsed().as_secs_f64());
        assert!(r.complete && r.acked_states > 0 && r.failover_states > 0, "{r:?}");
    }
}
