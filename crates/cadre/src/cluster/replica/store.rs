//! The store a replicating owner's host writes through: the local store first, then the replicas.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::future::ready;
use futures::FutureExt;

use super::engine::Turn;
use super::Replication;
use crate::cluster::protocol::ReplicaOp;
use crate::storage::{Fence, Key, Revision, Storage, StorageError, Versioned};

/// The store a replicating owner's host writes through: local first, then the replicas.
pub(super) struct ReplicatedStorage {
    pub(super) repl: Arc<Replication>,
}

impl ReplicatedStorage {
    /// Runs a local write on a write's turn of the shard's gate, then replicates it.
    /// (`local` is called only once the lock is held: a store may write when called, not polled;
    /// `op` only when the shard has replicas to send it to, since it may copy the value.)
    /// A write whose state (`len` bytes) cannot travel in one frame is refused before anything.
    fn write<'a, T: Send + 'a>(
        &'a self,
        key: &'a Key,
        fence: Fence,
        len: usize,
        local: impl FnOnce() -> BoxFuture<'a, Result<T, StorageError>> + Send + 'a,
        op: impl FnOnce() -> BoxFuture<'a, Result<ReplicaOp, StorageError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        async move {
            if len > self.repl.payload_max {
                return Err(StorageError::TooLarge { len });
            }
            let _turn = self.repl.turn(fence.shard, Turn::Write).await;
            let out = local().await?;
            if let Err(e) = self.repl.replicate(fence, key, op).await {
                // A shard closed on the way reopens through an opening job.
                if !self.repl.is_open(fence.shard, fence.epoch) {
                    let st = self.repl.state.borrow().clone();
                    self.repl.on_table(&st);
                }
                return Err(e);
            }
            Ok(out)
        }
        .boxed()
    }
}

impl Storage for ReplicatedStorage {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>> {
        self.repl.local.get(key)
    }

    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        let v = value.clone();
        let local = move || self.repl.local.put(key, v, expected, fence);
        self.write(key, fence, value.len(), local, move || {
            ready(Ok(ReplicaOp::Put { ty: key.ty.clone(), id: key.id.clone(), value: value.to_vec() })).boxed()
        })
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a Key,
        parts: Vec<Bytes>,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        let len = parts.iter().map(Bytes::len).sum();
        // The replicas get one buffer (it is copied into a frame anyway), made before the local
        // store takes the parts, and only when the shard lists replicas: a shard without any
        // (factor 1) copies nothing. One listed while the local write runs gets the value read
        // back (this write's turn holds the shard's other writers off, and the agent writing it
        // is the key's only writer).
        let copy = self.repl.lists_replicas(fence.shard).then(|| parts.concat());
        let local = move || self.repl.local.put_parts(key, parts, expected, fence);
        self.write(key, fence, len, local, move || {
            async move {
                let value = match copy {
                    Some(value) => value,
                    None => match self.repl.local.get(key).await? {
                        Some(v) => v.value.to_vec(),
                        None => return Err(StorageError::Backend("a value written was gone before it was replicated".into())),
                    },
                };
                Ok(ReplicaOp::Put { ty: key.ty.clone(), id: key.id.clone(), value })
            }
            .boxed()
        })
    }

    fn delete<'a>(&'a self, key: &'a Key, expected: Revision, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        let local = move || self.repl.local.delete(key, expected, fence);
        self.write(key, fence, 0, local, move || {
            ready(Ok(ReplicaOp::Delete { ty: key.ty.clone(), id: key.id.clone() })).boxed()
        })
    }

    fn append<'a>(
        &'a self,
        key: &'a Key,
        entries: Vec<Bytes>,
        expected_len: u64,
        fence: Fence,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        let copy: Vec<Vec<u8>> = entries.iter().map(|e| e.to_vec()).collect();
        let len = entries.iter().map(Bytes::len).sum();
        let local = move || self.repl.local.append(key, entries, expected_len, fence);
        self.write(key, fence, len, local, move || {
            ready(Ok(ReplicaOp::Append { ty: key.ty.clone(), id: key.id.clone(), expected_len, entries: copy })).boxed()
        })
    }

    fn entries<'a>(&'a self, key: &'a Key, from: u64, limit: usize) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>> {
        self.repl.local.entries(key, from, limit)
    }

    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.repl.local.epoch(shard)
    }

    fn fence<'a>(&'a self, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        self.repl.local.fence(fence)
    }

    fn scan_keys<'a>(&'a self, after: Option<&'a Key>, limit: usize) -> BoxFuture<'a, Result<Vec<Key>, StorageError>> {
        self.repl.local.scan_keys(after, limit)
    }
}
