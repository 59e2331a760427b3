//! Real processes: `cadre call` reaches the built-in counter, and its value survives a restart of
//! the node on the same data dir (the embedded redb store).

#[path = "../src/proc.rs"]
#[allow(dead_code)]
mod proc;

use std::path::Path;
use std::time::Duration;

use proc::{wait_ready, NodeProc, NodeSpec};

const SECRET: &str = "agents-test-secret-0123";
const WAIT: Duration = Duration::from_secs(30);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cadre"))
}

async fn call(http: std::net::SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(exe())
        .args(["call", "--http", &http.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

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
