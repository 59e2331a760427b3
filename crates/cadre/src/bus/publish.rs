//! Publishing: validation, causality, the before-publish middleware, the journal, and the
//! appending of a signal to the queue of every matching subscription (then to other nodes, see
//! [`super::remote`]).
//!
//! A subscriber's queue is bounded by length and bytes, and every queue of the node by a shared
//! byte budget (`queued_bytes_max`); bytes are reserved here and released once the worker has
//! delivered the signal. A full queue follows its [`Overflow`](super::Overflow) policy. A local
//! publish appends to one queue at a time (a full `reject` queue fails the publish, the others
//! may have it already); a signal from another node goes to all its queues or none
//! ([`enqueue_all`]), so the sender can simply try again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::middleware::budgeted;
use super::subscription::{Queue, Sub};
use super::{read, Bus, Delivery, Inner, Overflow, SubId};
use crate::metrics::label;
use crate::signal::{Context, Signal, SignalError, TraceParent, TRACEPARENT};

/// Why a publish failed (or fell short of its delivery level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The signal is invalid; nothing was delivered.
    #[error("invalid signal: {0}")]
    Invalid(#[from] SignalError),
    /// A middleware refused the signal before publish; nothing was delivered.
    #[error("rejected by middleware {middleware}: {reason}")]
    Rejected {
        /// The middleware's name.
        middleware: String,
        /// Its reason.
        reason: String,
    },
    /// A subscription's queue is full ([`Overflow::Reject`](super::Overflow::Reject)).
    #[error("queue of subscription {subscription} is full (delivered to {delivered} other subscriptions)")]
    QueueFull {
        /// The subscription.
        subscription: SubId,
        /// Other subscriptions that took the signal.
        delivered: usize,
    },
    /// The buffer for another interested node is full (it is slow or unreachable); nothing was
    /// sent to other nodes, local subscribers have the signal.
    #[error("the buffer for node {node} is full")]
    BufferFull {
        /// The node's name.
        node: String,
    },
    /// The encoded signal does not fit a transport frame, so it cannot go to other nodes (local
    /// subscribers have it).
    #[error("signal of {len} bytes is over the {max} bytes other nodes can be sent")]
    TooLarge {
        /// The encoded signal's length, in bytes.
        len: usize,
        /// The most other nodes can be sent, in bytes.
        max: usize,
    },
    /// A `strong` publish did not reach a majority of its target nodes in time. It is buffered
    /// and may still arrive.
    #[error("strong delivery unmet: {acked} of {targets} target nodes accepted, {needed} needed")]
    StrongUnmet {
        /// Target nodes that accepted it.
        acked: usize,
        /// Acceptances needed (a majority).
        needed: usize,
        /// Target nodes.
        targets: usize,
    },
    /// The bus is shutting down.
    #[error("the bus is shutting down")]
    ShuttingDown,
}

/// A published signal: its id, how many local subscriptions took it, how many other nodes were
/// sent a copy, and the delivery level met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The signal's id.
    pub id: String,
    /// Local subscriptions that took it.
    pub deliveries: usize,
    /// Other nodes sent a copy.
    pub remote_nodes: usize,
    /// The delivery level met.
    pub delivery: Delivery,
}

impl Bus {
    /// Publishes one signal at the default level (`eventual`); see [`Bus::publish_with`].
    pub async fn publish(&self, signal: Signal) -> Result<Published, PublishError> {
        self.publish_with(signal, Delivery::Eventual).await
    }

