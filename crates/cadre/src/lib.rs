//! cadre: keyed agents and CloudEvents signals across a cluster of nodes.
//!
//! An application starts a [`Node`] (with [`Node::builder`], or [`Node::start`] with a
//! [`Config`] and [`NodeOptions`]), defines agent types with [`Agent`] and reaches one agent
//! anywhere in the cluster with [`Node::agent`] (an [`AgentRef`]). Signals ([`Signal`],
//! CloudEvents) are published and subscribed to on the node's [`Bus`]; agent state lives in a
//! [`Storage`] (memory, redb or Postgres, see [`storage`]).
//!
//! ```no_run
//! use cadre::prelude::*;
//!
//! /// The state is the value (stored as JSON).
//! #[derive(Default, serde::Serialize, serde::Deserialize)]
//! struct Tally {
//!     n: i64,
//! }
//!
//! impl Agent for Tally {
//!     const TYPE: &'static str = "tally";
//!     const ROUTES: &'static [(&'static str, Route<Self>)] = &[("tally.add", Tally::add)];
//! }
//!
//! impl Tally {
//!     fn add(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
//!         self.n += 1;
//!         Ok(self.n.into())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder("n1").secret("a-secret-of-16-bytes-or-more").agent::<Tally>().start().await?;
//! let n: i64 = node.agent::<Tally>("t1").ask("tally.add", ()).await?;
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Public surface
//! - The crate root: the node ([`Node`], [`NodeBuilder`], [`NodeOptions`], [`NodeError`],
//!   [`DataHandler`]), the agent API ([`Agent`], [`Ctx`], [`Reply`], [`AgentRef`],
//!   [`CallError`], [`Reminder`], ...), the bus ([`Bus`], [`SubscriptionSpec`], [`Dispatch`],
//!   [`Middleware`], [`AgentTarget`], ...), [`Metrics`] and [`MemberState`]; [`prelude`] for the
//!   usual imports.
//! - Modules for what comes in families: [`config`] (the config and its sections),
//!   [`signal`] (signals and their [`signal::codec`]), [`storage`] (the trait and its
//!   backends), [`routes`] (route tables), [`webhook`] (signing and verifying webhook
//!   deliveries), [`api`] (the HTTP API's client and its JSON bodies), [`clock`] (the wall clock
//!   reminders use), [`errors`] (the errors found inside those of the crate root).
//!
//! ## The `testing` feature
//! Adds `sim` (deterministic cluster simulation on turmoil) and `storage::conformance` (the
//! suite every [`Storage`] backend must pass), and makes the internal layers reachable (hidden
//! from these docs, with no stability promise), with the accessors of [`Node`], [`Bus`] and
//! [`NodeOptions`] into them, for the crate's own tests, fuzz targets and the CLI's benchmarks.
//! `docs/ARCHITECTURE.md` describes the layers.
#![warn(missing_docs)]

// Methods of public types that reach into the internal layers (accessors for the crate's tests
// and the CLI's benchmarks): public but hidden with the `testing` feature, crate-private
// otherwise, as the layers themselves are (see `internal!` below). Written without a visibility,
// any number in one block: `testing_pub! { /// Docs. fn name(&self) -> T { ... } ... }` (or
// `async fn`).
macro_rules! testing_pub {
    () => {};
    ($(#[$attr:meta])* fn $name:ident $params:tt $(-> $ret:ty)? $body:block $($rest:tt)*) => {
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        $(#[$attr])*
        pub fn $name $params $(-> $ret)? $body

        #[cfg(not(feature = "testing"))]
        #[allow(dead_code)] // Some are used by the tests only.
        $(#[$attr])*
        pub(crate) fn $name $params $(-> $ret)? $body

        testing_pub! { $($rest)* }
    };
    ($(#[$attr:meta])* async fn $name:ident $params:tt $(-> $ret:ty)? $body:block $($rest:tt)*) => {
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        $(#[$attr])*
        pub async fn $name $params $(-> $ret)? $body

        #[cfg(not(feature = "testing"))]
        #[allow(dead_code)] // Some are used by the tests only.
        $(#[$attr])*
        pub(crate) async fn $name $params $(-> $ret)? $body

        testing_pub! { $($rest)* }
    };
}

// Public modules.
pub mod api;
pub mod clock;
pub mod config;
pub mod signal;
pub mod storage;

// Deterministic cluster simulation on turmoil (feature `testing`).
#[cfg(feature = "testing")]
pub mod sim;

// Internal layers: crate-private, or public but hidden with the `testing` feature (tests, fuzz
// targets, benchmarks). Bottom up: `router` (pattern trie over signal types), `wire` (envelopes
// and framing), `net` (connections between nodes), `membership` (SWIM), `agent` (agents on one
// node), `meta`, `placement` and `cluster` (replicated metadata, where each key lives, leases,
// hand-offs, replicas), `bus` (pub/sub), `node` (assembly, start-up and shutdown); `metrics`.
macro_rules! internal {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        #[allow(missing_docs)]
        pub mod $name;
        #[cfg(not(feature = "testing"))]
        pub(crate) mod $name;
    )*};
}

internal!(agent, bus, cluster, membership, meta, metrics, net, node, placement, router, wire);

pub use agent::counter::Counter;
pub use agent::{Agent, AgentError, CallError, Ctx, Persistence, Reminder, ReminderInfo, Reply, Route, Unavailable};
pub use bus::{
    webhook, Bus, DeadLetter, Delivery, Dispatch, HandlerFn, Middleware, Outcome, Overflow, PublishError, Published,
    RoutesError, SubId, SubscribeError, Subscription, SubscriptionInfo, SubscriptionSpec, Target, Verdict,
};
pub use config::{Config, ConfigError, Secret};
pub use membership::MemberState;
pub use meta::AgentTarget;
pub use metrics::Metrics;
pub use net::{AskError, PeerInfo, SendError};
pub use node::{AgentRef, DataHandler, Node, NodeBuilder, NodeError, NodeOptions};
pub use router::table as routes;
pub use signal::{Data, Signal};
pub use storage::{Key, Storage, StorageError};

/// The errors found inside those of the crate root: why the metadata group could not start
/// ([`StartError`](errors::StartError), in [`NodeError::Meta`], and its causes), why the leader
/// refused a request ([`ControlError`](errors::ControlError), in [`Unavailable::Control`], and
/// [`MetaError`](errors::MetaError)), and why a cluster-wide route to agents is invalid
/// ([`AgentRouteError`](errors::AgentRouteError), in [`CallError::InvalidRoute`]).
///
/// The errors an application meets first are at the crate root: [`NodeError`] (a node did not
/// start), [`CallError`], [`Unavailable`] and [`AgentError`] (agents), [`PublishError`],
/// [`SubscribeError`] and [`RoutesError`] (the bus), [`ConfigError`], [`StorageError`],
/// [`SendError`] and [`AskError`] (messages between nodes).
pub mod errors {
    pub use crate::cluster::protocol::ControlError;
    pub use crate::cluster::StartError;
    pub use crate::meta::store::{MetaDbError, SmOpenError};
    pub use crate::meta::{AgentRouteError, InvariantError, MetaError};
}

/// What an application embedding cadre usually needs: `use cadre::prelude::*;`.
pub mod prelude {
    pub use crate::agent::{Agent, AgentError, CallError, Ctx, Persistence, Reminder, Reply, Route};
    pub use crate::node::{AgentRef, Node, NodeBuilder};
    pub use crate::signal::Signal;
    pub use crate::storage::Key;
}
