//! Leases and the placement controller (see the module docs of [`crate::cluster`]).
//!
//! Leader-side memory ([`LeaderState`]) is not replicated: a new leader starts with no lease
//! records and treats every member as live until `lease_ms + lease_drift_margin_ms` after it
//! became leader, so it never reassigns a shard whose owner may still hold a lease granted by its
//! predecessor.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::protocol::{RenewReply, RenewReq};
use super::Inner;
use crate::meta::raft::{self as mraft, ControlReply, ControlReq, MetaNode, NodeId, ReplicaReport, RouteChange};
use crate::meta::{Cmd, CmdReply, MetaState, ShardState, BATCH_CMDS_MAX};
use crate::placement::plan;

/// Bounds a wait on the group (a write, a leadership check): without a quorum it would never end.
async fn bounded<T, E: std::fmt::Display>(
    inner: &Inner,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    let limit = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms * GROUP_WAIT_RPCS);
    bounded_by(limit, what, fut).await
}

/// A wait on the group while the controller lock is held: renewals wait on that lock, so it is
/// kept well under a lease (a quarter of `lease_ms`).
async fn bounded_locked<T, E: std::fmt::Display>(
    inner: &Inner,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    bounded_by(Duration::from_millis(inner.cfg.lease_ms / 4), what, fut).await
}

async fn bounded_by<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no quorum within {limit:?}")),
    }
}

/// A wait on the group lasts at most this many `rpc_timeout_ms`.
const GROUP_WAIT_RPCS: u64 = 5;

/// Wait before retrying a failed renewal.
const RENEW_RETRY_MS: u64 = 100;

/// What the leader remembers about leases and moves.
#[derive(Default)]
pub struct LeaderState {
    /// The term this state belongs to; a different term starts afresh.
    term: u64,
    /// When this node became leader (`None`: not leader at the last tick).
    since: Option<Instant>,
    /// Per member name: the Raft id it renewed with and when the leader last granted its lease.
    leases: HashMap<String, (NodeId, Instant)>,
    /// When each planned move in progress was first seen (shard, epoch).
    moves: HashMap<(u32, u64), Instant>,
    /// Voters seen down, since when.
    voters_down: HashMap<NodeId, Instant>,
    /// Members seen without a lease, since when (by name).
    members_down: HashMap<String, Instant>,
    next_rebalance: Option<Instant>,
}

impl LeaderState {
    /// Whether `name`'s lease may still be held, as the leader sees it.
    fn live(&self, name: &str, now: Instant, hold: Duration) -> bool {
        let Some(since) = self.since else { return false };
        let last = self.leases.get(name).map_or(since, |(_, t)| (*t).max(since));
        now < last + hold
    }
}

fn lease_hold(inner: &Inner) -> Duration {
    Duration::from_millis(inner.cfg.lease_ms + inner.cfg.lease_drift_margin_ms)
}

/// The leader state of the current term (reset when the term changed since it was recorded:
/// lease records of an earlier term of this node may predate grants by another leader).
fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, LeaderState> {
    let term = inner.raft.metrics().borrow().current_term;
    let mut g = inner.leader.lock().unwrap_or_else(|e| e.into_inner());
    if g.term != term {
        *g = LeaderState { term, ..LeaderState::default() };
    }
    g
}

/// Renews this node's lease every `lease_renew_interval_ms`.
pub(super) async fn renew_loop(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.cfg.lease_renew_interval_ms);
    // Without a lease, try again sooner (joining, or a leader change).
    let retry = every.min(Duration::from_millis(RENEW_RETRY_MS));
    let mut next_peer = 0usize;
    loop {
        let sent = Instant::now();
        let wait = match renew_once(&inner, &mut next_peer).await {
            Ok(()) => {
                inner.lease.extend(sent, sent + Duration::from_millis(inner.cfg.lease_ms));
                every
            }
            Err(e) => {
                debug!(error = %e, "lease not renewed");
                retry
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(sent + wait) => {}
            _ = inner.cancel.cancelled() => return,
        }
    }
}

fn renew_req(inner: &Inner) -> RenewReq {
    RenewReq {
        name: inner.name.clone(),
        addr: inner.addr.to_string(),
        raft_id: inner.raft_id,
        draining: inner.draining.load(std::sync::atomic::Ordering::Acquire),
    }
}

