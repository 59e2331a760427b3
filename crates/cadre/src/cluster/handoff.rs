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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::protocol::ControlError;
use super::Inner;
use crate::meta::raft::{ControlReply, ControlReq};
use crate::meta::{MetaState, ShardState};
use crate::placement::shard_of;

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
        inner.repl.on_table(&st);
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
        // Nothing to copy: the target is an in-sync replica (node-local storage; writes reached
        // it before they were acknowledged) or every node sees the store (shared).
        match report(inner, shard, epoch).await {
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

/// Asks the leader to complete the move.
async fn report(inner: &Arc<Inner>, shard: u32, epoch: u64) -> Result<(), ControlError> {
    match super::control::to_leader(inner, ControlReq::HandedOff { shard, epoch }).await? {
        ControlReply::HandedOff(r) => r,
        other => Err(ControlError::Protocol(format!("unexpected hand-off reply {other:?}"))),
    }
}
