//! Agents over HTTP on one in-process node: calls, casts, lookups, stops and their errors.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cadre::api::client::{self, Method};
use cadre::config::{Config, Secret};
use cadre::node::{Node, NodeOptions};
use cadre::signal::codec::{encode_binary, encode_structured, CONTENT_TYPE_STRUCTURED};
use cadre::signal::Signal;

const T: Duration = Duration::from_secs(10);

async fn start() -> (Node, SocketAddr) {
    let cfg = Config {
        name: "a1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        secret: Secret::new("agents-http-test-secret"),
        ..Config::default()
    };
    let node = Node::start(cfg, NodeOptions::default()).await.unwrap();
    let http = node.http_addr().unwrap();
    (node, http)
}

async fn post(http: SocketAddr, path: &str, s: &Signal) -> (u16, serde_json::Value) {
    let (status, body) =
        client::post(http, path, CONTENT_TYPE_STRUCTURED, Bytes::from(encode_structured(s)), T).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

fn add(n: i64) -> Signal {
    Signal::new("counter.add", serde_json::json!(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_answer_over_http() {
    let (node, http) = start().await;
    let (status, body) = post(http, "/v1/agents/counter/c1", &add(5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({"reply": 5, "node": "a1", "epoch": 1}));
    // Binary mode too.
    let (headers, payload) = encode_binary(&add(2));
    let headers: Vec<(String, String)> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
    let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, body) = client::request(http, Method::POST, "/v1/agents/counter/c1", &refs, payload, T).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["reply"], 7);
    // A cast is accepted; the next call sees it (the mailbox is in order).
    let (status, body) = post(http, "/v1/agents/counter/c1?mode=cast", &add(3)).await;
    assert_eq!(status, 202, "{body}");
    let (_, body) = post(http, "/v1/agents/counter/c1", &Signal::new("counter.get", serde_json::json!(null))).await;
    assert_eq!(body["reply"], 10);

    let (status, body) = client::get(http, "/v1/agents/counter/c1", T).await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str(), v["owner"].as_str(), v["active"].as_bool()),
        (Some("counter"), Some("c1"), Some("a1"), Some(true))
    );
    assert!(v["shard"].as_u64().unwrap() < 256);

    let (status, _) =
        client::request(http, Method::DELETE, "/v1/agents/counter/c1", &[], Bytes::new(), T).await.unwrap();
    assert_eq!(status, 204);
    let (status, _) =
        client::request(http, Method::DELETE, "/v1/agents/counter/never", &[], Bytes::new(), T).await.unwrap();
    assert_eq!(status, 404);
    // Stopped, then activated again from its stored state.
    let (_, body) = post(http, "/v1/agents/counter/c1", &add(1)).await;
    assert_eq!(body["reply"], 11);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_errors_are_problems() {
    let (node, http) = start().await;
    let (status, body) = post(http, "/v1/agents/nope/x", &add(1)).await;
    assert_eq!((status, body["type"].as_str()), (404, Some("urn:cadre:problem:unknown-agent-type")));
    let (status, _) = client::get(http, "/v1/agents/nope/x", T).await.unwrap();
    assert_eq!(status, 404);
    let (status, body) = post(http, "/v1/agents/counter/c", &Signal::new("counter.add", serde_json::json!("x"))).await;
    assert_eq!((status, body["type"].as_str()), (422, Some("urn:cadre:problem:handler-error")));
    let (status, body) = post(http, "/v1/agents/counter/c?mode=sideways", &add(1)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        client::post(http, "/v1/agents/counter/c", CONTENT_TYPE_STRUCTURED, Bytes::from_static(b"{}"), T)
            .await
            .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["attribute"].as_str()), (400, Some("specversion")));
    let (status, _) =
        client::post(http, "/v1/agents/counter/c", "text/plain", Bytes::from_static(b"hi"), T).await.unwrap();
    assert_eq!(status, 415);
    assert_eq!(client::get(http, "/healthz", T).await.unwrap().0, 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_stored_state_over_http() {
    let (node, http) = start().await;
    let get = Signal::new("counter.get", serde_json::json!(null));
    // Nothing stored yet: the default state, served without activating the agent.
    let (status, body) = client::get(http, "/v1/agents/counter/r1/state", T).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], serde_json::json!({"value": 0}));
    assert_eq!((v["node"].as_str(), v["role"].as_str()), (Some("a1"), Some("owner")));
    let (_, v) = client::get(http, "/v1/agents/counter/r1", T).await.unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&v).unwrap()["active"], false);
    assert_eq!(post(http, "/v1/agents/counter/r1", &add(4)).await.1["reply"], 4);
    // A read-only call, from the nearest copy (the default) or the owner.
    for query in ["?mode=read", "?mode=read&from=owner", "?mode=read&from=nearest&stale_ms_max=5000"] {
        let (status, body) = post(http, &format!("/v1/agents/counter/r1{query}"), &get).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!((body["reply"].as_i64(), body["role"].as_str()), (Some(4), Some("owner")), "{query}");
        assert!(body["age_ms"].is_u64(), "{body}");
    }
    let (status, body) = client::get(http, "/v1/agents/counter/r1/state?from=owner", T).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["state"], serde_json::json!({"value": 4}));
    // A signal that changes the state is not a read: 422, and nothing changed.
    let (status, body) = post(http, "/v1/agents/counter/r1?mode=read", &add(1)).await;
    assert_eq!((status, body["type"].as_str()), (422, Some("urn:cadre:problem:not-a-read")), "{body}");
    assert_eq!(post(http, "/v1/agents/counter/r1", &get).await.1["reply"], 4);
    // Bad parameters are refused.
    for query in ["?mode=read&from=far", "?mode=read&stale_ms_max=0", "?mode=read&stale_ms_max=soon"] {
        let (status, body) = post(http, &format!("/v1/agents/counter/r1{query}"), &get).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let (_, body) = post(http, "/v1/agents/counter/r1?mode=read&from=far", &get).await;
    assert_eq!(body["type"], "urn:cadre:problem:invalid-request", "{body}");
    assert_eq!(body["detail"], "read \"far\" is not nearest or owner", "{body}");
    for query in ["?from=far", "?stale_ms_max=-1"] {
        let (status, _) = client::get(http, &format!("/v1/agents/counter/r1/state{query}"), T).await.unwrap();
        assert_eq!(status, 400, "{query}");
    }
    let (status, _) = client::get(http, "/v1/agents/nope/r1/state", T).await.unwrap();
    assert_eq!(status, 404);
    node.shutdown().await;
}

