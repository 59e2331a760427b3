//! The Postgres backend: the conformance suite, several stores (nodes) on one database at once
//! (fencing and compare-and-set hold across them), migrations, and start-up errors.
//!
//! The server comes from `support/postgres.rs`: `CADRE_TEST_POSTGRES_URL`, or a throwaway server
//! this process starts. Each test has a database of its own.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod pg;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cadre::config::{Config, Secret, StorageConfig};
use cadre::node::{Node, NodeError, NodeOptions};
use cadre::storage::postgres::{OpenError, PostgresStorage, SCHEMA_VERSION};
use cadre::storage::{conformance, Fence, Key, Storage, StorageError, SCAN_READ_MAX};
use sqlx::{Connection, PgConnection};

async fn open(url: &str) -> PostgresStorage {
    PostgresStorage::open(url, &StorageConfig::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let db = pg::database("conforms").await;
    let s = open(&db.url).await;
    assert!(s.shared(), "every node sees the database");
    conformance::run_on_empty(Arc::new(s)).await;
}

/// Two nodes' stores run the suite at once on one database, on their own keys and shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_each_conform() {
    let db = pg::database("conforms2").await;
    let (a, b) = (open(&db.url).await, open(&db.url).await);
    tokio::join!(conformance::run(Arc::new(a), "node-a", 0), conformance::run(Arc::new(b), "node-b", 100));
}

/// What one racing write did.
#[derive(Debug)]
struct Outcome {
    epoch: u64,
    result: Result<u64, StorageError>,
}

/// Nodes at different epochs write one shard at once, each write to its own key: no write at an
/// epoch commits after a write at a higher one. A shard's writes hold its lock from the fence
/// check to the commit and draw their revision under it, so revision order is commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_nodes_never_commit_a_stale_epoch_after_a_newer_one() {
    const ROUNDS: u32 = 20;
    const WRITES: usize = 24;
    let db = pg::database("fenced").await;
    let stores: Vec<Arc<dyn Storage>> = vec![Arc::new(open(&db.url).await), Arc::new(open(&db.url).await)];
    for round in 0..ROUNDS {
        // A fresh shard each round: the first writes also race to create its epoch row.
        let shard = 1000 + round;
        let tasks: Vec<_> = (0..WRITES)
            .map(|i| {
                let s = stores[i % 2].clone();
                let epoch = 1 + (i as u64 * 7 + u64::from(round)) % 4;
                let key = Key::new("race", format!("r{round}-w{i}"));
                tokio::spawn(async move {
                    let result = s.put(&key, Bytes::from_static(b"v"), 0, Fence { shard, epoch }).await;
                    Outcome { epoch, result }
                })
            })
            .collect();
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        let mut committed: Vec<(u64, u64)> = Vec::new();
        for o in &done {
            match &o.result {
                Ok(revision) => committed.push((*revision, o.epoch)),
                Err(StorageError::Fenced { epoch, current, .. }) => {
                    assert!(current > epoch, "fenced by a higher epoch: {o:?}")
                }
                Err(e) => panic!("round {round}: only fencing may refuse these writes: {e}"),
            }
        }
        committed.sort();
        let epochs: Vec<u64> = committed.iter().map(|c| c.1).collect();
        assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "round {round}: epochs in commit order {epochs:?}");
        let highest = done.iter().map(|o| o.epoch).max().unwrap();
        assert_eq!(epochs.last(), Some(&highest), "the highest epoch's writes always get through");
        assert_eq!(stores[0].epoch(shard).await.unwrap(), highest);
        assert_eq!(stores[1].epoch(shard).await.unwrap(), highest, "both nodes see one fence");
        let late = stores[0].put(&Key::new("race", "late"), Bytes::new(), 0, Fence { shard, epoch: highest - 1 }).await;
        assert!(matches!(late, Err(StorageError::Fenced { .. })), "{late:?}");
    }
}

