//! What a handler sees of its activation: [`Ctx`], and the chain of calls it belongs to.
//!
//! A handler's effects are collected here and only take effect once its call succeeds: the
//! signals it emits, the casts it sends, the timers it starts, the reminders it sets (stored with
//! the state). A failed call drops them. A call to another agent ([`Ctx::call`]) carries the
//! chain of agents waiting on it ([`CALL_CHAIN`]), so a call back into the chain fails at once
//! ([`CallError::Cycle`]) instead of waiting for its timeout.
//!
//! Caveat: a call made by a handler is not undone when that handler fails later; the ids
//! [`Ctx::signal`] makes are stable across retries, so the callee sees a retry as a duplicate.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{handled, reminders, AgentError, CallError, Reminder, ReminderInfo, Reply, Unavailable};
use crate::signal::Signal;
use crate::storage::{Key, Revision};

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
pub(super) fn check_chain(key: &Key, signal: &Signal) -> Result<(), CallError> {
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
    pub(super) key: Key,
    pub(super) revision: Revision,
    /// The signal being handled, as the cause of what the handler emits.
    cause: Option<Signal>,
    /// The call chain the signal being handled came with.
    chain: Option<String>,
    pub(super) emitted: Vec<Signal>,
    /// Casts to send once the call succeeds.
    pub(super) casts: Vec<(Key, Signal)>,
    /// Signals made by [`Ctx::signal`] while handling this one.
    made: u32,
    pub(super) caller: Option<Caller>,
    call_timeout: Duration,
    /// A read ([`Host::read`]): calls and casts are refused.
    pub(super) reading: bool,
    /// The agent's reminders, as the handler left them (stored with the next write).
    pub(super) reminders: reminders::Table,
    /// `reminders` differs from what is stored.
    pub(super) reminders_dirty: bool,
    /// Timers to start once the call succeeds.
    timers_pending: Vec<(Duration, Signal)>,
    /// Timers waiting; cancelled when the activation ends (the scope is).
    timers: Vec<CancellationToken>,
    pub(super) timer_scope: CancellationToken,
}

impl Ctx {
    pub(super) fn new(key: Key, revision: Revision, call_timeout: Duration) -> Ctx {
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
    pub(super) fn begin(&mut self, signal: &Signal) {
        self.cause = Some(cause_of(signal));
        self.chain = signal.extension(CALL_CHAIN).map(str::to_string);
        self.emitted.clear();
        self.casts.clear();
        self.timers_pending.clear();
        self.made = 0;
    }

    /// Sets the reminder `name` (replacing one of that name): `signal` is sent to this agent when
    /// it is due, on whichever node then owns it, activating it if needed. Stored with the state
    /// once the call succeeds (see `agent::reminders`); each tick fires once. Fails for a bad name, a
    /// period under `REMINDER_PERIOD_MIN_MS` (1 s), more than
    /// `REMINDERS_PER_AGENT_MAX` (64) reminders, or an invalid or oversized signal.
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
    /// it active. Started once the call succeeds. At most `TIMERS_PER_AGENT_MAX` (256)
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
    pub(super) fn start_timers(&mut self) {
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

    /// The agent's key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Revision of the stored state (0: never stored).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Emits a signal, published once the call succeeds (after its state is stored, before the
    /// reply), with the handled signal as its cause; dropped if the call fails. At most
    /// `EMITS_PER_CALL_MAX` (256) per call, casts included.
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

fn cause_of(signal: &Signal) -> Signal {
    let mut cause = Signal::bare(signal.id.clone(), signal.source.clone(), signal.ty.clone());
    if let Some(tp) = signal.extension(crate::signal::TRACEPARENT) {
        cause.extensions.insert(crate::signal::TRACEPARENT.into(), tp.to_string());
    }
    cause
}
