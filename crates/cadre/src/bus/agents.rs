//! Signals to agents: cluster-wide routes, mirrored on every node.
//!
//! A subscription whose target is an agent (`{"agent":{"type":"order","key":"subject"}}`) or a
//! pool (`{"pool":{"type":"worker"}}`) is a cluster-wide route kept in the metadata group (see
//! [`crate::cluster::routes`]). Every node's bus mirrors each route as a local subscription with
//! [`Dispatch::Agent`]; a signal published on any node is routed there like any other, and that
//! subscription's worker calls the agent wherever it lives, activating it if needed. So a signal
//! goes from its publisher to the agent's owner in one hop, in publish order (one call at a time
//! per route and publishing node), and a route outlives the node that added it.
//!
//! A delivery is a `call`: done once the agent handled the signal (and, write-through, stored its
//! state). A call refused because the shard is moving, its owner is unreachable or the mailbox is
//! full is tried again with back-off, at most `webhook_retries_max` times (each attempt bounded
//! by `webhook_timeout_ms`); a handler error is final. Either way a failure is dead-lettered.
//! A retry after a timeout (the first attempt may have run) is safe for an agent route: the agent
//! remembers the signals it handled ([`crate::agent::handled`]) and answers a repeat without
//! handling it again. A pool's retry may pick another agent, which does not know the signal.
//!
//! The key: the signal's `subject` (`key: "subject"`), or the string (or number) at a JSON pointer
//! into its data (`key: "/order/id"`); a signal without one is dead-lettered.
//!
//! Mirrors follow each node's copy of the metadata, so a route is not mirrored everywhere at the
//! same moment. [`Bus::add_route`] therefore answers once every live member confirms it mirrors
//! the route ([`super::remote::Req::AwaitRoute`]): a signal published anywhere after the answer
//! reaches it. Members that do not confirm in time (unreachable, behind) are named in the
//! answer; until they apply the route, what they publish does not reach it.
//!
//! Caveat: a node that joins or comes back later mirrors the route once it has caught up with the
//! metadata; what it publishes before then misses the route.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{Bus, Dispatch, Inner, Outcome, Sub, SubId, SubscribeError, SubscriptionSpec};
use crate::agent::CallError;
use crate::cluster::{Cluster, WeakCluster};
use crate::meta::{AgentRoute, AgentTarget};
use crate::metrics::label;
use crate::signal::{Data, Signal};
use crate::storage::Key;

/// Between two attempts to add the routes of a routes file while the cluster has no leader.
const INSTALL_RETRY_MS: u64 = 500;
/// Attempts per route of a routes file (about five minutes); then it is given up, logged.
const INSTALL_ATTEMPTS_MAX: u32 = 600;
/// Time one attempt may take (a route change waits for a leader to be known).
const INSTALL_ATTEMPT_MS: u64 = 2000;

/// What [`Bus::add_route`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAdded {
    /// The route's id (a hash of the route: adding it again gives the same one).
    pub id: u64,
    /// This node's mirror of it.
    pub sub: SubId,
    /// Members (of the metadata, or seen alive) that did not confirm they mirror it: not seen
    /// alive (not asked), unreachable, or not mirroring it within the timeout.
    pub unconfirmed: Vec<String>,
}

impl Bus {
    /// Starts following the cluster's routes: mirrors the cluster-wide routes as local
    /// subscriptions and adds the routes of a routes file. Called once, by the node, once its
    /// cluster runs (a standalone bus has none: nothing to follow).
    pub(crate) fn follow_routes(&self) {
        let Some(cluster) = self.inner.cluster.as_ref().and_then(WeakCluster::upgrade) else { return };
        self.inner.tasks.spawn(mirror_loop(self.clone(), cluster.clone()));
        let pending = std::mem::take(&mut *super::lock(&self.inner.pending_routes));
        if !pending.is_empty() {
            self.inner.tasks.spawn(install(self.clone(), cluster, pending));
        }
    }

    testing_pub! {
        /// Adds a cluster-wide route to an agent or pool and waits until this node mirrors it,
        /// then until every other member seen alive confirms it does (each wait within what is
        /// left of `timeout`, plus one `ack_timeout_ms` for an answer in transit); the members
        /// that did not (or were not asked) are in `RouteAdded::unconfirmed`.
        async fn add_route(&self, route: AgentRoute, timeout: Duration) -> Result<RouteAdded, SubscribeError> {
            crate::router::Path::parse(&route.pattern).map_err(|e| SubscribeError::Dispatch(e.to_string()))?;
            let deadline = tokio::time::Instant::now() + timeout;
            let cluster = self.cluster()?;
            let add = cluster.add_route(route);
            let id = match tokio::time::timeout(timeout, add).await {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => return Err(SubscribeError::Cluster(e.to_string())),
                Err(_) => return Err(SubscribeError::Cluster(format!("no answer from the leader within {timeout:?}"))),
            };
            let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.await_mirror(id, left()).await {
                let e = format!("route {id} added but not mirrored here within {timeout:?}");
                return Err(SubscribeError::Cluster(e));
            }
            // Removed again meanwhile (by another caller): say so rather than answer with no mirror.
            let Some(sub) = self.mirror_of(id) else {
                return Err(SubscribeError::Cluster(format!("route {id} was removed while being added")));
            };
            let members: Vec<String> = cluster.state().members.keys().cloned().collect();
            let unconfirmed = match self.inner.remote.as_ref() {
                Some(remote) => remote.await_route(id, members, left()).await,
                None => members.into_iter().filter(|n| n != cluster.name()).collect(),
            };
            if !unconfirmed.is_empty() {
                warn!(route = id, ?unconfirmed, "route added; these members did not confirm they mirror it in time");
            }
            Ok(RouteAdded { id, sub, unconfirmed })
        }
    }

