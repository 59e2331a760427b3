//! One test suite for the transport, run on real tokio TCP and on turmoil's simulated network.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cadre::config::{NetConfig, Secret};
use cadre::metrics::Metrics;
use cadre::net::{
    DropReason, Handler, Network, PeerInfo, SendError, TokioNet, Transport, TransportConfig, TurmoilNet, WeakTransport,
};
use cadre::wire::{Lane, Msg, OutMsg};
use tokio::sync::mpsc;

const SECRET: &str = "suite-secret";
/// Upper bound for anything awaited in this suite (generous: CI machines are slow).
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone)]
struct Env {
    net: Arc<dyn Network>,
    /// Address peers dial for a port.
    ip: IpAddr,
    /// Address to bind for a port (unspecified under turmoil).
    bind_ip: IpAddr,
    next_port: Arc<dyn Fn() -> u16 + Send + Sync>,
}

impl Env {
    fn port(&self) -> u16 {
        (self.next_port)()
    }
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }
}

/// Records what arrives; answers asks with their payload.
struct Collector {
    tx: mpsc::Sender<(String, Lane, OutMsg)>,
    transport: WeakTransport,
}

impl Handler for Collector {
    fn on_message(&self, from: &PeerInfo, lane: Lane, msg: OutMsg) -> Option<Bytes> {
        if let Msg::Ask { id, payload } = &msg {
            // Even ids are answered inline on the same connection, odd ids later through the
            // answering node's own connection: both reply paths are exercised.
            if id % 2 == 0 {
                return Some(payload.clone());
            }
            if let Some(t) = self.transport.upgrade() {
                t.reply_on(lane, from.addr, *id, payload.clone()).expect("reply queued");
            }
            return None;
        }
        self.tx.try_send((from.name.to_string(), lane, msg)).expect("test collector overflow");
        None
    }
}

struct Started {
    t: Transport,
    rx: mpsc::Receiver<(String, Lane, OutMsg)>,
}

async fn start(env: &Env, name: &str, port: u16, secret: &str, net: NetConfig) -> Started {
    let cfg = TransportConfig {
        name: name.into(),
        cluster: "suite".into(),
        listen: SocketAddr::new(env.bind_ip, port),
        advertise: Some(env.addr(port)),
        secret: Secret::new(secret),
        net,
        rng_seed: port as u64,
    };
    let (t, inbound) = Transport::bind(env.net.clone(), cfg, &Metrics::new()).await.expect("transport binds");
    let (tx, rx) = mpsc::channel(100_000);
    inbound.serve(Arc::new(Collector { tx, transport: t.downgrade() }));
    Started { t, rx }
}

async fn recv(rx: &mut mpsc::Receiver<(String, Lane, OutMsg)>) -> (String, Lane, OutMsg) {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("message within the wait bound").expect("channel open")
}

/// Polls `cond` every 10 ms (for state with no event to await), at most `WAIT`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "not reached: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tell(i: u32) -> OutMsg {
    Msg::Tell(Bytes::from(i.to_be_bytes().to_vec()))
}

