//! Reads served by the nearest copy of a key's state: its owner or one of its in-sync replicas.
//!
//! ## Design
//! A read ([`Cluster::read`]) runs a read-only call on the *stored* state ([`Host::read`]: the
//! handler runs on a copy decoded from the store, nothing is written, a handler that changes the
//! state or emits fails it with `NotRead`), or returns the stored state itself. With node-local
//! storage every in-sync replica holds every acknowledged write of its shard, so it can answer as
//! well as the owner; the reader tries the copies nearest first: this node when it holds one,
//! then the others by measured round-trip time ([`crate::net::Transport::peer_rtts`]).
//!
//! **When a replica may answer.** A replica knows it is in sync from its copy of the metadata,
//! which may be behind: the owner may have marked it out of sync (it missed a write, which was
//! then acknowledged) in an entry this node has not applied yet. The lease closes that gap: a
//! renewal counts only once the node has applied everything the leader had committed when it
//! granted it ([`super::control`]), so a node whose lease was renewed at time `r` (when the
//! renewal was *sent*) holds in its table every mark committed before `r`. A write acknowledged
//! before `r` either reached this replica before it was acknowledged, or its out-of-sync mark was
//! committed before the acknowledgement, hence before `r`, and the table shows it. So:
//! - a replica serves a read only when its table shows it in sync at the shard's current epoch
//!   and its lease, renewed at `r`, is valid with `now - r <= stale_ms_max`;
//! - then the read reflects every write acknowledged before `now - stale_ms_max` (bounded
//!   staleness, as follower reads elsewhere give). The answer says how old the table was
//!   (`age_ms`); the default bound is `placement.replica_read_stale_ms_max`.
//!
//! The owner serves a read from its store when it serves the shard (lease valid, shard open, not
//! handing it over), so an owner read reflects every acknowledged write. (While the shard is
//! `Moving`, the move may already be complete without this node knowing, and the new owner
//! acknowledging writes without it: the old owner refuses, and the reader goes to an in-sync
//! replica, the target among them, or waits.) A read with `from: owner` is refused by any node
//! that is not the owner in its own table, whatever the reader's table said. Either may also show writes still in flight
//! (stored, not yet acknowledged), and a replica a late write of a previous owner that was never
//! acknowledged (see [`super::replica`]); never a write that was not made.
//!
//! A copy that cannot answer (not in sync, table too old, not the owner any more, unreachable)
//! refuses, and the reader tries the next; when none answers it waits for its table to change
//! and tries again, until the deadline. A read has no effect, so one whose answer was lost is
//! simply asked again elsewhere.
//!
//! ## Caveats
//! - Reads see the store: for [`crate::agent::Persistence::OnPassivate`] types, the state as of
//!   the last passivation, not what an active agent holds in memory.
//! - Every read decodes the state from the store (no cache): reads of large states cost more
//!   than calls to an active agent.
//! - With shared storage (a database) there are no replicas: reads go to the owner.

use std::time::Duration;

use tokio::time::Instant;

use super::protocol::{AgentOp, AgentReply, AgentReq};
use super::{placement_in, Cluster, Inner, RETRY_WAIT_MIN_MS};
use crate::agent::{CallError, Reply, Unavailable};
use crate::meta::MetaState;
use crate::metrics::label;
use crate::signal::Signal;
use crate::storage::Key;

/// Which copies may serve a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    /// The nearest copy: this node's, else the owner's or an in-sync replica's by round-trip time.
    #[default]
    Nearest,
    /// The owner only: every acknowledged write.
    Owner,
}

/// A [`ReadFrom`] that is neither `nearest` nor `owner`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("read {0:?} is not nearest or owner")]
pub struct UnknownReadFrom(pub String);

impl std::str::FromStr for ReadFrom {
    type Err = UnknownReadFrom;
    fn from_str(s: &str) -> Result<Self, UnknownReadFrom> {
        match s {
            "nearest" => Ok(ReadFrom::Nearest),
            "owner" => Ok(ReadFrom::Owner),
            other => Err(UnknownReadFrom(other.to_string())),
        }
    }
}

/// How a read may be served.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOpts {
    pub from: ReadFrom,
    /// Oldest table a replica may answer with, in ms (`None`: `placement.replica_read_stale_ms_max`).
    pub stale_ms_max: Option<u64>,
}

/// Which copy answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Replica => "replica",
        }
    }
}

/// A read's answer and where it came from.
#[derive(Debug, Clone)]
pub struct ReadServed {
    pub reply: Reply,
    pub node: String,
    pub role: Role,
    /// The shard's epoch in the serving node's table.
    pub epoch: u64,
    /// Time between the serving node's last lease renewal and the read: its table holds every
    /// metadata entry committed before that.
    pub age_ms: u64,
}

