//! Opening a shard, step by step: the engine says what to do next ([`OpenCmd`]), the runner does
//! it and feeds the outcome back ([`OpenInput`]).
//!
//! A node that starts to own a shard at an epoch serves it only once:
//! 1. its own store is fenced at the epoch (from epoch 2: a write of the previous owner still
//!    being applied here as a replica lands before the fence or is refused after it);
//! 2. the replicas a closed shard's writes missed are marked out of sync, one at a time;
//! 3. its in-sync replicas are fenced at the epoch, all at once; those that did not answer are
//!    marked out of sync, one at a time.
//!
//! A step that fails pauses the opening ([`OpenCmd::Retry`], 200 ms doubling to 3.2 s) and the
//! next [`OpenInput::Go`] starts again from step 1, unless the node no longer owns the shard at
//! that epoch: then the opening ends without serving it. An input that does not fit the step
//! the opening is at (a late answer) changes nothing.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::{shard_entry, Engine};
use crate::meta::MetaState;

/// The first wait after a failed step; doubled after each failure up to [`RETRY_MS_MAX`], so a
/// cluster in trouble is not flooded with retries.
pub(crate) const RETRY_MS: u64 = 200;
pub(crate) const RETRY_MS_MAX: u64 = 3200;

/// What an opening is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenInput {
    /// Begin, or begin again after a pause.
    Go,
    LocalFenced {
        ok: bool,
    },
    /// A mark out of sync committed (or not).
    Reported {
        node: String,
        ok: bool,
    },
    ReplicaFenced {
        node: String,
        ok: bool,
    },
}

/// What an opening asks the runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenCmd {
    /// Fence this node's store at the epoch; answer `LocalFenced`.
    FenceLocal,
    /// Mark `node` out of sync; answer `Reported`.
    Report { node: String },
    /// Ask `node` to fence its store at the epoch (port 0: no usable address, fails at once);
    /// answer `ReplicaFenced`. Several come together: ask them at once.
    FenceReplica { node: String, addr: SocketAddr },
    /// Answer `Go` after this long.
    Retry { after_ms: u64 },
    /// The opening is over; `opened`: the shard is served.
    Done { opened: bool },
}

/// Where an opening is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OpenStep {
    FencingLocal,
    /// Marking a closed shard's missed replicas (the first one the engine holds).
    Reporting,
    FencingReplicas {
        waiting: BTreeSet<String>,
        failed: BTreeSet<String>,
    },
    /// Marking the replicas that were not fenced (the first of `left`).
    ReportingUnfenced {
        left: BTreeSet<String>,
    },
    Paused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Opening {
    pub(super) step: OpenStep,
    pub(super) retry_ms: u64,
}

impl Engine {
    /// One input of the opening of `shard` at `epoch`; returns what to do next.
    pub(crate) fn open_step(&mut self, st: &MetaState, shard: u32, epoch: u64, input: OpenInput) -> Vec<OpenCmd> {
        let key = (shard, epoch);
        if input == OpenInput::Go {
            if !self.owns(st, shard, epoch) {
                self.openings.remove(&key);
                return vec![OpenCmd::Done { opened: false }];
            }
            let retry_ms = self.openings.get(&key).map_or(RETRY_MS, |o| o.retry_ms);
            if epoch > 1 {
                self.openings.insert(key, Opening { step: OpenStep::FencingLocal, retry_ms });
                return vec![OpenCmd::FenceLocal];
            }
            // Epoch 1 had no previous owner: no write of one to fence out.
            self.openings.insert(key, Opening { step: OpenStep::Paused, retry_ms });
            return self.after_local(st, shard, epoch);
        }
        let Some(step) = self.openings.get(&key).map(|o| o.step.clone()) else { return Vec::new() };
        match (step, input) {
            (OpenStep::FencingLocal, OpenInput::LocalFenced { ok: true }) => self.after_local(st, shard, epoch),
            (OpenStep::Reporting, OpenInput::Reported { node, ok: true }) => {
                self.reported(shard, &node);
                self.after_local(st, shard, epoch)
            }
            (OpenStep::FencingReplicas { mut waiting, mut failed }, OpenInput::ReplicaFenced { node, ok }) => {
                if !waiting.remove(&node) {
                    return Vec::new();
                }
                if !ok {
                    failed.insert(node);
                }
                if !waiting.is_empty() {
                    self.set_step(key, OpenStep::FencingReplicas { waiting, failed });
                    return Vec::new();
                }
                self.report_unfenced(st, key, failed)
            }
            (OpenStep::ReportingUnfenced { mut left }, OpenInput::Reported { node, ok: true }) => {
                if left.first() != Some(&node) {
                    return Vec::new();
                }
                left.remove(&node);
                self.report_unfenced(st, key, left)
            }
            (
                OpenStep::FencingLocal | OpenStep::Reporting | OpenStep::ReportingUnfenced { .. },
                OpenInput::LocalFenced { ok: false } | OpenInput::Reported { ok: false, .. },
            ) => self.pause(key),
            _ => Vec::new(),
        }
    }

    fn set_step(&mut self, key: (u32, u64), step: OpenStep) {
        if let Some(o) = self.openings.get_mut(&key) {
            o.step = step;
        }
    }

    /// After the local fence: the missed replicas' marks, then the replicas' fences.
    fn after_local(&mut self, st: &MetaState, shard: u32, epoch: u64) -> Vec<OpenCmd> {
        if let Some(node) = self.unreported(shard, epoch).into_iter().next() {
            self.set_step((shard, epoch), OpenStep::Reporting);
            return vec![OpenCmd::Report { node }];
        }
        let in_sync: Vec<(String, SocketAddr)> = shard_entry(st, shard)
            .map(|e| {
                e.replicas.iter().filter(|r| r.in_sync).map(|r| (r.node.clone(), super::addr_of(st, &r.node))).collect()
            })
            .unwrap_or_default();
        if in_sync.is_empty() {
            return self.finish(st, shard, epoch);
        }
        let waiting = in_sync.iter().map(|(n, _)| n.clone()).collect();
        self.set_step((shard, epoch), OpenStep::FencingReplicas { waiting, failed: BTreeSet::new() });
        in_sync.into_iter().map(|(node, addr)| OpenCmd::FenceReplica { node, addr }).collect()
    }

    /// Marks the first replica of `left` out of sync, or finishes once none is left.
    fn report_unfenced(&mut self, st: &MetaState, key: (u32, u64), left: BTreeSet<String>) -> Vec<OpenCmd> {
        match left.first().cloned() {
            Some(node) => {
                self.set_step(key, OpenStep::ReportingUnfenced { left });
                vec![OpenCmd::Report { node }]
            }
            None => self.finish(st, key.0, key.1),
        }
    }

    fn finish(&mut self, st: &MetaState, shard: u32, epoch: u64) -> Vec<OpenCmd> {
        self.openings.remove(&(shard, epoch));
        vec![OpenCmd::Done { opened: self.opened(st, shard, epoch) }]
    }

    fn pause(&mut self, key: (u32, u64)) -> Vec<OpenCmd> {
        let Some(o) = self.openings.get_mut(&key) else { return Vec::new() };
        o.step = OpenStep::Paused;
        let after_ms = o.retry_ms;
        o.retry_ms = (o.retry_ms * 2).min(RETRY_MS_MAX);
        vec![OpenCmd::Retry { after_ms }]
    }
}
