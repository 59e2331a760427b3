//! The owner side's jobs as the [`engine`] decides them: opening a shard, catching a replica up.
//!
//! [`Replication::open`] runs the steps of an opening (fence the local store, mark or fence the
//! replicas, retry) and feeds their outcomes back to the engine; [`Replication::catch_up`] copies
//! the shard to one replica page by page on the shard's gate, at the node's catch-up bandwidth,
//! then asks for the in-sync mark and settles a mark whose outcome it never learned. These run as
//! tasks spawned from `on_table` (in `mod.rs`); they share only the gate, `ask` and the report
//! queue with the write path, so they live apart from it.
//!
//! Caveats: a page scans the store from its last key (the store is not laid out by shard), so a
//! catch-up of every shard costs one pass over the store per shard; one key's state and entries
//! must fit in one frame (else the attempt fails `TooLarge`); a failed attempt starts over, with
//! delays doubling up to [`RETRY_MS_MAX`], until the table stops asking for it or the node stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::engine::{self, OpenCmd, OpenInput, Turn, RETRY_MS, RETRY_MS_MAX};
use super::{encode_req, Replication, SyncError, SYNC_PAGE_BYTES_MAX};
use crate::cluster::protocol::{ReplicaOp, ReplicaReq, TransferItem};
use crate::placement::shard_of;
use crate::storage::{Fence, Key, Storage, StorageError, ENTRIES_READ_MAX, SCAN_READ_MAX};

impl Replication {
    /// Opens `shard` at `epoch`: runs the steps the engine's opening asks for and feeds their
    /// outcomes back, until it is done.
    pub(super) async fn open(self: Arc<Self>, shard: u32, epoch: u64) {
        let mut inputs = std::collections::VecDeque::from([OpenInput::Go]);
        while let Some(input) = inputs.pop_front() {
            let cmds = {
                let st = self.state.borrow().clone();
                self.engine().open_step(&st, shard, epoch, input)
            };
            let mut fences = Vec::new();
            for cmd in cmds {
                match cmd {
                    OpenCmd::FenceLocal => {
                        let fenced = self.local.fence(Fence { shard, epoch }).await;
                        if let Err(e) = &fenced {
                            warn!(shard, epoch, error = %e, "cannot fence the local store; retrying");
                        }
                        inputs.push_back(OpenInput::LocalFenced { ok: fenced.is_ok() });
                    }
                    OpenCmd::Report { node } => {
                        let reported = self.report(shard, epoch, &node, false, 0).await;
                        if let Err(e) = &reported {
                            warn!(shard, epoch, replica = %node, error = %e, "cannot open the shard yet; retrying");
                        }
                        inputs.push_back(OpenInput::Reported { node, ok: reported.is_ok() });
                    }
                    OpenCmd::FenceReplica { node, addr } => fences.push((node, addr)),
                    OpenCmd::Retry { after_ms } => {
                        if !self.pause(Duration::from_millis(after_ms)).await {
                            return;
                        }
                        inputs.push_back(OpenInput::Go);
                    }
                    OpenCmd::Done { opened } => {
                        if opened {
                            debug!(shard, epoch, "shard opened");
                        }
                        return;
                    }
                }
            }
            inputs.extend(self.fence_replicas(shard, epoch, fences).await);
        }
    }

    /// Asks `replicas` to fence their stores at `epoch`, all at once.
    async fn fence_replicas(&self, shard: u32, epoch: u64, replicas: Vec<(String, SocketAddr)>) -> Vec<OpenInput> {
        let payload = encode_req(&ReplicaReq { shard, epoch, op: ReplicaOp::Fence });
        let timeout = Duration::from_millis(self.cfg.replica_write_timeout_ms);
        let asks = replicas.iter().map(|(_, addr)| self.ask(*addr, payload.clone(), timeout));
        let results = futures::future::join_all(asks).await;
        let answers = replicas.into_iter().zip(results).map(|((node, _), r)| {
            if let Err(e) = &r {
                debug!(shard, epoch, replica = %node, error = %e, "replica not fenced");
            }
            OpenInput::ReplicaFenced { node, ok: r.is_ok() }
        });
        answers.collect()
    }

