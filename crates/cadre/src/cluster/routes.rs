//! Cluster-wide routes to agents, and where a pool delivery goes.
//!
//! Routes whose target is an agent ([`AgentRoute`]) live in the metadata group, so they outlive
//! any node, every node sees the same set, and adding one twice (each node loading one routes
//! file) gives one route (its id is a hash of its content). Every node's bus mirrors them as local
//! subscriptions and delivers what *it* publishes to the target agents: a signal goes from its
//! publisher straight to the agent's owner, never through the node that added the route.
//!
//! A pool delivery ([`AgentTarget::Pool`]) goes to one agent of the type, on this node when it
//! serves any shard (local first: no network hop). Otherwise it goes to the least-loaded node
//! among those that own shards, and among nodes about as loaded as that one (within
//! [`POOL_LOAD_SLACK_PCT`] %, or [`POOL_LOAD_SLACK_AGENTS`] agents) to the nearest by round-trip
//! time. A node's load is the number of agents active on it, asked of every member at most every
//! [`POOL_LOADS_REFRESH_MS`] by a background task while pool deliveries need it; until the first
//! answers, the nearest node is picked. The agent ids are found by probing `0, 1, 2, ...` for ids
//! whose shard the chosen node owns; [`POOL_KEYS_PER_NODE`] of them per node take turns, so pool
//! work spreads over several mailboxes.
//!
//! Caveats: a pool agent's id is tied to the shard table; after a rebalance the next delivery
//! finds new ids (an agent on the old owner passivates when idle). Loads are up to a refresh
//! interval old, so a burst from one node goes to one remote node until the next refresh.

use std::collections::HashMap;
use std::time::Duration;

use super::protocol::{ControlReply, ControlReq, RouteChange};
use super::{control, Cluster};
use crate::agent::{CallError, Unavailable};
use crate::meta::{AgentRoute, MetaState, ShardState};
use crate::placement::shard_of;
use crate::storage::Key;

/// Between two attempts of a route change while the leader is not known.
const LEADER_RETRY_MS: u64 = 100;
/// Agent ids per (pool type, node) that take turns.
pub const POOL_KEYS_PER_NODE: usize = 4;
/// Ids probed to find those of a node's shards (a node owning a 1/n share needs about n each).
pub const POOL_PROBES_MAX: usize = 1 << 16;
/// Oldest member loads a remote pool pick uses before asking again.
pub const POOL_LOADS_REFRESH_MS: u64 = 1000;
/// Time each member has to answer a load refresh.
const POOL_LOADS_TIMEOUT_MS: u64 = 500;
/// Nodes this much more loaded than the least-loaded one (in % of its load, or in agents,
/// whichever is larger) still count as about as loaded: the nearest of them is picked.
pub const POOL_LOAD_SLACK_PCT: u64 = 10;
pub const POOL_LOAD_SLACK_AGENTS: u64 = 8;

/// What pool picks remember: the keys found per (agent type, node) and the members' loads.
#[derive(Default)]
pub(super) struct PoolState {
    pub(super) keys: std::sync::Mutex<PoolKeys>,
    pub(super) loads: std::sync::Mutex<Loads>,
}

/// Agents active per member, as last asked (see [`Cluster::pool_pick`]).
#[derive(Default)]
pub struct Loads {
    active: HashMap<String, u64>,
    asked: Option<tokio::time::Instant>,
    refreshing: bool,
}

/// Pool ids found so far, and the turn counter.
#[derive(Default)]
pub struct PoolKeys {
    ids: HashMap<(String, String), Vec<String>>,
    turn: usize,
}

/// Where a pool delivery goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPick {
    pub key: Key,
    /// On this node.
    pub local: bool,
}

impl Cluster {
    /// Adds a cluster-wide route (through the leader); its id.
    pub async fn add_route(&self, route: AgentRoute) -> Result<u64, CallError> {
        route.check().map_err(CallError::InvalidRoute)?;
        self.route_change(RouteChange::Add(route)).await
    }

