//! Real processes: signals published over HTTP on one node reach a webhook subscribed on another
//! and agents through a cluster-wide route added on the third; the order flow of the demo's
//! example agents runs across the nodes.
//!
//! Conditions are awaited by polling the nodes' HTTP API with a deadline.

#[path = "../src/hook.rs"]
mod hook;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cadre::api::client;
use cadre::signal::codec::{encode_batch, CONTENT_TYPE_BATCH};
use cadre::signal::Signal;
use support::proc::{self, wait_ready, NodeProc, NodeSpec};
use support::{await_cluster, call, exe, on_desired_owners, POLL};

const SECRET: &str = "pubsub-test-secret-0123";
const HOOK_SECRET: &str = "pubsub-test-hook-secret";
const WAIT: Duration = Duration::from_secs(30);
const HTTP: Duration = Duration::from_secs(5);

async fn post_json(http: SocketAddr, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (status, res) =
        client::post(http, path, "application/json", Bytes::from(body.to_string()), HTTP).await.unwrap();
    (status, serde_json::from_slice(&res).unwrap_or(serde_json::Value::Null))
}

async fn await_get(http: SocketAddr, path: &str, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    proc::await_json(http, path, what, WAIT, cond).await.unwrap();
}

fn interested(v: &serde_json::Value, node: &str, pattern: &str) -> bool {
    v["nodes"].as_array().is_some_and(|nodes| {
        nodes
            .iter()
            .any(|n| n["node"] == node && n["patterns"].as_array().is_some_and(|p| p.iter().any(|x| x == pattern)))
    })
}

fn mirrors(v: &serde_json::Value, route: &str) -> bool {
    v["subscriptions"].as_array().is_some_and(|subs| subs.iter().any(|s| s["route"] == route))
}

