//! Routing of agent requests: a request for a key goes to the owner of its shard in this node's
//! table (this node's host, or one ask on the data lane), follows a newer owner hint, waits for
//! the table to change while no owner serves the shard, and is sent again to a new owner when
//! the table reassigns the shard under an ask in flight (see the module docs of
//! [`crate::cluster`]). Those decisions are the [`engine`]'s ([`Route`]); this runner asks,
//! watches the table and waits. The serving side is here too: a peer's agent ask, checked
//! against this node's table before it reaches the host.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::warn;

mod engine;

use engine::{Answer, Next, Route, Target};

use super::protocol::{self, AgentOp, AgentReply, AgentReq};
use super::{list, placement_in, read, replica, Cluster, Inner, Placement, AGENT_IN_FLIGHT_MAX};
use crate::agent::{CallError, Reply, Unavailable};
use crate::net::{AskError, PeerInfo};
use crate::signal::Signal;
use crate::storage::Key;
use crate::wire::envelope::{self, Kind};
use crate::wire::Lane;

impl Cluster {
    /// Calls an agent wherever it lives; returns the reply, the node that served it and the epoch.
    pub async fn call(&self, key: &Key, signal: Signal, timeout: Duration) -> Result<Served, CallError> {
        self.request(key, Op::Call { signal: Box::new(signal), cast: false }, timeout).await
    }

    /// Delivers a signal to an agent without waiting for its reply (accepted by its mailbox).
    pub async fn cast(&self, key: &Key, signal: Signal, timeout: Duration) -> Result<Served, CallError> {
        self.request(key, Op::Call { signal: Box::new(signal), cast: true }, timeout).await
    }