/// Two nodes write one key holding the same revision: exactly one wins. At the same epoch the
/// loser gets `Conflict`. With b at a higher epoch: a loses `Fenced` if b wrote first; b loses
/// `Conflict` if a wrote first, and its refused write leaves the fence where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_one_key_at_one_revision_one_wins() {
    const ROUNDS: u32 = 30;
    let db = pg::database("onekey").await;
    let (a, b) = (open(&db.url).await, open(&db.url).await);
    for round in 0..ROUNDS {
        let shard = round;
        let key = Key::new("contended", format!("k{round}"));
        let base = a.put(&key, Bytes::from_static(b"base"), 0, Fence { shard, epoch: 1 }).await.unwrap();
        // Even rounds: both at epoch 1; odd rounds: b at epoch 2.
        let b_epoch = 1 + u64::from(round % 2);
        let (ra, rb) = tokio::join!(
            a.put(&key, Bytes::from_static(b"a"), base, Fence { shard, epoch: 1 }),
            b.put(&key, Bytes::from_static(b"b"), base, Fence { shard, epoch: b_epoch }),
        );
        let stored = a.get(&key).await.unwrap().unwrap();
        match (&ra, &rb) {
            (Ok(r), Err(e)) => {
                assert!(matches!(e, StorageError::Conflict { .. }), "round {round}: b's epoch is never below a's: {e}");
                assert_eq!((stored.value.as_ref(), stored.revision), (&b"a"[..], *r));
                assert_eq!(a.epoch(shard).await.unwrap(), 1, "b's refused write left the fence alone");
            }
            (Err(e), Ok(r)) => {
                // b committed first, so a, holding the shard's lock after it, saw its epoch or write.
                match (e, b_epoch) {
                    (StorageError::Conflict { actual, .. }, 1) => assert_eq!(actual, r, "a saw b's write"),
                    (StorageError::Fenced { current: 2, epoch: 1, .. }, 2) => {}
                    (other, _) => panic!("round {round}, b at epoch {b_epoch}: {other}"),
                }
                assert_eq!((stored.value.as_ref(), stored.revision), (&b"b"[..], *r));
                assert_eq!(b.epoch(shard).await.unwrap(), b_epoch);
            }
            other => panic!("round {round}: exactly one wins: {other:?}"),
        }
    }
}

/// Appends from two nodes at one expected length: one wins, the log has its entries only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_appending_at_one_length_one_wins() {
    let db = pg::database("append").await;
    let (a, b) = (open(&db.url).await, open(&db.url).await);
    let f = Fence { shard: 3, epoch: 1 };
    for round in 0..20u64 {
        let key = Key::new("log", format!("l{round}"));
        let len = a.append(&key, vec![Bytes::from_static(b"0")], 0, f).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.append(&key, vec![Bytes::from_static(b"a1"), Bytes::from_static(b"a2")], len, f),
            b.append(&key, vec![Bytes::from_static(b"b1")], len, f),
        );
        let expected: Vec<Bytes> = match (ra, rb) {
            (Ok(3), Err(StorageError::Conflict { expected: 1, actual: 3 })) => {
                vec!["0".into(), "a1".into(), "a2".into()]
            }
            (Err(StorageError::Conflict { expected: 1, actual: 2 }), Ok(2)) => vec!["0".into(), "b1".into()],
            other => panic!("round {round}: exactly one wins: {other:?}"),
        };
        assert_eq!(b.entries(&key, 0, 10).await.unwrap(), expected);
    }
}

