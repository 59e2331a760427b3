//! End to end: signals posted to `/v1/signals` reach a webhook receiver on loopback, signed and in
//! order; a flaky receiver gets each signal exactly once after its failures; a dead receiver ends
//! in the dead-letter list with its breaker open.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use cadre::api::client;
use cadre::bus::webhook::{verify, SIGNATURE_HEADER};
use cadre::bus::{Middleware, Outcome, Target};
use cadre::config::{Config, Secret, SignalsConfig};
use cadre::node::{Node, NodeOptions};
use cadre::signal::codec::{
    decode_structured, encode_batch, encode_structured, CONTENT_TYPE_BATCH, CONTENT_TYPE_STRUCTURED,
};
use cadre::signal::Signal;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);
const HOOK_SECRET: &str = "whsec-test-secret";

/// One request seen by the receiver.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    mode: String,
    id: String,
    signed: bool,
    status: u16,
}

struct Receiver {
    flaky_failures_left: AtomicU32,
    seen: mpsc::UnboundedSender<Seen>,
}

async fn hook(State(r): State<Arc<Receiver>>, Path(mode): Path<String>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let signed = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| verify(HOOK_SECRET.as_bytes(), h, &body, now_s, 300));
    let content_type_ok = headers.get("content-type").is_some_and(|v| v == CONTENT_TYPE_STRUCTURED);
    let id = decode_structured(&body).map(|s| s.id).unwrap_or_else(|e| format!("undecodable: {e}"));
    let status = match mode.as_str() {
        _ if !content_type_ok => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "ok" => StatusCode::OK,
        "flaky" => {
            let left = r.flaky_failures_left.load(Ordering::SeqCst);
            if left > 0 {
                r.flaky_failures_left.store(left - 1, Ordering::SeqCst);
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::NO_CONTENT
            }
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    r.seen.send(Seen { mode, id, signed, status: status.as_u16() }).unwrap();
    status
}

async fn start_receiver(flaky_failures: u32) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(Receiver { flaky_failures_left: AtomicU32::new(flaky_failures), seen: tx });
    let app = axum::Router::new().route("/{mode}", axum::routing::post(hook)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

/// Reports every finished delivery of the node's bus.
struct Outcomes(mpsc::UnboundedSender<Outcome>);

impl Middleware for Outcomes {
    fn name(&self) -> &str {
        "outcomes"
    }
    fn after_dispatch<'a>(&'a self, _s: &'a Signal, _t: Target<'a>, o: &'a Outcome) -> BoxFuture<'a, ()> {
        let _ = self.0.send(o.clone());
        futures::future::ready(()).boxed()
    }
}

async fn start_node(signals: SignalsConfig) -> (Node, SocketAddr, mpsc::UnboundedReceiver<Outcome>) {
    let cfg = Config {
        name: "hooks".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        secret: Secret::new("webhook-test-cluster-secret"),
        signals,
        ..Config::default()
    };
    let node = Node::start(cfg, NodeOptions::default()).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    node.bus().add_middleware(Arc::new(Outcomes(tx)));
    let http = node.http_addr().unwrap();
    (node, http, rx)
}

fn fast_retries() -> SignalsConfig {
    SignalsConfig { webhook_backoff_min_ms: 1, webhook_backoff_max_ms: 4, ..SignalsConfig::default() }
}

async fn subscribe(http: SocketAddr, body: serde_json::Value) -> u64 {
    let (status, res) = client::post(
        http,
        "/v1/subscriptions",
        "application/json",
        Bytes::from(body.to_string()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&res));
    serde_json::from_slice::<serde_json::Value>(&res).unwrap()["id"].as_u64().unwrap()
}

async fn post(http: SocketAddr, content_type: &str, body: Vec<u8>) -> serde_json::Value {
    let (status, res) =
        client::post(http, "/v1/signals", content_type, Bytes::from(body), Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&res));
    serde_json::from_slice(&res).unwrap()
}

async fn get_json(http: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = client::get(http, path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

fn order(n: usize) -> Signal {
    Signal::new("order.placed", serde_json::json!({ "n": n })).with_subject(format!("order-{n}"))
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("the receiver saw nothing").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_signals_reach_the_webhook_signed_and_in_order() {
    let (hook_addr, mut seen) = start_receiver(0).await;
    let (node, http, _outcomes) = start_node(fast_retries()).await;
    let url = format!("http://{hook_addr}/ok");
    subscribe(
        http,
        serde_json::json!({"pattern": "order.**", "dispatch": {"webhook": {"url": url, "secret": HOOK_SECRET}}}),
    )
    .await;
    let signals: Vec<Signal> = (0..30).map(order).collect();
    // A batch, then one at a time.
    let accepted = post(http, CONTENT_TYPE_BATCH, encode_batch(&signals[..10])).await;
    assert_eq!(accepted["accepted"].as_array().unwrap().len(), 10);
    for s in &signals[10..] {
        post(http, CONTENT_TYPE_STRUCTURED, encode_structured(s)).await;
    }
    for s in &signals {
        let got = next(&mut seen).await;
        assert_eq!(got, Seen { mode: "ok".into(), id: s.id.clone(), signed: true, status: 200 });
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_receiver_gets_the_signal_exactly_once_after_its_failures() {
    const FAILURES: u32 = 3;
    let (hook_addr, mut seen) = start_receiver(FAILURES).await;
    let (node, http, mut outcomes) = start_node(fast_retries()).await;
    let url = format!("http://{hook_addr}/flaky");
    subscribe(http, serde_json::json!({"pattern": "order.*", "dispatch": {"webhook": {"url": url}}})).await;
    let (a, b) = (order(1), order(2));
    post(http, CONTENT_TYPE_STRUCTURED, encode_structured(&a)).await;
    post(http, CONTENT_TYPE_STRUCTURED, encode_structured(&b)).await;
    for _ in 0..FAILURES {
        let got = next(&mut seen).await;
        assert_eq!((got.id.as_str(), got.status, got.signed), (a.id.as_str(), 503, false));
    }
    assert_eq!(next(&mut seen).await.id, a.id);
    // The next request is already the second signal: the first was not sent again.
    let got = next(&mut seen).await;
    assert_eq!((got.id.as_str(), got.status), (b.id.as_str(), 204));
    let first = tokio::time::timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
    assert_eq!(first, Outcome::Delivered { attempts: FAILURES + 1 });
    assert_eq!(get_json(http, "/v1/deadletters").await["deadletters"], serde_json::json!([]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_ends_in_the_dead_letters_with_its_breaker_open() {
    let (hook_addr, mut seen) = start_receiver(0).await;
    let cfg = SignalsConfig { breaker_failures_max: 3, breaker_cooldown_ms: 3_600_000, ..fast_retries() };
    let (node, http, mut outcomes) = start_node(cfg).await;
    let url = format!("http://{hook_addr}/down");
    let id = subscribe(http, serde_json::json!({"pattern": "order.**", "dispatch": {"webhook": {"url": url}}})).await;
    let s = order(7);
    post(http, CONTENT_TYPE_STRUCTURED, encode_structured(&s)).await;
    let outcome = tokio::time::timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
    let Outcome::Failed { attempts, reason } = outcome else { panic!("delivered to a dead receiver") };
    // Three failures open the breaker; the remaining retries find it open and send nothing.
    assert_eq!(attempts, 3);
    assert!(reason.contains("circuit open"), "{reason}");
    for _ in 0..3 {
        assert_eq!(seen.try_recv().unwrap().status, 500);
    }
    assert!(seen.try_recv().is_err(), "no request while the breaker is open");

    let letters = get_json(http, "/v1/deadletters").await;
    let letters = letters["deadletters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["subscription"], id);
    assert_eq!(letters[0]["attempts"], 3);
    assert_eq!(letters[0]["signal"]["id"], s.id);
    assert_eq!(letters[0]["dispatch"]["webhook"]["url"], url);
    let subs = get_json(http, "/v1/subscriptions").await;
    assert_eq!(subs["subscriptions"][0]["breaker"], "open");
    assert_eq!(subs["subscriptions"][0]["failed"], 1);
    let (_, metrics) = client::get(http, "/metrics", Duration::from_secs(5)).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("cadre_breaker_opened_total 1"), "{metrics}");
    assert!(metrics.contains("cadre_deadletters_total 1"), "{metrics}");

    // While open, the next signal fails at once without reaching the receiver.
    post(http, CONTENT_TYPE_STRUCTURED, encode_structured(&order(8))).await;
    let outcome = tokio::time::timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Failed { attempts: 0, .. }), "{outcome:?}");
    assert!(seen.try_recv().is_err());
    node.shutdown().await;
}
