//! The node-local bus: subscriptions, publish, middleware, and delivery to adapters.
//!
//! `subscribe(pattern, dispatch)` registers a route in a [`Router`] whose target is the
//! subscription; `publish` validates each signal, runs the before-publish middleware, records it
//! in the causality [`Journal`], routes it and appends it to the queue of every matching
//! subscription. Each subscription has one worker task that takes signals from its queue in order
//! and hands them to its adapter ([`Dispatch`]): an in-process channel or function, the log, or a
//! webhook (see [`webhook`]). So signals reach a subscriber in publish order, and a slow subscriber
//! delays only itself.
//!
//! ## Bounds and what happens when full
//! - Each subscription's queue holds at most `queue_len_max` signals. When full, its
//!   [`Overflow`] policy applies: `reject` fails the publish with [`PublishError::QueueFull`]
//!   naming the subscription (other subscribers may already have the signal), `drop_oldest` drops
//!   the oldest queued signal and counts it. Publishing never waits for a subscriber.
//! - Subscriptions: at most `subscriptions_max`. Journal and dead letters: bounded, oldest first out.
//! - Middleware: each call has a time budget; over budget (or a panic) counts as a rejection for
//!   before-publish (the signal is refused) and before-dispatch (that subscriber is skipped), and
//!   is abandoned for after-dispatch. Every such case is counted.
//!
//! ## Causality
//! Function adapters run inside a [`Context`] whose parent is the signal being handled: signals
//! they publish get `causationid` and a child `traceparent`. A signal published with no
//! `traceparent` gets a new trace.
//!
//! ## Caveats
//! Queues live in memory: signals still queued when the node stops are lost (persistent
//! subscriptions come with cluster delivery). A webhook's retries hold back its later signals:
//! order is kept at the cost of head-of-line blocking.

pub mod agents;
pub mod broadcast;
pub mod interest;
pub mod remote;
pub mod webhook;

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::SignalsConfig;
use crate::metrics::{label, CounterFamily, Metrics};
use crate::router::table::{self, Table, TableError};
use crate::router::{Predicate, RouteError, RouteId, RouteSpec, Router};
use crate::signal::journal::{Direction, Journal, TraceStep};
use crate::signal::{Context, Signal, SignalError, TraceParent, TRACEPARENT};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
pub use remote::{Delivery, PUBSUB_TAG};
use webhook::{Breaker, WebhookSpec};

/// Identifies a subscription on its node.
pub type SubId = u64;

/// A subscription queue may be at most this many times the configured default.
pub const QUEUE_LEN_FACTOR_MAX: usize = 16;

/// What a full subscriber queue does with a new signal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse the publish with [`PublishError::QueueFull`].
    #[default]
    Reject,
    /// Drop the oldest queued signal (counted) and take the new one.
    DropOldest,
}

/// An in-process handler; runs on the subscription's worker task.
pub type HandlerFn = Arc<dyn Fn(Arc<Signal>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Where a subscription's signals go.
#[derive(Clone)]
pub enum Dispatch {
    /// A `tracing` info line per signal.
    Log,
    /// An HTTP POST of the structured event per signal, retried, behind a breaker per URL.
    Webhook(WebhookSpec),
    /// An in-process channel; a full channel holds the subscription's queue back.
    Channel(mpsc::Sender<Arc<Signal>>),
    /// An in-process async function; an `Err` or panic is a failed delivery (dead-lettered).
    Function(HandlerFn),
    /// An agent (or one of a pool), wherever it lives: the mirror of a cluster-wide route (see
    /// [`agents`]); only the bus creates these.
    Agent(crate::meta::AgentTarget),
}

/// The JSON form of the dispatches that can be configured from outside (HTTP, routes files):
/// `{"log":{}}` or `{"webhook":{"url":"http://...","secret":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DispatchSpec {
    Log {},
    Webhook(WebhookSpec),
    /// A cluster-wide route to an agent: `{"agent":{"type":"order","key":"subject"}}`.
    Agent {
        #[serde(rename = "type")]
        ty: String,
        key: String,
    },
    /// A cluster-wide route to a pool of agents: `{"pool":{"type":"worker"}}`.
    Pool {
        #[serde(rename = "type")]
        ty: String,
    },
}

impl DispatchSpec {
    /// The agent target of a cluster-wide route, or the node-bound dispatch.
    pub fn into_dispatch(self) -> Result<Dispatch, crate::meta::AgentTarget> {
        match self {
            DispatchSpec::Log {} => Ok(Dispatch::Log),
            DispatchSpec::Webhook(w) => Ok(Dispatch::Webhook(w)),
            DispatchSpec::Agent { ty, key } => Err(crate::meta::AgentTarget::Agent { ty, key }),
            DispatchSpec::Pool { ty } => Err(crate::meta::AgentTarget::Pool { ty }),
        }
    }
}

impl Dispatch {
    /// A function handler from an async closure.
    pub fn function<F, Fut>(f: F) -> Dispatch
    where
        F: Fn(Arc<Signal>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        Dispatch::Function(Arc::new(move |s| f(s).boxed()))
    }

    /// How the dispatch is shown (secrets hidden).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Dispatch::Log => serde_json::json!({"log": {}}),
            Dispatch::Webhook(w) => {
                serde_json::json!({"webhook": {"url": w.url, "secret": w.secret.as_ref().map(|_| "<hidden>")}})
            }
            Dispatch::Channel(_) => serde_json::json!({"channel": {}}),
            Dispatch::Function(_) => serde_json::json!({"function": {}}),
            Dispatch::Agent(t) => serde_json::to_value(t).unwrap_or_default(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Dispatch::Log => "log",
            Dispatch::Webhook(_) => "webhook",
            Dispatch::Channel(_) => "channel",
            Dispatch::Function(_) => "function",
            Dispatch::Agent(crate::meta::AgentTarget::Agent { .. }) => "agent",
            Dispatch::Agent(crate::meta::AgentTarget::Pool { .. }) => "pool",
        }
    }
}

/// What to subscribe.
pub struct SubscriptionSpec {
    pub pattern: String,
    pub dispatch: Dispatch,
    pub priority: i32,
    pub overflow: Overflow,
    /// `None`: the node's `subscriber_queue_len_max`.
    pub queue_len_max: Option<usize>,
    pub predicate: Option<Predicate<Signal>>,
    /// The cluster-wide route this subscription mirrors (set by the bus only).
    route: Option<u64>,
}

