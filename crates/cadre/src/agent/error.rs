//! What can go wrong: a handler's own [`AgentError`], a call's [`CallError`], and
//! [`Unavailable`], the calls that were not served at all (nothing ran, the caller may try again).
//!
//! The errors travel: [`CallError`] and [`Unavailable`] are serialized into the replies other
//! nodes send, so a variant added here is one a peer of an older build cannot decode.

use std::time::Duration;

use super::CALL_DEPTH_MAX;
use crate::storage::StorageError;

/// A handler's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// This call fails; the state is rolled back to what was stored.
    #[error("{0}")]
    Failed(String),
    /// The agent is broken: restart it from its stored state.
    #[error("fatal: {0}")]
    Fatal(String),
}

/// Why a call to an agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum CallError {
    /// No agent type of this name is registered.
    #[error("unknown agent type {0:?}")]
    UnknownType(String),
    /// The key is invalid (see [`Key::check`](crate::storage::Key::check)).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The agent's mailbox is full (`agents.mailbox_len_max`); nothing ran.
    #[error("the mailbox of {0} is full")]
    MailboxFull(String),
    /// No reply within the call's timeout (the call may still run).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The handler failed ([`AgentError`]); the state was rolled back.
    #[error("{0}")]
    Handler(String),
    /// The agent was stopped after more restarts than `agents.restarts_max`.
    #[error("the agent crashed more than its restart limit and was stopped")]
    Crashed,
    /// The store refused or failed a write or read of the agent's state.
    #[error("storage: {0}")]
    Storage(StorageError),
    /// The call was not served (nothing ran); it may be tried again.
    #[error("unavailable: {0}")]
    Unavailable(Unavailable),
    /// The key's shard is not served here; `owner` at `epoch` is, as far as this node knows.
    #[error("not the owner of this key's shard{}", owner.as_ref().map(|o| format!(" (owner: {o}, epoch {epoch})")).unwrap_or_default())]
    NotOwner {
        /// The owner's node name, if known.
        owner: Option<String>,
        /// The owner's epoch of the shard.
        epoch: u64,
    },
    /// A read-only call (a state read) changed the state or emitted signals: it is not a read.
    #[error("not a read: {0}")]
    NotRead(String),
    /// The agent handled this signal (same source and id) before and its reply is no longer
    /// kept: it was not handled again (see `agents.dedupe_ids_max`). Not a failure: the
    /// signal took effect.
    #[error("a duplicate: this signal was handled before")]
    Duplicate,
    /// A call to an agent that is waiting on the chain of calls this one belongs to (see
    /// [`Ctx::call`](super::Ctx::call)): it would wait forever, so it fails at once.
    #[error("a call cycle: {0}")]
    Cycle(String),
    /// A call that would make its chain longer than `CALL_DEPTH_MAX` (16) agents.
    #[error("a chain of {0} calls is longer than {CALL_DEPTH_MAX}")]
    TooDeep(usize),
    /// A typed handle's reply (or data) does not match the type asked for
    /// ([`AgentRef::ask`](crate::AgentRef::ask)).
    #[error("the reply does not decode: {0}")]
    Reply(String),
    /// A cluster-wide route to agents that cannot be added as given.
    #[error("invalid route: {0}")]
    InvalidRoute(crate::meta::AgentRouteError),
}

/// Why a call was not served: nothing ran, and the caller may try again (here later, or on
/// another node).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Unavailable {
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The cluster has no shard table yet (just formed, no metadata leader yet).
    #[error("the cluster has no shard table yet")]
    NoShardTable,
    /// The key's shard has no owner yet.
    #[error("shard {shard} has no owner yet")]
    NoOwner {
        /// The shard.
        shard: u32,
    },
    /// The key's shard is moving to another owner.
    #[error("shard {shard} is being handed over")]
    HandingOver {
        /// The shard.
        shard: u32,
    },
    /// This node's lease lapsed: it serves nothing until it is renewed.
    #[error("this node's lease has expired")]
    LeaseExpired,
    /// The key's shard is opening on its new owner (fencing its replicas).
    #[error("shard {shard} is opening (fencing its replicas)")]
    Opening {
        /// The shard.
        shard: u32,
    },
    /// The shard was given to this node again at a new epoch: the activation stops and starts
    /// afresh from the store.
    #[error("the shard's epoch changed; the agent restarts")]
    EpochChanged,
    /// A replica's table is too old to answer a read.
    #[error("this replica's table is {age_ms} ms old (at most {stale_ms_max} allowed)")]
    Stale {
        /// The table's age, in milliseconds.
        age_ms: u64,
        /// The most allowed, in milliseconds.
        stale_ms_max: u64,
    },
    /// A bounded resource is full (`what` in flight, at most `limit`).
    #[error("more than {limit} {what} in flight")]
    Busy {
        /// What is bounded.
        what: String,
        /// The bound.
        limit: usize,
    },
    /// The owner changed more often than a call follows.
    #[error("too many owner changes for {key}")]
    OwnerChanges {
        /// The key.
        key: String,
    },
    /// More redirects than a call follows.
    #[error("too many redirects for {key}")]
    Redirects {
        /// The key.
        key: String,
    },
    /// No node served the key's shard before the deadline.
    #[error("no serving owner found for {key}")]
    NoServingOwner {
        /// The key.
        key: String,
    },
    /// No owner or in-sync replica could serve a read before the deadline.
    #[error("no copy of {key} could serve the read")]
    NoServingCopy {
        /// The key.
        key: String,
    },
    /// The activation kept closing under the call (the shard was moving or stopping).
    #[error("{key} kept closing")]
    KeptClosing {
        /// The key.
        key: String,
    },
    /// The node that serves the call has no known transport address.
    #[error("{node} has no known address")]
    NoAddress {
        /// The node's name.
        node: String,
    },
    /// The request could not reach the node that serves it.
    #[error("{0}")]
    Transport(String),
    /// A peer's reply or request that does not decode, or a reply of the wrong kind.
    #[error("{0}")]
    Protocol(String),
    /// The activation ended without replying.
    #[error("the activation ended without replying")]
    NoReply,
    /// An agent called another with no router to reach it (a host outside a node).
    #[error("no route to other agents")]
    NoAgentRoute,
    /// The stored state or record of handled signals does not decode, or the state does not
    /// encode.
    #[error("{0}")]
    State(String),
    /// The leader refused or could not commit a change (a route change).
    #[error("{0}")]
    Control(crate::cluster::protocol::ControlError),
}
