//! Replication of shard state between nodes, when storage is node-local.
//!
//! The decisions of the owner side (what is open, which catch-ups run, which replicas a write
//! goes to) are the [`engine`]'s; this module runs them: tasks, network, store, timers.
//!
//! Files: this one holds [`Replication`] (its construction, the shard gate and the write path);
//! `runner.rs` the owner side's jobs (opening, catch-up); `reports.rs` the queue of in/out-of-sync
//! marks to the leader; `apply.rs` the replica side; `store.rs` the store the host writes through.
//!
//! ## Design
//! Primary-backup with the configuration in the metadata (as Kafka keeps its in-sync replica set
//! in a controller): each shard's entry lists its replicas and whether each is *in sync*.
//! - **Writes** ([`ReplicatedStorage`]): the owner's host writes through this store. A write is
//!   made durable locally first (so a write the local store refuses, a revision conflict, is sent
//!   nowhere), then sent to every replica of the shard's entry at the write's epoch, and
//!   acknowledged once each in-sync replica has applied it. A replica that does not answer within
//!   `replica_write_timeout_ms` (or refuses) is marked out of sync through the metadata *before*
//!   the write is acknowledged: so every in-sync replica holds every acknowledged write, and the
//!   controller promotes only in-sync replicas ([`crate::meta::Cmd::Promote`]). A write that cannot
//!   get there fails with `Backend` (it may have happened locally: an unacknowledged write).
//! - **Replicas** apply requests in the order they arrive from the owner (one ordered lane per
//!   `shard % REPLICA_LANES`), writing at the owner's epoch, so the storage fence refuses any
//!   older owner's late writes; they also refuse an epoch older than their metadata copy's, and a
//!   sender that is not the owner at the current one. A put replaces the state whatever its
//!   revision (revisions are per store and never cross nodes); an append must find the prefix
//!   it builds on, or the replica reports itself diverged.
//! - **Opening**: a node that starts to own a shard (assigned, promoted, moved to) first fences
//!   its in-sync replicas at its epoch ([`ReplicaOp::Fence`]); the gate serves the shard only
//!   once that is done. A late write of the previous owner can still have reached a replica
//!   before the fence: it was never acknowledged (the new owner, an in-sync replica, lacks it),
//!   and is overwritten by the next write of that key (a put), or makes the replica diverge and
//!   be caught up again (an append). Until then such a replica holds one unacknowledged write
//!   more than the owner.
//! - **Catch-up**: the owner copies the shard to a replica that is not in sync, page by page
//!   ([`ReplicaOp::Sync`]: "your keys of the shard in this key range are exactly these"), at most
//!   `replica_sync_bytes_per_s` per node. Each page is read and sent on a turn of its own on the
//!   shard's gate, while writes take turns together until their replicas answered (see
//!   [`engine`]), so a page and a write of the same key reach the replica in the order they
//!   happened (a page that is not answered holds the shard's writes for at most
//!   `max(handoff_timeout_ms / 4, 4 × replica_write_timeout_ms)`). Writes are forwarded to the
//!   replica only for keys already copied (a later page carries the others). When the last page
//!   is in and no forwarded write failed, the owner asks for the in-sync mark, naming the
//!   replica's *generation* (a new one with every add and every out-of-sync mark), on a page's
//!   turn.
//!   From that moment the replica is required for acknowledgements as an in-sync one, until the
//!   table shows the outcome; an attempt that does not learn it commits `ReplicaOutOfSync` (a new
//!   generation, so the old mark can no longer apply) before starting over.
//! - **Closing**: a write whose missed replica cannot be marked out of sync (no leader reachable)
//!   fails, and the shard stops being served here until that mark is committed: the local store
//!   holds a write that an in-sync replica lacks, which readers must not see.
//! - **Reports** (marks in and out of sync) queue per node and go to the leader in batches, one
//!   log entry per batch, identical reports once: a replica lost under load otherwise costs one
//!   Raft entry per write in flight to it, enough to starve the leader of control permits.
//!   Catch-up attempts run at most [`CATCH_UPS_MAX`] at a time per node; retries back off.
//! - **New processes**: a node admitted again under its name with another Raft id (it lost its
//!   data dir) holds no copy: it leaves every replica set and its shards lose their owner
//!   ([`crate::meta::Cmd::Admit`]).
//!
//! A planned move with node-local storage is: catch the target up as a replica, then switch the
//! owner ([`crate::meta::Cmd::CompleteMove`] keeps the old owner as an in-sync replica).
//!
//! ## Caveats
//! - A catch-up page scans the store from its last key (the store is not laid out by shard), so
//!   catching up every shard costs one pass over the store per shard.
//! - Each write is one ask per replica (not batched with other writes).
//! - One key's state and entries must fit in one transport frame.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

