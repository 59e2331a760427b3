//! Keyed agents across the cluster: the metadata group, leases, the placement controller,
//! routing of agent requests, and hand-offs.
//!
//! ## Pieces
//! - **Metadata**: every node runs a member of one openraft group ([`crate::meta::raft`]) whose
//!   state machine is [`MetaState`] (members, shard table). The first `meta.voters_max` admitted
//!   nodes vote; the others are learners, so every node holds a copy of the table for routing. A
//!   node started without seeds founds the cluster (a group of one voter); the others are admitted
//!   through their first lease renewal.
//! - **Leases** ([`control`]): each node renews its lease through the leader every
//!   `lease_renew_interval_ms`. The lease runs `lease_ms` from when the renewal was *sent*, and the
//!   leader grants it only after confirming its leadership with a quorum, so it lies within any
//!   leader's term. A node serves its shards only while its lease holds; the leader treats a lease
//!   as expired `lease_ms + lease_drift_margin_ms` after it last granted it (a new leader after its
//!   own start), so an owner stops serving before its shards can be reassigned.
//! - **Controller** ([`control`]): on the leader, every `controller_tick_ms`: fix the shard count,
//!   assign unowned shards and those of expired owners at once, start at most
//!   `max_moves_per_tick` planned moves toward the desired owners every `rebalance_interval_ms`
//!   ([`crate::placement::plan`]), abort moves whose target died or that exceed
//!   `handoff_timeout_ms`, keep the voter set full (add caught-up learners, replace voters
//!   down for `meta.voter_down_replace_ms`), and remove members gone for
//!   `meta.member_gone_remove_ms` that own nothing and vote no more.
//! - **Routing** (here): a request for a key goes to the owner of its shard in this node's copy of
//!   the table; a node that does not serve the shard answers `NotOwner` with its own view as a hint,
//!   which the sender follows when it is newer than its own (at most `redirects_max` times). When
//!   no owner serves the shard (none assigned yet, a hand-off, an expired lease) the sender waits
//!   for its table to change and retries, until the call's deadline. A call whose ask timed out
//!   is not retried (it may have run). An ask in flight when the table gives the shard to
//!   another owner is sent again to that owner with the same signal: the record of handled
//!   signals stored with the agent's state answers a repeat with the original reply.
//! - **Replicas** ([`replica`]): with node-local storage each shard's state is also kept on
//!   in-sync replicas; a write is acknowledged once they all have it, and a dead owner's shard is
//!   promoted on one of them.
//! - **Hand-off** ([`handoff`]): the old owner of a shard that is `Moving` refuses new work,
//!   passivates its agents (their state is stored and replicated), and reports to the leader,
//!   which completes the move at epoch + 1. The target is an in-sync replica already.
//!
//! ## Caveats
//! - One failure at a time: a shard whose owner and every in-sync replica are lost waits for
//!   one of them to come back.
//! - Catch-up pages scan the store from their last key to find a shard's keys.
//! - Catch-up items and Raft snapshots must fit one transport frame.

pub mod control;
pub mod handoff;
pub mod list;
pub mod protocol;
mod raft_net;
pub mod read;
pub mod replica;
pub mod routes;
mod routing;
#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use routing::{MemberStats, Served};
#[cfg(test)]
mod explore;
#[cfg(test)]
mod script;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InitializeError, RaftError};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agent::{CallError, Gate, Host, Unavailable};
use crate::config::{MetaConfig, PlacementConfig};
use crate::membership::task::Membership;
use crate::meta::raft::{self as mraft, MetaNode, NodeId, Raft};
use crate::meta::store::{LogStore, MetaDb, MetaDbError, SmStore};
use crate::meta::{MetaState, ShardState};
use crate::net::{PeerInfo, WeakTransport};
use crate::placement::shard_of;
use crate::storage::{Fence, Key, Storage};
use crate::wire::envelope::ControlKind;
use crate::wire::Lane;
use control::engine::Held;
use protocol::{ControlReply, ControlReq};
use raft_net::NetFactory;

/// Control-lane requests served at once (the rest are dropped; the asker times out and retries).
pub const CONTROL_IN_FLIGHT_MAX: usize = 256;
/// Agent requests from other nodes served at once (the rest are refused `Unavailable`).
pub const AGENT_IN_FLIGHT_MAX: usize = 4096;
/// First wait before retrying a request whose shard has no serving owner (doubles, up to 8x).
const RETRY_WAIT_MIN_MS: u64 = 20;