/// Nodes starting together on a fresh database apply the schema once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = pg::database("migrate").await;
    let cfg = StorageConfig::default();
    let opened = futures::future::join_all((0..4).map(|_| PostgresStorage::open(&db.url, &cfg))).await;
    for o in opened {
        o.unwrap();
    }
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM cadre_schema_version ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());

    // Data and the revision counter outlive the stores that wrote them.
    let k = Key::new("kept", "1");
    let f = Fence { shard: 1, epoch: 1 };
    let r = open(&db.url).await.put(&k, Bytes::from_static(b"x"), 0, f).await.unwrap();
    let again = open(&db.url).await;
    assert_eq!(again.get(&k).await.unwrap().unwrap().revision, r);
    assert!(again.put(&k, Bytes::from_static(b"y"), r, f).await.unwrap() > r);

    sqlx::query("INSERT INTO cadre_schema_version (version) VALUES ($1)")
        .bind(SCHEMA_VERSION + 1)
        .execute(&mut conn)
        .await
        .unwrap();
    match PostgresStorage::open(&db.url, &StorageConfig::default()).await {
        Err(e @ OpenError::SchemaTooNew { .. }) => assert!(e.to_string().contains("newer"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a newer schema is refused"),
    }
}

/// The scan cap, on keys loaded in bulk (one transaction per write is too slow for 10k keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_are_capped_and_corrupt_keys_are_errors() {
    let db = pg::database("scans").await;
    let s = open(&db.url).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let n = SCAN_READ_MAX as i64 + 5;
    // Key i is "t" NUL "{i:06}"; even keys have a state, odd ones entries, every third both.
    let key = "convert_to('t', 'UTF8') || '\\x00'::bytea || convert_to(lpad(i::text, 6, '0'), 'UTF8')";
    for sql in [
        format!("INSERT INTO cadre_states SELECT {key}, 1, 'v' FROM generate_series(0, $1 - 1) i WHERE i % 2 = 0"),
        format!(
            "INSERT INTO cadre_entry_lens SELECT {key}, 1 FROM generate_series(0, $1 - 1) i WHERE i % 2 = 1 OR i % 3 = 0"
        ),
        format!(
            "INSERT INTO cadre_entries SELECT {key}, 0, 'e' FROM generate_series(0, $1 - 1) i WHERE i % 2 = 1 OR i % 3 = 0"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(n).execute(&mut conn).await.unwrap();
    }
    let keys: Vec<Key> = (0..n).map(|i| Key::new("t", format!("{i:06}"))).collect();
    let first = s.scan_keys(None, usize::MAX).await.unwrap();
    assert_eq!(first, keys[..SCAN_READ_MAX]);
    let rest = s.scan_keys(first.last(), SCAN_READ_MAX + 1).await.unwrap();
    assert_eq!(rest, keys[SCAN_READ_MAX..]);
    assert_eq!(s.entries(&keys[1], 0, 10).await.unwrap(), [Bytes::from_static(b"e")]);

    sqlx::query("INSERT INTO cadre_states VALUES ('no separator', 1, 'v')").execute(&mut conn).await.unwrap();
    for after in [None, Some(Key::new("a", ""))] {
        match s.scan_keys(after.as_ref(), 10).await {
            Err(StorageError::Backend(m)) => assert!(m.contains("corrupt stored key"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_databases_fail_the_open_with_a_clear_error() {
    let cfg = StorageConfig { connect_timeout_ms: 500, ..StorageConfig::default() };
    let refused = format!("postgres://cadre:secret-pw@127.0.0.1:{}/cadre", closed_port());
    match PostgresStorage::open(&refused, &cfg).await {
        Err(e @ OpenError::Connect { .. }) => {
            let m = e.to_string();
            assert!(m.contains("127.0.0.1") && !m.contains("secret-pw"), "{m}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("nothing listens there"),
    }
    // A server that accepts and never answers: the connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("postgres://cadre@{}/cadre", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    assert!(matches!(PostgresStorage::open(&url, &cfg).await, Err(OpenError::Timeout { timeout_ms: 500, .. })));
    held.abort();
    assert!(matches!(PostgresStorage::open("mysql://x@h/db", &cfg).await, Err(OpenError::InvalidUrl(_))));

    let db = pg::database("missing").await;
    let missing = pg::with_database(&db.url, "no_such_database_here");
    match PostgresStorage::open(&missing, &cfg).await {
        Err(e @ OpenError::Connect { .. }) => assert!(e.to_string().contains("no_such_database_here"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the database does not exist"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_unreachable_database_does_not_start() {
    let mut cfg = Config {
        name: "a".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        secret: Secret::new("node-test-secret-0123"),
        ..Config::default()
    };
    cfg.storage.url = Some(format!("postgres://cadre@127.0.0.1:{}/cadre", closed_port()));
    cfg.storage.connect_timeout_ms = 500;
    let err = tokio::time::timeout(Duration::from_secs(30), Node::start(cfg, NodeOptions::default()))
        .await
        .expect("the start fails instead of hanging")
        .err()
        .unwrap();
    assert!(matches!(err, NodeError::StorageOpen(OpenError::Connect { .. })), "{err}");
}

/// A node on the database keeps a counter's value across a restart, and nothing in its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_agent_state_in_the_database() {
    let db = pg::database("node").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = Config {
            name: "a".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            secret: Secret::new("node-test-secret-0123"),
            data_dir: Some(dir.path().to_path_buf()),
            ..Config::default()
        };
        c.storage.url = Some(db.url.clone());
        c
    };
    let k = Key::new("counter", "c1");
    let call = |node: &Node, ty: &str, n: i64| {
        let (c, k, s) = (node.cluster().clone(), k.clone(), cadre::signal::Signal::new(ty, serde_json::json!(n)));
        async move { c.call(&k, s, Duration::from_secs(10)).await.unwrap().reply.as_i64() }
    };
    let node = Node::start(cfg(), NodeOptions::default()).await.unwrap();
    assert_eq!(call(&node, "counter.add", 5).await, Some(5));
    assert_eq!(call(&node, "counter.add", 37).await, Some(42));
    node.shutdown().await;
    assert!(!dir.path().join(cadre::node::STATE_FILE).exists(), "state is in the database, not the data dir");
    let stored = open(&db.url).await.get(&k).await.unwrap().expect("the counter's row");
    assert!(stored.revision > 0);

    let node = Node::start(cfg(), NodeOptions::default()).await.unwrap();
    assert_eq!(call(&node, "counter.get", 0).await, Some(42));
    node.shutdown().await;
}
