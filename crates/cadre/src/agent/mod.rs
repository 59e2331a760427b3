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

pub mod counter;
pub mod handled;
pub mod reminders;

pub use reminders::{Reminder, ReminderInfo};

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::{Fence, Key, Revision, Storage, StorageError};

/// Times a call looks for a live activation (one closing as it sends is retried).
pub const CALL_ATTEMPTS_MAX: usize = 3;

/// What a handler answers.
pub type Reply = serde_json::Value;

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

/// Signals one handled signal may emit (and casts it may send, counted together).
pub const EMITS_PER_CALL_MAX: usize = 256;

/// The extension that carries the chain of agents waiting on a call: a comma-separated list of
/// [`chain_link`]s, the first caller first. Set by [`Ctx::call`]; read where the call arrives.
pub const CALL_CHAIN: &str = "cadrechain";
/// Agents one chain of calls may hold: a call that would make it longer fails with
/// [`CallError::TooDeep`].
pub const CALL_DEPTH_MAX: usize = 16;

/// How a handler's calls and casts reach other agents, wherever they live: `Some(timeout)` a
/// call, `None` a cast. Set by the node (its cluster); a host alone calls its own agents.
pub type Caller =
    Arc<dyn Fn(Key, Signal, Option<Duration>) -> BoxFuture<'static, Result<Reply, CallError>> + Send + Sync>;