mod apply;
pub(crate) mod engine;
mod reports;
mod runner;
mod store;

use self::engine::AttemptError;
use self::engine::{Engine, Entry, Job, JobKind, Ticket, Turn};
use self::reports::{report_loop, PendingReport};
use super::protocol::{ControlError, ReplicaError, ReplicaOp, ReplicaReply, ReplicaReq};
use super::Inner;
use crate::config::PlacementConfig;
use crate::meta::{MetaError, MetaState};
use crate::metrics::{CounterFamily, Metrics};
use crate::net::AskError;
use crate::storage::{Fence, Key, Storage, StorageError};
use crate::wire::Lane;

/// Ordered apply lanes on a replica: a shard's requests go to lane `shard % REPLICA_LANES`.
pub const REPLICA_LANES: usize = 8;
/// Requests queued per lane. When full, a request is refused `Busy`: its owner marks this
/// replica out of sync and catches it up later.
pub const REPLICA_LANE_QUEUE_LEN_MAX: usize = 1024;
/// Bytes of state per catch-up page (well under the default 1 MiB frame).
pub const SYNC_PAGE_BYTES_MAX: usize = 256 * 1024;
/// Replica reports waiting to be sent to the leader (four per replica at the default shard
/// count and factor 3). When full, a report fails at once: a write that needed it
/// fails (and its shard closes until reported), a catch-up starts over later.
pub const REPORT_QUEUE_LEN_MAX: usize = 2048;
/// Catch-up attempts running at once from one node (others wait their turn): a node that comes
/// back to many out-of-sync shards copies a few at a time, leaving room for writes.
pub const CATCH_UPS_MAX: usize = 8;
/// Frame bytes kept for what surrounds replicated state (keys, envelope, length prefixes).
const FRAME_OVERHEAD_BYTES: usize = 4096 + crate::storage::KEY_LEN_MAX_BYTES;

/// A catch-up in progress, as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    /// The shard being copied.
    pub shard: u32,
    /// The replica it is copied to (node name).
    pub to: String,
    /// Keys this attempt copied so far.
    pub keys: u64,
    /// Bytes this attempt copied so far.
    pub bytes: u64,
}

struct ReplicaMetrics {
    writes_failed: Counter,
    marked_out: Counter,
    synced: Counter,
    sync_bytes: Counter,
    refused: CounterFamily,
}

impl ReplicaMetrics {
    fn new(m: &Metrics) -> Self {
        Self {
            writes_failed: m.counter("replica_writes_failed", "Replicated writes a replica did not acknowledge"),
            marked_out: m.counter("replica_marked_out_of_sync", "Replicas this owner marked out of sync"),
            synced: m.counter("replica_catch_ups", "Replicas this owner caught up and marked in sync"),
            sync_bytes: m.counter("replica_sync_bytes", "State bytes copied to replicas being caught up"),
            refused: m.counters("replica_requests_refused", "Replica requests this node refused, by reason"),
        }
    }
}

/// One request waiting on an apply lane.
struct Incoming {
    from: String,
    addr: SocketAddr,
    id: u64,
    req: ReplicaReq,
}

