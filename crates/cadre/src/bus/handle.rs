//! The [`Bus`] handle and what it shares: `Inner` (configuration, router, subscriptions,
//! middleware, journal, dead letters, the queue budget, the cluster side of a node's bus), the
//! bus's metrics, and [`WeakBus`] for callbacks the bus itself reaches.
//!
//! A bus is built standalone ([`Bus::new`]) or as a node's ([`Bus::clustered`]), with its cluster
//! side (the [`remote`] side and the cluster's agents) given at construction.
//!
//! The other parts of the bus add their own `impl Bus` blocks (subscriptions, publishing,
//! delivery, the cluster side, agent routes); this holds the state they share, its creation and
//! its shutdown. The task tracker holds every worker and every task serving another node, so
//! [`Bus::shutdown`] waits for all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock, Weak};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::DeadLetters;
use super::subscription::Sub;
use super::webhook::{self, Breaker};
use super::{remote, write, Middleware, SubId};
use crate::cluster::WeakCluster;
use crate::config::SignalsConfig;
use crate::metrics::{CounterFamily, Metrics};
use crate::router::Router;
use crate::signal::journal::{Direction, Journal, TraceStep};
use crate::signal::Signal;

pub(super) struct BusMetrics {
    pub(super) published: Counter,
    pub(super) rejected: CounterFamily,
    pub(super) unrouted: Counter,
    pub(super) deliveries: CounterFamily,
    pub(super) queue_dropped: CounterFamily,
    pub(super) deadletters: Counter,
    pub(super) middleware_over_budget: CounterFamily,
    pub(super) subscriptions: Gauge,
    pub(super) webhook_attempts: CounterFamily,
    pub(super) breaker_opened: Counter,
    pub(super) pool_deliveries: CounterFamily,
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
    pub(super) cfg: SignalsConfig,
    pub(super) source: Arc<str>,
    pub(super) router: RwLock<Router<SubId, Signal>>,
    pub(super) subs: RwLock<HashMap<SubId, Arc<Sub>>>,
    pub(super) breakers: Mutex<HashMap<String, Arc<Mutex<Breaker>>>>,
    pub(super) next_id: AtomicU64,
    /// Replaced whole on change, so a publish takes it with one `Arc` clone.
    pub(super) middleware: RwLock<Arc<Vec<Arc<dyn Middleware>>>>,
    pub(super) journal: Journal,
    /// The cluster side (a node's bus; `None` standalone).
    pub(super) remote: Option<Arc<remote::Remote>>,
    /// The agents of the cluster, for agent and pool deliveries (a node's bus; `None` standalone).
    /// Weak: the bus and the cluster are built together, and the node keeps the cluster.
    pub(super) cluster: Option<WeakCluster>,
    /// Routes of a routes file to add once the node is in a cluster.
    pub(super) pending_routes: Mutex<Vec<crate::meta::AgentRoute>>,
    /// Counts changes of the subscriptions (to await a route's mirror).
    pub(super) subs_changed: tokio::sync::watch::Sender<u64>,
    /// Other nodes' waits for a route's mirror here (see [`remote::ROUTE_WAITS_MAX`]).
    pub(super) route_waits: Arc<tokio::sync::Semaphore>,
    pub(super) deadletters: Mutex<DeadLetters>,
    /// Bytes held by all subscriber queues (`queued_bytes_max`).
    pub(super) queued_bytes: AtomicUsize,
    pub(super) http: webhook::Client,
    pub(super) metrics: BusMetrics,
    pub(super) cancel: CancellationToken,
    pub(super) tasks: TaskTracker,
}

/// What a node's bus is built with ([`Bus::clustered`]).
pub(crate) struct ClusterSide {
    pub remote: remote::RemoteParts,
    pub cluster: WeakCluster,
}

/// The node's bus; cheap to clone. Stop it with [`Bus::shutdown`].
#[derive(Clone)]
pub struct Bus {
    pub(super) inner: Arc<Inner>,
}

/// A [`Bus`] reference that does not keep it alive (for callbacks the bus itself reaches).
#[derive(Clone)]
pub struct WeakBus(Weak<Inner>);

impl WeakBus {
    /// The bus, if it still exists.
    pub fn upgrade(&self) -> Option<Bus> {
        self.0.upgrade().map(|inner| Bus { inner })
    }
}

impl Bus {
    /// A reference that does not keep the bus alive.
    pub(crate) fn downgrade(&self) -> WeakBus {
        WeakBus(Arc::downgrade(&self.inner))
    }

    /// A standalone bus (no other nodes) whose signals come from `source`. Must be created
    /// inside a tokio runtime.
    pub fn new(cfg: SignalsConfig, source: &str, metrics: &Metrics) -> Bus {
        Bus::build(cfg, source, metrics, None)
    }

    /// A node's bus: its signals reach the other nodes (its [`remote`] side starts now, with no
    /// patterns to advertise yet), and its cluster-wide routes go to `side.cluster`'s agents
    /// once [`Bus::follow_routes`] runs.
    pub(crate) fn clustered(cfg: SignalsConfig, source: &str, metrics: &Metrics, side: ClusterSide) -> Bus {
        Bus::build(cfg, source, metrics, Some(side))
    }

    fn build(cfg: SignalsConfig, source: &str, metrics: &Metrics, side: Option<ClusterSide>) -> Bus {
        let (remote, cluster) = match side {
            Some(s) => (Some(remote::Remote::start(s.remote)), Some(s.cluster)),
            None => (None, None),
        };
        let inner = Inner {
            journal: Journal::new(cfg.journal_len_max),
            remote,
            cluster,
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

    /// The source of signals this bus makes.
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

    /// The causality chain from a signal this node published; `None` if the journal lacks it.
    pub fn trace(&self, id: &str, direction: Direction) -> Option<Vec<TraceStep>> {
        self.inner.journal.trace(id, direction)
    }

    /// Stops the workers (after their current delivery) and waits for them.
    pub async fn shutdown(&self) {
        if let Some(r) = &self.inner.remote {
            r.shutdown().await;
        }
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
