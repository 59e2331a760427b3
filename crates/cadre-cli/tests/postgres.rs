//! Real processes on one Postgres database (`--storage URL`): a SIGKILLed owner's keys answer on
//! another node with every acknowledged add, since with shared storage no state lives on a node;
//! and a database that is wrong or unreachable stops `cadre node` at once with a clear message.
//!
//! The server comes from `cadre/tests/support/postgres.rs` (`CADRE_TEST_POSTGRES_URL`, or one this
//! test process starts). Conditions are awaited by polling the nodes' HTTP API with a deadline.

mod support;

#[path = "../../cadre/tests/support/postgres.rs"]
#[allow(dead_code)]
mod pg;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::proc::{self, wait_ready, NodeProc, NodeSpec};
use support::{await_cluster, call, exe, on_desired_owners};

const SECRET: &str = "postgres-test-secret-0123";
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_keys_answer_elsewhere_with_every_acknowledged_add() {
    const KEYS: usize = 12;
    let db = pg::database("e2ekill").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    // Rebalance quickly so the test does not wait on the conservative defaults.
    std::fs::write(&config, "[placement]\nrebalance_interval_ms = 200\nmax_moves_per_tick = 256\n").unwrap();
    let extra = ["--config", config.to_str().unwrap(), "--storage", &db.url];
    let spawn = |name: &str, seeds: &[SocketAddr]| {
        NodeProc::spawn(NodeSpec { exe: exe(), name, seeds, dir: dir.path(), secret: SECRET, extra: &extra }).unwrap()
    };
    let n1 = spawn("q1", &[]);
    let n2 = spawn("q2", &[n1.addr]);
    let n3 = spawn("q3", &[n1.addr]);
    for n in [&n1, &n2, &n3] {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", n.log_tail()));
    }
    // Settled: every member holds its rendezvous share (a planned move between two calls of one
    // key would make them name different owners), none moving.
    await_cluster(n1.http, "shards with their desired owners, none moving", WAIT, |c| {
        c.members.len() == 3 && c.shards_moving == 0 && on_desired_owners(c)
    })
    .await;

    let mut owner_of = Vec::new();
    for k in 0..KEYS {
        let id = format!("k{k}");
        let mut owners = Vec::new();
        for (round, n) in [&n1, &n2, &n3].iter().enumerate() {
            let v = call(n.http, &["counter", &id, "counter.add", "--data", "1"]).await;
            assert_eq!(v["reply"], round as i64 + 1, "{id} via {}", n.name);
            owners.push(v["node"].as_str().unwrap().to_string());
        }
        assert!(owners.iter().all(|o| *o == owners[0]), "{id} served by one node from everywhere: {owners:?}");
        owner_of.push(owners[0].clone());
    }

    let victim = ["q1", "q2", "q3"].into_iter().max_by_key(|n| owner_of.iter().filter(|o| o == n).count()).unwrap();
    let (mut killed, stay): (Vec<NodeProc>, Vec<NodeProc>) = [n1, n2, n3].into_iter().partition(|n| n.name == victim);
    let mut killed = killed.pop().unwrap();
    killed.signal(libc::SIGKILL).unwrap();
    killed.wait(WAIT).await.unwrap();
    let c = await_cluster(stay[0].http, "the killed node's shards are served elsewhere", WAIT, |c| {
        c.members.iter().all(|m| m.name != victim || m.shards == 0) && c.shards_moving == 0 && c.shards_unassigned == 0
    })
    .await;
    assert!(c.members.iter().any(|m| m.shards > 0 && m.name != victim));

    for (k, owner) in owner_of.iter().enumerate() {
        let id = format!("k{k}");
        for n in &stay {
            let v = call(n.http, &["counter", &id, "counter.get"]).await;
            assert_eq!(v["reply"], 3, "{id} (owned by {owner}) via {} after {victim} was killed", n.name);
            assert_ne!(v["node"].as_str(), Some(victim));
        }
        // The new owner writes at the new epoch: not fenced, nothing lost.
        let v = call(stay[k % 2].http, &["counter", &id, "counter.add", "--data", "1"]).await;
        assert_eq!(v["reply"], 4, "{id}");
    }
    for mut n in stay {
        n.signal(libc::SIGTERM).unwrap();
        assert!(n.wait(WAIT).await.unwrap().success(), "{}", n.log_tail());
    }
}

/// Runs `cadre node` with `args` and environment `env` until it exits (a hang fails the test).
async fn node_exit(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let port = |_| proc::free_port().unwrap().to_string();
    let (listen, http) = (format!("127.0.0.1:{}", port(())), format!("127.0.0.1:{}", port(())));
    let mut cmd = tokio::process::Command::new(exe());
    cmd.args(["node", "--name", "x", "--listen", &listen, "--http", &http, "--data-dir"])
        .arg(dir.join("x"))
        .args(args)
        .env("CADRE_SECRET", SECRET)
        .env_remove("CADRE_SECRET_FILE")
        .env_remove("CADRE_STORAGE")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output()).await.expect("cadre node exits instead of hanging").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_unreachable_database_stops_the_node_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // Not a Postgres URL (from the environment): a usage error, like any invalid config.
    let (code, err) = node_exit(dir.path(), &[], &[("CADRE_STORAGE", "mysql://cadre@127.0.0.1/cadre")]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("storage.url") && err.contains("postgres://"), "{err}");

    // Nothing listens there (a flag, with a password that must not be printed): a start error.
    let port = proc::free_port().unwrap();
    let url = format!("postgres://cadre:hunter2@127.0.0.1:{port}/cadre");
    let (code, err) = node_exit(dir.path(), &["--storage", &url], &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("postgres://cadre@127.0.0.1:{port}/cadre")) && err.contains("cannot connect"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    // A server that never answers (from the config file): the connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let config = dir.path().join("db.toml");
    std::fs::write(&config, format!("[storage]\nurl = \"postgres://cadre@{addr}/cadre\"\nconnect_timeout_ms = 300\n"))
        .unwrap();
    let (code, err) = node_exit(dir.path(), &["--config", config.to_str().unwrap()], &[]).await;
    held.abort();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no answer within 300 ms"), "{err}");

    // A database that does not exist on a live server: the server's own words.
    let db = pg::database("e2emissing").await;
    let missing = pg::with_database(&db.url, "no_such_database_here");
    let (code, err) = node_exit(dir.path(), &["--storage", &missing], &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no_such_database_here") && err.contains("does not exist"), "{err}");
}