async fn publish(http: SocketAddr, signals: &[Signal], delivery: &str) {
    let body = Bytes::from(encode_batch(signals));
    let path = format!("/v1/signals?delivery={delivery}");
    let (status, res) = client::post(http, &path, CONTENT_TYPE_BATCH, body, HTTP).await.unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&res));
    let v: serde_json::Value = serde_json::from_slice(&res).unwrap();
    assert_eq!(v["delivery"], delivery);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_from_one_node_reach_a_webhook_on_another_and_agents_through_a_route_from_the_third() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    std::fs::write(&config, "[placement]\nrebalance_interval_ms = 200\nmax_moves_per_tick = 256\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let spawn = |name: &str, seeds: &[SocketAddr]| {
        NodeProc::spawn(NodeSpec { exe: exe(), name, seeds, dir: dir.path(), secret: SECRET, extra: &extra }).unwrap()
    };
    let n1 = spawn("s1", &[]);
    let n2 = spawn("s2", &[n1.addr]);
    let n3 = spawn("s3", &[n1.addr]);
    let nodes = [n1, n2, n3];
    for n in &nodes {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    let (h1, h2, h3) = (nodes[0].http, nodes[1].http, nodes[2].http);
    await_cluster(h1, "three members, each on its desired shards", WAIT, |c| {
        c.members.len() == 3 && on_desired_owners(c)
    })
    .await;

    // A webhook on s1, for orders and captured payments.
    let (hook, mut received) = hook::webhook_receiver(HOOK_SECRET).await.unwrap();
    for pattern in ["order.**", "payment.captured"] {
        let url = format!("http://{hook}/{pattern}");
        let sub = serde_json::json!({"pattern": pattern, "dispatch": {"webhook": {"url": url, "secret": HOOK_SECRET}}});
        assert_eq!(post_json(h1, "/v1/subscriptions", sub).await.0, 201);
    }
    // Cluster-wide routes added on s2: counters by subject; the order flow (inventory by SKU,
    // payment by order).
    let routes = [
        ("counter.add", serde_json::json!({"agent": {"type": "counter", "key": "subject"}})),
        ("order.placed", serde_json::json!({"agent": {"type": "inventory", "key": "/sku"}})),
        ("inventory.reserved", serde_json::json!({"agent": {"type": "payment", "key": "/order"}})),
    ];
    let mut route_ids = Vec::new();
    for (pattern, dispatch) in routes {
        let (status, v) =
            post_json(h2, "/v1/subscriptions", serde_json::json!({"pattern": pattern, "dispatch": dispatch})).await;
        assert_eq!(status, 201, "{v}");
        // Answered once every member mirrors it.
        assert_eq!(v["unconfirmed"], serde_json::json!([]), "{v}");
        route_ids.push(v["route"].as_str().unwrap().to_string());
    }
    for http in [h1, h2, h3] {
        await_get(http, "/v1/interest", "s1's webhook patterns known", |v| {
            interested(v, "s1", "order.**") && interested(v, "s1", "payment.captured")
        })
        .await;
        let (_, subs) = client::get(http, "/v1/subscriptions", HTTP).await.unwrap();
        let subs: serde_json::Value = serde_json::from_slice(&subs).unwrap();
        for id in &route_ids {
            assert!(mirrors(&subs, id), "route {id} mirrored on {http} when its answer came: {subs}");
        }
    }

    // Published on s3: counter adds (eventual) and orders (strong).
    let adds: Vec<Signal> = (0..10)
        .map(|i| Signal::new("counter.add", serde_json::json!(i + 1)).with_subject(format!("k{}", i % 5)))
        .collect();
    publish(h3, &adds, "eventual").await;
    let orders: Vec<Signal> = (1..=3)
        .map(|i| {
            let data = serde_json::json!({"order": format!("o{i}"), "sku": "sku-a", "qty": i});
            Signal::new("order.placed", data).with_subject(format!("o{i}"))
        })
        .collect();
    publish(h3, &orders, "strong").await;

    // The webhook hears each order once, then each captured payment (emitted by payment agents
    // wherever they live), every one signed.
    let mut heard = Vec::new();
    while heard.len() < 6 {
        let (subject, signed) = tokio::time::timeout(WAIT, received.recv()).await.expect("webhook deliveries").unwrap();
        assert!(signed, "signature of {subject}");
        heard.push(subject);
    }
    heard.sort();
    assert_eq!(heard, ["o1", "o1", "o2", "o2", "o3", "o3"], "each order placed and paid, once");
    assert!(tokio::time::timeout(Duration::from_millis(300), received.recv()).await.is_err(), "nothing more");

    // Counter deliveries run on s3's mirror of their route, apart from the orders: await them.
    for k in 0..5 {
        let want = (k + 1) + (k + 6);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = call(h1, &["counter", &format!("k{k}"), "counter.get"]).await;
            if v["reply"] == want {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "k{k} is {v}, not {want}");
            tokio::time::sleep(POLL).await;
        }
    }
    // Read-only calls on the stored state: from the owner, every acknowledged add; from the
    // nearest copy (each node holds one, 3 copies on 3 nodes), at most what was added.
    for k in 0..5 {
        let want = (k + 1) + (k + 6);
        let id = format!("k{k}");
        let v = call(h3, &["counter", &id, "counter.get", "--read", "owner"]).await;
        assert_eq!((v["reply"].as_i64(), v["role"].as_str()), (Some(want as i64), Some("owner")), "{v}");
        for h in [h1, h2, h3] {
            let v = call(h, &["counter", &id, "counter.get", "--read", "nearest"]).await;
            assert!(v["reply"].as_i64().is_some_and(|r| r <= want as i64), "{v}");
            assert!(matches!(v["role"].as_str(), Some("owner" | "replica")) && v["age_ms"].is_u64(), "{v}");
        }
    }
    let stock = call(h2, &["inventory", "sku-a", "inventory.get"]).await;
    assert_eq!(stock["reply"]["stock"], 10 - 6, "{stock}");
    for i in 1..=3 {
        let paid = call(h1, &["payment", &format!("o{i}"), "payment.get"]).await;
        assert_eq!(paid["reply"]["status"], "captured", "o{i}: {paid}");
    }
    // A refund: the payment agent calls the inventory agent (wherever each lives) to put o2's 2
    // units back. A second refund changes nothing.
    for _ in 0..2 {
        let refund = call(h3, &["payment", "o2", "payment.refund"]).await;
        assert_eq!(refund["reply"]["status"], "refunded", "{refund}");
        let stock = call(h1, &["inventory", "sku-a", "inventory.get"]).await;
        assert_eq!(stock["reply"]["stock"], 10 - 6 + 2, "{stock}");
    }
    for mut n in nodes {
        n.signal(libc::SIGTERM).unwrap();
        assert!(n.wait(WAIT).await.unwrap().success(), "{}", n.log_tail());
    }
}

