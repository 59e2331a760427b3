//! Real processes with the embedded store (redb under each node's data dir, replicated between
//! nodes): a SIGKILLed owner's keys answer on another node with every acknowledged add, the killed
//! node comes back and is caught up again, and a whole cluster killed at once and restarted on its
//! data dirs keeps every acknowledged add, and fires the reminder that fell due while it was down,
//! once.
//!
//! Conditions are awaited by polling the nodes' HTTP API with a deadline.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use cadre::api::ClusterJson;
use support::proc::{self, wait_ready, NodeProc, NodeSpec};
use support::{await_cluster, call, cli, exe, on_desired_owners, replicated, serving};

const SECRET: &str = "replicas-test-secret-0123";
const WAIT: Duration = Duration::from_secs(60);
const KEYS: usize = 12;
const NAMES: [&str; 3] = ["r1", "r2", "r3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_loses_no_acknowledged_add_and_a_killed_cluster_neither() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    // Rebalance quickly so the test does not wait on the conservative defaults.
    std::fs::write(&config, "[placement]\nrebalance_interval_ms = 200\nmax_moves_per_tick = 256\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let spec = |name: &'static str, seeds: &'static [SocketAddr]| NodeSpec {
        exe: exe(),
        name,
        seeds,
        dir: dir.path(),
        secret: SECRET,
        extra: &extra,
    };
    let first = NodeProc::spawn(spec(NAMES[0], &[])).unwrap();
    let seeds: &'static [SocketAddr] = Box::leak(Box::new([first.addr]));
    let mut nodes = vec![first];
    for name in &NAMES[1..] {
        nodes.push(NodeProc::spawn(spec(name, seeds)).unwrap());
    }
    for n in &nodes {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    // Three members: each shard on all three (owner and two in-sync replicas).
    await_cluster(nodes[0].http, "every shard on three nodes, in sync, on its desired owner", WAIT, |c| {
        replicated(c, 3, 2) && on_desired_owners(c)
    })
    .await;

    let mut owner_of = Vec::new();
    for k in 0..KEYS {
        let id = format!("k{k}");
        for (round, n) in nodes.iter().enumerate() {
            let v = call(n.http, &["counter", &id, "counter.add", "--data", "1"]).await;
            assert_eq!(v["reply"], round as i64 + 1, "{id} via {}", n.name);
            if round == 0 {
                owner_of.push(v["node"].as_str().unwrap().to_string());
            }
        }
    }

    // SIGKILL the metadata leader (also an owner of shards): its keys answer elsewhere with every
    // add, once a new leader has promoted replicas.
    let leader = cadre::api::client::cluster(nodes[0].http, Duration::from_secs(2)).await.unwrap().leader.unwrap();
    let victim = NAMES.into_iter().find(|n| *n == leader).unwrap();
    assert!(owner_of.iter().any(|o| o == victim), "the leader owns some of the keys");
    let at = nodes.iter().position(|n| n.name == victim).unwrap();
    let (addr, http) = (nodes[at].addr, nodes[at].http);
    nodes[at].signal(libc::SIGKILL).unwrap();
    nodes[at].wait(WAIT).await.unwrap();
    let stay: Vec<usize> = (0..3).filter(|&i| i != at).collect();
    let promoted = await_cluster(nodes[stay[0]].http, "the killed node's shards promoted elsewhere", WAIT, move |c| {
        c.members.iter().all(|m| m.name != victim || m.shards == 0) && c.shards_moving == 0 && c.shards_unassigned == 0
    });
    if tokio::spawn(promoted).await.is_err() {
        let logs: Vec<String> = stay
            .iter()
            .map(|&i| format!("{}:\n{}", nodes[i].name, std::fs::read_to_string(&nodes[i].log).unwrap_or_default()))
            .collect();
        panic!("{victim}'s shards were not promoted; logs:\n{}", logs.join("\n"));
    }
    for (k, owner) in owner_of.iter().enumerate() {
        let id = format!("k{k}");
        let via = &nodes[stay[k % 2]];
        let v = call(via.http, &["counter", &id, "counter.add", "--data", "1"]).await;
        assert_eq!(v["reply"], 4, "{id} (owned by {owner}) via {} after {victim} was killed", via.name);
        assert_ne!(v["node"].as_str(), Some(victim));
    }

    // It comes back on its data dir and is caught up again.
    let seeds_back: &'static [SocketAddr] = Box::leak(Box::new([nodes[stay[0]].addr]));
    nodes[at] = NodeProc::spawn_at(spec(victim, seeds_back), addr, http).unwrap();
    wait_ready(http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", nodes[at].log_tail()));
    await_cluster(nodes[0].http, "the restarted node caught up", WAIT, |c| replicated(c, 3, 2)).await;

    // The whole cluster is killed at once and restarted on its data dirs, on new ports (as
    // machines given new addresses): the members find each other by name through gossip, and
    // every add is there.
    // A reminder (set with the CLI) falls due while the whole cluster is down.
    let args = ["counter", "alarm", "wake", "--in-ms", "2000", "--signal-type", "counter.add", "--data", "10"];
    let set: serde_json::Value = serde_json::from_str(&cli("remind", nodes[1].http, &args).await).unwrap();
    assert_eq!(set["reminder"]["name"], "wake", "{set}");
    let listed: serde_json::Value =
        serde_json::from_str(&cli("remind", nodes[2].http, &["counter", "alarm"]).await).unwrap();
    assert_eq!(listed["reminders"].as_array().map(Vec::len), Some(1), "{listed}");
    let old_places: Vec<(SocketAddr, SocketAddr)> = nodes.iter().map(|n| (n.addr, n.http)).collect();
    for n in &nodes {
        n.signal(libc::SIGKILL).unwrap();
    }
    for n in &mut nodes {
        n.wait(WAIT).await.unwrap();
    }
    let places: Vec<(SocketAddr, SocketAddr)> = (0..NAMES.len())
        .map(|_| (proc::loopback(proc::free_port().unwrap()), proc::loopback(proc::free_port().unwrap())))
        .collect();
    assert!(places.iter().zip(&old_places).all(|(new, old)| new.0 != old.0), "new transport ports");
    let founder_seeds: &'static [SocketAddr] = Box::leak(Box::new([places[1].0]));
    let others_seeds: &'static [SocketAddr] = Box::leak(Box::new([places[0].0]));
    nodes.clear();
    for (i, name) in NAMES.into_iter().enumerate() {
        let seeds = if i == 0 { founder_seeds } else { others_seeds };
        nodes.push(NodeProc::spawn_at(spec(name, seeds), places[i].0, places[i].1).unwrap());
    }
    for n in &nodes {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    // (Every member serving: a restarted node's table is its copy from before the kill, and the
    // leader it reports is the one it last voted for, until a leader grants it a lease.)
    let elected = |c: &ClusterJson| c.leader.is_some() && replicated(c, 3, 2) && serving(c);
    await_cluster(nodes[0].http, "the restarted cluster has a leader and serves every shard", WAIT, elected).await;
    for k in 0..KEYS {
        let id = format!("k{k}");
        let v = call(nodes[k % 3].http, &["counter", &id, "counter.get"]).await;
        assert_eq!(v["reply"], 4, "{id} after the whole cluster was killed and restarted");
    }
    // The reminder fired once after the restart (a cross-process event: polled with a deadline).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = call(nodes[0].http, &["counter", "alarm", "counter.get"]).await;
        if v["reply"] == 10 {
            break;
        }
        assert_eq!(v["reply"], 0, "the reminder fired more than once");
        assert!(tokio::time::Instant::now() < deadline, "the reminder did not fire after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed: serde_json::Value =
        serde_json::from_str(&cli("remind", nodes[1].http, &["counter", "alarm"]).await).unwrap();
    assert_eq!(listed["reminders"], serde_json::json!([]), "fired, it is gone");
    for mut n in nodes {
        n.signal(libc::SIGTERM).unwrap();
        assert!(n.wait(WAIT).await.unwrap().success(), "{}", n.log_tail());
    }
}
