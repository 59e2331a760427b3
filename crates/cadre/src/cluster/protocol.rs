//! Messages of the placement protocol.
//!
//! On the control lane (inside [`crate::meta::raft::ControlReq`]): lease renewals, hand-off
//! reports and state transfer pages. On the data lane: agent calls between nodes, as asks whose
//! payload starts with [`AGENT_TAG`] followed by a postcard [`AgentReq`] (other data-lane asks go to
//! the node's data handler).

use serde::{Deserialize, Serialize};

use crate::agent::CallError;

/// First byte of a data-lane ask that carries an [`AgentReq`].
pub const AGENT_TAG: u8 = 0xA7;

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
    Retry(String),
}

/// One item of a shard's state, sent by the old owner during a hand-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferItem {
    pub ty: String,
    pub id: String,
    /// The state, if the key has one.
    pub value: Option<Vec<u8>>,
    /// The append-only entries, in order.
    pub entries: Vec<Vec<u8>>,
}

/// A page of a shard's state. Page 0 makes the receiver drop what it held for the shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferPage {
    pub shard: u32,
    /// The epoch of the move (the new owner's will be `epoch + 1`).
    pub epoch: u64,
    pub page: u32,
    pub items: Vec<TransferItem>,
}

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentReply {
    /// The reply as JSON (`null` for casts, ensure and stop).
    Ok {
        reply: Vec<u8>,
        epoch: u64,
    },
    Stats {
        active: u64,
    },
    Err(CallError),
}