impl Cluster {
    /// Reads `key`'s stored state (`query: None`) or runs a read-only call on it, on the nearest
    /// copy allowed by `opts` (see the module's design note).
    pub async fn read(
        &self,
        key: &Key,
        query: Option<Signal>,
        opts: ReadOpts,
        timeout: Duration,
    ) -> Result<ReadServed, CallError> {
        key.check().map_err(|e| CallError::InvalidKey(e.to_string()))?;
        if !self.inner.host.has_type(&key.ty) {
            return Err(CallError::UnknownType(key.ty.clone()));
        }
        let stale_ms_max = opts.stale_ms_max.unwrap_or(self.inner.cfg.replica_read_stale_ms_max);
        let deadline = Instant::now() + timeout;
        let attempt_max = Duration::from_millis(self.inner.meta_cfg.rpc_timeout_ms);
        let mut wait_ms = RETRY_WAIT_MIN_MS;
        loop {
            let mut refused = None;
            // No table yet (a node just started): wait for one, as calls do.
            let copies = self.copies(key, opts.from).unwrap_or_else(|e| {
                refused = Some(e);
                Vec::new()
            });
            for (i, node) in copies.iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // Only the last copy may take all the time left: a dead one must not eat it.
                let until = Instant::now() + if i + 1 < copies.len() { left.min(attempt_max) } else { left };
                let owner_only = opts.from == ReadFrom::Owner;
                let result = if *node == self.inner.name {
                    serve_read(&self.inner, key, query.clone(), stale_ms_max, owner_only, until).await
                } else {
                    self.read_remote(node, key, query.as_ref(), stale_ms_max, owner_only, until).await
                };
                match result {
                    Ok(served) => return Ok(served),
                    Err(e @ (CallError::NotOwner { .. } | CallError::Unavailable(_) | CallError::Timeout(_))) => {
                        refused = Some(e)
                    }
                    Err(e) => return Err(e),
                }
            }
            if !self.wait_for_change(deadline, Duration::from_millis(wait_ms)).await {
                return Err(match refused {
                    Some(CallError::NotOwner { .. }) | None => {
                        CallError::Unavailable(Unavailable::NoServingCopy { key: format!("{key:?}") })
                    }
                    Some(e) => e,
                });
            }
            wait_ms = (wait_ms * 2).min(RETRY_WAIT_MIN_MS * 8);
        }
    }

    /// The nodes that may serve a read of `key`, nearest first: this one, then by round-trip
    /// time (unmeasured last, by name). Replicas only when `from` allows and membership sees them.
    fn copies(&self, key: &Key, from: ReadFrom) -> Result<Vec<String>, CallError> {
        let st = self.inner.state.borrow().clone();
        let p = placement_in(&st, key)?;
        let mut nodes: Vec<String> = p.owner.iter().cloned().collect();
        if from == ReadFrom::Nearest {
            let view = self.inner.membership.view();
            let alive = |n: &str| n == self.inner.name || view.state_of(n).is_some_and(|s| s.is_active());
            let entry = &st.shards[p.shard as usize];
            nodes.extend(entry.replicas.iter().filter(|r| r.in_sync && alive(&r.node)).map(|r| r.node.clone()));
        }
        Ok(nearest_first(nodes, &self.inner.name, self.rtts()))
    }

    async fn read_remote(
        &self,
        node: &str,
        key: &Key,
        query: Option<&Signal>,
        stale_ms_max: u64,
        owner_only: bool,
        until: Instant,
    ) -> Result<ReadServed, CallError> {
        let addr = self.member_addr(node)?;
        let timeout = until.saturating_duration_since(Instant::now());
        let op = AgentOp::Read {
            query: query.map(crate::signal::codec::encode_structured),
            stale_ms_max,
            owner_only,
            timeout_ms: timeout.as_millis() as u64,
        };
        let req = AgentReq { op, ty: key.ty.clone(), id: key.id.clone(), epoch: 0 };
        match self.ask(addr, &req, timeout).await? {
            AgentReply::Read { reply, epoch, replica, age_ms } => {
                let reply = serde_json::from_slice(&reply).map_err(|e| {
                    CallError::Unavailable(Unavailable::Protocol(format!("undecodable reply from {node}: {e}")))
                })?;
                let role = if replica { Role::Replica } else { Role::Owner };
                Ok(ReadServed { reply, node: node.to_string(), role, epoch, age_ms })
            }
            AgentReply::Err(e) => Err(e),
            _ => Err(CallError::Unavailable(Unavailable::Protocol(format!("unexpected reply from {node}")))),
        }
    }
}

