//! Agents over HTTP.
//!
//! - `POST /v1/agents/{type}/{id}` with a CloudEvent (structured or binary mode) → `200
//!   {"reply":…,"node":"n1","epoch":1}`. A signal the agent handled before (same `source` and
//!   `id`) is not handled again: the answer is the original reply while the agent keeps it, else
//!   `200 {"reply":null,"duplicate":true}` (see [`crate::agent::handled`]). `?mode=cast` → `202 {"accepted":id}` without waiting.
//!   `?mode=read` runs a read-only call on the stored state, served by the nearest copy (this
//!   node's, or the owner's or an in-sync replica's by round-trip time; `&from=owner` for the
//!   owner only; `&stale_ms_max=` bounds a replica's staleness) → `200
//!   {"reply":…,"node","epoch","role":"owner"|"replica","age_ms"}`; a handler that changes the
//!   state or emits fails with 422 `not-a-read` (see [`crate::cluster::read`]).
//! - `GET /v1/agents/{type}/{id}/state` (same `from` and `stale_ms_max`) → `{"type","id","state",
//!   "node","epoch","role","age_ms"}`: the stored state (the type's default when none is stored).
//! - `GET /v1/agents/{type}/{id}` → `{"type","id","shard","owner","epoch","active"}`.
//! - `DELETE /v1/agents/{type}/{id}` → `204` (passivated) or `404` (not active).
//!
//! Errors are problem documents: unknown agent type → 404; a full mailbox, a store conflict or
//! shutdown → 503 with `Retry-After`; no reply in `agents.call_timeout_ms` → 504; a handler's
//! refusal → 422; an agent stopped after too many crashes → 500. Requests are routed to the owner
//! of the key's shard ([`crate::cluster::Cluster`]); `node` and `epoch` say who served it.
//!
//! - `GET /v1/cluster` → leader, members (address, voter or not, shards owned, active agents),
//!   shard counts by state, active agents in total.

// Helpers return the response to send as their error; it is sent at once, never stored.
#![allow(clippy::result_large_err)]

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::signals::{bad_request, decode_one, problem, read_body};
use super::ApiState;
use crate::agent::CallError;
use crate::cluster::read::{ReadFrom, ReadOpts};
use crate::storage::Key;

#[derive(Deserialize)]
pub struct CallQuery {
    mode: Option<String>,
    // Not a flattened `ReadQuery`: flattening makes the URL decoder see numbers as strings.
    from: Option<String>,
    stale_ms_max: Option<u64>,
}

/// How a read may be served (`?from=nearest|owner&stale_ms_max=`).
#[derive(Deserialize, Default)]
pub struct ReadQuery {
    from: Option<String>,
    stale_ms_max: Option<u64>,
}

impl ReadQuery {
    pub(crate) fn opts(&self) -> Result<ReadOpts, Response> {
        let from = match &self.from {
            None => ReadFrom::Nearest,
            Some(f) => f.parse().map_err(bad_request)?,
        };
        if self.stale_ms_max == Some(0) {
            return Err(bad_request("stale_ms_max must be positive".to_string()));
        }
        Ok(ReadOpts { from, stale_ms_max: self.stale_ms_max })
    }
}

enum Mode {
    Call,
    Cast,
    Read(ReadOpts),
}

