//! Messages of the placement protocol.
//!
//! On the control lane (inside [`crate::meta::raft::ControlReq`]): lease renewals, hand-off
//! reports, replica reports. On the data lane: agent calls between nodes, as asks of kind
//! [`Kind::Agent`] carrying a postcard [`AgentReq`], and replication from owners to replicas
//! ([`Kind::Replica`], [`ReplicaReq`]); see [`crate::wire::envelope`].
//!
//! [`Kind::Agent`]: crate::wire::envelope::Kind::Agent
//! [`Kind::Replica`]: crate::wire::envelope::Kind::Replica

use serde::{Deserialize, Serialize};

use crate::agent::CallError;
use crate::meta::MetaError;

/// A node renews its lease; the leader also admits it (metadata member, Raft learner).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewReq {
    pub name: String,
    /// Transport address.
    pub addr: String,
    /// This node's Raft id.
    pub raft_id: u64,
    /// Whether it is leaving (draining); a node renewing without it is admitted again, which
    /// clears a `draining` mark left from before a restart.
    pub draining: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RenewReply {
    /// Lease granted for `lease_ms` from when the request was sent, valid once the node has
    /// applied the metadata up to `applied_index` (so it serves with a table at least as new as
    /// any reassignment the leader decided before granting).
    Granted { applied_index: Option<u64> },
    /// Not the leader; try this transport address (if known).
    NotLeader { leader: Option<String> },
    /// The leader could not grant it now (not yet admitted, leadership unconfirmed); retry.
    Retry(ControlError),
}

/// Why a request to the leader (a renewal, a hand-off report, replica marks, a drain, a route
/// change) did not take effect. Travels in the leader's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    /// The node asked does not lead (any more): ask the leader.
    #[error("not the leader")]
    NotLeader,
    #[error("no leader known")]
    NoLeader,
    #[error("no leader and no peer known")]
    NoPeer,
    /// Redirected more than once while one request was asked.
    #[error("the leader moved while asking")]
    LeaderMoved,
    #[error("the leader's address {0:?} does not parse")]
    BadAddress(String),
    /// A wait on the group (a write, a leadership check) ended without an answer.
    #[error("{what}: no quorum within {limit_ms} ms")]
    NoQuorum { what: String, limit_ms: u64 },
    /// The group refused or failed a write or a change.
    #[error("{what}: {reason}")]
    Group { what: String, reason: String },
    /// The metadata refused the command.
    #[error("{0}")]
    Meta(MetaError),
    #[error("{count} replica reports in one request, over {max}")]
    TooManyReports { count: usize, max: usize },
    /// This node has not applied the metadata up to the index the grant needs.
    #[error("metadata not applied up to {index:?} yet")]
    NotApplied { index: Option<u64> },
    /// The leader holds the controller lock longer than a renewal waits.
    #[error("the controller is busy")]
    Busy,
    /// The request did not reach the leader, or its answer did not come back.
    #[error("{0}")]
    Transport(String),
    /// An answer that does not decode, or of the wrong kind.
    #[error("{0}")]
    Protocol(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl ControlError {
    /// Asking again (the leader, later) may succeed.
    pub fn leader_unknown(&self) -> bool {
        matches!(
            self,
            ControlError::NotLeader | ControlError::NoLeader | ControlError::NoPeer | ControlError::LeaderMoved
        )
    }
}

/// One key of a shard's state, as a catch-up page carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferItem {
    pub ty: String,
    pub id: String,
    /// The state, if the key has one.
    pub value: Option<Vec<u8>>,
    /// The append-only entries, in order.
    pub entries: Vec<Vec<u8>>,
}

/// From a shard's owner to one of its replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaReq {
    pub shard: u32,
    /// The owner's epoch; a replica refuses an epoch older than the one it knows.
    pub epoch: u64,
    pub op: ReplicaOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReplicaOp {
    /// The key's state becomes `value`.
    Put { ty: String, id: String, value: Vec<u8> },
    /// The key's state and entries are removed.
    Delete { ty: String, id: String },
    /// Entries appended after the first `expected_len` (which the replica must hold).
    Append { ty: String, id: String, expected_len: u64, entries: Vec<Vec<u8>> },
    /// The sender serves the shard at `epoch` from now on: refuse older epochs.
    Fence,
    /// Catch-up: the replica's keys of the shard in the key range `(after, through]` (`None`:
    /// unbounded) become exactly `items`.
    Sync { after: Option<(String, String)>, through: Option<(String, String)>, items: Vec<TransferItem> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ReplicaError {
    /// The replica knows a newer epoch, or another owner at this one.
    #[error("stale: {0}")]
    Stale(String),
    /// The replica does not hold what the write builds on (an append's prefix).
    #[error("diverged: {0}")]
    Diverged(String),
    /// The replica's queue is full.
    #[error("the replica is busy")]
    Busy,
    #[error("replica storage: {0}")]
    Storage(String),
    #[error("undecodable replica request: {0}")]
    Undecodable(String),
}

pub type ReplicaReply = Result<(), ReplicaError>;

/// An agent request forwarded to the owner of the key's shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReq {
    pub op: AgentOp,
    pub ty: String,
    pub id: String,
    /// The epoch the sender believes the owner has (0: unknown).
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentOp {
    /// A structured-mode CloudEvent; `cast` wants no reply beyond acceptance.
    Call {
        signal: Vec<u8>,
        cast: bool,
        timeout_ms: u64,
    },
    Ensure,
    Stop,
    /// Is the agent active? (`reply`: a boolean)
    Lookup,
    /// How many agents are active on the receiving node.
    Stats,
    /// The receiver's active agents of the request's type (or, with `stored`, its ids with a
    /// stored state) after `after`, at most `limit` (see [`super::list`]).
    List {
        after: Option<String>,
        limit: u32,
        stored: bool,
    },
    /// A read of the stored state (`query`: a structured-mode CloudEvent for a read-only call),
    /// served by the owner or an in-sync replica whose table is at most `stale_ms_max` old (see
    /// [`super::read`]).
    /// `owner_only`: refused unless the receiver owns the shard in its table.
    Read {
        query: Option<Vec<u8>>,
        stale_ms_max: u64,
        owner_only: bool,
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentReply {
    /// The reply as JSON (`null` for casts, ensure and stop).
    Ok {
        reply: Vec<u8>,
        epoch: u64,
    },
    Stats(super::MemberStats),
    /// Active agents, by id.
    Active(Vec<crate::agent::AgentInfo>),
    /// Ids with a stored state, in order.
    Stored(Vec<String>),
    Err(CallError),
    /// A read's reply as JSON; `replica`: served by a replica, whose table was `age_ms` old.
    Read {
        reply: Vec<u8>,
        epoch: u64,
        replica: bool,
        age_ms: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Unavailable;

    #[test]
    fn a_control_error_in_an_agent_reply_keeps_its_type_and_its_text() {
        let e = ControlError::Meta(MetaError::TooManyRoutes);
        let reply = AgentReply::Err(CallError::Unavailable(Unavailable::Control(e.clone())));
        let back: AgentReply = postcard::from_bytes(&postcard::to_allocvec(&reply).unwrap()).unwrap();
        match back {
            AgentReply::Err(CallError::Unavailable(Unavailable::Control(got))) => assert_eq!(got, e),
            other => panic!("expected the control error back, got {other:?}"),
        }
        assert_eq!(Unavailable::Control(e.clone()).to_string(), e.to_string());
        assert_eq!(Unavailable::Control(ControlError::Busy).to_string(), "the controller is busy");
    }
}
