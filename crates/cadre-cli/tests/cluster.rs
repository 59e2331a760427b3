//! Real processes on loopback: three `cadre node`s converge, a SIGKILLed one is marked down,
//! a node with the wrong secret is refused and never listed, SIGTERM leaves gracefully with
//! exit code 0, and a missing secret is a usage error (exit code 2).
//!
//! Conditions are awaited by polling the nodes' HTTP API with a deadline.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use cadre::api::client;
use cadre::api::MembersJson;
use cadre::MemberState;
use support::exe;
use support::proc::{self, wait_ready, NodeProc, NodeSpec};

const SECRET: &str = "cluster-test-secret-0123";
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

fn state_of(m: &MembersJson, name: &str) -> Option<MemberState> {
    m.members.iter().find(|x| x.name == name).map(|x| x.state)
}

/// Polls `http` until `cond` holds for its member list.
async fn await_members(http: SocketAddr, what: &str, cond: impl Fn(&MembersJson) -> bool) -> MembersJson {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(m) = client::members(http, Duration::from_secs(2)).await {
            if cond(&m) {
                return m;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "not reached within {WAIT:?}: {what}");
        tokio::time::sleep(POLL).await;
    }
}

async fn metric(http: SocketAddr, needle: &str) -> u64 {
    let (_, body) = client::get(http, "/metrics", Duration::from_secs(2)).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .filter(|l| l.starts_with(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_converge_detect_a_kill_and_refuse_a_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str, seeds: &[SocketAddr], secret: &str| {
        NodeProc::spawn(NodeSpec { exe: exe(), name, seeds, dir: dir.path(), secret, extra: &[] }).unwrap()
    };
    let n1 = spawn("n1", &[], SECRET);
    let n2 = spawn("n2", &[n1.addr], SECRET);
    let mut n3 = spawn("n3", &[n1.addr, n2.addr], SECRET);
    for n in [&n1, &n2, &n3] {
        wait_ready(n.http, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", n.log_tail()));
    }
    let all = ["n1", "n2", "n3"];
    for n in [&n1, &n2, &n3] {
        let m =
            await_members(n.http, "3 alive", |m| all.iter().all(|x| state_of(m, x) == Some(MemberState::Alive))).await;
        assert_eq!(m.self_name, n.name);
        let me = m.members.iter().find(|x| x.name == n.name).unwrap();
        assert_eq!((me.addr, me.http), (n.addr, Some(n.http)));
        // 1 on a first start; a false suspicion on a loaded machine may have renewed it since.
        assert!(me.incarnation >= 1);
    }

    // SIGKILL n3: the others mark it down.
    let before = client::members(n1.http, WAIT).await.unwrap();
    let n3_incarnation = before.members.iter().find(|x| x.name == "n3").unwrap().incarnation;
    n3.signal(libc::SIGKILL).unwrap();
    n3.wait(WAIT).await.unwrap();
    for n in [&n1, &n2] {
        await_members(n.http, "n3 down", |m| state_of(m, "n3") == Some(MemberState::Down)).await;
    }

    // A node with the wrong secret is refused and never listed.
    let intruder = spawn("intruder", &[n1.addr, n2.addr], "wrong-secret-wrong-secret");
    let n1_http = n1.http;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(n1_http, "cadre_net_handshake_refused_total{side=\"acceptor\",reason=\"wrong_secret\"}").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "wrong secret not counted");
        tokio::time::sleep(POLL).await;
    }
    for n in [&n1, &n2] {
        let m = client::members(n.http, WAIT).await.unwrap();
        assert_eq!(state_of(&m, "intruder"), None, "intruder listed by {}", n.name);
    }
    let (status, _) = client::get(intruder.http, "/readyz", WAIT).await.unwrap();
    assert_eq!(status, 503, "the intruder never joins");

    // SIGTERM n2: it leaves gracefully, exits 0, and n1 lists it as left.
    let mut n2 = n2;
    n2.signal(libc::SIGTERM).unwrap();
    let status = n2.wait(WAIT).await.unwrap();
    assert!(status.success(), "n2 exited with {status}");
    await_members(n1.http, "n2 left", |m| state_of(m, "n2") == Some(MemberState::Left)).await;

    // n3 restarts with the same name and data dir: a new incarnation, alive again.
    let n3b = spawn("n3", &[n1.addr], SECRET);
    let m = await_members(n1.http, "n3 back", |m| state_of(m, "n3") == Some(MemberState::Alive)).await;
    let n3m = m.members.iter().find(|x| x.name == "n3").unwrap();
    assert!(n3m.incarnation > n3_incarnation, "restart with the same data dir is a new incarnation");
    assert_eq!(n3m.addr, n3b.addr);

    // `cadre status` prints the table.
    let out =
        tokio::process::Command::new(exe()).args(["status", "--http", &n1.http.to_string()]).output().await.unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("NAME") && table.contains("n2") && table.contains("left"), "{table}");
    assert!(table.contains("leader ") && table.contains("SHARDS") && table.contains("voter"), "{table}");
}

