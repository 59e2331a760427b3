//! Keyed agents on one node: activation, mailboxes, passivation, supervision, persistence.
//!
//! An agent type implements [`Agent`]: the value is the agent's state (serialized as JSON into a
//! [`Storage`]), `handle` turns a signal into a reply. The [`Host`] keeps at most one live
//! activation per key on this node:
//! - **Activation on first use**: a task loads the state (or `Default`), runs `on_activate`, then
//!   takes its mailbox in order. The mailbox is bounded (`mailbox_len_max`); a full one refuses a
//!   call with [`CallError::MailboxFull`] at once.
//! - **Persistence**: write-through (the default) stores the state after every handled signal
//!   that changed it, before the reply is sent, so an acknowledged call is durable; or on
//!   passivation only ([`Persistence::OnPassivate`]). A write refused by the store (`Conflict`,
//!   `Fenced`: another activation wrote) fails the call and stops this activation.
//! - **Errors**: a handler `Err(AgentError::Failed)` fails that call and rolls the state back to
//!   the last good state (a call is all or nothing): what was stored, or for
//!   [`Persistence::OnPassivate`] the state before the call. `Err(AgentError::Fatal)` or a panic
//!   restarts the agent from that state; more than `restarts_max` restarts within
//!   `restart_window_ms` stop it, failing the calls in its mailbox with [`CallError::Crashed`].
//!   A rollback decodes the state again, so fields not stored (`serde(skip)`) are reset;
//!   `on_activate` runs again after every rollback to set them up. Hooks that panic are logged.
//!   Caveat: the restart count lives with the activation; a new activation starts at zero.
//! - **Passivation**: after `idle_timeout_ms` without a signal, when more than
//!   `agents_active_max` are active (least recently used first), on [`Host::stop`], and at
//!   shutdown: `on_passivate`, store, exit.
//!
//! - **Effectively once**: a signal whose `(source, id)` the agent already handled is answered
//!   without running the handler: the original reply while it is kept, else
//!   [`CallError::Duplicate`]; nothing is emitted again. The record of handled signals is stored
//!   with the state, in the same write (see [`handled`]).
//!
//! ## One activation per key
//! The host's map holds each key as `Active` or `Stopping`. An activation removes itself only
//! after its last write; a call for a `Stopping` key waits for that, so a new activation never
//! loads state older than what the previous one stored. A stopping activation closes its mailbox,
//! then handles what was already queued; a caller whose send finds the mailbox closed retries
//! (at most [`CALL_ATTEMPTS_MAX`] times).
//!
//! ## Placement
//! The host asks its [`Gate`] whether a key's shard is served here: before every call
//! ([`Gate::admit`]: owned, not handing off, lease valid) and before every write
//! ([`Gate::write`]: owned and lease valid, also while handing off), and writes with the fence the
//! gate gives (shard and epoch). A refused call fails with [`CallError::NotOwner`] (the caller
//! follows the hint) or [`CallError::Unavailable`]; a refused write fails the call and stops the
//! activation. [`Host::passivate_where`] stops the activations of shards this node gives up. The
//! default gate ([`LocalGate`]) serves every key at epoch 1 (a host without a cluster).
//!
//! ## Layout
//! - `types`: the [`Agent`] trait, its handlers and [`Persistence`]; `error`: [`AgentError`],
//!   [`CallError`], [`Unavailable`].
//! - `ctx`: what a handler sees ([`Ctx`]) and the chain of calls it belongs to.
//! - `gate`: whether a key is served here ([`Gate`], [`LocalGate`]).
//! - `host`: the [`Host`], its table of activations and its builder.
//! - `activation`: the task of one activation (mailbox, persistence, rollback, restarts,
//!   passivation); `read`: reads of the stored state outside it.
//! - [`handled`]: the record of handled signals; [`reminders`]: durable reminders and their
//!   schedule; [`counter`]: a sample agent.
//!
//! [`Storage`]: crate::storage::Storage

pub mod counter;
pub mod handled;
pub mod reminders;

mod activation;
mod ctx;
mod error;
mod gate;
mod host;
mod read;
mod types;

#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use ctx::{chain_link, Caller, Ctx, CALL_CHAIN, CALL_DEPTH_MAX, EMITS_PER_CALL_MAX};
pub use error::{AgentError, CallError, Unavailable};
pub use gate::{Gate, LocalGate};
#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use host::{AgentInfo, Emitter, Host, HostBuilder, CALL_ATTEMPTS_MAX, LIST_PAGE_MAX, READS_IN_FLIGHT_MAX};
pub use reminders::{Reminder, ReminderInfo};
#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use types::{dispatch, Agent, Persistence, Reply, Route};

// Reached by `reminders` through `super::` (its schedule sends `Msg::Fire` through the host).
use activation::Msg;
use host::HostInner;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_calls;
#[cfg(test)]
mod tests_reminders;
