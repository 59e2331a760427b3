//! The replica side of replication: requests from owners, applied in order per shard lane.
//!
//! Requests arrive as data-lane asks; each is queued on lane `shard % REPLICA_LANES` (bounded:
//! a full lane refuses `Busy`) and applied in arrival order, at the owner's epoch, so the store's
//! fence refuses an older owner's late writes.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::engine;
use super::{Incoming, Replication, REPLICA_LANES};
use crate::cluster::protocol::{ReplicaError, ReplicaOp, ReplicaReply, ReplicaReq, TransferItem};
use crate::metrics::label;
use crate::net::PeerInfo;
use crate::placement::shard_of;
use crate::storage::{Fence, Key, Revision, Storage, StorageError, SCAN_READ_MAX};
use crate::wire::Lane;

impl Replication {
    /// Takes a data-lane ask carrying a [`ReplicaReq`] (`body`: the request after its kind,
    /// [`crate::wire::envelope::Kind::Replica`]); answers at once only when it cannot be queued.
    pub fn on_ask(&self, from: &PeerInfo, id: u64, body: &[u8]) -> Option<Bytes> {
        let refuse = |reason: &str, e: ReplicaError| {
            self.metrics.refused.get_or_create(&label("reason", reason)).inc();
            Some(encode_reply(&Err(e)))
        };
        let req = match postcard::from_bytes::<ReplicaReq>(body) {
            Ok(r) => r,
            Err(e) => {
                warn!(from = %from.name, error = %e, "undecodable replica request");
                return refuse("undecodable", ReplicaError::Undecodable(e.to_string()));
            }
        };
        let lane = &self.lanes[req.shard as usize % REPLICA_LANES];
        let item = Incoming { from: from.name.to_string(), addr: from.addr, id, req };
        match lane.try_send(item) {
            Ok(()) => None,
            Err(_) => refuse("busy", ReplicaError::Busy),
        }
    }

    async fn apply(&self, from: &str, req: ReplicaReq) -> ReplicaReply {
        let count = {
            let st = self.state.borrow();
            if let Some(e) = engine::shard_entry(&st, req.shard) {
                if req.epoch < e.epoch || (req.epoch == e.epoch && e.owner.as_deref() != Some(from)) {
                    return Err(ReplicaError::Stale(format!(
                        "shard {} is at epoch {} owned by {:?}; {from} wrote at {}",
                        req.shard, e.epoch, e.owner, req.epoch
                    )));
                }
            }
            if st.shard_count == 0 {
                // Too far behind to check anything: the owner catches this node up later.
                return Err(ReplicaError::Stale("this node has no shard table yet".into()));
            }
            st.shard_count
        };
        let fence = Fence { shard: req.shard, epoch: req.epoch };
        let in_shard = |ty: &str, id: &str| {
            let key = Key::new(ty, id);
            key.check().map_err(|e| ReplicaError::Storage(e.to_string()))?;
            if shard_of(&key, count) != req.shard {
                return Err(ReplicaError::Diverged(format!("{key:?} is not in shard {}", req.shard)));
            }
            Ok(key)
        };
        let local = &*self.local;
        match req.op {
            ReplicaOp::Put { ty, id, value } => {
                let key = in_shard(&ty, &id)?;
                let rev = revision(local, &key).await?;
                local.put(&key, value.into(), rev, fence).await.map(drop).map_err(storage_err)
            }
            ReplicaOp::Delete { ty, id } => remove(local, &in_shard(&ty, &id)?, fence).await,
            ReplicaOp::Append { ty, id, expected_len, entries } => {
                let key = in_shard(&ty, &id)?;
                let entries = entries.into_iter().map(Bytes::from).collect();
                match local.append(&key, entries, expected_len, fence).await {
                    Ok(_) => Ok(()),
                    Err(StorageError::Conflict { expected, actual }) => Err(ReplicaError::Diverged(format!(
                        "{key:?} has {actual} entries here, the owner appended after {expected}"
                    ))),
                    Err(e) => Err(storage_err(e)),
                }
            }
            ReplicaOp::Fence => local.fence(fence).await.map_err(storage_err),
            ReplicaOp::Sync { after, through, items } => {
                let after = after.map(|(t, i)| Key::new(t, i));
                let through = through.map(|(t, i)| Key::new(t, i));
                let mut keys = Vec::with_capacity(items.len());
                for item in &items {
                    keys.push(in_shard(&item.ty, &item.id)?);
                }
                // Fenced at this epoch already by an earlier page, most of the time: a read, not a write.
                let here = local.epoch(req.shard).await.map_err(storage_err)?;
                if here > req.epoch {
                    return Err(ReplicaError::Stale(format!("shard {} is fenced at {here} here", req.shard)));
                }
                if here < req.epoch {
                    local.fence(fence).await.map_err(storage_err)?;
                }
                sync_range(local, req.shard, count, fence, after, through, keys, items).await
            }
        }
    }
}