#[tokio::test]
async fn a_missing_or_empty_secret_is_a_usage_error() {
    for secret in [None, Some("")] {
        let mut cmd = tokio::process::Command::new(exe());
        cmd.args(["node", "--name", "x", "--listen", "127.0.0.1:0"]).env_remove("CADRE_SECRET_FILE");
        match secret {
            Some(s) => cmd.env("CADRE_SECRET", s),
            None => cmd.env_remove("CADRE_SECRET"),
        };
        let out = cmd.output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{secret:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("secret"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "\n").unwrap();
    let out = tokio::process::Command::new(exe())
        .args(["node", "--name", "x", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&file)
        .env_remove("CADRE_SECRET")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_environment_and_flags_combine() {
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (proc::free_port().unwrap(), proc::loopback(proc::free_port().unwrap()));
    let file = dir.path().join("node.toml");
    let toml = format!(
        "name = \"from-file\"\ncluster = \"filecluster\"\nlisten = \"127.0.0.1:{port}\"\n[membership]\nprobe_period_ms = 300\n"
    );
    std::fs::write(&file, toml).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "file-secret-0123456789\n").unwrap();
    // The HTTP address comes from the environment, the name from a flag overriding the file.
    let mut child = tokio::process::Command::new(exe())
        .args(["node", "--config"])
        .arg(&file)
        .args(["--name", "from-flag", "--secret-file"])
        .arg(&secret)
        .env("CADRE_HTTP", http.to_string())
        .env_remove("CADRE_SECRET")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(http, WAIT).await.unwrap();
    let m = client::members(http, WAIT).await.unwrap();
    assert_eq!(m.self_name, "from-flag");
    assert_eq!(m.members[0].addr, proc::loopback(port), "listen address from the file");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert!(status.success());

    std::fs::write(&file, "nmae = \"typo\"\n").unwrap();
    let out = tokio::process::Command::new(exe())
        .args(["node", "--config"])
        .arg(&file)
        .env("CADRE_SECRET", "x")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nmae"));
}

#[test]
fn routes_check_prints_targets_and_refuses_invalid_tables() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("routes.json");
    std::fs::write(
        &good,
        r#"{"routes":[{"path":"user.**","target":"audit","priority":10}],"signals":[{"type":"user.1.created"},{"type":"x"}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(exe()).args(["routes", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"type\":\"user.1.created\",\"targets\":[\"audit\"]}\n{\"type\":\"x\",\"error\":\"no_match\"}\n"
    );
    let bad = dir.path().join("routes.toml");
    std::fs::write(&bad, "[[routes]]\npath = \"us*r\"\ntarget = \"t\"\n").unwrap();
    let out = std::process::Command::new(exe()).args(["routes", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("route #0") && err.contains("us*r") && err.contains("wildcard"), "{err}");
}