/// `nodes` without repeats, nearest first: `me`, then by round-trip time, unmeasured ones last,
/// ties by name (so every reader with the same measurements picks alike).
fn nearest_first(mut nodes: Vec<String>, me: &str, rtt_of: impl Fn(&str) -> Option<Duration>) -> Vec<String> {
    nodes.sort_by_cached_key(|n| {
        let rtt = if n == me { Duration::ZERO } else { rtt_of(n).unwrap_or(Duration::MAX) };
        (rtt, n.clone())
    });
    nodes.dedup();
    nodes
}

/// Serves a read here if this node's copy may answer (see the module's design note).
pub(super) async fn serve_read(
    inner: &Inner,
    key: &Key,
    query: Option<Signal>,
    stale_ms_max: u64,
    owner_only: bool,
    until: Instant,
) -> Result<ReadServed, CallError> {
    let now = Instant::now();
    let (role, epoch) = match may_read(inner, key, stale_ms_max, owner_only, now) {
        Ok(ok) => ok,
        Err((reason, e)) => {
            inner.reads.refused.get_or_create(&label("reason", reason)).inc();
            return Err(e);
        }
    };
    let age_ms = inner.lease.renewed_at(now).map_or(0, |r| now.duration_since(r).as_millis() as u64);
    let timeout = until.saturating_duration_since(now);
    let reply = match tokio::time::timeout(timeout, inner.host.read(key, query)).await {
        Ok(r) => r?,
        Err(_) => return Err(CallError::Timeout(timeout)),
    };
    inner.reads.served.get_or_create(&label("role", role.as_str())).inc();
    Ok(ReadServed { reply, node: inner.name.clone(), role, epoch, age_ms })
}

/// Whether this node's copy of `key` may answer a read now, and as what; else why not.
fn may_read(
    inner: &Inner,
    key: &Key,
    stale_ms_max: u64,
    owner_only: bool,
    now: Instant,
) -> Result<(Role, u64), (&'static str, CallError)> {
    let st = inner.state.borrow();
    let node = Answering {
        me: &inner.name,
        renewed_ago: inner.lease.renewed_at(now).map(|t| now.saturating_duration_since(t)),
        open: &|shard, epoch| inner.repl.is_open(shard, epoch),
    };
    read_rule(&st, &node, key, stale_ms_max, owner_only)
}

/// What the read rule needs to know of the node answering.
/// Reads served by this node, by role, and those its copy could not serve, by reason.
pub(super) struct ReadCounters {
    pub(super) served: crate::metrics::CounterFamily,
    pub(super) refused: crate::metrics::CounterFamily,
}

impl ReadCounters {
    pub(super) fn new(metrics: &crate::metrics::Metrics) -> ReadCounters {
        ReadCounters {
            served: metrics.counters("agent_reads", "Reads of stored agent state served by this node, by role"),
            refused: metrics.counters(
                "agent_reads_refused",
                "Reads this node's copy could not serve (the reader tried another), by reason",
            ),
        }
    }
}

pub(crate) struct Answering<'a> {
    pub me: &'a str,
    /// How long ago the renewal behind its valid lease was sent (`None`: no valid lease).
    pub renewed_ago: Option<Duration>,
    /// Whether it has opened the shard at the epoch (its replicas fenced).
    pub open: &'a dyn Fn(u32, u64) -> bool,
}

