//! Real processes: `cadre call` reaches the built-in counter, and its value survives a restart of
//! the node on the same data dir (the embedded redb store).

mod support;

use std::path::Path;
use std::time::Duration;

use support::proc::{wait_ready, NodeProc, NodeSpec};
use support::{await_cluster, call, exe, on_desired_owners, replicated};

const SECRET: &str = "agents-test-secret-0123";
const WAIT: Duration = Duration::from_secs(30);

async fn node(dir: &Path) -> NodeProc {
    let n = NodeProc::spawn(NodeSpec { exe: exe(), name: "a1", seeds: &[], dir, secret: SECRET, extra: &[] }).unwrap();
    wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_keeps_its_value_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = node(dir.path()).await;
    assert_eq!(call(n.http, &["counter", "c1", "counter.add", "--data", "5"]).await["reply"], 5);
    let v = call(n.http, &["counter", "c1", "counter.add", "--data", "37"]).await;
    assert_eq!((v["reply"].as_i64(), v["node"].as_str()), (Some(42), Some("a1")));
    n.signal(libc::SIGTERM).unwrap();
    assert!(n.wait(WAIT).await.unwrap().success());

    let mut n = node(dir.path()).await;
    assert_eq!(call(n.http, &["counter", "c1", "counter.get"]).await["reply"], 42);
    let out = tokio::process::Command::new(exe())
        .args(["call", "--http", &n.http.to_string(), "nosuch", "x", "t"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    n.signal(libc::SIGTERM).unwrap();
    assert!(n.wait(WAIT).await.unwrap().success());
}

/// Three node processes with the embedded store: a counter called through every node is one agent
/// (same owner, one running sum), and a node leaving with SIGTERM hands its shards over first, so
/// no acknowledged add is lost although each node keeps its state on its own disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_every_node_reach_one_agent_and_a_planned_leave_keeps_every_add() {
    const KEYS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    // Rebalance quickly so the test does not wait on the conservative defaults.
    std::fs::write(&config, "[placement]\nrebalance_interval_ms = 200\nmax_moves_per_tick = 256\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let spawn = |name: &str, seeds: &[std::net::SocketAddr]| {
        NodeProc::spawn(NodeSpec { exe: exe(), name, seeds, dir: dir.path(), secret: SECRET, extra: &extra }).unwrap()
    };
    let n1 = spawn("p1", &[]);
    let n2 = spawn("p2", &[n1.addr]);
    let n3 = spawn("p3", &[n1.addr]);
    let nodes = [&n1, &n2, &n3];
    for n in nodes {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    // Settled: with replicas, shards move to a node only once it is caught up, so wait for every
    // replica to be in sync (each shard on all three) as well.
    await_cluster(n1.http, "shards with their desired owners, none moving, replicas in sync", WAIT, |c| {
        replicated(c, 3, 2) && on_desired_owners(c)
    })
    .await;

    // Every key, through every node: one owner answers, the sum runs on.
    let mut owner_of = Vec::new();
    for k in 0..KEYS {
        let id = format!("k{k}");
        let mut owners = Vec::new();
        for (round, n) in nodes.iter().enumerate() {
            let v = call(n.http, &["counter", &id, "counter.add", "--data", "1"]).await;
            assert_eq!(v["reply"], round as i64 + 1, "{id} via {}", n.name);
            owners.push(v["node"].as_str().unwrap().to_string());
        }
        assert!(owners.iter().all(|o| *o == owners[0]), "{id} served by one node from everywhere: {owners:?}");
        owner_of.push(owners[0].clone());
    }

    // `cadre agents` lists them, from any node, on their owners, in pages of 5 followed to the end.
    let out = tokio::process::Command::new(exe())
        .args(["agents", "counter", "--all", "--limit", "5", "--http", &n3.http.to_string()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut want: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    want.sort();
    assert_eq!(listed.iter().map(|a| a["id"].as_str().unwrap().to_string()).collect::<Vec<_>>(), want);
    for a in &listed {
        let k: usize = a["id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!((a["node"].as_str(), a["handled"].as_u64()), (Some(owner_of[k].as_str()), Some(3)), "{a}");
    }

    // The node owning the most of these keys leaves gracefully.
    let leaver = ["p1", "p2", "p3"].into_iter().max_by_key(|n| owner_of.iter().filter(|o| o == n).count()).unwrap();
    assert!(owner_of.iter().any(|o| o == leaver));
    let (mut leaving, stay): (Vec<NodeProc>, Vec<NodeProc>) = [n1, n2, n3].into_iter().partition(|n| n.name == leaver);
    let mut leaving = leaving.pop().unwrap();
    leaving.signal(libc::SIGTERM).unwrap();
    assert!(leaving.wait(WAIT).await.unwrap().success(), "{}", leaving.log_tail());
    let c = await_cluster(stay[0].http, "the leaver owns nothing", WAIT, |c| {
        c.members.iter().any(|m| m.name == leaver && m.shards == 0) && c.shards_moving == 0
    })
    .await;
    assert_eq!(c.shards_unassigned, 0);
    for k in 0..KEYS {
        let id = format!("k{k}");
        for n in &stay {
            let v = call(n.http, &["counter", &id, "counter.get"]).await;
            assert_eq!(v["reply"], 3, "{id} via {} after {leaver} left", n.name);
            assert_ne!(v["node"].as_str(), Some(leaver));
        }
    }
    for mut n in stay {
        n.signal(libc::SIGTERM).unwrap();
        assert!(n.wait(WAIT).await.unwrap().success());
    }
}