/// What stands for `key` in a call chain: 64 bits of SHA-256 over its encoding, in hex (a key
/// may hold any character, a link only hex digits).
pub fn chain_link(key: &Key) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.encode());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses a call to `key` whose chain holds it already (its activation is waiting on this very
/// chain: the call would wait forever) or that is longer than [`CALL_DEPTH_MAX`].
fn check_chain(key: &Key, signal: &Signal) -> Result<(), CallError> {
    let Some(chain) = signal.extension(CALL_CHAIN) else { return Ok(()) };
    let len = chain.split(',').count();
    if len > CALL_DEPTH_MAX {
        return Err(CallError::TooDeep(len));
    }
    let link = chain_link(key);
    if chain.split(',').any(|l| l == link) {
        return Err(CallError::Cycle(format!("{key:?} is waiting on this chain of {len} calls")));
    }
    Ok(())
}

/// What a handler can see of its activation.
pub struct Ctx {
    key: Key,
    revision: Revision,
    /// The signal being handled, as the cause of what the handler emits.
    cause: Option<Signal>,
    /// The call chain the signal being handled came with.
    chain: Option<String>,
    emitted: Vec<Signal>,
    /// Casts to send once the call succeeds.
    casts: Vec<(Key, Signal)>,
    /// Signals made by [`Ctx::signal`] while handling this one.
    made: u32,
    caller: Option<Caller>,
    call_timeout: Duration,
    /// A read ([`Host::read`]): calls and casts are refused.
    reading: bool,
    /// The agent's reminders, as the handler left them (stored with the next write).
    reminders: reminders::Table,
    /// `reminders` differs from what is stored.
    reminders_dirty: bool,
    /// Timers to start once the call succeeds.
    timers_pending: Vec<(Duration, Signal)>,
    /// Timers waiting; cancelled when the activation ends (the scope is).
    timers: Vec<CancellationToken>,
    timer_scope: CancellationToken,
}

impl Ctx {
    fn new(key: Key, revision: Revision, call_timeout: Duration) -> Ctx {
        Ctx {
            key,
            revision,
            cause: None,
            chain: None,
            emitted: Vec::new(),
            casts: Vec::new(),
            made: 0,
            caller: None,
            call_timeout,
            reading: false,
            reminders: reminders::Table::new(),
            reminders_dirty: false,
            timers_pending: Vec::new(),
            timers: Vec::new(),
            timer_scope: CancellationToken::new(),
        }
    }

    /// Starts handling `signal`: what the handler emits, casts and calls follows from it.
    fn begin(&mut self, signal: &Signal) {
        self.cause = Some(cause_of(signal));
        self.chain = signal.extension(CALL_CHAIN).map(str::to_string);
        self.emitted.clear();
        self.casts.clear();
        self.timers_pending.clear();
        self.made = 0;
    }

    /// Sets the reminder `name` (replacing one of that name): `signal` is sent to this agent when
    /// it is due, on whichever node then owns it, activating it if needed. Stored with the state
    /// once the call succeeds (see [`reminders`]); each tick fires once. Fails for a bad name, a
    /// period under [`reminders::REMINDER_PERIOD_MIN_MS`], more than
    /// [`reminders::REMINDERS_PER_AGENT_MAX`] reminders, or an invalid or oversized signal.
    pub fn remind(&mut self, name: &str, when: Reminder, signal: Signal) -> Result<(), AgentError> {
        if self.reading {
            return Err(AgentError::Failed(format!("a read sets no reminder ({name:?})")));
        }
        let key_len = self.key.ty.len() + 1 + self.key.id.len();
        if key_len + reminders::INDEX_KEY_OVERHEAD_BYTES > crate::storage::KEY_LEN_MAX_BYTES {
            return Err(AgentError::Failed(format!("a key of {key_len} bytes is too long for reminders")));
        }
        let r = reminders::make(&self.reminders, name, when, &signal).map_err(AgentError::Failed)?;
        self.reminders.insert(name.to_string(), r);
        self.reminders_dirty = true;
        Ok(())
    }

    /// Cancels the reminder `name`; false if there was none.
    pub fn cancel_reminder(&mut self, name: &str) -> bool {
        let had = self.reminders.remove(name).is_some();
        self.reminders_dirty |= had;
        had
    }

    /// This agent's reminders, by name.
    pub fn reminders(&self) -> impl Iterator<Item = &ReminderInfo> {
        self.reminders.values()
    }

    /// Sends `signal` to this agent after `after`, if this activation still lives then: a timer
    /// is not stored, dies with the activation (passivation, a move, a crash) and does not keep
    /// it active. Started once the call succeeds. At most [`reminders::TIMERS_PER_AGENT_MAX`]
    /// waiting per activation.
    pub fn timer(&mut self, after: Duration, signal: Signal) -> Result<(), AgentError> {
        if self.reading {
            return Err(AgentError::Failed("a read sets no timer".into()));
        }
        self.timers.retain(|t| !t.is_cancelled());
        if self.timers.len() + self.timers_pending.len() >= reminders::TIMERS_PER_AGENT_MAX {
            return Err(AgentError::Failed(format!(
                "an activation has at most {} timers waiting",
                reminders::TIMERS_PER_AGENT_MAX
            )));
        }
        let signal = self.caused(signal);
        self.timers_pending.push((after, signal));
        Ok(())
    }

    /// Starts the timers the call set (it succeeded).
    fn start_timers(&mut self) {
        let Some(caller) = self.caller.clone() else {
            self.timers_pending.clear();
            return;
        };
        for (after, signal) in self.timers_pending.drain(..) {
            let token = self.timer_scope.child_token();
            self.timers.push(token.clone());
            let (caller, key) = (caller.clone(), self.key.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    _ = token.cancelled() => return,
                }
                token.cancel();
                let id = signal.id.clone();
                if let Err(e) = caller(key.clone(), signal, None).await {
                    debug!(key = ?key, %id, error = %e, "a timer's signal was refused");
                }
            });
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Revision of the stored state (0: never stored).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Emits a signal, published once the call succeeds (after its state is stored, before the
    /// reply), with the handled signal as its cause; dropped if the call fails. At most
    /// [`EMITS_PER_CALL_MAX`] per call, casts included.
    pub fn emit(&mut self, signal: Signal) -> Result<(), AgentError> {
        self.check_effects()?;
        let signal = self.caused(signal);
        self.emitted.push(signal);
        Ok(())
    }

    /// A signal from this agent (source `/agents/{type}/{id}`) whose id follows from the signal
    /// being handled and from how many this handler made before: handling the same signal again
    /// (a retry after a failure) makes the same ids, so the agents they go to handle them once.
    pub fn signal(&mut self, ty: impl Into<String>, data: serde_json::Value) -> Signal {
        let n = self.made;
        self.made += 1;
        let id = match &self.cause {
            Some(c) => {
                let of: String =
                    handled::handled_id(&c.source, &c.id)[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("{of}-{n}")
            }
            None => crate::signal::new_id(),
        };
        let mut signal = Signal::new(ty, data);
        signal.id = id;
        signal.source = format!("/agents/{}/{}", self.key.ty, self.key.id);
        signal
    }

    /// Calls the agent `key`, wherever it lives, and waits for its reply (at most
    /// `agents.call_timeout_ms`). This agent handles nothing else meanwhile: agents are not
    /// reentrant. The chain of waiting agents goes with the call, so a call back to one of them
    /// (this one included) fails at once with [`CallError::Cycle`] instead of waiting for the
    /// timeout. The call is not undone if this handler fails later: give it a [`Ctx::signal`]
    /// so that a retry reaches the callee as a duplicate.
    pub async fn call(&mut self, key: &Key, signal: Signal) -> Result<Reply, CallError> {
        if self.reading {
            return Err(CallError::NotRead(format!("a read calls no agent ({key:?})")));
        }
        let mine = chain_link(&self.key);
        let chain = match &self.chain {
            Some(c) => format!("{c},{mine}"),
            None => mine,
        };
        let signal = self.caused(signal).with_extension(CALL_CHAIN, chain);
        // Refused here already when it would come back to a waiting agent: no need to travel.
        check_chain(key, &signal)?;
        let caller = self.caller.clone().ok_or(CallError::Unavailable(Unavailable::NoAgentRoute))?;
        caller(key.clone(), signal, Some(self.call_timeout)).await
    }

    /// Sends `signal` to the agent `key` without waiting for it: sent once this call succeeds
    /// (after its state is stored), dropped if it fails, as [`Ctx::emit`]. A cast carries no
    /// call chain: nobody waits on it.
    pub fn cast(&mut self, key: Key, signal: Signal) -> Result<(), AgentError> {
        self.check_effects()?;
        if self.reading {
            return Err(AgentError::Failed(format!("a read casts to no agent ({key:?})")));
        }
        key.check().map_err(|e| AgentError::Failed(e.to_string()))?;
        let signal = self.caused(signal);
        self.casts.push((key, signal));
        Ok(())
    }

    fn check_effects(&self) -> Result<(), AgentError> {
        if self.emitted.len() + self.casts.len() >= EMITS_PER_CALL_MAX {
            return Err(AgentError::Failed(format!("more than {EMITS_PER_CALL_MAX} signals emitted by one call")));
        }
        Ok(())
    }

    /// `signal` as caused by the one handled, without a call chain it may have been copied with.
    fn caused(&self, mut signal: Signal) -> Signal {
        signal.extensions.remove(CALL_CHAIN);
        match &self.cause {
            Some(cause) => signal.caused_by(cause),
            None => signal,
        }
    }
}

/// Publishes what a call emitted (the node's bus); awaited before the call's reply.
pub type Emitter = Arc<dyn Fn(Vec<Signal>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// An agent type. The value is the state.
pub trait Agent: Serialize + DeserializeOwned + Default + Send + 'static {
    /// The type name, as in keys and signals (`counter`).
    const TYPE: &'static str;
    /// When the state is stored.
    const PERSISTENCE: Persistence = Persistence::WriteThrough;

    /// Signal type → handler, for types whose handlers need not await. The default
    /// [`Agent::handle`] dispatches on it (exact type; another type fails the call with
    /// [`AgentError::Failed`]). A type that awaits in its handlers overrides `handle` instead.
    const ROUTES: &'static [(&'static str, Route<Self>)] = &[];

    fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> impl Future<Output = Result<Reply, AgentError>> + Send {
        let result = dispatch(Self::ROUTES, self, ctx, signal);
        std::future::ready(result)
    }

    fn on_activate(&mut self, _ctx: &mut Ctx) -> impl Future<Output = ()> + Send {
        async {}
    }

    fn on_passivate(&mut self, _ctx: &mut Ctx) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A handler of one signal type (see [`Agent::ROUTES`]).
pub type Route<A> = fn(&mut A, &mut Ctx, Signal) -> Result<Reply, AgentError>;

/// Runs the handler `routes` gives for the signal's type.
pub fn dispatch<A: Agent>(
    routes: &[(&'static str, Route<A>)],
    agent: &mut A,
    ctx: &mut Ctx,
    signal: Signal,
) -> Result<Reply, AgentError> {
    match routes.iter().find(|(ty, _)| *ty == signal.ty) {
        Some((_, handler)) => handler(agent, ctx, signal),
        None => Err(AgentError::Failed(format!("a {} does not handle {:?}", A::TYPE, signal.ty))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Store after every handled signal that changed the state, before replying.
    WriteThrough,
    /// Store on passivation only (a crash loses what changed since activation).
    OnPassivate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum CallError {
    #[error("unknown agent type {0:?}")]
    UnknownType(String),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("the mailbox of {0} is full")]
    MailboxFull(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Handler(String),
    #[error("the agent crashed more than its restart limit and was stopped")]
    Crashed,
    #[error("storage: {0}")]
    Storage(StorageError),
    #[error("unavailable: {0}")]
    Unavailable(Unavailable),
    /// The key's shard is not served here; `owner` at `epoch` is, as far as this node knows.
    #[error("not the owner of this key's shard{}", owner.as_ref().map(|o| format!(" (owner: {o}, epoch {epoch})")).unwrap_or_default())]
    NotOwner { owner: Option<String>, epoch: u64 },
    /// A read-only call ([`Host::read`]) changed the state or emitted signals: it is not a read.
    #[error("not a read: {0}")]
    NotRead(String),
    /// The agent handled this signal (same source and id) before and its reply is no longer
    /// kept: it was not handled again (see [`handled`]). Not a failure: the signal took effect.
    #[error("a duplicate: this signal was handled before")]
    Duplicate,
    /// A call to an agent that is waiting on the chain of calls this one belongs to (see
    /// [`Ctx::call`]): it would wait forever, so it fails at once.
    #[error("a call cycle: {0}")]
    Cycle(String),
    /// A call that would make its chain longer than [`CALL_DEPTH_MAX`] agents.
    #[error("a chain of {0} calls is longer than {CALL_DEPTH_MAX}")]
    TooDeep(usize),
    /// A typed handle's reply (or data) does not match the type asked for
    /// ([`crate::node::AgentRef::ask`]).
    #[error("the reply does not decode: {0}")]
    Reply(String),
    /// A cluster-wide route that cannot be added as given (see [`crate::meta::AgentRoute::check`]).
    #[error("invalid route: {0}")]
    InvalidRoute(String),
}

/// Why a call was not served: nothing ran, and the caller may try again (here later, or on
/// another node).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Unavailable {
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the cluster has no shard table yet")]
    NoShardTable,
    #[error("shard {shard} has no owner yet")]
    NoOwner { shard: u32 },
    #[error("shard {shard} is being handed over")]
    HandingOver { shard: u32 },
    #[error("this node's lease has expired")]
    LeaseExpired,
    #[error("shard {shard} is opening (fencing its replicas)")]
    Opening { shard: u32 },
    /// The shard was given to this node again at a new epoch: the activation stops and starts
    /// afresh from the store.
    #[error("the shard's epoch changed; the agent restarts")]
    EpochChanged,
    /// A replica's table is too old to answer a read.
    #[error("this replica's table is {age_ms} ms old (at most {stale_ms_max} allowed)")]
    Stale { age_ms: u64, stale_ms_max: u64 },
    /// A bounded resource is full (`what` in flight, at most `limit`).
    #[error("more than {limit} {what} in flight")]
    Busy { what: String, limit: usize },
    /// The owner changed more often than a call follows.
    #[error("too many owner changes for {key}")]
    OwnerChanges { key: String },
    /// More redirects than a call follows.
    #[error("too many redirects for {key}")]
    Redirects { key: String },
    /// No node served the key's shard before the deadline.
    #[error("no serving owner found for {key}")]
    NoServingOwner { key: String },
    /// No owner or in-sync replica could serve a read before the deadline.
    #[error("no copy of {key} could serve the read")]
    NoServingCopy { key: String },
    /// The activation kept closing under the call (the shard was moving or stopping).
    #[error("{key} kept closing")]
    KeptClosing { key: String },
    #[error("{node} has no known address")]
    NoAddress { node: String },
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

/// Decides whether a key is served here, and with which fence its writes go out.
pub trait Gate: Send + Sync + 'static {
    /// May new work for `key` start here? Called under the host's table lock: must be quick.
    fn admit(&self, key: &Key) -> Result<Fence, CallError>;
    /// May a write for `key` go ahead (also while its shard is being handed off)?
    fn write(&self, key: &Key) -> Result<Fence, CallError>;
    /// The shards served here now, with their epochs (the reminder schedule loads their index).
    /// By default every shard of [`crate::placement::SHARD_COUNT_DEFAULT`] at epoch 1.
    fn served(&self) -> Vec<(u32, u64)> {
        (0..crate::placement::SHARD_COUNT_DEFAULT).map(|s| (s, 1)).collect()
    }
}

/// Serves every key, at epoch 1 of its shard (of [`crate::placement::SHARD_COUNT_DEFAULT`]).
pub struct LocalGate;

impl Gate for LocalGate {
    fn admit(&self, key: &Key) -> Result<Fence, CallError> {
        Ok(Fence { shard: crate::placement::shard_of(key, crate::placement::SHARD_COUNT_DEFAULT), epoch: 1 })
    }
    fn write(&self, key: &Key) -> Result<Fence, CallError> {
        self.admit(key)
    }
}

enum Msg {
    /// Boxed: mailbox slots stay small.
    Call {
        signal: Box<Signal>,
        reply: Option<oneshot::Sender<Result<Reply, CallError>>>,
    },
    /// Fire the reminders that are due (sent by the schedule).
    Fire,
    Stop,
}

/// Agents one [`Host::list`] answers at most.
pub const LIST_PAGE_MAX: usize = 1000;

/// What a node knows of one active agent ([`Host::list`], [`Host::info`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub id: String,
    /// The shard epoch it was activated at.
    pub epoch: u64,
    /// When this activation started (Unix ms).
    pub since_ms: u64,
    /// Signals this activation handled (failed ones included; duplicates answered from the
    /// record of handled signals not).
    pub handled: u64,
    /// When it last handled one (Unix ms; 0: none yet).
    pub last_call_ms: u64,
    /// Signals waiting in its mailbox.
    pub mailbox_len: usize,
    /// Restarts (after fatal errors or panics) of this activation.
    pub restarts: u32,
}

/// Counters of one activation, shared by its task (which writes) and the table (which reads).
struct Stats {
    since_ms: u64,
    epoch: std::sync::atomic::AtomicU64,
    handled: std::sync::atomic::AtomicU64,
    last_call_ms: std::sync::atomic::AtomicU64,
    restarts: std::sync::atomic::AtomicU32,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            since_ms: crate::clock::wall_ms(),
            epoch: Default::default(),
            handled: Default::default(),
            last_call_ms: Default::default(),
            restarts: Default::default(),
        }
    }

    fn info(&self, id: &str, tx: &mpsc::Sender<Msg>) -> AgentInfo {
        use std::sync::atomic::Ordering::Relaxed;
        AgentInfo {
            id: id.to_string(),
            epoch: self.epoch.load(Relaxed),
            since_ms: self.since_ms,
            handled: self.handled.load(Relaxed),
            last_call_ms: self.last_call_ms.load(Relaxed),
            mailbox_len: tx.max_capacity() - tx.capacity(),
            restarts: self.restarts.load(Relaxed),
        }
    }
}

enum Slot {
    Active {
        tx: mpsc::Sender<Msg>,
        stats: Arc<Stats>,
        tick: u64,
        /// Cancelled when the activation has ended (its slot removed).
        ended: CancellationToken,
    },
    /// Gone once its last write is done; notified then.
    Stopping(Arc<Notify>, CancellationToken),
}

#[derive(Default)]
struct Table {
    /// FxHash: keys are hashed on every call, and they are not attacker-chosen map sizes (the
    /// active limit bounds them).
    slots: FxHashMap<Key, Slot>,
    /// Active keys by last use, for least-recently-used passivation.
    lru: BTreeMap<u64, Key>,
    next_tick: u64,
}

type Spawner = Arc<dyn Fn(Arc<HostInner>, Key, mpsc::Receiver<Msg>, Arc<Stats>) + Send + Sync>;
/// Runs a read-only call of one type on a state loaded from the store (see [`Host::read`]).
type Reader =
    Arc<dyn Fn(Arc<HostInner>, Key, Option<Signal>) -> BoxFuture<'static, Result<Reply, CallError>> + Send + Sync>;

/// Reads ([`Host::read`]) running at once on one node; more are refused `Unavailable` at once
/// (each holds a decoded state, outside any mailbox, so they need their own bound).
pub const READS_IN_FLIGHT_MAX: usize = 1024;

struct HostInner {
    cfg: AgentsConfig,
    storage: Arc<dyn Storage>,
    gate: Arc<dyn Gate>,
    types: HashMap<&'static str, (Spawner, Reader)>,
    table: Mutex<Table>,
    reads: Arc<tokio::sync::Semaphore>,
    cancel: CancellationToken,
    /// Set by [`Host::abort`]: activations end without passivating, as in a crash.
    aborted: std::sync::atomic::AtomicBool,
    /// Publishes what handlers emit (set once by the node).
    emitter: std::sync::OnceLock<Emitter>,
    /// Carries handlers' calls and casts (set once by the node; else to this host's agents).
    caller: std::sync::OnceLock<Caller>,
    /// Duplicates answered without running the handler: [reply kept, reply gone].
    duplicates: [prometheus_client::metrics::counter::Counter; 2],
    /// Reminder ticks fired: [handled, failed]; ticks skipped as too far behind.
    fires: [prometheus_client::metrics::counter::Counter; 2],
    skipped: prometheus_client::metrics::counter::Counter,
    schedule: Mutex<reminders::Schedule>,
    schedule_wake: Notify,
    tasks: TaskTracker,
}

/// Registers agent types, then [`HostBuilder::build`]s a host.
pub struct HostBuilder {
    cfg: AgentsConfig,
    storage: Arc<dyn Storage>,
    gate: Arc<dyn Gate>,
    types: HashMap<&'static str, (Spawner, Reader)>,
    duplicates: Option<crate::metrics::CounterFamily>,
    reminder_metrics: Option<(crate::metrics::CounterFamily, prometheus_client::metrics::counter::Counter)>,
}

impl HostBuilder {
    pub fn new(cfg: AgentsConfig, storage: Arc<dyn Storage>) -> Self {
        assert!(cfg.mailbox_len_max > 0 && cfg.agents_active_max > 0, "host limits must be positive: {cfg:?}");
        Self {
            cfg,
            storage,
            gate: Arc::new(LocalGate),
            types: HashMap::new(),
            duplicates: None,
            reminder_metrics: None,
        }
    }

    /// Counts what the host does in `metrics` (`agent_duplicates{reply}`).
    pub fn metrics(mut self, metrics: &crate::metrics::Metrics) -> Self {
        let help = "Signals an agent had handled before, answered without handling them again, by whether their reply was kept";
        self.duplicates = Some(metrics.counters("agent_duplicates", help));
        let fires = metrics.counters("reminder_fires", "Reminder ticks fired, by whether their handler succeeded");
        let skipped = metrics.counter(
            "reminder_ticks_skipped",
            "Ticks of periodic reminders skipped because more than the limit were missed",
        );
        self.reminder_metrics = Some((fires, skipped));
        self
    }

    pub fn gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    pub fn agent<A: Agent>(mut self) -> Self {
        assert_ne!(A::TYPE, reminders::REMINDER_INDEX_TYPE, "an agent type may not be named {:?}", A::TYPE);
        let spawn: Spawner = Arc::new(|host: Arc<HostInner>, key: Key, rx: mpsc::Receiver<Msg>, stats| {
            let tasks = host.tasks.clone();
            tasks.spawn(run::<A>(host, key, rx, stats));
        });
        let read: Reader = Arc::new(|host: Arc<HostInner>, key: Key, query: Option<Signal>| {
            Box::pin(async move { read::<A>(&host, &key, query).await })
        });
        self.types.insert(A::TYPE, (spawn, read));
        self
    }

    pub fn build(self) -> Host {
        // One statement per series: the guard `get_or_create` returns holds the family's lock
        // until the end of its statement, and creating the next series takes it to write.
        let mut duplicates: [prometheus_client::metrics::counter::Counter; 2] = Default::default();
        if let Some(f) = &self.duplicates {
            for (counter, reply) in duplicates.iter_mut().zip(["kept", "gone"]) {
                let series = f.get_or_create(&crate::metrics::label("reply", reply)).clone();
                *counter = series;
            }
        }
        let mut fires: [prometheus_client::metrics::counter::Counter; 2] = Default::default();
        let mut skipped = prometheus_client::metrics::counter::Counter::default();
        if let Some((f, s)) = &self.reminder_metrics {
            for (counter, outcome) in fires.iter_mut().zip(["handled", "failed"]) {
                let series = f.get_or_create(&crate::metrics::label("outcome", outcome)).clone();
                *counter = series;
            }
            skipped = s.clone();
        }
        let host = Host {
            inner: Arc::new(HostInner {
                cfg: self.cfg,
                storage: self.storage,
                gate: self.gate,
                types: self.types,
                table: Mutex::new(Table::default()),
                reads: Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT_MAX)),
                cancel: CancellationToken::new(),
                aborted: std::sync::atomic::AtomicBool::new(false),
                emitter: std::sync::OnceLock::new(),
                caller: std::sync::OnceLock::new(),
                duplicates,
                fires,
                skipped,
                schedule: Mutex::new(reminders::Schedule::default()),
                schedule_wake: Notify::new(),
                tasks: TaskTracker::new(),
            }),
        };
        // The schedule runs on the runtime the host is built in (a host built outside one, in a
        // synchronous test, fires no reminders).
        if tokio::runtime::Handle::try_current().is_ok() {
            host.inner.tasks.spawn(reminders::run(Arc::downgrade(&host.inner)));
        }
        host
    }
}

/// Active agents by key on this node; cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl HostInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, reminders::Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the schedule when `key` is due next (`None`: it has no reminders).
    fn reschedule(&self, key: &Key, shard: u32, due_ms: Option<u64>) {
        if self.schedule().set(key, shard, due_ms) {
            self.schedule_wake.notify_one();
        }
    }

    /// What carries handlers' calls: the node's, else one to this host's own agents (weak: the
    /// activations hold it, and the host must be able to go).
    fn caller(self: &Arc<Self>) -> Caller {
        if let Some(c) = self.caller.get() {
            return c.clone();
        }
        let host = Arc::downgrade(self);
        Arc::new(move |key, signal, timeout| {
            let host = host.upgrade().map(|inner| Host { inner });
            Box::pin(async move {
                let host = host.ok_or(CallError::Unavailable(Unavailable::ShuttingDown))?;
                match timeout {
                    Some(t) => host.call(&key, signal, t).await,
                    None => host.cast(&key, signal).await.map(|()| Reply::Null),
                }
            })
        })
    }
}

