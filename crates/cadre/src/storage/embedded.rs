//! The embedded default: a redb database file (under the node's data dir).
//!
//! Each write is one redb write transaction committed durably (fsync) before the call returns, so
//! an acknowledged write survives a crash of the process or the machine. redb allows one writer
//! at a time; writes queue on it. Calls run on tokio's blocking pool, never on a runtime thread.
//!
//! Tables: `states` (key → (revision, value)), `entries` ((key, seq) → entry), `entry_lens`
//! (key → number of entries), `epochs` (shard → highest epoch), `meta` (`revision` → the store's
//! revision counter).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{check_write, fence_check, Fence, Key, Revision, Storage, StorageError, Versioned, ENTRIES_READ_MAX};

const STATES: TableDefinition<&[u8], (u64, &[u8])> = TableDefinition::new("states");
const ENTRIES: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("entries");
const ENTRY_LENS: TableDefinition<&[u8], u64> = TableDefinition::new("entry_lens");
const EPOCHS: TableDefinition<u32, u64> = TableDefinition::new("epochs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

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
            tx.open_table(ENTRY_LENS).map_err(backend)?.insert(k.as_slice(), len).map_err(backend)?;
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
}
