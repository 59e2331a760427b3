//! Signals across in-process nodes on loopback: the interest map converges, a publish reaches
//! every matching subscription on every node exactly once and in publish order, one copy per node;
//! delivery levels (`weak`, `eventual`, `strong`) and a `strong` publish that cannot reach a
//! majority failing instead of hanging; bad pub/sub requests (undecodable, an invalid CloudEvent in
//! a batch, a signal too large for a frame) refused with the node carrying on.
//!
//! Conditions are awaited (interest map changes, channel receives) with deadlines, never slept on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use cadre::bus::{Delivery, Dispatch, PublishError, SubscriptionSpec, PUBSUB_TAG};
use cadre::config::{Config, PlacementConfig, PubsubConfig, Secret};
use cadre::meta::{AgentRoute, AgentTarget, MetaState, ShardState};
use cadre::node::{Node, NodeOptions};
use cadre::signal::Signal;
use cadre::storage::Key;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "cluster-pubsub-secret-0123";

fn config(name: &str, seeds: Vec<SocketAddr>) -> Config {
    Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        seeds,
        secret: Secret::new(SECRET),
        rng_seed: Some(name.bytes().map(u64::from).sum()),
        pubsub: PubsubConfig { strong_timeout_ms: 1000, ack_timeout_ms: 500, ..PubsubConfig::default() },
        placement: PlacementConfig {
            shard_count: 32,
            lease_ms: 1000,
            lease_renew_interval_ms: 200,
            lease_drift_margin_ms: 200,
            controller_tick_ms: 50,
            rebalance_interval_ms: 100,
            max_moves_per_tick: 32,
            ..PlacementConfig::default()
        },
        ..Config::default()
    }
}

async fn cluster(names: &[&str]) -> Vec<Node> {
    let first = Node::start(config(names[0], vec![]), NodeOptions::default()).await.unwrap();
    let seeds = vec![first.addr()];
    let mut nodes = vec![first];
    for name in &names[1..] {
        nodes.push(Node::start(config(name, seeds.clone()), NodeOptions::default()).await.unwrap());
    }
    let n = names.len();
    for node in &nodes {
        let joined =
            node.membership().wait_for(|v| v.joined && v.members.iter().filter(|m| m.state.is_active()).count() == n);
        tokio::time::timeout(WAIT, joined).await.expect("membership converges").unwrap();
    }
    nodes
}

fn channel(node: &Node, pattern: &str) -> mpsc::Receiver<Arc<Signal>> {
    let (tx, rx) = mpsc::channel(10_000);
    node.bus().subscribe_detached(SubscriptionSpec::new(pattern, Dispatch::Channel(tx))).unwrap();
    rx
}

fn signal(ty: &str, i: usize) -> Signal {
    let mut s = Signal::new(ty, serde_json::json!({"i": i}));
    s.id = format!("{ty}-{i}");
    s
}

async fn await_nodes(node: &Node, ty: &str, want: &[&str]) {
    let ok = node.bus().await_remote_nodes(ty, WAIT, |got| got == want).await;
    assert!(ok, "{} never saw {want:?} interested in {ty}: {:?}", node.name(), node.bus().remote_nodes_for(ty));
}

