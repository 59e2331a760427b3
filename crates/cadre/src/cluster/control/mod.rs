//! Leases and the placement controller: the runner (see the module docs of [`crate::cluster`]).
//!
//! What the leader remembers and decides is the [`engine::Controller`]'s: this module renews
//! this node's lease, grants others' (admission, leadership check, the grant recorded in the
//! engine), and runs each controller tick's commands against the Raft group, one at a time,
//! under the controller lock. The engine never waits; the waits here are all bounded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::protocol::{ControlError, RenewReply, RenewReq};
use super::protocol::{ControlReply, ControlReq, ReplicaReport, RouteChange};
use super::raft_net;
use super::Inner;
use crate::meta::raft::{MetaNode, NodeId};
use crate::meta::{Cmd, CmdReply, MetaError, BATCH_CMDS_MAX};
use crate::placement::plan;

pub(crate) mod engine;
use engine::{Command, Controller, Group, Limits, CAUGHT_UP_ENTRIES};

/// Bounds a wait on the group (a write, a leadership check): without a quorum it would never end.
async fn bounded<T, E: std::fmt::Display>(
    inner: &Inner,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ControlError> {
    let limit = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms * GROUP_WAIT_RPCS);
    bounded_by(limit, what, fut).await
}

/// A wait on the group while the controller lock is held: renewals wait on that lock, so it is
/// kept well under a lease (a quarter of `lease_ms`).
async fn bounded_locked<T, E: std::fmt::Display>(
    inner: &Inner,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ControlError> {
    bounded_by(Duration::from_millis(inner.cfg.lease_ms / 4), what, fut).await
}

async fn bounded_by<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| ControlError::Group { what: what.into(), reason: e.to_string() }),
        Err(_) => Err(ControlError::NoQuorum { what: what.into(), limit_ms: limit.as_millis() as u64 }),
    }
}

/// A wait on the group lasts at most this many `rpc_timeout_ms`.
const GROUP_WAIT_RPCS: u64 = 5;

/// Wait before retrying a failed renewal.
const RENEW_RETRY_MS: u64 = 100;

/// The cluster's control side on this node: the leader's controller engine and the lock its
/// ticks and grants share, the control lane's admission (a pool of permits per kind of request)
/// and whether this node is leaving.
pub(super) struct ControlState {
    pub(super) leader: std::sync::Mutex<Controller<Instant>>,
    /// Held by a controller tick and by the grant of a lease (see [`grant`]).
    pub(super) controller: tokio::sync::Mutex<()>,
    pub(super) control_permits: Arc<tokio::sync::Semaphore>,
    /// Raft RPCs have their own: slow placement requests must not starve heartbeats and votes.
    pub(super) raft_permits: Arc<tokio::sync::Semaphore>,
    /// And lease renewals theirs: a burst of placement or replica requests must not let leases
    /// lapse.
    pub(super) renew_permits: Arc<tokio::sync::Semaphore>,
    /// Control-lane requests dropped because their pool was out of permits.
    pub(super) dropped: prometheus_client::metrics::counter::Counter,
    /// Metadata snapshots received that break the metadata's invariants (refused).
    pub(super) snapshots_refused: prometheus_client::metrics::counter::Counter,
    /// Set once this node starts leaving (renewals say so).
    pub(super) draining: std::sync::atomic::AtomicBool,
}

