//! Reacting to the shard table: giving shards up, and handing them over in a planned move.
//!
//! On every change of the table each node:
//! - passivates its agents in shards it no longer owns (their state is stored; with shared storage
//!   a late write is fenced by the new owner's epoch anyway);
//! - for each shard it owns that is `Moving { to }`, runs one hand-off: the gate already refuses new
//!   work for the shard, so it passivates the shard's agents (in-flight work finishes and is
//!   stored), copies the shard's state to `to` page by page when storage is node-local, then asks
//!   the leader to complete the move. Failures are retried until the table changes (the leader
//!   aborts a move that takes longer than `handoff_timeout_ms`).
//!
//! The receiving side ([`import`]) replaces what it held for the shard with the pages, writing at
//! the move's epoch + 1, the epoch it will own the shard at.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::protocol::{TransferItem, TransferPage};
use super::Inner;
use crate::meta::raft::{self as mraft, ControlReply, ControlReq};
use crate::meta::{MetaState, ShardState};
use crate::placement::shard_of;
use crate::storage::{Fence, Key, ENTRIES_READ_MAX, SCAN_READ_MAX};

/// Bytes of state per transfer page (well under the default 1 MiB frame).
pub const TRANSFER_PAGE_BYTES_MAX: usize = 256 * 1024;
/// Wait between attempts of a failed hand-off step.
const HANDOFF_RETRY_MS: u64 = 200;

