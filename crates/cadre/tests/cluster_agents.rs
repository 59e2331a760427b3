//! Keyed agents across in-process nodes on loopback: one metadata group, shards spread by the
//! placement controller, calls from any node reaching the owner, a planned rebalance onto a
//! replica that was caught up first, and a crashed owner's shards served again by a replica with
//! every acknowledged write.
//!
//! Conditions are awaited on the nodes' metadata watch (with a deadline), never slept on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cadre::config::{Config, PlacementConfig, Secret};
use cadre::meta::{MetaState, ShardState};
use cadre::node::{Node, NodeOptions};
use cadre::placement::desired_owner;
use cadre::signal::Signal;
use cadre::storage::Key;

const WAIT: Duration = Duration::from_secs(30);
const T: Duration = Duration::from_secs(10);
const KEYS: usize = 40;

fn config(name: &str, seeds: Vec<std::net::SocketAddr>) -> Config {
    Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        seeds,
        secret: Secret::new("cluster-agents-secret-0123"),
        rng_seed: Some(name.bytes().map(u64::from).sum()),
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

/// Logs to the test's output when `RUST_LOG` is set (shown for failing tests).
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// Waits until `node`'s copy of the metadata satisfies `cond`.
async fn await_meta(node: &Node, what: &str, cond: impl Fn(&MetaState) -> bool) -> Arc<MetaState> {
    let mut rx = node.cluster().watch();
    let wait = async {
        loop {
            let st = rx.borrow_and_update().clone();
            if cond(&st) {
                return st;
            }
            rx.changed().await.unwrap();
        }
    };
    match tokio::time::timeout(WAIT, wait).await {
        Ok(st) => st,
        Err(_) => panic!("{} never saw: {what}\n{:#?}", node.name(), node.cluster().state().shard_counts()),
    }
}

/// Every shard active with its desired owner among `live`.
fn settled(st: &MetaState, live: &[&str]) -> bool {
    st.shard_count > 0
        && st.shards.iter().enumerate().all(|(s, e)| {
            e.state == ShardState::Active && e.owner.as_deref() == desired_owner(s as u32, live.iter().copied())
        })
}

/// Nodes a (founding), b and c, joining through a.
async fn start_abc() -> (Node, Node, Node) {
    let a = Node::start(config("a", vec![]), NodeOptions::default()).await.unwrap();
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    let c = Node::start(config("c", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    (a, b, c)
}

fn key(i: usize) -> Key {
    Key::new("counter", format!("k{i}"))
}

async fn add(node: &Node, k: &Key, n: i64) -> (i64, String) {
    let served = node.cluster().call(k, Signal::new("counter.add", serde_json::json!(n)), T).await.unwrap();
    (served.reply.as_i64().unwrap(), served.node)
}

async fn get(node: &Node, k: &Key) -> i64 {
    let served = node.cluster().call(k, Signal::new("counter.get", serde_json::Value::Null), T).await.unwrap();
    served.reply.as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_owners_rebalancing_keeps_state_and_a_crash_fails_over() {
    logs();
    let (a, b, c) = start_abc().await;
    let abc = ["a", "b", "c"];
    for n in [&a, &b, &c] {
        await_meta(n, "shards with their desired owners", |st| settled(st, &abc)).await;
    }

    // Every node reaches every key; the owner in the table serves it.
    for i in 0..KEYS {
        for (round, n) in [&a, &b, &c].into_iter().enumerate() {
            let (value, served_by) = add(n, &key(i), 1).await;
            assert_eq!(value, round as i64 + 1, "key {i} via {}", n.name());
            let p = n.cluster().placement(&key(i)).unwrap();
            assert_eq!(Some(served_by), p.owner, "key {i}");
        }
    }
    let epochs_before: Vec<u64> = a.cluster().state().shards.iter().map(|e| e.epoch).collect();

    // A fourth node joins: shards move to it by planned hand-offs, state copied along.
    let d = Node::start(config("d", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    let abcd = ["a", "b", "c", "d"];
    for n in [&a, &b, &c, &d] {
        await_meta(n, "rebalanced onto d", |st| settled(st, &abcd)).await;
    }
    let st = a.cluster().state();
    let moved: Vec<usize> = (0..st.shards.len()).filter(|&s| st.shards[s].owner.as_deref() == Some("d")).collect();
    assert!(!moved.is_empty(), "d owns shards");
    for s in &moved {
        assert_eq!(st.shards[*s].epoch, epochs_before[*s] + 1, "a planned move raises the epoch by one");
    }
    let mut on_d = 0;
    for i in 0..KEYS {
        assert_eq!(get(&d, &key(i)).await, 3, "key {i} kept its value across the move");
        on_d += usize::from(d.cluster().placement(&key(i)).unwrap().owner.as_deref() == Some("d"));
    }
    assert!(on_d > 0, "some keys moved to d");

    // c crashes: once its lease is over, its shards are promoted on replicas and served.
    let c_keys: Vec<usize> =
        (0..KEYS).filter(|&i| a.cluster().placement(&key(i)).unwrap().owner.as_deref() == Some("c")).collect();
    c.kill().await;
    let abd = ["a", "b", "d"];
    await_meta(&a, "c's shards reassigned", |st| settled(st, &abd)).await;
    let mut values = BTreeMap::new();
    for i in 0..KEYS {
        let (v, served_by) = add(&b, &key(i), 1).await;
        assert_ne!(served_by, "c");
        values.insert(i, v);
    }
    // Node-local memory storage, but replicated: c's keys were promoted on a replica that had
    // every acknowledged add.
    assert!(!c_keys.is_empty(), "c owned keys");
    for (i, v) in values {
        assert_eq!(v, 4, "key {i} kept its value (owned by c: {})", c_keys.contains(&i));
    }
    for n in [d, b, a] {
        n.shutdown().await;
    }
}

/// The voter names of `node`'s Raft membership.
fn voters(node: &Node) -> Vec<String> {
    let m = node.cluster().raft().metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    let mut v: Vec<String> =
        membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| n.name.clone())).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_stay_odd_and_a_dead_voter_is_replaced() {
    let cfg = |name: &str, seeds| {
        let mut c = config(name, seeds);
        c.meta.voter_down_replace_ms = 1500;
        c.meta.member_gone_remove_ms = 3000;
        c
    };
    let a = Node::start(cfg("a", vec![]), NodeOptions::default()).await.unwrap();
    let b = Node::start(cfg("b", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    await_meta(&a, "b admitted", |st| st.members.contains_key("b")).await;
    // Two members: still one voter (a second would make either loss stop the group).
    let settle = |n: &Node, want: &'static [&'static str]| {
        let raft = n.cluster().raft().clone();
        async move {
            let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            raft.wait(Some(WAIT))
                .metrics(
                    |m| {
                        let ms = m.membership_config.membership();
                        let mut v: Vec<String> =
                            ms.voter_ids().filter_map(|id| ms.get_node(&id).map(|n| n.name.clone())).collect();
                        v.sort();
                        // Uniform: a change left joint would still need the old config's quorum.
                        v == want && ms.get_joint_config().len() == 1
                    },
                    "voters",
                )
                .await
                .unwrap_or_else(|e| panic!("voters never became {want:?}: {e}"));
        }
    };
    await_meta(&a, "settled on a and b", |st| settled(st, &["a", "b"])).await;
    assert_eq!(voters(&a), ["a"]);
    let c = Node::start(cfg("c", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    settle(&a, &["a", "b", "c"]).await;
    let d = Node::start(cfg("d", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    await_meta(&a, "d admitted", |st| st.members.contains_key("d")).await;
    assert_eq!(voters(&a), ["a", "b", "c"], "a fourth member stays a learner");
    // A voter dies: after voter_down_replace_ms the learner takes its place.
    c.kill().await;
    settle(&a, &["a", "b", "d"]).await;
    // The group still commits: c's shards are reassigned to the live members.
    await_meta(&a, "c's shards reassigned", |st| settled(st, &["a", "b", "d"])).await;
    // Gone for member_gone_remove_ms, owning nothing and no longer a voter: c leaves the
    // metadata and the group's nodes.
    let st = await_meta(&a, "c removed", |st| !st.members.contains_key("c")).await;
    assert_eq!(st.members.keys().collect::<Vec<_>>(), ["a", "b", "d"]);
    let in_group = |n: &Node| {
        n.cluster().raft().metrics().borrow().membership_config.membership().nodes().any(|(_, m)| m.name == "c")
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut rx = a.cluster().raft().metrics();
    while in_group(&a) {
        tokio::time::timeout_at(deadline, rx.changed()).await.expect("c left the group's nodes").unwrap();
    }
    // Coming back under its name, it is admitted again as a new member and gets shards.
    let c = Node::start(cfg("c", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    let st = await_meta(&a, "c serves again", |st| settled(st, &["a", "b", "c", "d"])).await;
    assert_eq!(st.members["c"].admitted, 4, "a new admission, after a, b, c and d");
    for n in [c, d, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_hands_every_shard_over_with_its_state() {
    logs();
    let a = Node::start(config("a", vec![]), NodeOptions::default()).await.unwrap();
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default()).await.unwrap();
    // c listens on a fixed port, so it comes back below at the same address.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c_config = || {
        let mut cfg = config("c", vec![a.addr()]);
        cfg.listen = format!("127.0.0.1:{port}").parse().unwrap();
        cfg
    };
    let c = Node::start(c_config(), NodeOptions::default()).await.unwrap();
    for n in [&a, &b, &c] {
        await_meta(n, "settled", |st| settled(st, &["a", "b", "c"])).await;
    }
    for i in 0..KEYS {
        add(&c, &key(i), 2).await;
    }
    let on_c = (0..KEYS).filter(|&i| a.cluster().placement(&key(i)).unwrap().owner.as_deref() == Some("c")).count();
    assert!(on_c > 0, "c owns some keys");
    // c leaves: its shards move by planned hand-offs (node-local state copied) before it stops.
    // Meanwhile b keeps reading every key: a call in flight to c when its shard moves (or sent
    // to c after it stopped, by a table not yet updated) is sent again to the new owner.
    let reads_during = {
        let b = b.cluster().clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut reads = 0usize;
            loop {
                for i in 0..KEYS {
                    let served = b.call(&key(i), Signal::new("counter.get", serde_json::Value::Null), T).await;
                    let value = served.map(|s| s.reply.as_i64());
                    assert!(matches!(value, Ok(Some(2))), "key {i} during the leave: {value:?}");
                    reads += 1;
                }
                if stop_rx.try_recv().is_ok() {
                    return reads;
                }
            }
        });
        (stop_tx, task)
    };
    c.shutdown().await;
    let st = await_meta(&a, "c owns no shard", |st| st.shard_counts().get("c") == Some(&0)).await;
    assert!(st.members["c"].draining);
    let _ = reads_during.0.send(());
    let reads = reads_during.1.await.expect("reads during the leave");
    assert!(reads >= KEYS, "b read every key at least once during the leave");
    // Node-local memory storage: a reassignment after c's lease expired would have started c's
    // keys over from zero; a hand-off copied them.
    for i in 0..KEYS {
        assert_eq!(get(&b, &key(i)).await, 2, "key {i} kept its value across the leave");
    }
    // c comes back at the same address: no longer draining, it gets shards again.
    let c = Node::start(c_config(), NodeOptions::default()).await.unwrap();
    let st = await_meta(&a, "c serves again", |st| settled(st, &["a", "b", "c"])).await;
    assert!(!st.members["c"].draining);
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

/// Every shard active with its desired owner and every replica in sync (factor 3 on 3 nodes).
fn replicated(st: &MetaState, live: &[&str]) -> bool {
    settled(st, live) && st.shards.iter().all(|e| e.replicas.len() == 2 && e.replicas.iter().all(|r| r.in_sync))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_served_by_the_nearest_in_sync_copy() {
    use cadre::agent::CallError;
    use cadre::cluster::read::{ReadFrom, ReadOpts, Role};
    logs();
    let (a, b, c) = start_abc().await;
    let abc = ["a", "b", "c"];
    for n in [&a, &b, &c] {
        await_meta(n, "every shard on 3 nodes, replicas in sync", |st| replicated(st, &abc)).await;
    }
    let get_signal = || Signal::new("counter.get", serde_json::Value::Null);
    let nearest = ReadOpts { from: ReadFrom::Nearest, stale_ms_max: None };
    let (mut by_replica, mut by_owner, mut local, mut reads) = (0, 0, 0, 0);
    for i in 0..KEYS {
        for (round, n) in [&a, &b, &c].into_iter().enumerate() {
            let (value, _) = add(n, &key(i), 1).await;
            // Every node holds a copy of every shard: the read is served where it is asked (unless
            // that copy cannot answer just then), by the owner or by an in-sync replica, with
            // every acknowledged add (in sync: it applied the add before it was acknowledged).
            for m in [&a, &b, &c] {
                let r = m.cluster().read(&key(i), Some(get_signal()), nearest, T).await.unwrap();
                assert_eq!(r.reply, value, "key {i}, round {round}, read via {}", m.name());
                let owner = m.cluster().placement(&key(i)).unwrap().owner;
                assert_eq!(owner.as_deref() == Some(r.node.as_str()), r.role == Role::Owner, "key {i}: {r:?}");
                match r.role {
                    Role::Owner => by_owner += 1,
                    Role::Replica => by_replica += 1,
                }
                reads += 1;
                local += usize::from(r.node == m.name());
            }
        }
        // `from: owner` goes to the owner; the stored state reads as the state itself.
        let owner_read = ReadOpts { from: ReadFrom::Owner, stale_ms_max: None };
        let r = b.cluster().read(&key(i), None, owner_read, T).await.unwrap();
        assert_eq!(r.reply, serde_json::json!({"value": 3}), "key {i}");
        assert_eq!(r.role, Role::Owner);
        assert_eq!(Some(r.node), b.cluster().placement(&key(i)).unwrap().owner);
    }
    assert!(by_replica > 0 && by_owner > 0, "replicas served {by_replica} reads, owners {by_owner}");
    // Nearest first: the reader's own copy served (all of them, unless a copy was briefly out of
    // sync or its table too old).
    assert!(local * 2 > reads, "{local} of {reads} reads served by the reader's own copy");
    // A bound tighter than a replica's table age sends the read on: a replica answers only with
    // a table at most that old, else an owner answers.
    for i in 0..KEYS {
        let tight = ReadOpts { from: ReadFrom::Nearest, stale_ms_max: Some(1) };
        let r = c.cluster().read(&key(i), Some(get_signal()), tight, T).await.unwrap();
        assert_eq!(r.reply, 3, "key {i}");
        assert!(r.role == Role::Owner || r.age_ms <= 1, "key {i}: a replica answered with a table {} ms old", r.age_ms);
    }
    // A handler that changes the state is not a read, wherever it would run; nothing changed.
    let e = a
        .cluster()
        .read(&key(0), Some(Signal::new("counter.add", serde_json::json!(5))), nearest, T)
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::NotRead(_)), "{e}");
    assert_eq!(get(&c, &key(0)).await, 3);
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_shards_sends_pool_work_to_the_least_loaded_owner() {
    logs();
    let (a, b, c) = start_abc().await;
    for n in [&a, &b, &c] {
        await_meta(n, "settled", |st| settled(st, &["a", "b", "c"])).await;
    }
    // c hands its shards over and keeps running: its pool deliveries must go to a or b.
    assert!(c.cluster().drain(WAIT).await, "c drained");
    await_meta(&c, "c owns no shard", |st| st.shard_counts().get("c").is_none_or(|n| *n == 0)).await;
    let picked = || {
        let p = c.cluster().pool_pick("counter").expect("a pool pick");
        assert!(!p.local, "c serves no shard");
        c.cluster().placement(&p.key).unwrap().owner.unwrap()
    };
    // Loads are refreshed in the background: wait (bounded) until the picks follow them.
    let until_picked = |want: &'static str| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while picked() != want {
            assert!(tokio::time::Instant::now() < deadline, "pool picks never went to {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    activate(&a, 40, "la").await;
    until_picked("b").await;
    // b becomes far busier (beyond the slack): the picks move to a.
    activate(&b, 120, "lb").await;
    until_picked("a").await;
    assert!(a.cluster().host().active() >= 40 && b.cluster().host().active() >= 120);
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Activates `n` agents on `node` (keys whose shards it owns).
async fn activate(node: &Node, n: usize, prefix: &str) {
    let keys = (0..).map(|i| Key::new("counter", format!("{prefix}{i}")));
    let mine = keys.filter(|k| node.cluster().placement(k).unwrap().owner.as_deref() == Some(node.name()));
    for k in mine.take(n) {
        node.cluster().ensure(&k, T).await.unwrap();
    }
}

/// `hop` `{"path": [ids]}`: calls the relay of the first id with the rest and answers the depth
/// below it plus one (0 at the end), or the call's error as `{"error"}`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Relay {}

impl cadre::agent::Agent for Relay {
    const TYPE: &'static str = "relay";

    async fn handle(
        &mut self,
        ctx: &mut cadre::agent::Ctx,
        signal: Signal,
    ) -> Result<cadre::agent::Reply, cadre::agent::AgentError> {
        let Some(cadre::signal::Data::Json(data)) = signal.data else { return Ok(serde_json::json!(null)) };
        let path: Vec<String> = serde_json::from_value(data["path"].clone()).unwrap_or_default();
        let Some((next, rest)) = path.split_first() else { return Ok(0.into()) };
        let hop = ctx.signal("hop", serde_json::json!({ "path": rest }));
        Ok(match ctx.call(&Key::new("relay", next.clone()), hop).await {
            Ok(below) if below.is_object() => below,
            Ok(depth) => (depth.as_i64().unwrap() + 1).into(),
            Err(e) => serde_json::json!({ "error": format!("{e:?}") }),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_agents_on_other_nodes_and_a_cycle_across_nodes_fails_at_once() {
    logs();
    let opts = || NodeOptions::default().agent::<Relay>();
    let a = Node::start(config("a", vec![]), opts()).await.unwrap();
    let b = Node::start(config("b", vec![a.addr()]), opts()).await.unwrap();
    let c = Node::start(config("c", vec![a.addr()]), opts()).await.unwrap();
    for n in [&a, &b, &c] {
        await_meta(n, "shards with their desired owners", |st| settled(st, &["a", "b", "c"])).await;
    }
    // Six relays, each owned by another node than the one before it.
    let owner = |id: &str| a.cluster().placement(&Key::new("relay", id)).unwrap().owner.unwrap();
    let mut path: Vec<String> = Vec::new();
    for i in 0.. {
        let id = format!("r{i}");
        if path.last().is_none_or(|last| owner(last) != owner(&id)) {
            path.push(id);
        }
        if path.len() == 6 {
            break;
        }
    }
    let owners: std::collections::BTreeSet<String> = path.iter().map(|id| owner(id)).collect();
    assert!(owners.len() >= 2, "the path crosses nodes: {owners:?}");
    let cluster = c.cluster().clone();
    let call = |first: &str, rest: &[String]| {
        let signal = Signal::new("hop", serde_json::json!({ "path": rest }));
        let (key, cluster) = (Key::new("relay", first), cluster.clone());
        async move { cluster.call(&key, signal, T).await.unwrap().reply }
    };
    assert_eq!(call(&path[0], &path[1..]).await, 5);
    // Back to the first, which waits on the whole chain: refused where it arrives, at once
    // (without the chain, the first call would wait until `T`).
    let mut back = path[1..].to_vec();
    back.push(path[0].clone());
    let reply = call(&path[0], &back).await;
    assert!(reply["error"].as_str().is_some_and(|e| e.starts_with("Cycle")), "{reply}");
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_and_stored_agents_list_across_nodes_in_pages() {
    logs();
    let (a, b, c) = start_abc().await;
    for n in [&a, &b, &c] {
        await_meta(n, "shards with their desired owners", |st| settled(st, &["a", "b", "c"])).await;
    }
    let ids: Vec<String> = (0..30).map(|i| format!("l{i:02}")).collect();
    for id in &ids {
        add(&b, &Key::new("counter", id.clone()), 1).await;
    }
    // Pages of 7 from c, followed to the end: every agent once, on its owner.
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = c.cluster().list("counter", after.as_deref(), 7, T).await.unwrap();
        assert!(page.unreachable.is_empty(), "{page:?}");
        assert!(page.agents.len() <= 7);
        for agent in &page.agents {
            let owner = c.cluster().placement(&Key::new("counter", agent.info.id.clone())).unwrap().owner;
            assert_eq!(Some(&agent.node), owner.as_ref(), "{agent:?}");
            assert_eq!(agent.info.handled, 1, "{agent:?}");
        }
        seen.extend(page.agents.into_iter().map(|a| a.info.id));
        pages += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ids, "in order, each once");
    assert_eq!(pages, 5);
    let owners: std::collections::BTreeSet<String> =
        ids.iter().map(|id| a.cluster().placement(&Key::new("counter", id.clone())).unwrap().owner.unwrap()).collect();
    assert!(owners.len() >= 2, "spread over nodes: {owners:?}");
    // Stored: the embedded stores of every member, deduplicated (each key is on 2 or 3 nodes).
    let page = a.cluster().stored("counter", Some("l09"), 10, T).await.unwrap();
    assert_eq!(page.ids, ids[10..20].to_vec());
    assert_eq!(page.next.as_deref(), Some("l19"));
    assert!(matches!(a.cluster().list("nope", None, 5, T).await, Err(cadre::agent::CallError::UnknownType(_))));
    assert!(matches!(a.cluster().list("counter", None, 0, T).await, Err(cadre::agent::CallError::InvalidKey(_))));
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Ticks each `ticker` handled: (agent id, reminder name, tick).
static TICKS: std::sync::LazyLock<tokio::sync::broadcast::Sender<(String, String, u64)>> =
    std::sync::LazyLock::new(|| tokio::sync::broadcast::channel(4096).0);

/// `ticker.set {"name", "in_ms" | "every_ms"}` sets a reminder; its ticks are recorded in the
/// state, in the order handled; `ticker.get` answers them.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Ticker {
    ticks: Vec<(String, u64)>,
}

impl cadre::agent::Agent for Ticker {
    const TYPE: &'static str = "ticker";

    async fn handle(
        &mut self,
        ctx: &mut cadre::agent::Ctx,
        signal: Signal,
    ) -> Result<cadre::agent::Reply, cadre::agent::AgentError> {
        use cadre::agent::Reminder;
        let data = match &signal.data {
            Some(cadre::signal::Data::Json(v)) => v.clone(),
            _ => serde_json::Value::Null,
        };
        match signal.ty.as_str() {
            "ticker.set" => {
                let when = match (data["in_ms"].as_u64(), data["every_ms"].as_u64()) {
                    (_, Some(every)) => Reminder::every(Duration::from_millis(every)),
                    (in_ms, None) => Reminder::after(Duration::from_millis(in_ms.unwrap_or(0))),
                };
                let name = data["name"].as_str().unwrap_or_default();
                ctx.remind(name, when, Signal::new("ticker.tick", serde_json::json!({})))?;
                Ok(serde_json::Value::Null)
            }
            "ticker.tick" => {
                let name = signal.extension("cadrereminder").unwrap_or_default().to_string();
                let tick = signal.extension("cadretick").and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
                self.ticks.push((name.clone(), tick));
                let _ = TICKS.send((ctx.key().id.clone(), name, tick));
                Ok(serde_json::Value::Null)
            }
            _ => Ok(serde_json::to_value(&self.ticks).unwrap()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_fire_on_the_new_owner_after_a_crash_each_tick_once() {
    logs();
    let mut ticks = TICKS.subscribe();
    let opts = || NodeOptions::default().agent::<Ticker>();
    let a = Node::start(config("a", vec![]), opts()).await.unwrap();
    let b = Node::start(config("b", vec![a.addr()]), opts()).await.unwrap();
    let c = Node::start(config("c", vec![a.addr()]), opts()).await.unwrap();
    let abc = ["a", "b", "c"];
    for n in [&a, &b, &c] {
        await_meta(n, "shards with their desired owners", |st| settled(st, &abc)).await;
    }
    // Tickers owned by c: each with a reminder every second and one due once after the crash.
    let owner = |id: &str| a.cluster().placement(&Key::new("ticker", id)).unwrap().owner.unwrap();
    let ids: Vec<String> = (0..).map(|i| format!("t{i}")).filter(|id| owner(id) == "c").take(4).collect();
    let set = |id: &str, data: serde_json::Value| {
        let (key, cluster) = (Key::new("ticker", id), a.cluster().clone());
        async move { cluster.call(&key, Signal::new("ticker.set", data), T).await.unwrap() }
    };
    for id in &ids {
        set(id, serde_json::json!({"name": "every", "every_ms": 1000})).await;
        set(id, serde_json::json!({"name": "once", "in_ms": 2500})).await;
    }
    // Await each one's first tick on c, then crash c.
    let mut first: std::collections::BTreeSet<String> = Default::default();
    while first.len() < ids.len() {
        let (id, name, _) = tokio::time::timeout(WAIT, ticks.recv()).await.expect("a first tick").unwrap();
        if name == "every" && ids.contains(&id) {
            first.insert(id);
        }
    }
    c.kill().await;
    let ab = ["a", "b"];
    await_meta(&a, "c's shards reassigned", |st| settled(st, &ab)).await;
    // Served again on a or b: each fires its one-shot reminder and goes on ticking.
    let mut pending: std::collections::BTreeSet<(String, &str)> =
        ids.iter().flat_map(|id| [(id.clone(), "once"), (id.clone(), "every")]).collect();
    while !pending.is_empty() {
        let (id, name, tick) = tokio::time::timeout(WAIT, ticks.recv()).await.expect("ticks after the crash").unwrap();
        if name == "once" || tick >= 5 {
            pending.retain(|(i, n)| !(*i == id && *n == name));
        }
    }
    // The state the new owner kept holds every tick once, in order: none skipped, none repeated.
    for id in &ids {
        let key = Key::new("ticker", id.as_str());
        let served = b.cluster().call(&key, Signal::new("ticker.get", serde_json::Value::Null), T).await.unwrap();
        assert_ne!(served.node, "c");
        let got: Vec<(String, u64)> = serde_json::from_value(served.reply).unwrap();
        let every: Vec<u64> = got.iter().filter(|(n, _)| n == "every").map(|(_, t)| *t).collect();
        assert!(every.len() >= 6 && every.iter().enumerate().all(|(i, t)| *t == i as u64), "{id}: {got:?}");
        assert_eq!(got.iter().filter(|(n, _)| n == "once").count(), 1, "{id}: {got:?}");
    }
    b.shutdown().await;
    a.shutdown().await;
}
