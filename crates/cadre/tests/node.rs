//! In-process nodes on loopback: member events, graceful leave, start-up errors, application
//! asks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cadre::config::{Config, ConfigError, Secret};
use cadre::membership::MemberState;
use cadre::net::PeerInfo;
use cadre::node::{DataHandler, Node, NodeError, NodeOptions};
use cadre::router::table::{Format, Table};

const WAIT: Duration = Duration::from_secs(20);

fn config(name: &str, seeds: Vec<std::net::SocketAddr>) -> Config {
    Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        seeds,
        secret: Secret::new("node-test-secret-0123"),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_a_join_and_a_graceful_leave() {
    let a = Node::start(config("a", vec![]), NodeOptions::default()).await.unwrap();
    assert!(a.view().joined, "a node without seeds is a cluster of one");
    let mut events = a.membership().subscribe();
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    let joined = tokio::time::timeout(WAIT, b.membership().wait_for(|v| v.joined)).await.unwrap().unwrap();
    assert_eq!(joined.names(MemberState::Alive), ["a", "b"]);

    let e = tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap();
    assert_eq!((e.meta.name.as_str(), e.from, e.to), ("b", None, MemberState::Alive));
    assert_eq!(e.meta.addr, b.addr());

    b.shutdown().await;
    let e = tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.unwrap();
            if e.to != MemberState::Alive {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((e.meta.name.as_str(), e.to), ("b", MemberState::Left));
    assert_eq!(a.view().state_of("b"), Some(MemberState::Left));
    a.shutdown().await;
}

#[tokio::test]
async fn start_up_errors_are_typed() {
    let mut bad = config("a", vec![]);
    bad.secret = Secret::default();
    let err = Node::start(bad, NodeOptions::default()).await.err().unwrap();
    assert!(matches!(err, NodeError::Config(ConfigError::Invalid { field: "secret", .. })), "{err}");

    let a = Node::start(config("a", vec![]), NodeOptions::default()).await.unwrap();
    let mut taken = config("b", vec![]);
    taken.listen = a.addr();
    let err = Node::start(taken, NodeOptions::default()).await.err().unwrap();
    assert!(matches!(err, NodeError::Bind { what: "transport", .. }), "{err}");
    a.shutdown().await;
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Tasks alive on this test's runtime.
fn tasks_alive() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits (at most `WAIT`) until no task is left on this test's runtime.
async fn all_tasks_end(what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tasks_alive() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{} tasks still running {what}", tasks_alive());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_start_failing_late_frees_its_ports_and_leaves_nothing_running() {
    assert_eq!(tasks_alive(), 0);
    // The HTTP port is taken: the start fails once the transport is bound.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config("a", vec![]);
    cfg.listen = free_addr();
    cfg.http = Some(taken.local_addr().unwrap());
    let err = Node::start(cfg.clone(), NodeOptions::default()).await.err().unwrap();
    assert!(matches!(err, NodeError::Bind { what: "http", .. }), "{err}");
    drop(std::net::TcpListener::bind(cfg.listen).expect("the transport's port is free once the error returns"));
    all_tasks_end("after a failed HTTP bind").await;

    // A routes file whose target is a name is refused before anything is bound (the HTTP port
    // is still taken).
    let named = Table::parse(r#"{"routes":[{"path":"order.placed","target":"billing"}]}"#, Format::Json).unwrap();
    let opts = NodeOptions { routes: Some(named), ..NodeOptions::default() };
    let err = Node::start(cfg.clone(), opts).await.err().unwrap();
    assert!(matches!(err, NodeError::Routes(_)), "{err}");

    // Two subscriptions where one is allowed: the start fails after the cluster, the host and
    // the bus started (the last step that can fail).
    let two = r#"{"routes":[{"path":"a.b","target":{"log":{}}},{"path":"c.d","target":{"log":{}}}]}"#;
    let opts = NodeOptions { routes: Some(Table::parse(two, Format::Json).unwrap()), ..NodeOptions::default() };
    cfg.http = Some(free_addr());
    let mut one_sub = cfg.clone();
    one_sub.signals.subscriptions_max = 1;
    let err = Node::start(one_sub, opts).await.err().unwrap();
    assert!(matches!(err, NodeError::Routes(_)), "{err}");
    drop(std::net::TcpListener::bind(cfg.listen).expect("the transport's port is free once the error returns"));
    drop(std::net::TcpListener::bind(cfg.http.unwrap()).expect("the HTTP port is free once the error returns"));
    all_tasks_end("after a routes file failed to subscribe").await;

    // The same node starts there now.
    let a = Node::start(cfg, NodeOptions::default()).await.unwrap();
    a.shutdown().await;
}

/// A start future dropped half way (as a timeout around it would) leaves nothing running. On
/// this single-threaded runtime the first poll runs the start until it waits for the first time:
/// in the cluster's start (the Raft member reading its log on a blocking thread, or, a founder,
/// waiting for its task, which cannot run meanwhile), after the transport is bound and membership
/// started.
#[tokio::test]
async fn a_start_dropped_half_way_frees_its_ports_and_leaves_nothing_running() {
    let mut cfg = config("a", vec![]);
    cfg.listen = free_addr();
    cfg.http = Some(free_addr());
    let mut start = Box::pin(Node::start(cfg.clone(), NodeOptions::default()));
    assert!(futures::poll!(&mut start).is_pending(), "a founder's start waits for its Raft member");
    assert!(std::net::TcpListener::bind(cfg.listen).is_err(), "the transport is bound by then");
    assert!(tasks_alive() > 0, "membership runs by then");
    drop(start);
    // At once: the listeners were the start's own.
    drop(std::net::TcpListener::bind(cfg.listen).expect("the transport's port is free once the start is dropped"));
    drop(std::net::TcpListener::bind(cfg.http.unwrap()).expect("the HTTP port is free once the start is dropped"));
    all_tasks_end("after the start was dropped").await;
    let a = Node::start(cfg, NodeOptions::default()).await.unwrap();
    a.shutdown().await;
}

/// Keeps every application ask it gets; answers with the ask's length.
#[derive(Default)]
struct Recorder {
    asks: Mutex<Vec<Bytes>>,
}

impl DataHandler for Recorder {
    fn on_tell(&self, _from: &PeerInfo, _payload: Bytes) {}
    fn on_ask(&self, _from: &PeerInfo, payload: Bytes) -> Bytes {
        let len = payload.len() as u32;
        self.asks.lock().unwrap().push(payload);
        Bytes::copy_from_slice(&len.to_le_bytes())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_asks_that_start_like_agent_replica_or_pubsub_requests_reach_the_data_handler() {
    let recorder = Arc::new(Recorder::default());
    let opts = NodeOptions { data: recorder.clone(), ..NodeOptions::default() };
    let a = Node::start(config("a", vec![]), opts).await.unwrap();
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    let payloads: Vec<Bytes> = vec![
        Bytes::from_static(&[0xA7, 0xff, 0xff, 0x01]),
        Bytes::from_static(&[0xA8, 0x00]),
        Bytes::from_static(&[0xA9, 0x04, 0x09, 0x01]),
        Bytes::from_static(&[0xAF]),
        Bytes::new(),
    ];
    for p in &payloads {
        let reply = b.ask(a.addr(), p.clone(), WAIT).await.unwrap();
        assert_eq!(&reply[..], (p.len() as u32).to_le_bytes(), "the handler answered {p:?}");
    }
    assert_eq!(*recorder.asks.lock().unwrap(), payloads);
    b.shutdown().await;
    a.shutdown().await;
}

/// What an embedding application uses without the internal layers: waiting for the cluster to
/// place its shards, a key's owner, and stopping an agent wherever it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_waits_for_placement_finds_owners_and_stops_agents() {
    let a = Node::builder("a").secret("node-test-secret-0123").start().await.unwrap();
    let b = Node::builder("b").secret("node-test-secret-0123").seed(a.addr()).start().await.unwrap();
    for n in [&a, &b] {
        assert!(n.placed(WAIT).await, "{} saw every shard placed", n.name());
    }
    let counter = b.agent::<cadre::Counter>("k1");
    assert_eq!(counter.call(cadre::Signal::new("counter.add", 2.into())).await.unwrap(), 2);
    let owner = counter.owner().unwrap().expect("an owner once placed");
    assert!(owner == "a" || owner == "b", "{owner}");
    let on_owner = if owner == "a" { &a } else { &b };
    assert!(on_owner.agents().is_active(counter.key()), "active on its owner");
    assert!(counter.stop().await.unwrap(), "it was active");
    assert!(!on_owner.agents().is_active(counter.key()), "passivated on its owner");
    assert!(!counter.stop().await.unwrap(), "no longer active");
    // Its state stayed: the next call activates it again from the store.
    assert_eq!(counter.call(cadre::Signal::new("counter.add", 3.into())).await.unwrap(), 5);
    b.shutdown().await;
    a.shutdown().await;
}