/// The leader as this node knows it: its Raft id and member record.
/// The leader's Raft id and node, at its address as gossip has it now (the Raft membership keeps
/// the one it had when added).
pub(super) fn leader_of(inner: &Inner) -> Option<(NodeId, MetaNode)> {
    let (id, mut node) = {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        (id, m.membership_config.membership().get_node(&id)?.clone())
    };
    if let Some(addr) = inner.membership.addr_of(&node.name) {
        node.addr = addr.to_string();
    }
    Some((id, node))
}

async fn renew_once(inner: &Arc<Inner>, next_peer: &mut usize) -> Result<(), String> {
    let req = renew_req(inner);
    let leader = leader_of(inner);
    if leader.as_ref().is_some_and(|(id, _)| *id == inner.raft_id) {
        return match grant(inner, req).await {
            RenewReply::Granted { applied_index } => caught_up(inner, applied_index).await,
            other => Err(format!("{other:?}")),
        };
    }
    // The leader if known, else any live peer (it answers with the leader's address).
    let addr = match leader.and_then(|(_, n)| n.addr.parse::<SocketAddr>().ok()) {
        Some(a) => a,
        None => {
            let view = inner.membership.view();
            let peers: Vec<SocketAddr> = view
                .members
                .iter()
                .filter(|m| m.state.is_active() && m.meta.name != inner.name)
                .map(|m| m.meta.addr)
                .collect();
            if peers.is_empty() {
                return Err("no leader and no peer known".into());
            }
            *next_peer = next_peer.wrapping_add(1);
            peers[*next_peer % peers.len()]
        }
    };
    let timeout = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms);
    let mut to = addr;
    for _ in 0..2 {
        match mraft::ask(&inner.transport, to, &ControlReq::Renew(req.clone()), timeout).await? {
            ControlReply::Renew(RenewReply::Granted { applied_index }) => return caught_up(inner, applied_index).await,
            ControlReply::Renew(RenewReply::NotLeader { leader: Some(l) }) => {
                to = l.parse().map_err(|e| format!("bad leader address {l}: {e}"))?;
            }
            other => return Err(format!("{other:?}")),
        }
    }
    Err("leader moved while renewing".into())
}

/// Waits (briefly) until this node has applied the metadata up to `index`.
async fn caught_up(inner: &Inner, index: Option<u64>) -> Result<(), String> {
    let timeout = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms);
    match inner.raft.wait(Some(timeout)).applied_index_at_least(index, "lease").await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("metadata not applied up to {index:?}: {e}")),
    }
}

/// Leader side of a renewal: admit the node if needed, confirm leadership, record the grant.
pub(super) async fn grant(inner: &Arc<Inner>, req: RenewReq) -> RenewReply {
    let received = Instant::now();
    let leader = leader_of(inner);
    if leader.as_ref().is_none_or(|(id, _)| *id != inner.raft_id) {
        return RenewReply::NotLeader { leader: leader.map(|(_, n)| n.addr) };
    }
    let known = inner.state.borrow().members.get(&req.name).map(|r| (r.addr.clone(), r.draining, r.raft_id));
    // The same process at the same address (a new Raft id is a new process: see `Cmd::Admit`).
    let current = known.as_ref().is_some_and(|(addr, _, id)| *addr == req.addr && *id == req.raft_id);
    let stale_drain = known.as_ref().is_some_and(|(_, draining, _)| *draining && !req.draining);
    if !current || stale_drain {
        let cmd = Cmd::Admit { name: req.name.clone(), addr: req.addr.clone(), raft_id: req.raft_id };
        if let Err(e) = bounded(inner, "admission", inner.raft.client_write(cmd)).await {
            return RenewReply::Retry(format!("cannot admit {}: {e}", req.name));
        }
        info!(name = %req.name, addr = %req.addr, "member admitted");
    }
    let in_group = inner.raft.metrics().borrow().membership_config.membership().get_node(&req.raft_id).is_some();
    if !in_group {
        let node = MetaNode { name: req.name.clone(), addr: req.addr.clone() };
        // Not blocking: the learner catches up in the background; a change already in progress
        // makes this fail, and the next renewal tries again.
        if let Err(e) = bounded(inner, "adding a learner", inner.raft.add_learner(req.raft_id, node, false)).await {
            debug!(error = %e, name = %req.name, "learner not added yet");
        }
    }
    // Not while the controller decides and writes: the index below then covers any
    // reassignment it proposed from a view in which this lease had expired.
    let limit = Duration::from_millis(inner.cfg.lease_renew_interval_ms);
    let Ok(_controller) = tokio::time::timeout(limit, inner.controller.lock()).await else {
        return RenewReply::Retry("the controller is busy".into());
    };
    // Grant only within a confirmed term: a deposed leader must not extend leases.
    let read = match bounded(inner, "leadership check", inner.raft.ensure_linearizable()).await {
        Ok(read) => read.map(|l| l.index),
        Err(e) => return RenewReply::Retry(e),
    };
    // Also past what this leader proposed (a placement write that timed out may commit later):
    // the node serves only once it has applied it.
    let proposed = inner.raft.metrics().borrow().last_log_index;
    let index = read.max(proposed);
    let applied = inner.raft.wait(Some(limit)).applied_index_at_least(index, "grant").await;
    if applied.is_err() {
        return RenewReply::Retry(format!("own log not applied up to {index:?} yet"));
    }
    lock(inner).leases.insert(req.name, (req.raft_id, received));
    RenewReply::Granted { applied_index: index }
}

