//! Signal ingress, subscriptions, dead letters and traces over HTTP.
//!
//! - `POST /v1/signals?delivery=weak|eventual|strong` (default `eventual`, see
//!   [`crate::bus::remote`]; `?broadcast=true`: to every live node through the broadcast tree,
//!   best effort, answered as `weak`): a structured (`application/cloudevents+json`), batch
//!   (`application/cloudevents-batch+json`) or binary-mode (`ce-specversion` header present) body,
//!   published on the node's bus and sent to the other interested nodes. `202 {"accepted":[ids],
//!   "delivery":level}` when every signal was taken at that level.
//!   Client mistakes are `application/problem+json`: `400` naming the attribute (and the batch
//!   index), `413` for a body over `signals.ingress_body_bytes_max`, `415` for another content type.
//!   A batch is validated as a whole before anything is published. When publishing refuses a
//!   signal (middleware: `422`; a full subscriber queue or shutdown: `503` with `Retry-After`), the
//!   problem lists what was accepted before it and what was refused.
//! - `POST /v1/subscriptions` `{"pattern","dispatch":{"log":{}}|{"webhook":{"url","secret"}},
//!   "priority"?,"overflow"?:"reject"|"drop_oldest","queue_len_max"?}` → `201 {"id"}`; with
//!   `"dispatch":{"agent":{"type","key":"subject"|"/json/pointer"}}|{"pool":{"type"}}` a
//!   cluster-wide route (see [`crate::bus::agents`]) → `201 {"id","route","unconfirmed"}` once
//!   mirrored here and on every live member (`unconfirmed`: those that did not confirm within the
//!   call timeout), `503` without a leader; `GET /v1/subscriptions`; `DELETE /v1/subscriptions/{id}` → `204` or `404`
//!   (a route's mirror: the route goes from every node).
//! - `GET /v1/interest`: `{"nodes":[{"node","patterns"}],"buffered"}`, which nodes want which
//!   signal types as this node knows it, and the copies it buffers for other nodes.
//! - `GET /v1/deadletters`: deliveries given up, oldest first.
//! - `GET /v1/signals/{id}/trace?direction=backward|forward` (default backward): the causality
//!   chain from the node's journal, at most 100 steps; `404` if the journal does not know the id.
//! - Unknown paths (`404`) and methods (`405`) are problem documents too.
//!
//! Caveat: a signal refused with `503` (a full subscriber queue) may already be queued for other
//! subscribers (the problem's `detail` says how many) and is in the journal; retrying it can
//! deliver it twice to those. Receivers de-duplicate by id.

// Helpers return the response to send as their error; it is sent at once, never stored.
#![allow(clippy::result_large_err)]

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use super::ApiState;
use crate::bus::{Delivery, PublishError, SubId, SubscriptionJson};
use crate::signal::codec::{self, CONTENT_TYPE_BATCH, CONTENT_TYPE_STRUCTURED};
use crate::signal::journal::Direction;
use crate::signal::{Signal, SignalError};