    /// Waits `delay`; `false` when the node is stopping.
    async fn pause(&self, delay: Duration) -> bool {
        let Some(inner) = self.cluster() else { return false };
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = inner.cancel.cancelled() => false,
        }
    }

    /// Copies the shard to `to` page by page, then marks it in sync; starts over after a failure,
    /// until the table no longer asks for it.
    pub(super) async fn catch_up(self: Arc<Self>, shard: u32, epoch: u64, to: String) {
        let mut retry = Backoff::new();
        let started = Instant::now();
        loop {
            if !self.wants_sync(shard, epoch, &to) {
                break;
            }
            let Some(inner) = self.cluster() else { return };
            // A stopping node ends its catch-ups at once (queued ones would otherwise each run an
            // attempt against possibly dead replicas, holding up the shutdown).
            let attempt = tokio::select! {
                a = async {
                    let _turn = self.catch_ups.acquire().await.ok()?;
                    if !self.wants_sync(shard, epoch, &to) {
                        return None;
                    }
                    Some(self.sync_once(shard, epoch, &to).await)
                } => a,
                _ = inner.cancel.cancelled() => return,
            };
            drop(inner);
            let Some(attempt) = attempt else { break };
            match attempt {
                Ok(true) => {
                    // The entry stays (required) until the table shows the mark: `on_table` drops it.
                    let (keys, bytes) = self.engine().progress(shard, &to).unwrap_or_default();
                    let took_ms = started.elapsed().as_millis() as u64;
                    debug!(shard, epoch, to = %to, keys, bytes, took_ms, "replica caught up");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(shard, epoch, to = %to, error = %e, "replica catch-up failed; starting over"),
            }
            if !self.settle_pending_mark(shard, epoch, &to).await {
                return;
            }
            self.engine().drop_progress(shard, &to);
            if !self.pause(retry.next()).await {
                return;
            }
        }
        self.engine().drop_progress(shard, &to);
    }

    /// After an attempt whose in-sync mark has an unknown outcome: commits `ReplicaOutOfSync`
    /// (a new generation, so the mark can no longer apply), retrying until it is committed or the
    /// table moved on. `false` when the node is stopping.
    async fn settle_pending_mark(&self, shard: u32, epoch: u64, to: &str) -> bool {
        let Some(generation) = self.engine().pending_mark(shard, to) else {
            return true;
        };
        let mut retry = Backoff::new();
        loop {
            if engine::mark_outcome_known(&self.state.borrow(), shard, epoch, to, generation) {
                return true;
            }
            match self.report(shard, epoch, to, false, 0).await {
                Ok(()) => {
                    // Committed: the old mark cannot apply any more.
                    self.engine().mark_settled(shard, to);
                    return true;
                }
                Err(e) => warn!(shard, epoch, to, error = %e, "cannot settle a pending in-sync mark; retrying"),
            }
            if !self.pause(retry.next()).await {
                return false;
            }
        }
    }

    /// Whether the table still wants `to` caught up for `shard` at `epoch` by this node.
    fn wants_sync(&self, shard: u32, epoch: u64, to: &str) -> bool {
        let st = self.state.borrow();
        self.engine().wants_sync(&st, shard, epoch, to)
    }

    /// One attempt: `Ok(true)` once the replica is marked in sync, `Ok(false)` when a forwarded
    /// write failed meanwhile (start over).
    async fn sync_once(&self, shard: u32, epoch: u64, to: &str) -> Result<bool, SyncError> {
        let generation = {
            let st = self.state.borrow().clone();
            self.engine().begin_attempt(&st, shard, epoch, to)?
        };
        // Writes of the shard wait while a page is out: a replica that does not answer costs them
        // this much once, then the attempt starts over later. A busy replica (its lanes behind
        // many catch-ups, each page a durable write) needs the room.
        let timeout = Duration::from_millis(
            (self.cfg.handoff_timeout_ms / 4).max(self.cfg.replica_write_timeout_ms.saturating_mul(4)),
        );
        let mut after: Option<Key> = None;
        loop {
            if !self.wants_sync(shard, epoch, to) {
                return Err(SyncError::NotWanted);
            }
            let addr = self.addr_of(to)?;
            let sent = {
                let _page = self.turn(shard, Turn::Page).await;
                let page = self.read_page(shard, after.as_ref()).await?;
                let (keys, bytes) = (page.items.len() as u64, page.bytes);
                let op = ReplicaOp::Sync {
                    after: after.as_ref().map(|k| (k.ty.clone(), k.id.clone())),
                    through: page.through.as_ref().map(|k| (k.ty.clone(), k.id.clone())),
                    items: page.items,
                };
                self.ask(addr, encode_req(&ReplicaReq { shard, epoch, op }), timeout).await?;
                self.engine().page_sent(shard, to, keys, bytes as u64, page.through.clone())?;
                self.metrics.sync_bytes.inc_by(bytes as u64);
                after = page.through;
                bytes
            };
            if after.is_none() {
                break;
            }
            if self.engine().broken(shard, to) {
                // A forwarded write failed: the rest of this attempt would be wasted.
                return Ok(false);
            }
            self.pace(sent).await;
        }
        // Every key is there, and writes forwarded since are acknowledged (their turns ended
        // before this one began): mark it in sync while no write goes, and wait to see it so the
        // next one counts it.
        // From the moment the mark is asked for it may commit, whatever this node hears back: the
        // replica is required for acknowledgements until the table shows the outcome.
        let _page = self.turn(shard, Turn::Page).await;
        if !self.engine().require(shard, to) {
            return Ok(false);
        }
        self.report(shard, epoch, to, true, generation).await?;
        let mut rx = self.state.clone();
        let seen = rx.wait_for(|st| engine::shard_entry(st, shard).is_none_or(|e| e.epoch != epoch || e.in_sync(to)));
        let limit = Duration::from_millis(self.cfg.replica_write_timeout_ms);
        // Not seen in time: still required (above), so nothing is acknowledged without it.
        let _ = tokio::time::timeout(limit, seen).await;
        Ok(true)
    }

    fn addr_of(&self, node: &str) -> Result<SocketAddr, SyncError> {
        let st = self.state.borrow();
        let addr = st.members.get(node).and_then(|m| m.addr.parse().ok());
        addr.ok_or_else(|| SyncError::NoAddress { node: node.to_string() })
    }

    /// Waits until this node's catch-up bandwidth allows `bytes` more.
    async fn pace(&self, bytes: usize) {
        let per_s = self.cfg.replica_sync_bytes_per_s.max(1);
        let cost = Duration::from_micros((bytes as u64).saturating_mul(1_000_000) / per_s);
        let until = {
            let mut next = self.bandwidth.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(until).await;
    }

    /// The shard's keys after `after`: up to [`SYNC_PAGE_BYTES_MAX`] of state, from at most one
    /// scan of [`SCAN_READ_MAX`] keys. `through` is the last key the page covers (`None`: the end).
    async fn read_page(&self, shard: u32, after: Option<&Key>) -> Result<Page, SyncError> {
        let count = self.state.borrow().shard_count;
        let keys = self.local.scan_keys(after, SCAN_READ_MAX).await?;
        let end = keys.len() < SCAN_READ_MAX;
        let page_max = self.payload_max.min(SYNC_PAGE_BYTES_MAX);
        let mut page = Page { items: Vec::new(), through: None, bytes: 0 };
        let mut last = None;
        for key in keys {
            if shard_of(&key, count) == shard {
                let item = export(&*self.local, &key).await?;
                let len = item.value.as_ref().map_or(0, Vec::len) + item.entries.iter().map(Vec::len).sum::<usize>();
                if len > self.payload_max {
                    return Err(SyncError::TooLarge { key: format!("{key:?}"), len });
                }
                // End the page before an item that would overflow it (the next page starts there).
                if page.bytes + len > page_max && !page.items.is_empty() {
                    page.through = last;
                    return Ok(page);
                }
                page.bytes += len;
                page.items.push(item);
            }
            last = Some(key);
        }
        page.through = if end { None } else { last };
        Ok(page)
    }
}

/// Retry delays: [`RETRY_MS`], doubling up to [`RETRY_MS_MAX`].
struct Backoff {
    next_ms: u64,
}

impl Backoff {
    fn new() -> Self {
        Self { next_ms: RETRY_MS }
    }

    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(self.next_ms);
        self.next_ms = (self.next_ms * 2).min(RETRY_MS_MAX);
        d
    }
}

struct Page {
    items: Vec<TransferItem>,
    through: Option<Key>,
    bytes: usize,
}

async fn export(local: &dyn Storage, key: &Key) -> Result<TransferItem, StorageError> {
    let value = local.get(key).await?.map(|v| v.value.to_vec());
    let mut entries = Vec::new();
    loop {
        let batch = local.entries(key, entries.len() as u64, ENTRIES_READ_MAX).await?;
        let n = batch.len();
        entries.extend(batch.into_iter().map(|b| b.to_vec()));
        if n < ENTRIES_READ_MAX {
            break;
        }
    }
    Ok(TransferItem { ty: key.ty.clone(), id: key.id.clone(), value, entries })
}
