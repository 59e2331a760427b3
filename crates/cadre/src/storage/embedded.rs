//! The embedded default: a redb database file (under the node's data dir).
//!
//! Each write is one redb write transaction committed durably (fsync) before the call returns, so
//! an acknowledged write survives a crash of the process or the machine. redb allows one writer
//! at a time; writes queue on it. Calls run on tokio's blocking pool, never on a runtime thread.
//!
//! Tables: `states` (key → (revision, value)), `entries` ((key, seq) → entry), `entry_lens`
//! (key → number of entries, only for keys that have some), `epochs` (shard → highest epoch),
//! `meta` (`revision` → the store's revision counter). Keys are stored as [`Key::encode`] bytes,
//! which redb orders bytewise, so a key scan is a range over `states` and `entry_lens`.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{
    check_write, fence_check, scan_check, Fence, Key, Revision, Storage, StorageError, Versioned, ENTRIES_READ_MAX,
};

const STATES: TableDefinition<&[u8], (u64, &[u8])> = TableDefinition::new("states");
const ENTRIES: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("entries");
const ENTRY_LENS: TableDefinition<&[u8], u64> = TableDefinition::new("entry_lens");
const EPOCHS: TableDefinition<u32, u64> = TableDefinition::new("epochs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

/// A store in one redb file (see the module docs).
pub struct RedbStorage {
    db: Arc<Database>,
}

impl RedbStorage {
    /// Opens (or creates) the database file and its tables.
    pub fn open(path: &Path) -> Result<RedbStorage, StorageError> {
        let db = Database::create(path).map_err(|e| StorageError::Backend(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(backend)?;
        {
            tx.open_table(STATES).map_err(backend)?;
            tx.open_table(ENTRIES).map_err(backend)?;
            tx.open_table(ENTRY_LENS).map_err(backend)?;
            tx.open_table(EPOCHS).map_err(backend)?;
            tx.open_table(META).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(RedbStorage { db: Arc::new(db) })
    }

    /// Runs `f` on the blocking pool.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StorageError>> {
        let db = self.db.clone();
        async move { tokio::task::spawn_blocking(move || f(&db)).await.map_err(backend)? }.boxed()
    }

    /// Runs a write: `f` checks and writes inside one transaction, committed only if it succeeds.
    fn write<T: Send + 'static>(
        &self,
        fence: Fence,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StorageError>> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let epoch = {
                let epochs = tx.open_table(EPOCHS).map_err(backend)?;
                let current = epochs.get(fence.shard).map_err(backend)?.map_or(0, |g| g.value());
                fence_check(fence, current)?
            };
            // Dropping `tx` on an error aborts it.
            let out = f(&tx)?;
            tx.open_table(EPOCHS).map_err(backend)?.insert(fence.shard, epoch).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            let revision = meta.get(REVISION).map_err(backend)?.map_or(0, |g| g.value());
            meta.insert(REVISION, revision + 1).map_err(backend)?;
            drop(meta);
            tx.commit().map_err(backend)?;
            Ok(out)
        })
    }
}

fn next_revision(tx: &WriteTransaction) -> Result<Revision, StorageError> {
    let meta = tx.open_table(META).map_err(backend)?;
    let current = meta.get(REVISION).map_err(backend)?.map_or(0, |g| g.value());
    Ok(current + 1)
}

fn revision_of(tx: &WriteTransaction, key: &[u8]) -> Result<Revision, StorageError> {
    let states = tx.open_table(STATES).map_err(backend)?;
    let revision = states.get(key).map_err(backend)?.map_or(0, |g| g.value().0);
    Ok(revision)
}

fn entry_len(tx: &WriteTransaction, key: &[u8]) -> Result<u64, StorageError> {
    let lens = tx.open_table(ENTRY_LENS).map_err(backend)?;
    let len = lens.get(key).map_err(backend)?.map_or(0, |g| g.value());
    Ok(len)
}

impl Storage for RedbStorage {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>> {
        let k = key.encode();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let states = tx.open_table(STATES).map_err(backend)?;
            let found = states.get(k.as_slice()).map_err(backend)?;
            Ok(found.map(|g| {
                let (revision, value) = g.value();
                Versioned { value: Bytes::copy_from_slice(value), revision }
            }))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        if let Err(e) = check_write(key, &[&value]) {
            return futures::future::ready(Err(e)).boxed();
        }
        let k = key.encode();
        self.write(fence, move |tx| {
            let actual = revision_of(tx, &k)?;
            if actual != expected {
                return Err(StorageError::Conflict { expected, actual });
            }
            let revision = next_revision(tx)?;
            let mut states = tx.open_table(STATES).map_err(backend)?;
            states.insert(k.as_slice(), (revision, value.as_ref())).map_err(backend)?;
            Ok(revision)
        })
    }

