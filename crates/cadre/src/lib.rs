//! cadre: keyed agents and CloudEvents signals across a cluster of nodes.
//!
//! Layers, bottom up (each depends only on those above it in this list):
//! - [`config`]: one [`config::Config`] per node, every limit named, validated at start;
//! - [`router`]: pattern trie over dot-separated signal types (`*`, `**`, priorities, predicates);
//! - [`wire`]: versioned envelopes and framing;
//! - [`net`]: authenticated, batched, bounded connections between nodes;
//! - [`membership`]: who is in the cluster (SWIM, sans-IO core plus a driver task);
//! - [`node`]: assembles the layers, start-up and graceful shutdown;
//! - [`api`]: the HTTP surface;
//! - [`sim`]: deterministic cluster simulation on turmoil (test support).
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

pub use agent::{Agent, AgentError, CallError, Ctx, Persistence, Reminder, Reply};
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