pub(super) async fn apply_lane(
    repl: Arc<Replication>,
    mut rx: mpsc::Receiver<Incoming>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let item = tokio::select! {
            i = rx.recv() => match i { Some(i) => i, None => return },
            _ = cancel.cancelled() => return,
        };
        // A panic in a store must not end the lane (every later request of its shards would be
        // refused): it fails this request only.
        let applied = std::panic::AssertUnwindSafe(repl.apply(&item.from, item.req)).catch_unwind().await;
        let reply = applied.unwrap_or_else(|_| Err(ReplicaError::Storage("applying the request panicked".into())));
        if let Err(e) = &reply {
            debug!(from = %item.from, error = %e, "replica request refused");
            let reason = match e {
                ReplicaError::Stale(_) => "stale",
                ReplicaError::Diverged(_) => "diverged",
                _ => "storage",
            };
            repl.metrics.refused.get_or_create(&label("reason", reason)).inc();
        }
        let Some(inner) = repl.cluster() else { return };
        if let Some(t) = inner.transport.upgrade() {
            let _ = t.reply_on(Lane::Data, item.addr, item.id, encode_reply(&reply));
        }
    }
}
/// Makes the replica's keys of `shard` in `(after, through]` exactly `items` (whose keys are
/// `keys`).
#[allow(clippy::too_many_arguments)]
async fn sync_range(
    local: &dyn Storage,
    shard: u32,
    count: u32,
    fence: Fence,
    after: Option<Key>,
    through: Option<Key>,
    keys: Vec<Key>,
    items: Vec<TransferItem>,
) -> ReplicaReply {
    let keep: HashSet<&Key> = keys.iter().collect();
    // Drop what the range holds here and the page does not.
    let mut cursor = after;
    'scan: loop {
        let found = local.scan_keys(cursor.as_ref(), SCAN_READ_MAX).await.map_err(storage_err)?;
        let end = found.len() < SCAN_READ_MAX;
        for key in found {
            if through.as_ref().is_some_and(|t| key > *t) {
                break 'scan;
            }
            if shard_of(&key, count) == shard && !keep.contains(&key) {
                remove(local, &key, fence).await?;
            }
            cursor = Some(key);
        }
        if end {
            break;
        }
    }
    for (key, item) in keys.iter().zip(items) {
        remove(local, key, fence).await?;
        if let Some(v) = item.value {
            local.put(key, v.into(), 0, fence).await.map_err(storage_err)?;
        }
        if !item.entries.is_empty() {
            let entries = item.entries.into_iter().map(Bytes::from).collect();
            local.append(key, entries, 0, fence).await.map_err(storage_err)?;
        }
    }
    Ok(())
}

async fn revision(local: &dyn Storage, key: &Key) -> Result<Revision, ReplicaError> {
    Ok(local.get(key).await.map_err(storage_err)?.map_or(0, |v| v.revision))
}

/// Removes a key's state and entries, whatever its revision.
async fn remove(local: &dyn Storage, key: &Key, fence: Fence) -> ReplicaReply {
    let rev = revision(local, key).await?;
    let has_entries = !local.entries(key, 0, 1).await.map_err(storage_err)?.is_empty();
    if rev == 0 && !has_entries {
        return Ok(());
    }
    local.delete(key, rev, fence).await.map_err(storage_err)
}
fn storage_err(e: StorageError) -> ReplicaError {
    match e {
        StorageError::Fenced { .. } => ReplicaError::Stale(e.to_string()),
        e => ReplicaError::Storage(e.to_string()),
    }
}
pub(super) fn encode_reply(reply: &ReplicaReply) -> Bytes {
    crate::cluster::protocol::encode(reply)
}