pub(crate) fn call_error(e: CallError) -> Response {
    let (status, kind) = match &e {
        CallError::UnknownType(_) => (StatusCode::NOT_FOUND, "unknown-agent-type"),
        CallError::InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid-key"),
        CallError::InvalidRoute(_) => (StatusCode::BAD_REQUEST, "invalid-route"),
        CallError::MailboxFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "mailbox-full"),
        CallError::Unavailable(_) | CallError::Storage(_) | CallError::NotOwner { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        CallError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        CallError::Handler(_) => (StatusCode::UNPROCESSABLE_ENTITY, "handler-error"),
        CallError::NotRead(_) => (StatusCode::UNPROCESSABLE_ENTITY, "not-a-read"),
        CallError::Crashed => (StatusCode::INTERNAL_SERVER_ERROR, "agent-crashed"),
        CallError::Reply(_) => (StatusCode::INTERNAL_SERVER_ERROR, "bad-reply"),
        // 508 Loop Detected: a call back to an agent waiting on the same chain.
        CallError::Cycle(_) => (StatusCode::LOOP_DETECTED, "call-cycle"),
        CallError::TooDeep(_) => (StatusCode::LOOP_DETECTED, "call-chain-too-deep"),
        // Answered as a success by `call`; elsewhere (a read, a lookup) it cannot arise.
        CallError::Duplicate => (StatusCode::OK, "duplicate"),
    };
    let mut res = problem(status, kind, e.to_string(), json!({}));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

fn key_of(path: Result<Path<(String, String)>, PathRejection>) -> Result<Key, Response> {
    let Path((ty, id)) = path.map_err(|e| bad_request(e.body_text()))?;
    Ok(Key::new(ty, id))
}

pub async fn call(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<CallQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let mode = match query
        .as_ref()
        .map(|q| (q.mode.as_deref(), ReadQuery { from: q.from.clone(), stale_ms_max: q.stale_ms_max }))
    {
        Ok((None | Some("call"), _)) => Mode::Call,
        Ok((Some("cast"), _)) => Mode::Cast,
        Ok((Some("read"), read)) => match read.opts() {
            Ok(opts) => Mode::Read(opts),
            Err(res) => return res,
        },
        Ok((Some(other), _)) => return bad_request(format!("mode {other:?} is not call, cast or read")),
        Err(e) => return bad_request(e.body_text()),
    };
    let body = match read_body(&headers, body, s.ingress_body_bytes_max).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let signal = match decode_one(&s, &headers, &body) {
        Ok(signal) => signal,
        Err(res) => return res,
    };
    if let Mode::Read(opts) = mode {
        return match s.cluster.read(&key, Some(signal), opts, s.call_timeout).await {
            Ok(r) => Json(json!({
                "reply": r.reply,
                "node": r.node,
                "epoch": r.epoch,
                "role": r.role,
                "age_ms": r.age_ms,
            }))
            .into_response(),
            Err(e) => call_error(e),
        };
    }
    if let Mode::Cast = mode {
        let id = signal.id.clone();
        return match s.cluster.cast(&key, signal, s.call_timeout).await {
            Ok(served) => {
                (StatusCode::ACCEPTED, Json(json!({ "accepted": id, "node": served.node, "epoch": served.epoch })))
                    .into_response()
            }
            Err(e) => call_error(e),
        };
    }
    match s.cluster.call(&key, signal, s.call_timeout).await {
        Ok(served) => {
            Json(json!({ "reply": served.reply, "node": served.node, "epoch": served.epoch })).into_response()
        }
        // Handled before, its reply no longer kept: the signal took effect once, so this is a
        // success that says so.
        Err(CallError::Duplicate) => Json(json!({ "reply": null, "duplicate": true })).into_response(),
        Err(e) => call_error(e),
    }
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    stored: bool,
}

/// `GET /v1/agents/{type}`: the type's active agents across the cluster (or, with
/// `stored=true`, its ids with a stored state), a page at a time.
pub async fn list(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let ty = match path {
        Ok(Path(ty)) => ty,
        Err(e) => return bad_request(e.body_text()),
    };
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_request(e.body_text()),
    };
    let limit = q.limit.unwrap_or(crate::cluster::list::LIST_LIMIT_DEFAULT);
    let after = q.after.as_deref();
    let page = if q.stored {
        s.cluster.stored(&ty, after, limit, s.call_timeout).await.map(|p| json!(p))
    } else {
        s.cluster.list(&ty, after, limit, s.call_timeout).await.map(|p| json!(p))
    };
    match page {
        Ok(page) => Json(page).into_response(),
        Err(CallError::InvalidKey(m)) => bad_request(m),
        Err(e) => call_error(e),
    }
}

pub async fn lookup(State(s): State<ApiState>, path: Result<Path<(String, String)>, PathRejection>) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    match s.cluster.lookup(&key, s.call_timeout).await {
        Ok(served) => {
            let shard = s.cluster.placement(&key).map(|p| p.shard).ok();
            Json(json!({
                "type": key.ty,
                "id": key.id,
                "shard": shard,
                "owner": served.node,
                "epoch": served.epoch,
                "active": served.reply["active"],
                "stats": served.reply["stats"],
            }))
            .into_response()
        }
        Err(e) => call_error(e),
    }
}

