//! Cluster-wide routes to agents, and where a pool delivery goes.
//!
//! Routes whose target is an agent ([`AgentRoute`]) live in the metadata group, so they outlive
//! any node, every node sees the same set, and adding one twice (each node loading one routes
//! file) gives one route (its id is a hash of its content). Every node's bus mirrors them as local
//! subscriptions and delivers what *it* publishes to the target agents: a signal goes from its
//! publisher straight to the agent's owner, never through the node that added the route.
//!
//! A pool delivery ([`AgentTarget::Pool`]) goes to one agent of the type, on this node when it
//! serves any shard (local first: no network hop), otherwise on the node nearest by round-trip
//! time among those that own shards. The agent ids are found by probing `0, 1, 2, ...` for ids
//! whose shard the chosen node owns; [`POOL_KEYS_PER_NODE`] of them per node take turns, so pool
//! work spreads over several mailboxes.
//!
//! Caveat: a pool agent's id is tied to the shard table; after a rebalance the next delivery
//! finds new ids (an agent on the old owner passivates when idle).

use std::collections::HashMap;
use std::time::Duration;

use super::{control, Cluster};
use crate::agent::CallError;
use crate::meta::raft::{ControlReply, ControlReq, RouteChange};
use crate::meta::{AgentRoute, MetaState, ShardState};
use crate::placement::shard_of;
use crate::storage::Key;

/// Between two attempts of a route change while the leader is not known.
const LEADER_RETRY_MS: u64 = 100;
/// Agent ids per (pool type, node) that take turns.
pub const POOL_KEYS_PER_NODE: usize = 4;
/// Ids probed to find those of a node's shards (a node owning a 1/n share needs about n each).
pub const POOL_PROBES_MAX: usize = 1 << 16;

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
        route.check().map_err(CallError::Unavailable)?;
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
                Ok(other) => return Err(CallError::Unavailable(format!("unexpected reply {other:?}"))),
            };
            if !(e.contains("no leader known") || e.contains("not the leader")) {
                return Err(CallError::Unavailable(e));
            }
            tokio::time::sleep(Duration::from_millis(LEADER_RETRY_MS)).await;
        }
    }

    /// The cluster-wide routes as this node's copy of the metadata has them.
    pub fn routes(&self) -> Vec<(u64, AgentRoute)> {
        self.inner.state.borrow().routes.iter().map(|(id, r)| (*id, r.clone())).collect()
    }

    /// The agent a pool delivery of type `ty` goes to now; `None` while no node owns a shard.
    pub fn pool_pick(&self, ty: &str) -> Option<PoolPick> {
        let st = self.inner.state.borrow().clone();
        let me = self.inner.name.as_str();
        let owns = |node: &str| st.shards.iter().any(|e| serving(e, node));
        let node = if owns(me) && self.lease_valid() { me.to_string() } else { self.nearest_owner(&st)? };
        let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
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

    /// The member owning shards with the smallest measured round-trip time (by name when none
    /// has been measured).
    fn nearest_owner(&self, st: &MetaState) -> Option<String> {
        let rtts: HashMap<std::net::SocketAddr, Duration> = match self.inner.transport.upgrade() {
            Some(t) => t.peer_rtts().into_iter().collect(),
            None => HashMap::new(),
        };
        let me = self.inner.name.as_str();
        let owners = st.members.keys().filter(|n| *n != me && st.shards.iter().any(|e| serving(e, n)));
        let rtt_of = |n: &str| self.inner.membership.addr_of(n).and_then(|a| rtts.get(&a).copied());
        owners.min_by_key(|n| (rtt_of(n).unwrap_or(Duration::MAX), n.to_string())).cloned()
    }
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
