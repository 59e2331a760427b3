//! Signals across the cluster: one copy per interested node, batched, buffered, acknowledged.
//!
//! A publish routes through the local bus first; then [`Remote::publish`] looks up the other
//! nodes whose advertised patterns match (the [`Interest`] map) and appends the encoded signal to
//! one buffer per such node: one copy per node, never one per subscriber. A sender task per node
//! drains its buffer in batches (as many queued signals as fit `batch_len_max` and
//! `batch_bytes_max`), sends each batch as one ask on the data lane and waits for the receiver's
//! acknowledgement before sending the next: batching comes from draining, so a lone signal goes
//! at once, and under load one frame carries many signals.
//!
//! ## Delivery levels
//! - `weak`: put in the buffers if there is room (else skipped, counted); dropped if its batch
//!   fails (no answer, or refused). Never retried after a failure; a batch the receiver answers
//!   but takes only in part (its queues are full) keeps the rest, weak signals too.
//! - `eventual` (default): acknowledged once in every target node's buffer (all or none: a full
//!   buffer fails the publish with `BufferFull` before anything is added). A batch that fails is
//!   sent again, after a back-off, until the receiver acknowledges it; the buffer waits out an
//!   unreachable node (down up to `down_keep_ms`) and is flushed when it is back.
//! - `strong`: as `eventual`, and the publish waits until a majority of the target nodes (this
//!   node counts when it has local subscribers) have acknowledged, at most `strong_timeout_ms`;
//!   then it fails with `StrongUnmet` instead of hanging (the copies stay buffered and may still
//!   arrive).
//!
//! ## Order and duplicates
//! Each node's buffer is one FIFO with one batch in flight, so signals from one publisher reach a
//! receiver in publish order, across retries. A batch sent again after a lost acknowledgement
//! arrives twice; receivers drop copies by `(source, id)` within `dedup_window_len_max` ids. A
//! receiver takes a signal for all its matching subscriptions or for none, and acknowledges the
//! prefix of the batch it took: a full subscriber queue holds the rest back at the sender, where
//! back-pressure ends in `BufferFull`.
//!
//! ## Interest map
//! Each node pushes its own entry to every member when its patterns change, pushes it to a member
//! that becomes alive, and every `interest_sync_interval_ms` pulls what is newer from one random
//! alive member (so maps converge after partitions). Entries of members that left, or have been
//! down longer than `down_keep_ms`, are forgotten together with their buffers (the dropped
//! signals are counted).
//!
//! ## Caveats
//! Buffers live in memory: what is buffered when the publishing node crashes is lost (an
//! `eventual` acknowledgement means accepted by this node, as the level says). Signals go to other
//! nodes in the structured JSON encoding.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::interest::{normalize, Entry, Interest, Stamp};
use super::PublishError;
use crate::config::PubsubConfig;
use crate::membership::task::Membership;
use crate::membership::MemberState;
use crate::metrics::{label, CounterFamily, Metrics};
use crate::net::WeakTransport;
use crate::signal::Signal;
use crate::wire::envelope::{self, Kind};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

mod gossip;
mod send;

use gossip::gossip_loop;
use send::send_loop;

/// First byte of a data-lane ask that carries a pub/sub request (its kind, see
/// [`crate::wire::envelope`]), and of the replies.
pub const PUBSUB_TAG: u8 = Kind::PubSub.tag();
/// Room in a batch's payload for everything but the signals (tag, origin name, lengths).
const BATCH_OVERHEAD_BYTES: usize = 512;
/// Room per signal in a batch besides its bytes (its length prefix).
const SIGNAL_OVERHEAD_BYTES: usize = 8;

/// Largest `batch_bytes_max` a transport with frames of `frame_len_max` bytes can carry.
pub fn batch_bytes_limit(frame_len_max: usize) -> usize {
    crate::wire::payload_len_max(frame_len_max).saturating_sub(BATCH_OVERHEAD_BYTES)
}

/// How hard a publish tries to reach other nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Fire and forget.
    Weak,
    /// Accepted by this node, delivered from its buffers.
    #[default]
    Eventual,
    /// Accepted by a majority of the target nodes.
    Strong,
}

