//! Middleware: hooks around publish and dispatch ([`Middleware`]), and the budget each call runs
//! under.
//!
//! A call over `middleware_budget_ms`, or one that panics, counts as a rejection before publish
//! (the signal is refused) and before dispatch (that subscriber is skipped); after dispatch it is
//! abandoned. Every such case is counted (`middleware_over_budget{stage}`).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Inner, Outcome, SubId};
use crate::metrics::label;
use crate::signal::Signal;

/// A middleware's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Continue,
    /// Before publish: refuse the signal. Before dispatch: skip this subscriber.
    Reject(String),
}

/// The subscription a dispatch middleware sees.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The subscription's id.
    pub id: SubId,
    /// Its pattern.
    pub pattern: &'a str,
}

/// Hooks around publish and dispatch. Each call gets the node's `middleware_budget_ms`.
pub trait Middleware: Send + Sync + 'static {
    /// The name shown in rejections and metrics.
    fn name(&self) -> &str;
    /// Before a signal is published on this node (also for signals from other nodes): a
    /// rejection refuses it ([`PublishError::Rejected`](super::PublishError::Rejected)).
    fn before_publish<'a>(&'a self, _signal: &'a Signal) -> BoxFuture<'a, Verdict> {
        futures::future::ready(Verdict::Continue).boxed()
    }
    /// Before a signal is delivered to one subscription: a rejection skips that subscription.
    fn before_dispatch<'a>(&'a self, _signal: &'a Signal, _target: Target<'a>) -> BoxFuture<'a, Verdict> {
        futures::future::ready(Verdict::Continue).boxed()
    }
    /// After a delivery to one subscription, with how it ended.
    fn after_dispatch<'a>(
        &'a self,
        _signal: &'a Signal,
        _target: Target<'a>,
        _outcome: &'a Outcome,
    ) -> BoxFuture<'a, ()> {
        futures::future::ready(()).boxed()
    }
}

impl Verdict {
    pub(super) fn rejection(self) -> Option<String> {
        match self {
            Verdict::Continue => None,
            Verdict::Reject(reason) => Some(reason),
        }
    }
}

/// Runs a middleware call within the budget; over budget or a panic is a rejection.
/// The future is polled (so even its synchronous start runs) inside the panic guard.
pub(super) async fn budgeted(
    inner: &Inner,
    stage: &'static str,
    fut: impl std::future::Future<Output = Verdict>,
) -> Verdict {
    let budget = Duration::from_millis(inner.cfg.middleware_budget_ms);
    match tokio::time::timeout(budget, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", stage)).inc();
            Verdict::Reject("middleware panicked".into())
        }
        Err(_) => {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", stage)).inc();
            Verdict::Reject(format!("middleware exceeded its {}ms budget", budget.as_millis()))
        }
    }
}