/// What `GET /v1/subscriptions` on `http` says: (route mirrors' received, log subscriptions'
/// received) for `route` and the `counter.**` log subscription.
async fn took(http: SocketAddr, route: &str) -> (u64, u64) {
    let (_, subs) = client::get(http, "/v1/subscriptions", HTTP).await.unwrap();
    let subs: serde_json::Value = serde_json::from_slice(&subs).unwrap();
    let subs = subs["subscriptions"].as_array().cloned().unwrap_or_default();
    let sum = |pick: &dyn Fn(&serde_json::Value) -> bool| {
        subs.iter().filter(|s| pick(s)).map(|s| s["received"].as_u64().unwrap()).sum::<u64>()
    };
    (sum(&|s| s["route"] == route), sum(&|s| s["route"].is_null() && s["pattern"] == "counter.**"))
}

async fn counter(http: SocketAddr, key: &str) -> serde_json::Value {
    let get = Signal::new("counter.get", serde_json::Value::Null);
    let body = Bytes::from(cadre::signal::codec::encode_structured(&get));
    let path = format!("/v1/agents/counter/{key}");
    let (status, res) = client::post(http, &path, "application/cloudevents+json", body, HTTP).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&res));
    serde_json::from_slice::<serde_json::Value>(&res).unwrap()["reply"].clone()
}

async fn await_counter(http: SocketAddr, key: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = counter(http, key).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{key} is {got}, not {want}");
        tokio::time::sleep(POLL).await;
    }
}

