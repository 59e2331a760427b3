//! In-process nodes on loopback: member events, graceful leave, start-up errors, application
//! asks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cadre::config::{Config, ConfigError, Secret};
use cadre::membership::MemberState;
use cadre::net::PeerInfo;
use cadre::node::{DataHandler, Node, NodeError, NodeOptions};

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
