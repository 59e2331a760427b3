//! Connections between nodes.
//!
//! A [`Transport`] owns one listener and, per peer, one outbound connection per [`Lane`]. Each
//! outbound connection has a writer task draining a bounded queue: it takes the messages already
//! queued (up to `write_batch_bytes_max` bytes), packs them into as few frames as fit, and writes
//! them with one syscall.
//! Batching therefore comes from draining, never from waiting, so a lone message goes out at once.
//! Inbound connections are served by one reader task each, which hands decoded messages to the
//! node's [`Handler`] inline (the handler must not block) and answers RTT pings.
//!
//! Starting is two steps: [`Transport::bind`] binds the listener and gives the sending side (the
//! [`Transport`]) and the receiving side ([`Inbound`]); [`Inbound::serve`] starts accepting with
//! the handler. The node's handler needs the layers built on the transport, so they are built in
//! between; a peer dialling meanwhile waits in the listener's backlog (its handshake, and then its
//! messages, are taken once serving starts) rather than having its messages dropped. An
//! [`Inbound`] dropped unserved closes the listener at once.
//!
//! Guarantees and limits:
//! - every connection starts with the authenticated handshake of [`auth`]; a refused peer never
//!   gets a message through to the handler;
//! - a malformed or oversized frame closes that one connection with a logged reason and a counted
//!   metric; nothing a peer sends can panic the node;
//! - per peer and lane the queue holds at most `peer_queue_len_max` messages and
//!   `peer_queue_bytes_max` bytes (payload plus a fixed per-message overhead; the writer may hold
//!   one more drained batch of up to that size); it is also the buffer
//!   while the peer is unreachable and is flushed after reconnecting. `try_send` on a full queue
//!   fails with [`SendError::QueueFull`]; `send` waits (back-pressure);
//! - reconnects back off exponentially between `reconnect_backoff_min_ms` and `..._max_ms`; a peer
//!   unreachable for `peer_unreachable_forget_ms` is forgotten and its queue dropped (counted);
//! - messages on one lane from one sender to one receiver arrive in send order (one TCP stream).
//!   A message being written when a connection breaks is lost (counted as `write_failed`):
//!   delivery here is at most once; reliable delivery is built above with ids and retries;
//! - round-trip time is measured by pings on every outbound connection, and a connection silent
//!   for `conn_idle_timeout_ms` is closed and redialled (this catches half-open TCP connections);
//! - a handler that answers an ask at once has its reply written back on the same connection by the
//!   reader task, so a round trip costs no task hop on the answering node.
//!
//! The sockets sit behind the narrow [`Network`] trait, implemented for tokio ([`TokioNet`]) and
//! for turmoil's simulated network ([`TurmoilNet`]).

pub mod auth;
mod backends;
mod inbound;
mod peer;
mod queue;
pub mod stats;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use backends::TokioNet;
#[cfg(feature = "testing")]
pub use backends::TurmoilNet;
pub use stats::{DropReason, NetStats};

use crate::config::{NetConfig, Secret};
use crate::metrics::Metrics;
use crate::wire::{Lane, Msg, OutMsg, MSG_OVERHEAD_MAX_BYTES, NONCE_LEN};
use peer::{Peer, PeerState};

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The network the transport runs on.
pub trait Network: Send + Sync + 'static {
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Listener>>>;
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<(BoxRead, BoxWrite)>>;
}

/// A bound listener of a [`Network`].
pub trait Listener: Send + Sync {
    fn local_addr(&self) -> io::Result<SocketAddr>;
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxRead, BoxWrite, SocketAddr)>>;
}

/// An authenticated peer: its node name and the transport address it listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node name.
    pub name: Arc<str>,
    /// The transport address it listens on.
    pub addr: SocketAddr,
}

/// Receives every message that arrives on inbound connections (except replies to our own asks,
/// which the transport completes itself). Called on the reader task: it must not block.
pub trait Handler: Send + Sync + 'static {
    /// For an `Ask`, returning `Some(reply)` sends the reply at once on the connection the ask
    /// arrived on (no task hop); returning `None` leaves the answer to a later
    /// [`Transport::reply`] on this node's own connection to the asker (or to the asker's timeout).
    /// For other messages the return value is ignored.
    fn on_message(&self, from: &PeerInfo, lane: Lane, msg: OutMsg) -> Option<Bytes>;
}