impl Delivery {
    /// The lower-case name (`weak`, `eventual`, `strong`).
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Weak => "weak",
            Delivery::Eventual => "eventual",
            Delivery::Strong => "strong",
        }
    }
}

impl std::str::FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "weak" => Ok(Delivery::Weak),
            "eventual" => Ok(Delivery::Eventual),
            "strong" => Ok(Delivery::Strong),
            other => Err(format!("unknown delivery level {other:?} (weak, eventual or strong)")),
        }
    }
}

/// The encoding of [`Req::Signals`]'s variant (postcard: its index, the byte after the tag).
pub(super) const SIGNALS_VARIANT: u8 = 0;
/// The encoding of [`Req::AwaitRoute`]'s variant.
pub(super) const AWAIT_ROUTE_VARIANT: u8 = 4;
/// Longest a node waits for a route to be mirrored before answering an [`Req::AwaitRoute`].
pub const ROUTE_WAIT_MS_MAX: u64 = 10_000;
/// [`Req::AwaitRoute`]s waited on at once by one node; more are answered at once with what the
/// node mirrors now (so a flood of them costs no tasks).
pub const ROUTE_WAITS_MAX: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Req<'a> {
    /// Signals in publish order, each a structured JSON event.
    Signals {
        #[serde(borrow)]
        signals: Vec<&'a [u8]>,
    },
    /// The sender's own interest entry, changed.
    Interest(Entry),
    /// The sender's digest; answered with the entries newer than it.
    Pull(Vec<(String, Stamp)>),
    /// A broadcast: take the signal (reached in `hops` hops), then reach `rest` (see
    /// [`super::broadcast`]).
    Broadcast {
        hops: u32,
        rest: Vec<String>,
        #[serde(borrow)]
        signal: &'a [u8],
    },
    /// Answer once the receiver mirrors the cluster-wide route `id` (`Accepted { count: 1 }`),
    /// or after `timeout_ms` (at most [`ROUTE_WAIT_MS_MAX`]) without it (`count: 0`).
    AwaitRoute { id: u64, timeout_ms: u64 },
}

/// Most nodes one broadcast message may name.
pub const BROADCAST_TARGETS_MAX: usize = 65_536;

/// Broadcast figures of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastStats {
    /// Copies this node sent (its own broadcasts and forwards).
    pub sent: u64,
    /// Hops the farthest-travelled broadcast took to reach this node.
    pub depth_max: u32,
    /// Hops whose node could not be reached, its share taken over by the sender.
    pub rerouted: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    /// The first `count` signals (or entries) were taken.
    Accepted {
        count: u32,
    },
    Entries(Vec<Entry>),
    Refused(String),
}

/// A request or reply behind its kind, encoded straight into one buffer.
pub(super) fn encode<T: Serialize>(value: &T) -> Bytes {
    envelope::encode(Kind::PubSub, value)
}

/// What a remote publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSent {
    /// Other nodes given a copy.
    pub nodes: usize,
}

/// Counts acknowledgements of one `strong` publish (a permit per acknowledging node).
struct Quorum {
    acks: Semaphore,
}

struct Item {
    body: Bytes,
    level: Delivery,
    quorum: Option<Arc<Quorum>>,
}

#[derive(Default)]
struct Outbox {
    items: VecDeque<Item>,
    bytes: usize,
}

/// The buffer to one other node and its sender task's wake-up.
struct PeerOut {
    name: String,
    outbox: Mutex<Outbox>,
    notify: Notify,
    cancel: CancellationToken,
}