/// The sum of a metric's series with `labels` in the node's Prometheus text.
async fn metric(http: SocketAddr, series: &str) -> f64 {
    let (_, body) = client::get(http, "/metrics", T).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A client that retries with the same CloudEvent (source and id) changes the agent once: the
/// retry gets the original reply while the agent keeps it, then `"duplicate": true`. The same
/// holds for a signal published twice to a route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_or_publish_changes_the_agent_once() {
    let (node, http) = start().await;
    let first = add(5);
    for _ in 0..2 {
        let (status, body) = post(http, "/v1/agents/counter/d1", &first).await;
        assert_eq!((status, &body["reply"]), (200, &serde_json::json!(5)), "{body}");
    }
    for _ in 0..cadre::agent::handled::REPLIES_KEPT_MAX {
        post(http, "/v1/agents/counter/d1", &add(1)).await;
    }
    let (status, body) = post(http, "/v1/agents/counter/d1", &first).await;
    assert_eq!((status, body), (200, serde_json::json!({"reply": null, "duplicate": true})));
    let get = Signal::new("counter.get", serde_json::json!(null));
    let (_, body) = post(http, "/v1/agents/counter/d1", &get).await;
    assert_eq!(body["reply"], 5 + cadre::agent::handled::REPLIES_KEPT_MAX as i64);
    assert_eq!(metric(http, "cadre_agent_duplicates_total{reply=\"kept\"}").await, 1.0);
    assert_eq!(metric(http, "cadre_agent_duplicates_total{reply=\"gone\"}").await, 1.0);

    // Published twice (a publisher retrying) to a route: counted once.
    let route =
        serde_json::json!({"pattern": "counter.add", "dispatch": {"agent": {"type": "counter", "key": "subject"}}});
    let (status, _) =
        client::post(http, "/v1/subscriptions", "application/json", Bytes::from(route.to_string()), T).await.unwrap();
    assert_eq!(status, 201);
    let published = add(3).with_subject("p1");
    for _ in 0..2 {
        let (status, body) = post(http, "/v1/signals", &published).await;
        assert_eq!(status, 202, "{body}");
    }
    let then = add(10).with_subject("p1");
    post(http, "/v1/signals", &then).await;
    // Deliveries are asynchronous, in publish order: once the last is counted, so are the others.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (_, body) = post(http, "/v1/agents/counter/p1", &get).await;
        if body["reply"] == 13 {
            break;
        }
        assert!(body["reply"].as_i64().unwrap_or(0) < 13, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "p1 is {body}, not 13");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

async fn get_json(http: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = client::get(http, path, T).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

/// `GET /v1/agents/{type}` pages through the active agents (or the stored ids); one agent's
/// `GET` shows its counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_list_by_type_in_pages_and_show_their_counters() {
    let (node, http) = start().await;
    for id in ["b", "a", "c"] {
        assert_eq!(post(http, &format!("/v1/agents/counter/{id}"), &add(1)).await.0, 200);
    }
    post(http, "/v1/agents/counter/a", &add(1)).await;
    let (status, page) = get_json(http, "/v1/agents/counter?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page["agents"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!((ids, page["next"].as_str()), (vec!["a", "b"], Some("b")), "{page}");
    assert_eq!((page["agents"][0]["handled"].as_u64(), page["agents"][0]["node"].as_str()), (Some(2), Some("a1")));
    let (_, page) = get_json(http, "/v1/agents/counter?limit=2&after=b").await;
    assert_eq!((page["agents"][0]["id"].as_str(), &page["next"]), (Some("c"), &serde_json::Value::Null), "{page}");
    let (_, page) = get_json(http, "/v1/agents/counter?stored=true&after=a").await;
    assert_eq!(page["ids"], serde_json::json!(["b", "c"]), "{page}");
    let (status, v) = get_json(http, "/v1/agents/counter/a").await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["active"].as_bool(), v["stats"]["handled"].as_u64(), v["stats"]["mailbox_len"].as_u64()),
        (Some(true), Some(2), Some(0)),
        "{v}"
    );
    for (path, want) in [
        ("/v1/agents/nope", 404),
        ("/v1/agents/counter?limit=0", 400),
        ("/v1/agents/counter?limit=1001", 400),
        ("/v1/agents/counter?limit=x", 400),
    ] {
        assert_eq!(get_json(http, path).await.0, want, "{path}");
    }
    node.shutdown().await;
}