impl ControlState {
    pub(super) fn new(name: &str, metrics: &crate::metrics::Metrics) -> ControlState {
        let permits = || Arc::new(tokio::sync::Semaphore::new(super::CONTROL_IN_FLIGHT_MAX));
        ControlState {
            leader: std::sync::Mutex::new(Controller::new(name.to_string())),
            controller: tokio::sync::Mutex::new(()),
            control_permits: permits(),
            raft_permits: permits(),
            renew_permits: permits(),
            dropped: metrics
                .counter("control_requests_dropped", "Control-lane requests dropped because too many were in flight"),
            snapshots_refused: metrics.counter(
                "meta_snapshots_refused",
                "Metadata snapshots received from the leader that broke the metadata's invariants, refused",
            ),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The controller engine, for the leader's memory of the current term (the engine starts
/// afresh when the term changed since it was last told).
fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, Controller<Instant>> {
    inner.control.leader.lock().unwrap_or_else(|e| e.into_inner())
}

fn term(inner: &Inner) -> u64 {
    inner.raft.metrics().borrow().current_term
}

fn limits(inner: &Inner) -> Limits {
    let copies = if inner.repl.enabled() {
        plan::Copies::Replicated { factor: inner.cfg.replication_factor }
    } else {
        plan::Copies::Shared
    };
    Limits {
        shard_count: inner.cfg.shard_count,
        lease_hold: Duration::from_millis(inner.cfg.lease_ms + inner.cfg.lease_drift_margin_ms),
        handoff_timeout: Duration::from_millis(inner.cfg.handoff_timeout_ms),
        rebalance_interval: Duration::from_millis(inner.cfg.rebalance_interval_ms),
        moves_per_tick_max: inner.cfg.max_moves_per_tick,
        copies,
        voters_max: inner.meta_cfg.voters_max,
        voter_down_replace: Duration::from_millis(inner.meta_cfg.voter_down_replace_ms),
        member_gone_remove: Duration::from_millis(inner.meta_cfg.member_gone_remove_ms),
    }
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
        draining: inner.control.draining.load(std::sync::atomic::Ordering::Acquire),
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

async fn renew_once(inner: &Arc<Inner>, next_peer: &mut usize) -> Result<(), ControlError> {
    let req = renew_req(inner);
    let leader = leader_of(inner);
    if leader.as_ref().is_some_and(|(id, _)| *id == inner.raft_id) {
        return match grant(inner, req).await {
            RenewReply::Granted { applied_index } => caught_up(inner, applied_index).await,
            RenewReply::NotLeader { .. } => Err(ControlError::NotLeader),
            RenewReply::Retry(e) => Err(e),
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
                return Err(ControlError::NoPeer);
            }
            *next_peer = next_peer.wrapping_add(1);
            peers[*next_peer % peers.len()]
        }
    };
    let timeout = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms);
    let mut to = addr;
    for _ in 0..2 {
        match raft_net::ask(&inner.transport, to, &ControlReq::Renew(req.clone()), timeout).await? {
            ControlReply::Renew(RenewReply::Granted { applied_index }) => return caught_up(inner, applied_index).await,
            ControlReply::Renew(RenewReply::NotLeader { leader: Some(l) }) => {
                to = l.parse().map_err(|_| ControlError::BadAddress(l))?;
            }
            ControlReply::Renew(RenewReply::NotLeader { leader: None }) => return Err(ControlError::NoLeader),
            ControlReply::Renew(RenewReply::Retry(e)) => return Err(e),
            other => return Err(ControlError::Protocol(format!("unexpected reply to a renewal: {other:?}"))),
        }
    }
    Err(ControlError::LeaderMoved)
}

/// Waits (briefly) until this node has applied the metadata up to `index`.
async fn caught_up(inner: &Inner, index: Option<u64>) -> Result<(), ControlError> {
    let timeout = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms);
    match inner.raft.wait(Some(timeout)).applied_index_at_least(index, "lease").await {
        Ok(_) => Ok(()),
        Err(_) => Err(ControlError::NotApplied { index }),
    }
}

/// Leader side of a renewal: admit the node if needed, confirm leadership, record the grant.
pub(super) async fn grant(inner: &Arc<Inner>, req: RenewReq) -> RenewReply {
    let received = Instant::now();
    let leader = leader_of(inner);
    if leader.as_ref().is_none_or(|(id, _)| *id != inner.raft_id) {
        return RenewReply::NotLeader { leader: leader.map(|(_, n)| n.addr) };
    }
    let admit = engine::admission(&inner.state.borrow(), &req);
    if let Some(cmd) = admit {
        if let Err(e) = bounded(inner, "admission", inner.raft.client_write(cmd)).await {
            return RenewReply::Retry(e);
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
    let Ok(_controller) = tokio::time::timeout(limit, inner.control.controller.lock()).await else {
        return RenewReply::Retry(ControlError::Busy);
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
        return RenewReply::Retry(ControlError::NotApplied { index });
    }
    lock(inner).granted(term(inner), req.name, req.raft_id, received);
    RenewReply::Granted { applied_index: index }
}

/// Leader side of a graceful leave: mark the member draining (the controller moves its shards).
pub(super) async fn drain(inner: &Arc<Inner>, name: String) -> Result<(), ControlError> {
    if !is_leader(inner) {
        return Err(ControlError::NotLeader);
    }
    bounded(inner, "draining", inner.raft.client_write(Cmd::Drain { name }))
        .await?
        .data
        .map(drop)
        .map_err(ControlError::Meta)
}

/// Leader side of a route change: one log entry. The reply is the route's id.
pub(super) async fn route(inner: &Arc<Inner>, change: RouteChange) -> Result<u64, ControlError> {
    if !is_leader(inner) {
        return Err(ControlError::NotLeader);
    }
    let (cmd, id) = match change {
        RouteChange::Add(r) => {
            let id = r.id();
            (Cmd::AddRoute(r), id)
        }
        RouteChange::Remove(id) => (Cmd::RemoveRoute { id }, id),
    };
    bounded(inner, "changing a route", inner.raft.client_write(cmd)).await?.data.map(|_| id).map_err(ControlError::Meta)
}

/// Sends a request to the leader (served here when this node leads).
pub(super) async fn to_leader(inner: &Arc<Inner>, req: ControlReq) -> Result<ControlReply, ControlError> {
    let (leader, node) = leader_of(inner).ok_or(ControlError::NoLeader)?;
    if leader == inner.raft_id {
        return Ok(match req {
            ControlReq::Drain { name } => ControlReply::Drain(drain(inner, name).await),
            ControlReq::HandedOff { shard, epoch } => ControlReply::HandedOff(complete_move(inner, shard, epoch).await),
            ControlReq::Replicas(reports) => ControlReply::Replicas(replica_reports(inner, reports).await),
            ControlReq::Route(change) => ControlReply::Route(route(inner, change).await),
            other => return Err(ControlError::Protocol(format!("not a leader request: {other:?}"))),
        });
    }
    let addr = node.addr.parse().map_err(|_| ControlError::BadAddress(node.addr))?;
    raft_net::ask(&inner.transport, addr, &req, Duration::from_millis(inner.meta_cfg.rpc_timeout_ms)).await
}

/// Leader side of a finished hand-off.
pub(super) async fn complete_move(inner: &Arc<Inner>, shard: u32, epoch: u64) -> Result<(), ControlError> {
    if !is_leader(inner) {
        return Err(ControlError::NotLeader);
    }
    let r = bounded(
        inner,
        "completing a move",
        inner.raft.client_write(Cmd::CompleteMove { shard, expected_epoch: epoch }),
    );
    r.await?.data.map(drop).map_err(ControlError::Meta)
}

/// Leader side of an owner's replica reports: in sync after a catch-up, or out of sync after a
/// missed write (the owner acknowledges that write only once this is committed). One log entry
/// for the batch; one result per report.
pub(super) async fn replica_reports(
    inner: &Arc<Inner>,
    reports: Vec<ReplicaReport>,
) -> Result<Vec<Result<(), MetaError>>, ControlError> {
    if !is_leader(inner) {
        return Err(ControlError::NotLeader);
    }
    if reports.len() > BATCH_CMDS_MAX {
        return Err(ControlError::TooManyReports { count: reports.len(), max: BATCH_CMDS_MAX });
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
    match reply.data.map_err(ControlError::Meta)? {
        CmdReply::Batch(outcomes) => Ok(outcomes.into_iter().map(|o| o.map(drop)).collect()),
        other => Err(ControlError::Protocol(format!("unexpected reply to a batch: {other:?}"))),
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
            lock(&inner).follow();
            continue;
        }
        tick(&inner).await;
    }
}

/// One tick: the engine decides from the table and the group as they are now, the runner
/// runs its commands in order. A new cluster's shard count is fixed first, then the tick
/// decides again from the table that holds it.
async fn tick(inner: &Arc<Inner>) {
    let _controller = inner.control.controller.lock().await;
    for _ in 0..2 {
        // Applied by now: `client_write` returns after this node applied the entry.
        let st = inner.state.borrow().clone();
        let group = group(inner);
        let cmds = lock(inner).tick(Instant::now(), &st, &group, &limits(inner));
        let mut again = false;
        for cmd in cmds {
            match run(inner, cmd).await {
                Ran::Next => {}
                Ran::Again => again = true,
                Ran::Stop => return,
            }
        }
        if !again {
            return;
        }
    }
}

/// The Raft group as this leader sees it.
fn group(inner: &Inner) -> Group {
    let m = inner.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let joint = membership.get_joint_config();
    let last = m.last_log_index.unwrap_or(0);
    let caught_up = |id: &NodeId| {
        let matched = m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten());
        matched.is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
    };
    Group {
        term: m.current_term,
        me: inner.raft_id,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        names: membership.nodes().map(|(id, n)| (*id, n.name.clone())).collect(),
        joint: (joint.len() > 1).then(|| joint.last().cloned()).flatten(),
        caught_up: membership.learner_ids().filter(caught_up).collect(),
    }
}

/// What the tick does after a command.
enum Ran {
    Next,
    /// The shard count is fixed: decide again.
    Again,
    /// A change failed: the next tick decides again.
    Stop,
}

async fn run(inner: &Arc<Inner>, cmd: Command) -> Ran {
    match cmd {
        Command::Init { shard_count } => {
            let init = inner.raft.client_write(Cmd::Init { shard_count });
            if let Err(e) = bounded_locked(inner, "init", init).await {
                warn!(error = %e, "cannot fix the shard count");
                return Ran::Stop;
            }
            Ran::Again
        }
        Command::Place(cmds) => {
            place(inner, cmds).await;
            Ran::Next
        }
        Command::FinishJoint(target) => {
            info!(voters = ?target, "finishing a voter change left joint");
            let change = inner.raft.change_membership(target, true);
            if let Err(e) = bounded_locked(inner, "finishing a voter change", change).await {
                debug!(error = %e, "voter change not finished yet");
            }
            Ran::Next
        }
        Command::ReplaceVoter { old, new, voters } => {
            info!(old, new, "replacing a voter that is down or leaving");
            let change = inner.raft.change_membership(voters, false);
            if let Err(e) = bounded_locked(inner, "voter replacement", change).await {
                debug!(error = %e, "voter not replaced yet");
            }
            Ran::Next
        }
        Command::AddVoters(voters) => {
            info!(voters = ?voters, "adding voters");
            if let Err(e) = bounded_locked(inner, "voter addition", inner.raft.change_membership(voters, true)).await {
                debug!(error = %e, "voters not added yet");
            }
            Ran::Next
        }
        Command::Remove { name, learners } => remove(inner, name, learners).await,
    }
}

/// Proposes placement commands, one log entry per batch: a tick that plans for every shard
/// costs one write, and finishes well within the controller lock's bound.
async fn place(inner: &Arc<Inner>, cmds: Vec<Cmd>) {
    debug!(count = cmds.len(), "placement commands");
    for c in &cmds {
        if let Cmd::AbortMove { shard, .. } = c {
            warn!(shard, "planned move aborted");
        }
    }
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
                return;
            }
        }
    }
}

/// Removes a long-gone member from the metadata and its Raft ids from the group's learners.
async fn remove(inner: &Arc<Inner>, name: String, learners: BTreeSet<NodeId>) -> Ran {
    info!(member = %name, "removing a member gone for longer than meta.member_gone_remove_ms");
    let remove = inner.raft.client_write(Cmd::Remove { name: name.clone() });
    if let Err(e) = bounded_locked(inner, "member removal", remove).await {
        debug!(member = %name, error = %e, "member not removed yet");
        return Ran::Stop;
    }
    if !learners.is_empty() {
        let change = inner.raft.change_membership(openraft::ChangeMembers::RemoveNodes(learners), false);
        if let Err(e) = bounded_locked(inner, "learner removal", change).await {
            debug!(member = %name, error = %e, "learner not removed yet");
        }
    }
    Ran::Next
}