impl SubscriptionSpec {
    pub fn new(pattern: impl Into<String>, dispatch: Dispatch) -> Self {
        Self {
            pattern: pattern.into(),
            dispatch,
            priority: 0,
            overflow: Overflow::Reject,
            queue_len_max: None,
            predicate: None,
            route: None,
        }
    }
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }
    pub fn queue_len_max(mut self, len: usize) -> Self {
        self.queue_len_max = Some(len);
        self
    }
    pub fn predicate(mut self, p: impl Fn(&Signal) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(p));
        self
    }
}

/// The JSON body of `POST /v1/subscriptions` (and a route target in a routes file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionJson {
    pub pattern: String,
    pub dispatch: DispatchSpec,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub overflow: Overflow,
    #[serde(default)]
    pub queue_len_max: Option<usize>,
}

impl SubscriptionJson {
    /// The node-bound subscription, or the cluster-wide agent route it describes.
    pub fn into_spec(self) -> Result<SubscriptionSpec, crate::meta::AgentRoute> {
        match self.dispatch.into_dispatch() {
            Ok(dispatch) => Ok(SubscriptionSpec {
                pattern: self.pattern,
                dispatch,
                priority: self.priority,
                overflow: self.overflow,
                queue_len_max: self.queue_len_max,
                predicate: None,
                route: None,
            }),
            Err(target) => Err(crate::meta::AgentRoute { pattern: self.pattern, target }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("dispatch: {0}")]
    Dispatch(String),
    #[error("queue_len_max {len} must be within 1..={max}")]
    QueueLen { len: usize, max: usize },
    #[error("the node has {0} subscriptions, its limit")]
    TooMany(usize),
    #[error("the bus is shutting down")]
    ShuttingDown,
    /// A cluster-wide route could not be changed (no leader, refused by the metadata group).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Why a routes table cannot be subscribed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutesError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("route #{index} ({path}): {reason}")]
    Target { index: usize, path: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("invalid signal: {0}")]
    Invalid(#[from] SignalError),
    #[error("rejected by middleware {middleware}: {reason}")]
    Rejected { middleware: String, reason: String },
    #[error("queue of subscription {subscription} is full (delivered to {delivered} other subscriptions)")]
    QueueFull { subscription: SubId, delivered: usize },
    /// The buffer for another interested node is full (it is slow or unreachable); nothing was
    /// sent to other nodes, local subscribers have the signal.
    #[error("the buffer for node {node} is full")]
    BufferFull { node: String },
    /// The encoded signal does not fit a transport frame, so it cannot go to other nodes (local
    /// subscribers have it).
    #[error("signal of {len} bytes is over the {max} bytes other nodes can be sent")]
    TooLarge { len: usize, max: usize },
    /// A `strong` publish did not reach a majority of its target nodes in time. It is buffered
    /// and may still arrive.
    #[error("strong delivery unmet: {acked} of {targets} target nodes accepted, {needed} needed")]
    StrongUnmet { acked: usize, needed: usize, targets: usize },
    #[error("the bus is shutting down")]
    ShuttingDown,
}

/// A published signal: its id, how many local subscriptions took it, how many other nodes were
/// sent a copy, and the delivery level met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub deliveries: usize,
    pub remote_nodes: usize,
    pub delivery: Delivery,
}

/// A middleware's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Before publish: refuse the signal. Before dispatch: skip this subscriber.
    Reject(String),
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { attempts: u32 },
    Failed { attempts: u32, reason: String },
}

/// The subscription a dispatch middleware sees.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub id: SubId,
    pub pattern: &'a str,
}

/// Hooks around publish and dispatch. Each call gets the node's `middleware_budget_ms`.
pub trait Middleware: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn before_publish<'a>(&'a self, _signal: &'a Signal) -> BoxFuture<'a, Verdict> {
        futures::future::ready(Verdict::Continue).boxed()
    }
    fn before_dispatch<'a>(&'a self, _signal: &'a Signal, _target: Target<'a>) -> BoxFuture<'a, Verdict> {
        futures::future::ready(Verdict::Continue).boxed()
    }
    fn after_dispatch<'a>(
        &'a self,
        _signal: &'a Signal,
        _target: Target<'a>,
        _outcome: &'a Outcome,
    ) -> BoxFuture<'a, ()> {
        futures::future::ready(()).boxed()
    }
}

/// A delivery that failed for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub subscription: SubId,
    pub dispatch: serde_json::Value,
    pub reason: String,
    pub attempts: u32,
    /// When it was given up (RFC 3339).
    pub time: String,
    /// The structured event.
    pub signal: serde_json::Value,
}

/// Dead letters as encoded events (a `serde_json::Value` costs several times the text), bounded
/// by count and bytes.
#[derive(Default)]
struct DeadLetters {
    items: VecDeque<(DeadLetter, Vec<u8>, usize)>,
    bytes: usize,
}

/// A subscription as listed by `GET /v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    pub id: SubId,
    pub pattern: String,
    pub dispatch: serde_json::Value,
    pub priority: i32,
    pub overflow: Overflow,
    pub queue_len_max: usize,
    pub queued: usize,
    /// Signals taken into its queue (each is then delivered, failed, dropped or skipped).
    #[serde(default)]
    pub received: u64,
    pub delivered: u64,
    pub failed: u64,
    pub dropped: u64,
    pub skipped: u64,
    /// Breaker state of a webhook's URL: `closed`, `open` or `half_open`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
    /// The cluster-wide route it mirrors (agent and pool targets), as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// A subscription's own counts, plus its adapter's series in `deliveries` (looked up once).
struct SubCounts {
    received: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    delivered_total: Counter,
    failed_total: Counter,
    skipped_total: Counter,
}

impl SubCounts {
    fn new(metrics: &BusMetrics, dispatch: &Dispatch) -> Self {
        let series = |outcome: &str| {
            let labels = vec![("adapter", dispatch.kind().to_string()), ("outcome", outcome.to_string())];
            metrics.deliveries.get_or_create(&labels).clone()
        };
        SubCounts {
            received: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            delivered_total: series("delivered"),
            failed_total: series("failed"),
            skipped_total: series("skipped"),
        }
    }
}