impl Host {
    /// Sets what publishes the signals handlers emit (without one they are dropped). Once.
    pub fn set_emitter(&self, emitter: Emitter) {
        assert!(self.inner.emitter.set(emitter).is_ok(), "the host's emitter set twice");
    }

    /// Sets what carries handlers' calls and casts to other agents ([`Ctx::call`]). Once.
    pub fn set_caller(&self, caller: Caller) {
        assert!(self.inner.caller.set(caller).is_ok(), "the host's caller set twice");
    }

    /// Sends `signal` to the agent `key` (activating it) and waits for the reply.
    pub async fn call(&self, key: &Key, signal: Signal, timeout: Duration) -> Result<Reply, CallError> {
        // Boxed before the futures below capture it: they stay small to move and poll.
        let signal = Box::new(signal);
        let call = async {
            let (tx, rx) = oneshot::channel();
            self.send(key, Msg::Call { signal, reply: Some(tx) }).await?;
            match rx.await {
                Err(_) => Err(CallError::Unavailable(Unavailable::NoReply)),
                Ok(r) => r,
            }
        };
        tokio::time::timeout(timeout, call).await.unwrap_or(Err(CallError::Timeout(timeout)))
    }

    /// Sends `signal` without waiting for the handler.
    pub async fn cast(&self, key: &Key, signal: Signal) -> Result<(), CallError> {
        self.send(key, Msg::Call { signal: Box::new(signal), reply: None }).await
    }