/// Why a message was not queued for a peer (nothing was sent).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The peer's queue is full (`net.peer_queue_len_max` or `net.peer_queue_bytes_max`).
    #[error("queue to {peer} is full")]
    QueueFull {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The message is larger than one frame (`net.frame_len_max_bytes`).
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The message's length, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// Connections to `net.peers_max` peers exist already.
    #[error("peer limit of {max} reached")]
    PeersFull {
        /// The limit.
        max: usize,
    },
    /// The peer was unreachable for longer than `net.peer_unreachable_forget_ms`.
    #[error("peer {peer} was forgotten (unreachable too long); get a new sender")]
    PeerGone {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The transport is shut down.
    #[error("transport is shut down")]
    Closed,
}

/// Why an ask got no reply.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AskError {
    /// It could not be sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No reply within the timeout (the peer may still have handled it).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// `net.asks_in_flight_max` asks wait for their replies already.
    #[error("more than {max} asks in flight")]
    TooManyAsks {
        /// The limit.
        max: usize,
    },
    /// The transport is shut down.
    #[error("transport is shut down")]
    Closed,
}

/// Identity and limits of a transport.
pub struct TransportConfig {
    pub name: String,
    pub cluster: String,
    pub listen: SocketAddr,
    /// Address announced to peers; `None` uses the bound listen address.
    pub advertise: Option<SocketAddr>,
    pub secret: Secret,
    pub net: NetConfig,
    pub rng_seed: u64,
}

/// Handle to a running transport; cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    net: Arc<dyn Network>,
    local: PeerInfo,
    cluster: String,
    secret: Secret,
    cfg: NetConfig,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    /// Pending asks: id → (the peer asked, where its reply goes).
    asks: Mutex<HashMap<u64, (SocketAddr, oneshot::Sender<Bytes>)>>,
    ask_next_id: AtomicU64,
    stats: NetStats,
    rng: Mutex<StdRng>,
    /// Writer tasks, flushed first at shutdown.
    writers: TaskTracker,
    /// Listener and reader tasks.
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Set when graceful shutdown starts: no new peers from then on.
    closing: std::sync::atomic::AtomicBool,
    /// Live inbound readers per (peer, lane) with a generation; a newer connection stops the older
    /// reader so that a sender's messages cannot be delivered out of order across a reconnect.
    inbound: Mutex<HashMap<(SocketAddr, Lane), inbound::InboundEntry>>,
    inbound_generation: AtomicU64,
    inbound_permits: Arc<Semaphore>,
    /// Origin of ping timestamps.
    epoch: Instant,
}

/// The receiving side of a bound transport, not serving yet: [`Inbound::serve`] starts accepting
/// with the handler; dropping it closes the listener.
pub struct Inbound {
    inner: Arc<Inner>,
    listener: Box<dyn Listener>,
}

impl Inbound {
    /// Accepts connections from now on and hands what arrives on them to `handler`.
    pub fn serve(self, handler: Arc<dyn Handler>) {
        let accept = inbound::accept_loop(self.inner.clone(), self.listener, handler);
        self.inner.tasks.spawn(accept);
    }
}