/// Largest `POST /v1/subscriptions` body.
const SUBSCRIPTION_BODY_BYTES_MAX: usize = 64 * 1024;
/// What a `503` asks the client to wait, in seconds.
const RETRY_AFTER_S: &str = "1";

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
pub fn problem(status: StatusCode, kind: &str, detail: impl Into<String>, extra: serde_json::Value) -> Response {
    let mut body = json!({
        "type": format!("urn:cadre:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let mut res = (status, Json(body)).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    res
}

fn invalid_signal(s: &ApiState, e: &SignalError) -> Response {
    s.bus.count_invalid();
    let mut extra = json!({});
    if let Some(a) = e.attribute() {
        extra["attribute"] = a.into();
    }
    if let SignalError::InBatch { index, .. } = e {
        extra["index"] = (*index).into();
    }
    info!(error = %e, "invalid signal refused");
    problem(StatusCode::BAD_REQUEST, "invalid-signal", e.to_string(), extra)
}

/// Reads a body up to `limit` bytes; a larger one is a 413 problem.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, Response> {
    let too_large = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("the body exceeds {limit} bytes"),
            json!({"limit_bytes": limit}),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(problem(StatusCode::BAD_REQUEST, "bad-body", format!("cannot read the body: {e}"), json!({}))),
    }
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Decodes a request in structured or binary mode, and in batch mode when `batch` is allowed;
/// or the problem to answer (415 for another content type, 400 for an invalid signal).
fn decode(s: &ApiState, headers: &HeaderMap, body: &[u8], batch: bool) -> Result<Vec<Signal>, Response> {
    let decoded = match media_type(headers).as_deref() {
        Some(CONTENT_TYPE_STRUCTURED) => codec::decode_structured(body).map(|s| vec![s]),
        Some(CONTENT_TYPE_BATCH) if batch => codec::decode_batch(body),
        _ if codec::is_binary_mode(headers) => codec::decode_binary(headers, body).map(|s| vec![s]),
        other => {
            let accepted = if batch {
                format!("{CONTENT_TYPE_STRUCTURED} or {CONTENT_TYPE_BATCH}")
            } else {
                CONTENT_TYPE_STRUCTURED.into()
            };
            let detail = format!(
                "content type {:?} is not {accepted}, and there is no ce-specversion header (binary mode)",
                other.unwrap_or("(none)")
            );
            return Err(problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", detail, json!({})));
        }
    };
    decoded.map_err(|e| invalid_signal(s, &e))
}

/// One signal in structured or binary mode (agent calls), or the problem to answer.
pub(crate) fn decode_one(s: &ApiState, headers: &HeaderMap, body: &[u8]) -> Result<Signal, Response> {
    let mut signals = decode(s, headers, body, false)?;
    debug_assert_eq!(signals.len(), 1, "without batch mode a request holds one signal");
    Ok(signals.remove(0))
}

/// The query of `POST /v1/signals`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishQuery {
    #[serde(default)]
    pub delivery: Delivery,
    /// To every live node's subscriptions, through the broadcast tree (best effort).
    #[serde(default)]
    pub broadcast: bool,
}

pub async fn post_signals(
    State(s): State<ApiState>,
    query: Result<Query<PublishQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (delivery, broadcast) = match query {
        Ok(Query(q)) if q.broadcast && q.delivery != Delivery::Weak && q.delivery != Delivery::Eventual => {
            let detail = "a broadcast is best effort (weak); it cannot be strong";
            return problem(StatusCode::BAD_REQUEST, "invalid-query", detail, json!({}));
        }
        Ok(Query(q)) if q.broadcast => (Delivery::Weak, true),
        Ok(Query(q)) => (q.delivery, false),
        Err(e) => {
            let detail = format!("{}; delivery is weak, eventual (default) or strong", e.body_text());
            return problem(StatusCode::BAD_REQUEST, "invalid-query", detail, json!({}));
        }
    };
    let body = match read_body(&headers, body, s.ingress_body_bytes_max).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let signals = match decode(&s, &headers, &body, true) {
        Ok(signals) => signals,
        Err(res) => return res,
    };
    let mut accepted = Vec::with_capacity(signals.len());
    let total = signals.len();
    for signal in signals {
        let id = signal.id.clone();
        let published = match broadcast {
            true => s.bus.broadcast(signal).await,
            false => s.bus.publish_with(signal, delivery).await,
        };
        match published {
            Ok(p) => accepted.push(p.id),
            Err(e) => return refused(&id, e, accepted, total),
        }
    }
    (StatusCode::ACCEPTED, Json(json!({ "accepted": accepted, "delivery": delivery }))).into_response()
}

fn refused(id: &str, e: PublishError, accepted: Vec<String>, total: usize) -> Response {
    let (status, kind) = match &e {
        PublishError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid-signal"),
        PublishError::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
        PublishError::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "subscriber-queue-full"),
        PublishError::BufferFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "node-buffer-full"),
        PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large-for-other-nodes"),
        PublishError::StrongUnmet { .. } => (StatusCode::SERVICE_UNAVAILABLE, "strong-unmet"),
        PublishError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting-down"),
    };
    let not_sent = total - accepted.len() - 1;
    let extra = json!({"accepted": accepted, "refused": id, "not_published": not_sent});
    let mut res = problem(status, kind, e.to_string(), extra);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    }
    res
}