    /// Activates the agent if it is not active.
    pub async fn ensure(&self, key: &Key) -> Result<(), CallError> {
        self.sender(key).await.map(|_| ())
    }

    /// Whether agents of this type can run here.
    pub fn has_type(&self, ty: &str) -> bool {
        self.inner.types.contains_key(ty)
    }

    /// Whether the agent is active here.
    pub fn is_active(&self, key: &Key) -> bool {
        matches!(self.inner.lock().slots.get(key), Some(Slot::Active { .. }))
    }

    /// Active agents on this node.
    pub fn active(&self) -> usize {
        self.inner.lock().lru.len()
    }

    /// Ids of type `ty` with a state in this node's store, after `after`, in order; at most
    /// `limit` (and [`LIST_PAGE_MAX`]).
    pub async fn stored(&self, ty: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>, CallError> {
        if !self.has_type(ty) {
            return Err(CallError::UnknownType(ty.to_string()));
        }
        let limit = limit.min(LIST_PAGE_MAX);
        // Keys order by type, then id: those of `ty` start right after (ty, "") (a key with an
        // empty id is not listed).
        let from = Key::new(ty, after.unwrap_or(""));
        let keys = self.inner.storage.scan_keys(Some(&from), limit).await.map_err(CallError::Storage)?;
        Ok(keys.into_iter().take_while(|k| k.ty == ty).map(|k| k.id).collect())
    }

    /// Agents with reminders this node's schedule knows (on the shards it serves).
    pub fn reminders_scheduled(&self) -> usize {
        self.inner.schedule().len()
    }

    /// Whether the store is shared by every node (one node's scan sees every key).
    pub fn storage_shared(&self) -> bool {
        self.inner.storage.shared()
    }

    /// The active agent `key` (None: not active here).
    pub fn info(&self, key: &Key) -> Option<AgentInfo> {
        match self.inner.lock().slots.get(key) {
            Some(Slot::Active { tx, stats, .. }) => Some(stats.info(&key.id, tx)),
            _ => None,
        }
    }

    /// Active agents of type `ty` here, by id, those after `after` first; at most `limit` (and
    /// [`LIST_PAGE_MAX`]). One pass over the table under its lock, keeping the `limit` smallest.
    pub fn list(&self, ty: &str, after: Option<&str>, limit: usize) -> Vec<AgentInfo> {
        let limit = limit.min(LIST_PAGE_MAX);
        if limit == 0 {
            return Vec::new();
        }
        let t = self.inner.lock();
        // Keys of one type order by id.
        let mut smallest: std::collections::BinaryHeap<&Key> = Default::default();
        for (key, slot) in &t.slots {
            if !matches!(slot, Slot::Active { .. }) || key.ty != ty || after.is_some_and(|a| key.id.as_str() <= a) {
                continue;
            }
            if smallest.len() < limit {
                smallest.push(key);
            } else if smallest.peek().is_some_and(|top| key < *top) {
                smallest.pop();
                smallest.push(key);
            }
        }
        let mut page: Vec<AgentInfo> = smallest
            .into_iter()
            .filter_map(|key| match t.slots.get(key) {
                Some(Slot::Active { tx, stats, .. }) => Some(stats.info(&key.id, tx)),
                _ => None,
            })
            .collect();
        page.sort_by(|a, b| a.id.cmp(&b.id));
        page
    }

    /// A read of the agent's *stored* state, outside its activation (none is started, the
    /// mailbox is not used): with `query`, the type's handler runs on a copy decoded from the
    /// store and its reply is returned; without, the stored state itself (the default state when
    /// none is stored). Nothing is written: a handler that changes the state or emits signals
    /// fails the read with [`CallError::NotRead`].
    ///
    /// The gate is not asked: the caller decides whether this node's copy may be read (the
    /// owner's, or an in-sync replica's, see [`crate::cluster::read`]). What is read is what the
    /// store holds: for [`Persistence::OnPassivate`] types, the state as of the last passivation.
    pub async fn read(&self, key: &Key, query: Option<Signal>) -> Result<Reply, CallError> {
        let (_, reader) =
            self.inner.types.get(key.ty.as_str()).ok_or_else(|| CallError::UnknownType(key.ty.clone()))?;
        key.check().map_err(|e| CallError::InvalidKey(e.to_string()))?;
        let Ok(_permit) = self.inner.reads.clone().try_acquire_owned() else {
            return Err(CallError::Unavailable(Unavailable::Busy { what: "reads".into(), limit: READS_IN_FLIGHT_MAX }));
        };
        if self.inner.cancel.is_cancelled() {
            return Err(CallError::Unavailable(Unavailable::ShuttingDown));
        }
        reader(self.inner.clone(), key.clone(), query).await
    }

    /// Passivates the agent (after what is in its mailbox); false if it was not active.
    pub async fn stop(&self, key: &Key) -> bool {
        let tx = match self.inner.lock().slots.get(key) {
            Some(Slot::Active { tx, .. }) => tx.clone(),
            _ => return false,
        };
        tx.send(Msg::Stop).await.is_ok()
    }

    /// Passivates every active agent whose key matches and waits until each has stored its state
    /// and ended. Returns how many there were. Used when this node gives a shard up.
    pub async fn passivate_where(&self, pred: impl Fn(&Key) -> bool) -> usize {
        let victims: Vec<(Option<mpsc::Sender<Msg>>, CancellationToken)> = {
            let t = self.inner.lock();
            let matching = t.slots.iter().filter(|(k, _)| pred(k));
            matching
                .map(|(_, s)| match s {
                    Slot::Active { tx, ended, .. } => (Some(tx.clone()), ended.clone()),
                    Slot::Stopping(_, ended) => (None, ended.clone()),
                })
                .collect()
        };
        for (tx, _) in &victims {
            if let Some(tx) = tx {
                // Queued behind the calls already in the mailbox, which are handled first.
                let _ = tx.send(Msg::Stop).await;
            }
        }
        for (_, ended) in &victims {
            ended.cancelled().await;
        }
        victims.len()
    }

    /// Ends every activation as a crash would: no passivation, no last write (what write-through
    /// stored stays; on-passivation agents lose what changed). Pending calls fail.
    pub async fn abort(&self) {
        self.inner.aborted.store(true, std::sync::atomic::Ordering::Release);
        self.shutdown().await;
    }

    /// Passivates every agent and waits for their last writes.
    pub async fn shutdown(&self) {
        {
            // Under the table lock: no activation is spawned after this (see `sender`).
            let _table = self.inner.lock();
            self.inner.cancel.cancel();
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    async fn send(&self, key: &Key, msg: Msg) -> Result<(), CallError> {
        if let Msg::Call { signal, .. } = &msg {
            check_chain(key, signal)?;
        }
        let mut msg = msg;
        for _ in 0..CALL_ATTEMPTS_MAX {
            let tx = self.sender(key).await?;
            match tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => return Err(CallError::MailboxFull(format!("{key:?}"))),
                // Closing as we sent: look again (it will be Stopping, then gone).
                Err(mpsc::error::TrySendError::Closed(m)) => msg = m,
            }
        }
        Err(CallError::Unavailable(Unavailable::KeptClosing { key: format!("{key:?}") }))
    }

    /// The mailbox of the live activation, activating one if needed.
    async fn sender(&self, key: &Key) -> Result<mpsc::Sender<Msg>, CallError> {
        let inner = &self.inner;
        let (spawn, _) = inner.types.get(key.ty.as_str()).ok_or_else(|| CallError::UnknownType(key.ty.clone()))?;
        key.check().map_err(|e| CallError::InvalidKey(e.to_string()))?;
        loop {
            let found = {
                let mut t = inner.lock();
                if inner.cancel.is_cancelled() {
                    return Err(CallError::Unavailable(Unavailable::ShuttingDown));
                }
                // Under the lock: `passivate_where` sweeps under it too, so once a shard is
                // given up no call slips in behind the sweep.
                inner.gate.admit(key)?;
                let tick = t.next_tick;
                t.next_tick += 1;
                match t.slots.get_mut(key) {
                    Some(Slot::Active { tx, tick: last, .. }) => {
                        let tx = tx.clone();
                        let old = std::mem::replace(last, tick);
                        // The key moves to the new tick; allocated again only if it had been evicted.
                        let k = t.lru.remove(&old).unwrap_or_else(|| key.clone());
                        t.lru.insert(tick, k);
                        Found::Active(tx)
                    }
                    // Created under the lock, so the notification cannot be missed.
                    Some(Slot::Stopping(done, _)) => Found::Stopping(done.clone().notified_owned()),
                    None => {
                        let (tx, rx) = mpsc::channel(inner.cfg.mailbox_len_max);
                        let ended = CancellationToken::new();
                        let stats = Arc::new(Stats::new());
                        t.slots.insert(key.clone(), Slot::Active { tx: tx.clone(), stats: stats.clone(), tick, ended });
                        t.lru.insert(tick, key.clone());
                        spawn(inner.clone(), key.clone(), rx, stats);
                        // Over the limit: the least recently used others passivate. They leave the
                        // LRU order now, so the next activation picks another.
                        let mut victims = Vec::new();
                        while t.lru.len() > inner.cfg.agents_active_max {
                            let Some((&tick, k)) = t.lru.iter().find(|(_, k)| *k != key) else { break };
                            let k = k.clone();
                            t.lru.remove(&tick);
                            if let Some(Slot::Active { tx, .. }) = t.slots.get(&k) {
                                victims.push(tx.clone());
                            }
                        }
                        Found::New(tx, victims)
                    }
                }
            };
            let (tx, victims) = match found {
                Found::Active(tx) => return Ok(tx),
                Found::Stopping(wait) => {
                    tokio::select! {
                        _ = wait => continue,
                        _ = inner.cancel.cancelled() => {
                            return Err(CallError::Unavailable(Unavailable::ShuttingDown));
                        }
                    }
                }
                Found::New(tx, victims) => (tx, victims),
            };
            for v in victims {
                // A full mailbox gets there by idling instead; never wait on it here.
                let _ = v.try_send(Msg::Stop);
            }
            return Ok(tx);
        }
    }
}

enum Found {
    Active(mpsc::Sender<Msg>),
    Stopping(tokio::sync::futures::OwnedNotified),
    New(mpsc::Sender<Msg>, Vec<mpsc::Sender<Msg>>),
}

/// Marks `key` as stopping (no new sends find it) and returns what to notify when gone.
fn begin_stop(host: &HostInner, key: &Key) -> Arc<Notify> {
    let mut t = host.lock();
    if let Some(Slot::Stopping(done, _)) = t.slots.get(key) {
        return done.clone();
    }
    let done = Arc::new(Notify::new());
    let ended = match t.slots.get(key) {
        Some(Slot::Active { tick, ended, .. }) => {
            let (tick, ended) = (*tick, ended.clone());
            t.lru.remove(&tick);
            ended
        }
        _ => CancellationToken::new(),
    };
    t.slots.insert(key.clone(), Slot::Stopping(done.clone(), ended));
    done
}

fn end_stop(host: &HostInner, key: &Key, done: &Notify) {
    if let Some(Slot::Stopping(_, ended) | Slot::Active { ended, .. }) = host.lock().slots.remove(key) {
        ended.cancel();
    }
    done.notify_waiters();
}

struct Live<A> {
    agent: A,
    ctx: Ctx,
    /// The stored state's JSON (what a rollback or restart goes back to).
    stored: Bytes,
    /// The signals handled, as stored with the state (and, when `record_dirty`, newer).
    record: handled::Record,
    /// The record has entries not stored yet.
    record_dirty: bool,
    /// Where a reply is encoded for the record.
    scratch: Vec<u8>,
    /// The reminders as stored (what a rollback goes back to), and their encoding in the value.
    stored_reminders: reminders::Table,
    extra: Bytes,
    /// What the agent's reminder index holds, as stored (see [`reminders`]).
    hint_ms: Option<u64>,
    shard: u32,
    restarts: Vec<Instant>,
    /// The shard epoch the state was loaded under: once the gate gives another, this activation
    /// is stale (the shard moved away and back) and must end.
    epoch: u64,
    stats: Arc<Stats>,
}

impl<A: Agent> Live<A> {
    async fn load(host: &HostInner, key: &Key, stats: Arc<Stats>) -> Result<Live<A>, CallError> {
        // The epoch first: the state read after it is at least as new as that epoch's start.
        let fence = host.gate.write(key)?;
        let found = host.storage.get(key).await.map_err(CallError::Storage)?;
        let (stored, revision) = found.map(|v| (v.value, v.revision)).unwrap_or_default();
        let (record, extra, stored) =
            handled::decode_stored(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        let rem = reminders::Stored::decode(&extra).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        let agent = decode::<A>(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        // An absent key counts as storing the default: reading it writes nothing.
        let stored = if revision == 0 {
            encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?
        } else {
            stored
        };
        let mut ctx = Ctx::new(key.clone(), revision, Duration::from_millis(host.cfg.call_timeout_ms));
        stats.epoch.store(fence.epoch, std::sync::atomic::Ordering::Relaxed);
        if !rem.list.is_empty() {
            // The exact due time replaces whatever the index said.
            host.reschedule(key, fence.shard, reminders::earliest(&rem.list));
        }
        ctx.reminders = rem.list.clone();
        Ok(Live {
            agent,
            ctx,
            stored,
            record,
            record_dirty: false,
            scratch: Vec::new(),
            stored_reminders: rem.list,
            extra,
            hint_ms: rem.hint_ms,
            shard: fence.shard,
            restarts: Vec::new(),
            epoch: fence.epoch,
            stats,
        })
    }

    /// Stores the state if it changed.
    async fn persist(&mut self, host: &HostInner) -> Result<(), CallError> {
        let bytes = encode(&self.agent).map_err(|e| CallError::Storage(StorageError::Backend(e)))?;
        self.persist_bytes(host, bytes).await
    }

    /// Stores `state` (the agent's encoding) with the record and the reminders, if any changed.
    async fn persist_bytes(&mut self, host: &HostInner, state: Bytes) -> Result<(), CallError> {
        let reminders_dirty = self.ctx.reminders_dirty;
        if state == self.stored && !self.record_dirty && !reminders_dirty {
            return Ok(());
        }
        let fence = host.gate.write(&self.ctx.key)?;
        let (mut hint, mut next, mut extra) = (self.hint_ms, None, self.extra.clone());
        if reminders_dirty {
            next = reminders::earliest(&self.ctx.reminders);
            match next {
                // The index first: it must never say later than the stored reminders.
                Some(n) if hint.is_none_or(|h| n < h) => {
                    let storage = host.storage.as_ref();
                    reminders::write_index(storage, &self.ctx.key, fence, n).await.map_err(CallError::Storage)?;
                    hint = Some(n);
                }
                Some(_) => {}
                None => hint = None,
            }
            let list = self.ctx.reminders.clone();
            extra = Bytes::from(reminders::Stored { hint_ms: hint, list }.encode());
        }
        let parts = handled::encode_stored(&self.record, &extra, &state);
        self.ctx.revision =
            host.storage.put_parts(&self.ctx.key, parts, self.ctx.revision, fence).await.map_err(CallError::Storage)?;
        self.stored = state;
        self.record_dirty = false;
        self.extra = extra;
        if reminders_dirty {
            if next.is_none() && self.hint_ms.is_some() {
                // After the write that says there is none: a stale entry costs one activation.
                if let Err(e) = reminders::delete_index(host.storage.as_ref(), &self.ctx.key, fence).await {
                    debug!(key = ?self.ctx.key, error = %e, "a reminder index entry was left behind");
                }
            }
            self.hint_ms = hint;
            self.stored_reminders = self.ctx.reminders.clone();
            self.ctx.reminders_dirty = false;
            host.reschedule(&self.ctx.key, fence.shard, next);
        }
        Ok(())
    }

    /// Records a handled signal (stored with the next write).
    fn note_handled(&mut self, host: &HostInner, id: handled::HandledId, reply: &Reply) {
        let ids_max = host.cfg.dedupe_ids_max;
        if ids_max == 0 {
            return;
        }
        // Kept only when small; encoded into a buffer the activation keeps, since this runs on
        // every recorded call.
        let kept = handled::reply_json(reply, &mut self.scratch);
        self.record.insert(id, kept, ids_max);
        self.record_dirty = true;
    }

    /// Where a failed call goes back to: the stored state, or (when storing only at passivation)
    /// the state before the call, so acknowledged calls are not undone.
    fn rollback_point(&self) -> Result<Option<Bytes>, String> {
        match A::PERSISTENCE {
            Persistence::WriteThrough => Ok(None),
            Persistence::OnPassivate => encode(&self.agent).map(Some),
        }
    }

    fn rollback(&mut self, to: Option<&Bytes>) -> Result<(), String> {
        self.agent = decode::<A>(to.unwrap_or(&self.stored))?;
        if self.ctx.reminders_dirty {
            self.ctx.reminders = self.stored_reminders.clone();
            self.ctx.reminders_dirty = false;
        }
        Ok(())
    }

    /// Records a restart; false when over the limit.
    fn count_restart(&mut self, cfg: &AgentsConfig) -> bool {
        let now = Instant::now();
        let window = Duration::from_millis(cfg.restart_window_ms);
        self.restarts.retain(|t| now.duration_since(*t) < window);
        self.restarts.push(now);
        self.restarts.len() as u32 <= cfg.restarts_max
    }
}

/// The state as stored; a `Serialize` that fails or panics is an error, not a crash.
fn encode<A: Agent>(agent: &A) -> Result<Bytes, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| serde_json::to_vec(agent))) {
        Ok(Ok(v)) => Ok(Bytes::from(v)),
        Ok(Err(e)) => Err(format!("the state of a {} does not serialize: {e}", A::TYPE)),
        Err(_) => Err(format!("serializing the state of a {} panicked", A::TYPE)),
    }
}

/// Runs a lifecycle hook; a panic is logged, not fatal.
async fn hook(key: &Key, name: &str, fut: impl Future<Output = ()>) {
    if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
        warn!(key = ?key, hook = name, "agent hook panicked");
    }
}