    testing_pub! {
        /// Whether this node mirrors route `id` now.
        fn mirrors(&self, id: u64) -> bool {
            self.mirror_of(id).is_some()
        }
    }

    /// Waits until this node mirrors route `id` (at most `timeout`); whether it does.
    pub(crate) async fn await_mirror(&self, id: u64, timeout: Duration) -> bool {
        self.await_mirrored(id, true, timeout).await
    }

    testing_pub! {
        /// Waits until this node no longer mirrors route `id` (at most `timeout`); whether it does
        /// not.
        async fn await_unmirrored(&self, id: u64, timeout: Duration) -> bool {
            self.await_mirrored(id, false, timeout).await
        }
    }

    async fn await_mirrored(&self, id: u64, present: bool, timeout: Duration) -> bool {
        let mut rx = self.inner.subs_changed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if self.mirror_of(id).is_some() == present {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    testing_pub! {
        /// Removes the cluster-wide route `id` (on every node).
        async fn remove_route(&self, id: u64, timeout: Duration) -> Result<(), SubscribeError> {
            let cluster = self.cluster()?;
            match tokio::time::timeout(timeout, cluster.remove_route(id)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SubscribeError::Cluster(e.to_string())),
                Err(_) => Err(SubscribeError::Cluster(format!("no answer from the leader within {timeout:?}"))),
            }
        }
    }

    /// The route a local subscription mirrors, if it is a mirror.
    pub(crate) fn route_of(&self, sub: SubId) -> Option<u64> {
        super::read(&self.inner.subs).get(&sub).and_then(|s| s.route_id)
    }

    fn mirror_of(&self, route: u64) -> Option<SubId> {
        super::read(&self.inner.subs).values().find(|s| s.route_id == Some(route)).map(|s| s.id)
    }

    fn cluster(&self) -> Result<Cluster, SubscribeError> {
        let weak = self.inner.cluster.as_ref();
        let weak = weak.ok_or_else(|| SubscribeError::Cluster("the node is not in a cluster yet".into()))?;
        weak.upgrade().ok_or(SubscribeError::ShuttingDown)
    }
}

/// Keeps one local subscription per cluster-wide route.
async fn mirror_loop(bus: Bus, cluster: Cluster) {
    let mut rx = cluster.watch();
    let mut mirrored: HashMap<u64, SubId> = HashMap::new();
    loop {
        let routes = rx.borrow_and_update().routes.clone();
        mirror(&bus, &routes, &mut mirrored);
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = bus.inner.cancel.cancelled() => return,
        }
    }
}

fn mirror(bus: &Bus, routes: &BTreeMap<u64, AgentRoute>, mirrored: &mut HashMap<u64, SubId>) {
    mirrored.retain(|id, sub| {
        let keep = routes.contains_key(id);
        if !keep {
            bus.unsubscribe(*sub);
        }
        keep
    });
    for (id, route) in routes {
        if mirrored.contains_key(id) {
            continue;
        }
        let mut spec = SubscriptionSpec::new(route.pattern.clone(), Dispatch::Agent(route.target.clone()));
        spec.route = Some(*id);
        match bus.subscribe_detached(spec) {
            Ok(sub) => {
                mirrored.insert(*id, sub);
            }
            Err(e) => {
                warn!(route = id, pattern = %route.pattern, error = %e, "cannot mirror a cluster-wide route");
                bus.inner.metrics.rejected.get_or_create(&label("reason", "route_not_mirrored")).inc();
            }
        }
    }
}

/// Adds the routes of a routes file, trying again until the metadata group takes each.
async fn install(bus: Bus, cluster: Cluster, routes: Vec<AgentRoute>) {
    for route in routes {
        for attempt in 1..=INSTALL_ATTEMPTS_MAX {
            let add = tokio::time::timeout(Duration::from_millis(INSTALL_ATTEMPT_MS), cluster.add_route(route.clone()));
            let added = tokio::select! {
                r = add => r.unwrap_or_else(|_| Err(CallError::Timeout(Duration::from_millis(INSTALL_ATTEMPT_MS)))),
                _ = bus.inner.cancel.cancelled() => return,
            };
            match added {
                Ok(id) => {
                    info!(route = id, pattern = %route.pattern, "cluster-wide route added");
                    break;
                }
                Err(e) if attempt == INSTALL_ATTEMPTS_MAX => {
                    warn!(pattern = %route.pattern, error = %e, "cluster-wide route given up");
                    bus.inner.metrics.rejected.get_or_create(&label("reason", "route_not_added")).inc();
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(INSTALL_RETRY_MS)) => {}
                _ = bus.inner.cancel.cancelled() => return,
            }
        }
    }
}