impl Transport {
    /// Binds the listener; nothing is accepted before [`Inbound::serve`]. The sending side works
    /// at once. The listen address in `cfg` may use port 0; the bound address is then what peers
    /// are told.
    pub async fn bind(
        net: Arc<dyn Network>,
        cfg: TransportConfig,
        metrics: &Metrics,
    ) -> io::Result<(Transport, Inbound)> {
        let listener = net.bind(cfg.listen).await?;
        let mut local_addr = listener.local_addr()?;
        if let Some(a) = cfg.advertise {
            local_addr = a;
        } else if local_addr.ip().is_unspecified() {
            local_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let mut rng = StdRng::seed_from_u64(cfg.rng_seed);
        // Ask ids start at a random point so a restarted node does not reuse recent ids.
        let ask_first_id = rng.next_u64() >> 1;
        let inner = Arc::new(Inner {
            net,
            local: PeerInfo { name: cfg.name.into(), addr: local_addr },
            cluster: cfg.cluster,
            secret: cfg.secret,
            inbound_permits: Arc::new(Semaphore::new(cfg.net.inbound_conns_max)),
            cfg: cfg.net,
            peers: Mutex::new(HashMap::new()),
            asks: Mutex::new(HashMap::new()),
            ask_next_id: AtomicU64::new(ask_first_id),
            stats: NetStats::new(metrics),
            rng: Mutex::new(rng),
            writers: TaskTracker::new(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            inbound: Mutex::new(HashMap::new()),
            inbound_generation: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let inbound = Inbound { inner: inner.clone(), listener };
        Ok((Transport { inner }, inbound))
    }

    /// A reference that does not keep the transport alive (for handlers the transport owns).
    pub fn downgrade(&self) -> WeakTransport {
        WeakTransport(Arc::downgrade(&self.inner))
    }

    /// This node's name and bound transport address.
    pub fn local(&self) -> &PeerInfo {
        &self.inner.local
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn stats(&self) -> &NetStats {
        &self.inner.stats
    }

    /// Queues `msg` for `to` without waiting; fails when the queue is full.
    pub fn try_send(&self, to: SocketAddr, lane: Lane, msg: OutMsg) -> Result<(), SendError> {
        self.peer(to)?.try_send(lane, msg)
    }

    /// Queues `msg` for `to`, waiting while the queue is full.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub async fn send(&self, to: SocketAddr, lane: Lane, msg: OutMsg) -> Result<(), SendError> {
        self.peer(to)?.send(lane, msg).await
    }

    /// A handle that sends to one peer without a map lookup per message.
    pub fn peer(&self, to: SocketAddr) -> Result<PeerSender, SendError> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(SendError::Closed);
        }
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get(&to) {
            return Ok(PeerSender { inner: self.inner.clone(), peer: p.clone() });
        }
        if peers.len() >= self.inner.cfg.peers_max {
            self.inner.stats.drop(DropReason::PeersFull, 1);
            return Err(SendError::PeersFull { max: self.inner.cfg.peers_max });
        }
        let p = peer::spawn(&self.inner, to);
        peers.insert(to, p.clone());
        Ok(PeerSender { inner: self.inner.clone(), peer: p })
    }

    /// Sends an ask on the data lane and waits for its reply. The payload goes as given: a node
    /// dispatches it by the kind in front ([`crate::wire::envelope`]; `Node::ask` adds it).
    pub async fn ask(&self, to: SocketAddr, payload: Bytes, timeout: Duration) -> Result<Bytes, AskError> {
        self.ask_on(Lane::Data, to, payload, timeout).await
    }

    /// Sends an ask on `lane` and waits for its reply (which comes back on the same lane).
    pub async fn ask_on(
        &self,
        lane: Lane,
        to: SocketAddr,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, AskError> {
        let peer = self.peer(to)?;
        peer.ask_on(lane, payload, timeout).await
    }

    /// Answers, later, an ask the handler received on the data lane.
    pub fn reply(&self, to: SocketAddr, id: u64, payload: Bytes) -> Result<(), SendError> {
        self.reply_on(Lane::Data, to, id, payload)
    }

    /// Answers, later, an ask the handler received on `lane`.
    pub fn reply_on(&self, lane: Lane, to: SocketAddr, id: u64, payload: Bytes) -> Result<(), SendError> {
        self.try_send(to, lane, Msg::Reply { id, payload })
    }

    /// Smoothed RTT per peer with a live outbound connection that has answered a ping.
    pub fn peer_rtts(&self) -> Vec<(SocketAddr, Duration)> {
        let peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = peers.iter().filter_map(|(addr, p)| p.state.rtt().map(|rtt| (*addr, rtt))).collect();
        out.sort();
        out
    }

    /// Updates the gauges that are computed rather than counted (queue depths, connected peers).
    pub fn refresh_gauges(&self) {
        let peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        for lane in Lane::ALL {
            let depth: usize = peers.values().map(|p| p.queue_len(lane)).sum();
            let connected = peers.values().filter(|p| p.state.is_connected(lane)).count();
            let l = crate::metrics::label("lane", lane.as_str());
            self.inner.stats.queue_depth.get_or_create(&l).set(depth as i64);
            self.inner.stats.peers_connected.get_or_create(&l).set(connected as i64);
        }
    }

    /// Graceful shutdown: stops taking new peers, lets writers flush what is queued (for at most
    /// `flush_timeout`), then closes every connection and waits for all tasks.
    pub async fn shutdown(&self, flush_timeout: Duration) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let peers: Vec<Peer> = {
            let mut map = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(_, p)| p).collect()
        };
        drop(peers); // closes the queues: writers flush and exit
        self.inner.writers.close();
        let _ = tokio::time::timeout(flush_timeout, self.inner.writers.wait()).await;
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.writers.wait().await;
        self.inner.tasks.wait().await;
        self.inner.asks.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Abrupt stop (tests of crashes): no flush; every task stops at its next await point.
    pub async fn abort(&self) {
        self.stop_now();
        self.inner.writers.wait().await;
        self.inner.tasks.wait().await;
    }

    /// The synchronous part of [`Transport::abort`]: sends nothing more and tells every task to
    /// stop, without waiting for them (for a drop guard).
    pub fn stop_now(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.cancel.cancel();
        self.inner.writers.close();
        self.inner.tasks.close();
    }
}

impl Inner {
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).fill_bytes(&mut n);
        n
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn payload_len_max(&self) -> usize {
        crate::wire::payload_len_max(self.cfg.frame_len_max_bytes as usize)
    }

    /// Completes ask `id` if it was sent to `from`; a reply from anyone else is ignored.
    fn complete_ask(&self, from: SocketAddr, id: u64, payload: Bytes) {
        let tx = {
            let mut asks = self.asks.lock().unwrap_or_else(|e| e.into_inner());
            match asks.get(&id) {
                Some((peer, _)) if *peer == from => asks.remove(&id).map(|(_, tx)| tx),
                _ => None,
            }
        };
        match tx {
            Some(tx) => {
                let _ = tx.send(payload);
            }
            None => tracing::debug!(%from, id, "reply to no pending ask of that peer (late or stray)"),
        }
    }

    /// Hands an inbound message to `handler`; returns an immediate reply to an ask, if any.
    fn deliver(&self, handler: &dyn Handler, from: &PeerInfo, lane: Lane, msg: OutMsg) -> Option<OutMsg> {
        match msg {
            Msg::Reply { id, payload } => {
                self.complete_ask(from.addr, id, payload);
                None
            }
            msg => {
                let ask_id = if let Msg::Ask { id, .. } = &msg { Some(*id) } else { None };
                let reply = handler.on_message(from, lane, msg);
                Some(Msg::Reply { id: ask_id?, payload: reply? })
            }
        }
    }

    /// Removes `state`'s entry if it is still the current one for its address.
    fn forget(&self, state: &Arc<PeerState>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.get(&state.addr).is_some_and(|p| Arc::ptr_eq(&p.state, state)) {
            peers.remove(&state.addr);
        }
    }
}

/// A [`Transport`] reference that does not keep it alive.
#[derive(Clone)]
pub struct WeakTransport(std::sync::Weak<Inner>);

impl WeakTransport {
    pub fn upgrade(&self) -> Option<Transport> {
        self.0.upgrade().map(|inner| Transport { inner })
    }
}

/// Sends to one peer; obtained from [`Transport::peer`].
#[derive(Clone)]
pub struct PeerSender {
    inner: Arc<Inner>,
    peer: Peer,
}

impl PeerSender {
    fn check(&self, msg: &OutMsg) -> Result<(), SendError> {
        let max = self.inner.payload_len_max();
        if msg.payload_len() > max {
            self.inner.stats.drop(DropReason::TooLarge, 1);
            return Err(SendError::TooLarge { len: msg.payload_len(), max });
        }
        Ok(())
    }