fn decode<A: Agent>(stored: &[u8]) -> Result<A, String> {
    if stored.is_empty() {
        return Ok(A::default());
    }
    match std::panic::catch_unwind(|| serde_json::from_slice(stored)) {
        Ok(r) => r.map_err(|e| format!("stored state of a {} does not decode: {e}", A::TYPE)),
        Err(_) => Err(format!("decoding the stored state of a {} panicked", A::TYPE)),
    }
}

enum Step {
    Go,
    /// The activation must end; queued calls fail with this error.
    Stop(CallError),
}

/// Ends the key's slot when an activation ends, however it ends (a panic included): without it,
/// callers would wait on a `Stopping` slot forever.
struct SlotGuard<'a> {
    host: &'a HostInner,
    key: &'a Key,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let done = begin_stop(self.host, self.key);
        end_stop(self.host, self.key, &done);
    }
}

/// One activation.
async fn run<A: Agent>(host: Arc<HostInner>, key: Key, mut rx: mpsc::Receiver<Msg>, stats: Arc<Stats>) {
    let _slot = SlotGuard { host: &host, key: &key };
    let mut live = match Live::<A>::load(&host, &key, stats).await {
        Ok(l) => l,
        Err(e) => {
            warn!(key = ?key, error = %e, "activation failed");
            finish(&host, &key, rx, Some(e)).await;
            return;
        }
    };
    live.ctx.caller = Some(host.caller());
    // Timers die with the activation, however it ends.
    let _timers = live.ctx.timer_scope.clone().drop_guard();
    hook(&key, "on_activate", live.agent.on_activate(&mut live.ctx)).await;
    let idle = Duration::from_millis(host.cfg.idle_timeout_ms);
    // One timer for the activation, moved only when it fires early: re-arming it per signal
    // would cost a timer-wheel update per call.
    let mut last_activity = Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut failure = None;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = &mut timer => {
                let due = last_activity + idle;
                if Instant::now() < due {
                    timer.as_mut().reset(due);
                    continue;
                }
                None
            }
            _ = host.cancel.cancelled() => None,
        };
        last_activity = Instant::now();
        match msg {
            Some(Msg::Call { signal, reply }) => {
                if let Step::Stop(e) = handle(&host, &mut live, signal, reply).await {
                    failure = Some(e);
                    break;
                }
            }
            Some(Msg::Fire) => {
                if let Step::Stop(e) = fire(&host, &mut live).await {
                    failure = Some(e);
                    break;
                }
            }
            Some(Msg::Stop) | None => break,
        }
    }
    if host.aborted.load(std::sync::atomic::Ordering::Acquire) {
        // As a crash: queued callers see their reply channel dropped.
        return;
    }
    // Passivate: no new sends; what is already queued is still handled.
    let done = begin_stop(&host, &key);
    rx.close();
    while let Some(msg) = rx.recv().await {
        match (msg, &failure) {
            (Msg::Call { signal, reply }, None) => {
                if let Step::Stop(e) = handle(&host, &mut live, signal, reply).await {
                    failure = Some(e);
                }
            }
            (Msg::Call { reply, .. }, Some(e)) => send(reply, Err(e.clone())),
            (Msg::Fire, None) => {
                if let Step::Stop(e) = fire(&host, &mut live).await {
                    failure = Some(e);
                }
            }
            (Msg::Fire | Msg::Stop, _) => {}
        }
    }
    if failure.is_none() {
        hook(&key, "on_passivate", live.agent.on_passivate(&mut live.ctx)).await;
        if let Err(e) = live.persist(&host).await {
            warn!(key = ?key, error = %e, "state not stored at passivation");
        }
    }
    drop(done);
    // `_slot` ends the slot here, after the last write.
}

