//! Delivery: each subscription's worker task takes its queue in order and hands each signal to
//! its adapter (log, channel, function, agent, webhook), between the before- and after-dispatch
//! middleware. A delivery that fails for good becomes a [`DeadLetter`].
//!
//! One worker per subscription: signals reach a subscriber in publish order, and a slow one
//! delays only itself. Function adapters run inside a [`Context`] whose parent is the signal
//! handled, so what they publish is caused by it. Dead letters are kept encoded, bounded by count
//! and bytes, oldest out first.
//!
//! Caveat: a webhook's retries hold back the signals queued behind it (order is kept at the cost
//! of head-of-line blocking).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::middleware::budgeted;
use super::subscription::Sub;
use super::{agents, lock, read, webhook, Bus, Dispatch, Inner, SubId};
use crate::metrics::label;
use crate::signal::{Context, Signal};

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered.
    Delivered {
        /// Attempts made (1: first time).
        attempts: u32,
    },
    /// Given up (dead-lettered).
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        reason: String,
    },
}

/// A delivery that failed for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The subscription.
    pub subscription: SubId,
    /// Its dispatch, as [`Dispatch::describe`] shows it.
    pub dispatch: serde_json::Value,
    /// The last attempt's error.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was given up (RFC 3339).
    pub time: String,
    /// The structured event.
    pub signal: serde_json::Value,
}

/// Dead letters as encoded events (a `serde_json::Value` costs several times the text), bounded
/// by count and bytes.
#[derive(Default)]
pub(super) struct DeadLetters {
    items: VecDeque<(DeadLetter, Vec<u8>, usize)>,
    bytes: usize,
}

impl Bus {
    /// The dead letters kept (`signals.deadletters_len_max` at most), oldest first.
    pub fn deadletters(&self) -> Vec<DeadLetter> {
        let list = lock(&self.inner.deadletters);
        let decode = |body: &[u8]| serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        list.items.iter().map(|(d, body, _)| DeadLetter { signal: decode(body), ..d.clone() }).collect()
    }
}

/// A subscription's worker: takes its queue in order and delivers each signal.
pub(super) async fn worker(inner: Arc<Inner>, sub: Arc<Sub>) {
    loop {
        let next = {
            let mut q = sub.lock_queue();
            if q.closed || sub.cancel.is_cancelled() {
                return;
            }
            q.items.pop_front().inspect(|(_, bytes)| q.bytes -= bytes)
        };
        let Some((signal, bytes)) = next else {
            tokio::select! {
                _ = sub.notify.notified() => continue,
                _ = sub.cancel.cancelled() => return,
            }
        };
        deliver_one(&inner, &sub, signal).await;
        // Counted until delivered: the signal is held until then.
        inner.release(bytes);
    }
}

async fn deliver_one(inner: &Inner, sub: &Sub, signal: Arc<Signal>) {
    let middleware = read(&inner.middleware).clone();
    for m in middleware.iter() {
        let verdict =
            budgeted(inner, "before_dispatch", async { m.before_dispatch(&signal, sub.target()).await }).await;
        if verdict.rejection().is_some() {
            sub.counts.skipped.fetch_add(1, Ordering::Relaxed);
            sub.counts.skipped_total.inc();
            return;
        }
    }
    let outcome = match &sub.dispatch {
        Dispatch::Log => {
            info!(subscription = sub.id, id = %signal.id, ty = %signal.ty, source = %signal.source, "signal");
            Outcome::Delivered { attempts: 1 }
        }
        Dispatch::Channel(tx) => tokio::select! {
            res = tx.send(signal.clone()) => match res {
                Ok(()) => Outcome::Delivered { attempts: 1 },
                Err(_) => Outcome::Failed { attempts: 1, reason: "channel closed".into() },
            },
            _ = sub.cancel.cancelled() => Outcome::Failed { attempts: 0, reason: "unsubscribed or shutting down".into() },
        },
        Dispatch::Function(f) => {
            let ctx = Context { source: inner.source.clone(), parent: Some(signal.clone()) };
            let parent = signal.clone();
            // Called inside the guard: a panic before the handler's first await is caught too.
            let call = AssertUnwindSafe(ctx.scope(async move { f(parent).await })).catch_unwind();
            tokio::select! {
                res = call => match res {
                    Ok(Ok(())) => Outcome::Delivered { attempts: 1 },
                    Ok(Err(reason)) => Outcome::Failed { attempts: 1, reason },
                    Err(_) => Outcome::Failed { attempts: 1, reason: "handler panicked".into() },
                },
                _ = sub.cancel.cancelled() => Outcome::Failed { attempts: 1, reason: "unsubscribed or shutting down".into() },
            }
        }
        Dispatch::Agent(target) => agents::deliver(inner, sub, target, &signal).await,
        Dispatch::Webhook(w) => {
            let breaker = sub.breaker.as_ref().expect("webhook subscriptions have a breaker");
            webhook::deliver(inner, w, breaker, &sub.cancel, &signal).await
        }
    };
    match &outcome {
        Outcome::Delivered { .. } => {
            sub.counts.delivered.fetch_add(1, Ordering::Relaxed);
            sub.counts.delivered_total.inc();
        }
        Outcome::Failed { attempts, reason } => {
            sub.counts.failed.fetch_add(1, Ordering::Relaxed);
            sub.counts.failed_total.inc();
            dead_letter(inner, sub, &signal, reason, *attempts);
        }
    }
    for m in middleware.iter() {
        let budget = Duration::from_millis(inner.cfg.middleware_budget_ms);
        let call = AssertUnwindSafe(async { m.after_dispatch(&signal, sub.target(), &outcome).await }).catch_unwind();
        if !matches!(tokio::time::timeout(budget, call).await, Ok(Ok(()))) {
            inner.metrics.middleware_over_budget.get_or_create(&label("stage", "after_dispatch")).inc();
        }
    }
}

fn dead_letter(inner: &Inner, sub: &Sub, signal: &Signal, reason: &str, attempts: u32) {
    const LETTER_OVERHEAD_BYTES: usize = 256;
    warn!(subscription = sub.id, id = %signal.id, reason, attempts, "delivery failed; dead-lettered");
    inner.metrics.deadletters.inc();
    let letter = DeadLetter {
        subscription: sub.id,
        dispatch: sub.dispatch.describe(),
        reason: reason.to_string(),
        attempts,
        time: crate::signal::now().with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        signal: serde_json::Value::Null,
    };
    let body = crate::signal::codec::encode_structured(signal);
    let size = body.len() + reason.len() + LETTER_OVERHEAD_BYTES;
    let mut list = lock(&inner.deadletters);
    while !list.items.is_empty()
        && (list.items.len() >= inner.cfg.deadletters_len_max || list.bytes + size > inner.cfg.deadletters_bytes_max)
    {
        let (_, _, old) = list.items.pop_front().expect("not empty");
        list.bytes -= old;
        inner.metrics.queue_dropped.get_or_create(&label("queue", "deadletters")).inc();
    }
    list.items.push_back((letter, body, size));
    list.bytes += size;
}
