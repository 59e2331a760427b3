//! Subscriptions: what they are ([`SubscriptionSpec`], [`Dispatch`], [`Overflow`]), their JSON
//! forms, and how they come and go on a bus ([`Bus::subscribe`], [`Bus::subscribe_table`],
//! [`Bus::unsubscribe`]).
//!
//! A subscription is a route in the bus's router whose target is its id, plus a [`Sub`]: its
//! bounded queue, its counts and its worker task (see [`super::delivery`]). Webhook subscriptions
//! to one URL share its breaker; the breaker is forgotten with the last of them.
//!
//! Lock order: subscriptions, then router, then breakers. Agent and pool dispatches are mirrors
//! of cluster-wide routes (see [`super::agents`]): only the bus creates them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::future::BoxFuture;
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::delivery::worker;
use super::handle::BusMetrics;
use super::webhook::{Breaker, WebhookSpec};
use super::{lock, read, write, Bus, Inner, Target};
use crate::router::table::{self, Table, TableError};
use crate::router::{Predicate, RouteError, RouteId, RouteSpec};
use crate::signal::Signal;

/// Identifies a subscription on its node.
pub type SubId = u64;

/// A subscription queue may be at most this many times the configured default.
pub const QUEUE_LEN_FACTOR_MAX: usize = 16;

/// What a full subscriber queue does with a new signal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse the publish with [`PublishError::QueueFull`](super::PublishError::QueueFull).
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
    /// `bus::agents`); only the bus creates these.
    Agent(crate::meta::AgentTarget),
}

/// The JSON form of the dispatches that can be configured from outside (HTTP, routes files):
/// `{"log":{}}` or `{"webhook":{"url":"http://...","secret":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DispatchSpec {
    /// [`Dispatch::Log`].
    Log {},
    /// [`Dispatch::Webhook`].
    Webhook(WebhookSpec),
    /// A cluster-wide route to an agent: `{"agent":{"type":"order","key":"subject"}}`.
    Agent {
        /// The agent type.
        #[serde(rename = "type")]
        ty: String,
        /// What names the agent: `subject` (the signal's subject) or a JSON pointer into its
        /// data (`/order/id`).
        key: String,
    },
    /// A cluster-wide route to a pool of agents: `{"pool":{"type":"worker"}}`.
    Pool {
        /// The agent type.
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
    /// The pattern over signal types (`order.*`, `order.**`, `**`).
    pub pattern: String,
    /// Where the signals go.
    pub dispatch: Dispatch,
    /// Among the subscriptions a signal matches, higher priorities are served first (-100..=100).
    pub priority: i32,
    /// What a full queue does.
    pub overflow: Overflow,
    /// `None`: the node's `subscriber_queue_len_max`.
    pub queue_len_max: Option<usize>,
    /// Takes only the signals it is true for (besides the pattern).
    pub predicate: Option<Predicate<Signal>>,
    /// The cluster-wide route this subscription mirrors (set by the bus only).
    pub(super) route: Option<u64>,
}

impl SubscriptionSpec {
    /// Signals matching `pattern` to `dispatch`, at priority 0, rejecting when full, with the
    /// node's queue length.
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
    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    /// Sets what a full queue does.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }
    /// Sets the queue length (at most `QUEUE_LEN_FACTOR_MAX` (16) times the node's default).
    pub fn queue_len_max(mut self, len: usize) -> Self {
        self.queue_len_max = Some(len);
        self
    }
    /// Takes only the signals `p` is true for.
    pub fn predicate(mut self, p: impl Fn(&Signal) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(p));
        self
    }
}