/// Ends an activation that never started: queued calls get `error`.
async fn finish(host: &HostInner, key: &Key, mut rx: mpsc::Receiver<Msg>, error: Option<CallError>) {
    begin_stop(host, key);
    rx.close();
    let mut dropped_casts = 0;
    while let Some(msg) = rx.recv().await {
        match (msg, &error) {
            (Msg::Call { reply: Some(tx), .. }, Some(e)) => {
                let _ = tx.send(Err(e.clone()));
            }
            (Msg::Call { reply: None, .. }, _) => dropped_casts += 1,
            _ => {}
        }
    }
    if dropped_casts > 0 {
        warn!(key = ?key, dropped_casts, "casts dropped: the activation could not start");
    }
}

/// Handles one signal and replies.
async fn handle<A: Agent>(
    host: &HostInner,
    live: &mut Live<A>,
    signal: Box<Signal>,
    reply: Option<oneshot::Sender<Result<Reply, CallError>>>,
) -> Step {
    // Queued signals too are served only while the shard is served here at the epoch the state
    // was loaded under: a node whose lease ran out must not answer, not even reads. Nothing ran,
    // so the caller may retry elsewhere. A lapsed lease refuses this signal only (it may be
    // renewed); another owner or epoch ends the activation.
    match host.gate.write(&live.ctx.key) {
        Ok(fence) if fence.epoch == live.epoch => {}
        Err(e @ CallError::Unavailable(_)) => {
            send(reply, Err(e));
            return Step::Go;
        }
        other => {
            let e = match other {
                Err(e) => e,
                Ok(_) => CallError::Unavailable(Unavailable::EpochChanged),
            };
            begin_stop(host, &live.ctx.key);
            send(reply, Err(e.clone()));
            return Step::Stop(e);
        }
    }
    let point = match live.rollback_point() {
        Ok(p) => p,
        Err(e) => {
            let e = CallError::Unavailable(Unavailable::State(e));
            begin_stop(host, &live.ctx.key);
            send(reply, Err(e.clone()));
            return Step::Stop(e);
        }
    };
    let id = handled::handled_id(&signal.source, &signal.id);
    if let Some(seen) = live.record.find(&id) {
        send(reply, duplicate(host, seen));
        return Step::Go;
    }
    live.ctx.begin(&signal);
    live.stats.handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    live.stats.last_call_ms.store(crate::clock::wall_ms(), std::sync::atomic::Ordering::Relaxed);
    let outcome = match reminders::admin(&mut live.ctx, &signal) {
        Some(done) => Ok(done),
        None => AssertUnwindSafe(async { live.agent.handle(&mut live.ctx, *signal).await }).catch_unwind().await,
    };
    let (result, step) = match outcome {
        Ok(Ok(value)) => match A::PERSISTENCE {
            Persistence::WriteThrough => match encode(&live.agent) {
                Ok(state) => {
                    // A call that changed nothing and emitted nothing is not recorded: running
                    // it again is harmless, and it then costs no write.
                    let effects = !live.ctx.emitted.is_empty() || !live.ctx.casts.is_empty();
                    if state != live.stored || effects || live.ctx.reminders_dirty {
                        live.note_handled(host, id, &value);
                    }
                    match live.persist_bytes(host, state).await {
                        Ok(()) => (Ok(value), Step::Go),
                        // Another activation wrote, or the store failed: this one must not go on.
                        Err(e) => (Err(e.clone()), Step::Stop(e)),
                    }
                }
                Err(e) => {
                    let e = CallError::Storage(StorageError::Backend(e));
                    (Err(e.clone()), Step::Stop(e))
                }
            },
            // Stored at passivation, with the record: every call is recorded (telling whether it
            // changed the state would cost an encoding per call).
            Persistence::OnPassivate => {
                live.note_handled(host, id, &value);
                // Reminders are stored at once, whatever the persistence: they must survive a crash.
                if !live.ctx.reminders_dirty {
                    (Ok(value), Step::Go)
                } else {
                    match live.persist(host).await {
                        Ok(()) => (Ok(value), Step::Go),
                        Err(e) => (Err(e.clone()), Step::Stop(e)),
                    }
                }
            }
        },
        Ok(Err(AgentError::Failed(m))) => match live.rollback(point.as_ref()) {
            Ok(()) => {
                // Fields not stored (`serde(skip)`) came back as defaults: set them up again.
                let key = live.ctx.key.clone();
                hook(&key, "on_activate", live.agent.on_activate(&mut live.ctx)).await;
                (Err(CallError::Handler(m)), Step::Go)
            }
            Err(e) => {
                let e = CallError::Unavailable(Unavailable::State(e));
                (Err(e.clone()), Step::Stop(e))
            }
        },
        Ok(Err(AgentError::Fatal(m))) => restart(host, live, point.as_ref(), m).await,
        Err(_) => restart(host, live, point.as_ref(), "handler panicked".into()).await,
    };
    if let Step::Stop(_) = step {
        // Before the caller hears of it: a call after this reply finds the key stopping.
        begin_stop(host, &live.ctx.key);
    }
    let emitted = std::mem::take(&mut live.ctx.emitted);
    let casts = std::mem::take(&mut live.ctx.casts);
    if result.is_ok() && !emitted.is_empty() {
        if let Some(emit) = host.emitter.get() {
            emit(emitted).await;
        }
    }
    if result.is_ok() {
        send_casts(&live.ctx, casts).await;
        live.ctx.start_timers();
    }
    send(reply, result);
    step
}