    pub fn try_send(&self, lane: Lane, msg: OutMsg) -> Result<(), SendError> {
        self.check(&msg)?;
        let bytes = msg.payload_len() + MSG_OVERHEAD_MAX_BYTES;
        match self.peer.lanes[lane as usize].try_send(msg, bytes) {
            Ok(()) => Ok(()),
            Err(queue::TrySendError::Full(_)) => {
                self.inner.stats.drop(DropReason::QueueFull, 1);
                Err(SendError::QueueFull { peer: self.peer.state.addr })
            }
            Err(queue::TrySendError::Closed(_)) => Err(self.closed()),
        }
    }

    pub async fn send(&self, lane: Lane, msg: OutMsg) -> Result<(), SendError> {
        self.check(&msg)?;
        let bytes = msg.payload_len() + MSG_OVERHEAD_MAX_BYTES;
        self.peer.lanes[lane as usize].send(msg, bytes).await.map_err(|_| self.closed())
    }

    /// The error for a closed queue: the transport shut down, or this peer was forgotten.
    fn closed(&self) -> SendError {
        if self.inner.closing.load(Ordering::Relaxed) {
            self.inner.stats.drop(DropReason::Shutdown, 1);
            SendError::Closed
        } else {
            self.inner.stats.drop(DropReason::PeerGone, 1);
            SendError::PeerGone { peer: self.peer.state.addr }
        }
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub async fn ask(&self, payload: Bytes, timeout: Duration) -> Result<Bytes, AskError> {
        self.ask_on(Lane::Data, payload, timeout).await
    }

    /// An ask on `lane`.
    pub async fn ask_on(&self, lane: Lane, payload: Bytes, timeout: Duration) -> Result<Bytes, AskError> {
        let id = self.inner.ask_next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut asks = self.inner.asks.lock().unwrap_or_else(|e| e.into_inner());
            if asks.len() >= self.inner.cfg.asks_in_flight_max {
                self.inner.stats.drop(DropReason::TooManyAsks, 1);
                return Err(AskError::TooManyAsks { max: self.inner.cfg.asks_in_flight_max });
            }
            asks.insert(id, (self.peer.state.addr, tx));
        }
        let _guard = AskGuard { inner: &self.inner, id };
        // The timeout covers waiting for queue room as well as the reply.
        let round_trip = async {
            self.send(lane, Msg::Ask { id, payload }).await?;
            rx.await.map_err(|_| AskError::Closed)
        };
        match tokio::time::timeout(timeout, round_trip).await {
            Ok(res) => res,
            Err(_) => Err(AskError::Timeout(timeout)),
        }
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn addr(&self) -> SocketAddr {
        self.peer.state.addr
    }
}

/// Removes an ask's entry however the ask ends (reply, timeout, cancellation).
struct AskGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for AskGuard<'_> {
    fn drop(&mut self) {
        self.inner.asks.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}