    /// Validates, runs the middleware, journals, and queues for this node's subscriptions; the
    /// signal as published and how many took it.
    async fn publish_local(&self, signal: Signal) -> Result<(Arc<Signal>, usize), PublishError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(PublishError::ShuttingDown);
        }
        let signal = self.prepare(signal).inspect_err(|e| self.count_rejected(e))?;
        let middleware = read(&inner.middleware).clone();
        for m in middleware.iter() {
            let verdict = budgeted(inner, "before_publish", async { m.before_publish(&signal).await }).await;
            if let Some(reason) = verdict.rejection() {
                let e = PublishError::Rejected { middleware: m.name().to_string(), reason };
                self.count_rejected(&e);
                return Err(e);
            }
        }
        inner.journal.record(&signal);
        let signal = Arc::new(signal);
        let targets: Vec<Arc<Sub>> = {
            let subs = read(&inner.subs);
            let router = read(&inner.router);
            match router.route(&signal.ty, &signal) {
                Ok(ids) => ids.into_iter().filter_map(|id| subs.get(id).cloned()).collect(),
                Err(_) => Vec::new(),
            }
        };
        if targets.is_empty() {
            inner.metrics.unrouted.inc();
        }
        let size = signal.size_hint_bytes();
        let mut delivered = 0;
        let mut full = None;
        for sub in &targets {
            match enqueue(inner, sub, &signal, size) {
                Enqueued::Yes => delivered += 1,
                // Unsubscribed since it was routed: as if it had not matched.
                Enqueued::Closed => {}
                Enqueued::Full => {
                    full.get_or_insert(sub.id);
                }
            }
        }
        if let Some(subscription) = full {
            let e = PublishError::QueueFull { subscription, delivered };
            self.count_rejected(&e);
            return Err(e);
        }
        Ok((signal, delivered))
    }

    /// Publishes one signal to the subscriptions of this node and, once the node is in a cluster,
    /// of every other node, at `delivery` (see `bus::remote`). A signal refused by a
    /// full local queue goes to no other node.
    pub async fn publish_with(&self, signal: Signal, delivery: Delivery) -> Result<Published, PublishError> {
        let inner = &self.inner;
        let (signal, delivered) = self.publish_local(signal).await?;
        let remote_nodes = match inner.remote.as_ref() {
            Some(r) => r.publish(&signal, delivery, delivered > 0).await.inspect_err(|e| self.count_rejected(e))?.nodes,
            None => 0,
        };
        inner.metrics.published.inc();
        Ok(Published { id: signal.id.clone(), deliveries: delivered, remote_nodes, delivery })
    }

    /// Publishes one signal to the subscriptions of every live node, whatever their patterns
    /// advertise (cache invalidation, configuration), through the broadcast tree (see
    /// `bus::broadcast`): this node sends at most `broadcast_fanout` copies. Best
    /// effort (`weak`): returns once this node's copies are accepted, each unreachable node's
    /// share taken over.
    pub async fn broadcast(&self, signal: Signal) -> Result<Published, PublishError> {
        let inner = &self.inner;
        let (signal, delivered) = self.publish_local(signal).await?;
        let remote_nodes = match inner.remote.as_ref() {
            Some(r) => r.broadcast(&signal).await.inspect_err(|e| self.count_rejected(e))?,
            None => 0,
        };
        inner.metrics.published.inc();
        Ok(Published { id: signal.id.clone(), deliveries: delivered, remote_nodes, delivery: Delivery::Weak })
    }

    /// Publishes signals in order; one result per signal.
    pub async fn publish_all(&self, signals: Vec<Signal>) -> Vec<Result<Published, PublishError>> {
        let mut out = Vec::with_capacity(signals.len());
        for s in signals {
            out.push(self.publish(s).await);
        }
        out
    }

    /// Validates, and adds causality: the parent of the running handler, a trace.
    /// Validated after the extensions are added, so what is delivered is valid.
    fn prepare(&self, mut signal: Signal) -> Result<Signal, PublishError> {
        if let Some(parent) = Context::current_parent() {
            // A copy of the parent (or of a sibling) carries the grandparent's cause: replace it.
            let cause = signal.causation_id();
            if cause.is_none() || cause == parent.causation_id() {
                signal = signal.caused_by(&parent);
            }
        }
        if signal.extension(TRACEPARENT).is_none() {
            signal.extensions.insert(TRACEPARENT.into(), TraceParent::root().to_string());
        }
        signal.validate()?;
        Ok(signal)
    }

    /// Counts a signal refused as invalid before it reached the bus (at decoding).
    pub(crate) fn count_invalid(&self) {
        self.inner.metrics.rejected.get_or_create(&label("reason", "invalid")).inc();
    }

    fn count_rejected(&self, e: &PublishError) {
        let reason = match e {
            PublishError::Invalid(_) => "invalid",
            PublishError::Rejected { .. } => "middleware",
            PublishError::QueueFull { .. } => "queue_full",
            PublishError::BufferFull { .. } => "buffer_full",
            PublishError::TooLarge { .. } => "too_large",
            PublishError::StrongUnmet { .. } => "strong_unmet",
            PublishError::ShuttingDown => "shutting_down",
        };
        self.inner.metrics.rejected.get_or_create(&label("reason", reason)).inc();
    }
}