    /// Activates an agent wherever it lives.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub async fn ensure(&self, key: &Key, timeout: Duration) -> Result<Served, CallError> {
        self.request(key, Op::Ensure, timeout).await
    }

    /// Stops (passivates) an agent wherever it lives; `reply` is `true` if it was active.
    pub async fn stop(&self, key: &Key, timeout: Duration) -> Result<Served, CallError> {
        self.request(key, Op::Stop, timeout).await
    }

    /// Whether the agent is active, asked of its owner: `{"active", "stats"}` (an
    /// [`crate::agent::AgentInfo`] while active, else `null`).
    pub async fn lookup(&self, key: &Key, timeout: Duration) -> Result<Served, CallError> {
        self.request(key, Op::Lookup, timeout).await
    }

    /// Active agents and replica catch-ups on each member (asked of each; `None` for those that
    /// did not answer in `timeout` or that membership does not see alive).
    pub async fn stats(&self, timeout: Duration) -> BTreeMap<String, Option<MemberStats>> {
        let st = self.state();
        let view = self.inner.membership.view();
        let mut asks = Vec::new();
        for (name, m) in &st.members {
            let me = self.clone();
            let name = name.clone();
            let alive = name == self.inner.name || view.state_of(&name).is_some_and(|s| s.is_active());
            let addr = m.addr.parse::<SocketAddr>().ok().filter(|_| alive);
            asks.push(async move {
                if name == me.inner.name {
                    return (name, Some(local_stats(&me.inner)));
                }
                let Some(addr) = addr else { return (name, None) };
                let req = AgentReq { op: AgentOp::Stats, ty: String::new(), id: String::new(), epoch: 0 };
                match me.ask(addr, &req, timeout).await {
                    Ok(AgentReply::Stats(stats)) => (name, Some(stats)),
                    _ => (name, None),
                }
            });
        }
        futures::future::join_all(asks).await.into_iter().collect()
    }

    async fn request(&self, key: &Key, op: Op, timeout: Duration) -> Result<Served, CallError> {
        key.check().map_err(|e| CallError::InvalidKey(e.to_string()))?;
        if !self.inner.host.has_type(&key.ty) {
            // Every node registers the same types.
            return Err(CallError::UnknownType(key.ty.clone()));
        }
        let deadline = Instant::now() + timeout;
        let mut route = Route::new(&self.inner.name, self.inner.cfg.redirects_max);
        loop {
            let answer = match route.target(self.placement(key)) {
                Ok(Target::Local) => self.local(key, &op, deadline).await.into(),
                Ok(Target::Remote { owner, routed }) => self.remote(&owner, key, &op, routed, deadline).await,
                Err(e) => Answer::Failed(e),
            };
            match route.on_answer(key, answer) {
                Next::Done(result) => return result,
                Next::Again => {}
                Next::Wait { wait_ms, then } => {
                    if !self.wait_for_change(deadline, Duration::from_millis(wait_ms)).await {
                        return Err(then);
                    }
                }
            }
        }
    }

    /// Waits for a table change or `wait`, whichever is first; `false` once the deadline passed.
    pub(super) async fn wait_for_change(&self, deadline: Instant, wait: Duration) -> bool {
        let mut rx = self.inner.state.clone();
        rx.mark_unchanged();
        let until = (Instant::now() + wait).min(deadline);
        let _ = tokio::time::timeout_at(until, rx.changed()).await;
        Instant::now() < deadline
    }

    async fn local(&self, key: &Key, op: &Op, deadline: Instant) -> Result<Served, CallError> {
        serve_local(&self.inner, key, op, deadline).await
    }

    /// A member's transport address, as the metadata has it.
    pub(super) fn member_addr(&self, node: &str) -> Result<SocketAddr, CallError> {
        let st = self.inner.state.borrow();
        st.members
            .get(node)
            .and_then(|m| m.addr.parse::<SocketAddr>().ok())
            .ok_or_else(|| CallError::Unavailable(Unavailable::NoAddress { node: node.to_string() }))
    }

    /// The smoothed round-trip time to each member by name, as measured now (`None`: unmeasured).
    pub(super) fn rtts(&self) -> impl Fn(&str) -> Option<Duration> + '_ {
        let rtts: std::collections::HashMap<SocketAddr, Duration> = match self.inner.transport.upgrade() {
            Some(t) => t.peer_rtts().into_iter().collect(),
            None => std::collections::HashMap::new(),
        };
        move |n: &str| self.inner.membership.addr_of(n).and_then(|a| rtts.get(&a).copied())
    }

    /// One ask to `owner`, routed by `routed` (this node's view when it sent the ask).
    async fn remote(
        &self,
        owner: &str,
        key: &Key,
        op: &Op,
        routed: Option<Placement>,
        deadline: Instant,
    ) -> Answer<Served> {
        let addr = match self.member_addr(owner) {
            Ok(addr) => addr,
            Err(e) => return Answer::Failed(e),
        };
        let epoch = routed.as_ref().map_or(0, |p| p.epoch);
        let timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let req = AgentReq { op: op.to_wire(timeout_ms), ty: key.ty.clone(), id: key.id.clone(), epoch };
        let timeout = deadline.saturating_duration_since(Instant::now());
        // The owner may die or stop with the ask in flight: stop waiting once the table gives the
        // shard to another owner, and send it there.
        let reply = tokio::select! {
            r = self.ask(addr, &req, timeout) => r,
            () = self.owner_changes(key, owner, routed) => return Answer::OwnerChanged,
        };
        reply.and_then(|r| served_by(owner, r)).into()
    }

    /// Resolves once this node's table shows `key`'s shard taken from `owner` (after `routed`,
    /// the view the ask was sent by, so a change that came before this wait began counts): at
    /// once when it was reassigned (its lease expired: dead or cut off), or `rpc_timeout_ms` after
    /// a planned move completed (the old owner answered what it had accepted before handing over;
    /// a reply still in transit gets that long, a node that has since stopped gives none).
    async fn owner_changes(&self, key: &Key, owner: &str, routed: Option<Placement>) {
        let mut rx = self.inner.state.clone();
        let mut prev = routed;
        loop {
            let now = placement_in(&rx.borrow_and_update(), key).ok();
            if let (Some(p), Some(n)) = (&prev, &now) {
                if n.epoch > p.epoch && n.owner.as_deref() != Some(owner) {
                    if p.moving_to.is_some() && p.moving_to == n.owner {
                        tokio::time::sleep(Duration::from_millis(self.inner.meta_cfg.rpc_timeout_ms)).await;
                    }
                    return;
                }
            }
            if now.is_some() {
                prev = now;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub(super) async fn ask(
        &self,
        addr: SocketAddr,
        req: &AgentReq,
        timeout: Duration,
    ) -> Result<AgentReply, CallError> {
        let t = self.inner.transport.upgrade().ok_or(CallError::Unavailable(Unavailable::ShuttingDown))?;
        let bytes = match t.ask_on(Lane::Data, addr, envelope::encode(Kind::Agent, req), timeout).await {
            Ok(b) => b,
            // Not sent: safe to retry.
            Err(AskError::Send(e)) => return Err(CallError::Unavailable(Unavailable::Transport(e.to_string()))),
            // Sent, no answer: it may have run.
            Err(AskError::Timeout(d)) => return Err(CallError::Timeout(d)),
            Err(e) => return Err(CallError::Unavailable(Unavailable::Transport(e.to_string()))),
        };
        postcard::from_bytes(&bytes)
            .map_err(|e| CallError::Unavailable(Unavailable::Protocol(format!("undecodable agent reply: {e}"))))
    }

    /// Serves a data-lane agent ask ([`Kind::Agent`]; `body`: the request after the kind).
    pub fn on_agent_ask(&self, from: &PeerInfo, id: u64, body: &[u8]) -> Option<Bytes> {
        let Ok(permit) = self.inner.agent_permits.clone().try_acquire_owned() else {
            let busy = AgentReply::Err(CallError::Unavailable(Unavailable::Busy {
                what: "agent requests".into(),
                limit: AGENT_IN_FLIGHT_MAX,
            }));
            return Some(protocol::encode(&busy));
        };
        let req = match postcard::from_bytes::<AgentReq>(body) {
            Ok(r) => r,
            Err(e) => {
                warn!(from = %from.name, error = %e, "undecodable agent request");
                let e = Unavailable::Protocol(format!("undecodable request: {e}"));
                return Some(protocol::encode(&AgentReply::Err(CallError::Unavailable(e))));
            }
        };
        let inner = self.inner.clone();
        let to = from.addr;
        self.inner.tasks.spawn(async move {
            let reply = serve_remote(&inner, req).await;
            if let Some(t) = inner.transport.upgrade() {
                let _ = t.reply_on(Lane::Data, to, id, protocol::encode(&reply));
            }
            drop(permit);
        });
        None
    }
}

/// What an owner's reply to an agent request means.
fn served_by(owner: &str, reply: AgentReply) -> Result<Served, CallError> {
    match reply {
        AgentReply::Ok { reply, epoch } => {
            let reply = serde_json::from_slice(&reply).map_err(|e| {
                CallError::Unavailable(Unavailable::Protocol(format!("undecodable reply from {owner}: {e}")))
            })?;
            Ok(Served { reply, node: owner.to_string(), epoch })
        }
        AgentReply::Err(e) => Err(e),
        AgentReply::Stats { .. } | AgentReply::Read { .. } | AgentReply::Active(_) | AgentReply::Stored(_) => {
            Err(CallError::Unavailable(Unavailable::Protocol(format!("unexpected reply from {owner}"))))
        }
    }
}

/// A request for an agent, before it is encoded for another node.
enum Op {
    Call { signal: Box<Signal>, cast: bool },
    Ensure,
    Stop,
    Lookup,
}

impl Op {
    fn to_wire(&self, timeout_ms: u64) -> AgentOp {
        match self {
            Op::Call { signal, cast } => {
                AgentOp::Call { signal: crate::signal::codec::encode_structured(signal), cast: *cast, timeout_ms }
            }
            Op::Ensure => AgentOp::Ensure,
            Op::Stop => AgentOp::Stop,
            Op::Lookup => AgentOp::Lookup,
        }
    }
}

/// What [`Cluster::stats`] learns of one member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberStats {
    /// Agents active on it.
    pub active: u64,
    /// Replica catch-ups it runs as an owner.
    pub syncing: Vec<replica::SyncStatus>,
    /// Whether its lease is valid: it serves the shards it owns (after a restart, not before
    /// a leader has granted it one and it has caught up with the table).
    pub lease_valid: bool,
}

fn local_stats(inner: &Inner) -> MemberStats {
    MemberStats {
        active: inner.host.active() as u64,
        syncing: inner.repl.syncing(),
        lease_valid: inner.lease.valid(Instant::now()),
    }
}

/// A reply and where it came from.
#[derive(Debug, Clone)]
pub struct Served {
    pub reply: Reply,
    pub node: String,
    pub epoch: u64,
}

async fn serve_remote(inner: &Inner, req: AgentReq) -> AgentReply {
    let key = Key::new(req.ty, req.id);
    let (op, timeout_ms) = match req.op {
        AgentOp::Call { signal, cast, timeout_ms } => match crate::signal::codec::decode_structured(&signal) {
            Ok(signal) => (Op::Call { signal: Box::new(signal), cast }, timeout_ms),
            Err(e) => {
                return AgentReply::Err(CallError::Unavailable(Unavailable::Protocol(format!("invalid signal: {e}"))))
            }
        },
        AgentOp::Ensure => (Op::Ensure, inner.meta_cfg.rpc_timeout_ms),
        AgentOp::Stop => (Op::Stop, inner.meta_cfg.rpc_timeout_ms),
        AgentOp::Lookup => (Op::Lookup, inner.meta_cfg.rpc_timeout_ms),
        AgentOp::Stats => return AgentReply::Stats(local_stats(inner)),
        AgentOp::List { after, limit, stored } => return list::serve(inner, &key.ty, after, limit, stored).await,
        AgentOp::Read { query, stale_ms_max, owner_only, timeout_ms } => {
            return serve_remote_read(inner, &key, query, stale_ms_max, owner_only, timeout_ms).await;
        }
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    match serve_local(inner, &key, &op, deadline).await {
        Ok(s) => match serde_json::to_vec(&s.reply) {
            Ok(reply) => AgentReply::Ok { reply, epoch: s.epoch },
            Err(e) => {
                AgentReply::Err(CallError::Unavailable(Unavailable::State(format!("reply does not serialize: {e}"))))
            }
        },
        Err(e) => AgentReply::Err(e),
    }
}

async fn serve_remote_read(
    inner: &Inner,
    key: &Key,
    query: Option<Vec<u8>>,
    stale_ms_max: u64,
    owner_only: bool,
    timeout_ms: u64,
) -> AgentReply {
    let query = match query.map(|q| crate::signal::codec::decode_structured(&q)).transpose() {
        Ok(q) => q,
        Err(e) => {
            return AgentReply::Err(CallError::Unavailable(Unavailable::Protocol(format!("invalid signal: {e}"))))
        }
    };
    let until = Instant::now() + Duration::from_millis(timeout_ms);
    match read::serve_read(inner, key, query, stale_ms_max, owner_only, until).await {
        Ok(s) => match serde_json::to_vec(&s.reply) {
            Ok(reply) => {
                AgentReply::Read { reply, epoch: s.epoch, replica: s.role == read::Role::Replica, age_ms: s.age_ms }
            }
            Err(e) => {
                AgentReply::Err(CallError::Unavailable(Unavailable::State(format!("reply does not serialize: {e}"))))
            }
        },
        Err(e) => AgentReply::Err(e),
    }
}

/// `NotOwner` (with this node's view) unless this node owns `key`'s shard.
fn owned_here(inner: &Inner, key: &Key) -> Result<(), CallError> {
    let p = placement_in(&inner.state.borrow(), key)?;
    if p.owner.as_deref() != Some(inner.name.as_str()) {
        return Err(CallError::NotOwner { owner: p.owner, epoch: p.epoch });
    }
    Ok(())
}

/// Runs a request on this node's host (the host's gate checks ownership and the lease).
async fn serve_local(inner: &Inner, key: &Key, op: &Op, deadline: Instant) -> Result<Served, CallError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let host = &inner.host;
    let reply = match op {
        Op::Call { signal, cast } => {
            if *cast {
                host.cast(key, (**signal).clone()).await?;
                Reply::Null
            } else {
                host.call(key, (**signal).clone(), timeout).await?
            }
        }
        Op::Ensure => {
            host.ensure(key).await?;
            Reply::Null
        }
        Op::Stop => {
            owned_here(inner, key)?;
            Reply::Bool(host.stop(key).await)
        }
        Op::Lookup => {
            owned_here(inner, key)?;
            let info = host.info(key);
            serde_json::json!({ "active": info.is_some(), "stats": info })
        }
    };
    let epoch = placement_in(&inner.state.borrow(), key).map(|p| p.epoch).unwrap_or(0);
    Ok(Served { reply, node: inner.name.clone(), epoch })
}