struct Sub {
    id: SubId,
    /// The cluster-wide route it mirrors; such subscriptions are not advertised to other nodes
    /// (every node has the mirror and delivers what it publishes itself).
    route_id: Option<u64>,
    pattern: String,
    dispatch: Dispatch,
    priority: i32,
    overflow: Overflow,
    queue_len_max: usize,
    route: RouteId,
    breaker: Option<Arc<Mutex<Breaker>>>,
    queue: Mutex<Queue>,
    notify: Notify,
    /// Cancelled by `unsubscribe` and by the bus's shutdown: ends an in-flight delivery.
    cancel: CancellationToken,
    counts: SubCounts,
}

/// A subscriber's queue: signals with their size, the bytes held, and whether it is closed
/// (after which nothing is added; checked under the same lock as the push).
#[derive(Default)]
struct Queue {
    items: VecDeque<(Arc<Signal>, usize)>,
    bytes: usize,
    closed: bool,
}

impl Sub {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn target(&self) -> Target<'_> {
        Target { id: self.id, pattern: &self.pattern }
    }
}

struct BusMetrics {
    published: Counter,
    rejected: CounterFamily,
    unrouted: Counter,
    deliveries: CounterFamily,
    queue_dropped: CounterFamily,
    deadletters: Counter,
    middleware_over_budget: CounterFamily,
    subscriptions: Gauge,
    webhook_attempts: CounterFamily,
    breaker_opened: Counter,
    pool_deliveries: CounterFamily,
}

impl BusMetrics {
    fn new(m: &Metrics) -> Self {
        Self {
            published: m.counter("signals_published", "Signals accepted by the bus"),
            rejected: m.counters("signals_rejected", "Signals refused at publish, by reason"),
            unrouted: m.counter("signals_unrouted", "Published signals no subscription matched"),
            deliveries: m.counters("deliveries", "Deliveries to subscribers, by adapter and outcome"),
            queue_dropped: m.counters("queue_dropped", "Entries dropped from full drop-oldest queues, by queue"),
            deadletters: m.counter("deadletters", "Deliveries given up and dead-lettered"),
            middleware_over_budget: m.counters("middleware_over_budget", "Middleware calls over budget or panicking"),
            subscriptions: m.gauge("subscriptions", "Subscriptions on this node"),
            webhook_attempts: m.counters("webhook_attempts", "Webhook requests, by outcome"),
            breaker_opened: m.counter("breaker_opened", "Times a webhook breaker opened"),
            pool_deliveries: m.counters("pool_deliveries", "Pool deliveries, by where the agent was (local, remote)"),
        }
    }
}

