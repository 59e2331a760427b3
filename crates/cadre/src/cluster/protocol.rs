//! Messages of the placement protocol.
//!
//! On the control lane (inside a [`ControlReq`], beside the metadata group's Raft RPCs): lease renewals, hand-off
//! reports, replica reports. On the data lane: agent calls between nodes, as asks of kind
//! [`Kind::Agent`] carrying a postcard [`AgentReq`], and replication from owners to replicas
//! ([`Kind::Replica`], [`ReplicaReq`]); see [`crate::wire::envelope`].
//!
//! [`Kind::Agent`]: crate::wire::envelope::Kind::Agent
//! [`Kind::Replica`]: crate::wire::envelope::Kind::Replica

use bytes::Bytes;
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use crate::agent::CallError;
use crate::meta::raft::{MetaNode, NodeId, TC};
use crate::meta::{MetaError, MetaState};

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
    /// No leader is known.
    #[error("no leader known")]
    NoLeader,
    /// No leader is known, and no other member to ask.
    #[error("no leader and no peer known")]
    NoPeer,
    /// Redirected more than once while one request was asked.
    #[error("the leader moved while asking")]
    LeaderMoved,
    /// The leader's address (as given) does not parse.
    #[error("the leader's address {0:?} does not parse")]
    BadAddress(String),
    /// A wait on the group (a write, a leadership check) ended without an answer.
    #[error("{what}: no quorum within {limit_ms} ms")]
    NoQuorum {
        /// What waited.
        what: String,
        /// How long, in milliseconds.
        limit_ms: u64,
    },
    /// The group refused or failed a write or a change.
    #[error("{what}: {reason}")]
    Group {
        /// What was refused or failed.
        what: String,
        /// Why.
        reason: String,
    },
    /// The metadata refused the command.
    #[error("{0}")]
    Meta(MetaError),
    /// More replica reports in one request than allowed.
    #[error("{count} replica reports in one request, over {max}")]
    TooManyReports {
        /// Reports in the request.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// This node has not applied the metadata up to the index the grant needs.
    #[error("metadata not applied up to {index:?} yet")]
    NotApplied {
        /// The log index needed.
        index: Option<u64>,
    },
    /// The leader holds the controller lock longer than a renewal waits.
    #[error("the controller is busy")]
    Busy,
    /// The request did not reach the leader, or its answer did not come back.
    #[error("{0}")]
    Transport(String),
    /// An answer that does not decode, or of the wrong kind.
    #[error("{0}")]
    Protocol(String),
    /// The node is shutting down.
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

// ------------------------------------------------------------------------------------------------
// The control lane

/// A Raft RPC.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TC>),
    Vote(VoteRequest<NodeId>),
    FullSnapshot { vote: Vote<NodeId>, meta: SnapshotMeta<NodeId, MetaNode>, data: MetaState },
}

/// A request on the control lane (Raft RPCs and the placement protocol).
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReq {
    /// For the Raft node `to`: a node that restarted with a new id (lost data dir) refuses RPCs
    /// meant for its old one.
    Raft { to: NodeId, rpc: RaftRpc },
    /// A node renews its lease (and asks to be admitted); answered by the leader only.
    Renew(RenewReq),
    /// An old owner reports a finished hand-off; answered by the leader only.
    HandedOff { shard: u32, epoch: u64 },
    /// A member leaves gracefully: hand its shards over; answered by the leader only.
    Drain { name: String },
    /// A shard owner's replica reports, batched (at most [`crate::meta::BATCH_CMDS_MAX`]);
    /// answered by the leader only, one result per report.
    Replicas(Vec<ReplicaReport>),
    /// Adds (`Some`) or removes a cluster-wide agent route; answered by the leader only.
    Route(RouteChange),
}

/// A change of the cluster-wide agent routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    Add(crate::meta::AgentRoute),
    Remove(u64),
}

/// A replica that missed a write (`in_sync: false`) or that its owner caught up (`true`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub shard: u32,
    pub epoch: u64,
    pub node: String,
    pub in_sync: bool,
    /// The replica's, when its catch-up began (for `in_sync: true`).
    pub generation: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    FullSnapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    Renew(RenewReply),
    HandedOff(Result<(), ControlError>),
    Drain(Result<(), ControlError>),
    /// The batch's outcome, or one result per report.
    Replicas(Result<Vec<Result<(), MetaError>>, ControlError>),
    /// The route's id (added), or whether one was removed.
    Route(Result<u64, ControlError>),
    /// The request could not be decoded or served.
    Refused(String),
}

pub fn encode<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain data types into a Vec cannot fail.
    Bytes::from(postcard::to_allocvec(v).expect("control message serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Unavailable;
    use crate::wire::envelope::{
        control_kind, ControlKind, EnvelopeError, CONTROL_RAFT, CONTROL_RENEW, CONTROL_VARIANTS,
    };

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

    /// The kind admission reads from a request's first byte, by variant (a new variant fails to
    /// compile here until it is given one).
    fn expected(req: &ControlReq) -> ControlKind {
        match req {
            ControlReq::Raft { .. } => ControlKind::Raft,
            ControlReq::Renew(_) => ControlKind::Renew,
            ControlReq::HandedOff { .. }
            | ControlReq::Drain { .. }
            | ControlReq::Replicas(_)
            | ControlReq::Route(_) => ControlKind::Other,
        }
    }

    #[test]
    fn the_control_kind_is_the_variant_index_of_the_encoded_request() {
        let renew = RenewReq { name: "a".into(), addr: "x".into(), raft_id: 3, draining: false };
        let one_of_each = [
            ControlReq::Raft { to: 1, rpc: RaftRpc::Vote(VoteRequest::new(Vote::new(2, 1), None)) },
            ControlReq::Renew(renew),
            ControlReq::HandedOff { shard: 1, epoch: 2 },
            ControlReq::Drain { name: "a".into() },
            ControlReq::Replicas(vec![]),
            ControlReq::Route(RouteChange::Remove(7)),
        ];
        assert_eq!(one_of_each.len(), CONTROL_VARIANTS as usize);
        for (index, req) in one_of_each.iter().enumerate() {
            let bytes = encode(req);
            assert_eq!(bytes[0] as usize, index, "{req:?}");
            assert_eq!(control_kind(&bytes), Ok(expected(req)), "{req:?}");
        }
        assert_eq!((encode(&one_of_each[0])[0], encode(&one_of_each[1])[0]), (CONTROL_RAFT, CONTROL_RENEW));
        assert_eq!(control_kind(&[CONTROL_VARIANTS]), Err(EnvelopeError::UnknownKind(CONTROL_VARIANTS)));
    }
}
