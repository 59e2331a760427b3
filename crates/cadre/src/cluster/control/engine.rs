//! Leases and the controller's decisions as state machines: what the leader remembers of the
//! leases it granted and of the moves, voters and members it watches, and what each tick decides.
//!
//! ## Design
//! The [`Controller`] owns the leader's memory and nothing else: no tasks, no Raft handle, no
//! clock. Each input carries what it needs: a grant carries the time the renewal was received,
//! a tick carries the time, the metadata table and the Raft group as the leader sees it
//! ([`Group`]), and returns the [`Command`]s to run, in order. The runner
//! ([`super::controller_loop`]) runs them (a metadata write, a voter change, a removal) and
//! stops at the first that fails; the next tick decides again from what was committed.
//!
//! Time is any ordered instant (`I`): the runner uses `tokio::time::Instant`, the golden scripts
//! in `testscripts/` a `Duration` since the script's start, so a script sets every clock.
//!
//! ## Leases
//! A node's lease runs `lease_ms` from when its renewal was *sent*, and the leader grants it only
//! within a confirmed term, so the leader may treat it as expired `lease_ms + drift` after the
//! grant was *received* ([`Limits::lease_hold`]). A new leader does not know its predecessor's
//! grants: it treats every member as live for one hold after it first ticked as leader
//! (`since`), so it never reassigns a shard whose owner may still serve. Its memory belongs to
//! one term: a grant or tick of another term starts it afresh.
//!
//! The node's side is [`Held`]: the lease it holds, extended only forward; [`serves`] is the
//! gate's decision for a key (owner, hand-off, lease, opening), a pure function of the table.
//!
//! ## Caveats
//! - The leader's memory is not replicated (by design: see above); a restarted or new leader
//!   waits one hold before reassigning anything.
//! - Voter changes go one at a time (openraft refuses more), so filling an empty seat and
//!   replacing a dead voter in the same tick take two ticks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::ops::Add;
use std::time::Duration;

use super::super::protocol::RenewReq;
use crate::agent::{CallError, Unavailable};
use crate::meta::raft::NodeId;
use crate::meta::{Cmd, MetaState, ShardState};
use crate::placement::{plan, shard_of};
use crate::storage::{Fence, Key};

/// A learner within this many log entries of the leader counts as caught up (it may vote).
pub(crate) const CAUGHT_UP_ENTRIES: u64 = 100;

/// An instant of the caller's clock.
pub(crate) trait Clock: Copy + Ord + Debug + Add<Duration, Output = Self> {}
impl<T: Copy + Ord + Debug + Add<Duration, Output = T>> Clock for T {}

/// What the controller decides with (from the placement and metadata configuration).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub shard_count: u32,
    /// How long after a grant the leader treats the lease as possibly held (`lease_ms + drift`).
    pub lease_hold: Duration,
    pub handoff_timeout: Duration,
    pub rebalance_interval: Duration,
    pub moves_per_tick_max: usize,
    pub copies: plan::Copies,
    pub voters_max: usize,
    pub voter_down_replace: Duration,
    pub member_gone_remove: Duration,
}

/// The Raft group as the leader sees it at a tick.
#[derive(Debug, Clone, Default)]
pub(crate) struct Group {
    pub term: u64,
    /// This node's Raft id.
    pub me: NodeId,
    /// Voters of every configuration in force (both while a change is joint).
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Member names by Raft id.
    pub names: BTreeMap<NodeId, String>,
    /// The last configuration of a change left joint, to be finished first.
    pub joint: Option<BTreeSet<NodeId>>,
    /// Learners within [`CAUGHT_UP_ENTRIES`] of the leader's log.
    pub caught_up: BTreeSet<NodeId>,
}

/// What a tick asks the runner to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Fix the shard count (a new cluster); nothing else is decided until it is committed.
    Init { shard_count: u32 },
    /// Propose these placement commands (aborted moves first), in batches.
    Place(Vec<Cmd>),
    /// Finish a voter change left joint, to this configuration.
    FinishJoint(BTreeSet<NodeId>),
    /// Replace a voter that is down or has drained with a caught-up learner.
    ReplaceVoter { old: NodeId, new: NodeId, voters: BTreeSet<NodeId> },
    /// Grow the voters to this set (keeping the count odd).
    AddVoters(BTreeSet<NodeId>),
    /// Remove a long-gone member from the metadata and its Raft ids from the learners.
    Remove { name: String, learners: BTreeSet<NodeId> },
}

