//! What an application embedding cadre uses: [`NodeBuilder`] to start a node without filling a
//! [`Config`] by hand, and [`AgentRef`], a typed handle on one agent anywhere in the cluster.
//!
//! ```no_run
//! use cadre::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder("n1").secret("an-example-secret-of-16+-bytes").start().await?;
//! let value: i64 = node.agent::<cadre::agent::counter::Counter>("c1").ask("counter.add", 5).await?;
//! assert_eq!(value, 5);
//! node.shutdown().await;
//! # Ok(()) }
//! ```

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Node, NodeError, NodeOptions};
use crate::agent::reminders::{SetReminder, OP_CANCEL, OP_LIST, OP_SET};
use crate::agent::{Agent, CallError, Reminder, ReminderInfo, Reply};
use crate::cluster::read::{ReadFrom, ReadOpts};
use crate::cluster::Cluster;
use crate::config::{Config, Secret};
use crate::signal::{codec, Signal};
use crate::storage::{Key, Storage};

/// Builds and starts a [`Node`]: the defaults of [`Config`], except that the transport listens on
/// an ephemeral loopback port and no HTTP API runs unless asked for.
pub struct NodeBuilder {
    cfg: Config,
    opts: NodeOptions,
}

impl NodeBuilder {
    pub(super) fn new(name: impl Into<String>) -> NodeBuilder {
        let cfg = Config {
            name: name.into(),
            listen: "127.0.0.1:0".parse().expect("static address"),
            http: None,
            ..Config::default()
        };
        NodeBuilder { cfg, opts: NodeOptions::default() }
    }

    /// The cluster's shared secret (at least [`crate::config::SECRET_LEN_MIN_BYTES`] bytes).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.cfg.secret = Secret::new(secret.as_ref());
        self
    }

    /// The transport address to listen on.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen = addr;
        self
    }

    /// Runs the HTTP API on `addr`.
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.cfg.http = Some(addr);
        self
    }

    /// Joins the cluster through this node's transport address (without seeds, the node forms a
    /// cluster of its own).
    pub fn seed(mut self, addr: SocketAddr) -> Self {
        self.cfg.seeds.push(addr);
        self
    }

    /// Keeps the node's state (metadata, agent states) in `dir`; without, everything is in memory.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cfg.data_dir = Some(dir.into());
        self
    }

    /// Registers an agent type (besides the built-in `counter`).
    pub fn agent<A: Agent>(mut self) -> Self {
        self.opts = self.opts.agent::<A>();
        self
    }

    /// Where agent states live (default: a file under the data dir, or memory without one).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.opts.storage = Some(storage);
        self
    }

    /// Anything else in the config.
    pub fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.cfg);
        self
    }

    /// Starts the node (the config is validated first).
    pub async fn start(self) -> Result<Node, NodeError> {
        Node::start(self.cfg, self.opts).await
    }
}

/// One agent of type `A`, wherever it lives in the cluster: calls reach its owner through the
/// cluster layer. Cheap to clone; made by [`Node::agent`].
pub struct AgentRef<A> {
    cluster: Cluster,
    key: Key,
    timeout: Duration,
    agent: PhantomData<fn() -> A>,
}

impl<A> Clone for AgentRef<A> {
    fn clone(&self) -> Self {
        AgentRef { cluster: self.cluster.clone(), key: self.key.clone(), timeout: self.timeout, agent: PhantomData }
    }
}

impl<A: Agent> AgentRef<A> {
    pub(super) fn new(node: &Node, id: impl Into<String>) -> AgentRef<A> {
        let timeout = Duration::from_millis(node.cfg.agents.call_timeout_ms);
        AgentRef { cluster: node.cluster.clone(), key: Key::new(A::TYPE, id), timeout, agent: PhantomData }
    }

    /// The agent's key (`A::TYPE` and the id).
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Calls time out after `timeout` (default `agents.call_timeout_ms`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `signal` and waits for the reply.
    pub async fn call(&self, signal: Signal) -> Result<Reply, CallError> {
        Ok(self.cluster.call(&self.key, signal, self.timeout).await?.reply)
    }

    /// Sends a signal of type `ty` with `data` as its JSON data, and decodes the reply as `R`.
    pub async fn ask<R: DeserializeOwned>(&self, ty: &str, data: impl Serialize) -> Result<R, CallError> {
        let data = serde_json::to_value(data).map_err(|e| CallError::Reply(format!("the data: {e}")))?;
        let reply = self.call(Signal::new(ty, data)).await?;
        serde_json::from_value(reply).map_err(|e| CallError::Reply(e.to_string()))
    }

    /// Sends `signal` without waiting for the handler.
    pub async fn cast(&self, signal: Signal) -> Result<(), CallError> {
        self.cluster.cast(&self.key, signal, self.timeout).await.map(|_| ())
    }

    /// The agent's stored state, read from its owner.
    pub async fn state(&self) -> Result<A, CallError> {
        let opts = ReadOpts { from: ReadFrom::Owner, stale_ms_max: None };
        let read = self.cluster.read(&self.key, None, opts, self.timeout).await?;
        serde_json::from_value(read.reply).map_err(|e| CallError::Reply(e.to_string()))
    }

    /// Sets the reminder `name` from outside the agent (as [`crate::agent::Ctx::remind`] does
    /// from a handler).
    pub async fn remind(&self, name: &str, when: Reminder, signal: Signal) -> Result<ReminderInfo, CallError> {
        let set = SetReminder {
            name: name.to_string(),
            due_ms: Some(when.due_ms),
            in_ms: None,
            every_ms: when.every_ms,
            signal: codec::to_json(&signal),
        };
        let data = serde_json::to_value(&set).map_err(|e| CallError::Reply(e.to_string()))?;
        let reply = self.call(Signal::new(OP_SET, data)).await?;
        serde_json::from_value(reply["reminder"].clone()).map_err(|e| CallError::Reply(e.to_string()))
    }

    /// The agent's reminders (from its owner).
    pub async fn reminders(&self) -> Result<Vec<ReminderInfo>, CallError> {
        let reply = self.call(Signal::new(OP_LIST, Reply::Null)).await?;
        serde_json::from_value(reply["reminders"].clone()).map_err(|e| CallError::Reply(e.to_string()))
    }

    /// Cancels the reminder `name`; false if there was none.
    pub async fn cancel_reminder(&self, name: &str) -> Result<bool, CallError> {
        let reply = self.call(Signal::new(OP_CANCEL, serde_json::json!({ "name": name }))).await?;
        Ok(reply["cancelled"] == true)
    }

    /// Passivates the agent wherever it lives, after what is in its mailbox, and returns once it
    /// has ended (its state stays stored; the next signal or reminder activates it again); false
    /// if it was not active.
    pub async fn stop(&self) -> Result<bool, CallError> {
        let served = self.cluster.stop(&self.key, self.timeout).await?;
        Ok(served.reply == true)
    }

    /// The member that owns the agent's shard in this node's view of the cluster (`None` while
    /// the shard has no owner).
    pub fn owner(&self) -> Result<Option<String>, CallError> {
        Ok(self.cluster.placement(&self.key)?.owner)
    }
}
