//! Every storage backend passes the conformance suite; the embedded one keeps its data and
//! fences across a reopen.

use std::sync::Arc;

use bytes::Bytes;
use cadre::storage::embedded::RedbStorage;
use cadre::storage::memory::MemoryStorage;
use cadre::storage::{conformance, Fence, Key, Storage, StorageError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_conforms() {
    conformance::run_on_empty(Arc::new(MemoryStorage::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_on_empty(Arc::new(RedbStorage::open(&dir.path().join("state.redb")).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_keeps_state_entries_and_fences_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let k = Key::new("counter", "c1");
    let r = {
        let s = RedbStorage::open(&path).unwrap();
        let r = s.put(&k, Bytes::from_static(b"42"), 0, Fence { shard: 7, epoch: 4 }).await.unwrap();
        s.append(&k, vec![Bytes::from_static(b"e")], 0, Fence { shard: 7, epoch: 4 }).await.unwrap();
        r
    };
    let s = RedbStorage::open(&path).unwrap();
    let got = s.get(&k).await.unwrap().unwrap();
    assert_eq!((got.value.as_ref(), got.revision), (&b"42"[..], r));
    assert_eq!(s.entries(&k, 0, 10).await.unwrap(), [Bytes::from_static(b"e")]);
    assert_eq!(s.epoch(7).await.unwrap(), 4);
    assert_eq!(s.scan_keys(None, 10).await.unwrap(), std::slice::from_ref(&k), "scans see reopened keys");
    let stale = s.put(&k, Bytes::from_static(b"x"), r, Fence { shard: 7, epoch: 3 }).await;
    assert!(matches!(stale, Err(StorageError::Fenced { current: 4, .. })), "{stale:?}");
    let r2 = s.put(&k, Bytes::from_static(b"43"), r, Fence { shard: 7, epoch: 4 }).await.unwrap();
    assert!(r2 > r, "the revision counter survives the reopen");
}

#[test]
fn a_bad_path_is_a_clear_error() {
    let err = RedbStorage::open(std::path::Path::new("/nonexistent-dir/x/state.redb")).err().unwrap();
    assert!(matches!(err, StorageError::Backend(ref m) if m.contains("/nonexistent-dir")), "{err}");
}