    fn delete<'a>(&'a self, key: &'a Key, expected: Revision, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        if let Err(e) = key.check() {
            return futures::future::ready(Err(e)).boxed();
        }
        let k = key.encode();
        self.write(fence, move |tx| {
            let actual = revision_of(tx, &k)?;
            if actual != expected {
                return Err(StorageError::Conflict { expected, actual });
            }
            let len = entry_len(tx, &k)?;
            tx.open_table(STATES).map_err(backend)?.remove(k.as_slice()).map_err(backend)?;
            let mut entries = tx.open_table(ENTRIES).map_err(backend)?;
            for seq in 0..len {
                entries.remove((k.as_slice(), seq)).map_err(backend)?;
            }
            tx.open_table(ENTRY_LENS).map_err(backend)?.remove(k.as_slice()).map_err(backend)?;
            Ok(())
        })
    }

    fn append<'a>(
        &'a self,
        key: &'a Key,
        new: Vec<Bytes>,
        expected_len: u64,
        fence: Fence,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        if let Err(e) = check_write(key, &new.iter().collect::<Vec<_>>()) {
            return futures::future::ready(Err(e)).boxed();
        }
        let k = key.encode();
        self.write(fence, move |tx| {
            let actual = entry_len(tx, &k)?;
            if actual != expected_len {
                return Err(StorageError::Conflict { expected: expected_len, actual });
            }
            let mut entries = tx.open_table(ENTRIES).map_err(backend)?;
            let mut len = actual;
            for e in &new {
                entries.insert((k.as_slice(), len), e.as_ref()).map_err(backend)?;
                len += 1;
            }
            if len != actual {
                tx.open_table(ENTRY_LENS).map_err(backend)?.insert(k.as_slice(), len).map_err(backend)?;
            }
            Ok(len)
        })
    }

    fn entries<'a>(&'a self, key: &'a Key, from: u64, limit: usize) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>> {
        if let Err(e) = key.check() {
            return futures::future::ready(Err(e)).boxed();
        }
        let k = key.encode();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let entries = tx.open_table(ENTRIES).map_err(backend)?;
            let limit = limit.min(ENTRIES_READ_MAX);
            let range = entries.range((k.as_slice(), from)..=(k.as_slice(), u64::MAX)).map_err(backend)?;
            let mut out = Vec::new();
            for item in range.take(limit) {
                let (_, v) = item.map_err(backend)?;
                out.push(Bytes::copy_from_slice(v.value()));
            }
            Ok(out)
        })
    }

    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let epochs = tx.open_table(EPOCHS).map_err(backend)?;
            Ok(epochs.get(shard).map_err(backend)?.map_or(0, |g| g.value()))
        })
    }

    fn fence<'a>(&'a self, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        self.write(fence, |_| Ok(()))
    }

    fn scan_keys<'a>(&'a self, after: Option<&'a Key>, limit: usize) -> BoxFuture<'a, Result<Vec<Key>, StorageError>> {
        let limit = match scan_check(after, limit) {
            Ok(limit) => limit,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let after = after.map(Key::encode);
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            // A key is listed if it has a state or entries: the first `limit` keys of the union are
            // among the first `limit` of `states` and of `entry_lens`, both in encoded-key order.
            let mut found: Vec<Vec<u8>> = Vec::new();
            let states = tx.open_table(STATES).map_err(backend)?;
            for item in states.range::<&[u8]>((lower, Bound::Unbounded)).map_err(backend)?.take(limit) {
                found.push(item.map_err(backend)?.0.value().to_vec());
            }
            let lens = tx.open_table(ENTRY_LENS).map_err(backend)?;
            let mut with_entries = 0;
            for item in lens.range::<&[u8]>((lower, Bound::Unbounded)).map_err(backend)? {
                if with_entries == limit {
                    break;
                }
                let (k, len) = item.map_err(backend)?;
                // Files from before empty appends stopped writing a length may hold 0s: no entries.
                if len.value() > 0 {
                    found.push(k.value().to_vec());
                    with_entries += 1;
                }
            }
            found.sort_unstable();
            found.dedup();
            found.truncate(limit);
            found.iter().map(|k| Key::decode(k)).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SCAN_READ_MAX;

    /// Writes rows in one transaction: a trait write is one durable commit, too slow for 10k keys.
    fn load(s: &RedbStorage, states: &[&[u8]], lens: &[(&[u8], u64)]) {
        let tx = s.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(STATES).unwrap();
            for k in states {
                t.insert(*k, (1, &b"v"[..])).unwrap();
            }
            let mut t = tx.open_table(ENTRY_LENS).unwrap();
            let mut entries = tx.open_table(ENTRIES).unwrap();
            for (k, len) in lens {
                t.insert(*k, *len).unwrap();
                for seq in 0..*len {
                    entries.insert((*k, seq), &b"e"[..]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }

    #[tokio::test]
    async fn scans_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStorage::open(&dir.path().join("state.redb")).unwrap();
        let keys: Vec<Key> = (0..SCAN_READ_MAX + 5).map(|i| Key::new("t", format!("{i:06}"))).collect();
        let encoded: Vec<Vec<u8>> = keys.iter().map(Key::encode).collect();
        // Even keys have a state, odd ones entries, every third both.
        let states: Vec<&[u8]> = encoded.iter().step_by(2).map(Vec::as_slice).collect();
        let lens: Vec<(&[u8], u64)> = encoded
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 1 || i % 3 == 0)
            .map(|(_, k)| (k.as_slice(), 1))
            .collect();
        load(&s, &states, &lens);
        let first = s.scan_keys(None, usize::MAX).await.unwrap();
        assert_eq!(first, keys[..SCAN_READ_MAX]);
        let rest = s.scan_keys(first.last(), SCAN_READ_MAX + 1).await.unwrap();
        assert_eq!(rest, keys[SCAN_READ_MAX..]);
    }

    #[tokio::test]
    async fn corrupt_or_empty_rows_do_not_panic_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStorage::open(&dir.path().join("state.redb")).unwrap();
        // A zero length (an empty append in older files) is not entries.
        load(&s, &[b"t\0a"], &[(b"t\0b", 0)]);
        assert_eq!(s.scan_keys(None, 10).await.unwrap(), [Key::new("t", "a")]);
        load(&s, &[b"no separator"], &[(b"t\0\xff", 1)]);
        for after in [None, Some(Key::new("t", "a"))] {
            match s.scan_keys(after.as_ref(), 10).await {
                Err(StorageError::Backend(m)) => assert!(m.contains("corrupt stored key"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