/// The leader's memory of leases, moves, voters and members (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Controller<I> {
    me: String,
    /// The term this memory belongs to.
    term: u64,
    /// When this node first ticked as leader in `term`.
    since: Option<I>,
    /// Per member: the Raft id it renewed with and when its last grant was received.
    leases: BTreeMap<String, (NodeId, I)>,
    /// When each move in progress (shard, epoch) was first seen.
    moves: BTreeMap<(u32, u64), I>,
    /// Voters seen down, since when.
    voters_down: BTreeMap<NodeId, I>,
    /// Members seen without a lease, since when.
    members_down: BTreeMap<String, I>,
    /// No planned move starts before this.
    next_rebalance: Option<I>,
}

impl<I: Clock> Controller<I> {
    pub(crate) fn new(me: String) -> Controller<I> {
        Controller {
            me,
            term: 0,
            since: None,
            leases: BTreeMap::new(),
            moves: BTreeMap::new(),
            voters_down: BTreeMap::new(),
            members_down: BTreeMap::new(),
            next_rebalance: None,
        }
    }

    /// This node does not lead: everything it remembered is void.
    pub(crate) fn follow(&mut self) {
        *self = Controller::new(std::mem::take(&mut self.me));
    }

    fn at_term(&mut self, term: u64) {
        if self.term != term {
            self.follow();
            self.term = term;
        }
    }

    /// A lease was granted in `term` to `name` (Raft id `raft_id`), whose renewal arrived `at`.
    pub(crate) fn granted(&mut self, term: u64, name: String, raft_id: NodeId, at: I) {
        self.at_term(term);
        self.leases.insert(name, (raft_id, at));
    }

    /// Whether `name`'s lease may still be held, as this leader sees it.
    pub(crate) fn live(&self, name: &str, now: I, hold: Duration) -> bool {
        let Some(since) = self.since else { return false };
        let last = self.leases.get(name).map_or(since, |(_, t)| (*t).max(since));
        now < last + hold
    }

    /// One controller tick: what to propose and change, in order.
    pub(crate) fn tick(&mut self, now: I, st: &MetaState, g: &Group, lim: &Limits) -> Vec<Command> {
        self.at_term(g.term);
        if st.shard_count == 0 {
            return vec![Command::Init { shard_count: lim.shard_count }];
        }
        self.since.get_or_insert(now);
        let live: Vec<String> = st.members.keys().filter(|n| self.live(n, now, lim.lease_hold)).cloned().collect();
        let live_refs: Vec<&str> = live.iter().map(String::as_str).collect();
        let mut place = self.aborts(st, &live_refs, now, lim.handoff_timeout);
        let rebalance = self.next_rebalance.is_none_or(|t| now >= t);
        let moves_max = if rebalance { lim.moves_per_tick_max } else { 0 };
        let planned = plan::plan(st, &live_refs, moves_max, lim.copies);
        if planned.iter().any(|c| matches!(c, Cmd::BeginMove { .. })) {
            self.next_rebalance = Some(now + lim.rebalance_interval);
        }
        place.extend(planned);
        let mut out = Vec::new();
        if !place.is_empty() {
            out.push(Command::Place(place));
        }
        out.extend(self.voter_change(now, st, g, &live, lim));
        let voters: BTreeSet<String> = g.voters.iter().filter_map(|id| g.names.get(id).cloned()).collect();
        let gone = gone_members(st, &live, &voters, &self.me, &mut self.members_down, now, lim.member_gone_remove);
        for name in gone {
            let learners = g.learners.iter().filter(|id| g.names.get(id) == Some(&name)).copied().collect();
            out.push(Command::Remove { name, learners });
        }
        out
    }