/// `GET /v1/agents/{type}/{id}/state`.
pub async fn state(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let opts = match query.as_ref().map(|q| q.opts()) {
        Ok(Ok(opts)) => opts,
        Ok(Err(res)) => return res,
        Err(e) => return bad_request(e.body_text()),
    };
    match s.cluster.read(&key, None, opts, s.call_timeout).await {
        Ok(r) => Json(json!({
            "type": key.ty,
            "id": key.id,
            "state": r.reply,
            "node": r.node,
            "epoch": r.epoch,
            "role": r.role,
            "age_ms": r.age_ms,
        }))
        .into_response(),
        Err(e) => call_error(e),
    }
}

pub async fn stop(State(s): State<ApiState>, path: Result<Path<(String, String)>, PathRejection>) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    match s.cluster.stop(&key, s.call_timeout).await {
        Ok(served) if served.reply == serde_json::Value::Bool(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(_) => {
            problem(StatusCode::NOT_FOUND, "not-active", format!("{}/{} is not active", key.ty, key.id), json!({}))
        }
        Err(e) => call_error(e),
    }
}

/// Time `GET /v1/cluster` waits for each member's count of active agents.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The body of `GET /v1/cluster`.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterJson {
    /// The metadata group's leader, as the answering node knows it.
    pub leader: Option<String>,
    /// The metadata group's Raft term, as the answering node knows it.
    pub term: u64,
    /// Shards of the key space.
    pub shard_count: u32,
    /// Shards being handed over to another owner.
    pub shards_moving: usize,
    /// Shards without an owner.
    pub shards_unassigned: usize,
    /// Replicas (copies besides the owner's) that hold every acknowledged write.
    pub replicas_in_sync: usize,
    /// Replicas being caught up (or waiting to be).
    pub replicas_behind: usize,
    /// Members in admission order.
    pub members: Vec<ClusterMemberJson>,
    /// Sum over the members that answered.
    pub active_agents_total: u64,
}

/// One member in [`ClusterJson`], as the metadata group records it.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMemberJson {
    /// Node name.
    pub name: String,
    /// Transport address.
    pub addr: String,
    /// Votes in the metadata group (otherwise a learner).
    pub voter: bool,
    /// Shards it owns.
    pub shards: usize,
    /// Active agents on it; `None` if it did not answer.
    pub active_agents: Option<u64>,
    /// Shards it keeps a replica of.
    pub replica_of: usize,
    /// Replica catch-ups it runs as an owner, with their progress (empty if it did not answer).
    pub catching_up: Vec<crate::cluster::replica::SyncStatus>,
    /// Whether it holds a valid lease, so serves the shards it owns; `None` if it did not answer.
    pub serving: Option<bool>,
}

/// `GET /v1/cluster`.
pub async fn cluster(State(s): State<ApiState>) -> Json<ClusterJson> {
    let st = s.cluster.state();
    let stats = s.cluster.stats(s.call_timeout.min(STATS_TIMEOUT)).await;
    let replicas = st.shards.iter().flat_map(|e| e.replicas.iter());
    let (in_sync, behind) = replicas.fold((0, 0), |(i, b), r| if r.in_sync { (i + 1, b) } else { (i, b + 1) });
    let replica_of = |name: &str| st.shards.iter().filter(|e| e.replica(name).is_some()).count();
    let counts = st.shard_counts();
    let raft = s.cluster.raft().metrics().borrow().clone();
    let membership = raft.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<String> =
        membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| n.name.clone())).collect();
    let members = st
        .members_in_order()
        .into_iter()
        .map(|name| ClusterMemberJson {
            name: name.to_string(),
            addr: st.members[name].addr.clone(),
            voter: voters.contains(name),
            shards: counts.get(name).copied().unwrap_or(0),
            active_agents: stats.get(name).and_then(|m| m.as_ref().map(|m| m.active)),
            replica_of: replica_of(name),
            catching_up: stats.get(name).and_then(|m| m.as_ref().map(|m| m.syncing.clone())).unwrap_or_default(),
            serving: stats.get(name).and_then(|m| m.as_ref().map(|m| m.lease_valid)),
        })
        .collect();
    Json(ClusterJson {
        leader: s.cluster.leader(),
        term: raft.current_term,
        shard_count: st.shard_count,
        shards_moving: st.shards.iter().filter(|e| matches!(e.state, crate::meta::ShardState::Moving { .. })).count(),
        shards_unassigned: st.shards.iter().filter(|e| e.owner.is_none()).count(),
        replicas_in_sync: in_sync,
        replicas_behind: behind,
        members,
        active_agents_total: stats.values().map(|m| m.as_ref().map_or(0, |m| m.active)).sum(),
    })
}
