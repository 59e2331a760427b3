//! A catch-up job, step by step: the engine says what to do next ([`SyncCmd`]), the runner does
//! it and feeds the outcome back ([`SyncInput`]), one input for each command.
//!
//! A job brings one out-of-sync replica of a shard this node owns up to date, in attempts:
//! 1. an attempt begins at the replica's generation ([`Engine::begin_attempt`]) and copies the
//!    shard page by page, each page on the shard's page turn; between pages it waits for the
//!    node's catch-up bandwidth (shared by every job of the node, `replica_sync_bytes_per_s`);
//! 2. with every key there, it takes the page turn (no write goes), requires the replica for
//!    every write from then on, and asks the leader to mark it in sync at that generation;
//! 3. committed: the job is over. Refused by the metadata (a newer generation, another epoch):
//!    the mark can never apply. Outcome unknown (no answer): the mark may still commit, so the
//!    replica stays required, and before anything else the job commits an out-of-sync mark
//!    ([`SyncCmd::Settle`]), which makes the old mark void (a new generation).
//!
//! A failed attempt (a page not sent, a forwarded write that failed, a mark not committed)
//! pauses the job ([`SyncCmd::Retry`], 200 ms doubling to 3.2 s) and the next [`SyncInput::Go`]
//! begins again, unless the table no longer wants the replica caught up by this node at that
//! epoch: then the job ends. The engine has no clock: pacing reads the runner's monotonic
//! clock from the input that needs it.

use super::{mark_outcome_known, Engine, RETRY_MS, RETRY_MS_MAX};
use crate::meta::MetaState;
use crate::storage::Key;

/// What a catch-up job is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyncInput {
    /// Begin, or begin again after a pause.
    Go,
    /// The page reached the replica: `keys` keys and `bytes` bytes of state, up to `through`
    /// (`None`: the last key). `now_us`: the runner's monotonic clock, in microseconds.
    PageSent { keys: u64, bytes: u64, through: Option<Key>, now_us: u64 },
    /// Reading the page, sending it or the replica's answer failed.
    PageFailed,
    /// The pacing wait is over.
    Paced,
    /// The runner holds the shard's page turn: no write goes until the mark's answer.
    Turn,
    /// The in-sync mark's outcome.
    Marked(MarkOutcome),
    /// The out-of-sync mark that settles a pending in-sync one committed (or not).
    Settled { ok: bool },
}

/// How asking for the in-sync mark ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkOutcome {
    Committed,
    /// The metadata refused it: it can never apply.
    Refused,
    /// No answer: it may still commit.
    Unknown,
}

