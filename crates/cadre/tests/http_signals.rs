//! The signals HTTP API of one in-process node on loopback: ingress in structured, batch and
//! binary mode, problem documents for client mistakes (never a 500), middleware and back-pressure
//! refusals, subscriptions, dead letters, traces and metrics.
//!
//! What was published is observed through an in-process channel subscription on the node's bus.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cadre::api::client;
use cadre::bus::{Dispatch, Middleware, Outcome, SubscriptionSpec, Target, Verdict};
use cadre::config::{Config, Secret};
use cadre::node::{Node, NodeOptions};
use cadre::signal::codec::{encode_batch, encode_structured};
use cadre::signal::{Data, Signal, TraceParent, CAUSATION_ID, TRACEPARENT};
use futures::future::BoxFuture;
use futures::FutureExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Guards against a hang only; no test depends on how long anything takes.
const WAIT: Duration = Duration::from_secs(20);
const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const PROBLEM: &str = "application/problem+json";

fn config() -> Config {
    Config {
        name: "http".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        secret: Secret::new("http-signals-secret-0123"),
        ..Config::default()
    }
}

async fn start(cfg: Config) -> (Node, SocketAddr) {
    let node = Node::start(cfg, NodeOptions::default()).await.unwrap();
    let http = node.http_addr().expect("the HTTP API runs");
    (node, http)
}

/// A channel subscription to `pattern`; keep the handle alive while receiving.
fn watch(node: &Node, pattern: &str) -> (cadre::bus::Subscription, mpsc::Receiver<Arc<Signal>>) {
    let (tx, rx) = mpsc::channel(64);
    let sub = node.bus().subscribe(SubscriptionSpec::new(pattern, Dispatch::Channel(tx))).unwrap();
    (sub, rx)
}

async fn next(rx: &mut mpsc::Receiver<Arc<Signal>>) -> Arc<Signal> {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("a signal arrives").expect("the subscription is open")
}

struct Res {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Res {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {} body is not JSON ({e}): {:?}", self.status, self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn content_type(&self) -> &str {
        self.headers.get(CONTENT_TYPE).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    /// Asserts a problem document with `status` and returns it.
    fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.content_type(), PROBLEM, "body: {}", self.text());
        let p = self.json();
        assert_eq!(p["status"], status, "{p}");
        assert!(p["type"].as_str().unwrap().starts_with("urn:cadre:problem:"), "{p}");
        assert!(!p["detail"].as_str().unwrap().is_empty(), "{p}");
        p
    }

    /// Asserts `202 {"accepted":[...]}` and returns the ids.
    fn accepted(&self) -> Vec<String> {
        assert_eq!(self.status, 202, "body: {}", self.text());
        serde_json::from_value(self.json()["accepted"].clone()).unwrap()
    }
}

/// One request on a new connection, with any body (a stream body goes chunked).
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: BoxBody<Bytes, Infallible>,
) -> Res {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = sender.send_request(req.body(body).unwrap()).await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        conn.abort();
        Res { status, headers, body }
    };
    tokio::time::timeout(WAIT, exchange).await.expect("the node answers")
}

async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Res {
    send(addr, method, path, headers, Full::new(body.into()).boxed()).await
}

async fn post(addr: SocketAddr, path: &str, content_type: &str, body: impl Into<Bytes>) -> Res {
    request(addr, Method::POST, path, &[("content-type", content_type)], body).await
}

async fn get(addr: SocketAddr, path: &str) -> Res {
    request(addr, Method::GET, path, &[], Bytes::new()).await
}

fn signal(ty: &str, data: Value) -> Signal {
    Signal::new(ty, data).with_subject("subj").with_extension("tenant", "acme")
}

/// The received signal is the posted one plus the `traceparent` the bus added.
fn assert_received(got: &Signal, sent: &Signal) {
    let tp = got.extension(TRACEPARENT).expect("the bus adds a traceparent");
    assert!(TraceParent::parse(tp).is_some(), "{tp}");
    let mut expected = sent.clone();
    expected.extensions.insert(TRACEPARENT.into(), tp.into());
    assert_eq!(got, &expected);
}