impl PeerOut {
    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Remembers recent `(source, id)` pairs, oldest forgotten first.
struct Dedup {
    seen: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
    len_max: usize,
}

impl Dedup {
    fn contains(&self, key: &(String, String)) -> bool {
        self.seen.contains(key)
    }
    fn insert(&mut self, key: (String, String)) {
        if !self.seen.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.len_max {
            let old = self.order.pop_front().expect("not empty");
            self.seen.remove(&old);
        }
    }
}

struct RemoteMetrics {
    /// Signals sent to other nodes and acknowledged.
    sent: Counter,
    /// Batches (asks) sent, acknowledged or not.
    batches: Counter,
    dropped: CounterFamily,
    received: Counter,
    duplicates: Counter,
    refused: CounterFamily,
    buffered: Gauge,
}

impl RemoteMetrics {
    fn new(m: &Metrics) -> Self {
        Self {
            sent: m.counter("pubsub_sent", "Signals other nodes acknowledged"),
            batches: m.counter("pubsub_batches", "Batches of signals sent to other nodes"),
            dropped: m.counters("pubsub_dropped", "Signal copies for other nodes dropped, by reason"),
            received: m.counter("pubsub_received", "Signals taken from other nodes"),
            duplicates: m.counter("pubsub_duplicates", "Copies from other nodes dropped as already taken"),
            refused: m.counters("pubsub_refused", "Pub/sub requests or parts of them refused, by reason"),
            buffered: m.gauge("pubsub_buffered", "Signal copies buffered for other nodes"),
        }
    }
}

/// The cluster side of a node's bus.
pub(crate) struct Remote {
    me: String,
    started_ms: u64,
    cfg: PubsubConfig,
    /// Largest encoded signal that fits a batch alone.
    body_len_max: usize,
    transport: WeakTransport,
    membership: Membership,
    interest: RwLock<Interest>,
    /// Counts changes of the interest map (to await convergence).
    changes: tokio::sync::watch::Sender<u64>,
    own_version: AtomicU64,
    own_changed: Notify,
    peers: Mutex<HashMap<String, Arc<PeerOut>>>,
    dedup: Mutex<Dedup>,
    metrics: RemoteMetrics,
    broadcast_sent: AtomicU64,
    broadcast_depth_max: std::sync::atomic::AtomicU32,
    broadcast_rerouted: AtomicU64,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// What [`Remote::start`] needs.
pub(crate) struct RemoteParts {
    pub cfg: PubsubConfig,
    pub frame_len_max: usize,
    pub transport: WeakTransport,
    pub membership: Membership,
    pub metrics: Metrics,
    /// Seeds the choice of whom to pull from (so a simulation replays).
    pub rng_seed: u64,
}

impl Remote {
    /// Starts the interest gossip, advertising no patterns until the bus has subscriptions.
    pub(crate) fn start(parts: RemoteParts) -> Arc<Remote> {
        let view = parts.membership.view();
        let remote = Arc::new(Remote {
            me: view.me.name.clone(),
            started_ms: view.me.started_ms,
            body_len_max: batch_bytes_limit(parts.frame_len_max) - SIGNAL_OVERHEAD_BYTES,
            dedup: Mutex::new(Dedup {
                seen: HashSet::new(),
                order: VecDeque::new(),
                len_max: parts.cfg.dedup_window_len_max,
            }),
            cfg: parts.cfg,
            transport: parts.transport,
            membership: parts.membership,
            interest: RwLock::new(Interest::new(view.me.name)),
            changes: tokio::sync::watch::Sender::new(0),
            own_version: AtomicU64::new(0),
            own_changed: Notify::new(),
            peers: Mutex::new(HashMap::new()),
            metrics: RemoteMetrics::new(&parts.metrics),
            broadcast_sent: AtomicU64::new(0),
            broadcast_depth_max: std::sync::atomic::AtomicU32::new(0),
            broadcast_rerouted: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        remote.set_patterns(Vec::new());
        let rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(parts.rng_seed);
        remote.tasks.spawn(gossip_loop(remote.clone(), rng));
        remote
    }

    /// Advertises a new set of own patterns (pushed to the members by the gossip task).
    pub(crate) fn set_patterns(&self, patterns: Vec<String>) {
        let patterns = normalize(patterns, self.cfg.interest_patterns_max);
        let mut map = self.interest.write().unwrap_or_else(|e| e.into_inner());
        if map.entry(&self.me).is_some_and(|e| e.patterns == patterns) {
            return;
        }
        let version = self.own_version.fetch_add(1, Ordering::Relaxed) + 1;
        let stamp = Stamp { started_ms: self.started_ms, version };
        // Patterns come from subscriptions the router accepted, so they parse.
        map.set_own(stamp, patterns).expect("own patterns are valid");
        drop(map);
        self.changed();
        self.own_changed.notify_one();
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change of the interest map.
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Other nodes interested in `ty`.
    pub(crate) fn nodes_for(&self, ty: &str) -> Vec<String> {
        self.interest.read().unwrap_or_else(|e| e.into_inner()).remote_nodes_for(ty)
    }

    /// The interest map's digest (for views and tests).
    pub(crate) fn interest_digest(&self) -> Vec<(String, Stamp)> {
        self.interest.read().unwrap_or_else(|e| e.into_inner()).digest()
    }

    /// Sends a copy of `signal` to every other interested node at `level`; `local` says whether
    /// this node's own subscriptions took it (it then counts towards a `strong` majority).
    pub(crate) async fn publish(
        self: &Arc<Self>,
        signal: &Signal,
        level: Delivery,
        local: bool,
    ) -> Result<RemoteSent, PublishError> {
        let nodes = self.nodes_for(&signal.ty);
        if nodes.is_empty() {
            return Ok(RemoteSent { nodes: 0 });
        }
        let body = Bytes::from(crate::signal::codec::encode_structured(signal));
        if body.len() > self.body_len_max {
            self.metrics.dropped.get_or_create(&label("reason", "too_large")).inc();
            return Err(PublishError::TooLarge { len: body.len(), max: self.body_len_max });
        }
        let quorum = (level == Delivery::Strong).then(|| Arc::new(Quorum { acks: Semaphore::new(0) }));
        let peers: Vec<Arc<PeerOut>> = nodes.iter().map(|n| self.peer_out(n)).collect();
        let taken = self.append(&peers, &body, level, &quorum)?;
        let Some(quorum) = quorum else { return Ok(RemoteSent { nodes: taken }) };
        let targets = nodes.len() + usize::from(local);
        let needed = targets / 2 + 1 - usize::from(local);
        let wait = Duration::from_millis(self.cfg.strong_timeout_ms);
        let met = matches!(tokio::time::timeout(wait, quorum.acks.acquire_many(needed as u32)).await, Ok(Ok(_)));
        match met {
            true => Ok(RemoteSent { nodes: taken }),
            false => {
                let acked = quorum.acks.available_permits() + usize::from(local);
                Err(PublishError::StrongUnmet { acked, needed: targets / 2 + 1, targets })
            }
        }
    }

    /// Sends `signal` to every other active member through the broadcast tree; how many nodes it
    /// is for.
    pub(crate) async fn broadcast(self: &Arc<Self>, signal: &Signal) -> Result<usize, PublishError> {
        let body = Bytes::from(crate::signal::codec::encode_structured(signal));
        if body.len() > self.body_len_max {
            self.metrics.dropped.get_or_create(&label("reason", "too_large")).inc();
            return Err(PublishError::TooLarge { len: body.len(), max: self.body_len_max });
        }
        let view = self.membership.view();
        let mut targets: Vec<String> = view
            .members
            .iter()
            .filter(|m| m.state.is_active() && m.meta.name != self.me)
            .map(|m| m.meta.name.clone())
            .collect();
        targets.sort();
        targets.dedup();
        let n = targets.len();
        forward(self.clone(), body, 1, targets).await;
        Ok(n)
    }

    /// Reaches `rest` for a broadcast that reached this node in `hops` hops (in the background).
    pub(super) fn forward_broadcast(self: &Arc<Self>, body: Bytes, hops: u32, mut rest: Vec<String>) {
        self.broadcast_depth_max.fetch_max(hops, Ordering::Relaxed);
        rest.retain(|n| *n != self.me);
        rest.truncate(BROADCAST_TARGETS_MAX);
        if !rest.is_empty() {
            self.tasks.spawn(forward(self.clone(), body, hops + 1, rest));
        }
    }

    pub(crate) fn broadcast_stats(&self) -> BroadcastStats {
        BroadcastStats {
            sent: self.broadcast_sent.load(Ordering::Relaxed),
            depth_max: self.broadcast_depth_max.load(Ordering::Relaxed),
            rerouted: self.broadcast_rerouted.load(Ordering::Relaxed),
        }
    }

    /// Appends one copy to each buffer: for `eventual` and `strong` to all or (if one is full)
    /// to none. Locks the buffers in name order (as `nodes_for` sorts), one at a time elsewhere.
    fn append(
        &self,
        peers: &[Arc<PeerOut>],
        body: &Bytes,
        level: Delivery,
        quorum: &Option<Arc<Quorum>>,
    ) -> Result<usize, PublishError> {
        let size = body.len();
        let mut boxes: Vec<_> = peers.iter().map(|p| p.lock()).collect();
        let room = |b: &Outbox| {
            b.items.len() < self.cfg.peer_buffer_len_max && b.bytes + size <= self.cfg.peer_buffer_bytes_max
        };
        if level != Delivery::Weak {
            if let Some(i) = boxes.iter().position(|b| !room(b)) {
                self.metrics.dropped.get_or_create(&label("reason", "buffer_full")).inc();
                return Err(PublishError::BufferFull { node: peers[i].name.clone() });
            }
        }
        let mut taken = 0;
        for b in boxes.iter_mut() {
            if !room(b) {
                self.metrics.dropped.get_or_create(&label("reason", "buffer_full")).inc();
                continue;
            }
            b.items.push_back(Item { body: body.clone(), level, quorum: quorum.clone() });
            b.bytes += size;
            taken += 1;
        }
        drop(boxes);
        self.metrics.buffered.inc_by(taken as i64);
        for p in peers {
            p.notify.notify_one();
        }
        Ok(taken)
    }

    /// The buffer to `node`, with its sender task started on first use.
    fn peer_out(self: &Arc<Self>, node: &str) -> Arc<PeerOut> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get(node) {
            return p.clone();
        }
        let p = Arc::new(PeerOut {
            name: node.to_string(),
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            cancel: self.cancel.child_token(),
        });
        peers.insert(node.to_string(), p.clone());
        self.tasks.spawn(send_loop(self.clone(), p.clone()));
        p
    }

    /// Signal copies buffered for other nodes, in all.
    pub(crate) fn buffered(&self) -> usize {
        let peers: Vec<Arc<PeerOut>> = self.peers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        peers.iter().map(|p| p.lock().items.len()).sum()
    }

    /// Whether the copy `(source, id)` was taken before; else runs `take` and remembers it if
    /// that succeeds.
    pub(super) fn take_once(&self, signal: &Signal, take: impl FnOnce() -> bool) -> bool {
        let key = (signal.source.clone(), signal.id.clone());
        let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        if dedup.contains(&key) {
            self.metrics.duplicates.inc();
            return true;
        }
        // Under the lock: two connections from one sender (an old and a new one) cannot both
        // take the same copy.
        if !take() {
            return false;
        }
        dedup.insert(key);
        self.metrics.received.inc();
        true
    }

    pub(super) fn count_refused(&self, reason: &'static str) {
        self.metrics.refused.get_or_create(&label("reason", reason)).inc();
    }

    /// Merges entries from a peer; only for current members (the map holds one entry per member).
    pub(super) fn merge(&self, entries: Vec<Entry>) -> u32 {
        let view = self.membership.view();
        let mut map = self.interest.write().unwrap_or_else(|e| e.into_inner());
        let mut taken = 0;
        for e in entries {
            if e.node == self.me || !view.members.iter().any(|m| m.meta.name == e.node) {
                continue;
            }
            match map.merge(e) {
                Ok(changed) => {
                    taken += 1;
                    if changed {
                        self.changes.send_modify(|n| *n += 1);
                    }
                }
                Err(err) => {
                    debug!(error = %err, "interest entry refused");
                    self.count_refused("interest");
                }
            }
        }
        taken
    }

    pub(crate) fn newer_than(&self, digest: &[(String, Stamp)]) -> Vec<Entry> {
        self.interest.read().unwrap_or_else(|e| e.into_inner()).newer_than(digest)
    }

    /// Waits until every buffer is empty, at most `timeout` (a graceful stop flushes).
    pub(crate) async fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.buffered() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(FLUSH_POLL_MS)).await;
        }
    }

