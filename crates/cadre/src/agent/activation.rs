//! One activation: the task that owns an agent's state and takes its mailbox in order.
//!
//! The task loads the state (with the record of handled signals and the reminders stored beside
//! it), runs `on_activate`, then handles one message at a time: a call ([`handle`]: the gate's
//! check, the duplicate check, the handler, the write, then the effects and the reply), the
//! reminders due ([`fire`]), or a stop. A failed handler rolls back to the last good state; a
//! fatal error or a panic restarts from it, up to the restart limit. Idle for
//! `idle_timeout_ms`, stopped, or at shutdown, it passivates: closes the mailbox, handles what was
//! queued, runs `on_passivate`, stores, and only then leaves the table.
//!
//! Caveat: [`Host::abort`](super::Host::abort) ends the loop as a crash would: no passivation, no
//! last write, and queued callers see their reply channel dropped.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::host::{begin_stop, end_stop, HostInner, Stats};
use super::{handled, reminders, Agent, AgentError, CallError, Ctx, Persistence, Reply, Unavailable};
use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::{Key, StorageError};

pub(super) enum Msg {
    /// Boxed: mailbox slots stay small.
    Call {
        signal: Box<Signal>,
        reply: Option<oneshot::Sender<Result<Reply, CallError>>>,
    },
    /// Fire the reminders that are due (sent by the schedule).
    Fire,
    Stop,
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
pub(super) fn encode<A: Agent>(agent: &A) -> Result<Bytes, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| serde_json::to_vec(agent))) {
        Ok(Ok(v)) => Ok(Bytes::from(v)),
        Ok(Err(e)) => Err(format!("the state of a {} does not serialize: {e}", A::TYPE)),
        Err(_) => Err(format!("serializing the state of a {} panicked", A::TYPE)),
    }
}

/// Runs a lifecycle hook; a panic is logged, not fatal.
pub(super) async fn hook(key: &Key, name: &str, fut: impl Future<Output = ()>) {
    if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
        warn!(key = ?key, hook = name, "agent hook panicked");
    }
}

pub(super) fn decode<A: Agent>(stored: &[u8]) -> Result<A, String> {
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
pub(super) async fn run<A: Agent>(host: Arc<HostInner>, key: Key, mut rx: mpsc::Receiver<Msg>, stats: Arc<Stats>) {
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
        if let Some(emit) = &host.emitter {
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