/// A route to counters and plain log subscriptions of the same pattern on other nodes: each
/// signal reaches its counter once. First as a new user would meet it (route added on s2, a log
/// subscription on s1, 50 adds published on s3 with `strong`), then with log subscriptions on
/// every node, for every node the route is added on and every node that publishes. On the code
/// before the fix, each counter got one copy more per other subscribing node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_and_log_subscriptions_on_other_nodes_count_each_signal_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    std::fs::write(&config, "[placement]\nrebalance_interval_ms = 200\nmax_moves_per_tick = 256\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let spawn = |name: &str, seeds: &[SocketAddr]| {
        NodeProc::spawn(NodeSpec { exe: exe(), name, seeds, dir: dir.path(), secret: SECRET, extra: &extra }).unwrap()
    };
    let n1 = spawn("s1", &[]);
    let n2 = spawn("s2", &[n1.addr]);
    let n3 = spawn("s3", &[n1.addr]);
    let nodes = [n1, n2, n3];
    for n in &nodes {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    let https: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    await_cluster(https[0], "three members, each on its desired shards", WAIT, |c| {
        c.members.len() == 3 && on_desired_owners(c)
    })
    .await;
    let log = serde_json::json!({"pattern": "counter.**", "dispatch": {"log": {}}});
    let route =
        serde_json::json!({"pattern": "counter.**", "dispatch": {"agent": {"type": "counter", "key": "subject"}}});
    let add_route = |on: SocketAddr| {
        let route = route.clone();
        async move {
            let (status, v) = post_json(on, "/v1/subscriptions", route).await;
            assert_eq!((status, &v["unconfirmed"]), (201, &serde_json::json!([])), "{v}");
            (v["id"].as_u64().unwrap(), v["route"].as_str().unwrap().to_string())
        }
    };
    let interest_of = |names: &'static [&'static str]| {
        move |v: &serde_json::Value| names.iter().all(|n| interested(v, n, "counter.**"))
    };

    // As the user met it.
    assert_eq!(post_json(https[0], "/v1/subscriptions", log.clone()).await.0, 201);
    let (mirror, route_id) = add_route(https[1]).await;
    await_get(https[2], "/v1/interest", "s1's log subscription known on s3", interest_of(&["s1"])).await;
    let adds: Vec<Signal> = (0..50)
        .map(|i| {
            let mut s = Signal::new("counter.add", serde_json::json!(1)).with_subject(format!("k{}", i % 5));
            s.id = format!("first-{i}");
            s
        })
        .collect();
    publish(https[2], &adds, "strong").await;
    for k in 0..5 {
        await_counter(https[0], &format!("k{k}"), 10).await;
    }
    await_get(https[0], "/v1/subscriptions", "s1's log took the 50 copies", |v| {
        v["subscriptions"].as_array().is_some_and(|s| s.iter().any(|s| s["route"].is_null() && s["received"] == 50))
    })
    .await;
    assert_eq!(took(https[0], &route_id).await.0, 0, "s1's mirror of the route took none of s3's signals");
    for k in 0..5 {
        assert_eq!(counter(https[1], &format!("k{k}")).await, 10, "k{k} counted each add once");
    }
    let path = format!("/v1/subscriptions/{mirror}");
    let (status, _) = client::delete(https[1], &path, HTTP).await.unwrap();
    assert_eq!(status, 204);
    for &h in &https {
        await_get(h, "/v1/subscriptions", "the route removed", |v| !mirrors(v, &route_id)).await;
    }

    // Log subscriptions on every node; the route added on each in turn, published on each.
    for &h in &https[1..] {
        assert_eq!(post_json(h, "/v1/subscriptions", log.clone()).await.0, 201);
    }
    for &h in &https {
        await_get(h, "/v1/interest", "every node's log subscription known", interest_of(&["s1", "s2", "s3"])).await;
    }
    const SIGNALS: u64 = 9;
    for added_on in 0..3 {
        let (mirror, route_id) = add_route(https[added_on]).await;
        for publisher in 0..3 {
            let what = format!("route added on s{}, published on s{}", added_on + 1, publisher + 1);
            let mut before = Vec::new();
            for &h in &https {
                before.push(took(h, &route_id).await);
            }
            let adds: Vec<Signal> = (0..SIGNALS)
                .map(|i| {
                    let key = format!("r{added_on}p{publisher}-k{}", i % 3);
                    let mut s = Signal::new("counter.add", serde_json::json!(1)).with_subject(key);
                    s.id = format!("r{added_on}p{publisher}-{i}");
                    s
                })
                .collect();
            publish(https[publisher], &adds, "strong").await;
            for k in 0..3 {
                await_counter(https[0], &format!("r{added_on}p{publisher}-k{k}"), SIGNALS / 3).await;
            }
            for (i, &h) in https.iter().enumerate() {
                let want_log = before[i].1 + SIGNALS;
                let deadline = tokio::time::Instant::now() + WAIT;
                let mut now = took(h, &route_id).await;
                while now.1 < want_log {
                    assert!(tokio::time::Instant::now() < deadline, "{what}: s{}'s log took {now:?}", i + 1);
                    tokio::time::sleep(POLL).await;
                    now = took(h, &route_id).await;
                }
                let want_route = if i == publisher { SIGNALS } else { 0 };
                assert_eq!(now.0 - before[i].0, want_route, "{what}: signals s{}'s mirror took", i + 1);
            }
            for k in 0..3 {
                let key = format!("r{added_on}p{publisher}-k{k}");
                assert_eq!(counter(https[2], &key).await, SIGNALS / 3, "{what}: {key} counted each add once");
            }
        }
        let (status, _) = client::delete(https[added_on], &format!("/v1/subscriptions/{mirror}"), HTTP).await.unwrap();
        assert_eq!(status, 204);
        for &h in &https {
            await_get(h, "/v1/subscriptions", "the route removed", |v| !mirrors(v, &route_id)).await;
        }
    }
    for mut n in nodes {
        n.signal(libc::SIGTERM).unwrap();
        assert!(n.wait(WAIT).await.unwrap().success(), "{}", n.log_tail());
    }
}
