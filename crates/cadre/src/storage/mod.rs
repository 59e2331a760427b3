//! Agent state storage: one trait, several backends, one conformance suite.
//!
//! A [`Storage`] keeps, per [`Key`] (agent type and id):
//! - a **state**: opaque bytes with a [`Revision`];
//! - an append-only list of **entries** (0-based sequence numbers), for agents that keep a log.
//!
//! ## Revisions
//! Revisions come from one counter per store that grows with every write (like etcd's), not one
//! per key. So a revision is never reused: a writer holding revision 7 of a key that was deleted
//! and created again gets `Conflict`, not a silent overwrite (no ABA). Revision 0 means "absent";
//! `put(.., expected = 0, ..)` creates.
//!
//! ## Fencing
//! Every write carries a [`Fence`]: the shard of the key and the writer's epoch for it. The store
//! remembers the highest epoch it has seen per shard; a write with a lower epoch is refused with
//! `Fenced`, a write with a higher one raises it. So once a new owner has written at epoch e+1, the
//! old owner's writes at e fail, however late they arrive. The epoch check comes before the
//! revision check: a fenced writer learns that it is fenced, not that it conflicts.
//!
//! ## Backends
//! [`memory::MemoryStorage`] (tests, benchmarks) and [`embedded::RedbStorage`] (the embedded
//! default, a redb file under the data dir; each write is one durable transaction). Both pass
//! [`conformance`].
//!
//! ## Limits
//! Values and entries hold at most [`VALUE_LEN_MAX_BYTES`]; keys at most [`KEY_LEN_MAX_BYTES`];
//! one `entries` read returns at most [`ENTRIES_READ_MAX`].

pub mod conformance;
pub mod embedded;
pub mod memory;

use bytes::Bytes;
use futures::future::BoxFuture;

/// Largest state value or entry.
pub const VALUE_LEN_MAX_BYTES: usize = 16 << 20;
/// Largest key (type and id together).
pub const KEY_LEN_MAX_BYTES: usize = 1024;
/// Most entries returned by one read.
pub const ENTRIES_READ_MAX: usize = 10_000;

/// A store-wide write counter value; 0 means absent.
pub type Revision = u64;

/// An agent's storage key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub ty: String,
    pub id: String,
}

impl Key {
    pub fn new(ty: impl Into<String>, id: impl Into<String>) -> Key {
        Key { ty: ty.into(), id: id.into() }
    }

    /// `type ‖ 0x00 ‖ id`: the bytes backends store the key as (and placement hashes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ty.len() + 1 + self.id.len());
        out.extend_from_slice(self.ty.as_bytes());
        out.push(0);
        out.extend_from_slice(self.id.as_bytes());
        out
    }

    pub fn check(&self) -> Result<(), StorageError> {
        if self.ty.is_empty() || self.ty.contains('\0') {
            return Err(StorageError::InvalidKey("the type must be non-empty and without NUL".into()));
        }
        if self.ty.len() + 1 + self.id.len() > KEY_LEN_MAX_BYTES {
            return Err(StorageError::InvalidKey(format!("longer than {KEY_LEN_MAX_BYTES} bytes")));
        }
        Ok(())
    }
}

/// The shard a write is for and the writer's epoch of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub shard: u32,
    pub epoch: u64,
}

/// A state and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The key's revision is not the expected one (0: absent).
    #[error("revision conflict: expected {expected}, found {actual}")]
    Conflict { expected: Revision, actual: Revision },
    /// A newer epoch has written to this shard.
    #[error("fenced: shard {shard} is at epoch {current}, the write was at {epoch}")]
    Fenced { shard: u32, epoch: u64, current: u64 },
    #[error("value of {len} bytes exceeds {VALUE_LEN_MAX_BYTES}")]
    TooLarge { len: usize },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The backend failed (IO, corruption); the operation may or may not have happened only for
    /// writes whose commit failed.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// Where agent state lives. Every method is atomic; see the module docs for the rules.
pub trait Storage: Send + Sync + 'static {
    /// The state and its revision, or `None` when absent.
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>>;

    /// Replaces the state if its revision is `expected` (0: absent) and the fence holds; returns
    /// the new revision.
    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>>;

    /// Removes the state and the entries if the state's revision is `expected` and the fence holds.
    fn delete<'a>(&'a self, key: &'a Key, expected: Revision, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Appends entries if the key has exactly `expected_len` entries and the fence holds; returns
    /// the new length.
    fn append<'a>(
        &'a self,
        key: &'a Key,
        entries: Vec<Bytes>,
        expected_len: u64,
        fence: Fence,
    ) -> BoxFuture<'a, Result<u64, StorageError>>;

    /// Entries from sequence number `from`, at most `limit` (capped at [`ENTRIES_READ_MAX`]).
    fn entries<'a>(&'a self, key: &'a Key, from: u64, limit: usize) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>>;

    /// The highest epoch seen for a shard (0 if none).
    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>>;
}

/// Checks shared by backends before touching anything.
fn check_write(key: &Key, values: &[&Bytes]) -> Result<(), StorageError> {
    key.check()?;
    if let Some(v) = values.iter().find(|v| v.len() > VALUE_LEN_MAX_BYTES) {
        return Err(StorageError::TooLarge { len: v.len() });
    }
    Ok(())
}

/// The fence rule on the shard's current epoch: the epoch to store, or `Fenced`.
fn fence_check(fence: Fence, current: u64) -> Result<u64, StorageError> {
    if fence.epoch < current {
        return Err(StorageError::Fenced { shard: fence.shard, epoch: fence.epoch, current });
    }
    Ok(fence.epoch)
}
