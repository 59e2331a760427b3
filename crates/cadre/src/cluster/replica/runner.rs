//! The owner side's jobs as the [`engine`] decides them: opening a shard, catching a replica up.
//!
//! [`Replication::open`] runs the steps of an opening (fence the local store, mark or fence the
//! replicas, retry) and feeds their outcomes back to the engine; [`Replication::catch_up`] runs
//! a catch-up job's steps the same way (read and send a page on the shard's gate, wait for the
//! node's catch-up bandwidth, ask for the in-sync mark, settle a mark whose outcome it never
//! learned, pause between attempts). These run as
//! tasks spawned from `on_table` (in `mod.rs`); they share only the gate, `ask` and the report
//! queue with the write path, so they live apart from it.
//!
//! Caveats: a page scans the store from its last key (the store is not laid out by shard), so a
//! catch-up of every shard costs one pass over the store per shard; one key's state and entries
//! must fit in one frame (else the attempt fails `TooLarge`); a failed attempt starts over after
//! the engine's pause, until the table stops asking for it or the node stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::engine::{self, MarkOutcome, OpenCmd, OpenInput, SyncCmd, SyncInput, Turn};
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

    /// Runs the catch-up job of `to` for `shard` at `epoch`: does what the engine's
    /// [`SyncCmd`]s ask and feeds the outcomes back, until it is done or the node stops.
    pub(super) async fn catch_up(self: Arc<Self>, shard: u32, epoch: u64, to: String) {
        let Some(cancel) = self.cluster().map(|inner| inner.cancel.clone()) else { return };
        let started = Instant::now();
        let mut input = SyncInput::Go;
        // An attempt runs under one of the node's catch-up permits (none while paused); the
        // mark is asked for on the page turn.
        let mut permit = None;
        let mut turn = None;
        loop {
            if permit.is_none() {
                // A stopping node ends its catch-ups at once (queued ones would otherwise each
                // run an attempt against possibly dead replicas, holding up the shutdown).
                permit = tokio::select! {
                    p = self.catch_ups.acquire() => match p { Ok(p) => Some(p), Err(_) => return },
                    _ = cancel.cancelled() => return,
                };
            }
            let cmd = {
                let st = self.state.borrow().clone();
                self.engine().catch_up_step(&st, shard, epoch, &to, input)
            };
            input = match cmd {
                SyncCmd::Page { after } => match self.send_page(shard, epoch, &to, after).await {
                    Ok(sent) => sent,
                    Err(e) => {
                        warn!(shard, epoch, to = %to, error = %e, "replica catch-up failed; starting over");
                        SyncInput::PageFailed
                    }
                },
                SyncCmd::Pace { wait_us } => {
                    if !self.pause(Duration::from_micros(wait_us)).await {
                        return;
                    }
                    SyncInput::Paced
                }
                SyncCmd::TakeTurn => {
                    turn = Some(self.turn(shard, Turn::Page).await);
                    SyncInput::Turn
                }
                SyncCmd::Mark { generation } => {
                    let outcome = self.mark(shard, epoch, &to, generation).await;
                    turn = None;
                    SyncInput::Marked(outcome)
                }
                SyncCmd::Settle => {
                    let settled = self.report(shard, epoch, &to, false, 0).await;
                    if let Err(e) = &settled {
                        warn!(shard, epoch, to = %to, error = %e, "cannot settle a pending in-sync mark; retrying");
                    }
                    SyncInput::Settled { ok: settled.is_ok() }
                }
                SyncCmd::Retry { after_ms } => {
                    (permit, turn) = (None, None);
                    if !self.pause(Duration::from_millis(after_ms)).await {
                        return;
                    }
                    SyncInput::Go
                }
                SyncCmd::Done { caught_up } => {
                    if caught_up {
                        let (keys, bytes) = self.engine().progress(shard, &to).unwrap_or_default();
                        let took_ms = started.elapsed().as_millis() as u64;
                        debug!(shard, epoch, to = %to, keys, bytes, took_ms, "replica caught up");
                    }
                    return;
                }
            };
            debug_assert!(turn.is_none() || input == SyncInput::Turn, "the page turn is held only to ask for the mark");
        }
    }

    /// Reads the page after `after` and sends it to `to`, on the shard's page turn.
    async fn send_page(&self, shard: u32, epoch: u64, to: &str, after: Option<Key>) -> Result<SyncInput, SyncError> {
        // Writes of the shard wait while a page is out: a replica that does not answer costs them
        // this much once, then the attempt starts over later. A busy replica (its lanes behind
        // many catch-ups, each page a durable write) needs the room.
        let timeout = Duration::from_millis(
            (self.cfg.handoff_timeout_ms / 4).max(self.cfg.replica_write_timeout_ms.saturating_mul(4)),
        );
        let addr = self.addr_of(to)?;
        let _page = self.turn(shard, Turn::Page).await;
        let page = self.read_page(shard, after.as_ref()).await?;
        let (keys, bytes) = (page.items.len() as u64, page.bytes as u64);
        let op = ReplicaOp::Sync {
            after: after.as_ref().map(|k| (k.ty.clone(), k.id.clone())),
            through: page.through.as_ref().map(|k| (k.ty.clone(), k.id.clone())),
            items: page.items,
        };
        self.ask(addr, encode_req(&ReplicaReq { shard, epoch, op }), timeout).await?;
        self.metrics.sync_bytes.inc_by(bytes);
        let now_us = self.clock_origin.elapsed().as_micros() as u64;
        Ok(SyncInput::PageSent { keys, bytes, through: page.through, now_us })
    }

    /// Asks for the in-sync mark (the caller holds the page turn: every key is there, and writes
    /// forwarded since are acknowledged), then waits to see it so the next write counts it.
    /// From the moment the mark is asked for it may commit, whatever this node hears back: the
    /// engine keeps the replica required until the table shows the outcome.
    async fn mark(&self, shard: u32, epoch: u64, to: &str, generation: u64) -> MarkOutcome {
        match self.report(shard, epoch, to, true, generation).await {
            Ok(()) => {}
            // Committed and refused by the metadata: it can never apply.
            Err(e @ SyncError::Meta(_)) => {
                warn!(shard, epoch, to, error = %e, "in-sync mark refused; starting over");
                return MarkOutcome::Refused;
            }
            Err(e) => {
                warn!(shard, epoch, to, error = %e, "in-sync mark unanswered; settling it");
                return MarkOutcome::Unknown;
            }
        }
        let mut rx = self.state.clone();
        let seen = rx.wait_for(|st| engine::shard_entry(st, shard).is_none_or(|e| e.epoch != epoch || e.in_sync(to)));
        let limit = Duration::from_millis(self.cfg.replica_write_timeout_ms);
        // Not seen in time: still required (the engine's attempt stays), so nothing is
        // acknowledged without it.
        let _ = tokio::time::timeout(limit, seen).await;
        MarkOutcome::Committed
    }

    fn addr_of(&self, node: &str) -> Result<SocketAddr, SyncError> {
        let st = self.state.borrow();
        let addr = st.members.get(node).and_then(|m| m.addr.parse().ok());
        addr.ok_or_else(|| SyncError::NoAddress { node: node.to_string() })
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