    pub(super) fn transport(&self) -> Option<crate::net::Transport> {
        self.transport.upgrade()
    }

    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Asks every other member in `members` or seen alive to confirm it mirrors route `id`, each
    /// waiting at most `timeout`; the ones that did not (not seen alive, so not asked; unreachable;
    /// or not mirroring it in time), in name order.
    pub(crate) async fn await_route(&self, id: u64, members: Vec<String>, timeout: Duration) -> Vec<String> {
        let view = self.membership.view();
        let alive: std::collections::BTreeSet<String> = view
            .members
            .iter()
            .filter(|m| m.state.is_active() && m.meta.name != self.me)
            .map(|m| m.meta.name.clone())
            .collect();
        let not_seen = members.into_iter().filter(|n| *n != self.me && !alive.contains(n));
        let not_seen: std::collections::BTreeSet<String> = not_seen.collect();
        let timeout_ms = (timeout.as_millis() as u64).min(ROUTE_WAIT_MS_MAX);
        let payload = encode(&Req::AwaitRoute { id, timeout_ms });
        // The answer may take the whole wait, plus a round trip.
        let ask_timeout = Duration::from_millis(timeout_ms + self.cfg.ack_timeout_ms);
        let asks = alive.into_iter().map(|node| {
            let payload = payload.clone();
            async move {
                let reply = self.ask_within(&node, payload, ask_timeout).await;
                (!matches!(reply, Some(Reply::Accepted { count: 1 }))).then_some(node)
            }
        });
        let unconfirmed = futures::future::join_all(asks).await.into_iter().flatten();
        let mut all: Vec<String> = unconfirmed.chain(not_seen).collect();
        all.sort();
        all
    }

