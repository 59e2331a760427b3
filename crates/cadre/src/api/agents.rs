//! Agents over HTTP.
//!
//! - `POST /v1/agents/{type}/{id}` with a CloudEvent (structured or binary mode) → `200
//!   {"reply":…,"node":"n1","epoch":1}`; `?mode=cast` → `202 {"accepted":id}` without waiting.
//! - `GET /v1/agents/{type}/{id}` → `{"type","id","shard","owner","epoch","active"}`.
//! - `DELETE /v1/agents/{type}/{id}` → `204` (passivated) or `404` (not active).
//!
//! Errors are problem documents: unknown agent type → 404; a full mailbox, a store conflict or
//! shutdown → 503 with `Retry-After`; no reply in `agents.call_timeout_ms` → 504; a handler's
//! refusal → 422; an agent stopped after too many crashes → 500.
//!
//! Until placement exists, the owner is always this node and the epoch 1.

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
use crate::storage::Key;

/// The epoch reported until shards have owners and epochs.
const EPOCH_SINGLE_NODE: u64 = 1;

#[derive(Deserialize)]
pub struct CallQuery {
    mode: Option<String>,
}

fn call_error(e: CallError) -> Response {
    let (status, kind) = match &e {
        CallError::UnknownType(_) => (StatusCode::NOT_FOUND, "unknown-agent-type"),
        CallError::InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid-key"),
        CallError::MailboxFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "mailbox-full"),
        CallError::Unavailable(_) | CallError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        CallError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        CallError::Handler(_) => (StatusCode::UNPROCESSABLE_ENTITY, "handler-error"),
        CallError::Crashed => (StatusCode::INTERNAL_SERVER_ERROR, "agent-crashed"),
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
    let cast = match query.as_ref().map(|q| q.mode.as_deref()) {
        Ok(None | Some("call")) => false,
        Ok(Some("cast")) => true,
        Ok(Some(other)) => return bad_request(format!("mode {other:?} is not call or cast")),
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
    if cast {
        let id = signal.id.clone();
        return match s.agents.cast(&key, signal).await {
            Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "accepted": id }))).into_response(),
            Err(e) => call_error(e),
        };
    }
    match s.agents.call(&key, signal, s.call_timeout).await {
        Ok(reply) => Json(json!({ "reply": reply, "node": s.node_name, "epoch": EPOCH_SINGLE_NODE })).into_response(),
        Err(e) => call_error(e),
    }
}

pub async fn lookup(State(s): State<ApiState>, path: Result<Path<(String, String)>, PathRejection>) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    if !s.agents.has_type(&key.ty) {
        return call_error(CallError::UnknownType(key.ty));
    }
    let shard = crate::placement::shard_of(&key, crate::placement::SHARD_COUNT_DEFAULT);
    Json(json!({
        "type": key.ty,
        "id": key.id,
        "shard": shard,
        "owner": s.node_name,
        "epoch": EPOCH_SINGLE_NODE,
        "active": s.agents.is_active(&key),
    }))
    .into_response()
}

pub async fn stop(State(s): State<ApiState>, path: Result<Path<(String, String)>, PathRejection>) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    if !s.agents.has_type(&key.ty) {
        return call_error(CallError::UnknownType(key.ty));
    }
    if s.agents.stop(&key).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem(StatusCode::NOT_FOUND, "not-active", format!("{}/{} is not active", key.ty, key.id), json!({}))
    }
}