fn index_of(msg: &OutMsg) -> u32 {
    match msg {
        Msg::Tell(p) | Msg::Membership(p) => u32::from_be_bytes(p[..4].try_into().unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn messages_arrive_in_order_per_lane(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    for i in 0..2000u32 {
        a.t.send(env.addr(bport), Lane::Data, tell(i)).await.unwrap();
        if i % 10 == 0 {
            let m = Msg::Membership(Bytes::from((i / 10).to_be_bytes().to_vec()));
            a.t.send(env.addr(bport), Lane::Control, m).await.unwrap();
        }
    }
    let (mut data, mut control) = (0u32, 0u32);
    while data < 2000 || control < 200 {
        let (from, lane, msg) = recv(&mut b.rx).await;
        assert_eq!(from, "a");
        match lane {
            Lane::Data => {
                assert_eq!(index_of(&msg), data, "data lane out of order");
                data += 1;
            }
            Lane::Control => {
                assert_eq!(index_of(&msg), control, "control lane out of order");
                control += 1;
            }
        }
    }
    // The writer counts a frame once its write returns, which can be after the reader here got
    // it: wait (bounded) for the count to catch up. Pings are messages too, so at least the tells.
    let counted = async {
        while a.t.stats().sent.msgs(Lane::Data) < 2000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), counted).await.expect("the sender counts every tell it wrote");
    let s = a.t.stats();
    assert!(s.sent.frames(Lane::Data) < s.sent.msgs(Lane::Data), "several messages share frames");
}

async fn asks_get_replies(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    let _b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    for i in 0..50u32 {
        let payload = Bytes::from(format!("q{i}"));
        let reply = a.t.ask(env.addr(bport), payload.clone(), WAIT).await.unwrap();
        assert_eq!(reply, payload);
    }
}

async fn asks_on_the_control_lane_get_replies(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    let _b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    let data_before = a.t.stats().sent.msgs(Lane::Data);
    for i in 0..50u32 {
        let payload = Bytes::from(format!("c{i}"));
        let reply = a.t.ask_on(Lane::Control, env.addr(bport), payload.clone(), WAIT).await.unwrap();
        assert_eq!(reply, payload);
    }
    assert!(a.t.stats().sent.msgs(Lane::Control) >= 50);
    // Only pings (a few) may have gone on the data lane meanwhile, not the 50 asks.
    assert!(a.t.stats().sent.msgs(Lane::Data) - data_before < 25, "the asks went on the data lane");
}

async fn oversized_messages_are_refused(env: Env) {
    let net = NetConfig { frame_len_max_bytes: 4096, ..NetConfig::default() };
    let a = start(&env, "a", env.port(), SECRET, net).await;
    let err = a.t.try_send(env.addr(env.port()), Lane::Data, Msg::Tell(Bytes::from(vec![0u8; 8192]))).unwrap_err();
    assert!(matches!(err, SendError::TooLarge { len: 8192, .. }), "{err}");
    assert_eq!(a.t.stats().dropped(DropReason::TooLarge), 1);
}

async fn full_queue_is_a_typed_error_while_unreachable(env: Env) {
    let net = NetConfig { peer_queue_len_max: 4, ..NetConfig::default() };
    let a = start(&env, "a", env.port(), SECRET, net).await;
    let nobody = env.addr(env.port());
    for i in 0..4 {
        a.t.try_send(nobody, Lane::Data, tell(i)).unwrap();
    }
    let err = a.t.try_send(nobody, Lane::Data, tell(4)).unwrap_err();
    assert_eq!(err, SendError::QueueFull { peer: nobody });
    assert_eq!(a.t.stats().dropped(DropReason::QueueFull), 1);
}

async fn buffered_messages_flush_when_the_peer_appears(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    for i in 0..100 {
        a.t.try_send(env.addr(bport), Lane::Data, tell(i)).unwrap();
    }
    eventually("a failed to connect", || a.t.stats().connect_failures.get() >= 1).await;
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    for i in 0..100 {
        let (_, _, msg) = recv(&mut b.rx).await;
        assert_eq!(index_of(&msg), i);
    }
}

async fn reconnects_after_the_peer_restarts(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    a.t.send(env.addr(bport), Lane::Data, tell(0)).await.unwrap();
    assert_eq!(index_of(&recv(&mut b.rx).await.2), 0);
    b.t.abort().await;
    drop(b);
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    // The first sends after the restart may hit the dead connection (at most once); keep
    // sending until one arrives on the new connection.
    let mut i = 1;
    loop {
        a.t.send(env.addr(bport), Lane::Data, tell(i)).await.unwrap();
        if let Ok(Some((_, _, msg))) = tokio::time::timeout(Duration::from_millis(200), b.rx.recv()).await {
            assert!(index_of(&msg) >= 1);
            break;
        }
        i += 1;
        assert!(i < 200, "no message reached the restarted peer");
    }
    assert!(a.t.stats().reconnects.get() >= 1);
}

async fn rtt_is_measured(env: Env) {
    let a = start(&env, "a", env.port(), SECRET, NetConfig::default()).await;
    let bport = env.port();
    let _b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    a.t.ask(env.addr(bport), Bytes::from_static(b"x"), WAIT).await.unwrap();
    eventually("rtt measured", || !a.t.peer_rtts().is_empty()).await;
    let (addr, rtt) = a.t.peer_rtts()[0];
    assert_eq!(addr, env.addr(bport));
    assert!(rtt > Duration::ZERO);
}

async fn wrong_secret_and_cluster_are_refused(env: Env) {
    let a = start(&env, "a", env.port(), "wrong-secret", NetConfig::default()).await;
    let bport = env.port();
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    a.t.try_send(env.addr(bport), Lane::Data, tell(0)).unwrap();
    eventually("acceptor refuses wrong secret", || b.t.stats().refused_count("acceptor", "wrong_secret") >= 1).await;
    eventually("dialer sees wrong secret", || a.t.stats().refused_count("dialer", "wrong_secret") >= 1).await;
    assert!(b.rx.try_recv().is_err(), "nothing from a refused peer reaches the handler");

    let cfg = TransportConfig {
        name: "c".into(),
        cluster: "another-cluster".into(),
        listen: SocketAddr::new(env.bind_ip, env.port()),
        advertise: None,
        secret: Secret::new(SECRET),
        net: NetConfig::default(),
        rng_seed: 9,
    };
    // Only sends: its receiving side is dropped unserved.
    let (c, _) = Transport::bind(env.net.clone(), cfg, &Metrics::new()).await.unwrap();
    c.try_send(env.addr(bport), Lane::Data, tell(1)).unwrap();
    eventually("acceptor refuses wrong cluster", || b.t.stats().refused_count("acceptor", "wrong_cluster") >= 1).await;
    assert!(b.rx.try_recv().is_err());
}

/// Two nodes pushing large tells and asks at each other at once: neither side may stop reading
/// while its writes are blocked (that would deadlock both connections).
async fn large_messages_both_ways_do_not_deadlock(env: Env) {
    const BIG_BYTES: usize = 256 * 1024;
    const COUNT: u32 = 40;
    let (aport, bport) = (env.port(), env.port());
    let mut a = start(&env, "a", aport, SECRET, NetConfig::default()).await;
    let mut b = start(&env, "b", bport, SECRET, NetConfig::default()).await;
    let big = |i: u32| {
        let mut v = vec![0u8; BIG_BYTES];
        v[..4].copy_from_slice(&i.to_be_bytes());
        Bytes::from(v)
    };
    let (ta, tb) = (a.t.clone(), b.t.clone());
    let (a_addr, b_addr) = (env.addr(aport), env.addr(bport));
    // All asks of a side are in flight at once: megabytes of asks and replies cross on the same
    // connections in both directions.
    let burst = |t: Transport, to: SocketAddr| async move {
        for i in 0..COUNT {
            t.send(to, Lane::Data, Msg::Tell(big(i))).await.unwrap();
        }
        let asks = (0..COUNT).map(|i| {
            let t = t.clone();
            async move { t.ask(to, big(i), WAIT).await.unwrap() }
        });
        for reply in futures::future::join_all(asks).await {
            assert_eq!(reply.len(), BIG_BYTES);
        }
    };
    tokio::join!(burst(ta, b_addr), burst(tb, a_addr));
    for rx in [&mut a.rx, &mut b.rx] {
        for i in 0..COUNT {
            let (_, _, msg) = recv(rx).await;
            assert_eq!(index_of(&msg), i);
        }
    }
}

fn tokio_env() -> Env {
    Env {
        net: Arc::new(TokioNet),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        next_port: Arc::new(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()),
    }
}

type Scenario = fn(Env) -> Pin<Box<dyn Future<Output = ()>>>;

fn run_turmoil(scenario: Scenario) {
    let mut sim =
        turmoil::Builder::new().rng_seed(7).simulation_duration(Duration::from_secs(120)).tcp_capacity(100_000).build();
    sim.client("suite", async move {
        let port = Arc::new(AtomicU16::new(7000));
        let env = Env {
            net: Arc::new(TurmoilNet),
            ip: turmoil::lookup("suite"),
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            next_port: Arc::new(move || port.fetch_add(1, Ordering::Relaxed)),
        };
        scenario(env).await;
        Ok(())
    });
    sim.run().expect("scenario passes in simulation");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_tokio {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::tokio_env()).await
                }
            )*
        }
        mod on_turmoil {
            $(
                #[test]
                fn $name() {
                    super::run_turmoil(|env| Box::pin(super::$name(env)))
                }
            )*
        }
    };
}

suite!(
    messages_arrive_in_order_per_lane,
    asks_get_replies,
    asks_on_the_control_lane_get_replies,
    oversized_messages_are_refused,
    full_queue_is_a_typed_error_while_unreachable,
    buffered_messages_flush_when_the_peer_appears,
    reconnects_after_the_peer_restarts,
    rtt_is_measured,
    wrong_secret_and_cluster_are_refused,
    large_messages_both_ways_do_not_deadlock,
);
