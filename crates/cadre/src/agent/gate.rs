//! Placement as the host sees it: a [`Gate`] says whether a key's shard is served here, and with
//! which fence (shard and epoch) its writes go out.
//!
//! The cluster supplies its own gate (owned shards, leases, hand-offs); [`LocalGate`] serves
//! every key at epoch 1, for a host without a cluster.

use super::CallError;
use crate::storage::{Fence, Key};

/// Decides whether a key is served here, and with which fence its writes go out.
pub trait Gate: Send + Sync + 'static {
    /// May new work for `key` start here? Called under the host's table lock: must be quick.
    fn admit(&self, key: &Key) -> Result<Fence, CallError>;
    /// May a write for `key` go ahead (also while its shard is being handed off)?
    fn write(&self, key: &Key) -> Result<Fence, CallError>;
    /// The shards served here now, with their epochs (the reminder schedule loads their index).
    /// By default every shard of [`crate::placement::SHARD_COUNT_DEFAULT`] at epoch 1.
    fn served(&self) -> Vec<(u32, u64)> {
        (0..crate::placement::SHARD_COUNT_DEFAULT).map(|s| (s, 1)).collect()
    }
}

/// Serves every key, at epoch 1 of its shard (of [`crate::placement::SHARD_COUNT_DEFAULT`]).
pub struct LocalGate;

impl Gate for LocalGate {
    fn admit(&self, key: &Key) -> Result<Fence, CallError> {
        Ok(Fence { shard: crate::placement::shard_of(key, crate::placement::SHARD_COUNT_DEFAULT), epoch: 1 })
    }
    fn write(&self, key: &Key) -> Result<Fence, CallError> {
        self.admit(key)
    }
}