/// Fires the reminders due now, each tick through [`handle`] like a call: its state change and
/// the reminder's move to its next tick are one write (see [`reminders`]).
async fn fire<A: Agent>(host: &HostInner, live: &mut Live<A>) -> Step {
    let key = live.ctx.key.clone();
    if live.ctx.reminders.is_empty() {
        // A stale index entry (see `reminders`): remove it, so that no node fires this agent again.
        if live.hint_ms.is_none() {
            if let Ok(fence) = host.gate.write(&key) {
                let _ = reminders::delete_index(host.storage.as_ref(), &key, fence).await;
            }
        }
        host.reschedule(&key, live.shard, None);
        return Step::Go;
    }
    let now = crate::clock::wall_ms();
    let mut due: Vec<(u64, String)> =
        live.ctx.reminders.values().filter(|r| r.due_ms <= now).map(|r| (r.due_ms, r.name.clone())).collect();
    due.sort();
    for (_, name) in due.into_iter().take(reminders::TICKS_PER_FIRE_MAX) {
        // An earlier tick's handler may have cancelled or moved it.
        let Some(r) = live.ctx.reminders.get(&name).filter(|r| r.due_ms <= now).cloned() else { continue };
        let (next, skipped) = reminders::advance(&r, now);
        host.skipped.inc_by(skipped);
        let moved = |ctx: &mut Ctx| {
            match &next {
                Some(n) => ctx.reminders.insert(name.clone(), n.clone()),
                None => ctx.reminders.remove(&name),
            };
            ctx.reminders_dirty = true;
        };
        let signal = match reminders::tick_signal(&key, &r) {
            Ok(s) => s,
            Err(e) => {
                warn!(key = ?key, reminder = %name, error = %e, "a reminder's signal is broken; the tick is skipped");
                moved(&mut live.ctx);
                if let Err(e) = live.persist(host).await {
                    begin_stop(host, &key);
                    return Step::Stop(e);
                }
                continue;
            }
        };
        moved(&mut live.ctx);
        let (tx, mut rx) = oneshot::channel();
        if let Step::Stop(e) = handle(host, live, Box::new(signal), Some(tx)).await {
            return Step::Stop(e);
        }
        match rx.try_recv() {
            Ok(Ok(_) | Err(CallError::Duplicate)) => {
                host.fires[0].inc();
            }
            // Not served here now: nothing ran, the tick stays due (the schedule tries again).
            Ok(Err(CallError::Unavailable(_) | CallError::NotOwner { .. })) => {
                live.ctx.reminders = live.stored_reminders.clone();
                live.ctx.reminders_dirty = false;
                break;
            }
            Ok(Err(e)) => {
                host.fires[1].inc();
                warn!(key = ?key, reminder = %name, tick = r.tick, error = %e, "a reminder's tick failed");
                // Rolled back with the state: the reminder still moves on.
                moved(&mut live.ctx);
            }
            Err(_) => {}
        }
        // A duplicate or a failure wrote nothing: store the move alone.
        if let Err(e) = live.persist(host).await {
            begin_stop(host, &key);
            return Step::Stop(e);
        }
    }
    host.reschedule(&key, live.shard, reminders::earliest(&live.ctx.reminders));
    Step::Go
}

