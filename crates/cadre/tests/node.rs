//! In-process nodes on loopback: member events, graceful leave, start-up errors.

use std::time::Duration;

use cadre::config::{Config, ConfigError, Secret};
use cadre::membership::MemberState;
use cadre::node::{Node, NodeError, NodeOptions};

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
