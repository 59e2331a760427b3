//! In-memory storage: one mutex over plain maps. For tests, simulations and benchmarks; nothing
//! survives the process. Shared by several nodes (an `Arc`), it plays a storage host all of them
//! reach, as a database would be.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::{ready, BoxFuture};
use futures::FutureExt;

use super::{check_write, fence_check, Fence, Key, Revision, Storage, StorageError, Versioned, ENTRIES_READ_MAX};

#[derive(Default)]
struct Inner {
    states: HashMap<Key, Versioned>,
    entries: HashMap<Key, Vec<Bytes>>,
    epochs: HashMap<u32, u64>,
    revision: Revision,
}

impl Inner {
    fn fence(&self, fence: Fence) -> Result<u64, StorageError> {
        fence_check(fence, self.epochs.get(&fence.shard).copied().unwrap_or(0))
    }

    fn revision_of(&self, key: &Key) -> Revision {
        self.states.get(key).map_or(0, |v| v.revision)
    }
}

#[derive(Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StorageError>,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        // A panic while holding the lock cannot leave the maps half-updated: every operation
        // checks first and then mutates.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ready(f(&mut inner)).boxed()
    }
}

impl Storage for MemoryStorage {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>> {
        self.run(|i| Ok(i.states.get(key).cloned()))
    }

    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        self.run(move |i| {
            check_write(key, &[&value])?;
            let epoch = i.fence(fence)?;
            let actual = i.revision_of(key);
            if actual != expected {
                return Err(StorageError::Conflict { expected, actual });
            }
            i.revision += 1;
            let revision = i.revision;
            match i.states.get_mut(key) {
                Some(v) => *v = Versioned { value, revision },
                None => {
                    i.states.insert(key.clone(), Versioned { value, revision });
                }
            }
            i.epochs.insert(fence.shard, epoch);
            Ok(revision)
        })
    }

    fn delete<'a>(&'a self, key: &'a Key, expected: Revision, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        self.run(move |i| {
            key.check()?;
            let epoch = i.fence(fence)?;
            let actual = i.revision_of(key);
            if actual != expected {
                return Err(StorageError::Conflict { expected, actual });
            }
            i.states.remove(key);
            i.entries.remove(key);
            i.revision += 1;
            i.epochs.insert(fence.shard, epoch);
            Ok(())
        })
    }

    fn append<'a>(
        &'a self,
        key: &'a Key,
        entries: Vec<Bytes>,
        expected_len: u64,
        fence: Fence,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.run(move |i| {
            check_write(key, &entries.iter().collect::<Vec<_>>())?;
            let epoch = i.fence(fence)?;
            let actual = i.entries.get(key).map_or(0, |e| e.len() as u64);
            if actual != expected_len {
                return Err(StorageError::Conflict { expected: expected_len, actual });
            }
            let list = i.entries.entry(key.clone()).or_default();
            list.extend(entries);
            let len = list.len() as u64;
            i.revision += 1;
            i.epochs.insert(fence.shard, epoch);
            Ok(len)
        })
    }

    fn entries<'a>(&'a self, key: &'a Key, from: u64, limit: usize) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>> {
        self.run(move |i| {
            key.check()?;
            let list = i.entries.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(list.len());
            Ok(list[from..].iter().take(limit.min(ENTRIES_READ_MAX)).cloned().collect())
        })
    }

    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.run(move |i| Ok(i.epochs.get(&shard).copied().unwrap_or(0)))
    }
}
