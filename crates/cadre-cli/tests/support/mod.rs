//! What the real-process tests share: the binary under test, calls through `cadre call`, and
//! waits on `GET /v1/cluster` with the predicates they settle on. (Each test binary uses a part.)
#![allow(dead_code)]

#[path = "../../src/proc.rs"]
pub mod proc;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cadre::api::ClusterJson;

/// Between two polls of `GET /v1/cluster`.
pub const POLL: Duration = Duration::from_millis(25);

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cadre"))
}

/// Runs `cadre call --http HTTP ARGS...`; the JSON it prints (fails the test if it fails).
pub async fn call(http: SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(exe())
        .args(["call", "--http", &http.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `cadre SUBCOMMAND --http HTTP ARGS...`; what it prints (fails the test if it fails).
pub async fn cli(subcommand: &str, http: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new(exe())
        .args([subcommand, "--http", &http.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "cadre {subcommand} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `GET /v1/cluster` on `http` until `cond` holds; fails the test after `wait`, showing
/// the last answer.
pub async fn await_cluster(
    http: SocketAddr,
    what: &str,
    wait: Duration,
    cond: impl Fn(&ClusterJson) -> bool,
) -> ClusterJson {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let last = match cadre::api::client::cluster(http, Duration::from_secs(2)).await {
            Ok(c) if cond(&c) => return c,
            Ok(c) => format!("{c:?}"),
            Err(e) => e.to_string(),
        };
        assert!(tokio::time::Instant::now() < deadline, "not reached within {wait:?}: {what}; last: {last}");
        tokio::time::sleep(POLL).await;
    }
}

/// The shard table exists and each member owns as many shards as rendezvous hashing gives it
/// (so no planned move is left to come between two calls of one key).
pub fn on_desired_owners(c: &ClusterJson) -> bool {
    let names: Vec<&str> = c.members.iter().map(|m| m.name.as_str()).collect();
    c.shard_count > 0
        && c.shards_moving == 0
        && c.members.iter().all(|m| {
            let desired = (0..c.shard_count)
                .filter(|s| cadre::placement::desired_owner(*s, names.iter().copied()) == Some(m.name.as_str()))
                .count();
            m.shards == desired
        })
}

/// `members` members, the shard table exists, every shard owned and none moving, and `copies`
/// in-sync replicas per shard (none behind).
pub fn replicated(c: &ClusterJson, members: usize, copies: usize) -> bool {
    c.members.len() == members
        && c.shard_count > 0
        && c.shards_moving == 0
        && c.shards_unassigned == 0
        && c.replicas_behind == 0
        && c.replicas_in_sync == copies * c.shard_count as usize
}

/// Every member answered and holds a valid lease (serves the shards it owns).
pub fn serving(c: &ClusterJson) -> bool {
    c.members.iter().all(|m| m.serving == Some(true))
}