/// What a catch-up job asks the runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyncCmd {
    /// Read the shard's page after `after` (`None`: from its first key) and send it to the
    /// replica, on the shard's page turn; answer `PageSent` or `PageFailed`.
    Page { after: Option<Key> },
    /// Wait this long for the node's catch-up bandwidth; answer `Paced`.
    Pace { wait_us: u64 },
    /// Take the shard's page turn and keep it until the mark's answer; answer `Turn`.
    TakeTurn,
    /// Ask the leader to mark the replica in sync at `generation` and wait (bounded) to see it
    /// in the table; release the turn; answer `Marked`.
    Mark { generation: u64 },
    /// Ask the leader to mark the replica out of sync; answer `Settled`.
    Settle,
    /// Answer `Go` after this long.
    Retry { after_ms: u64 },
    /// The job is over; `caught_up`: the replica was marked in sync.
    Done { caught_up: bool },
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncStep {
    Paused,
    Paging,
    Pacing,
    /// Waiting for the page turn to ask for the mark.
    Turning,
    Marking,
    Settling,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CatchUp {
    pub(super) epoch: u64,
    pub(super) step: SyncStep,
    pub(super) retry_ms: u64,
}

impl Engine {
    /// One input of the catch-up of `to` for `shard` at `epoch`; returns what to do next.
    pub(crate) fn catch_up_step(
        &mut self,
        st: &MetaState,
        shard: u32,
        epoch: u64,
        to: &str,
        input: SyncInput,
    ) -> SyncCmd {
        let key = (shard, to.to_string());
        let step = self.catch_ups.get(&key).map_or(SyncStep::Paused, |c| c.step);
        match (step, input) {
            (SyncStep::Paused, SyncInput::Go) => self.go(st, shard, epoch, to),
            (SyncStep::Paging, SyncInput::PageSent { keys, bytes, through, now_us }) => {
                if self.page_sent(shard, to, keys, bytes, through.clone()).is_err() {
                    return self.attempt_failed(st, shard, epoch, to);
                }
                if through.is_none() {
                    return self.set_sync_step(&key, SyncStep::Turning, SyncCmd::TakeTurn);
                }
                if self.broken(shard, to) {
                    // A forwarded write failed: the rest of this attempt would be wasted.
                    return self.attempt_failed(st, shard, epoch, to);
                }
                let wait_us = self.pace(bytes, now_us);
                self.set_sync_step(&key, SyncStep::Pacing, SyncCmd::Pace { wait_us })
            }
            (SyncStep::Paging, SyncInput::PageFailed) => self.attempt_failed(st, shard, epoch, to),
            (SyncStep::Pacing, SyncInput::Paced) => {
                if !self.wants_sync(st, shard, epoch, to) {
                    return self.finish_sync(shard, to, false);
                }
                let after = self.syncs.get(&key).and_then(|p| p.through.clone());
                self.set_sync_step(&key, SyncStep::Paging, SyncCmd::Page { after })
            }
            (SyncStep::Turning, SyncInput::Turn) => match self.syncs.get(&key).map(|p| p.generation) {
                Some(generation) if self.require(shard, to) => {
                    self.set_sync_step(&key, SyncStep::Marking, SyncCmd::Mark { generation })
                }
                _ => self.attempt_failed(st, shard, epoch, to),
            },
            (SyncStep::Marking, SyncInput::Marked(outcome)) => match outcome {
                // The attempt stays (required) until the table shows the mark: `on_table` drops it.
                MarkOutcome::Committed => {
                    self.catch_ups.remove(&key);
                    SyncCmd::Done { caught_up: true }
                }
                MarkOutcome::Refused => {
                    // Settling it as if its outcome were unknown would commit an out-of-sync
                    // mark, a new generation, and the next attempt's mark could be refused alike.
                    self.mark_settled(shard, to);
                    self.attempt_failed(st, shard, epoch, to)
                }
                MarkOutcome::Unknown => self.attempt_failed(st, shard, epoch, to),
            },
            (SyncStep::Settling, SyncInput::Settled { ok }) => {
                if ok {
                    // Committed: the old mark cannot apply any more.
                    self.mark_settled(shard, to);
                }
                self.pause_sync(&key)
            }
            (step, input) => {
                debug_assert!(false, "catch-up of {to} for shard {shard}: {input:?} at {step:?}");
                self.attempt_failed(st, shard, epoch, to)
            }
        }
    }

    /// Begins an attempt, after settling a pending mark; or ends the job.
    fn go(&mut self, st: &MetaState, shard: u32, epoch: u64, to: &str) -> SyncCmd {
        let key = (shard, to.to_string());
        if !self.wants_sync(st, shard, epoch, to) {
            return self.finish_sync(shard, to, false);
        }
        let retry_ms = self.catch_ups.get(&key).map_or(RETRY_MS, |c| c.retry_ms);
        self.catch_ups.insert(key.clone(), CatchUp { epoch, step: SyncStep::Paused, retry_ms });
        if self.unsettled_mark(st, shard, epoch, to) {
            return self.set_sync_step(&key, SyncStep::Settling, SyncCmd::Settle);
        }
        match self.begin_attempt(st, shard, epoch, to) {
            Ok(_) => self.set_sync_step(&key, SyncStep::Paging, SyncCmd::Page { after: None }),
            Err(_) => self.pause_sync(&key),
        }
    }

    /// Whether an in-sync mark was asked for and the table does not show its outcome.
    fn unsettled_mark(&self, st: &MetaState, shard: u32, epoch: u64, to: &str) -> bool {
        self.pending_mark(shard, to).is_some_and(|generation| !mark_outcome_known(st, shard, epoch, to, generation))
    }

    /// An attempt failed: settle its mark first if its outcome is unknown, else pause.
    fn attempt_failed(&mut self, st: &MetaState, shard: u32, epoch: u64, to: &str) -> SyncCmd {
        let key = (shard, to.to_string());
        if !self.catch_ups.contains_key(&key) {
            self.catch_ups.insert(key.clone(), CatchUp { epoch, step: SyncStep::Paused, retry_ms: RETRY_MS });
        }
        if self.unsettled_mark(st, shard, epoch, to) {
            return self.set_sync_step(&key, SyncStep::Settling, SyncCmd::Settle);
        }
        self.drop_progress(shard, to);
        self.pause_sync(&key)
    }

    fn set_sync_step(&mut self, key: &(u32, String), step: SyncStep, cmd: SyncCmd) -> SyncCmd {
        if let Some(c) = self.catch_ups.get_mut(key) {
            c.step = step;
        }
        cmd
    }

    fn pause_sync(&mut self, key: &(u32, String)) -> SyncCmd {
        let Some(c) = self.catch_ups.get_mut(key) else { return SyncCmd::Done { caught_up: false } };
        c.step = SyncStep::Paused;
        let after_ms = c.retry_ms;
        c.retry_ms = (c.retry_ms * 2).min(RETRY_MS_MAX);
        SyncCmd::Retry { after_ms }
    }

    fn finish_sync(&mut self, shard: u32, to: &str, caught_up: bool) -> SyncCmd {
        self.drop_progress(shard, to);
        self.catch_ups.remove(&(shard, to.to_string()));
        SyncCmd::Done { caught_up }
    }

    /// How long to wait before the next page after `bytes` were sent at `now_us`: the node's
    /// catch-up bandwidth is one budget shared by its jobs.
    fn pace(&mut self, bytes: u64, now_us: u64) -> u64 {
        let cost_us = bytes.saturating_mul(1_000_000) / self.sync_bytes_per_s.max(1);
        let start_us = self.bandwidth_next_us.max(now_us);
        self.bandwidth_next_us = start_us.saturating_add(cost_us);
        self.bandwidth_next_us - now_us
    }
}