/// Delivers one signal to the agent a route names (see the module doc for retries).
pub(super) async fn deliver(inner: &Inner, sub: &Sub, target: &AgentTarget, signal: &Arc<Signal>) -> Outcome {
    let Some(cluster) = inner.cluster.as_ref().and_then(WeakCluster::upgrade) else {
        return Outcome::Failed { attempts: 0, reason: "the node is not in a cluster".into() };
    };
    let timeout = Duration::from_millis(inner.cfg.webhook_timeout_ms);
    let mut backoff = Duration::from_millis(inner.cfg.webhook_backoff_min_ms);
    let attempts_max = inner.cfg.webhook_retries_max + 1;
    let mut last = String::new();
    for attempt in 1..=attempts_max {
        let key = match key_of(&cluster, target, signal) {
            Ok(k) => k,
            Err(reason) => return Outcome::Failed { attempts: attempt - 1, reason },
        };
        if let AgentTarget::Pool { .. } = target {
            let place = if key.1 { "local" } else { "remote" };
            inner.metrics.pool_deliveries.get_or_create(&label("where", place)).inc();
        }
        let call = cluster.call(&key.0, Signal::clone(signal), timeout);
        let result = tokio::select! {
            r = call => r,
            _ = sub.cancel.cancelled() => return Outcome::Failed { attempts: attempt, reason: "unsubscribed or shutting down".into() },
        };
        match result {
            // Handled before (an earlier attempt whose answer was lost): it took effect.
            Ok(_) | Err(CallError::Duplicate) => return Outcome::Delivered { attempts: attempt },
            Err(e) if !retryable(&e) => return Outcome::Failed { attempts: attempt, reason: e.to_string() },
            Err(e) => last = e.to_string(),
        }
        if attempt < attempts_max {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = sub.cancel.cancelled() => return Outcome::Failed { attempts: attempt, reason: "unsubscribed or shutting down".into() },
            }
            backoff = (backoff * 2).min(Duration::from_millis(inner.cfg.webhook_backoff_max_ms));
        }
    }
    Outcome::Failed { attempts: attempts_max, reason: last }
}

/// Calls that may succeed later: the shard moves, its owner is away, the mailbox is full.
fn retryable(e: &CallError) -> bool {
    matches!(
        e,
        CallError::NotOwner { .. } | CallError::Unavailable(_) | CallError::Timeout(_) | CallError::MailboxFull(_)
    )
}

/// The key a signal goes to, and whether it is on this node (pools only).
fn key_of(cluster: &Cluster, target: &AgentTarget, signal: &Signal) -> Result<(Key, bool), String> {
    match target {
        AgentTarget::Pool { ty } => match cluster.pool_pick(ty) {
            Some(p) => Ok((p.key, p.local)),
            None => Err(format!("no node serves {ty} agents yet")),
        },
        AgentTarget::Agent { ty, key } => agent_key(ty, key, signal).map(|k| (k, false)),
    }
}

/// The agent of type `ty` a signal names: by its subject, or by a JSON pointer into its data.
fn agent_key(ty: &str, key: &str, signal: &Signal) -> Result<Key, String> {
    if key == "subject" {
        return match &signal.subject {
            Some(s) if !s.is_empty() => Ok(Key::new(ty, s.as_str())),
            _ => Err("the signal has no subject to take the agent's key from".into()),
        };
    }
    let Some(Data::Json(data)) = &signal.data else {
        return Err(format!("the signal has no JSON data to take the key {key} from"));
    };
    match data.pointer(key) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Key::new(ty, s.as_str())),
        Some(serde_json::Value::Number(n)) => Ok(Key::new(ty, n.to_string())),
        _ => Err(format!("no string or number at {key} in the signal's data")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_the_subject_or_a_pointer_into_the_data() {
        let s = Signal::new("order.placed", serde_json::json!({"order": {"id": "o-7", "n": 42}, "empty": ""}));
        assert_eq!(agent_key("order", "subject", &s.clone().with_subject("o-1")), Ok(Key::new("order", "o-1")));
        assert!(agent_key("order", "subject", &s).is_err(), "no subject");
        assert_eq!(agent_key("order", "/order/id", &s), Ok(Key::new("order", "o-7")));
        assert_eq!(agent_key("order", "/order/n", &s), Ok(Key::new("order", "42")));
        for missing in ["/order", "/nope", "/empty"] {
            assert!(agent_key("order", missing, &s).is_err(), "{missing}");
        }
        let binary = s.with_binary("application/octet-stream", vec![1u8, 2]);
        assert!(agent_key("order", "/order/id", &binary).is_err(), "not JSON");
    }
}
