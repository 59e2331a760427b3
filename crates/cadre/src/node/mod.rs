//! A node: the layers assembled, start-up and shutdown.
//!
//! [`Node::start`] validates the config, binds the transport (and the HTTP API when configured),
//! starts membership, builds the cluster with the host and the bus (each given what it needs at
//! construction, see [`Cluster::start`]), serves the transport with the node's handler and joins
//! through the seeds. What it has running is held by a guard that stops it if the start fails or
//! is dropped half way. [`Node::shutdown`] leaves the cluster
//! gracefully: it tells the members, lets the transport flush, then stops every task and waits
//! for them. [`Node::kill`] stops abruptly, as a crash would (used by tests).
//!
//! Asks are dispatched by their [`envelope`] kind: on the data lane agent requests and
//! replication go to the cluster, pub/sub requests to the bus, application asks to a
//! [`DataHandler`], by default [`Echo`], which counts tells and answers asks with their own
//! payload (the transport benchmark uses it); on the control lane the kind picks the cluster's
//! pool of permits. An ask whose kind cannot be read is counted
//! (`cadre_envelopes_refused_total{lane, reason}`), logged and refused; the node carries on.
//! Tells carry no kind: they all go to the [`DataHandler`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod embed;

pub use embed::{AgentRef, NodeBuilder};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent::{Agent, Host, HostBuilder};
use crate::bus::{Bus, ClusterSide, RoutesError, RoutesPlan};
use crate::cluster::protocol::{self as control_msg, ControlReply};
use crate::cluster::{Cluster, ClusterParts, HostParts, Prepared};
use crate::config::{Config, ConfigError};
use crate::membership::task::{self as membership_task, Input, Membership, View};
use crate::membership::{Core, NodeMeta};
use crate::metrics::{CounterFamily, Metrics};
use crate::net::{AskError, Handler, Inbound, Network, PeerInfo, SendError, Transport, TransportConfig};
use crate::router::table::Table;
use crate::storage::Storage;
use crate::wire::envelope::{self, EnvelopeError, Kind};
use crate::wire::{Lane, Msg, OutMsg};

