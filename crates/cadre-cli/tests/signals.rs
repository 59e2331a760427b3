//! Real processes: a node started with `--routes` delivers what `cadre send` posts to the
//! webhook the routes file names; a routes file a node cannot use is a usage error (exit code 2).

mod support;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use support::exe;
use support::proc::{wait_ready, NodeProc, NodeSpec};
use tokio::sync::mpsc;

const SECRET: &str = "signals-test-secret-0123";
const WAIT: Duration = Duration::from_secs(30);

async fn receiver() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(tx): State<mpsc::UnboundedSender<Bytes>>, body: Bytes| async move {
                tx.send(body).unwrap();
                "ok"
            }),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_the_webhook_of_a_routes_file() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, mut bodies) = receiver().await;
    let routes = dir.path().join("routes.toml");
    let table = format!(
        "[[routes]]\npath = \"order.**\"\ntarget = [{{ webhook = {{ url = \"http://{hook}/hook\" }} }}, {{ log = {{}} }}]\n"
    );
    std::fs::write(&routes, table).unwrap();
    let routes_arg = routes.to_string_lossy().to_string();
    let mut node = NodeProc::spawn(NodeSpec {
        exe: exe(),
        name: "s1",
        seeds: &[],
        dir: dir.path(),
        secret: SECRET,
        extra: &["--routes", &routes_arg],
    })
    .unwrap();
    wait_ready(node.http, WAIT).await.unwrap_or_else(|e| panic!("{e}: {}", node.log_tail()));

    let out = tokio::process::Command::new(exe())
        .args(["send", "--http", &node.http.to_string(), "--type", "order.placed", "--source", "/shop"])
        .args(["--subject", "order-1", "--data", r#"{"total":42}"#, "--id", "order-1-placed"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"accepted":["order-1-placed"],"delivery":"eventual"}"#);

    let body = tokio::time::timeout(WAIT, bodies.recv()).await.unwrap().unwrap();
    let s = cadre::signal::codec::decode_structured(&body).unwrap();
    assert_eq!((s.id.as_str(), s.ty.as_str(), s.source.as_str()), ("order-1-placed", "order.placed", "/shop"));
    assert_eq!(s.subject.as_deref(), Some("order-1"));
    assert_eq!(s.data, Some(cadre::signal::Data::Json(serde_json::json!({"total": 42}))));

    // Delivery levels and broadcasts are flags.
    for (flags, level) in [(&["--delivery", "strong"][..], "strong"), (&["--broadcast"][..], "weak")] {
        let out = tokio::process::Command::new(exe())
            .args(["send", "--http", &node.http.to_string(), "--type", "order.paid", "--id", level])
            .args(flags)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["delivery"], level, "{flags:?}");
        let body = tokio::time::timeout(WAIT, bodies.recv()).await.unwrap().unwrap();
        assert_eq!(cadre::signal::codec::decode_structured(&body).unwrap().id, level);
    }

    // Bad input from `send` is refused before anything is posted.
    let out = tokio::process::Command::new(exe())
        .args(["send", "--http", &node.http.to_string(), "--type", "order.placed", "--data", "{not json"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data"));

    node.signal(libc::SIGTERM).unwrap();
    assert!(node.wait(WAIT).await.unwrap().success());
}

#[tokio::test]
async fn a_routes_file_without_dispatch_targets_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"routes":[{"path":"user.**","target":"audit"}]}"#).unwrap();
    let out = tokio::process::Command::new(exe())
        .args(["node", "--name", "x", "--listen", "127.0.0.1:0", "--routes"])
        .arg(&routes)
        .env("CADRE_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("route #0") && err.contains("audit"), "{err}");
}