thread_local! {
    /// Cluster members started on this thread (mixed into fresh Raft ids).
    static STARTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Restarts the count of members started on this thread: a simulation calls it before building
/// its nodes, so the same seed gives the same Raft ids in every run.
#[cfg(feature = "testing")]
pub fn reset_start_count() {
    STARTS.with(|c| c.set(0));
}

/// This node's lease: serving is allowed until `until`. `renewed` is when the renewal that
/// granted it was sent: this node's table holds every metadata entry committed before then (a
/// renewal counts only once the node has applied what the leader had committed when granting).
#[derive(Default)]
pub struct Lease(Mutex<Option<Held<Instant>>>);

impl Lease {
    pub fn valid(&self, now: Instant) -> bool {
        Held::valid(self.held(), now)
    }
    /// When the renewal behind the current lease was sent, while the lease is valid.
    pub fn renewed_at(&self, now: Instant) -> Option<Instant> {
        self.held().filter(|h| now < h.until).map(|h| h.renewed)
    }
    fn held(&self) -> Option<Held<Instant>> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn extend(&self, renewed: Instant, until: Instant) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(Held::extend(*g, renewed, until));
    }
    /// Ends the lease now (shutdown).
    pub fn revoke(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Where a key lives according to this node's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub shard: u32,
    pub owner: Option<String>,
    pub epoch: u64,
    /// Target of a planned move in progress.
    pub moving_to: Option<String>,
}

/// The gate of the node's agent host: serve a key only if this node owns its shard at the
/// current epoch with a valid lease.
pub struct ClusterGate {
    name: String,
    state: watch::Receiver<Arc<MetaState>>,
    lease: Arc<Lease>,
    repl: Arc<replica::Replication>,
}

impl ClusterGate {
    fn check(&self, key: &Key, handing_off_ok: bool) -> Result<Fence, CallError> {
        let st = self.state.borrow();
        let lease_valid = self.lease.valid(Instant::now());
        control::engine::serves(&st, &self.name, key, handing_off_ok, lease_valid, |s, e| self.repl.is_open(s, e))
    }
}

impl Gate for ClusterGate {
    fn admit(&self, key: &Key) -> Result<Fence, CallError> {
        self.check(key, false)
    }
    fn write(&self, key: &Key) -> Result<Fence, CallError> {
        self.check(key, true)
    }
    fn served(&self) -> Vec<(u32, u64)> {
        if !self.lease.valid(Instant::now()) {
            return Vec::new();
        }
        let st = self.state.borrow();
        let mine = st.shards.iter().enumerate().filter(|(_, e)| e.owner.as_deref() == Some(self.name.as_str()));
        mine.filter(|(s, e)| self.repl.is_open(*s as u32, e.epoch)).map(|(s, e)| (s as u32, e.epoch)).collect()
    }
}

fn placement_in(st: &MetaState, key: &Key) -> Result<Placement, CallError> {
    if st.shard_count == 0 {
        return Err(CallError::Unavailable(Unavailable::NoShardTable));
    }
    let shard = shard_of(key, st.shard_count);
    let e = &st.shards[shard as usize];
    let moving_to = match &e.state {
        ShardState::Moving { to } => Some(to.clone()),
        _ => None,
    };
    Ok(Placement { shard, owner: e.owner.clone(), epoch: e.epoch, moving_to })
}

/// What [`Cluster::start`] needs.
pub struct ClusterParts {
    pub name: String,
    pub founder: bool,
    pub meta: MetaConfig,
    pub placement: PlacementConfig,
    /// `None`: in memory.
    pub meta_file: Option<std::path::PathBuf>,
    pub rng_seed: u64,
    /// The node-local (or shared) store; the host writes through [`Prepared::storage`].
    pub storage: Arc<dyn Storage>,
    pub metrics: crate::metrics::Metrics,
    /// Largest transport frame: a replicated write must fit one.
    pub frame_len_max_bytes: u32,
}

/// Why this node's member of the metadata group could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `meta.redb` cannot be opened, or its node id read or written.
    #[error("the metadata database: {0}")]
    Db(#[from] MetaDbError),
    /// The state machine cannot start from what `meta.redb` holds.
    #[error(transparent)]
    State(#[from] crate::meta::store::SmOpenError),
    /// The `[meta]` timings make an invalid Raft configuration.
    #[error("the Raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    /// The Raft member cannot start.
    #[error("the Raft member: {0}")]
    Raft(Box<openraft::error::Fatal<NodeId>>),
    /// The group cannot be founded (a node started without seeds founds it).
    // A plain error: openraft's type for it names the group's internal member type.
    #[error("cannot found the metadata group: {0}")]
    Found(Box<dyn std::error::Error + Send + Sync>),
}

/// The metadata database opened, before anything is bound or started (so a start that cannot
/// open it fails first).
pub struct Prepared {
    parts: ClusterParts,
    db: MetaDb,
    sm: SmStore,
    raft_id: NodeId,
}

impl Prepared {
    pub fn open(parts: ClusterParts) -> Result<Prepared, StartError> {
        let db = match &parts.meta_file {
            Some(path) => MetaDb::open(path)?,
            None => MetaDb::memory(),
        };
        // Drawn once per data dir (kept in it). Without a data dir every start is a new member
        // with an empty log, so it must never reuse an id (the leader would find the log gone
        // backwards): `rng_seed` is random per start unless configured, and the count of starts
        // on this thread is mixed in for a configured one (deterministic in a simulation, which
        // resets the count, see [`reset_start_count`]). Never 0 (openraft's "none" in places).
        let starts = STARTS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let mut id_seed = parts.name.as_bytes().to_vec();
        id_seed.extend_from_slice(&starts.to_le_bytes());
        let fresh = xxhash_rust::xxh3::xxh3_64_with_seed(&id_seed, parts.rng_seed).max(1);
        let raft_id = db.node_id(fresh)?;
        let sm = SmStore::open(db.clone())?;
        Ok(Prepared { parts, db, sm, raft_id })
    }
}

/// What the node's host is built from, inside [`Cluster::start`] (see its design note).
pub struct HostParts {
    /// The cluster being built, for the host's caller: it upgrades once `Cluster::start` returns.
    pub cluster: WeakCluster,
    /// The gate the host must use.
    pub gate: Arc<ClusterGate>,
    /// The store the host must write through (replicating, with node-local storage).
    pub storage: Arc<dyn Storage>,
}

pub(crate) struct Inner {
    name: String,
    addr: SocketAddr,
    raft_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<MetaState>>,
    meta_cfg: MetaConfig,
    cfg: PlacementConfig,
    transport: WeakTransport,
    membership: Membership,
    host: Host,
    repl: Arc<replica::Replication>,
    lease: Arc<Lease>,
    /// Leases, the controller and the control lane's admission.
    control: control::ControlState,
    /// Agent asks from other nodes being served (routing).
    agent_permits: Arc<Semaphore>,
    handoffs: Mutex<handoff::engine::Handoffs>,
    /// Pool picks (cluster-wide routes).
    pools: routes::PoolState,
    /// Reads from the nearest copy.
    reads: read::ReadCounters,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// What [`Inner::new`] takes besides the [`ClusterParts`].
struct InnerParts {
    addr: SocketAddr,
    raft_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<MetaState>>,
    transport: WeakTransport,
    membership: Membership,
    host: Host,
    repl: Arc<replica::Replication>,
    lease: Arc<Lease>,
}

impl Inner {
    fn new(parts: ClusterParts, p: InnerParts) -> Inner {
        Inner {
            control: control::ControlState::new(&parts.name, &parts.metrics),
            handoffs: Mutex::new(handoff::engine::Handoffs::new(parts.name.clone())),
            name: parts.name,
            addr: p.addr,
            raft_id: p.raft_id,
            raft: p.raft,
            state: p.state,
            meta_cfg: parts.meta,
            cfg: parts.placement,
            transport: p.transport,
            membership: p.membership,
            host: p.host,
            repl: p.repl,
            lease: p.lease,
            agent_permits: Arc::new(Semaphore::new(AGENT_IN_FLIGHT_MAX)),
            pools: routes::PoolState::default(),
            reads: read::ReadCounters::new(&parts.metrics),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}

/// The node's handle on the cluster layer.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// See [`Cluster::downgrade`].
#[derive(Clone)]
pub struct WeakCluster(std::sync::Weak<Inner>);

impl WeakCluster {
    pub fn upgrade(&self) -> Option<Cluster> {
        self.0.upgrade().map(|inner| Cluster { inner })
    }
}

impl Cluster {
    /// Starts the group's member on this node; `addr` is the bound transport address.
    ///
    /// Design note: the cluster, its replication and the node's host point at each other (the
    /// cluster holds both; replication reaches the cluster's transport, tasks and leader; the
    /// host's caller sends agent-to-agent calls through the cluster; the host writes through
    /// replication). So they are built in one `Arc::new_cyclic`, each given what it needs at
    /// construction, the back edges as weak handles: `assemble` builds the host (and whatever
    /// else the node builds with it, returned as `X`) from [`HostParts`]. Its weak cluster
    /// upgrades only once this returns, and nothing reaches the host before then: the transport
    /// hands nothing in until the node serves it.
    pub async fn start<X>(
        prepared: Prepared,
        addr: SocketAddr,
        transport: WeakTransport,
        membership: Membership,
        assemble: impl FnOnce(HostParts) -> (Host, X),
    ) -> Result<(Cluster, X), StartError> {
        let Prepared { parts, db, sm, raft_id } = prepared;
        mraft::seed_rng(parts.rng_seed);
        let m = &parts.meta;
        let raft_cfg = openraft::Config {
            cluster_name: "cadre-meta".into(),
            heartbeat_interval: m.heartbeat_interval_ms,
            election_timeout_min: m.election_timeout_min_ms,
            election_timeout_max: m.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(m.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(Box::new(e)))?;
        let state = sm.subscribe();
        let (gate_state, repl_state) = (sm.subscribe(), sm.subscribe());
        let gossip = membership.clone();
        let resolve: raft_net::Resolver = Arc::new(move |name: &str| gossip.addr_of(name));
        let factory = NetFactory { transport: transport.clone(), resolve };
        let raft = Raft::new(raft_id, Arc::new(raft_cfg), factory, LogStore::new(db), sm)
            .await
            .map_err(|e| StartError::Raft(Box::new(e)))?;
        if parts.founder {
            let me = MetaNode { name: parts.name.clone(), addr: addr.to_string() };
            match raft.initialize(BTreeMap::from([(raft_id, me)])).await {
                Ok(()) => info!(raft_id, "founded the cluster's metadata group"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    debug!("metadata group already initialized")
                }
                Err(e) => return Err(StartError::Found(Box::new(e))),
            }
        }
        let lease = Arc::new(Lease::default());
        let repl_parts = replica::ReplicationParts {
            name: parts.name.clone(),
            lease: lease.clone(),
            local: parts.storage.clone(),
            state: repl_state,
            cfg: parts.placement.clone(),
            frame_len_max_bytes: parts.frame_len_max_bytes,
        };
        // What the closure builds besides the cluster (`Arc::new_cyclic` returns only that).
        let mut built = None;
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let (repl, queues) = replica::Replication::new(repl_parts, weak.clone(), &parts.metrics);
            let gate = Arc::new(ClusterGate {
                name: parts.name.clone(),
                state: gate_state,
                lease: lease.clone(),
                repl: repl.clone(),
            });
            let host_parts = HostParts { cluster: WeakCluster(weak.clone()), gate, storage: repl.storage() };
            let (host, extra) = assemble(host_parts);
            built = Some((queues, extra));
            Inner::new(parts, InnerParts { addr, raft_id, raft, state, transport, membership, host, repl, lease })
        });
        let Some((queues, extra)) = built else { unreachable!("Arc::new_cyclic runs its closure") };
        inner.repl.start(queues, &inner);
        inner.tasks.spawn(control::renew_loop(inner.clone()));
        inner.tasks.spawn(control::controller_loop(inner.clone()));
        inner.tasks.spawn(handoff::watch_table(inner.clone()));
        Ok((Cluster { inner }, extra))
    }

    /// A handle that does not keep the cluster alive (for what the cluster itself holds).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // Internal API; no caller at present.
    pub fn downgrade(&self) -> WeakCluster {
        WeakCluster(Arc::downgrade(&self.inner))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn raft_id(&self) -> NodeId {
        self.inner.raft_id
    }
    pub fn host(&self) -> &Host {
        &self.inner.host
    }
    /// This node's copy of the metadata.
    pub fn state(&self) -> Arc<MetaState> {
        self.inner.state.borrow().clone()
    }
    /// Waits for the next change of the metadata copy.
    pub fn watch(&self) -> watch::Receiver<Arc<MetaState>> {
        self.inner.state.clone()
    }
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }
    /// Whether this node's lease is valid now.
    pub fn lease_valid(&self) -> bool {
        self.inner.lease.valid(Instant::now())
    }
    /// The leader's name, as far as this node knows.
    pub fn leader(&self) -> Option<String> {
        control::leader_of(&self.inner).map(|(_, n)| n.name)
    }

    /// Where `key` lives according to this node's table.
    pub fn placement(&self, key: &Key) -> Result<Placement, CallError> {
        placement_in(&self.inner.state.borrow(), key)
    }

    /// Serves a control-lane ask from a peer; its `kind` (read by
    /// [`crate::wire::envelope::control_kind`]) picks its pool of permits. The reply goes back
    /// through the transport.
    pub fn on_control_ask(&self, from: &PeerInfo, id: u64, kind: ControlKind, payload: Bytes) {
        let permits = match kind {
            ControlKind::Raft => &self.inner.control.raft_permits,
            ControlKind::Renew => &self.inner.control.renew_permits,
            ControlKind::Other => &self.inner.control.control_permits,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            self.inner.control.dropped.inc();
            warn!(from = %from.name, "control requests over their limit: one dropped");
            return;
        };
        let inner = self.inner.clone();
        let to = from.addr;
        let from_name = from.name.clone();
        self.inner.tasks.spawn(async move {
            let reply = match postcard::from_bytes::<ControlReq>(&payload) {
                Err(e) => {
                    warn!(from = %from_name, error = %e, "undecodable control request");
                    ControlReply::Refused(format!("undecodable control request: {e}"))
                }
                Ok(ControlReq::Raft { to, rpc }) => {
                    raft_net::serve(&inner.raft, inner.raft_id, to, rpc, &inner.control.snapshots_refused).await
                }
                Ok(ControlReq::Renew(r)) => ControlReply::Renew(control::grant(&inner, r).await),
                Ok(ControlReq::HandedOff { shard, epoch }) => {
                    ControlReply::HandedOff(control::complete_move(&inner, shard, epoch).await)
                }
                Ok(ControlReq::Drain { name }) => ControlReply::Drain(control::drain(&inner, name).await),
                Ok(ControlReq::Replicas(reports)) => {
                    ControlReply::Replicas(control::replica_reports(&inner, reports).await)
                }
                Ok(ControlReq::Route(change)) => ControlReply::Route(control::route(&inner, change).await),
            };
            if let Some(t) = inner.transport.upgrade() {
                let _ = t.reply_on(Lane::Control, to, id, protocol::encode(&reply));
            }
            drop(permit);
        });
    }

    /// Takes a data-lane replication request ([`crate::wire::envelope::Kind::Replica`]; `body`: the request
    /// after its kind); answered later, in order, unless refused at once.
    pub fn on_replica_ask(&self, from: &PeerInfo, id: u64, body: &[u8]) -> Option<Bytes> {
        self.inner.repl.on_ask(from, id, body)
    }

    /// Catch-ups of replicas this node runs as an owner.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // Internal API; no caller at present.
    pub fn syncing(&self) -> Vec<replica::SyncStatus> {
        self.inner.repl.syncing()
    }

    /// Leaves gracefully: asks the leader to hand this node's shards to the others (planned
    /// moves, state copied) and waits until it owns none, at most `timeout`. Returns whether it
    /// got there (alone in the cluster there is nobody to hand over to).
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let me = self.inner.name.clone();
        // Somebody to hand over to: another member of the table that membership sees alive.
        let view = self.inner.membership.view();
        let st = self.state();
        let others = view.members.iter().any(|m| {
            m.meta.name != me
                && m.state == crate::membership::MemberState::Alive
                && st.members.contains_key(&m.meta.name)
        });
        if !others || !st.members.contains_key(&me) {
            return false;
        }
        self.inner.control.draining.store(true, std::sync::atomic::Ordering::Release);
        let mut rx = self.inner.state.clone();
        let retry = Duration::from_millis(RETRY_WAIT_MIN_MS * 8);
        loop {
            let marked = self.state().members.get(&me).is_some_and(|m| m.draining);
            if !marked {
                match control::to_leader(&self.inner, ControlReq::Drain { name: me.clone() }).await {
                    Ok(ControlReply::Drain(Ok(()))) => {}
                    other => debug!(reply = ?other, "drain not accepted yet"),
                }
            }
            let st = rx.borrow_and_update().clone();
            if st.members.get(&me).is_some_and(|m| m.draining) && st.shard_counts().get(me.as_str()) == Some(&0) {
                info!("drained: every shard handed over");
                return true;
            }
            let until = (Instant::now() + retry).min(deadline);
            if tokio::time::timeout_at(until, rx.changed()).await.is_ok_and(|r| r.is_err())
                || Instant::now() >= deadline
            {
                warn!("drain incomplete at shutdown: the remaining shards move when the lease expires");
                return false;
            }
        }
    }

    /// Revokes this node's lease: its gate refuses every call from now on.
    pub fn stop_serving(&self) {
        self.inner.lease.revoke();
    }

    /// Stops serving (revokes the lease, so no new work starts), stops the group (which ends
    /// any wait on it, e.g. a write that cannot reach a quorum), then the tasks.
    pub async fn shutdown(&self) {
        self.inner.lease.revoke();
        self.inner.cancel.cancel();
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "metadata group did not stop cleanly");
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