async fn assert_healthy(addr: SocketAddr) {
    let (status, body) = client::get(addr, "/healthz", WAIT).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_posts_are_published_as_sent() {
    let (node, addr) = start(config()).await;
    let (_sub, mut rx) = watch(&node, "order.**");

    for ct in [STRUCTURED, "application/cloudevents+json; charset=utf-8", "Application/CloudEvents+JSON"] {
        let sent = signal("order.created", json!({"n": 1, "ct": ct, "nested": {"a": [1, 2.5, null, "x"]}}));
        let res = post(addr, "/v1/signals", ct, encode_structured(&sent)).await;
        assert_eq!(res.accepted(), [sent.id.as_str()], "{ct}");
        assert_eq!(res.json(), json!({"accepted": [sent.id], "delivery": "eventual"}));
        assert_received(&*next(&mut rx).await, &sent);
    }

    // The level asked for is the level answered; an unknown one is a client error.
    for level in ["weak", "eventual", "strong"] {
        let sent = signal("order.created", json!({"level": level}));
        let res = post(addr, &format!("/v1/signals?delivery={level}"), STRUCTURED, encode_structured(&sent)).await;
        assert_eq!(res.json(), json!({"accepted": [sent.id], "delivery": level}));
        assert_received(&*next(&mut rx).await, &sent);
    }
    for bad in ["?delivery=sometimes", "?broadcast=true&delivery=strong", "?nope=1"] {
        let sent = signal("order.created", json!(null));
        let res = post(addr, &format!("/v1/signals{bad}"), STRUCTURED, encode_structured(&sent)).await;
        assert_eq!(res.status, 400, "{bad}: {:?}", res.json());
        assert_eq!(res.json()["type"], "urn:cadre:problem:invalid-query", "{bad}");
    }

    // A traceparent given by the client is kept.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let sent = signal("order.traced", json!(null)).with_extension(TRACEPARENT, tp);
    assert_eq!(post(addr, "/v1/signals", STRUCTURED, encode_structured(&sent)).await.accepted(), [sent.id.as_str()]);
    assert_eq!(*next(&mut rx).await, sent);

    // Hand-written JSON: typed extensions and implied content type come back in normal form.
    let body = json!({"specversion": "1.0", "id": "hand-1", "source": "/test", "type": "order.hand",
                      "flag": true, "count": 42, "data": [1, 2]});
    assert_eq!(post(addr, "/v1/signals", STRUCTURED, body.to_string()).await.accepted(), ["hand-1"]);
    let got = next(&mut rx).await;
    assert_eq!((got.id.as_str(), got.source.as_str(), got.ty.as_str()), ("hand-1", "/test", "order.hand"));
    assert_eq!(got.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(got.data, Some(Data::Json(json!([1, 2]))));
    assert_eq!((got.extension("flag"), got.extension("count")), (Some("true"), Some("42")));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_posts_are_published_in_order() {
    let (node, addr) = start(config()).await;
    let (_sub, mut rx) = watch(&node, "order.**");
    let sent: Vec<Signal> = (0..5).map(|i| signal(&format!("order.step{i}"), json!({"i": i}))).collect();
    let res = post(addr, "/v1/signals", BATCH, encode_batch(&sent)).await;
    assert_eq!(res.accepted(), sent.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
    for s in &sent {
        assert_received(&*next(&mut rx).await, s);
    }

    // An empty batch accepts nothing.
    assert_eq!(post(addr, "/v1/signals", BATCH, "[]").await.accepted(), Vec::<String>::new());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_posts_decode_headers() {
    let (node, addr) = start(config()).await;
    let (_sub, mut rx) = watch(&node, "order.**");
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin-1"),
        ("ce-source", "/bin%20source"),
        ("ce-type", "order.binary"),
        ("ce-subject", "Hello%20W%C3%B6rld"),
        ("ce-time", "2024-05-06T07:08:09.5Z"),
        ("ce-tenant", "acme"),
        ("content-type", "application/json"),
    ];
    let res = request(addr, Method::POST, "/v1/signals", &headers, r#"{"total":12.5}"#).await;
    assert_eq!(res.accepted(), ["bin-1"]);
    let got = next(&mut rx).await;
    assert_eq!((got.id.as_str(), got.source.as_str(), got.ty.as_str()), ("bin-1", "/bin source", "order.binary"));
    assert_eq!(got.subject.as_deref(), Some("Hello Wörld"));
    assert_eq!(got.time_rfc3339().as_deref(), Some("2024-05-06T07:08:09.500Z"));
    assert_eq!(got.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(got.data, Some(Data::Json(json!({"total": 12.5}))));
    assert_eq!(got.extension("tenant"), Some("acme"));
    assert!(got.extension(TRACEPARENT).and_then(TraceParent::parse).is_some());

    // Non-JSON data under its own content type; no Content-Type and no body is no data.
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin-2"),
        ("ce-source", "/bin"),
        ("ce-type", "order.text"),
        ("content-type", "text/plain"),
    ];
    assert_eq!(request(addr, Method::POST, "/v1/signals", &headers, "hi there").await.accepted(), ["bin-2"]);
    let got = next(&mut rx).await;
    assert_eq!(got.data, Some(Data::Binary(Bytes::from_static(b"hi there"))));
    assert_eq!(got.datacontenttype.as_deref(), Some("text/plain"));
    let headers = [("ce-specversion", "1.0"), ("ce-id", "bin-3"), ("ce-source", "/bin"), ("ce-type", "order.empty")];
    assert_eq!(request(addr, Method::POST, "/v1/signals", &headers, Bytes::new()).await.accepted(), ["bin-3"]);
    let got = next(&mut rx).await;
    assert_eq!((got.id.as_str(), &got.data, &got.datacontenttype), ("bin-3", &None, &None));
    node.shutdown().await;
}

/// A structured body of `len` bytes (padded with a long data string).
fn structured_of_len(id: &str, len: usize) -> Vec<u8> {
    let bare = json!({"specversion": "1.0", "id": id, "source": "/big", "type": "order.big", "data": ""});
    let pad = len - bare.to_string().len();
    let body = json!({"specversion": "1.0", "id": id, "source": "/big", "type": "order.big", "data": "x".repeat(pad)});
    let body = body.to_string().into_bytes();
    assert_eq!(body.len(), len);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_are_problems_and_never_500() {
    let mut cfg = config();
    cfg.signals.ingress_body_bytes_max = 1024;
    let (node, addr) = start(cfg).await;
    let (_sub, mut rx) = watch(&node, "**");

    // Missing source.
    let body = json!({"specversion": "1.0", "id": "x", "type": "order.created"}).to_string();
    let p = post(addr, "/v1/signals", STRUCTURED, body).await.problem(400);
    assert_eq!(p["attribute"], "source", "{p}");
    assert_eq!(p["type"], "urn:cadre:problem:invalid-signal", "{p}");
    assert!(p.get("index").is_none(), "{p}");

    // Empty source in binary mode, unsupported specversion, duplicate ce- headers, bad percent-encoding.
    let bin = |id: &'static str, source: &'static str| {
        vec![("ce-specversion", "1.0"), ("ce-id", id), ("ce-source", source), ("ce-type", "order.created")]
    };
    let p = request(addr, Method::POST, "/v1/signals", &bin("b", ""), Bytes::new()).await.problem(400);
    assert_eq!(p["attribute"], "source", "{p}");
    let body = json!({"specversion": "0.3", "id": "x", "source": "/s", "type": "t"}).to_string();
    assert_eq!(post(addr, "/v1/signals", STRUCTURED, body).await.problem(400)["attribute"], "specversion");
    let mut twice = bin("b", "/s");
    twice.push(("ce-id", "again"));
    assert_eq!(request(addr, Method::POST, "/v1/signals", &twice, Bytes::new()).await.problem(400)["attribute"], "id");
    let p = request(addr, Method::POST, "/v1/signals", &bin("b", "/s%FF"), Bytes::new()).await.problem(400);
    assert_eq!(p["attribute"], "source", "{p}");
    // JSON content type in binary mode with a body that is not JSON.
    let mut bad_json = bin("b", "/s");
    bad_json.push(("content-type", "application/json"));
    let p = request(addr, Method::POST, "/v1/signals", &bad_json, "{nope").await.problem(400);
    assert_eq!(p["attribute"], "data", "{p}");

    // A batch with an invalid element names its index (and the attribute).
    let good = signal("order.ok", json!(1));
    let mut batch = serde_json::from_slice::<Value>(&encode_batch(&[good.clone(), good.clone(), good])).unwrap();
    batch[1]["id"] = "second".into();
    batch[2]["id"] = "third".into();
    batch[2].as_object_mut().unwrap().remove("type");
    let p = post(addr, "/v1/signals", BATCH, batch.to_string()).await.problem(400);
    assert_eq!((&p["index"], &p["attribute"]), (&json!(2), &json!("type")), "{p}");

    // Malformed JSON, and JSON that is not an event or not a batch.
    for (ct, body) in [
        (STRUCTURED, "{\"specversion\":"),
        (STRUCTURED, ""),
        (STRUCTURED, "[]"),
        (STRUCTURED, "\u{0}\u{1}"),
        (BATCH, "[{"),
        (BATCH, "{}"),
        (BATCH, "[42]"),
    ] {
        let p = post(addr, "/v1/signals", ct, body).await.problem(400);
        assert_eq!(p["type"], "urn:cadre:problem:invalid-signal", "{ct} {body:?}: {p}");
    }

    // Over the body limit: declared by Content-Length, and streamed with chunked encoding.
    let p = post(addr, "/v1/signals", STRUCTURED, structured_of_len("big1", 2048)).await.problem(413);
    assert_eq!(p["limit_bytes"], 1024, "{p}");
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        structured_of_len("big2", 2048).chunks(128).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    let body = BoxBody::new(StreamBody::new(futures::stream::iter(chunks)));
    let res = send(addr, Method::POST, "/v1/signals", &[("content-type", STRUCTURED)], body).await;
    res.problem(413);
    // At the limit is fine, chunked too.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        structured_of_len("fits", 1024).chunks(100).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    let body = BoxBody::new(StreamBody::new(futures::stream::iter(chunks)));
    let res = send(addr, Method::POST, "/v1/signals", &[("content-type", STRUCTURED)], body).await;
    assert_eq!(res.accepted(), ["fits"]);
    assert_eq!(next(&mut rx).await.id, "fits");

    // Other content types (without ce-specversion), and none.
    let valid = encode_structured(&signal("order.created", json!(1)));
    for ct in ["text/plain", "application/json", "application/cloudevents"] {
        let p = post(addr, "/v1/signals", ct, valid.clone()).await.problem(415);
        assert_eq!(p["type"], "urn:cadre:problem:unsupported-media-type", "{p}");
    }
    request(addr, Method::POST, "/v1/signals", &[], valid.clone()).await.problem(415);

    // Nothing of the above was published: the next signal is a marker.
    let marker = signal("order.marker", json!("m"));
    assert_eq!(
        post(addr, "/v1/signals", STRUCTURED, encode_structured(&marker)).await.accepted(),
        [marker.id.as_str()]
    );
    assert_eq!(next(&mut rx).await.id, marker.id);
    assert_healthy(addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_batch_publishes_nothing() {
    let (node, addr) = start(config()).await;
    let (_sub, mut rx) = watch(&node, "order.**");
    let sent: Vec<Signal> = (0..4).map(|i| signal("order.item", json!(i))).collect();
    let mut batch = serde_json::from_slice::<Value>(&encode_batch(&sent)).unwrap();
    batch[2]["time"] = "yesterday".into();
    let p = post(addr, "/v1/signals", BATCH, batch.to_string()).await.problem(400);
    assert_eq!((&p["index"], &p["attribute"]), (&json!(2), &json!("time")), "{p}");

    let marker = signal("order.marker", json!("m"));
    post(addr, "/v1/signals", STRUCTURED, encode_structured(&marker)).await.accepted();
    assert_eq!(next(&mut rx).await.id, marker.id, "the marker is the first signal published");
    // The invalid batch is not in the journal either.
    for s in &sent {
        get(addr, &format!("/v1/signals/{}/trace", s.id)).await.problem(404);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_created_listed_and_deleted() {
    let (node, addr) = start(config()).await;
    let res =
        post(addr, "/v1/subscriptions", "application/json", r#"{"pattern":"order.**","dispatch":{"log":{}}}"#).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let id = res.json()["id"].as_u64().expect("a numeric id");

    let res = get(addr, "/v1/subscriptions").await;
    assert_eq!(res.status, 200);
    let list = res.json()["subscriptions"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["pattern"], "order.**");
    assert_eq!(list[0]["dispatch"], json!({"log": {}}));
    assert_eq!((&list[0]["priority"], &list[0]["overflow"]), (&json!(0), &json!("reject")));

    // Options, and a webhook whose secret is not shown.
    let body = json!({"pattern": "user.*.created", "dispatch": {"webhook": {"url": "http://127.0.0.1:9/hook",
              "secret": "s3cret"}}, "priority": 5, "overflow": "drop_oldest", "queue_len_max": 7});
    let res = post(addr, "/v1/subscriptions", "application/json", body.to_string()).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let hook = res.json()["id"].as_u64().unwrap();
    let info = node.bus().subscription(hook).unwrap();
    assert_eq!((info.pattern.as_str(), info.priority, info.queue_len_max), ("user.*.created", 5, 7));
    let res = get(addr, "/v1/subscriptions").await;
    assert!(!res.text().contains("s3cret"), "{}", res.text());

    let bad = [
        (json!({"pattern": "a..b", "dispatch": {"log": {}}}), "empty segment"),
        (json!({"pattern": "order.**", "dispatch": {"log": {}}, "colour": "red"}), "unknown field"),
        (json!({"pattern": "order.**", "dispatch": {"webhook": {"url": "https://example.com/h"}}}), "http://"),
        (json!({"pattern": "order.**", "dispatch": {"carrier_pigeon": {}}}), "unknown variant"),
        (json!({"pattern": "order.**", "dispatch": {"log": {}}, "queue_len_max": 0}), "queue_len_max"),
        (json!({"pattern": "order.**", "dispatch": {"log": {}}, "priority": 1000}), "priority"),
        (json!({"dispatch": {"log": {}}}), "pattern"),
    ];
    for (body, reason) in bad {
        let p = post(addr, "/v1/subscriptions", "application/json", body.to_string()).await.problem(400);
        assert_eq!(p["type"], "urn:cadre:problem:invalid-subscription", "{p}");
        assert!(p["detail"].as_str().unwrap().contains(reason), "{body}: {p}");
    }
    post(addr, "/v1/subscriptions", "application/json", "{not json").await.problem(400);
    let big = format!(r#"{{"pattern":"{}","dispatch":{{"log":{{}}}}}}"#, "a".repeat(70 * 1024));
    post(addr, "/v1/subscriptions", "application/json", big).await.problem(413);
    assert_eq!(node.bus().subscriptions().len(), 2, "no refused subscription was left behind");

    let path = format!("/v1/subscriptions/{id}");
    let res = request(addr, Method::DELETE, &path, &[], Bytes::new()).await;
    assert_eq!(res.status, 204, "{}", res.text());
    assert!(res.body.is_empty());
    request(addr, Method::DELETE, &path, &[], Bytes::new()).await.problem(404);
    request(addr, Method::DELETE, "/v1/subscriptions/notanumber", &[], Bytes::new()).await.problem(404);
    request(addr, Method::DELETE, "/v1/subscriptions/-1", &[], Bytes::new()).await.problem(404);
    let list = get(addr, "/v1/subscriptions").await.json();
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["subscriptions"][0]["id"], hook, "{list}");
    node.shutdown().await;
}

/// Refuses signals of type `blocked.**`.
struct Blocker;

impl Middleware for Blocker {
    fn name(&self) -> &str {
        "blocker"
    }
    fn before_publish<'a>(&'a self, signal: &'a Signal) -> BoxFuture<'a, Verdict> {
        let verdict = if signal.ty.starts_with("blocked.") {
            Verdict::Reject("no blocked signals".into())
        } else {
            Verdict::Continue
        };
        futures::future::ready(verdict).boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_rejections_are_422() {
    let (node, addr) = start(config()).await;
    node.bus().add_middleware(Arc::new(Blocker));
    let (_sub, mut rx) = watch(&node, "**");

    let blocked = signal("blocked.one", json!(1));
    let p = post(addr, "/v1/signals", STRUCTURED, encode_structured(&blocked)).await.problem(422);
    assert_eq!(p["type"], "urn:cadre:problem:rejected", "{p}");
    assert_eq!((&p["refused"], &p["accepted"], &p["not_published"]), (&json!(blocked.id), &json!([]), &json!(0)));
    assert!(p["detail"].as_str().unwrap().contains("no blocked signals"), "{p}");

    // In a batch, the signals before the refused one are published, the rest are not.
    let batch =
        [signal("ok.a", json!(0)), signal("blocked.b", json!(1)), signal("ok.c", json!(2)), signal("ok.d", json!(3))];
    let res = post(addr, "/v1/signals", BATCH, encode_batch(&batch)).await;
    assert!(res.headers.get(RETRY_AFTER).is_none());
    let p = res.problem(422);
    assert_eq!(p["accepted"], json!([batch[0].id]), "{p}");
    assert_eq!((&p["refused"], &p["not_published"]), (&json!(batch[1].id), &json!(2)), "{p}");
    assert_eq!(next(&mut rx).await.id, batch[0].id);
    let marker = signal("ok.marker", json!("m"));
    post(addr, "/v1/signals", STRUCTURED, encode_structured(&marker)).await.accepted();
    assert_eq!(next(&mut rx).await.id, marker.id);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscriber_queue_is_503_with_retry_after() {
    let (node, addr) = start(config()).await;
    // Never read: the worker blocks on the full channel and the queue of one fills up.
    let (tx, _rx) = mpsc::channel(1);
    let _sub = node.bus().subscribe(SubscriptionSpec::new("slow.**", Dispatch::Channel(tx)).queue_len_max(1)).unwrap();

    let mut refused = None;
    for i in 0..16 {
        let s = signal("slow.tick", json!(i));
        let res = post(addr, "/v1/signals", STRUCTURED, encode_structured(&s)).await;
        match res.status {
            202 => assert_eq!(res.accepted(), [s.id.as_str()]),
            _ => {
                refused = Some((i, s, res));
                break;
            }
        }
    }
    // At most one in the channel, one being sent and one queued.
    let (i, s, res) = refused.expect("the queue fills up");
    assert!(i <= 3, "refused only after {i} accepted");
    let p = res.problem(503);
    assert_eq!(res.headers.get(RETRY_AFTER).expect("Retry-After is set"), "1");
    assert_eq!(p["type"], "urn:cadre:problem:subscriber-queue-full", "{p}");
    assert_eq!((&p["refused"], &p["accepted"]), (&json!(s.id), &json!([])), "{p}");

    // Signals no full subscriber wants are still taken.
    let other = signal("fast.tick", json!(0));
    post(addr, "/v1/signals", STRUCTURED, encode_structured(&other)).await.accepted();
    let metrics = get(addr, "/metrics").await.text();
    assert!(counter(&metrics, "cadre_signals_rejected_total", r#"reason="queue_full""#) >= 1.0, "{metrics}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_causation_both_ways() {
    let (node, addr) = start(config()).await;
    let parent = signal("order.placed", json!({"order": 1}));
    let child = signal("order.shipped", json!({"order": 1})).with_extension(CAUSATION_ID, parent.id.clone());
    let grandchild = signal("order.billed", json!({"order": 1})).with_extension(CAUSATION_ID, child.id.clone());
    for s in [&parent, &child, &grandchild] {
        post(addr, "/v1/signals", STRUCTURED, encode_structured(s)).await.accepted();
    }
    let ids = |t: &Value| -> Vec<String> {
        t["steps"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };

    let res = get(addr, &format!("/v1/signals/{}/trace", child.id)).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let t = res.json();
    assert_eq!((&t["id"], &t["direction"]), (&json!(child.id), &json!("backward")), "{t}");
    assert_eq!(ids(&t), [child.id.clone(), parent.id.clone()]);
    let first = &t["steps"][0];
    assert_eq!(
        (&first["type"], &first["source"], &first["depth"]),
        (&json!("order.shipped"), &json!(child.source), &json!(0))
    );
    assert_eq!(first["causationid"], parent.id);
    assert_eq!(first["time"], child.time_rfc3339().unwrap());
    assert_eq!(t["steps"][1]["depth"], 1);
    assert!(t["steps"][1].get("causationid").is_none(), "{t}");

    let t = get(addr, &format!("/v1/signals/{}/trace?direction=backward", grandchild.id)).await.json();
    assert_eq!(ids(&t), [grandchild.id.clone(), child.id.clone(), parent.id.clone()]);
    let res = get(addr, &format!("/v1/signals/{}/trace?direction=forward", parent.id)).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let t = res.json();
    assert_eq!(t["direction"], "forward");
    assert_eq!(ids(&t), [parent.id.clone(), child.id.clone(), grandchild.id.clone()]);
    let t = get(addr, &format!("/v1/signals/{}/trace?direction=forward", grandchild.id)).await.json();
    assert_eq!(ids(&t), [grandchild.id.as_str()]);

    get(addr, "/v1/signals/no-such-signal/trace").await.problem(404);
    let p = get(addr, &format!("/v1/signals/{}/trace?direction=sideways", parent.id)).await.problem(400);
    assert!(p["detail"].as_str().unwrap().contains("sideways"), "{p}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadletters_start_empty() {
    let (node, addr) = start(config()).await;
    let res = get(addr, "/v1/deadletters").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json(), json!({"deadletters": []}));
    node.shutdown().await;
}

/// Reports each failed delivery (after it was dead-lettered).
struct Failures(mpsc::UnboundedSender<String>);

impl Middleware for Failures {
    fn name(&self) -> &str {
        "failures"
    }
    fn after_dispatch<'a>(
        &'a self,
        signal: &'a Signal,
        _target: Target<'a>,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, ()> {
        if matches!(outcome, Outcome::Failed { .. }) {
            let _ = self.0.send(signal.id.clone());
        }
        futures::future::ready(()).boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadletters_list_failed_deliveries() {
    let (node, addr) = start(config()).await;
    let (failed_tx, mut failed) = mpsc::unbounded_channel();
    node.bus().add_middleware(Arc::new(Failures(failed_tx)));
    // A dropped receiver: the delivery fails and is dead-lettered.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let sub = node.bus().subscribe(SubscriptionSpec::new("lost.**", Dispatch::Channel(tx))).unwrap();
    let s = signal("lost.one", json!(1));
    post(addr, "/v1/signals", STRUCTURED, encode_structured(&s)).await.accepted();
    let id = tokio::time::timeout(WAIT, failed.recv()).await.expect("the delivery fails").unwrap();
    assert_eq!(id, s.id);

    let letters = get(addr, "/v1/deadletters").await.json();
    let list = letters["deadletters"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{letters}");
    assert_eq!((&list[0]["subscription"], &list[0]["reason"]), (&json!(sub.id()), &json!("channel closed")));
    assert_eq!((&list[0]["attempts"], &list[0]["dispatch"]), (&json!(1), &json!({"channel": {}})));
    assert_eq!(list[0]["signal"]["id"], s.id);
    assert_eq!(list[0]["signal"]["data"], 1);
    node.shutdown().await;
}

/// The value of a Prometheus sample of `name` whose labels contain `label`.
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_posts_are_counted() {
    let (node, addr) = start(config()).await;
    let before = counter(&get(addr, "/metrics").await.text(), "cadre_signals_rejected_total", r#"reason="invalid""#);
    assert_eq!(before, 0.0);
    post(addr, "/v1/signals", STRUCTURED, r#"{"specversion":"1.0","id":"x","type":"t"}"#).await.problem(400);
    post(addr, "/v1/signals", BATCH, "[1]").await.problem(400);
    let res = get(addr, "/metrics").await;
    assert_eq!(res.status, 200);
    let text = res.text();
    assert_eq!(counter(&text, "cadre_signals_rejected_total", r#"reason="invalid""#), 2.0, "{text}");
    node.shutdown().await;
}

/// Path and query extraction failures, unknown routes and methods are problem documents too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_rejections_are_problems() {
    let (node, addr) = start(config()).await;
    get(addr, "/v1/signals/%FF/trace").await.problem(400);
    get(addr, "/v1/signals/x/trace?direction=forward&direction=backward").await.problem(400);
    request(addr, Method::DELETE, "/v1/subscriptions/%FF", &[], Bytes::new()).await.problem(400);
    get(addr, "/v1/nothing-here").await.problem(404);
    get(addr, "/v1/signals").await.problem(405);
    node.shutdown().await;
}
