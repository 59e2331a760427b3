//! Per-node metrics registry.
//!
//! Each node owns one registry (several nodes share a process in simulations and tests, so a
//! global recorder would mix them up). Components register their metrics at start and keep the
//! metric handles; hot paths touch only atomics. `GET /metrics` renders the registry as Prometheus
//! text. We use `prometheus-client` rather than the `metrics` facade because it gives per-instance
//! registries and readable values (benchmarks and tests read counters back).

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set used by every labelled metric: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;
/// Counters by label set.
pub type CounterFamily = Family<Labels, Counter>;
/// Integer gauges by label set.
pub type GaugeFamily = Family<Labels, Gauge>;
/// Floating-point gauges by label set.
pub type FloatGaugeFamily = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// A node's metrics registry ([`Node::metrics`](crate::Node::metrics)); cheap to clone. An
/// application may register its own metrics in it: they are served with the node's on
/// `GET /metrics`.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// An empty registry whose metric names are prefixed `cadre_`.
    pub fn new() -> Self {
        Self { registry: Arc::new(Mutex::new(Registry::with_prefix("cadre"))) }
    }

    /// Registers a family of counters under `name` (prefixed `cadre_`, suffixed `_total`).
    pub fn counters(&self, name: &str, help: &str) -> CounterFamily {
        let family = CounterFamily::default();
        self.lock().register(name, help, family.clone());
        family
    }

    /// Registers one counter without labels.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.lock().register(name, help, c.clone());
        c
    }

    /// Registers one integer gauge without labels.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.lock().register(name, help, g.clone());
        g
    }

    /// Registers a family of integer gauges under `name`.
    pub fn gauges(&self, name: &str, help: &str) -> GaugeFamily {
        let family = GaugeFamily::default();
        self.lock().register(name, help, family.clone());
        family
    }

    /// Registers a family of floating-point gauges under `name`.
    pub fn float_gauges(&self, name: &str, help: &str) -> FloatGaugeFamily {
        let family = FloatGaugeFamily::default();
        self.lock().register(name, help, family.clone());
        family
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock()).expect("writing into a String cannot fail");
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the registry inconsistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shorthand for a one-label set.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}