/// Longest a graceful shutdown waits for this node's shards to be handed over.
const SHUTDOWN_DRAIN_MS_MAX: u64 = 5000;
/// Time allowed for queued messages (the leave notices among them) to drain at shutdown.
const SHUTDOWN_FLUSH_MS: u64 = 1000;
/// Ask payload that [`Echo`] answers with its tell count (8 bytes, little endian).
pub const ECHO_COUNT_ASK: &[u8] = b"\0cadre.count";

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listening socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which one (`transport`, `http`).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The data dir (or a file in it) cannot be created, read or written.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The path at fault.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// A route of [`NodeOptions::routes`] cannot be subscribed.
    #[error("routes: {0}")]
    Routes(#[from] RoutesError),
    /// The embedded store cannot be opened.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// The database of `[storage] url` cannot be used (unreachable, login refused, schema).
    #[error(transparent)]
    StorageOpen(#[from] crate::storage::postgres::OpenError),
    /// The metadata group cannot start (its log under the data dir cannot be opened, ...).
    #[error("metadata: {0}")]
    Meta(#[from] crate::cluster::StartError),
}

/// Receives application messages on the data lane. Called on transport reader tasks: must not block.
pub trait DataHandler: Send + Sync + 'static {
    /// A tell, as sent ([`Node::tell`]).
    fn on_tell(&self, from: &PeerInfo, payload: Bytes);
    /// An application ask ([`Node::ask`], or any ask of kind `Kind::App`): `payload` is what
    /// the asker gave, without the kind; the result is the reply.
    fn on_ask(&self, from: &PeerInfo, payload: Bytes) -> Bytes;
}

/// Counts tells; answers an ask with its payload, or with the tell count for [`ECHO_COUNT_ASK`].
#[derive(Default)]
pub struct Echo {
    /// Tells received.
    pub tells: AtomicU64,
}

impl DataHandler for Echo {
    fn on_tell(&self, _from: &PeerInfo, _payload: Bytes) {
        self.tells.fetch_add(1, Ordering::Relaxed);
    }
    fn on_ask(&self, _from: &PeerInfo, payload: Bytes) -> Bytes {
        if payload == ECHO_COUNT_ASK {
            return Bytes::copy_from_slice(&self.tells.load(Ordering::Relaxed).to_le_bytes());
        }
        payload
    }
}

struct NodeHandler {
    membership: Membership,
    data: Arc<dyn DataHandler>,
    cluster: Cluster,
    bus: Bus,
    /// Asks refused because their kind cannot be read, by lane and reason.
    refused: CounterFamily,
}

impl NodeHandler {
    /// Counts, logs and answers an ask whose kind cannot be read.
    fn refuse(&self, from: &PeerInfo, lane: Lane, e: EnvelopeError) -> Bytes {
        let labels = vec![("lane", lane.as_str().to_string()), ("reason", e.reason().to_string())];
        self.refused.get_or_create(&labels).inc();
        warn!(from = %from.name, lane = lane.as_str(), error = %e, "ask refused: its kind cannot be read");
        match lane {
            Lane::Control => control_msg::encode(&ControlReply::Refused(format!("undecodable control request: {e}"))),
            Lane::Data => envelope::refusal(e),
        }
    }
}

impl Handler for NodeHandler {
    fn on_message(&self, from: &PeerInfo, lane: Lane, msg: OutMsg) -> Option<Bytes> {
        let (id, payload) = match msg {
            Msg::Ask { id, payload } => (id, payload),
            // Copied: a zero-copy slice would pin the whole read buffer while the packet waits
            // in the membership inbox.
            Msg::Membership(p) => {
                self.membership.deliver(Input::Packet(Bytes::copy_from_slice(&p)));
                return None;
            }
            Msg::Leave { incarnation } => {
                self.membership.deliver(Input::Leave { from: from.addr, incarnation });
                return None;
            }
            Msg::Tell(p) => {
                self.data.on_tell(from, p);
                return None;
            }
            Msg::Reply { .. } | Msg::Ping { .. } | Msg::Pong { .. } => return None,
        };
        if lane == Lane::Control {
            // Raft and placement: answered later by a task, through `reply_on`.
            return match envelope::control_kind(&payload) {
                Ok(kind) => {
                    self.cluster.on_control_ask(from, id, kind, payload);
                    None
                }
                Err(e) => Some(self.refuse(from, lane, e)),
            };
        }
        match envelope::split(&payload) {
            Ok((Kind::Agent, body)) => self.cluster.on_agent_ask(from, id, &body),
            // Signals from other nodes and the interest map: taken at once, in arrival order. The
            // bus reads its requests with their kind in front.
            Ok((Kind::PubSub, _)) => self.bus.on_pubsub_ask(from, id, payload),
            // Applied in arrival order per shard, then answered.
            Ok((Kind::Replica, body)) => self.cluster.on_replica_ask(from, id, &body),
            // Answered at once, on the connection the ask came in on.
            Ok((Kind::App, body)) => Some(self.data.on_ask(from, body)),
            Err(e) => Some(self.refuse(from, lane, e)),
        }
    }
}

/// A running node.
pub struct Node {
    cfg: Config,
    transport: Transport,
    membership: Membership,
    metrics: Metrics,
    bus: Bus,
    agents: Host,
    cluster: Cluster,
    http: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Options of [`Node::start`] besides the config.
pub struct NodeOptions {
    /// The sockets: real TCP by default (simulations use turmoil's). Internal: public (hidden)
    /// with the `testing` feature.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub net: Arc<dyn Network>,
    #[cfg(not(feature = "testing"))]
    pub(crate) net: Arc<dyn Network>,
    /// What receives application tells and asks ([`Node::tell`], [`Node::ask`]); by default an
    /// echo.
    pub data: Arc<dyn DataHandler>,
    /// Routes to subscribe at start (`--routes FILE`); every target a dispatch configuration.
    pub routes: Option<Table>,
    /// Agent types besides the built-in `counter`, registered with [`NodeOptions::agent`].
    /// Internal: public (hidden) with the `testing` feature.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub agent_types: Vec<fn(HostBuilder) -> HostBuilder>,
    #[cfg(not(feature = "testing"))]
    pub(crate) agent_types: Vec<fn(HostBuilder) -> HostBuilder>,
    /// Where agent state lives; default a redb file under the data dir, or memory without one.
    pub storage: Option<Arc<dyn Storage>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            net: Arc::new(crate::net::TokioNet),
            data: Arc::new(Echo::default()),
            routes: None,
            agent_types: Vec::new(),
            storage: None,
        }
    }
}

