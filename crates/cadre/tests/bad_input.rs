//! Bad bytes sent to a node's transport port close that connection, are counted, and leave the
//! node healthy: it keeps serving HTTP and talking to a well-behaved peer.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use cadre::config::{Config, Secret};
use cadre::net::auth::{self, Credentials, HandshakeError};
use cadre::net::{BoxRead, BoxWrite, Network, PeerInfo, TokioNet};
use cadre::node::{Node, NodeOptions};
use cadre::wire::{Lane, RefuseReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "bad-input-secret";
const WAIT: Duration = Duration::from_secs(20);

async fn node(name: &str, seeds: Vec<SocketAddr>) -> Node {
    let cfg = Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        seeds,
        secret: Secret::new(SECRET),
        ..Config::default()
    };
    Node::start(cfg, NodeOptions::default()).await.unwrap()
}

/// Reads until the node closes the connection (EOF or reset); fails after `WAIT`.
async fn closed_by_node(r: &mut BoxRead) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, r.read(&mut buf)).await.expect("node closes the connection") {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn dial(addr: SocketAddr) -> (BoxRead, BoxWrite) {
    TokioNet.connect(addr).await.unwrap()
}

/// A connection that completed the handshake as a legitimate peer.
async fn authenticated(addr: SocketAddr, secret: &str) -> Result<(BoxRead, BoxWrite), HandshakeError> {
    let (mut r, mut w) = dial(addr).await;
    let me = PeerInfo { name: "prober".into(), addr: "127.0.0.1:1".parse().unwrap() };
    let creds = Credentials { cluster: "cadre", secret: secret.as_bytes(), local: &me };
    auth::dial(&mut r, &mut w, &creds, Lane::Data, [1; 16], WAIT).await?;
    Ok((r, w))
}

async fn wait_metric(node: &Node, what: &str, f: impl Fn(&Node) -> u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while f(node) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "metric not counted: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_healthy(a: &Node, b: &Node) {
    let (status, _) = cadre::api::client::get(a.http_addr().unwrap(), "/healthz", WAIT).await.unwrap();
    assert_eq!(status, 200);
    let reply = b.ask(a.addr(), Bytes::from_static(b"still there?"), WAIT).await.unwrap();
    assert_eq!(&reply[..], b"still there?");
    let names: Vec<String> = a.view().members.iter().map(|m| m.meta.name.clone()).collect();
    assert_eq!(names, ["a", "b"], "no prober became a member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_one_connection_and_the_node_carries_on() {
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.addr()]).await;
    a.membership().wait_for(|v| v.names(cadre::membership::MemberState::Alive).len() == 2).await.unwrap();
    assert_healthy(&a, &b).await;

    // 1. Malformed bytes instead of a handshake.
    let (mut r, mut w) = dial(a.addr()).await;
    w.write_all(&[0x00, 0x00, 0x00, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    closed_by_node(&mut r).await;
    wait_metric(&a, "malformed handshake", |n| n.transport().stats().refused_count("acceptor", "malformed")).await;
    assert_healthy(&a, &b).await;

    // 2. A huge length prefix before the handshake.
    let (mut r, mut w) = dial(a.addr()).await;
    w.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    closed_by_node(&mut r).await;
    assert_healthy(&a, &b).await;

    // 3. The wrong secret.
    let err = authenticated(a.addr(), "not-the-secret").await.err().expect("refused");
    assert!(matches!(err, HandshakeError::Refused(RefuseReason::WrongSecret)), "{err}");
    wait_metric(&a, "wrong secret", |n| n.transport().stats().refused_count("acceptor", "wrong_secret")).await;
    assert_healthy(&a, &b).await;

    // 4. An oversized frame after a valid handshake.
    let (mut r, mut w) = authenticated(a.addr(), SECRET).await.unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(Config::default().net.frame_len_max_bytes + 1);
    frame.put_bytes(0, 64);
    w.write_all(&frame).await.unwrap();
    closed_by_node(&mut r).await;
    wait_metric(&a, "oversized frame", |n| n.transport().stats().closed_count("oversized")).await;
    assert_healthy(&a, &b).await;

    // 5. A frame whose body does not decode after a valid handshake.
    let (mut r, mut w) = authenticated(a.addr(), SECRET).await.unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(6);
    frame.put_slice(&[cadre::wire::WIRE_VERSION as u8, 0xff, 0xff, 0xff, 0xff, 0xff]);
    w.write_all(&frame).await.unwrap();
    closed_by_node(&mut r).await;
    wait_metric(&a, "malformed frame", |n| n.transport().stats().closed_count("malformed")).await;
    assert_healthy(&a, &b).await;

    // 6. A frame with an unknown wire version.
    let (mut r, mut w) = authenticated(a.addr(), SECRET).await.unwrap();
    w.write_all(&[0, 0, 0, 2, 99, 0]).await.unwrap();
    closed_by_node(&mut r).await;
    assert_healthy(&a, &b).await;

    let metrics = a.metrics().render();
    assert!(metrics.contains("cadre_net_handshake_refused_total"), "{metrics}");
    b.shutdown().await;
    a.shutdown().await;
}

/// Asks whose kind cannot be read (empty, or an unknown first byte) from an authenticated peer get
/// a typed refusal on either lane, are counted by lane and reason, and the node carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_of_no_known_kind_are_refused_counted_and_the_node_carries_on() {
    use cadre::cluster::protocol::ControlReply;
    use cadre::wire::envelope::{refused, EnvelopeError};
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.addr()]).await;
    a.membership().wait_for(|v| v.names(cadre::membership::MemberState::Alive).len() == 2).await.unwrap();
    for (payload, expected) in [
        (Bytes::new(), EnvelopeError::Empty),
        (Bytes::from_static(&[0x42, 1, 2]), EnvelopeError::UnknownKind(0x42)),
        (Bytes::from_static(b"still there?"), EnvelopeError::UnknownKind(b's')),
    ] {
        let reply = b.transport().ask(a.addr(), payload, WAIT).await.unwrap();
        assert_eq!(refused(&reply), Some(expected), "{reply:?}");
    }
    for (payload, expected) in [(Bytes::new(), "empty"), (Bytes::from_static(&[0x42]), "unknown request kind 0x42")] {
        let reply = b.transport().ask_on(Lane::Control, a.addr(), payload, WAIT).await.unwrap();
        match postcard::from_bytes::<ControlReply>(&reply).unwrap() {
            ControlReply::Refused(why) => assert!(why.contains(expected), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let metrics = a.metrics().render();
    for series in [
        "cadre_envelopes_refused_total{lane=\"data\",reason=\"empty\"} 1",
        "cadre_envelopes_refused_total{lane=\"data\",reason=\"unknown_kind\"} 2",
        "cadre_envelopes_refused_total{lane=\"control\",reason=\"empty\"} 1",
        "cadre_envelopes_refused_total{lane=\"control\",reason=\"unknown_kind\"} 1",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    assert_healthy(&a, &b).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Undecodable control-lane requests (Raft, placement) and agent requests from an authenticated
/// peer get a typed refusal, and the node keeps serving agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_control_and_agent_requests_are_refused() {
    use cadre::cluster::protocol::AgentReply;
    use cadre::cluster::protocol::ControlReply;
    use cadre::wire::envelope::Kind;
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.addr()]).await;
    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x01, 0x02]);
    let reply = b.transport().ask_on(Lane::Control, a.addr(), garbage.clone(), WAIT).await.unwrap();
    match postcard::from_bytes::<ControlReply>(&reply).unwrap() {
        ControlReply::Refused(why) => assert!(why.contains("undecodable"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut agent = BytesMut::new();
    agent.put_u8(Kind::Agent.tag());
    agent.extend_from_slice(&garbage);
    let reply = b.transport().ask(a.addr(), agent.freeze(), WAIT).await.unwrap();
    match postcard::from_bytes::<AgentReply>(&reply).unwrap() {
        AgentReply::Err(e) => assert!(e.to_string().contains("undecodable"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // Still serving: a counter call through b reaches its owner.
    let k = cadre::storage::Key::new("counter", "after-garbage");
    let s = cadre::signal::Signal::new("counter.add", serde_json::json!(3));
    assert_eq!(b.cluster().call(&k, s, WAIT).await.unwrap().reply, 3);
    b.shutdown().await;
    a.shutdown().await;
}

/// Replication requests (data lane, `Kind::Replica`) that do not decode, come from a node that does
/// not own the shard, or name a key of another shard get a typed refusal, are counted by reason,
/// and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replication_requests_are_refused_and_counted() {
    use cadre::cluster::protocol::{ReplicaError, ReplicaOp, ReplicaReply, ReplicaReq};
    use cadre::wire::envelope::Kind;
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.addr()]).await;
    let ask = |req: Bytes| {
        let b = &b;
        let to = a.addr();
        async move {
            let reply = b.transport().ask_on(Lane::Data, to, req, WAIT).await.unwrap();
            postcard::from_bytes::<ReplicaReply>(&reply).unwrap()
        }
    };
    let tagged = |body: &[u8]| {
        let mut buf = BytesMut::new();
        buf.put_u8(Kind::Replica.tag());
        buf.extend_from_slice(body);
        buf.freeze()
    };

    // 1. Bytes that are no request.
    let reply = ask(tagged(&[0xff, 0xff, 0xff, 0xff, 0x01])).await;
    assert!(matches!(reply, Err(ReplicaError::Undecodable(_))), "{reply:?}");

    // A key a owns (once the table has one), and the epoch a serves it at.
    let (key, shard, epoch) = loop {
        let found = (0..1000).map(|i| cadre::storage::Key::new("counter", format!("r{i}"))).find_map(|k| {
            let p = a.cluster().placement(&k).ok()?;
            (p.owner.as_deref() == Some("a")).then_some((k, p.shard, p.epoch))
        });
        if let Some(f) = found {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let put = |shard: u32, id: &str| ReplicaReq {
        shard,
        epoch,
        op: ReplicaOp::Put { ty: "counter".into(), id: id.into(), value: b"9".to_vec() },
    };
    let encode = |req: &ReplicaReq| tagged(&postcard::to_allocvec(req).unwrap());

    // 2. A write to a's own shard, from b at a's epoch: b is not the owner.
    let reply = ask(encode(&put(shard, &key.id))).await;
    assert!(matches!(reply, Err(ReplicaError::Stale(_))), "{reply:?}");

    // 3. A write naming a key of another shard than the request's, at a newer epoch (as from a
    //    new owner a has not heard of yet): refused before anything is written.
    let other = (shard + 1) % a.cluster().state().shard_count;
    let reply = ask(encode(&ReplicaReq { epoch: epoch + 1, ..put(other, &key.id) })).await;
    assert!(matches!(reply, Err(ReplicaError::Diverged(_))), "{reply:?}");

    // Nothing was written, and a still serves the key.
    let s = cadre::signal::Signal::new("counter.add", serde_json::json!(3));
    assert_eq!(b.cluster().call(&key, s, WAIT).await.unwrap().reply, 3);
    let metrics = a.metrics().render();
    for reason in ["undecodable", "stale", "diverged"] {
        let line = format!("cadre_replica_requests_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// A metadata snapshot whose shard table is shorter than its shard count (an owner lookup would
/// index past it) is refused, counted and logged; the node keeps its state and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_breaks_the_metadata_invariants_is_refused() {
    use cadre::cluster::protocol::{ControlReply, ControlReq, RaftRpc};
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.addr()]).await;
    let k = cadre::storage::Key::new("counter", "before-snapshot");
    let add = || cadre::signal::Signal::new("counter.add", serde_json::json!(2));
    assert_eq!(b.cluster().call(&k, add(), WAIT).await.unwrap().reply, 2);
    let before = a.cluster().state();

    let mut data = (*before).clone();
    data.shards.truncate(1);
    let rpc = RaftRpc::FullSnapshot { vote: Default::default(), meta: Default::default(), data };
    let req = ControlReq::Raft { to: a.cluster().raft_id(), rpc };
    let bytes = Bytes::from(postcard::to_allocvec(&req).unwrap());
    let reply = b.transport().ask_on(Lane::Control, a.addr(), bytes, WAIT).await.unwrap();
    let reply: ControlReply = postcard::from_bytes(&reply).unwrap();
    assert!(matches!(&reply, ControlReply::Refused(why) if why.contains("shard table")), "{reply:?}");

    let metrics = a.metrics().render();
    assert!(metrics.contains("cadre_meta_snapshots_refused_total 1"), "counted in\n{metrics}");
    assert_eq!(a.cluster().state().shards.len(), before.shards.len(), "the table is as it was");
    assert_eq!(b.cluster().call(&k, add(), WAIT).await.unwrap().reply, 4, "still serving");
    b.shutdown().await;
    a.shutdown().await;
}