/// Replication on one node: the owner side (writes, opening, catch-up) and the replica side.
pub struct Replication {
    /// This node's lease: a write that missed a replica is acknowledged only under it.
    lease: Arc<super::Lease>,
    /// Off with shared storage: the database is the replica set.
    enabled: bool,
    local: Arc<dyn Storage>,
    state: watch::Receiver<Arc<MetaState>>,
    cfg: PlacementConfig,
    /// The cluster this replication is part of (built together, see [`Replication::new`]).
    cluster: Weak<Inner>,
    /// Tasks parked until their turn on a shard's gate comes (the engine says whose).
    waiters: Mutex<HashMap<Ticket, oneshot::Sender<()>>>,
    /// What is open, which catch-ups and jobs run: locked for one decision at a time, never
    /// across an await.
    engine: Mutex<Engine>,
    /// The apply lanes' queues (their tasks start with [`Replication::start`]).
    lanes: Vec<mpsc::Sender<Incoming>>,
    /// Replica reports on their way to the leader.
    reports: mpsc::Sender<PendingReport>,
    catch_ups: Arc<tokio::sync::Semaphore>,
    /// The origin of the clock the engine's pacing reads (its inputs carry microseconds since).
    clock_origin: Instant,
    /// Largest state bytes of one replicated write or catch-up page (fits a frame).
    payload_max: usize,
    metrics: ReplicaMetrics,
}

/// The receiving ends of [`Replication`]'s queues, created with it and consumed by
/// [`Replication::start`], which gives each to its task.
pub(super) struct Queues {
    lanes: Vec<mpsc::Receiver<Incoming>>,
    reports: mpsc::Receiver<PendingReport>,
}

/// What [`Replication::new`] needs besides the cluster it is part of.
pub(super) struct ReplicationParts {
    pub name: String,
    pub lease: Arc<super::Lease>,
    pub local: Arc<dyn Storage>,
    pub state: watch::Receiver<Arc<MetaState>>,
    pub cfg: PlacementConfig,
    pub frame_len_max_bytes: u32,
}