enum Enqueued {
    Yes,
    Full,
    Closed,
}

impl Inner {
    /// Takes `bytes` from the node-wide queue budget, if there is room.
    fn try_reserve(&self, bytes: usize) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.cfg.queued_bytes_max {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub(super) fn release(&self, bytes: usize) {
        let before = self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more queue bytes than reserved");
    }
}

/// Appends to a subscriber's queue under its overflow policy and the byte budgets.
fn enqueue(inner: &Inner, sub: &Sub, signal: &Arc<Signal>, size: usize) -> Enqueued {
    let mut q = sub.lock_queue();
    if q.closed {
        return Enqueued::Closed;
    }
    loop {
        // One signal always fits an empty queue's own budget (not the node's).
        let over = q.items.len() >= sub.queue_len_max
            || (!q.items.is_empty() && q.bytes + size > inner.cfg.subscriber_queue_bytes_max);
        if !over && inner.try_reserve(size) {
            break;
        }
        if q.items.is_empty() || sub.overflow == Overflow::Reject {
            return Enqueued::Full;
        }
        drop_oldest(inner, sub, &mut q);
    }
    q.items.push_back((signal.clone(), size));
    q.bytes += size;
    sub.counts.received.fetch_add(1, Ordering::Relaxed);
    drop(q);
    sub.notify.notify_one();
    Enqueued::Yes
}

/// Drops a `drop_oldest` queue's oldest signal to make room (counted).
fn drop_oldest(inner: &Inner, sub: &Sub, q: &mut Queue) {
    let (_, bytes) = q.items.pop_front().expect("a queue without room is not empty");
    q.bytes -= bytes;
    inner.release(bytes);
    sub.counts.dropped.fetch_add(1, Ordering::Relaxed);
    inner.metrics.queue_dropped.get_or_create(&label("queue", "subscriber")).inc();
}

/// Appends a signal to every queue in `targets` (sorted by id, distinct) or to none: a `reject`
/// queue without room, or no room left in the node's budget, refuses it for all; `drop_oldest`
/// queues make room as their policy says. The queues are locked together in id order (elsewhere
/// one at a time, so this cannot deadlock).
pub(super) fn enqueue_all(inner: &Inner, targets: &[Arc<Sub>], signal: &Arc<Signal>, size: usize) -> bool {
    let mut queues: Vec<(&Sub, std::sync::MutexGuard<'_, Queue>)> =
        targets.iter().map(|s| (&**s, s.lock_queue())).filter(|(_, q)| !q.closed).collect();
    let room = |sub: &Sub, q: &Queue| {
        q.items.len() < sub.queue_len_max
            && (q.items.is_empty() || q.bytes + size <= inner.cfg.subscriber_queue_bytes_max)
    };
    if queues.iter().any(|(sub, q)| sub.overflow == Overflow::Reject && !room(sub, q)) {
        return false;
    }
    if !inner.try_reserve(size * queues.len()) {
        return false;
    }
    for (sub, q) in queues.iter_mut() {
        while !room(sub, q) {
            drop_oldest(inner, sub, q);
        }
        q.items.push_back((signal.clone(), size));
        q.bytes += size;
        sub.counts.received.fetch_add(1, Ordering::Relaxed);
    }
    let subs: Vec<&Sub> = queues.iter().map(|(s, _)| *s).collect();
    drop(queues);
    for sub in subs {
        sub.notify.notify_one();
    }
    true
}
