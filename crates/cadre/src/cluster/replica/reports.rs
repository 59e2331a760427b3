//! Replica reports: the owner's marks of replicas in and out of sync, on their way to the leader.
//!
//! Writes that missed a replica, openings and catch-ups ask for a mark through
//! [`Replication::report`]; the mark waits in one queue per node and [`report_loop`] sends what
//! queued up as one batch (one log entry), identical reports once, while the caller waits for its
//! outcome. Batched because a replica lost under load otherwise costs one Raft entry per write in
//! flight to it. Its own file: the write path and the catch-up runner only call `report`.
//!
//! Caveats: the queue is bounded (`REPORT_QUEUE_LEN_MAX`) and a full one fails the report at once
//! (`ReportsFull`); one batch is out at a time, so a slow leader holds up the next one; a batch
//! the leader does not take fails every report in it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::{Replication, SyncError};
use crate::cluster::control;
use crate::cluster::protocol::ControlError;
use crate::cluster::protocol::{ControlReply, ControlReq, ReplicaReport};
use crate::meta::BATCH_CMDS_MAX;

/// A replica report waiting to be sent, and who waits for its outcome.
pub(super) struct PendingReport {
    report: ReplicaReport,
    done: oneshot::Sender<Result<(), SyncError>>,
}

impl Replication {
    /// Asks the leader to mark `node` in or out of sync for `shard` at `epoch` (through the
    /// report queue: batched with other shards' reports, one log entry per batch).
    pub(super) async fn report(
        &self,
        shard: u32,
        epoch: u64,
        node: &str,
        in_sync: bool,
        generation: u64,
    ) -> Result<(), SyncError> {
        let (done, outcome) = oneshot::channel();
        let report = ReplicaReport { shard, epoch, node: node.to_string(), in_sync, generation };
        self.reports.try_send(PendingReport { report, done }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SyncError::ReportsFull,
            mpsc::error::TrySendError::Closed(_) => SyncError::ShuttingDown,
        })?;
        outcome.await.map_err(|_| SyncError::ShuttingDown)??;
        if in_sync {
            self.metrics.synced.inc();
        } else {
            self.metrics.marked_out.inc();
            info!(shard, epoch, replica = node, "replica marked out of sync");
        }
        Ok(())
    }

    /// Sends one batch of reports to the leader: the batch's outcome, or one result per report.
    async fn send_reports(&self, reports: Vec<ReplicaReport>) -> Result<Vec<Result<(), SyncError>>, SyncError> {
        let inner = self.cluster().ok_or(SyncError::ShuttingDown)?;
        let len = reports.len();
        let protocol = |what: String| SyncError::Control(ControlError::Protocol(what));
        match control::to_leader(&inner, ControlReq::Replicas(reports)).await.map_err(SyncError::Control)? {
            ControlReply::Replicas(Ok(results)) if results.len() == len => {
                Ok(results.into_iter().map(|r| r.map_err(SyncError::Meta)).collect())
            }
            ControlReply::Replicas(Ok(_)) => Err(protocol("a result per report was expected".into())),
            ControlReply::Replicas(Err(e)) => Err(SyncError::Control(e)),
            other => Err(protocol(format!("unexpected reply {other:?}"))),
        }
    }
}

/// Sends queued reports to the leader, one batch at a time: what queues up while a batch is out
/// goes in the next one, identical reports once.
pub(super) async fn report_loop(
    repl: Arc<Replication>,
    mut rx: mpsc::Receiver<PendingReport>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = cancel.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_CMDS_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Identical reports share one command (and one outcome).
        let mut unique: Vec<ReplicaReport> = Vec::new();
        let mut waiters: Vec<Vec<oneshot::Sender<Result<(), SyncError>>>> = Vec::new();
        let mut index: HashMap<ReplicaReport, usize> = HashMap::new();
        for PendingReport { report, done } in batch {
            let i = *index.entry(report.clone()).or_insert_with(|| {
                unique.push(report);
                waiters.push(Vec::new());
                unique.len() - 1
            });
            waiters[i].push(done);
        }
        let outcome = tokio::select! {
            o = repl.send_reports(unique) => o,
            _ = cancel.cancelled() => return,
        };
        for (i, done) in waiters.into_iter().enumerate() {
            let result = match &outcome {
                Ok(results) => results[i].clone(),
                Err(e) => Err(e.clone()),
            };
            for d in done {
                let _ = d.send(result.clone());
            }
        }
    }
}