/// Leader side of a graceful leave: mark the member draining (the controller moves its shards).
pub(super) async fn drain(inner: &Arc<Inner>, name: String) -> Result<(), String> {
    if !is_leader(inner) {
        return Err("not the leader".into());
    }
    bounded(inner, "draining", inner.raft.client_write(Cmd::Drain { name }))
        .await?
        .data
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Leader side of a route change: one log entry. The reply is the route's id.
pub(super) async fn route(inner: &Arc<Inner>, change: RouteChange) -> Result<u64, String> {
    if !is_leader(inner) {
        return Err("not the leader".into());
    }
    let (cmd, id) = match change {
        RouteChange::Add(r) => {
            let id = r.id();
            (Cmd::AddRoute(r), id)
        }
        RouteChange::Remove(id) => (Cmd::RemoveRoute { id }, id),
    };
    bounded(inner, "changing a route", inner.raft.client_write(cmd)).await?.data.map(|_| id).map_err(|e| e.to_string())
}

/// Sends a request to the leader (served here when this node leads).
pub(super) async fn to_leader(inner: &Arc<Inner>, req: ControlReq) -> Result<ControlReply, String> {
    let (leader, node) = leader_of(inner).ok_or("no leader known")?;
    if leader == inner.raft_id {
        return Ok(match req {
            ControlReq::Drain { name } => ControlReply::Drain(drain(inner, name).await),
            ControlReq::HandedOff { shard, epoch } => ControlReply::HandedOff(complete_move(inner, shard, epoch).await),
            ControlReq::Replicas(reports) => ControlReply::Replicas(replica_reports(inner, reports).await),
            ControlReq::Route(change) => ControlReply::Route(route(inner, change).await),
            other => return Err(format!("not a leader request: {other:?}")),
        });
    }
    let addr = node.addr.parse().map_err(|e| format!("leader address {}: {e}", node.addr))?;
    mraft::ask(&inner.transport, addr, &req, Duration::from_millis(inner.meta_cfg.rpc_timeout_ms)).await
}

/// Leader side of a finished hand-off.
pub(super) async fn complete_move(inner: &Arc<Inner>, shard: u32, epoch: u64) -> Result<(), String> {
    if !is_leader(inner) {
        return Err("not the leader".into());
    }
    let r = bounded(
        inner,
        "completing a move",
        inner.raft.client_write(Cmd::CompleteMove { shard, expected_epoch: epoch }),
    );
    r.await?.data.map(|_| ()).map_err(|e| e.to_string())
}

/// Leader side of an owner's replica reports: in sync after a catch-up, or out of sync after a
/// missed write (the owner acknowledges that write only once this is committed). One log entry
/// for the batch; one result per report.
pub(super) async fn replica_reports(
    inner: &Arc<Inner>,
    reports: Vec<ReplicaReport>,
) -> Result<Vec<Result<(), String>>, String> {
    if !is_leader(inner) {
        return Err("not the leader".into());
    }
    if reports.len() > BATCH_CMDS_MAX {
        return Err(format!("{} replica reports in one request, over {BATCH_CMDS_MAX}", reports.len()));
    }
    let cmds = reports
        .into_iter()
        .map(|r| {
            let ReplicaReport { shard, epoch, node, in_sync, generation } = r;
            if in_sync {
                Cmd::ReplicaSynced { shard, node, expected_epoch: epoch, generation }
            } else {
                Cmd::ReplicaOutOfSync { shard, node, expected_epoch: epoch }
            }
        })
        .collect();
    let reply = bounded(inner, "replica reports", inner.raft.client_write(Cmd::Batch(cmds))).await?;
    match reply.data.map_err(|e| e.to_string())? {
        CmdReply::Batch(outcomes) => Ok(outcomes.into_iter().map(|o| o.map(drop).map_err(|e| e.to_string())).collect()),
        other => Err(format!("unexpected reply to a batch: {other:?}")),
    }
}

fn is_leader(inner: &Inner) -> bool {
    inner.raft.metrics().borrow().state == ServerState::Leader
}

/// Runs the controller every `controller_tick_ms` while this node leads.
pub(super) async fn controller_loop(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.cfg.controller_tick_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = inner.cancel.cancelled() => return,
        }
        if !is_leader(&inner) {
            *lock(&inner) = LeaderState::default();
            continue;
        }
        tick(&inner).await;
    }
}