fn register<A: Agent>(b: HostBuilder) -> HostBuilder {
    b.agent::<A>()
}

impl NodeOptions {
    /// Registers an agent type.
    pub fn agent<A: Agent>(mut self) -> Self {
        self.agent_types.push(register::<A>);
        self
    }
}

/// The file of the embedded store under the data dir.
pub const STATE_FILE: &str = "state.redb";
/// The file of the metadata group's log and snapshots under the data dir.
pub const META_FILE: &str = "meta.redb";

impl Node {
    /// A node to start, without filling a [`Config`] by hand (see [`NodeBuilder`]).
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder::new(name)
    }

    /// A typed handle on the agent `id` of type `A`, wherever it lives.
    pub fn agent<A: Agent>(&self, id: impl Into<String>) -> AgentRef<A> {
        AgentRef::new(self, id)
    }

    /// Validates `cfg`, binds the transport (and the HTTP API when `cfg.http` is set), opens the
    /// storage, starts every layer and joins the cluster through `cfg.seeds` (or forms one). Returns
    /// once started, not once joined (`GET /readyz` tells that). After an error nothing it started
    /// keeps running and its ports are free again; the same holds when the returned future is
    /// dropped half way (see `Starting`).
    pub async fn start(cfg: Config, mut opts: NodeOptions) -> Result<Node, NodeError> {
        cfg.validate()?;
        let incarnation = match &cfg.data_dir {
            Some(dir) => next_incarnation(dir)?,
            None => 1,
        };
        let rng_seed = cfg.rng_seed.unwrap_or_else(rand::random);
        let metrics = Metrics::new();
        let storage = open_storage(opts.storage.take(), &cfg).await?;
        let prepared = Prepared::open(ClusterParts {
            name: cfg.name.clone(),
            founder: cfg.seeds.is_empty(),
            meta: cfg.meta.clone(),
            placement: cfg.placement.clone(),
            meta_file: cfg.data_dir.as_ref().map(|d| d.join(META_FILE)),
            rng_seed: rng_seed.wrapping_add(2),
            storage,
            metrics: metrics.clone(),
            frame_len_max_bytes: cfg.net.frame_len_max_bytes,
        })
        .map_err(NodeError::Meta)?;
        // Checked before anything is bound; subscribed once the bus exists.
        let routes = opts.routes.as_ref().map(RoutesPlan::of).transpose()?;
        let tcfg = transport_config(&cfg, rng_seed);
        let (transport, inbound) = Transport::bind(opts.net.clone(), tcfg, &metrics)
            .await
            .map_err(|source| NodeError::Bind { what: "transport", addr: cfg.listen, source })?;
        let mut starting = Starting::new(transport);
        let run = Run { cfg, opts, metrics, incarnation, rng_seed, prepared, routes, inbound };
        match run.start(&mut starting).await {
            Ok(node) => {
                starting.disarm();
                Ok(node)
            }
            Err(e) => {
                // The listeners are closed already (dropped with `run`); the tasks stop now.
                starting.undo().await;
                Err(e)
            }
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }
    /// Bound transport address.
    pub fn addr(&self) -> SocketAddr {
        self.transport.local().addr
    }
    /// Bound HTTP address, if the API runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }
    testing_pub! {
        /// The member view (internal; for tests).
        fn view(&self) -> View {
            self.membership.view()
        }
        /// The membership layer (internal; for tests).
        fn membership(&self) -> &Membership {
            &self.membership
        }
        /// The transport (internal; for tests and benchmarks).
        fn transport(&self) -> &Transport {
            &self.transport
        }
    }
    /// Waits until every shard of the cluster has an owner in this node's view (the cluster
    /// formed and placed them), at most `timeout`; false if it did not happen in time.
    pub async fn placed(&self, timeout: Duration) -> bool {
        let mut rx = self.cluster.watch();
        let wait = async {
            loop {
                let st = rx.borrow_and_update().clone();
                if st.shard_count > 0 && st.shards.iter().all(|e| e.owner.is_some()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The node is shutting down: its shards will not be placed.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
    /// The node's metrics registry (what `GET /metrics` shows).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// The node-local signal bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
    testing_pub! {
        /// The agents active on this node (internal; for tests and benchmarks).
        fn agents(&self) -> &Host {
            &self.agents
        }
        /// Agents across the cluster: routing, placement, the metadata group (internal; for tests
        /// and benchmarks).
        fn cluster(&self) -> &Cluster {
            &self.cluster
        }
    }

    /// Sends `payload` to the node at `to` (its transport address), to its
    /// [`DataHandler::on_tell`]; queued, not awaited (no delivery guarantee).
    pub fn tell(&self, to: SocketAddr, payload: Bytes) -> Result<(), SendError> {
        self.transport.try_send(to, Lane::Data, Msg::Tell(payload))
    }

    /// Asks the node at `to`: its [`DataHandler::on_ask`] gets exactly `payload`, whatever it
    /// starts with, and answers. The payload is copied once behind its kind (`envelope::app`);
    /// to ask the same payload many times, encode it once and use `Transport::ask`.
    pub async fn ask(&self, to: SocketAddr, payload: Bytes, timeout: Duration) -> Result<Bytes, AskError> {
        self.transport.ask(to, envelope::app(&payload), timeout).await
    }

    /// Graceful stop: leave the cluster, flush, stop every task.
    pub async fn shutdown(self) {
        // Hand the shards over first (planned moves), while this node is still a member.
        let drain_ms = self.cfg.placement.handoff_timeout_ms.min(SHUTDOWN_DRAIN_MS_MAX);
        self.cluster.drain(Duration::from_millis(drain_ms)).await;
        self.membership.leave().await;
        // Agents first, while the lease holds: passivating stores their state, and they may
        // still publish.
        self.agents.shutdown().await;
        // Signals acknowledged at `eventual` reach the nodes that can be reached.
        self.bus.flush_remote(Duration::from_millis(SHUTDOWN_FLUSH_MS)).await;
        self.cluster.shutdown().await;
        self.transport.shutdown(Duration::from_millis(SHUTDOWN_FLUSH_MS)).await;
        self.bus.shutdown().await;
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        info!(name = %self.cfg.name, "node stopped");
    }

    /// Abrupt stop, as a crash: no leave, no flush.
    pub async fn kill(self) {
        self.cancel.cancel();
        // Serve nothing from now on (the gate refuses every call and queued signal), whatever
        // the steps below wait for.
        self.cluster.stop_serving();
        // Silent on the network at once, as a crashed process is: the steps below take time (in
        // a simulation, simulated time while the others run), and nothing may answer meanwhile.
        self.transport.abort().await;
        // As a crash: no passivation, no last write.
        self.agents.abort().await;
        self.cluster.shutdown().await;
        self.bus.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What [`Node::start`] has once the transport is bound: the rest of the start.
struct Run {
    cfg: Config,
    opts: NodeOptions,
    metrics: Metrics,
    incarnation: u64,
    rng_seed: u64,
    prepared: Prepared,
    routes: Option<RoutesPlan>,
    inbound: Inbound,
}

impl Run {
    /// Binds the HTTP API, starts membership and the cluster (with the host and the bus), then
    /// serves. Whatever runs is in `starting`, for the caller to stop if this fails.
    async fn start(self, starting: &mut Starting) -> Result<Node, NodeError> {
        let Run { cfg, opts, metrics, incarnation, rng_seed, prepared, routes, inbound } = self;
        let transport = starting.transport().clone();
        let http_listener = match cfg.http {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind {
                what: "http",
                addr,
                source,
            })?),
            None => None,
        };
        let http = http_listener.as_ref().and_then(|l| l.local_addr().ok());
        let me = NodeMeta {
            name: cfg.name.clone(),
            addr: transport.local().addr,
            http,
            incarnation,
            started_ms: crate::clock::wall_ms(),
        };
        let membership = spawn_membership(&cfg, me, rng_seed, &transport, &metrics, starting);
        let source = cfg.signal_source();
        crate::signal::set_default_source(&source);
        let remote = crate::bus::remote::RemoteParts {
            cfg: cfg.pubsub.clone(),
            frame_len_max: cfg.net.frame_len_max_bytes as usize,
            transport: transport.downgrade(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            rng_seed: rng_seed.wrapping_add(3),
        };
        // The host and the bus are built inside the cluster's start (see `Cluster::start`).
        let assemble = |parts: HostParts| {
            let side = ClusterSide { remote, cluster: parts.cluster.clone() };
            let bus = Bus::clustered(cfg.signals.clone(), &source, &metrics, side);
            (build_host(&cfg, &opts.agent_types, &metrics, parts, &bus), bus)
        };
        let addr = transport.local().addr;
        let started = Cluster::start(prepared, addr, transport.downgrade(), membership.clone(), assemble).await;
        let (cluster, bus) = started.map_err(NodeError::Meta)?;
        starting.cluster_runs(cluster.clone(), bus.clone());
        if let Some(plan) = routes {
            bus.subscribe_routes(plan)?;
        }
        bus.follow_routes();
        let handler = NodeHandler {
            membership: membership.clone(),
            data: opts.data,
            cluster: cluster.clone(),
            bus: bus.clone(),
            refused: metrics.counters(
                "envelopes_refused",
                "Asks from other nodes refused because their kind cannot be read, by lane and reason",
            ),
        };
        inbound.serve(Arc::new(handler));
        let (cancel, tasks) = starting.node_tasks();
        if let Some(listener) = http_listener {
            let state = crate::api::ApiState {
                membership: membership.clone(),
                transport: transport.clone(),
                metrics: metrics.clone(),
                bus: bus.clone(),
                ingress_body_bytes_max: cfg.signals.ingress_body_bytes_max,
                cluster: cluster.clone(),
                node_name: cfg.name.clone(),
                call_timeout: Duration::from_millis(cfg.agents.call_timeout_ms),
            };
            tasks.spawn(crate::api::serve(listener, state, cancel.clone()));
        }
        info!(name = %cfg.name, addr = %addr, http = ?http, incarnation, "node started");
        let agents = cluster.host().clone();
        Ok(Node { cfg, transport, membership, metrics, bus, agents, cluster, http, cancel, tasks })
    }
}

/// What a start has running so far; stops it unless the start finishes ([`Starting::disarm`]).
///
/// Design note: a start runs things one after the other (transport, membership, the cluster with
/// the host and the bus), and any later step may fail. Rather than a cleanup ladder per error
/// path, each running part is registered here as soon as it runs. On an error,
/// [`Starting::undo`] stops them and waits for their tasks, so the error returns with nothing
/// running. If the start future is dropped half way instead (a timeout around it, a cancelled
/// task), `Drop` stops them as well: it tells every part to stop at once (the network goes
/// silent, the node's tasks are cancelled) and spawns the rest of the undo, which waits, on the
/// current runtime. The listeners need neither: they are owned by the start itself (the
/// transport's unserved [`Inbound`], the HTTP listener) and close when it is dropped.
struct Starting(Option<Running>);

/// The parts a start has running (see [`Starting`]).
struct Running {
    transport: Transport,
    /// The node's own tasks (membership, later the HTTP API).
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// The cluster (with the host) and the bus, once started.
    cluster: Option<(Cluster, Bus)>,
}

impl Starting {
    fn new(transport: Transport) -> Starting {
        Starting(Some(Running {
            transport,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cluster: None,
        }))
    }

    fn running(&self) -> &Running {
        match &self.0 {
            Some(r) => r,
            None => unreachable!("emptied only by `disarm` and `undo`, which take the guard"),
        }
    }

    fn transport(&self) -> &Transport {
        &self.running().transport
    }

    /// The node's token and tracker for its own tasks.
    fn node_tasks(&self) -> (CancellationToken, TaskTracker) {
        let r = self.running();
        (r.cancel.clone(), r.tasks.clone())
    }

    /// The cluster (with the host) and the bus run from now on.
    fn cluster_runs(&mut self, cluster: Cluster, bus: Bus) {
        if let Some(r) = &mut self.0 {
            r.cluster = Some((cluster, bus));
        }
    }

    /// The start finished: the parts are the node's now.
    fn disarm(mut self) {
        self.0 = None;
    }

    /// The start failed: stops everything and waits for it. Dropped while waiting, it leaves
    /// the rest to `Drop`.
    async fn undo(mut self) {
        if let Some(r) = &self.0 {
            r.stop_now();
            r.stop().await;
        }
        self.0 = None;
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let Some(r) = self.0.take() else { return };
        r.stop_now();
        // Outside a runtime (it is going away) the tasks go with it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { r.stop().await });
        }
    }
}

impl Running {
    /// What stops without waiting: the network goes silent, the node's tasks are told to stop,
    /// the cluster serves nothing.
    fn stop_now(&self) {
        self.cancel.cancel();
        self.transport.stop_now();
        if let Some((cluster, _)) = &self.cluster {
            cluster.stop_serving();
        }
    }

    /// Stops every part and waits for its tasks (after [`Running::stop_now`]).
    async fn stop(&self) {
        if let Some((cluster, bus)) = &self.cluster {
            bus.shutdown().await;
            cluster.host().shutdown().await;
            cluster.shutdown().await;
        }
        self.transport.abort().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The transport's identity and limits from the node's config.
fn transport_config(cfg: &Config, rng_seed: u64) -> TransportConfig {
    TransportConfig {
        name: cfg.name.clone(),
        cluster: cfg.cluster.clone(),
        listen: cfg.listen,
        advertise: cfg.advertise,
        secret: cfg.secret.clone(),
        net: cfg.net.clone(),
        rng_seed,
    }
}

/// Starts membership on the node's tasks; a renewed incarnation is kept in the data dir.
fn spawn_membership(
    cfg: &Config,
    me: NodeMeta,
    rng_seed: u64,
    transport: &Transport,
    metrics: &Metrics,
    starting: &Starting,
) -> Membership {
    let now = tokio::time::Instant::now();
    let core = Core::new(me, cfg.membership.clone(), cfg.seeds.clone(), rng_seed.wrapping_add(1), now);
    let data_dir = cfg.data_dir.clone();
    let on_renew = Box::new(move |m: &NodeMeta| {
        if let Some(dir) = &data_dir {
            if let Err(e) = write_incarnation(dir, m.incarnation) {
                warn!(error = %e, "cannot persist incarnation");
            }
        }
    });
    let (cancel, tasks) = starting.node_tasks();
    membership_task::spawn(core, &cfg.membership, transport.clone(), metrics, on_renew, cancel, &tasks)
}

/// The node's host: the built-in and registered agent types, publishing on `bus`, calling
/// through the cluster.
fn build_host(
    cfg: &Config,
    agent_types: &[fn(HostBuilder) -> HostBuilder],
    metrics: &Metrics,
    parts: HostParts,
    bus: &Bus,
) -> Host {
    let mut b = HostBuilder::new(cfg.agents.clone(), parts.storage)
        .gate(parts.gate)
        .metrics(metrics)
        .emitter(emitter(bus.downgrade()))
        .caller(caller(parts.cluster))
        .agent::<crate::agent::counter::Counter>();
    for register in agent_types {
        b = register(b);
    }
    b.build()
}

/// Publishes what agents emit on the node's bus, in order, at the default level; a refused
/// signal is logged (the bus counts it).
fn emitter(bus: crate::bus::WeakBus) -> crate::agent::Emitter {
    Arc::new(move |signals| {
        let bus = bus.upgrade();
        Box::pin(async move {
            let Some(bus) = bus else { return };
            for s in signals {
                let (id, ty) = (s.id.clone(), s.ty.clone());
                if let Err(e) = bus.publish(s).await {
                    warn!(%id, %ty, error = %e, "a signal an agent emitted was refused");
                }
            }
        })
    })
}

/// Carries handlers' calls and casts to agents wherever they live (through the cluster).
fn caller(cluster: crate::cluster::WeakCluster) -> crate::agent::Caller {
    // A cast waits for its mailbox this long at most (the caller does not wait for its handler).
    const CAST_TIMEOUT: Duration = Duration::from_secs(5);
    Arc::new(move |key, signal, timeout| {
        let cluster = cluster.upgrade();
        Box::pin(async move {
            let cluster =
                cluster.ok_or(crate::agent::CallError::Unavailable(crate::agent::Unavailable::ShuttingDown))?;
            match timeout {
                Some(t) => cluster.call(&key, signal, t).await.map(|s| s.reply),
                None => cluster.cast(&key, signal, CAST_TIMEOUT).await.map(|_| serde_json::Value::Null),
            }
        })
    })
}

/// The store agents keep their state in: the one given, else the database of `[storage] url`,
/// else a redb file under the data dir, else memory.
async fn open_storage(given: Option<Arc<dyn Storage>>, cfg: &Config) -> Result<Arc<dyn Storage>, NodeError> {
    Ok(match (given, &cfg.storage.url, &cfg.data_dir) {
        (Some(s), _, _) => s,
        (None, Some(url), _) => Arc::new(crate::storage::postgres::PostgresStorage::open(url, &cfg.storage).await?),
        (None, None, Some(dir)) => Arc::new(crate::storage::embedded::RedbStorage::open(&dir.join(STATE_FILE))?),
        (None, None, None) => Arc::new(crate::storage::memory::MemoryStorage::new()),
    })
}

const INCARNATION_FILE: &str = "incarnation";

/// Reads, increments and stores the incarnation counter in `dir`.
fn next_incarnation(dir: &Path) -> Result<u64, NodeError> {
    let err = |source| NodeError::DataDir { path: dir.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let path = dir.join(INCARNATION_FILE);
    let prev = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is corrupt ({e}); remove it to start a new identity", path.display()),
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(err(e)),
    };
    let next = prev.checked_add(1).ok_or_else(|| {
        err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is at its maximum", path.display())))
    })?;
    write_incarnation(dir, next).map_err(err)?;
    Ok(next)
}

/// Writes the counter atomically and durably (temporary file synced, renamed, directory synced), so
/// neither a crash nor a power loss leaves it empty.
fn write_incarnation(dir: &Path, incarnation: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{INCARNATION_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(incarnation.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(INCARNATION_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnation_grows_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_incarnation(dir.path()).unwrap(), 1);
        assert_eq!(next_incarnation(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join(INCARNATION_FILE), "garbage").unwrap();
        let err = next_incarnation(dir.path()).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