/// Sends what a handler cast, once its call succeeded; a cast refused is logged (the caller does
/// not wait on it).
async fn send_casts(ctx: &Ctx, casts: Vec<(Key, Signal)>) {
    let Some(caller) = &ctx.caller else { return };
    for (key, signal) in casts {
        let id = signal.id.clone();
        if let Err(e) = caller(key.clone(), signal, None).await {
            warn!(from = ?ctx.key, to = ?key, %id, error = %e, "a cast was refused");
        }
    }
}

/// One read ([`Host::read`]) of a type: decode the stored state, run the handler on it, and
/// check that it left the state as it was and emitted nothing.
async fn read<A: Agent>(host: &HostInner, key: &Key, query: Option<Signal>) -> Result<Reply, CallError> {
    let found = host.storage.get(key).await.map_err(CallError::Storage)?;
    let (stored, revision) = found.map(|v| (v.value, v.revision)).unwrap_or_default();
    let (_, extra, stored) =
        handled::decode_stored(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    if query.as_ref().is_some_and(|q| q.ty == reminders::OP_LIST) {
        let rem = reminders::Stored::decode(&extra).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        return Ok(reminders::list_reply(&rem.list));
    }
    let mut agent = decode::<A>(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    let Some(signal) = query else {
        let state = encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        return serde_json::from_slice(&state).map_err(|e| CallError::Unavailable(Unavailable::State(e.to_string())));
    };
    let mut ctx = Ctx::new(key.clone(), revision, Duration::from_millis(host.cfg.call_timeout_ms));
    ctx.reading = true;
    // Derived fields (`serde(skip)`) are set up as in an activation; what the hook changes or
    // emits is the activation's, not the read's (and, as the read, is not kept).
    hook(key, "on_activate", agent.on_activate(&mut ctx)).await;
    ctx.begin(&signal);
    let before = encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    let ty = signal.ty.clone();
    let outcome = AssertUnwindSafe(agent.handle(&mut ctx, signal)).catch_unwind().await;
    let reply = match outcome {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return Err(CallError::Handler(e.to_string())),
        Err(_) => return Err(CallError::Handler("handler panicked".into())),
    };
    if !ctx.emitted.is_empty() || !ctx.casts.is_empty() {
        return Err(CallError::NotRead(format!("{ty:?} emitted {} signals", ctx.emitted.len() + ctx.casts.len())));
    }
    if encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))? != before {
        return Err(CallError::NotRead(format!("{ty:?} changed the state of {key:?}")));
    }
    Ok(reply)
}

fn cause_of(signal: &Signal) -> Signal {
    let mut cause = Signal::bare(signal.id.clone(), signal.source.clone(), signal.ty.clone());
    if let Some(tp) = signal.extension(crate::signal::TRACEPARENT) {
        cause.extensions.insert(crate::signal::TRACEPARENT.into(), tp.to_string());
    }
    cause
}

/// Restarts the agent from its last good state (and runs `on_activate` again), or stops it when
/// over the restart limit.
async fn restart<A: Agent>(
    host: &HostInner,
    live: &mut Live<A>,
    point: Option<&Bytes>,
    why: String,
) -> (Result<Reply, CallError>, Step) {
    warn!(key = ?live.ctx.key, why, "agent restarts from its last good state");
    live.stats.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !live.count_restart(&host.cfg) {
        return (Err(CallError::Crashed), Step::Stop(CallError::Crashed));
    }
    if let Err(e) = live.rollback(point) {
        let e = CallError::Unavailable(Unavailable::State(e));
        return (Err(e.clone()), Step::Stop(e));
    }
    let key = live.ctx.key.clone();
    hook(&key, "on_activate", live.agent.on_activate(&mut live.ctx)).await;
    (Err(CallError::Handler(why)), Step::Go)
}

/// The answer to a signal handled before, counted.
fn duplicate(host: &HostInner, seen: handled::Seen) -> Result<Reply, CallError> {
    let kept = match seen {
        handled::Seen::Reply(json) => serde_json::from_slice(&json).ok(),
        handled::Seen::Handled => None,
    };
    host.duplicates[usize::from(kept.is_none())].inc();
    kept.ok_or(CallError::Duplicate)
}

fn send(reply: Option<oneshot::Sender<Result<Reply, CallError>>>, result: Result<Reply, CallError>) {
    if let Some(tx) = reply {
        let _ = tx.send(result);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_calls;
#[cfg(test)]
mod tests_reminders;