async fn put_json(http: SocketAddr, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let body = Bytes::from(body.to_string());
    let headers = [("content-type", "application/json")];
    let (status, body) = client::request(http, Method::PUT, path, &headers, body, T).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

/// Reminders set, listed and cancelled over HTTP; one fires its signal into the agent; what the
/// node can check is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_over_http_fire_list_and_cancel() {
    let (node, http) = start().await;
    let path = "/v1/agents/counter/r1/reminders";
    let once = serde_json::json!({"in_ms": 100, "signal": {"type": "counter.add", "data": 4}});
    let (status, body) = put_json(http, &format!("{path}/soon"), once).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["reminder"]["name"].as_str(), body["node"].as_str()), (Some("soon"), Some("a1")));
    let hourly = serde_json::json!({"every_ms": 3_600_000, "signal": {"type": "counter.add", "data": 1}});
    assert_eq!(put_json(http, &format!("{path}/hourly"), hourly).await.0, 200);
    // The reminder's signal reaches the agent (a cross-process event: polled with a deadline).
    let deadline = tokio::time::Instant::now() + T;
    let get = Signal::new("counter.get", serde_json::json!(null));
    loop {
        let (_, body) = post(http, "/v1/agents/counter/r1", &get).await;
        if body["reply"] == 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "r1 is {body}, not 4");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get_json(http, path).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["reminders"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hourly"], "the one-shot reminder is gone once fired");
    assert_eq!(metric(http, "cadre_reminder_fires_total{outcome=\"handled\"}").await, 1.0);
    let (status, _) = client::delete(http, &format!("{path}/hourly"), T).await.unwrap();
    assert_eq!(status, 204);
    let (status, _) = client::delete(http, &format!("{path}/hourly"), T).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(get_json(http, path).await.1["reminders"], serde_json::json!([]));
    // Refused before they travel.
    let signal = serde_json::json!({"type": "counter.add", "data": 1});
    for (name, body) in [
        ("p", serde_json::json!({"every_ms": 10, "signal": signal})),
        ("a%20b", serde_json::json!({"in_ms": 10, "signal": signal})),
        ("both", serde_json::json!({"in_ms": 10, "due_ms": 10, "signal": signal})),
        ("none", serde_json::json!({"signal": signal})),
        ("nosignal", serde_json::json!({"in_ms": 10})),
        ("unknown", serde_json::json!({"in_ms": 10, "signal": signal, "colour": "red"})),
        ("badsignal", serde_json::json!({"in_ms": 10, "signal": {"type": ""}})),
    ] {
        let (status, body) = put_json(http, &format!("{path}/{name}"), body).await;
        assert_eq!(status, 400, "{name}: {body}");
    }
    let (status, _) =
        put_json(http, "/v1/agents/nosuch/x/reminders/r", serde_json::json!({"in_ms": 1, "signal": signal})).await;
    assert_eq!(status, 404);
    node.shutdown().await;
}
