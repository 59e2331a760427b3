//! Reacting to the shard table: giving shards up, and handing them over in a planned move.
//!
//! On every change of the table each node:
//! - passivates its agents in shards it no longer owns (their state is stored; with shared storage
//!   a late write is fenced by the new owner's epoch anyway);
//! - for each shard it owns that is `Moving { to }`, runs one hand-off: the gate already refuses new
//!   work for the shard, so it passivates the shard's agents (in-flight work finishes and is
//!   stored), then asks the leader to complete the move. Nothing is copied: with node-local
//!   storage the target is an in-sync replica, which got every write before it was acknowledged
//!   ([`super::replica`]); shared storage needs no copy. Failures are retried until the table
//!   changes (the leader aborts a move that takes longer than `handoff_timeout_ms`, or whose
//!   target fell out of sync);
//! - hands the table to replication ([`super::replica::Replication::on_table`]): opening shards it
//!   now owns, catching up replicas.
//!
//! What to do is decided by [`engine::Handoffs`] (golden scripts in `testscripts/`); this module
//! runs it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::protocol::ControlError;
use super::Inner;
use crate::cluster::protocol::{ControlReply, ControlReq};
use crate::placement::shard_of;

pub(crate) mod engine;
use engine::{HandoffCmd, HandoffInput};

/// Follows the table: does what [`engine::Handoffs::on_table`] asks of each new one, and hands
/// it to replication ([`super::replica::Replication::on_table`]).
pub(super) async fn watch_table(inner: Arc<Inner>) {
    let mut rx = inner.state.clone();
    loop {
        let st = rx.borrow_and_update().clone();
        inner.repl.on_table(&st);
        let cmds = lock(&inner).on_table(&st);
        for cmd in cmds {
            match cmd {
                HandoffCmd::Passivate(lost) => {
                    let (count, host) = (st.shard_count, inner.host.clone());
                    inner.tasks.spawn(async move {
                        let n = host.passivate_where(|k| lost.contains(&shard_of(k, count))).await;
                        if n > 0 {
                            debug!(agents = n, "passivated agents of shards given up");
                        }
                    });
                }
                HandoffCmd::Start { shard, epoch, to } => {
                    let inner2 = inner.clone();
                    inner.tasks.spawn(async move { hand_off(&inner2, shard, epoch, &to).await });
                }
                other => warn!(cmd = ?other, "a hand-off step outside a hand-off"),
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = inner.cancel.cancelled() => return,
        }
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, engine::Handoffs> {
    inner.handoffs.lock().unwrap_or_else(|e| e.into_inner())
}

/// One hand-off: passivates the shard's agents, then reports to the leader until the engine
/// says it is over.
async fn hand_off(inner: &Arc<Inner>, shard: u32, epoch: u64, to: &str) {
    let started = Instant::now();
    let count = inner.state.borrow().shard_count;
    let n = inner.host.passivate_where(|k| shard_of(k, count) == shard).await;
    info!(shard, epoch, to, agents = n, "handing a shard over");
    let mut input = HandoffInput::Passivated;
    loop {
        let cmd = {
            let st = inner.state.borrow().clone();
            lock(inner).step(&st, shard, epoch, input)
        };
        input = match cmd {
            // Nothing to copy: the target is an in-sync replica (node-local storage; writes
            // reached it before they were acknowledged) or every node sees the store (shared).
            HandoffCmd::Report { .. } => match report(inner, shard, epoch).await {
                Ok(()) => HandoffInput::Reported { ok: true },
                Err(e) => {
                    warn!(shard, epoch, to, error = %e, "hand-off step failed; retrying");
                    HandoffInput::Reported { ok: false }
                }
            },
            HandoffCmd::Retry { after_ms, .. } => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(after_ms)) => HandoffInput::Resume,
                    _ = inner.cancel.cancelled() => return,
                }
            }
            HandoffCmd::Done { reported, .. } => {
                if reported {
                    info!(shard, epoch, to, took_ms = started.elapsed().as_millis() as u64, "shard handed over");
                }
                return;
            }
            other => {
                warn!(cmd = ?other, "not a hand-off step");
                return;
            }
        };
    }
}

/// Asks the leader to complete the move.
async fn report(inner: &Arc<Inner>, shard: u32, epoch: u64) -> Result<(), ControlError> {
    match super::control::to_leader(inner, ControlReq::HandedOff { shard, epoch }).await? {
        ControlReply::HandedOff(r) => r,
        other => Err(ControlError::Protocol(format!("unexpected hand-off reply {other:?}"))),
    }
}