/// The JSON body of `POST /v1/subscriptions` (and a route target in a routes file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionJson {
    /// See [`SubscriptionSpec::pattern`].
    pub pattern: String,
    /// Where the signals go.
    pub dispatch: DispatchSpec,
    /// See [`SubscriptionSpec::priority`].
    #[serde(default)]
    pub priority: i32,
    /// See [`SubscriptionSpec::overflow`].
    #[serde(default)]
    pub overflow: Overflow,
    /// See [`SubscriptionSpec::queue_len_max`].
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

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The pattern or the priority is invalid.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The dispatch is invalid (a webhook's URL, ...).
    #[error("dispatch: {0}")]
    Dispatch(String),
    /// The queue length is out of range.
    #[error("queue_len_max {len} must be within 1..={max}")]
    QueueLen {
        /// The length asked for.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The node has `signals.subscriptions_max` subscriptions already.
    #[error("the node has {0} subscriptions, its limit")]
    TooMany(usize),
    /// The bus is shutting down.
    #[error("the bus is shutting down")]
    ShuttingDown,
    /// A cluster-wide route could not be changed (no leader, refused by the metadata group).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Why a routes table cannot be subscribed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutesError {
    /// The table is invalid.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A route's target is not a dispatch configuration (or cannot be subscribed).
    #[error("route #{index} ({path}): {reason}")]
    Target {
        /// The route's position in the table (0-based).
        index: usize,
        /// The route's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A subscription as listed by `GET /v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    /// Its id on the node.
    pub id: SubId,
    /// Its pattern.
    pub pattern: String,
    /// Its dispatch, as [`Dispatch::describe`] shows it.
    pub dispatch: serde_json::Value,
    /// Its priority.
    pub priority: i32,
    /// What its full queue does.
    pub overflow: Overflow,
    /// Its queue's length limit.
    pub queue_len_max: usize,
    /// Signals in its queue now.
    pub queued: usize,
    /// Signals taken into its queue (each is then delivered, failed, dropped or skipped).
    #[serde(default)]
    pub received: u64,
    /// Signals delivered.
    pub delivered: u64,
    /// Signals whose delivery failed (dead-lettered).
    pub failed: u64,
    /// Signals dropped from a full queue ([`Overflow::DropOldest`]).
    pub dropped: u64,
    /// Signals taken but not delivered: a middleware rejected them before dispatch.
    pub skipped: u64,
    /// Breaker state of a webhook's URL: `closed`, `open` or `half_open`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
    /// The cluster-wide route it mirrors (agent and pool targets), as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// A subscription's own counts, plus its adapter's series in `deliveries` (looked up once).
pub(super) struct SubCounts {
    pub(super) received: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) delivered_total: Counter,
    pub(super) failed_total: Counter,
    pub(super) skipped_total: Counter,
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

pub(super) struct Sub {
    pub(super) id: SubId,
    /// The cluster-wide route it mirrors; such subscriptions are not advertised to other nodes
    /// (every node has the mirror and delivers what it publishes itself).
    pub(super) route_id: Option<u64>,
    pub(super) pattern: String,
    pub(super) dispatch: Dispatch,
    priority: i32,
    pub(super) overflow: Overflow,
    pub(super) queue_len_max: usize,
    route: RouteId,
    pub(super) breaker: Option<Arc<Mutex<Breaker>>>,
    queue: Mutex<Queue>,
    pub(super) notify: Notify,
    /// Cancelled by `unsubscribe` and by the bus's shutdown: ends an in-flight delivery.
    pub(super) cancel: CancellationToken,
    pub(super) counts: SubCounts,
}

/// A subscriber's queue: signals with their size, the bytes held, and whether it is closed
/// (after which nothing is added; checked under the same lock as the push).
#[derive(Default)]
pub(super) struct Queue {
    pub(super) items: VecDeque<(Arc<Signal>, usize)>,
    pub(super) bytes: usize,
    pub(super) closed: bool,
}

impl Sub {
    pub(super) fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn target(&self) -> Target<'_> {
        Target { id: self.id, pattern: &self.pattern }
    }
}

/// A subscription that ends when dropped (or [`Subscription::cancel`]led); [`Subscription::detach`]
/// keeps it until deleted by id.
pub struct Subscription {
    id: SubId,
    bus: Weak<Inner>,
}

impl Subscription {
    /// The subscription's id on its node.
    pub fn id(&self) -> SubId {
        self.id
    }
    /// Keeps the subscription after this handle is gone; returns its id.
    pub fn detach(mut self) -> SubId {
        self.bus = Weak::new();
        self.id
    }
    /// Ends the subscription (as dropping the handle does).
    pub fn cancel(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            Bus { inner }.unsubscribe(self.id);
        }
    }
}

impl Bus {
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
        self.subscribe_routes(RoutesPlan::of(table)?)
    }

    /// Subscribes what [`RoutesPlan::of`] read from a routes table (see [`Bus::subscribe_table`]).
    pub(crate) fn subscribe_routes(&self, plan: RoutesPlan) -> Result<Vec<SubId>, RoutesError> {
        let mut ids = Vec::new();
        for (index, spec) in plan.specs {
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
        lock(&self.inner.pending_routes).extend(plan.routes);
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

    /// Every subscription on this node, by id.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let mut list: Vec<SubscriptionInfo> = read(&self.inner.subs).values().map(|s| info_of(s)).collect();
        list.sort_by_key(|s| s.id);
        list
    }

    /// One subscription on this node.
    pub fn subscription(&self, id: SubId) -> Option<SubscriptionInfo> {
        read(&self.inner.subs).get(&id).map(|s| info_of(s))
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

/// A routes table read and checked, without a bus (a node checks its routes file before it
/// binds anything): the subscriptions to make, by the index of their route, and the cluster-wide
/// routes to add.
pub(crate) struct RoutesPlan {
    specs: Vec<(usize, SubscriptionSpec)>,
    routes: Vec<crate::meta::AgentRoute>,
}

impl RoutesPlan {
    /// Reads every target of `table`; each must be a dispatch object.
    pub(crate) fn of(table: &Table) -> Result<RoutesPlan, RoutesError> {
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
                        route.check().map_err(|e| err(e.to_string()))?;
                        routes.push(route);
                    }
                }
            }
        }
        Ok(RoutesPlan { specs, routes })
    }
}