impl Replication {
    /// Replication within the cluster `cluster` points to (built in the same `Arc::new_cyclic`:
    /// the cluster holds this, and this reaches the cluster's transport, tasks and leader through
    /// it). Requests queue on the apply lanes from now on; they are applied once
    /// [`Replication::start`] has the returned [`Queues`].
    pub(super) fn new(parts: ReplicationParts, cluster: Weak<Inner>, metrics: &Metrics) -> (Arc<Replication>, Queues) {
        let (lane_txs, lane_rxs): (Vec<_>, Vec<_>) =
            (0..REPLICA_LANES).map(|_| mpsc::channel(REPLICA_LANE_QUEUE_LEN_MAX)).unzip();
        let (reports, reports_rx) = mpsc::channel(REPORT_QUEUE_LEN_MAX);
        let ReplicationParts { name, lease, local, state, cfg, frame_len_max_bytes } = parts;
        let repl = Arc::new(Replication {
            engine: Mutex::new(Engine::new(name).paced(cfg.replica_sync_bytes_per_s)),
            lease,
            enabled: !local.shared(),
            local,
            state,
            cfg,
            cluster,
            waiters: Mutex::new(HashMap::new()),
            lanes: lane_txs,
            reports,
            catch_ups: Arc::new(tokio::sync::Semaphore::new(CATCH_UPS_MAX)),
            clock_origin: Instant::now(),
            // Room for the key, the envelope and the encoding's length prefixes.
            payload_max: (frame_len_max_bytes as usize).saturating_sub(FRAME_OVERHEAD_BYTES).max(1),
            metrics: ReplicaMetrics::new(metrics),
        });
        (repl, Queues { lanes: lane_rxs, reports: reports_rx })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The store the host writes through.
    pub fn storage(self: &Arc<Self>) -> Arc<dyn Storage> {
        if self.enabled {
            Arc::new(store::ReplicatedStorage { repl: self.clone() })
        } else {
            self.local.clone()
        }
    }

    /// Whether this node may serve `shard` at `epoch` (opened, when replication is on).
    pub fn is_open(&self, shard: u32, epoch: u64) -> bool {
        !self.enabled || self.engine().is_open(shard, epoch)
    }

    /// Catch-ups in progress from this node.
    pub fn syncing(&self) -> Vec<SyncStatus> {
        self.engine().syncing()
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// Starts the apply lanes and the report queue's sender on the cluster's tasks.
    pub(super) fn start(self: &Arc<Self>, queues: Queues, inner: &Inner) {
        for rx in queues.lanes {
            inner.tasks.spawn(apply::apply_lane(self.clone(), rx, inner.cancel.clone()));
        }
        inner.tasks.spawn(report_loop(self.clone(), queues.reports, inner.cancel.clone()));
    }

    fn cluster(&self) -> Option<Arc<Inner>> {
        self.cluster.upgrade()
    }

    /// Waits for a turn on `shard`'s gate; it ends when the pass is dropped (also while still
    /// waiting: a caller that gives up leaves the queue).
    pub(super) async fn turn(&self, shard: u32, turn: Turn) -> Pass<'_> {
        let (ticket, rx) = {
            let mut engine = self.engine();
            match engine.enter(shard, turn) {
                Entry::Go(ticket) => (ticket, None),
                Entry::Wait(ticket) => {
                    // Registered under the engine's lock, so no `leave` can hand the turn over before.
                    let (tx, rx) = oneshot::channel();
                    lock(&self.waiters).insert(ticket, tx);
                    (ticket, Some(rx))
                }
            }
        };
        let pass = Pass { repl: self, shard, ticket, waited: rx.is_some() };
        if let Some(rx) = rx {
            // The sender goes only through `wake` (or this pass's drop).
            let _ = rx.await;
        }
        pass
    }

    fn wake(&self, tickets: Vec<Ticket>) {
        if tickets.is_empty() {
            return;
        }
        let mut waiters = lock(&self.waiters);
        for t in tickets {
            if let Some(tx) = waiters.remove(&t) {
                let _ = tx.send(());
            }
        }
    }

    /// Whether `shard` lists any replica now: a write to a shard that lists none has nobody to
    /// send its value to (unless one is listed while it is written).
    fn lists_replicas(&self, shard: u32) -> bool {
        engine::shard_entry(&self.state.borrow(), shard).is_some_and(|e| !e.replicas.is_empty())
    }

    /// Sends a write the local store accepted to the shard's replicas; `Ok` once every in-sync
    /// one has it (or was marked out of sync).
    /// (`op` is awaited only when the shard has replicas to send the write to.)
    async fn replicate<'a>(
        &self,
        fence: Fence,
        key: &Key,
        op: impl FnOnce() -> BoxFuture<'a, Result<ReplicaOp, StorageError>>,
    ) -> Result<(), StorageError> {
        let targets = {
            let st = self.state.borrow();
            self.engine().targets(&st, fence, key)?
        };
        if targets.is_empty() {
            return Ok(());
        }
        let req = ReplicaReq { shard: fence.shard, epoch: fence.epoch, op: op().await? };
        let payload = encode_req(&req);
        let timeout = Duration::from_millis(self.cfg.replica_write_timeout_ms);
        let asks = targets.iter().map(|t| self.ask(t.addr, payload.clone(), timeout));
        let results = futures::future::join_all(asks).await;
        for (t, r) in targets.iter().zip(&results) {
            if let Err(e) = r {
                self.metrics.writes_failed.inc();
                debug!(shard = fence.shard, replica = %t.node, error = %e, "replica missed a write");
            }
        }
        let answers = targets.into_iter().zip(results).map(|(t, r)| (t, r.is_ok())).collect();
        let missed = self.engine().answered(fence, answers);
        if !missed.is_empty() && !self.lease.valid(Instant::now()) {
            // Not to be acknowledged (the shard goes elsewhere once the lease is over): leave the
            // replicas in sync rather than mark them out on the way down.
            return Err(StorageError::Backend("a replica missed the write and this node's lease has lapsed".into()));
        }
        let reports = missed.iter().map(|n| self.report(fence.shard, fence.epoch, n, false, 0));
        let mut unreported = Vec::new();
        for (node, r) in missed.iter().zip(futures::future::join_all(reports).await) {
            if let Err(e) = r {
                unreported.push(format!("{node} ({e})"));
                self.close(fence, node);
            }
        }
        if !unreported.is_empty() {
            return Err(StorageError::Backend(format!(
                "replicas missed a write and could not be marked out of sync: {}",
                unreported.join(", ")
            )));
        }
        Ok(())
    }