async fn tick(inner: &Arc<Inner>) {
    let _controller = inner.controller.lock().await;
    let now = Instant::now();
    if inner.state.borrow().shard_count == 0 {
        let init = inner.raft.client_write(Cmd::Init { shard_count: inner.cfg.shard_count });
        if let Err(e) = bounded_locked(inner, "init", init).await {
            warn!(error = %e, "cannot fix the shard count");
            return;
        }
    }
    // Applied by now: `client_write` returns after this node applied the entry.
    let st: Arc<MetaState> = inner.state.borrow().clone();
    let hold = lease_hold(inner);
    let (cmds, live) = {
        let mut ls = lock(inner);
        ls.since.get_or_insert(now);
        let live: Vec<String> = st.members.keys().filter(|n| ls.live(n, now, hold)).cloned().collect();
        let live_refs: Vec<&str> = live.iter().map(String::as_str).collect();
        let mut cmds = aborts(inner, &mut ls, &st, &live_refs, now);
        let rebalance = ls.next_rebalance.is_none_or(|t| now >= t);
        let moves_max = if rebalance { inner.cfg.max_moves_per_tick } else { 0 };
        let copies = if inner.repl.enabled() {
            plan::Copies::Replicated { factor: inner.cfg.replication_factor }
        } else {
            plan::Copies::Shared
        };
        let planned = plan::plan(&st, &live_refs, moves_max, copies);
        if planned.iter().any(|c| matches!(c, Cmd::BeginMove { .. })) {
            ls.next_rebalance = Some(now + Duration::from_millis(inner.cfg.rebalance_interval_ms));
        }
        cmds.extend(planned);
        (cmds, live)
    };
    if !cmds.is_empty() {
        debug!(count = cmds.len(), "placement commands");
        // One log entry per batch: a tick that plans for every shard costs one write, and
        // finishes well within the controller lock's bound.
        for chunk in cmds.chunks(BATCH_CMDS_MAX) {
            let write = inner.raft.client_write(Cmd::Batch(chunk.to_vec()));
            match bounded_locked(inner, "placement", write).await.map(|r| r.data) {
                Ok(Ok(CmdReply::Batch(outcomes))) => {
                    for e in outcomes.into_iter().filter_map(Result::err) {
                        debug!(error = %e, "placement command refused (stale view)");
                    }
                }
                Ok(other) => warn!(reply = ?other, "unexpected reply to placement commands"),
                Err(e) => {
                    debug!(error = %e, "placement commands not committed");
                    break;
                }
            }
        }
    }
    voters(inner, &live, now).await;
    remove_gone(inner, &st, &live, now).await;
}