    /// Removes a cluster-wide route.
    pub async fn remove_route(&self, id: u64) -> Result<(), CallError> {
        self.route_change(RouteChange::Remove(id)).await.map(|_| ())
    }

    /// Sends a route change to the leader; while none is known (a node that just joined) or
    /// the one asked no longer leads, tries again every [`LEADER_RETRY_MS`] (callers bound the
    /// whole with a timeout).
    async fn route_change(&self, change: RouteChange) -> Result<u64, CallError> {
        loop {
            let e = match control::to_leader(&self.inner, ControlReq::Route(change.clone())).await {
                Ok(ControlReply::Route(Ok(id))) => return Ok(id),
                Ok(ControlReply::Route(Err(e))) | Err(e) => e,
                Ok(other) => {
                    return Err(CallError::Unavailable(Unavailable::Protocol(format!("unexpected reply {other:?}"))))
                }
            };
            if !e.leader_unknown() {
                return Err(CallError::Unavailable(Unavailable::Control(e)));
            }
            tokio::time::sleep(Duration::from_millis(LEADER_RETRY_MS)).await;
        }
    }

    /// The cluster-wide routes as this node's copy of the metadata has them.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // Internal API; no caller at present.
    pub fn routes(&self) -> Vec<(u64, AgentRoute)> {
        self.inner.state.borrow().routes.iter().map(|(id, r)| (*id, r.clone())).collect()
    }

    /// The agent a pool delivery of type `ty` goes to now; `None` while no node owns a shard.
    pub fn pool_pick(&self, ty: &str) -> Option<PoolPick> {
        let st = self.inner.state.borrow().clone();
        let me = self.inner.name.as_str();
        let owns = |node: &str| st.shards.iter().any(|e| serving(e, node));
        let node = if owns(me) && self.lease_valid() { me.to_string() } else { self.remote_owner(&st)? };
        let mut pool = self.inner.pools.keys.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (ty.to_string(), node.clone());
        let fresh = pool.ids.get(&slot).is_some_and(|ids| {
            !ids.is_empty() && ids.iter().all(|id| owner_serving(&st, &Key::new(ty, id.as_str()), &node))
        });
        if !fresh {
            let ids = find_ids(&st, ty, &node);
            // The map holds one entry per (type, node): types are registered, nodes are members.
            pool.ids.retain(|(t, n), _| st.members.contains_key(n) || t != ty);
            pool.ids.insert(slot.clone(), ids);
        }
        pool.turn = pool.turn.wrapping_add(1);
        let turn = pool.turn;
        let ids = &pool.ids[&slot];
        if ids.is_empty() {
            return None;
        }
        let id = ids[turn % ids.len()].clone();
        Some(PoolPick { key: Key::new(ty, id), local: node == me })
    }

    /// The member owning shards a pool delivery from this node goes to: least loaded, then
    /// nearest (see the module's note).
    fn remote_owner(&self, st: &MetaState) -> Option<String> {
        let loads = self.pool_loads();
        let me = self.inner.name.as_str();
        let owners = st.members.keys().filter(|n| *n != me && st.shards.iter().any(|e| serving(e, n)));
        let rtt_of = self.rtts();
        let candidates: Vec<Candidate> =
            owners.map(|n| Candidate { name: n.clone(), load: loads.get(n).copied(), rtt: rtt_of(n) }).collect();
        least_loaded_then_nearest(&candidates)
    }

    /// The members' loads as last asked; starts a refresh when they are older than
    /// [`POOL_LOADS_REFRESH_MS`] (one at a time, in the background).
    fn pool_loads(&self) -> HashMap<String, u64> {
        let now = tokio::time::Instant::now();
        let mut loads = self.inner.pools.loads.lock().unwrap_or_else(|e| e.into_inner());
        let stale = loads.asked.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(POOL_LOADS_REFRESH_MS));
        if stale && !loads.refreshing && !self.inner.cancel.is_cancelled() {
            loads.refreshing = true;
            let me = self.clone();
            self.inner.tasks.spawn(async move {
                let stats = me.stats(Duration::from_millis(POOL_LOADS_TIMEOUT_MS)).await;
                let active = stats.into_iter().filter_map(|(n, s)| Some((n, s?.active))).collect();
                let mut loads = me.inner.pools.loads.lock().unwrap_or_else(|e| e.into_inner());
                *loads = Loads { active, asked: Some(tokio::time::Instant::now()), refreshing: false };
            });
        }
        loads.active.clone()
    }
}

