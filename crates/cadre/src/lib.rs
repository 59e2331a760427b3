//! cadre: keyed agents and CloudEvents signals across a cluster of nodes.
//!
//! Layers, bottom up:
//! - [`config`]: one [`config::Config`] per node, every limit named, validated at start;
//! - [`signal`]: CloudEvents signals, their codecs and the causality journal;
//! - [`router`]: pattern trie over dot-separated signal types (`*`, `**`, priorities, predicates);
//! - [`wire`]: versioned envelopes and framing;
//! - [`net`]: authenticated, batched, bounded connections between nodes;
//! - [`membership`]: who is in the cluster (SWIM, sans-IO core plus a driver task);
//! - [`storage`]: agent state and entries with per-shard epoch fencing (memory, redb, Postgres);
//! - [`agent`]: keyed agents on one node (activation, mailboxes, persistence, the record of
//!   handled signals, reminders, calls between agents);
//! - [`meta`], [`placement`], [`cluster`]: the replicated metadata (Raft), where each key lives,
//!   and the cluster layer (leases, controller, routing, hand-offs, replicas, reads);
//! - [`bus`]: pub/sub on a node and across the cluster, routes to agents;
//! - [`node`]: assembles the layers, start-up and graceful shutdown;
//! - [`api`]: the HTTP surface;
//! - [`sim`]: deterministic cluster simulation on turmoil (test support).
//!
//! Cross-cutting: [`metrics`] (a per-node registry) and [`clock`].
//!
//! An application starts a node with [`Node::builder`], defines agent types with [`Agent`], and
//! reaches one agent anywhere in the cluster with [`Node::agent`] (see [`prelude`]).

pub mod agent;
pub mod api;
pub mod bus;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod membership;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod node;
pub mod placement;
pub mod router;
pub mod signal;
pub mod sim;
pub mod storage;
pub mod wire;

pub use agent::{Agent, AgentError, CallError, Ctx, Persistence, Reminder, Reply, Unavailable};
pub use node::{AgentRef, Node, NodeBuilder};
pub use signal::Signal;
pub use storage::Key;

/// What an application embedding cadre usually needs: `use cadre::prelude::*;`.
pub mod prelude {
    pub use crate::agent::{Agent, AgentError, CallError, Ctx, Persistence, Reminder, Reply};
    pub use crate::node::{AgentRef, Node, NodeBuilder};
    pub use crate::signal::Signal;
    pub use crate::storage::Key;
}
