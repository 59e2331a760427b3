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
//! [`memory::MemoryStorage`] (tests, benchmarks), [`embedded::RedbStorage`] (the embedded
//! default, a redb file under the data dir; each write is one durable transaction) and
//! [`postgres::PostgresStorage`] (`[storage] url`: one database shared by every node, so
//! [`Storage::shared`] is true and shards move without copying state; each write is one
//! transaction that locks its shard's epoch row). All three pass the conformance suite
//! (`conformance`, with the `testing` feature: an application's own backend can run it too);
//! Postgres also with several stores (nodes) writing to one database at once.
//!
//! ## Limits
//! Values and entries hold at most [`VALUE_LEN_MAX_BYTES`]; keys at most [`KEY_LEN_MAX_BYTES`];
//! one `entries` read returns at most [`ENTRIES_READ_MAX`], one `scan_keys` read at most
//! [`SCAN_READ_MAX`] keys.

#[cfg(feature = "testing")]
pub mod conformance;
pub mod embedded;
pub mod memory;
pub mod postgres;

use bytes::Bytes;
use futures::future::BoxFuture;

/// Largest state value or entry.
pub const VALUE_LEN_MAX_BYTES: usize = 16 << 20;
/// Largest key (type and id together).
pub const KEY_LEN_MAX_BYTES: usize = 1024;
/// Most entries returned by one read.
pub const ENTRIES_READ_MAX: usize = 10_000;
/// Most keys returned by one scan.
pub const SCAN_READ_MAX: usize = 10_000;

/// A store-wide write counter value; 0 means absent.
pub type Revision = u64;

/// An agent's storage key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The agent type ([`Agent::TYPE`](crate::Agent::TYPE)); not empty, no NUL.
    pub ty: String,
    /// The agent's id within its type.
    pub id: String,
}

impl Key {
    /// The key of agent `id` of type `ty` (not checked: see [`Key::check`]).
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

    /// The inverse of [`Key::encode`], for keys read back from a backend: the type is what comes
    /// before the first NUL (types hold none), the id the rest. Bytes that are not an encoded key
    /// (no NUL, not UTF-8) are a corrupt store: `Backend`.
    pub fn decode(bytes: &[u8]) -> Result<Key, StorageError> {
        let corrupt = |why: &str| {
            let shown = &bytes[..bytes.len().min(64)];
            let more = if shown.len() < bytes.len() { "..." } else { "" };
            StorageError::Backend(format!("corrupt stored key \"{}\"{more}: {why}", shown.escape_ascii()))
        };
        let nul = bytes.iter().position(|&b| b == 0).ok_or_else(|| corrupt("no NUL between type and id"))?;
        let ty = std::str::from_utf8(&bytes[..nul]).map_err(|_| corrupt("the type is not UTF-8"))?;
        let id = std::str::from_utf8(&bytes[nul + 1..]).map_err(|_| corrupt("the id is not UTF-8"))?;
        Ok(Key::new(ty, id))
    }

    /// Checks the type (not empty, no NUL) and the length (type and id at most
    /// [`KEY_LEN_MAX_BYTES`] together); else `InvalidKey`.
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
    /// The key's shard.
    pub shard: u32,
    /// The writer's epoch of the shard.
    pub epoch: u64,
}