pub(crate) struct Inner {
    cfg: SignalsConfig,
    source: Arc<str>,
    router: RwLock<Router<SubId, Signal>>,
    subs: RwLock<HashMap<SubId, Arc<Sub>>>,
    breakers: Mutex<HashMap<String, Arc<Mutex<Breaker>>>>,
    next_id: AtomicU64,
    /// Replaced whole on change, so a publish takes it with one `Arc` clone.
    middleware: RwLock<Arc<Vec<Arc<dyn Middleware>>>>,
    journal: Journal,
    /// The cluster side, once the node has a transport and membership.
    remote: OnceLock<Arc<remote::Remote>>,
    /// The agents of the cluster, for agent and pool deliveries.
    cluster: OnceLock<crate::cluster::Cluster>,
    /// Routes of a routes file to add once the node is in a cluster.
    pending_routes: Mutex<Vec<crate::meta::AgentRoute>>,
    /// Counts changes of the subscriptions (to await a route's mirror).
    subs_changed: tokio::sync::watch::Sender<u64>,
    /// Other nodes' waits for a route's mirror here (see [`remote::ROUTE_WAITS_MAX`]).
    route_waits: Arc<tokio::sync::Semaphore>,
    deadletters: Mutex<DeadLetters>,
    /// Bytes held by all subscriber queues (`queued_bytes_max`).
    queued_bytes: AtomicUsize,
    http: webhook::Client,
    metrics: BusMetrics,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// The node's bus; cheap to clone. Stop it with [`Bus::shutdown`].
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

/// A subscription that ends when dropped (or [`Subscription::cancel`]led); [`Subscription::detach`]
/// keeps it until deleted by id.
pub struct Subscription {
    id: SubId,
    bus: Weak<Inner>,
}

impl Subscription {
    pub fn id(&self) -> SubId {
        self.id
    }
    /// Keeps the subscription after this handle is gone; returns its id.
    pub fn detach(mut self) -> SubId {
        self.bus = Weak::new();
        self.id
    }
    pub fn cancel(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            Bus { inner }.unsubscribe(self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// A [`Bus`] reference that does not keep it alive (for callbacks the bus itself reaches).
#[derive(Clone)]
pub struct WeakBus(Weak<Inner>);

impl WeakBus {
    pub fn upgrade(&self) -> Option<Bus> {
        self.0.upgrade().map(|inner| Bus { inner })
    }
}

impl Bus {
    pub fn downgrade(&self) -> WeakBus {
        WeakBus(Arc::downgrade(&self.inner))
    }

    /// A bus whose signals come from `source`. Must be created inside a tokio runtime.
    pub fn new(cfg: SignalsConfig, source: &str, metrics: &Metrics) -> Bus {
        let inner = Inner {
            journal: Journal::new(cfg.journal_len_max),
            remote: OnceLock::new(),
            cluster: OnceLock::new(),
            pending_routes: Mutex::new(Vec::new()),
            subs_changed: tokio::sync::watch::Sender::new(0),
            route_waits: Arc::new(tokio::sync::Semaphore::new(remote::ROUTE_WAITS_MAX)),
            http: webhook::client(),
            cfg,
            source: source.into(),
            router: RwLock::new(Router::new()),
            subs: RwLock::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            middleware: RwLock::new(Arc::new(Vec::new())),
            deadletters: Mutex::new(DeadLetters::default()),
            queued_bytes: AtomicUsize::new(0),
            metrics: BusMetrics::new(metrics),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        Bus { inner: Arc::new(inner) }
    }

    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Adds a middleware after those already added.
    pub fn add_middleware(&self, m: Arc<dyn Middleware>) {
        let mut list = write(&self.inner.middleware);
        let mut next = Vec::clone(&list);
        next.push(m);
        *list = Arc::new(next);
    }

    /// Subscribes; the subscription lasts as long as the returned handle.
    pub fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, SubscribeError> {
        let id = self.subscribe_detached(spec)?;
        Ok(Subscription { id, bus: Arc::downgrade(&self.inner) })
    }

    /// Subscribes until [`Bus::unsubscribe`].
    pub fn subscribe_detached(&self, spec: SubscriptionSpec) -> Result<SubId, SubscribeError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(SubscribeError::ShuttingDown);
        }
        let default_len = inner.cfg.subscriber_queue_len_max;
        let max = default_len * QUEUE_LEN_FACTOR_MAX;
        let queue_len_max = spec.queue_len_max.unwrap_or(default_len);
        if !(1..=max).contains(&queue_len_max) {
            return Err(SubscribeError::QueueLen { len: queue_len_max, max });
        }
        if let Dispatch::Webhook(w) = &spec.dispatch {
            w.validate().map_err(SubscribeError::Dispatch)?;
        }
        if matches!(spec.dispatch, Dispatch::Agent(_)) && spec.route.is_none() {
            return Err(SubscribeError::Dispatch(
                "agent and pool targets are cluster-wide routes (Bus::add_route)".into(),
            ));
        }
        // Lock order: subs, then router, then breakers.
        let mut subs = write(&inner.subs);
        if subs.len() >= inner.cfg.subscriptions_max {
            return Err(SubscribeError::TooMany(subs.len()));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut route = RouteSpec::new(spec.pattern.clone(), id).priority(spec.priority);
        route.predicate = spec.predicate;
        let route = write(&inner.router).add(route)?;
        // Taken under the subs lock, as `unsubscribe` forgets unused breakers under it.
        let breaker = match &spec.dispatch {
            Dispatch::Webhook(w) => Some(self.breaker_for(&w.url)),
            _ => None,
        };
        let counts = SubCounts::new(&inner.metrics, &spec.dispatch);
        let sub = Arc::new(Sub {
            id,
            route_id: spec.route,
            pattern: spec.pattern,
            dispatch: spec.dispatch,
            priority: spec.priority,
            overflow: spec.overflow,
            queue_len_max,
            route,
            breaker,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            cancel: inner.cancel.child_token(),
            counts,
        });
        subs.insert(id, sub.clone());
        inner.metrics.subscriptions.set(subs.len() as i64);
        drop(subs);
        inner.tasks.spawn(worker(self.inner.clone(), sub));
        self.advertise();
        Ok(id)
    }

    fn breaker_for(&self, url: &str) -> Arc<Mutex<Breaker>> {
        lock(&self.inner.breakers)
            .entry(url.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Breaker::new())))
            .clone()
    }

    /// Subscribes every target of a routes table (a node's `--routes` file): each target must be
    /// a dispatch object. All or nothing: on an error no subscription is left behind.
    ///
    /// Agent and pool targets are cluster-wide routes: they are added to the cluster once the
    /// node is in one (again and again until the metadata group takes them; adding a route that
    /// exists changes nothing, so every node may load the same file).
    pub fn subscribe_table(&self, table: &Table) -> Result<Vec<SubId>, RoutesError> {
        table.router::<()>()?;
        let mut specs = Vec::new();
        let mut routes = Vec::new();
        for (index, r) in table.routes.iter().enumerate() {
            let err = |reason: String| RoutesError::Target { index, path: r.path.clone(), reason };
            for t in r.target.to_vec() {
                let dispatch: DispatchSpec = match t {
                    table::Target::Object(m) => serde_json::from_value(serde_json::Value::Object(m))
                        .map_err(|e| err(format!("not a dispatch configuration: {e}")))?,
                    table::Target::Name(n) => {
                        return Err(err(format!(
                            "\"{n}\" is a name; a node needs a dispatch such as {{\"log\":{{}}}}"
                        )));
                    }
                };
                if let DispatchSpec::Webhook(w) = &dispatch {
                    w.validate().map_err(err)?;
                }
                match dispatch.into_dispatch() {
                    Ok(d) => specs.push((index, SubscriptionSpec::new(r.path.clone(), d).priority(r.priority))),
                    Err(target) => {
                        let route = crate::meta::AgentRoute { pattern: r.path.clone(), target };
                        route.check().map_err(err)?;
                        routes.push(route);
                    }
                }
            }
        }
        let mut ids = Vec::new();
        for (index, spec) in specs {
            let path = spec.pattern.clone();
            match self.subscribe_detached(spec) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.unsubscribe(id);
                    }
                    return Err(RoutesError::Target { index, path, reason: e.to_string() });
                }
            }
        }
        lock(&self.inner.pending_routes).extend(routes);
        Ok(ids)
    }

    /// Ends a subscription; signals still queued for it are dropped (counted). False if unknown.
    pub fn unsubscribe(&self, id: SubId) -> bool {
        let inner = &self.inner;
        let Some(sub) = write(&inner.subs).remove(&id) else { return false };
        write(&inner.router).remove(sub.route);
        sub.cancel.cancel();
        {
            let mut q = sub.lock_queue();
            q.closed = true;
            let dropped = q.items.len() as u64;
            inner.release(q.bytes);
            q.items.clear();
            q.bytes = 0;
            sub.counts.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        sub.notify.notify_one();
        inner.metrics.subscriptions.set(read(&inner.subs).len() as i64);
        self.advertise();
        if let Dispatch::Webhook(w) = &sub.dispatch {
            // Forget the URL's breaker once no subscription uses it (the map stays bounded).
            let subs = read(&inner.subs);
            let in_use = subs.values().any(|s| matches!(&s.dispatch, Dispatch::Webhook(x) if x.url == w.url));
            if !in_use {
                lock(&inner.breakers).remove(&w.url);
            }
        }
        true
    }

    /// Publishes one signal at the default level (`eventual`); see [`Bus::publish_with`].
    pub async fn publish(&self, signal: Signal) -> Result<Published, PublishError> {
        self.publish_with(signal, Delivery::Eventual).await
    }

    /// Validates, runs the middleware, journals, and queues for this node's subscriptions; the
    /// signal as published and how many took it.
    async fn publish_local(&self, signal: Signal) -> Result<(Arc<Signal>, usize), PublishError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(PublishError::ShuttingDown);
        }
        let signal = self.prepare(signal).inspect_err(|e| self.count_rejected(e))?;
        let middleware = read(&inner.middleware).clone();
        for m in middleware.iter() {
            let verdict = budgeted(inner, "before_publish", async { m.before_publish(&signal).await }).await;
            if let Some(reason) = verdict.rejection() {
                let e = PublishError::Rejected { middleware: m.name().to_string(), reason };
                self.count_rejected(&e);
                return Err(e);
            }
        }
        inner.journal.record(&signal);
        let signal = Arc::new(signal);
        let targets: Vec<Arc<Sub>> = {
            let subs = read(&inner.subs);
            let router = read(&inner.router);
            match router.route(&signal.ty, &signal) {
                Ok(ids) => ids.into_iter().filter_map(|id| subs.get(id).cloned()).collect(),
                Err(_) => Vec::new(),
            }
        };
        if targets.is_empty() {
            inner.metrics.unrouted.inc();
        }
        let size = signal.size_hint_bytes();
        let mut delivered = 0;
        let mut full = None;
        for sub in &targets {
            match enqueue(inner, sub, &signal, size) {
                Enqueued::Yes => delivered += 1,
                // Unsubscribed since it was routed: as if it had not matched.
                Enqueued::Closed => {}
                Enqueued::Full => {
                    full.get_or_insert(sub.id);
                }
            }
        }
        if let Some(subscription) = full {
            let e = PublishError::QueueFull { subscription, delivered };
            self.count_rejected(&e);
            return Err(e);
        }
        Ok((signal, delivered))
    }

    /// Publishes one signal to the subscriptions of this node and, once the node is in a cluster,
    /// of every other node, at `delivery` (see [`remote`]). A signal refused by a full local queue
    /// goes to no other node.
    pub async fn publish_with(&self, signal: Signal, delivery: Delivery) -> Result<Published, PublishError> {
        let inner = &self.inner;
        let (signal, delivered) = self.publish_local(signal).await?;
        let remote_nodes = match inner.remote.get() {
            Some(r) => r.publish(&signal, delivery, delivered > 0).await.inspect_err(|e| self.count_rejected(e))?.nodes,
            None => 0,
        };
        inner.metrics.published.inc();
        Ok(Published { id: signal.id.clone(), deliveries: delivered, remote_nodes, delivery })
    }

    /// Publishes one signal to the subscriptions of every live node, whatever their patterns
    /// advertise (cache invalidation, configuration), through the broadcast tree (see
    /// [`broadcast`]): this node sends at most `broadcast_fanout` copies. Best effort (`weak`):
    /// returns once this node's copies are accepted, each unreachable node's share taken over.
    pub async fn broadcast(&self, signal: Signal) -> Result<Published, PublishError> {
        let inner = &self.inner;
        let (signal, delivered) = self.publish_local(signal).await?;
        let remote_nodes = match inner.remote.get() {
            Some(r) => r.broadcast(&signal).await.inspect_err(|e| self.count_rejected(e))?,
            None => 0,
        };
        inner.metrics.published.inc();
        Ok(Published { id: signal.id.clone(), deliveries: delivered, remote_nodes, delivery: Delivery::Weak })
    }

    /// Broadcast figures of this node: copies sent, and the most hops a broadcast took to reach it.
    pub fn broadcast_stats(&self) -> remote::BroadcastStats {
        self.inner.remote.get().map(|r| r.broadcast_stats()).unwrap_or_default()
    }

    /// Starts the cluster side: advertises this node's patterns and sends copies of what it
    /// publishes to the other interested nodes. Called once, by the node.
    pub(crate) fn start_remote(&self, parts: remote::RemoteParts) {
        let r = remote::Remote::start(parts, self.patterns());
        assert!(self.inner.remote.set(r).is_ok(), "the bus's remote side started twice");
    }

    /// The patterns of this node's node-bound subscriptions.
    fn patterns(&self) -> Vec<String> {
        read(&self.inner.subs).values().filter(|s| s.route_id.is_none()).map(|s| s.pattern.clone()).collect()
    }

    /// Tells the cluster side (and those awaiting a mirror) that the subscriptions changed.
    fn advertise(&self) {
        self.inner.subs_changed.send_modify(|n| *n += 1);
        if let Some(r) = self.inner.remote.get() {
            r.set_patterns(self.patterns());
        }
    }

    /// Other nodes this node would send a signal of type `ty` to.
    pub fn remote_nodes_for(&self, ty: &str) -> Vec<String> {
        self.inner.remote.get().map(|r| r.nodes_for(ty)).unwrap_or_default()
    }

    /// Waits until the other nodes interested in `ty` satisfy `cond` (the interest map converges
    /// through gossip); false if the bus has no cluster side or `timeout` passes first.
    pub async fn await_remote_nodes(&self, ty: &str, timeout: Duration, cond: impl Fn(&[String]) -> bool) -> bool {
        let Some(r) = self.inner.remote.get() else { return false };
        let mut rx = r.watch();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if cond(&r.nodes_for(ty)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// The interest map as this node holds it: each node's advertised patterns.
    pub fn interest(&self) -> Vec<interest::Entry> {
        self.inner.remote.get().map(|r| r.newer_than(&[])).unwrap_or_default()
    }

    /// Signal copies buffered for other nodes.
    pub fn remote_buffered(&self) -> usize {
        self.inner.remote.get().map_or(0, |r| r.buffered())
    }

    /// Serves a pub/sub ask from another node (payload starting with [`PUBSUB_TAG`]); returns
    /// the reply. Bad input is refused with a counted reason, never a panic.
    ///
    /// A batch of signals (up to `batch_len_max`, milliseconds of work) is taken on a task of its
    /// own and answered through [`crate::net::Transport::reply`], so the connection's reader goes
    /// on with other asks meanwhile; order holds, as a sender has one batch in flight. Other
    /// requests are answered at once (`Some`).
    pub fn on_pubsub_ask(&self, from: &crate::net::PeerInfo, id: u64, payload: bytes::Bytes) -> Option<bytes::Bytes> {
        let signals = payload.get(1) == Some(&remote::SIGNALS_VARIANT);
        let route_wait = payload.get(1) == Some(&remote::AWAIT_ROUTE_VARIANT);
        let transport = self.inner.remote.get().and_then(|r| r.transport());
        match (signals, route_wait, transport) {
            (true, _, Some(transport)) => {
                let (bus, from) = (self.clone(), from.clone());
                self.inner.tasks.spawn(async move {
                    let reply = bus.serve_pubsub(&from.name, &payload);
                    let _ = transport.reply(from.addr, id, reply);
                });
                None
            }
            (_, true, Some(transport)) => {
                let Ok(permit) = self.inner.route_waits.clone().try_acquire_owned() else {
                    // Over the limit: answered at once with what is mirrored now.
                    return Some(self.serve_pubsub(&from.name, &payload));
                };
                let Ok(remote::Req::AwaitRoute { id: route, timeout_ms }) =
                    postcard::from_bytes::<remote::Req<'_>>(&payload[1..])
                else {
                    return Some(self.serve_pubsub(&from.name, &payload));
                };
                let (bus, from) = (self.clone(), from.clone());
                self.inner.tasks.spawn(async move {
                    let wait = Duration::from_millis(timeout_ms.min(remote::ROUTE_WAIT_MS_MAX));
                    // Not past shutdown: answered "not mirrored" then.
                    let count = tokio::select! {
                        mirrored = bus.await_mirror(route, wait) => u32::from(mirrored),
                        () = bus.inner.cancel.cancelled() => 0,
                    };
                    let _ = transport.reply(from.addr, id, remote::encode(&remote::Reply::Accepted { count }));
                    drop(permit);
                });
                None
            }
            _ => Some(self.serve_pubsub(&from.name, &payload)),
        }
    }

    fn serve_pubsub(&self, from: &str, payload: &[u8]) -> bytes::Bytes {
        let Some(r) = self.inner.remote.get() else {
            return remote::encode(&remote::Reply::Refused("not in a cluster yet".into()));
        };
        let req = match payload.strip_prefix(&[PUBSUB_TAG]).map(postcard::from_bytes::<remote::Req<'_>>) {
            Some(Ok(req)) => req,
            _ => {
                warn!(%from, "undecodable pub/sub request");
                r.count_refused("undecodable");
                return remote::encode(&remote::Reply::Refused("undecodable request".into()));
            }
        };
        let reply = match req {
            remote::Req::Signals { signals } => {
                let mut count = 0u32;
                for body in signals {
                    match crate::signal::codec::decode_structured(body) {
                        Ok(signal) => {
                            let signal = Arc::new(signal);
                            if !r.take_once(&signal, || self.deliver_remote(&signal)) {
                                break;
                            }
                        }
                        // Taken as done: sending it again would not make it valid.
                        Err(e) => {
                            warn!(%from, error = %e, "invalid signal from another node");
                            r.count_refused("invalid_signal");
                        }
                    }
                    count += 1;
                }
                remote::Reply::Accepted { count }
            }
            remote::Req::Broadcast { hops, rest, signal } => {
                match crate::signal::codec::decode_structured(signal) {
                    Ok(decoded) => {
                        let decoded = Arc::new(decoded);
                        // Best effort: a full queue here does not stop the others' copies.
                        r.take_once(&decoded, || self.deliver_remote(&decoded));
                        r.forward_broadcast(bytes::Bytes::copy_from_slice(signal), hops, rest);
                        remote::Reply::Accepted { count: 1 }
                    }
                    Err(e) => {
                        warn!(%from, error = %e, "invalid broadcast signal from another node");
                        r.count_refused("invalid_signal");
                        remote::Reply::Refused(format!("invalid signal: {e}"))
                    }
                }
            }
            remote::Req::Interest(entry) => remote::Reply::Accepted { count: r.merge(vec![entry]) },
            remote::Req::Pull(digest) => remote::Reply::Entries(r.newer_than(&digest)),
            remote::Req::AwaitRoute { id, .. } => remote::Reply::Accepted { count: u32::from(self.mirrors(id)) },
        };
        remote::encode(&reply)
    }

    /// Routes a signal from another node to this node's subscriptions, all or none (see
    /// [`enqueue_all`]). False when a queue is full: the sender keeps it and tries again.
    ///
    /// Mirrors of cluster-wide routes are left out: the publishing node delivered to every route
    /// itself, so a copy sent here for this node's own subscriptions must not reach the route
    /// again (with a matching subscription on k other nodes, an agent would get k + 1 copies).
    fn deliver_remote(&self, signal: &Arc<Signal>) -> bool {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return false;
        }
        let mut targets: Vec<Arc<Sub>> = {
            let subs = read(&inner.subs);
            let router = read(&inner.router);
            match router.route(&signal.ty, signal) {
                Ok(ids) => {
                    ids.into_iter().filter_map(|id| subs.get(id).filter(|s| s.route_id.is_none()).cloned()).collect()
                }
                Err(_) => Vec::new(),
            }
        };
        targets.sort_by_key(|s| s.id);
        targets.dedup_by_key(|s| s.id);
        if !enqueue_all(inner, &targets, signal, signal.size_hint_bytes()) {
            inner.metrics.rejected.get_or_create(&label("reason", "remote_queue_full")).inc();
            return false;
        }
        inner.journal.record(signal);
        true
    }

    /// Waits (at most `timeout`) for the buffers to other nodes to empty: a graceful stop
    /// delivers what it acknowledged to the nodes that are reachable.
    pub async fn flush_remote(&self, timeout: Duration) {
        if let Some(r) = self.inner.remote.get() {
            r.flush(timeout).await;
        }
    }

    /// Publishes signals in order; one result per signal.
    pub async fn publish_all(&self, signals: Vec<Signal>) -> Vec<Result<Published, PublishError>> {
        let mut out = Vec::with_capacity(signals.len());
        for s in signals {
            out.push(self.publish(s).await);
        }
        out
    }

    /// Validates, and adds causality: the parent of the running handler, a trace.
    /// Validated after the extensions are added, so what is delivered is valid.
    fn prepare(&self, mut signal: Signal) -> Result<Signal, PublishError> {
        if let Some(parent) = Context::current_parent() {
            // A copy of the parent (or of a sibling) carries the grandparent's cause: replace it.
            let cause = signal.causation_id();
            if cause.is_none() || cause == parent.causation_id() {
                signal = signal.caused_by(&parent);
            }
        }
        if signal.extension(TRACEPARENT).is_none() {
            signal.extensions.insert(TRACEPARENT.into(), TraceParent::root().to_string());
        }
        signal.validate()?;
        Ok(signal)
    }

    /// Counts a signal refused as invalid before it reached the bus (at decoding).
    pub fn count_invalid(&self) {
        self.inner.metrics.rejected.get_or_create(&label("reason", "invalid")).inc();
    }

    fn count_rejected(&self, e: &PublishError) {
        let reason = match e {
            PublishError::Invalid(_) => "invalid",
            PublishError::Rejected { .. } => "middleware",
            PublishError::QueueFull { .. } => "queue_full",
            PublishError::BufferFull { .. } => "buffer_full",
            PublishError::TooLarge { .. } => "too_large",
            PublishError::StrongUnmet { .. } => "strong_unmet",
            PublishError::ShuttingDown => "shutting_down",
        };
        self.inner.metrics.rejected.get_or_create(&label("reason", reason)).inc();
    }

    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let mut list: Vec<SubscriptionInfo> = read(&self.inner.subs).values().map(|s| info_of(s)).collect();
        list.sort_by_key(|s| s.id);
        list
    }

    pub fn subscription(&self, id: SubId) -> Option<SubscriptionInfo> {
        read(&self.inner.subs).get(&id).map(|s| info_of(s))
    }

    pub fn deadletters(&self) -> Vec<DeadLetter> {
        let list = lock(&self.inner.deadletters);
        let decode = |body: &[u8]| serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        list.items.iter().map(|(d, body, _)| DeadLetter { signal: decode(body), ..d.clone() }).collect()
    }

    /// The causality chain from a signal this node published; `None` if the journal lacks it.
    pub fn trace(&self, id: &str, direction: Direction) -> Option<Vec<TraceStep>> {
        self.inner.journal.trace(id, direction)
    }

    /// Stops the workers (after their current delivery) and waits for them.
    pub async fn shutdown(&self) {
        if let Some(r) = self.inner.remote.get() {
            r.shutdown().await;
        }
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

fn info_of(s: &Sub) -> SubscriptionInfo {
    SubscriptionInfo {
        id: s.id,
        pattern: s.pattern.clone(),
        dispatch: s.dispatch.describe(),
        priority: s.priority,
        overflow: s.overflow,
        queue_len_max: s.queue_len_max,
        queued: s.lock_queue().items.len(),
        received: s.counts.received.load(Ordering::Relaxed),
        delivered: s.counts.delivered.load(Ordering::Relaxed),
        failed: s.counts.failed.load(Ordering::Relaxed),
        dropped: s.counts.dropped.load(Ordering::Relaxed),
        skipped: s.counts.skipped.load(Ordering::Relaxed),
        breaker: s.breaker.as_ref().map(|b| lock(b).state_name().to_string()),
        route: s.route_id.map(|r| r.to_string()),
    }
}

enum Enqueued {
    Yes,
    Full,
    Closed,
}

impl Inner {
    /// Takes `bytes` from the node-wide queue budget, if there is room.
    fn try_reserve(&self, bytes: usize) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.cfg.queued_bytes_max {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release(&self, bytes: usize) {
        let before = self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more queue bytes than reserved");
    }
}

/// Appends to a subscriber's queue under its overflow policy and the byte budgets.
fn enqueue(inner: &Inner, sub: &Sub, signal: &Arc<Signal>, size: usize) -> Enqueued {
    let mut q = sub.lock_queue();
    if q.closed {
        return Enqueued::Closed;
    }
    loop {
        // One signal always fits an empty queue's own budget (not the node's).
        let over = q.items.len() >= sub.queue_len_max
            || (!q.items.is_empty() && q.bytes + size > inner.cfg.subscriber_queue_bytes_max);
        if !over && inner.try_reserve(size) {
            break;
        }
        if q.items.is_empty() || sub.overflow == Overflow::Reject {
            return Enqueued::Full;
        }
        drop_oldest(inner, sub, &mut q);
    }
    q.items.push_back((signal.clone(), size));
    q.bytes += size;
    sub.counts.received.fetch_add(1, Ordering::Relaxed);
    drop(q);
    sub.notify.notify_one();
    Enqueued::Yes
}

/// Drops a `drop_oldest` queue's oldest signal to make room (counted).
fn drop_oldest(inner: &Inner, sub: &Sub, q: &mut Queue) {
    let (_, bytes) = q.items.pop_front().expect("a queue without room is not empty");
    q.bytes -= bytes;
    inner.release(bytes);
    sub.counts.dropped.fetch_add(1, Ordering::Relaxed);
    inner.metrics.queue_dropped.get_or_create(&label("queue", "subscriber")).inc();
}

/// Appends a signal to every queue in `targets` (sorted by id, distinct) or to none: a `reject`
/// queue without room, or no room left in the node's budget, refuses it for all; `drop_oldest`
/// queues make room as their policy says. The queues are locked together in id order (elsewhere
/// one at a time, so this cannot deadlock).
fn enqueue_all(inner: &Inner, targets: &[Arc<Sub>], signal: &Arc<Signal>, size: usize) -> bool {
    let mut queues: Vec<(&Sub, std::sync::MutexGuard<'_, Queue>)> =
        targets.iter().map(|s| (&**s, s.lock_queue())).filter(|(_, q)| !q.closed).collect();
    let room = |sub: &Sub, q: &Queue| {
        q.items.len() < sub.queue_len_max
            && (q.items.is_empty() || q.bytes + size <= inner.cfg.subscriber_queue_bytes_max)
    };
    if queues.iter().any(|(sub, q)| sub.overflow == Overflow::Reject && !room(sub, q)) {
        return false;
    }
    if !inner.try_reserve(size * queues.len()) {
        return false;
    }
    for (sub, q) in queues.iter_mut() {
        while !room(sub, q) {
            drop_oldest(inner, sub, q);
        }
        q.items.push_back((signal.clone(), size));
        q.bytes += size;
        sub.counts.received.fetch_add(1, Ordering::Relaxed);
    }
    let subs: Vec<&Sub> = queues.iter().map(|(s, _)| *s).collect();
    drop(queues);
    for sub in subs {
        sub.notify.notify_one();
    }
    true
}

impl Verdict {
    fn rejection(self) -> Option<String> {
        match self {
            Verdict::Continue => None,
            Verdict::Reject(reason) => Some(reason),
        }
    }
}

/// Runs a middleware call within the budget; over budget or a panic is a rejection.
/// The future is polled (so even its synchronous start runs) inside the panic guard.
async fn budgeted(inner: &Inner, stage: &'static str, fut: impl std::future::Future<Output = Verdict>) -> Verdict {
    let budget = Duration::from_millis(inner.cfg.middleware_budget_ms);
    match tokio::time::timeout(budget, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", stage)).inc();
            Verdict::Reject("middleware panicked".into())
        }
        Err(_) => {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", stage)).inc();
            Verdict::Reject(format!("middleware exceeded its {}ms budget", budget.as_millis()))
        }
    }
}

/// A subscription's worker: takes its queue in order and delivers each signal.
async fn worker(inner: Arc<Inner>, sub: Arc<Sub>) {
    loop {
        let next = {
            let mut q = sub.lock_queue();
            if q.closed || sub.cancel.is_cancelled() {
                return;
            }
            q.items.pop_front().inspect(|(_, bytes)| q.bytes -= bytes)
        };
        let Some((signal, bytes)) = next else {
            tokio::select! {
                _ = sub.notify.notified() => continue,
                _ = sub.cancel.cancelled() => return,
            }
        };
        deliver_one(&inner, &sub, signal).await;
        // Counted until delivered: the signal is held until then.
        inner.release(bytes);
    }
}

async fn deliver_one(inner: &Inner, sub: &Sub, signal: Arc<Signal>) {
    let middleware = read(&inner.middleware).clone();
    for m in middleware.iter() {
        let verdict =
            budgeted(inner, "before_dispatch", async { m.before_dispatch(&signal, sub.target()).await }).await;
        if verdict.rejection().is_some() {
            sub.counts.skipped.fetch_add(1, Ordering::Relaxed);
            sub.counts.skipped_total.inc();
            return;
        }
    }
    let outcome = match &sub.dispatch {
        Dispatch::Log => {
            info!(subscription = sub.id, id = %signal.id, ty = %signal.ty, source = %signal.source, "signal");
            Outcome::Delivered { attempts: 1 }
        }
        Dispatch::Channel(tx) => tokio::select! {
            res = tx.send(signal.clone()) => match res {
                Ok(()) => Outcome::Delivered { attempts: 1 },
                Err(_) => Outcome::Failed { attempts: 1, reason: "channel closed".into() },
            },
            _ = sub.cancel.cancelled() => Outcome::Failed { attempts: 0, reason: "unsubscribed or shutting down".into() },
        },
        Dispatch::Function(f) => {
            let ctx = Context { source: inner.source.clone(), parent: Some(signal.clone()) };
            let parent = signal.clone();
            // Called inside the guard: a panic before the handler's first await is caught too.
            let call = AssertUnwindSafe(ctx.scope(async move { f(parent).await })).catch_unwind();
            tokio::select! {
                res = call => match res {
                    Ok(Ok(())) => Outcome::Delivered { attempts: 1 },
                    Ok(Err(reason)) => Outcome::Failed { attempts: 1, reason },
                    Err(_) => Outcome::Failed { attempts: 1, reason: "handler panicked".into() },
                },
                _ = sub.cancel.cancelled() => Outcome::Failed { attempts: 1, reason: "unsubscribed or shutting down".into() },
            }
        }
        Dispatch::Agent(target) => agents::deliver(inner, sub, target, &signal).await,
        Dispatch::Webhook(w) => {
            let breaker = sub.breaker.as_ref().expect("webhook subscriptions have a breaker");
            webhook::deliver(inner, w, breaker, &sub.cancel, &signal).await
        }
    };
    match &outcome {
        Outcome::Delivered { .. } => {
            sub.counts.delivered.fetch_add(1, Ordering::Relaxed);
            sub.counts.delivered_total.inc();
        }
        Outcome::Failed { attempts, reason } => {
            sub.counts.failed.fetch_add(1, Ordering::Relaxed);
            sub.counts.failed_total.inc();
            dead_letter(inner, sub, &signal, reason, *attempts);
        }
    }
    for m in middleware.iter() {
        let budget = Duration::from_millis(inner.cfg.middleware_budget_ms);
        let call = AssertUnwindSafe(async { m.after_dispatch(&signal, sub.target(), &outcome).await }).catch_unwind();
        if !matches!(tokio::time::timeout(budget, call).await, Ok(Ok(()))) {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", "after_dispatch")).inc();
        }
    }
}

fn dead_letter(inner: &Inner, sub: &Sub, signal: &Signal, reason: &str, attempts: u32) {
    const LETTER_OVERHEAD_BYTES: usize = 256;
    warn!(subscription = sub.id, id = %signal.id, reason, attempts, "delivery failed; dead-lettered");
    inner.metrics.deadletters.inc();
    let letter = DeadLetter {
        subscription: sub.id,
        dispatch: sub.dispatch.describe(),
        reason: reason.to_string(),
        attempts,
        time: crate::signal::now().with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        signal: serde_json::Value::Null,
    };
    let body = crate::signal::codec::encode_structured(signal);
    let size = body.len() + reason.len() + LETTER_OVERHEAD_BYTES;
    let mut list = lock(&inner.deadletters);
    while !list.items.is_empty()
        && (list.items.len() >= inner.cfg.deadletters_len_max || list.bytes + size > inner.cfg.deadletters_bytes_max)
    {
        let (_, _, old) = list.items.pop_front().expect("not empty");
        list.bytes -= old;
        inner.metrics.queue_dropped.get_or_create(&label("queue", "deadletters")).inc();
    }
    list.items.push_back((letter, body, size));
    list.bytes += size;
}

#[cfg(test)]
mod tests;