pub async fn post_subscription(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&headers, body, SUBSCRIPTION_BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let spec: SubscriptionJson = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid-subscription", e.to_string(), json!({})),
    };
    let created = match spec.into_spec() {
        Ok(spec) => s.bus.subscribe_detached(spec).map(|id| json!({ "id": id })),
        // An agent or pool target: a cluster-wide route, mirrored here before the answer.
        Err(route) => s
            .bus
            .add_route(route, s.call_timeout)
            .await
            .map(|r| json!({ "id": r.sub, "route": r.id.to_string(), "unconfirmed": r.unconfirmed })),
    };
    match created {
        Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
        Err(crate::bus::SubscribeError::Cluster(e)) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "cluster-unavailable", e, json!({}))
        }
        Err(crate::bus::SubscribeError::ShuttingDown) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", "the node is shutting down", json!({}))
        }
        Err(crate::bus::SubscribeError::TooMany(n)) => problem(
            StatusCode::CONFLICT,
            "too-many-subscriptions",
            format!("the node has {n} subscriptions, its limit"),
            json!({}),
        ),
        Err(e) => problem(StatusCode::BAD_REQUEST, "invalid-subscription", e.to_string(), json!({})),
    }
}

/// `GET /v1/interest`: the interest map as this node holds it, and what it buffers for others.
pub async fn interest(State(s): State<ApiState>) -> Response {
    let nodes: Vec<_> = s.bus.interest().into_iter().map(|e| json!({"node": e.node, "patterns": e.patterns})).collect();
    Json(json!({ "nodes": nodes, "buffered": s.bus.remote_buffered() })).into_response()
}

pub async fn list_subscriptions(State(s): State<ApiState>) -> Response {
    Json(json!({ "subscriptions": s.bus.subscriptions() })).into_response()
}

/// A 400 problem for a path or query axum could not extract.
pub(crate) fn bad_request(e: impl std::fmt::Display) -> Response {
    problem(StatusCode::BAD_REQUEST, "invalid-request", e.to_string(), json!({}))
}

pub async fn delete_subscription(State(s): State<ApiState>, id: Result<Path<String>, PathRejection>) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return bad_request(e.body_text()),
    };
    let parsed = id.parse::<SubId>();
    // A mirror of a cluster-wide route: the route goes, on every node.
    if let Some(route) = parsed.as_ref().ok().and_then(|id| s.bus.route_of(*id)) {
        return match s.bus.remove_route(route, s.call_timeout).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "cluster-unavailable", e.to_string(), json!({})),
        };
    }
    match parsed {
        Ok(id) if s.bus.unsubscribe(id) => StatusCode::NO_CONTENT.into_response(),
        _ => problem(StatusCode::NOT_FOUND, "not-found", format!("no subscription {id:?}"), json!({})),
    }
}

pub async fn deadletters(State(s): State<ApiState>) -> Response {
    Json(json!({ "deadletters": s.bus.deadletters() })).into_response()
}

#[derive(Deserialize)]
pub struct TraceQuery {
    direction: Option<String>,
}

#[derive(Serialize)]
struct TraceJson {
    id: String,
    direction: &'static str,
    steps: Vec<crate::signal::journal::TraceStep>,
}

pub async fn trace(
    State(s): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<TraceQuery>, QueryRejection>,
) -> Response {
    let (id, q) = match (id, q) {
        (Ok(Path(id)), Ok(Query(q))) => (id, q),
        (Err(e), _) => return bad_request(e.body_text()),
        (_, Err(e)) => return bad_request(e.body_text()),
    };
    let (direction, name) = match q.direction.as_deref() {
        None | Some("backward") => (Direction::Backward, "backward"),
        Some("forward") => (Direction::Forward, "forward"),
        Some(other) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                format!("direction {other:?} is not backward or forward"),
                json!({}),
            )
        }
    };
    match s.bus.trace(&id, direction) {
        Some(steps) => Json(TraceJson { id, direction: name, steps }).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("signal {id:?} is not in this node's journal"),
            json!({}),
        ),
    }
}

pub async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "not-found", "no such resource", json!({}))
}

pub async fn method_not_allowed() -> Response {
    problem(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "method not allowed on this resource", json!({}))
}