/// A state and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The state's bytes.
    pub value: Bytes,
    /// The revision of the write that stored it.
    pub revision: Revision,
}

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum StorageError {
    /// The key's revision is not the expected one (0: absent).
    #[error("revision conflict: expected {expected}, found {actual}")]
    Conflict {
        /// The revision the writer expected.
        expected: Revision,
        /// The key's revision in the store.
        actual: Revision,
    },
    /// A newer epoch has written to this shard.
    #[error("fenced: shard {shard} is at epoch {current}, the write was at {epoch}")]
    Fenced {
        /// The shard.
        shard: u32,
        /// The write's epoch.
        epoch: u64,
        /// The highest epoch the store has seen for the shard.
        current: u64,
    },
    /// Larger than [`VALUE_LEN_MAX_BYTES`], or than one transport frame when replicated.
    #[error("value of {len} bytes exceeds the limit (at most {VALUE_LEN_MAX_BYTES}, and one transport frame when replicated)")]
    TooLarge {
        /// The value's length, in bytes.
        len: usize,
    },
    /// The key is invalid (see [`Key::check`]).
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

    /// [`Storage::put`] of the concatenation of `parts`. A writer that changes a small part of a
    /// large value passes the unchanged parts as shared [`Bytes`]; a backend that keeps values in
    /// memory stores the parts as they are, so nothing is copied. The default concatenates.
    fn put_parts<'a>(
        &'a self,
        key: &'a Key,
        parts: Vec<Bytes>,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        self.put(key, joined(&parts), expected, fence)
    }

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

    /// Whether every node sees this same store (a database): then a shard moving between nodes
    /// needs no copy of its state. Node-local stores (memory, the embedded file) are not.
    fn shared(&self) -> bool {
        false
    }

    /// The highest epoch seen for a shard (0 if none).
    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>>;

    /// Raises the shard's epoch to `fence.epoch` without writing a key (`Fenced` if it is already
    /// higher), so that writes at lower epochs are refused from now on. A new owner of a
    /// replicated shard fences its replicas this way before it serves.
    fn fence<'a>(&'a self, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Keys that have a state or entries, in key order (`Key`'s `Ord`, which equals the order of
    /// `Key::encode` bytes because types hold no NUL), strictly after `after` (`None`: from the
    /// start), at most `limit` (capped at [`SCAN_READ_MAX`]). Used to export a shard's agents for a
    /// hand-off between nodes; a caller pages with the last key returned. `after` must be a valid
    /// key (`InvalidKey` otherwise: a NUL in its type would break the order above).
    fn scan_keys<'a>(&'a self, after: Option<&'a Key>, limit: usize) -> BoxFuture<'a, Result<Vec<Key>, StorageError>>;
}

/// The concatenation of `parts` (a single part is shared, not copied).
pub(crate) fn joined(parts: &[Bytes]) -> Bytes {
    match parts {
        [one] => one.clone(),
        parts => Bytes::from(parts.concat()),
    }
}

/// Checks shared by backends before touching anything.
fn check_write(key: &Key, values: &[&Bytes]) -> Result<(), StorageError> {
    key.check()?;
    if let Some(v) = values.iter().find(|v| v.len() > VALUE_LEN_MAX_BYTES) {
        return Err(StorageError::TooLarge { len: v.len() });
    }
    Ok(())
}

/// The checks and the capped limit of a `scan_keys` call.
fn scan_check(after: Option<&Key>, limit: usize) -> Result<usize, StorageError> {
    after.map_or(Ok(()), Key::check)?;
    Ok(limit.min(SCAN_READ_MAX))
}

/// The fence rule on the shard's current epoch: the epoch to store, or `Fenced`.
fn fence_check(fence: Fence, current: u64) -> Result<u64, StorageError> {
    if fence.epoch < current {
        return Err(StorageError::Fenced { shard: fence.shard, epoch: fence.epoch, current });
    }
    Ok(fence.epoch)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn decode_inverts_encode_and_refuses_corrupt_bytes() {
        for k in [Key::new("t", ""), Key::new("t", "a\0b"), Key::new("\u{e9}", "\u{1F600}")] {
            assert_eq!(Key::decode(&k.encode()), Ok(k));
        }
        for (bytes, why) in [
            (&b"no-separator"[..], "no NUL"),
            (&b"\xff\0id"[..], "type is not UTF-8"),
            (&b"t\0\xc3"[..], "id is not UTF-8"),
        ] {
            match Key::decode(bytes) {
                Err(StorageError::Backend(m)) => assert!(m.contains("corrupt") && m.contains(why), "{m}"),
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
        let long = Key::decode(&[b'x'; 5000]).unwrap_err().to_string();
        assert!(long.len() < 200, "the message shows a bounded prefix: {long}");
    }

    #[test]
    fn scans_are_capped_and_check_after() {
        assert_eq!(scan_check(None, 0), Ok(0));
        assert_eq!(scan_check(None, 7), Ok(7));
        assert_eq!(scan_check(None, usize::MAX), Ok(SCAN_READ_MAX));
        assert!(matches!(scan_check(Some(&Key::new("a\0b", "")), 1), Err(StorageError::InvalidKey(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// What `scan_keys` relies on: byte order of encoded keys is `Key`'s order.
        #[test]
        fn encoded_order_is_key_order(
            a in ("[a-c\u{e9}]{1,3}", "[\0a-c\u{e9}\u{1F600}]{0,3}"),
            b in ("[a-c\u{e9}]{1,3}", "[\0a-c\u{e9}\u{1F600}]{0,3}"),
        ) {
            let (a, b) = (Key::new(a.0, a.1), Key::new(b.0, b.1));
            prop_assert_eq!(a.encode().cmp(&b.encode()), a.cmp(&b));
            prop_assert_eq!(Key::decode(&a.encode()).unwrap(), a);
        }
    }
}