pub(super) async fn watch_table(inner: Arc<Inner>) {
    let mut rx = inner.state.clone();
    // Shard → the epoch this node serves it at. Any change of epoch counts as giving it up: a
    // lagging node may see an owner of e and then of e+2 (lost, then back), and its activations
    // of epoch e must not go on.
    let mut owned: HashMap<u32, u64> = HashMap::new();
    loop {
        let st = rx.borrow_and_update().clone();
        let now_owned: HashMap<u32, u64> = st
            .shards
            .iter()
            .enumerate()
            .filter(|(_, e)| e.owner.as_deref() == Some(inner.name.as_str()) && e.state == ShardState::Active)
            .map(|(s, e)| (s as u32, e.epoch))
            .collect();
        let lost: Vec<u32> = owned.iter().filter(|(s, e)| now_owned.get(s) != Some(e)).map(|(s, _)| *s).collect();
        owned = now_owned;
        if !lost.is_empty() {
            let count = st.shard_count;
            let lost: HashSet<u32> = lost.into_iter().collect();
            let host = inner.host.clone();
            inner.tasks.spawn(async move {
                let n = host.passivate_where(|k| lost.contains(&shard_of(k, count))).await;
                if n > 0 {
                    debug!(agents = n, "passivated agents of shards given up");
                }
            });
        }
        for (shard, e) in st.shards.iter().enumerate() {
            if e.owner.as_deref() != Some(inner.name.as_str()) {
                continue;
            }
            let ShardState::Moving { to } = &e.state else { continue };
            let key = (shard as u32, e.epoch);
            if inner.handoffs.lock().unwrap_or_else(|e| e.into_inner()).insert(key) {
                let (inner2, to) = (inner.clone(), to.clone());
                inner.tasks.spawn(async move {
                    hand_off(&inner2, key.0, key.1, &to).await;
                    inner2.handoffs.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                });
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = inner.cancel.cancelled() => return,
        }
    }
}

/// Whether the shard is still moving from this node to `to` at `epoch`.
fn still_moving(st: &MetaState, me: &str, shard: u32, epoch: u64, to: &str) -> bool {
    st.shards.get(shard as usize).is_some_and(|e| {
        e.epoch == epoch
            && e.owner.as_deref() == Some(me)
            && matches!(&e.state, ShardState::Moving { to: t } if t == to)
    })
}

async fn hand_off(inner: &Arc<Inner>, shard: u32, epoch: u64, to: &str) {
    let started = Instant::now();
    let count = inner.state.borrow().shard_count;
    let n = inner.host.passivate_where(|k| shard_of(k, count) == shard).await;
    info!(shard, epoch, to, agents = n, "handing a shard over");
    let retry = Duration::from_millis(HANDOFF_RETRY_MS);
    loop {
        if inner.cancel.is_cancelled() || !still_moving(&inner.state.borrow(), &inner.name, shard, epoch, to) {
            return;
        }
        match step(inner, shard, epoch, to, count).await {
            Ok(()) => break,
            Err(e) => warn!(shard, epoch, to, error = %e, "hand-off step failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = inner.cancel.cancelled() => return,
        }
    }
    info!(shard, epoch, to, took_ms = started.elapsed().as_millis() as u64, "shard handed over");
}

/// Copies the state (unless storage is shared) and reports to the leader.
async fn step(inner: &Arc<Inner>, shard: u32, epoch: u64, to: &str, count: u32) -> Result<(), String> {
    let timeout = Duration::from_millis(inner.meta_cfg.rpc_timeout_ms);
    // A page may make the receiver scan its store (page 0): allow more than one RPC's time.
    let page_timeout = Duration::from_millis(inner.cfg.handoff_timeout_ms / 4).max(timeout);
    if !inner.storage.shared() {
        let addr = {
            let st = inner.state.borrow();
            st.members.get(to).and_then(|m| m.addr.parse().ok()).ok_or(format!("no address for {to}"))?
        };
        let mut page = 0u32;
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut after: Option<Key> = None;
        loop {
            let keys = inner.storage.scan_keys(after.as_ref(), SCAN_READ_MAX).await.map_err(|e| e.to_string())?;
            let done = keys.len() < SCAN_READ_MAX;
            after = keys.last().cloned();
            for key in keys.into_iter().filter(|k| shard_of(k, count) == shard) {
                let item = export(inner, key).await?;
                bytes += item.value.as_ref().map_or(0, Vec::len) + item.entries.iter().map(Vec::len).sum::<usize>();
                items.push(item);
                if bytes >= TRANSFER_PAGE_BYTES_MAX {
                    send_page(inner, addr, shard, epoch, page, std::mem::take(&mut items), page_timeout).await?;
                    page += 1;
                    bytes = 0;
                }
            }
            if done {
                break;
            }
        }
        // The last page (page 0 when the shard is empty, so the receiver still drops stale state).
        if !items.is_empty() || page == 0 {
            send_page(inner, addr, shard, epoch, page, items, page_timeout).await?;
        }
    }
    report(inner, shard, epoch).await
}

async fn export(inner: &Inner, key: Key) -> Result<TransferItem, String> {
    let value = inner.storage.get(&key).await.map_err(|e| e.to_string())?.map(|v| v.value.to_vec());
    let mut entries = Vec::new();
    loop {
        let batch =
            inner.storage.entries(&key, entries.len() as u64, ENTRIES_READ_MAX).await.map_err(|e| e.to_string())?;
        let n = batch.len();
        entries.extend(batch.into_iter().map(|b| b.to_vec()));
        if n < ENTRIES_READ_MAX {
            break;
        }
    }
    Ok(TransferItem { ty: key.ty, id: key.id, value, entries })
}

async fn send_page(
    inner: &Inner,
    addr: std::net::SocketAddr,
    shard: u32,
    epoch: u64,
    page: u32,
    items: Vec<TransferItem>,
    timeout: Duration,
) -> Result<(), String> {
    let req = ControlReq::Transfer(TransferPage { shard, epoch, page, items });
    match mraft::ask(&inner.transport, addr, &req, timeout).await? {
        ControlReply::Transfer(r) => r,
        other => Err(format!("unexpected transfer reply {other:?}")),
    }
}

/// Asks the leader to complete the move.
async fn report(inner: &Arc<Inner>, shard: u32, epoch: u64) -> Result<(), String> {
    match super::control::to_leader(inner, ControlReq::HandedOff { shard, epoch }).await? {
        ControlReply::HandedOff(r) => r,
        other => Err(format!("unexpected hand-off reply {other:?}")),
    }
}

/// Whether a page for (shard, epoch) may still be written here: the shard has not moved past
/// that epoch, and this node does not serve it yet (a late page must not overwrite what the new
/// owner wrote since).
fn import_allowed(inner: &Inner, shard: u32, epoch: u64) -> Result<u32, String> {
    let st = inner.state.borrow();
    let e = st.shards.get(shard as usize).ok_or(format!("no shard {shard}"))?;
    if epoch < e.epoch {
        return Err(format!("stale transfer: shard {shard} is at epoch {}, not {epoch}", e.epoch));
    }
    if e.owner.as_deref() == Some(inner.name.as_str()) && e.state == ShardState::Active {
        return Err(format!("shard {shard} is already served here"));
    }
    Ok(st.shard_count)
}

/// Receiving side of a transfer page: writes at `epoch + 1`. Imports run one at a time (a retried
/// hand-off's page 0 must not interleave with the pages of an earlier attempt).
pub(super) async fn import(inner: &Inner, page: TransferPage) -> Result<(), String> {
    let _one = inner.imports.lock().await;
    let count = import_allowed(inner, page.shard, page.epoch)?;
    let fence = Fence { shard: page.shard, epoch: page.epoch + 1 };
    let storage = &inner.storage;
    if page.page == 0 {
        // Drop what this node kept from an earlier ownership of the shard.
        let mut after: Option<Key> = None;
        loop {
            let keys = storage.scan_keys(after.as_ref(), SCAN_READ_MAX).await.map_err(|e| e.to_string())?;
            let done = keys.len() < SCAN_READ_MAX;
            after = keys.last().cloned();
            for key in keys.into_iter().filter(|k| shard_of(k, count) == page.shard) {
                import_allowed(inner, page.shard, page.epoch)?;
                let rev = storage.get(&key).await.map_err(|e| e.to_string())?.map_or(0, |v| v.revision);
                storage.delete(&key, rev, fence).await.map_err(|e| e.to_string())?;
            }
            if done {
                break;
            }
        }
    }
    for item in page.items {
        import_allowed(inner, page.shard, page.epoch)?;
        let key = Key::new(item.ty, item.id);
        if shard_of(&key, count) != page.shard {
            return Err(format!("{key:?} is not in shard {}", page.shard));
        }
        if let Some(v) = item.value {
            let rev = storage.get(&key).await.map_err(|e| e.to_string())?.map_or(0, |v| v.revision);
            storage.put(&key, v.into(), rev, fence).await.map_err(|e| e.to_string())?;
        }
        if !item.entries.is_empty() {
            let entries = item.entries.into_iter().map(bytes::Bytes::from).collect();
            storage.append(&key, entries, 0, fence).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