    /// Stops serving a shard whose local store holds a write an in-sync replica lacks (it was
    /// not acknowledged, but readers here would see it, and it vanishes if that replica is
    /// promoted): the shard opens again once `node` is marked out of sync.
    fn close(&self, fence: Fence, node: &str) {
        self.engine().close(fence, node);
        warn!(
            shard = fence.shard,
            epoch = fence.epoch,
            replica = node,
            "shard closed until the replica is marked out of sync"
        );
    }

    async fn ask(&self, addr: SocketAddr, payload: Bytes, timeout: Duration) -> Result<(), SyncError> {
        let inner = self.cluster().ok_or(SyncError::ShuttingDown)?;
        let t = inner.transport.upgrade().ok_or(SyncError::ShuttingDown)?;
        let bytes =
            t.ask_on(Lane::Data, addr, payload, timeout).await.map_err(|e: AskError| SyncError::Ask(e.to_string()))?;
        let reply: ReplicaReply = postcard::from_bytes(&bytes).map_err(|e| SyncError::Undecodable(e.to_string()))?;
        reply.map_err(SyncError::Replica)
    }

    // --- Opening and catch-up (owner side) ---

    /// Reacts to a new table: opens shards newly owned here, starts catch-ups, forgets the rest.
    pub(super) fn on_table(self: &Arc<Self>, st: &MetaState) {
        if !self.enabled {
            return;
        }
        let Some(inner) = self.cluster() else { return };
        if inner.cancel.is_cancelled() {
            // Stopping: no new jobs (a finishing job would otherwise respawn itself forever).
            return;
        }
        // In shard order, so jobs start in the same order on every run (simulations replay).
        let jobs = self.engine().on_table(st);
        self.spawn_jobs(&inner, jobs);
    }

    fn spawn_jobs(self: &Arc<Self>, inner: &Inner, jobs: Vec<Job>) {
        for job in jobs {
            let me = self.clone();
            inner.tasks.spawn(async move {
                match &job.kind {
                    JobKind::Open => me.clone().open(job.shard, job.epoch).await,
                    JobKind::CatchUp { to } => me.clone().catch_up(job.shard, job.epoch, to.clone()).await,
                }
                me.job_done(&job);
            });
        }
    }

    /// Forgets a finished job, then looks at the table again: a change it needed may have come
    /// while it was finishing (and found it still registered).
    fn job_done(self: &Arc<Self>, job: &Job) {
        let st = self.state.borrow().clone();
        let jobs = self.engine().job_done(job, &st);
        // As `on_table`: no new jobs once the node is stopping.
        match self.cluster() {
            Some(inner) if !inner.cancel.is_cancelled() => self.spawn_jobs(&inner, jobs),
            _ => {}
        }
    }
}

/// Why a step of replication failed here: an ask to a replica, a mark through the leader, a
/// page of a catch-up.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SyncError {
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("{REPORT_QUEUE_LEN_MAX} replica reports are waiting already")]
    ReportsFull,
    #[error("no address for {node}")]
    NoAddress { node: String },
    /// The ask did not reach the replica or was not answered.
    #[error("{0}")]
    Ask(String),
    #[error("undecodable replica reply: {0}")]
    Undecodable(String),
    /// The replica refused.
    #[error("{0}")]
    Replica(ReplicaError),
    /// The leader did not take the mark.
    #[error("{0}")]
    Control(ControlError),
    /// The metadata refused the mark.
    #[error("{0}")]
    Meta(MetaError),
    #[error("{0}")]
    Attempt(#[from] AttemptError),
    #[error("the local store: {0}")]
    Storage(#[from] StorageError),
    #[error("{key} holds {len} bytes, more than one frame carries")]
    TooLarge { key: String, len: usize },
}

fn encode_req(req: &ReplicaReq) -> Bytes {
    crate::wire::envelope::encode(crate::wire::envelope::Kind::Replica, req)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A turn on a shard's gate ([`Replication::turn`]), ended when dropped.
pub(super) struct Pass<'a> {
    repl: &'a Replication,
    shard: u32,
    ticket: Ticket,
    /// It queued: its waker may still be registered (a caller that gave up while waiting).
    waited: bool,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.waited {
            lock(&self.repl.waiters).remove(&self.ticket);
        }
        let going = self.repl.engine().leave(self.shard, self.ticket);
        self.repl.wake(going);
    }
}