/// A node a remote pool delivery may go to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    /// Agents active on it, if known.
    pub load: Option<u64>,
    pub rtt: Option<Duration>,
}

/// The least-loaded candidate, and among those about as loaded (within [`POOL_LOAD_SLACK_PCT`]
/// % or [`POOL_LOAD_SLACK_AGENTS`] agents of the least) the nearest; ties by name. Candidates
/// whose load is unknown count only when no load is known.
pub fn least_loaded_then_nearest(candidates: &[Candidate]) -> Option<String> {
    let least = candidates.iter().filter_map(|c| c.load).min();
    let eligible = |c: &&Candidate| match (least, c.load) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(least), Some(load)) => {
            let slack = (least.saturating_mul(POOL_LOAD_SLACK_PCT) / 100).max(POOL_LOAD_SLACK_AGENTS);
            load <= least.saturating_add(slack)
        }
    };
    candidates
        .iter()
        .filter(eligible)
        .min_by_key(|c| (c.rtt.unwrap_or(Duration::MAX), c.name.clone()))
        .map(|c| c.name.clone())
}

fn serving(e: &crate::meta::ShardEntry, node: &str) -> bool {
    e.owner.as_deref() == Some(node) && e.state == ShardState::Active
}

fn owner_serving(st: &MetaState, key: &Key, node: &str) -> bool {
    st.shard_count > 0 && serving(&st.shards[shard_of(key, st.shard_count) as usize], node)
}

/// Up to [`POOL_KEYS_PER_NODE`] ids of type `ty` whose shards `node` serves.
fn find_ids(st: &MetaState, ty: &str, node: &str) -> Vec<String> {
    (0..POOL_PROBES_MAX)
        .map(|i| i.to_string())
        .filter(|id| owner_serving(st, &Key::new(ty, id.as_str()), node))
        .take(POOL_KEYS_PER_NODE)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, load: Option<u64>, rtt_us: Option<u64>) -> Candidate {
        Candidate { name: name.into(), load, rtt: rtt_us.map(Duration::from_micros) }
    }

    #[test]
    fn a_remote_pool_pick_is_the_least_loaded_then_the_nearest() {
        // The least loaded wins over a nearer node carrying much more.
        let picks = [c("near-busy", Some(500), Some(100)), c("far-idle", Some(10), Some(9000))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("far-idle"));
        // About as loaded (within the slack): the nearer one.
        let picks = [c("far", Some(100), Some(9000)), c("near", Some(109), Some(100)), c("busy", Some(400), Some(50))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("near"));
        // Small loads: the slack in agents applies (0 and 8 are alike, 9 is not).
        let picks = [c("a", Some(0), Some(900)), c("b", Some(8), Some(100))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("b"));
        let picks = [c("a", Some(0), Some(900)), c("b", Some(9), Some(100))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("a"));
        // Unknown loads: ignored when some are known; by RTT (then name) when none is.
        let picks = [c("unknown", None, Some(1)), c("known", Some(1000), Some(5000))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("known"));
        let picks = [c("y", None, None), c("x", None, None), c("z", None, Some(700))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("z"));
        assert_eq!(least_loaded_then_nearest(&picks[..2]).as_deref(), Some("x"));
        assert_eq!(least_loaded_then_nearest(&[]), None);
        // No overflow at the top of the range.
        let picks = [c("max", Some(u64::MAX), Some(1)), c("less", Some(u64::MAX - 1), Some(2))];
        assert_eq!(least_loaded_then_nearest(&picks).as_deref(), Some("max"));
    }
}
