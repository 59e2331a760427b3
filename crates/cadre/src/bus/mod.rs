//! The node-local bus: subscriptions, publish, middleware, and delivery to adapters.
//!
//! `subscribe(pattern, dispatch)` registers a route in a [`Router`] whose target is the
//! subscription; `publish` validates each signal, runs the before-publish middleware, records it
//! in the causality [`Journal`], routes it and appends it to the queue of every matching
//! subscription. Each subscription has one worker task that takes signals from its queue in order
//! and hands them to its adapter ([`Dispatch`]): an in-process channel or function, the log, or a
//! webhook (see [`webhook`]). So signals reach a subscriber in publish order, and a slow subscriber
//! delays only itself.
//!
//! ## Bounds and what happens when full
//! - Each subscription's queue holds at most `queue_len_max` signals. When full, its
//!   [`Overflow`] policy applies: `reject` fails the publish with [`PublishError::QueueFull`]
//!   naming the subscription (other subscribers may already have the signal), `drop_oldest` drops
//!   the oldest queued signal and counts it. Publishing never waits for a subscriber.
//! - Subscriptions: at most `subscriptions_max`. Journal and dead letters: bounded, oldest first out.
//! - Middleware: each call has a time budget; over budget (or a panic) counts as a rejection for
//!   before-publish (the signal is refused) and before-dispatch (that subscriber is skipped), and
//!   is abandoned for after-dispatch. Every such case is counted.
//!
//! ## Causality
//! Function adapters run inside a [`Context`] whose parent is the signal being handled: signals
//! they publish get `causationid` and a child `traceparent`. A signal published with no
//! `traceparent` gets a new trace.
//!
//! ## Caveats
//! Queues live in memory: signals still queued when the node stops are lost (persistent
//! subscriptions come with cluster delivery). A webhook's retries hold back its later signals:
//! order is kept at the cost of head-of-line blocking.
//!
//! ## Layout
//! - `handle`: the [`Bus`] handle and the state its parts share; `subscription`: subscriptions
//!   and their specs; `publish`: validation, middleware, journal, appending to queues;
//!   `delivery`: the workers, adapters and dead letters; `middleware`: the hooks and their
//!   budget; `peers`: the bus's face to other nodes (serving their asks).
//! - [`remote`]: the cluster side (buffers to other nodes, delivery levels); [`interest`]: the
//!   interest map; [`broadcast`]: the broadcast tree; [`agents`]: cluster-wide agent routes;
//!   [`webhook`]: the webhook adapter.
//!
//! [`Router`]: crate::router::Router
//! [`Journal`]: crate::signal::journal::Journal
//! [`Context`]: crate::signal::Context

pub mod agents;
pub mod broadcast;
pub mod interest;
pub mod remote;
pub mod webhook;

mod delivery;
mod handle;
mod middleware;
mod peers;
mod publish;
mod subscription;

use std::sync::{Mutex, RwLock};

pub use delivery::{DeadLetter, Outcome};
pub use handle::{Bus, WeakBus};
pub(crate) use handle::{ClusterSide, Inner};
pub use middleware::{Middleware, Target, Verdict};
pub use publish::{PublishError, Published};
pub use remote::{Delivery, PUBSUB_TAG};
pub(crate) use subscription::RoutesPlan;
#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use subscription::{
    Dispatch, DispatchSpec, HandlerFn, Overflow, RoutesError, SubId, SubscribeError, Subscription, SubscriptionInfo,
    SubscriptionJson, SubscriptionSpec, QUEUE_LEN_FACTOR_MAX,
};

// Reached by `agents` through `super::`.
use subscription::Sub;

/// Locks, taking over a lock poisoned by a panic (the bus's state stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
