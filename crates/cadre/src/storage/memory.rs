//! In-memory storage: one mutex over plain maps (ordered by key, for `scan_keys`). For tests,
//! simulations and benchmarks; nothing survives the process. Shared by several nodes (an `Arc`), it plays a storage host all of them
//! reach, as a database would be.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::{ready, BoxFuture};
use futures::FutureExt;

use super::{
    check_write, fence_check, scan_check, Fence, Key, Revision, Storage, StorageError, Versioned, ENTRIES_READ_MAX,
    VALUE_LEN_MAX_BYTES,
};

/// A state as written: the parts of [`Storage::put_parts`], shared with the writer (a `get`
/// joins them).
struct Stored {
    parts: Vec<Bytes>,
    revision: Revision,
}

#[derive(Default)]
struct Inner {
    states: BTreeMap<Key, Stored>,
    /// Never holds an empty list: a key without entries has no list.
    entries: BTreeMap<Key, Vec<Bytes>>,
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

/// A store in memory (see the module docs); share it between nodes with an `Arc`.
#[derive(Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StorageError>,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        ready(self.locked(f)).boxed()
    }

    fn locked<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding the lock cannot leave the maps half-updated: every operation
        // checks first and then mutates.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }
}

impl Storage for MemoryStorage {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>> {
        // The parts are joined after the lock is released.
        let found = self.locked(|i| i.states.get(key).map(|v| (v.parts.clone(), v.revision)));
        let value = found.map(|(parts, revision)| Versioned { value: super::joined(&parts), revision });
        ready(Ok(value)).boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        self.put_parts(key, vec![value], expected, fence)
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a Key,
        parts: Vec<Bytes>,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        let len = parts.iter().map(Bytes::len).sum();
        if let Err(e) = key.check() {
            return ready(Err(e)).boxed();
        }
        if len > VALUE_LEN_MAX_BYTES {
            return ready(Err(StorageError::TooLarge { len })).boxed();
        }
        let put = self.locked(move |i| {
            let epoch = i.fence(fence)?;
            let revision = i.revision + 1;
            // One lookup of the key; the value it replaces is freed after the lock is released
            // (every writer waits on this one lock).
            let replaced = match i.states.get_mut(key) {
                Some(v) if v.revision == expected => Some(std::mem::replace(v, Stored { parts, revision })),
                Some(v) => return Err(StorageError::Conflict { expected, actual: v.revision }),
                None if expected == 0 => {
                    i.states.insert(key.clone(), Stored { parts, revision });
                    None
                }
                None => return Err(StorageError::Conflict { expected, actual: 0 }),
            };
            i.revision = revision;
            if i.epochs.get(&fence.shard) != Some(&epoch) {
                i.epochs.insert(fence.shard, epoch);
            }
            Ok((revision, replaced))
        });
        ready(put.map(|(revision, _replaced)| revision)).boxed()
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
            let len = if entries.is_empty() {
                actual
            } else {
                let list = i.entries.entry(key.clone()).or_default();
                list.extend(entries);
                list.len() as u64
            };
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

    fn fence<'a>(&'a self, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        self.run(move |i| {
            let epoch = i.fence(fence)?;
            i.epochs.insert(fence.shard, epoch);
            Ok(())
        })
    }

    fn scan_keys<'a>(&'a self, after: Option<&'a Key>, limit: usize) -> BoxFuture<'a, Result<Vec<Key>, StorageError>> {
        self.run(move |i| {
            let limit = scan_check(after, limit)?;
            let range = (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
            // The first `limit` keys of the union are among the first `limit` of each map.
            let mut keys: Vec<Key> = i.states.range(range).map(|(k, _)| k).take(limit).cloned().collect();
            keys.extend(i.entries.range(range).map(|(k, _)| k).take(limit).cloned());
            keys.sort_unstable();
            keys.dedup();
            keys.truncate(limit);
            Ok(keys)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SCAN_READ_MAX;

    #[tokio::test]
    async fn scans_are_capped() {
        let s = MemoryStorage::new();
        let f = Fence { shard: 0, epoch: 1 };
        let keys: Vec<Key> = (0..SCAN_READ_MAX + 5).map(|i| Key::new("t", format!("{i:06}"))).collect();
        for (i, k) in keys.iter().enumerate() {
            if i % 2 == 0 {
                s.put(k, Bytes::new(), 0, f).await.unwrap();
            }
            if i % 2 == 1 || i % 3 == 0 {
                s.append(k, vec![Bytes::new()], 0, f).await.unwrap();
            }
        }
        let first = s.scan_keys(None, usize::MAX).await.unwrap();
        assert_eq!(first, keys[..SCAN_READ_MAX]);
        let rest = s.scan_keys(first.last(), SCAN_READ_MAX + 1).await.unwrap();
        assert_eq!(rest, keys[SCAN_READ_MAX..]);
    }
}