    /// Moves to abort: the target is not live or no longer in sync, or the hand-off has taken
    /// longer than `timeout` (while the owner is live: a dead owner's shard is promoted instead).
    fn aborts(&mut self, st: &MetaState, live: &[&str], now: I, timeout: Duration) -> Vec<Cmd> {
        let mut out = Vec::new();
        let mut seen = BTreeMap::new();
        for (shard, e) in st.shards.iter().enumerate() {
            let ShardState::Moving { to } = &e.state else { continue };
            let key = (shard as u32, e.epoch);
            let started = *self.moves.get(&key).unwrap_or(&now);
            seen.insert(key, started);
            let owner_live = e.owner.as_deref().is_some_and(|o| live.contains(&o));
            let behind = e.replica(to).is_some_and(|r| !r.in_sync);
            if owner_live && (!live.contains(&to.as_str()) || behind || now >= started + timeout) {
                out.push(Cmd::AbortMove { shard: shard as u32, expected_epoch: e.epoch });
            }
        }
        self.moves = seen;
        out
    }

    /// Keeps the voters at `voters_max`: finishes a joint change first, replaces a voter down
    /// for `voter_down_replace` (or drained) by the earliest admitted caught-up live learner,
    /// else grows toward the wanted count in odd steps. One change per tick.
    fn voter_change(&mut self, now: I, st: &MetaState, g: &Group, live: &[String], lim: &Limits) -> Option<Command> {
        if let Some(target) = &g.joint {
            return Some(Command::FinishJoint(target.clone()));
        }
        let name_of = |id: &NodeId| g.names.get(id);
        let id_live = |id: NodeId| {
            id == g.me
                || name_of(&id)
                    .is_some_and(|n| live.contains(n) && self.leases.get(n).is_some_and(|(rid, _)| *rid == id))
        };
        let draining = |id: &NodeId| name_of(id).and_then(|n| st.members.get(n)).is_some_and(|r| r.draining);
        let counts = st.shard_counts();
        // A draining voter is replaced once it has handed every shard over (it may lead the moves).
        let drained = |id: &NodeId| draining(id) && name_of(id).is_some_and(|n| counts.get(n.as_str()) == Some(&0));
        let mut dead = Vec::new();
        let mut down = BTreeMap::new();
        for &v in &g.voters {
            if drained(&v) {
                dead.push(v);
            } else if !id_live(v) {
                let since = *self.voters_down.get(&v).unwrap_or(&now);
                down.insert(v, since);
                if now >= since + lim.voter_down_replace {
                    dead.push(v);
                }
            }
        }
        // Admission order: the earliest admitted live learners first.
        let mut learners: Vec<(u64, NodeId)> = g
            .learners
            .iter()
            .filter(|&&id| id_live(id) && g.caught_up.contains(&id) && !draining(&id))
            .filter_map(|id| name_of(id).and_then(|n| st.members.get(n)).map(|r| (r.admitted, *id)))
            .collect();
        self.voters_down = down;
        learners.sort();
        let &(_, first) = learners.first()?;
        if let Some(&old) = dead.first() {
            let mut voters = g.voters.clone();
            voters.remove(&old);
            voters.insert(first);
            return Some(Command::ReplaceVoter { old, new: first, voters });
        }
        // Grow in steps that keep the count odd (1 → 3 → 5), never through an even count.
        let wanted = voters_wanted(lim.voters_max, live.len());
        let mut add = wanted.saturating_sub(g.voters.len()).min(learners.len());
        if add > 0 && (g.voters.len() + add).is_multiple_of(2) {
            add -= 1;
        }
        if add == 0 {
            return None;
        }
        let mut voters = g.voters.clone();
        voters.extend(learners.iter().take(add).map(|(_, id)| *id));
        Some(Command::AddVoters(voters))
    }

    /// The memory, one fact per line (for the scripts).
    #[cfg(test)]
    pub(crate) fn describe(&self, ms: impl Fn(I) -> u128) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let since = self.since.map_or("never".to_string(), |t| format!("{} ms", ms(t)));
        let _ = writeln!(out, "term {}, leading since {since}", self.term);
        for (name, (id, at)) in &self.leases {
            let _ = writeln!(out, "lease {name} (raft {id}) granted at {} ms", ms(*at));
        }
        for ((shard, epoch), at) in &self.moves {
            let _ = writeln!(out, "move of shard {shard} at epoch {epoch} seen at {} ms", ms(*at));
        }
        for (id, at) in &self.voters_down {
            let _ = writeln!(out, "voter {id} down since {} ms", ms(*at));
        }
        for (name, at) in &self.members_down {
            let _ = writeln!(out, "member {name} without a lease since {} ms", ms(*at));
        }
        if let Some(t) = self.next_rebalance {
            let _ = writeln!(out, "no planned move before {} ms", ms(t));
        }
        out
    }
}

