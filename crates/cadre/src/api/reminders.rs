//! An agent's reminders over HTTP (see [`crate::agent::reminders`]).
//!
//! - `PUT /v1/agents/{type}/{id}/reminders/{name}` with `{"due_ms": N}` (Unix ms), `{"in_ms":
//!   N}` or `{"every_ms": N}` (with `due_ms` or `in_ms` for the first tick, else one period from
//!   now), and `"signal"`: a structured CloudEvent whose `id` and `source` may be left out → `200
//!   {"reminder": {...}, "node", "epoch"}`. Setting a name again replaces that reminder.
//! - `GET /v1/agents/{type}/{id}/reminders` (read options as for `/state`) → `{"reminders":
//!   [...], "node", "role", "age_ms"}`.
//! - `DELETE /v1/agents/{type}/{id}/reminders/{name}` → `204`, or `404` when there was none.
//!
//! A request the node can check (the name, the times, the period, the signal) is refused with 400
//! before it travels; the agent refuses one reminder too many with 422. Each request is a call to
//! the agent's owner, so it is stored with the agent's state before it is answered.

// Helpers return the response to send as their error; it is sent at once, never stored.
#![allow(clippy::result_large_err)]

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::agents::{call_error, ReadQuery};
use super::signals::{bad_request, problem, read_body};
use super::ApiState;
use crate::agent::reminders::{self, SetReminder};
use crate::signal::Signal;
use crate::storage::Key;

type ReminderPath = Result<Path<(String, String, String)>, PathRejection>;

fn key_and_name(path: ReminderPath) -> Result<(Key, String), Response> {
    let Path((ty, id, name)) = path.map_err(|e| bad_request(e.body_text()))?;
    reminders::check_name(&name).map_err(bad_request)?;
    Ok((Key::new(ty, id), name))
}

/// `PUT /v1/agents/{type}/{id}/reminders/{name}`.
pub async fn put(State(s): State<ApiState>, path: ReminderPath, headers: HeaderMap, body: Body) -> Response {
    let (key, name) = match key_and_name(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let body = match read_body(&headers, body, s.ingress_body_bytes_max).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let mut set: SetReminder = match serde_json::from_slice(&body) {
        Ok(set) => set,
        Err(e) => return bad_request(format!("the body: {e}")),
    };
    if !set.name.is_empty() && set.name != name {
        return bad_request(format!("the body names {:?}, the path {name:?}", set.name));
    }
    set.name = name;
    if let Err(e) = reminders::check(&set) {
        return bad_request(e);
    }
    let signal = Signal::new(reminders::OP_SET, serde_json::to_value(&set).expect("serializes"));
    match s.cluster.call(&key, signal, s.call_timeout).await {
        Ok(served) => Json(json!({
            "reminder": served.reply["reminder"],
            "node": served.node,
            "epoch": served.epoch,
        }))
        .into_response(),
        Err(e) => call_error(e),
    }
}

/// `GET /v1/agents/{type}/{id}/reminders`.
pub async fn list(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Response {
    let (ty, id) = match path {
        Ok(Path(p)) => p,
        Err(e) => return bad_request(e.body_text()),
    };
    let opts = match query.as_ref().map(|q| q.opts()) {
        Ok(Ok(opts)) => opts,
        Ok(Err(res)) => return res,
        Err(e) => return bad_request(e.body_text()),
    };
    let query = Signal::new(reminders::OP_LIST, serde_json::Value::Null);
    match s.cluster.read(&Key::new(ty, id), Some(query), opts, s.call_timeout).await {
        Ok(r) => Json(json!({
            "reminders": r.reply["reminders"],
            "node": r.node,
            "epoch": r.epoch,
            "role": r.role,
            "age_ms": r.age_ms,
        }))
        .into_response(),
        Err(e) => call_error(e),
    }
}

/// `DELETE /v1/agents/{type}/{id}/reminders/{name}`.
pub async fn delete(State(s): State<ApiState>, path: ReminderPath) -> Response {
    let (key, name) = match key_and_name(path) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let signal = Signal::new(reminders::OP_CANCEL, json!({ "name": name }));
    match s.cluster.call(&key, signal, s.call_timeout).await {
        Ok(served) if served.reply["cancelled"] == true => StatusCode::NO_CONTENT.into_response(),
        Ok(_) => problem(StatusCode::NOT_FOUND, "no-reminder", format!("{key:?} has no reminder {name:?}"), json!({})),
        // A retried cancel that took effect the first time.
        Err(crate::agent::CallError::Duplicate) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => call_error(e),
    }
}