    async fn ask(&self, node: &str, payload: Bytes) -> Option<Reply> {
        self.ask_within(node, payload, Duration::from_millis(self.cfg.ack_timeout_ms)).await
    }

    async fn ask_within(&self, node: &str, payload: Bytes, timeout: Duration) -> Option<Reply> {
        let addr = self.membership.addr_of(node)?;
        let transport = self.transport.upgrade()?;
        let reply = transport.ask(addr, payload, timeout).await.ok()?;
        let Some(body) = reply.strip_prefix(&[PUBSUB_TAG]) else {
            self.count_refused("bad_reply");
            return None;
        };
        match postcard::from_bytes::<Reply>(body) {
            Ok(r) => Some(r),
            Err(_) => {
                self.count_refused("bad_reply");
                None
            }
        }
    }
}

/// Sends a broadcast to the plan's hops (each reached in `hops` hops), all at once; a hop that
/// cannot be reached has its share taken over here.
fn forward(
    remote: Arc<Remote>,
    body: Bytes,
    hops: u32,
    targets: Vec<String>,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt;
    async move {
        let plan = super::broadcast::plan(&targets, remote.cfg.broadcast_fanout);
        let sends = plan.into_iter().map(|hop| {
            let (remote, body) = (remote.clone(), body.clone());
            async move {
                remote.broadcast_sent.fetch_add(1, Ordering::Relaxed);
                let req = encode(&Req::Broadcast { hops, rest: hop.rest.clone(), signal: &body });
                if let Some(Reply::Accepted { .. }) = remote.ask(&hop.to, req).await {
                    return;
                }
                debug!(node = %hop.to, "broadcast hop unreachable; taking its share over");
                remote.broadcast_rerouted.fetch_add(1, Ordering::Relaxed);
                remote.metrics.dropped.get_or_create(&label("reason", "broadcast_unreachable")).inc();
                if !hop.rest.is_empty() {
                    forward(remote, body, hops, hop.rest).await;
                }
            }
        });
        join_all(sends).await;
    }
    .boxed()
}

/// Between checks of the buffers while a stop flushes them.
const FLUSH_POLL_MS: u64 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_signals_is_told_apart_by_its_second_byte() {
        let signals = encode(&Req::Signals { signals: vec![b"{}".as_slice()] });
        assert_eq!((signals[0], signals[1]), (PUBSUB_TAG, SIGNALS_VARIANT));
        for other in [encode(&Req::Pull(vec![])), encode(&Req::Broadcast { hops: 1, rest: vec![], signal: b"{}" })] {
            assert_ne!(other[1], SIGNALS_VARIANT);
            assert_ne!(other[1], AWAIT_ROUTE_VARIANT);
        }
        let wait = encode(&Req::AwaitRoute { id: 7, timeout_ms: 10 });
        assert_eq!((wait[0], wait[1]), (PUBSUB_TAG, AWAIT_ROUTE_VARIANT));
    }
}