/// The ids received on `rx`, `n` of them, in order.
async fn receive(rx: &mut mpsc::Receiver<Arc<Signal>>, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(s)) => ids.push(s.id.clone()),
            other => panic!("after {} of {n} signals: {other:?}", ids.len()),
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matching_subscription_on_every_node_gets_each_signal_once_in_order() {
    let nodes = cluster(&["a", "b", "c"]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut on_b = channel(b, "order.**");
    let mut on_c1 = channel(c, "order.placed");
    let mut on_c2 = channel(c, "order.*");
    let mut payments = channel(c, "payment.*");
    await_nodes(a, "order.placed", &["b", "c"]).await;
    await_nodes(a, "payment.done", &["c"]).await;
    await_nodes(b, "order.placed", &["c"]).await;

    const N: usize = 500;
    for i in 0..N {
        let p = a.bus().publish(signal("order.placed", i)).await.unwrap();
        assert_eq!((p.deliveries, p.remote_nodes, p.delivery), (0, 2, Delivery::Eventual));
    }
    let want: Vec<String> = (0..N).map(|i| format!("order.placed-{i}")).collect();
    assert_eq!(receive(&mut on_b, N).await, want, "b: every signal once, in publish order");
    assert_eq!(receive(&mut on_c1, N).await, want, "c's first subscription");
    assert_eq!(receive(&mut on_c2, N).await, want, "c's second subscription (same copy)");
    // One copy per node: c had two matching subscriptions and was sent each signal once.
    a.bus().flush_remote(WAIT).await;
    assert_eq!(a.bus().remote_buffered(), 0, "every copy acknowledged");
    let sent = metric(a, "cadre_pubsub_sent_total");
    assert_eq!(sent, 2.0 * N as f64, "one copy per interested node");
    let batches = metric(a, "cadre_pubsub_batches_total");
    assert!(batches >= 2.0 && batches <= sent, "batches {batches} for {sent} copies");

    // Weak and strong reach them too, in order with the rest.
    a.bus().publish_with(signal("payment.done", 0), Delivery::Weak).await.unwrap();
    let p = a.bus().publish_with(signal("payment.done", 1), Delivery::Strong).await.unwrap();
    assert_eq!((p.remote_nodes, p.delivery), (1, Delivery::Strong));
    assert_eq!(receive(&mut payments, 2).await, ["payment.done-0", "payment.done-1"]);
    assert!(tokio::time::timeout(Duration::from_millis(1), on_b.recv()).await.is_err(), "b has no payment route");

    // Unsubscribing withdraws the interest.
    drop(on_b);
    for id in b.bus().subscriptions().iter().map(|s| s.id) {
        b.bus().unsubscribe(id);
    }
    await_nodes(a, "order.placed", &["c"]).await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_publish_without_a_majority_fails_instead_of_hanging() {
    let mut nodes = cluster(&["a", "b", "c"]).await;
    let _on_b = channel(&nodes[1], "alert.*");
    let _on_c = channel(&nodes[2], "alert.*");
    await_nodes(&nodes[0], "alert.raised", &["b", "c"]).await;
    let p = nodes[0].bus().publish_with(signal("alert.raised", 0), Delivery::Strong).await.unwrap();
    assert_eq!(p.delivery, Delivery::Strong);

    // c gone: b alone is not a majority of {b, c}.
    let c = nodes.pop().unwrap();
    c.kill().await;
    let err = nodes[0].bus().publish_with(signal("alert.raised", 1), Delivery::Strong).await.unwrap_err();
    assert_eq!(err, PublishError::StrongUnmet { acked: 1, needed: 2, targets: 2 });
    // With a local subscriber, a and b are a majority of {a, b, c}.
    let mut on_a = channel(&nodes[0], "alert.*");
    let p = nodes[0].bus().publish_with(signal("alert.raised", 2), Delivery::Strong).await.unwrap();
    assert_eq!((p.deliveries, p.delivery), (1, Delivery::Strong));
    assert_eq!(receive(&mut on_a, 1).await, ["alert.raised-2"]);
    // Eventual is accepted at once: buffered for c.
    let p = nodes[0].bus().publish(signal("alert.raised", 3)).await.unwrap();
    assert_eq!(p.remote_nodes, 2);
    assert!(nodes[0].bus().remote_buffered() >= 1);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pubsub_requests_are_refused_and_the_node_carries_on() {
    let nodes = cluster(&["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut on_b = channel(b, "ok.*");
    await_nodes(a, "ok.x", &["b"]).await;
    let t = Duration::from_secs(5);
    let junks = [
        vec![PUBSUB_TAG],
        vec![PUBSUB_TAG, 0xFF, 0xFF, 0xFF],
        vec![PUBSUB_TAG, 0, 3, 1, b'{', 0],
        // A route wait (variant 4) cut short.
        vec![PUBSUB_TAG, 4, 0xFF],
    ];
    for junk in junks {
        let reply = a.transport().ask(b.addr(), Bytes::from(junk), t).await.unwrap();
        assert_eq!(reply.first(), Some(&PUBSUB_TAG), "a typed reply");
    }
    assert!(metric(b, "cadre_pubsub_refused_total") >= 3.0);
    // A wait for a route nobody added (id 9, 1 ms): answered "not mirrored" (`Accepted { count: 0 }`).
    let reply = a.transport().ask(b.addr(), Bytes::from(vec![PUBSUB_TAG, 4, 9, 1]), t).await.unwrap();
    assert_eq!(&reply[..], [PUBSUB_TAG, 0, 0]);
    // A batch with an invalid CloudEvent between two valid ones: all three answered as taken
    // (sending it again would not make it valid), the valid ones delivered, the invalid counted.
    let valid = |i| cadre::signal::codec::encode_structured(&signal("ok.x", i));
    let invalid = br#"{"specversion":"1.0","id":"","source":"/s","type":"ok.x"}"#.to_vec();
    let batch = (0u32, vec![valid(100), invalid, valid(101)]);
    let mut payload = vec![PUBSUB_TAG];
    payload.extend(postcard::to_allocvec(&batch).unwrap());
    let reply = a.transport().ask(b.addr(), Bytes::from(payload), t).await.unwrap();
    assert_eq!(reply.first(), Some(&PUBSUB_TAG));
    assert_eq!(receive(&mut on_b, 2).await, ["ok.x-100", "ok.x-101"]);
    let invalid_counted = "cadre_pubsub_refused_total{reason=\"invalid_signal\"}";
    assert_eq!(metric(b, invalid_counted), 1.0);
    // A signal too large for a frame cannot go to other nodes: a typed error, counted.
    let mut big = signal("ok.x", 0);
    big.data = Some(cadre::signal::Data::Json(serde_json::json!("x".repeat(2 << 20))));
    let err = a.bus().publish(big).await.unwrap_err();
    assert!(matches!(err, PublishError::TooLarge { .. }), "{err}");
    // Still serving.
    a.bus().publish(signal("ok.x", 0)).await.unwrap();
    assert_eq!(receive(&mut on_b, 1).await, ["ok.x-0"]);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Waits until every shard is active and every node owns some, as `node` sees it.
async fn placed(node: &Node, members: usize) {
    let mut rx = node.cluster().watch();
    let done = |st: &MetaState| {
        st.shard_count > 0
            && st.shards.iter().all(|e| e.state == ShardState::Active && e.owner.is_some())
            && st.members.keys().filter(|m| st.shards.iter().any(|e| e.owner.as_ref() == Some(*m))).count() == members
    };
    let wait = async {
        while !done(&rx.borrow_and_update()) {
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("every node owns shards");
}

/// Calls `counter.get` on `key` through `node` until it answers `want` (deliveries are
/// asynchronous), at most [`WAIT`].
async fn await_counter(node: &Node, key: &Key, want: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let get = Signal::new("counter.get", serde_json::Value::Null);
        let got = node.cluster().call(key, get, Duration::from_secs(5)).await.map(|s| s.reply);
        if got.as_ref().ok() == Some(&serde_json::json!(want)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{key:?} is {got:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_route_delivers_to_agents_from_every_node_and_a_pool_stays_local() {
    let nodes = cluster(&["a", "b", "c"]).await;
    for n in &nodes {
        placed(n, 3).await;
    }
    // A route whose key is neither "subject" nor a JSON pointer is refused as such, and nothing
    // is proposed to the leader.
    let bad = AgentRoute {
        pattern: "counter.add".into(),
        target: AgentTarget::Agent { ty: "counter".into(), key: "order-id".into() },
    };
    let refused = nodes[0].cluster().add_route(bad).await;
    assert!(matches!(refused, Err(cadre::CallError::InvalidRoute(_))), "{refused:?}");
    assert!(nodes[0].cluster().state().routes.is_empty());
    // Added once through b; every node mirrors it and delivers what it publishes.
    let route = AgentRoute {
        pattern: "counter.add".into(),
        target: AgentTarget::Agent { ty: "counter".into(), key: "subject".into() },
    };
    let added = nodes[1].bus().add_route(route.clone(), WAIT).await.unwrap();
    let id = added.id;
    // Answered once every live member mirrors it: publishing anywhere right away reaches it.
    assert!(added.unconfirmed.is_empty(), "{added:?}");
    for n in &nodes {
        assert!(n.bus().mirrors(id), "{} mirrors the route when add_route answers", n.name());
    }
    let again = nodes[2].bus().add_route(route, WAIT).await.unwrap();
    assert_eq!(id, again.id, "the same route added twice is one route");
    for n in &nodes {
        let mirrored = n.bus().subscriptions().iter().filter(|s| s.route == Some(id.to_string())).count();
        assert_eq!(mirrored, 1, "{} mirrors the route once", n.name());
        let ok = n.bus().await_remote_nodes("counter.add", WAIT, |nodes| nodes.is_empty()).await;
        assert!(ok, "a route is not advertised as a node's interest");
    }
    const KEYS: usize = 6;
    const ROUNDS: usize = 5;
    for round in 0..ROUNDS {
        for (i, n) in nodes.iter().enumerate() {
            for k in 0..KEYS {
                let s = Signal::new("counter.add", serde_json::json!(1)).with_subject(format!("k{k}"));
                let p = n.bus().publish(s).await.unwrap();
                assert_eq!((p.deliveries, p.remote_nodes), (1, 0), "round {round} via node {i}");
            }
        }
    }
    for k in 0..KEYS {
        await_counter(&nodes[0], &Key::new("counter", format!("k{k}")), (ROUNDS * nodes.len()) as i64).await;
    }
    // Removing it removes every mirror.
    nodes[0].bus().remove_route(id, WAIT).await.unwrap();
    for n in &nodes {
        let mut rx = n.cluster().watch();
        tokio::time::timeout(WAIT, rx.wait_for(|st| st.routes.is_empty())).await.unwrap().unwrap();
    }

    // A pool: every node owns shards, so every delivery stays on its publishing node.
    let pool = AgentRoute { pattern: "counter.add".into(), target: AgentTarget::Pool { ty: "counter".into() } };
    let pool = nodes[0].bus().add_route(pool, WAIT).await.unwrap();
    assert!(pool.unconfirmed.is_empty(), "{pool:?}");
    for n in &nodes {
        assert!(n.bus().mirrors(pool.id), "{} mirrors the pool route", n.name());
    }
    const WORK: usize = 30;
    for i in 0..WORK {
        let s = Signal::new("counter.add", serde_json::json!(1));
        nodes[i % 3].bus().publish(s).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let delivered = |n: &Node| n.bus().subscriptions().iter().map(|s| s.delivered).sum::<u64>();
    while nodes.iter().map(delivered).sum::<u64>() < WORK as u64 {
        let subs: Vec<_> = nodes.iter().map(|n| n.bus().subscriptions()).collect();
        let dead: Vec<_> = nodes.iter().map(|n| n.bus().deadletters()).collect();
        assert!(tokio::time::Instant::now() < deadline, "pool deliveries: {subs:#?}\n{dead:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local: f64 = nodes.iter().map(|n| metric_where(n, "local")).sum();
    let remote: f64 = nodes.iter().map(|n| metric_where(n, "remote")).sum();
    assert_eq!((local, remote), (WORK as f64, 0.0), "pool deliveries stay local");
    for n in nodes {
        n.shutdown().await;
    }
}

fn metric_where(node: &Node, place: &str) -> f64 {
    let line = format!("cadre_pool_deliveries_total{{where=\"{place}\"}}");
    node.metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(&line))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of a metric's series in the node's Prometheus text.
fn metric(node: &Node, name: &str) -> f64 {
    node.metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Signals the mirrors of route `id` on `node` took into their queues.
fn mirror_took(node: &Node, id: u64) -> u64 {
    let subs = node.bus().subscriptions();
    subs.iter().filter(|s| s.route == Some(id.to_string())).map(|s| s.received).sum()
}

/// A route to agents and ordinary subscriptions of the same pattern on other nodes: the agent
/// gets each signal once, whichever node added the route, whichever nodes subscribe and whichever
/// publishes. Only the publisher's mirror of the route delivers; a node that takes a copy for its
/// own subscriptions leaves the route alone (it used to deliver too: k + 1 copies with k
/// subscribing nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_and_subscriptions_on_other_nodes_deliver_to_the_agent_once_in_every_combination() {
    let nodes = cluster(&["a", "b", "c"]).await;
    for n in &nodes {
        placed(n, 3).await;
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
    let route = AgentRoute {
        pattern: "counter.**".into(),
        target: AgentTarget::Agent { ty: "counter".into(), key: "subject".into() },
    };
    const SIGNALS: usize = 10;
    const KEYS: usize = 2;
    let mut case = 0;
    for added_on in 0..nodes.len() {
        let added = nodes[added_on].bus().add_route(route.clone(), WAIT).await.unwrap();
        assert!(added.unconfirmed.is_empty(), "{added:?}");
        // Every subset of nodes holding an ordinary subscription, the empty one included.
        for subscribed in 0u32..(1 << nodes.len()) {
            let on: Vec<usize> = (0..nodes.len()).filter(|i| subscribed & (1 << i) != 0).collect();
            let mut rxs: Vec<_> = on.iter().map(|&i| (i, channel(&nodes[i], "counter.**"))).collect();
            for publisher in 0..nodes.len() {
                case += 1;
                let what = format!(
                    "case {case}: route added on {}, subscriptions on {:?}, published on {}",
                    names[added_on],
                    on.iter().map(|&i| names[i]).collect::<Vec<_>>(),
                    names[publisher]
                );
                let others: Vec<&str> = on.iter().filter(|&&i| i != publisher).map(|&i| names[i]).collect();
                await_nodes(&nodes[publisher], "counter.add", &others).await;
                let before: Vec<u64> = nodes.iter().map(|n| mirror_took(n, added.id)).collect();
                for i in 0..SIGNALS {
                    let mut s = Signal::new("counter.add", serde_json::json!(1))
                        .with_subject(format!("case{case}-k{}", i % KEYS));
                    s.id = format!("case{case}-{i}");
                    let p = nodes[publisher].bus().publish_with(s, Delivery::Strong).await.unwrap();
                    assert_eq!(p.remote_nodes, others.len(), "{what}");
                }
                // Every subscriber has every copy: a node that wrongly handed one to the route
                // did so when it took the copy, so its mirror shows it now.
                for (i, rx) in &mut rxs {
                    let got = receive(rx, SIGNALS).await;
                    assert_eq!(got.len(), SIGNALS, "{what}: subscriber on {}", names[*i]);
                }
                for k in 0..KEYS {
                    let key = Key::new("counter", format!("case{case}-k{k}"));
                    await_counter(&nodes[0], &key, (SIGNALS / KEYS) as i64).await;
                }
                for (i, n) in nodes.iter().enumerate() {
                    let took = mirror_took(n, added.id) - before[i];
                    let want = if i == publisher { SIGNALS as u64 } else { 0 };
                    assert_eq!(took, want, "{what}: signals the route's mirror on {} took", names[i]);
                }
                for k in 0..KEYS {
                    let key = Key::new("counter", format!("case{case}-k{k}"));
                    let get = Signal::new("counter.get", serde_json::Value::Null);
                    let got = nodes[1].cluster().call(&key, get, WAIT).await.unwrap().reply;
                    assert_eq!(got, serde_json::json!(SIGNALS / KEYS), "{what}: {key:?} counted each signal once");
                }
            }
            for (i, rx) in rxs {
                drop(rx);
                for s in nodes[i].bus().subscriptions().iter().filter(|s| s.route.is_none()) {
                    nodes[i].bus().unsubscribe(s.id);
                }
            }
            // Every node has seen the withdrawals before the next subset subscribes: else a
            // publisher could still hold a withdrawn node's old interest when it awaits that
            // node's new one, and publish between the withdrawal and the new subscription.
            for n in &nodes {
                let gone = n.bus().await_remote_nodes("counter.add", WAIT, |nodes| nodes.is_empty()).await;
                assert!(gone, "{}: interest withdrawn after {on:?}", n.name());
            }
        }
        nodes[added_on].bus().remove_route(added.id, WAIT).await.unwrap();
        for n in &nodes {
            let mut rx = n.cluster().watch();
            tokio::time::timeout(WAIT, rx.wait_for(|st| st.routes.is_empty())).await.unwrap().unwrap();
            assert!(n.bus().await_unmirrored(added.id, WAIT).await, "{}: mirror removed", n.name());
            let gone = n.bus().await_remote_nodes("counter.add", WAIT, |nodes| nodes.is_empty()).await;
            assert!(gone, "{}: interest withdrawn", n.name());
        }
    }
    assert_eq!(case, 3 * 8 * 3);
    for n in nodes {
        n.shutdown().await;
    }
}