/// Members to remove from the metadata: without a lease for `gone_after` as this leader saw it
/// (`down` tracks since when; a new leader starts counting afresh), owning no shard and no move's
/// target (an owner holds every acknowledged write of its shards: it is kept until they are
/// reassigned), not a voter (replaced first), not `me`.
fn gone_members(
    st: &MetaState,
    live: &[String],
    voters: &BTreeSet<String>,
    me: &str,
    down: &mut HashMap<String, Instant>,
    now: Instant,
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

/// Removes long-gone members from the metadata and their Raft ids from the group's learners.
async fn remove_gone(inner: &Arc<Inner>, st: &MetaState, live: &[String], now: Instant) {
    let membership = inner.raft.metrics().borrow().membership_config.membership().clone();
    let name_of = |id: &NodeId| membership.get_node(id).map(|n| n.name.clone());
    let voters: BTreeSet<String> = membership.voter_ids().filter_map(|id| name_of(&id)).collect();
    let gone_after = Duration::from_millis(inner.meta_cfg.member_gone_remove_ms);
    let gone = {
        let mut ls = lock(inner);
        gone_members(st, live, &voters, &inner.name, &mut ls.members_down, now, gone_after)
    };
    for name in gone {
        info!(member = %name, "removing a member gone for longer than meta.member_gone_remove_ms");
        let remove = inner.raft.client_write(Cmd::Remove { name: name.clone() });
        if let Err(e) = bounded_locked(inner, "member removal", remove).await {
            debug!(member = %name, error = %e, "member not removed yet");
            return;
        }
        let learners: BTreeSet<NodeId> =
            membership.learner_ids().filter(|id| name_of(id).as_deref() == Some(name.as_str())).collect();
        if !learners.is_empty() {
            let change = inner.raft.change_membership(openraft::ChangeMembers::RemoveNodes(learners), false);
            if let Err(e) = bounded_locked(inner, "learner removal", change).await {
                debug!(member = %name, error = %e, "learner not removed yet");
            }
        }
    }
}

/// Moves to abort: target not live or no longer in sync, or the hand-off took longer than
/// `handoff_timeout_ms`.
fn aborts(inner: &Inner, ls: &mut LeaderState, st: &MetaState, live: &[&str], now: Instant) -> Vec<Cmd> {
    let timeout = Duration::from_millis(inner.cfg.handoff_timeout_ms);
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (shard, e) in st.shards.iter().enumerate() {
        let ShardState::Moving { to } = &e.state else { continue };
        let key = (shard as u32, e.epoch);
        let started = *ls.moves.get(&key).unwrap_or(&now);
        seen.insert(key, started);
        let owner_live = e.owner.as_deref().is_some_and(|o| live.contains(&o));
        let behind = e.replica(to).is_some_and(|r| !r.in_sync);
        if owner_live && (!live.contains(&to.as_str()) || behind || now >= started + timeout) {
            warn!(shard, to = %to, "planned move aborted");
            out.push(Cmd::AbortMove { shard: shard as u32, expected_epoch: e.epoch });
        }
    }
    ls.moves = seen;
    out
}

/// Voters to aim for: at most `voters_max` and the live members, and odd (a second voter would
/// make either node's loss stop the group, with no gain in tolerance).
fn voters_wanted(voters_max: usize, live: usize) -> usize {
    let n = voters_max.min(live).max(1);
    if n.is_multiple_of(2) {
        n - 1
    } else {
        n
    }
}

/// Keeps the voter set at `voters_max`: adds caught-up live learners, replaces voters that have
/// been down longer than `voter_down_replace_ms`. One change at a time (openraft refuses more).
async fn voters(inner: &Arc<Inner>, live: &[String], now: Instant) {
    let m = inner.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    // A change is two steps (joint, then the new config), and openraft takes the second only
    // while the caller still waits: a change cut short by our time bound (or a leader change)
    // stays joint, where the old config's quorum is still needed. Finish it first.
    if let [.., last] = membership.get_joint_config().as_slice() {
        if membership.get_joint_config().len() > 1 {
            let target: BTreeSet<NodeId> = last.clone();
            info!(voters = ?target, "finishing a voter change left joint");
            let change = inner.raft.change_membership(target, true);
            if let Err(e) = bounded_locked(inner, "finishing a voter change", change).await {
                debug!(error = %e, "voter change not finished yet");
            }
            return;
        }
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let name_of = |id: &NodeId| membership.get_node(id).map(|n| n.name.clone());
    let id_live = |ls: &LeaderState, id: NodeId| {
        if id == inner.raft_id {
            return true;
        }
        let Some(name) = name_of(&id) else { return false };
        live.contains(&name) && ls.leases.get(&name).is_some_and(|(rid, _)| *rid == id)
    };
    let last = m.last_log_index.unwrap_or(0);
    let caught_up = |id: NodeId| {
        m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).is_some_and(|l| l.index + 100 >= last)
    };
    let st = inner.state.borrow().clone();
    let draining = |id: &NodeId| name_of(id).is_some_and(|n| st.members.get(&n).is_some_and(|r| r.draining));
    let counts = st.shard_counts();
    // A draining voter is replaced once it has handed every shard over (it may lead the moves).
    let drained = |id: &NodeId| draining(id) && name_of(id).is_some_and(|n| counts.get(n.as_str()) == Some(&0));
    let (learners, dead) = {
        let mut ls = lock(inner);
        let hold_down = Duration::from_millis(inner.meta_cfg.voter_down_replace_ms);
        let mut dead = Vec::new();
        for &v in &voters {
            if drained(&v) {
                // Leaving on purpose: replace it at once.
                dead.push(v);
            } else if id_live(&ls, v) {
                ls.voters_down.remove(&v);
            } else {
                let since = *ls.voters_down.entry(v).or_insert(now);
                if now >= since + hold_down {
                    dead.push(v);
                }
            }
        }
        ls.voters_down.retain(|v, _| voters.contains(v));
        // Admission order: the earliest admitted live learners first.
        let mut learners: Vec<(u64, NodeId)> = membership
            .learner_ids()
            .filter(|id| id_live(&ls, *id) && caught_up(*id) && !draining(id))
            .filter_map(|id| name_of(&id).and_then(|n| st.members.get(&n).map(|r| (r.admitted, id))))
            .collect();
        learners.sort();
        (learners.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), dead)
    };
    let Some(&first) = learners.first() else { return };
    let mut next: BTreeSet<NodeId> = voters.clone();
    if let Some(old) = dead.first() {
        next.remove(old);
        next.insert(first);
        info!(old, new = first, "replacing a voter that is down or leaving");
        if let Err(e) = bounded_locked(inner, "voter replacement", inner.raft.change_membership(next, false)).await {
            debug!(error = %e, "voter not replaced yet");
        }
        return;
    }
    // Grow in steps that keep the count odd (1 → 3 → 5), never through an even count.
    let wanted = voters_wanted(inner.meta_cfg.voters_max, live.len());
    let mut add = wanted.saturating_sub(voters.len()).min(learners.len());
    if add > 0 && (voters.len() + add).is_multiple_of(2) {
        add -= 1;
    }
    if add == 0 {
        return;
    }
    next.extend(learners.iter().take(add));
    info!(voters = ?next, "adding voters");
    if let Err(e) = bounded_locked(inner, "voter addition", inner.raft.change_membership(next, true)).await {
        debug!(error = %e, "voters not added yet");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_removed_only_when_gone_long_owning_nothing_and_no_voter() {
        use crate::meta::Cmd;
        let mut st = MetaState::default();
        st.apply(&Cmd::Init { shard_count: 2 }).unwrap();
        for n in ["a", "b", "c", "d", "e"] {
            st.apply(&Cmd::Admit { name: n.into(), addr: format!("{n}:1"), raft_id: 0 }).unwrap();
        }
        st.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
        st.apply(&Cmd::Assign { shard: 1, owner: "c".into(), expected_epoch: 0 }).unwrap();
        st.apply(&Cmd::BeginMove { shard: 0, to: "e".into(), expected_epoch: 1 }).unwrap();
        let live = vec!["a".to_string()];
        let voters: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let (mut down, t0, after) = (HashMap::new(), Instant::now(), Duration::from_secs(10));
        let gone = |down: &mut HashMap<String, Instant>, at: Duration| {
            gone_members(&st, &live, &voters, "a", down, t0 + at, after)
        };
        // Seen down now: not yet gone.
        assert!(gone(&mut down, Duration::ZERO).is_empty());
        assert_eq!(down.len(), 4, "b, c, d and e are counted from now");
        // Long after: b is a voter, c owns shard 1, e is shard 0's move target; d goes.
        assert_eq!(gone(&mut down, after), ["d"]);
        // A member seen live again starts over.
        let live_d = vec!["a".to_string(), "d".to_string()];
        gone_members(&st, &live_d, &voters, "a", &mut down, t0 + after, after);
        assert!(!down.contains_key("d"));
        assert!(gone(&mut down, after + Duration::from_secs(1)).is_empty(), "d's wait started again");
    }

    #[test]
    fn voter_counts_are_odd_and_bounded() {
        let wanted: Vec<usize> = (0..8).map(|live| voters_wanted(3, live)).collect();
        assert_eq!(wanted, [1, 1, 1, 3, 3, 3, 3, 3]);
        assert_eq!(voters_wanted(5, 4), 3);
        assert_eq!(voters_wanted(5, 9), 5);
        assert_eq!(voters_wanted(4, 9), 3, "an even maximum is rounded down");
    }
}