/// The rule of the module's design note, on a node's table `st`: the role this copy answers as
/// (and the shard's epoch), or why it may not (a metric reason and the error).
pub(crate) fn read_rule(
    st: &MetaState,
    node: &Answering<'_>,
    key: &Key,
    stale_ms_max: u64,
    owner_only: bool,
) -> Result<(Role, u64), (&'static str, CallError)> {
    let p = placement_in(st, key).map_err(|e| ("no_table", e))?;
    let Some(renewed_ago) = node.renewed_ago else {
        return Err(("lease", CallError::Unavailable(Unavailable::LeaseExpired)));
    };
    if p.owner.as_deref() == Some(node.me) {
        if !(node.open)(p.shard, p.epoch) {
            return Err(("opening", CallError::Unavailable(Unavailable::Opening { shard: p.shard })));
        }
        // Handing over: the move may have completed without this node knowing yet, and the new
        // owner acknowledge writes this copy lacks. A reader goes to the target (an in-sync
        // replica, under the staleness rule) or waits for the move to end.
        if p.moving_to.is_some() {
            return Err(("moving", CallError::Unavailable(Unavailable::HandingOver { shard: p.shard })));
        }
        return Ok((Role::Owner, p.epoch));
    }
    if owner_only {
        return Err(("not_owner", CallError::NotOwner { owner: p.owner, epoch: p.epoch }));
    }
    if !st.shards[p.shard as usize].in_sync(node.me) {
        return Err(("not_in_sync", CallError::NotOwner { owner: p.owner, epoch: p.epoch }));
    }
    let age_ms = renewed_ago.as_millis() as u64;
    if age_ms > stale_ms_max {
        return Err(("stale", CallError::Unavailable(Unavailable::Stale { age_ms, stale_ms_max })));
    }
    Ok((Role::Replica, p.epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn copies_are_tried_nearest_first() {
        let rtt = |n: &str| match n {
            "far" => Some(Duration::from_millis(40)),
            "near" => Some(Duration::from_micros(300)),
            "mid" => Some(Duration::from_millis(2)),
            _ => None,
        };
        // This node first, then by RTT, unmeasured last (by name), each once.
        let got = nearest_first(names(&["far", "unknown-b", "mid", "me", "near", "unknown-a", "far"]), "me", rtt);
        assert_eq!(got, names(&["me", "near", "mid", "far", "unknown-a", "unknown-b"]));
        // Without a copy here, the owner is not preferred for being the owner: the nearer replica is.
        assert_eq!(nearest_first(names(&["far", "near"]), "me", rtt), names(&["near", "far"]));
        assert_eq!(nearest_first(Vec::new(), "me", rtt), Vec::<String>::new());
    }

    /// One shard owned by `owner` at epoch 4, in `state`, with replica b (`in_sync`) and c.
    fn table(owner: &str, state: crate::meta::ShardState, in_sync: bool) -> MetaState {
        use crate::meta::{Replica, ShardEntry};
        let replica = |node: &str, in_sync| Replica { node: node.into(), in_sync, generation: 1 };
        MetaState {
            shard_count: 1,
            shards: vec![ShardEntry {
                owner: Some(owner.into()),
                epoch: 4,
                state,
                replicas: vec![replica("b", in_sync), replica("c", false)],
            }],
            ..MetaState::default()
        }
    }

    #[test]
    fn who_may_answer_a_read() {
        use crate::meta::ShardState::{Active, Moving};
        let key = Key::new("counter", "k");
        let ago = |ms| Some(Duration::from_millis(ms));
        let open = |_, _| true;
        let closed = |_, _| false;
        let node = |me, renewed_ago, open| Answering { me, renewed_ago, open };
        let rule = |st: &MetaState, c: &Answering<'_>, owner_only| {
            read_rule(st, c, &key, 500, owner_only).map_err(|(reason, _)| reason)
        };
        let active = table("a", Active, true);
        // The owner: with a valid lease and the shard open, whatever its table's age.
        assert_eq!(rule(&active, &node("a", ago(1900), &open), false), Ok((Role::Owner, 4)));
        assert_eq!(rule(&active, &node("a", ago(10), &open), true), Ok((Role::Owner, 4)));
        assert_eq!(rule(&active, &node("a", None, &open), false), Err("lease"));
        assert_eq!(rule(&active, &node("a", ago(10), &closed), false), Err("opening"));
        // Handing over: the move may be complete already elsewhere.
        let moving = table("a", Moving { to: "b".into() }, true);
        assert_eq!(rule(&moving, &node("a", ago(10), &open), false), Err("moving"));
        // An in-sync replica with a fresh enough table; not when the owner is asked for.
        assert_eq!(rule(&active, &node("b", ago(500), &open), false), Ok((Role::Replica, 4)));
        assert_eq!(rule(&moving, &node("b", ago(10), &open), false), Ok((Role::Replica, 4)));
        assert_eq!(rule(&active, &node("b", ago(501), &open), false), Err("stale"));
        assert_eq!(rule(&active, &node("b", None, &open), false), Err("lease"));
        assert_eq!(rule(&active, &node("b", ago(10), &open), true), Err("not_owner"));
        // Out of sync, or not a replica at all.
        assert_eq!(rule(&table("a", Active, false), &node("b", ago(10), &open), false), Err("not_in_sync"));
        assert_eq!(rule(&active, &node("c", ago(10), &open), false), Err("not_in_sync"));
        assert_eq!(rule(&active, &node("d", ago(10), &open), false), Err("not_in_sync"));
        // No table yet.
        assert_eq!(rule(&MetaState::default(), &node("a", ago(10), &open), false), Err("no_table"));
    }

    #[test]
    fn read_from_parses_its_two_names_only() {
        assert_eq!("nearest".parse::<ReadFrom>(), Ok(ReadFrom::Nearest));
        assert_eq!("owner".parse::<ReadFrom>(), Ok(ReadFrom::Owner));
        assert_eq!("Owner".parse::<ReadFrom>(), Err(UnknownReadFrom("Owner".into())));
        assert!("".parse::<ReadFrom>().is_err());
        let err = "far".parse::<ReadFrom>().unwrap_err();
        assert_eq!(err.to_string(), "read \"far\" is not nearest or owner");
    }
}