/// The admission a renewal needs before its grant: none for the same process at the same
/// address (a new Raft id is a new process: see [`Cmd::Admit`]), else `Admit`, which also
/// clears a `draining` mark the node no longer asks for (left from before a restart).
pub(crate) fn admission(st: &MetaState, req: &RenewReq) -> Option<Cmd> {
    let known = st.members.get(&req.name);
    let current = known.is_some_and(|r| r.addr == req.addr && r.raft_id == req.raft_id);
    let stale_drain = known.is_some_and(|r| r.draining && !req.draining);
    (!current || stale_drain).then(|| Cmd::Admit {
        name: req.name.clone(),
        addr: req.addr.clone(),
        raft_id: req.raft_id,
    })
}

/// Voters to aim for: at most `voters_max` and the live members, and odd (a second voter would
/// make either node's loss stop the group, with no gain in tolerance).
pub(crate) fn voters_wanted(voters_max: usize, live: usize) -> usize {
    let n = voters_max.min(live).max(1);
    if n.is_multiple_of(2) {
        n - 1
    } else {
        n
    }
}

/// Members to remove from the metadata: without a lease for `gone_after` as this leader saw it
/// (`down` tracks since when; a new leader starts counting afresh), owning no shard and no move's
/// target (an owner holds every acknowledged write of its shards: it is kept until they are
/// reassigned), not a voter (replaced first), not `me`.
pub(crate) fn gone_members<I: Clock>(
    st: &MetaState,
    live: &[String],
    voters: &BTreeSet<String>,
    me: &str,
    down: &mut BTreeMap<String, I>,
    now: I,
    gone_after: Duration,
) -> Vec<String> {
    down.retain(|n, _| st.members.contains_key(n) && !live.contains(n));
    let counts = st.shard_counts();
    let targets: BTreeSet<&str> = st
        .shards
        .iter()
        .filter_map(|e| match &e.state {
            ShardState::Moving { to } => Some(to.as_str()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for name in st.members.keys().filter(|n| !live.contains(n) && n.as_str() != me) {
        let since = *down.entry(name.clone()).or_insert(now);
        let owns = counts.get(name.as_str()).is_some_and(|&c| c > 0);
        if now >= since + gone_after && !owns && !targets.contains(name.as_str()) && !voters.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

/// A lease this node holds: granted by the renewal sent at `renewed`, valid until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held<I> {
    pub renewed: I,
    pub until: I,
}

impl<I: Clock> Held<I> {
    /// The lease after a grant of `renewed..until`: only ever extended (a late answer to an
    /// earlier renewal does not shorten it).
    pub(crate) fn extend(held: Option<Held<I>>, renewed: I, until: I) -> Held<I> {
        match held {
            Some(h) if h.until >= until => h,
            _ => Held { renewed, until },
        }
    }

    pub(crate) fn valid(held: Option<Held<I>>, now: I) -> bool {
        held.is_some_and(|h| now < h.until)
    }
}

/// Whether this node (`me`) serves `key` now, by its table: it owns the shard, the shard is not
/// being handed over (unless `handing_off_ok`: a write of a call admitted before), its lease is
/// valid and the shard is open (its replicas fenced at this epoch).
pub(crate) fn serves(
    st: &MetaState,
    me: &str,
    key: &Key,
    handing_off_ok: bool,
    lease_valid: bool,
    open: impl Fn(u32, u64) -> bool,
) -> Result<Fence, CallError> {
    if st.shard_count == 0 {
        return Err(CallError::Unavailable(Unavailable::NoShardTable));
    }
    let shard = shard_of(key, st.shard_count);
    let e = &st.shards[shard as usize];
    if e.owner.as_deref() != Some(me) {
        return Err(CallError::NotOwner { owner: e.owner.clone(), epoch: e.epoch });
    }
    if matches!(e.state, ShardState::Moving { .. }) && !handing_off_ok {
        return Err(CallError::Unavailable(Unavailable::HandingOver { shard }));
    }
    if !lease_valid {
        return Err(CallError::Unavailable(Unavailable::LeaseExpired));
    }
    if !open(shard, e.epoch) {
        return Err(CallError::Unavailable(Unavailable::Opening { shard }));
    }
    Ok(Fence { shard, epoch: e.epoch })
}

#[cfg(test)]
mod tests;
