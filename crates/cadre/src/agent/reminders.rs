//! Durable reminders and volatile timers.
//!
//! ## Reminders
//! An agent asks to be sent a signal later ([`super::Ctx::remind`]): once at a time
//! ([`Reminder::at`], [`Reminder::after`]) or every period ([`Reminder::every`]). A reminder is
//! part of the agent's stored value, next to its state and its record of handled signals, and is
//! written in the same `put` (see [`super::handled`]): so it is replicated, fenced and moved with
//! the shard like the state, and a handler that sets one and then fails sets nothing.
//!
//! **Firing.** Each node keeps a [`Schedule`] of the agents with reminders on the shards it
//! serves, by their next due time. When one is due, the node sends the agent a fire message (the
//! agent is activated if it was passivated); the activation fires each due reminder as a signal
//! through its handler, like any call, and in the same write moves the reminder to its next tick
//! (or removes a one-shot one). So a tick is fired once: a new owner after a failover loads the
//! state as the last acknowledged write left it, and sees which ticks were done. The tick's
//! signal has the id `{nonce}-{tick}` (the nonce is drawn when the reminder is set), so the
//! record of handled signals also knows it. It carries the extensions `cadrereminder` (the name),
//! `cadretick` (0, 1, …) and `cadredue` (when it was due, Unix ms). A tick whose handler fails is
//! not fired again: the state is rolled back and the reminder still moves on (a failing reminder
//! would otherwise be fired forever).
//!
//! **Finding them after a failover.** A new owner must learn which agents of a shard have
//! reminders without loading every state. Each such agent has an *index key* in its shard
//! (type [`REMINDER_INDEX_TYPE`], id `{shard:05}/{type}\0{id}`, whose shard is the one its id
//! names, see [`index_shard`]) holding a due time no later than the agent's next one. The
//! index is a superset: it is written *before* a state write that makes the agent's next due
//! time earlier than the index says, and removed only *after* a write that left the agent without
//! reminders. A stale entry (too early, or for an agent without reminders) costs one activation,
//! which corrects it. The stored value says what the index holds, so an agent whose reminders
//! move later (every tick of a periodic one) writes no index at all.
//!
//! **Missed ticks.** Ticks that fell due while no node could fire them (a failover, a stopped
//! cluster) fire late, one after another, oldest first. A periodic reminder more than
//! [`REMINDER_MISSED_TICKS_MAX`] ticks behind skips the older ones (counted in
//! `cadre_reminder_ticks_skipped_total`), so a cluster started after a long stop does not
//! replay days of ticks.
//!
//! ## Timers
//! [`super::Ctx::timer`] sends a signal to the agent after a delay, if its activation still
//! lives: nothing is stored, and a timer dies with the activation (passivation, a move, a crash).
//!
//! ## Limits and caveats
//! - [`REMINDERS_PER_AGENT_MAX`] reminders per agent, periods of at least
//!   [`REMINDER_PERIOD_MIN_MS`], names of at most [`REMINDER_NAME_LEN_MAX`] bytes of
//!   `[A-Za-z0-9._-]`, signals of at most [`REMINDER_SIGNAL_BYTES_MAX`] bytes; at most
//!   [`REMINDERS_DUE_PER_ROUND_MAX`] agents fired per round of the schedule, and
//!   [`TICKS_PER_FIRE_MAX`] ticks per agent per round. [`TIMERS_PER_AGENT_MAX`] timers per
//!   activation.
//! - Reminders fire by the wall clock of the node that owns the key: a node whose clock is
//!   ahead fires early. A node learns of a shard it starts to serve within [`SERVED_POLL_MS`].
//! - The schedule holds one entry per agent with reminders on the node's shards: it grows with
//!   the stored data, as the store does, not with traffic.
//! - Reminders are stored in the agent's value, so each one costs bytes in every write of that
//!   agent's state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{AgentError, CallError, Ctx, Host, HostInner, Msg, Reply};
use crate::signal::{codec, Signal};
use crate::storage::{Fence, Key, Storage, StorageError, SCAN_READ_MAX};

/// The type of the index keys (see the module note). No agent type may have this name.
pub const REMINDER_INDEX_TYPE: &str = "cadre.reminders";
/// Reminders one agent may hold.
pub const REMINDERS_PER_AGENT_MAX: usize = 64;
/// Shortest period of a periodic reminder.
pub const REMINDER_PERIOD_MIN_MS: u64 = 1000;
/// Longest reminder name.
pub const REMINDER_NAME_LEN_MAX: usize = 128;
/// Largest signal a reminder sends (structured JSON bytes).
pub const REMINDER_SIGNAL_BYTES_MAX: usize = 64 * 1024;
/// Ticks a periodic reminder may be behind before the older ones are skipped.
pub const REMINDER_MISSED_TICKS_MAX: u64 = 1000;
/// Agents the schedule fires per round; the others wait for the next round, at once after.
pub const REMINDERS_DUE_PER_ROUND_MAX: usize = 4096;
/// Ticks one agent fires per fire message; more due ones wait for the next round.
pub const TICKS_PER_FIRE_MAX: usize = 64;
/// Timers one activation may have waiting.
pub const TIMERS_PER_AGENT_MAX: usize = 256;
/// How often the schedule looks at which shards the node serves (to load their index).
pub const SERVED_POLL_MS: u64 = 200;
/// When a fire got no answer (the agent could not be reached or activated), it is tried again
/// this much later; the activation's answer replaces the retry.
const FIRE_RETRY_MS: u64 = 1000;
/// Digits of the shard number at the start of an index key's id.
const SHARD_DIGITS: usize = 5;

/// Signal types a host handles itself, for any agent: set (`data` is [`SetReminder`]), cancel
/// (`{"name"}`) and list reminders. They are how the HTTP API and the CLI reach an agent's
/// reminders on its owner, with the call's routing, retries and duplicate detection.
pub const OP_SET: &str = "cadre.reminder.set";
pub const OP_CANCEL: &str = "cadre.reminder.cancel";
pub const OP_LIST: &str = "cadre.reminder.list";
const OP_PREFIX: &str = "cadre.reminder.";

/// The data of an [`OP_SET`] signal (and the body of `PUT .../reminders/{name}`, without the
/// name): exactly one of `due_ms` (Unix ms) and `in_ms`, or `every_ms` (with `due_ms` or `in_ms`
/// for the first tick, else one period from now).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetReminder {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// A structured CloudEvent; `id` and `source` may be left out (each tick gets its own id).
    pub signal: serde_json::Value,
}

impl SetReminder {
    /// When, and the signal, as [`Ctx::remind`] takes them.
    pub fn parse(&self) -> Result<(Reminder, Signal), String> {
        let now = crate::clock::wall_ms();
        let first = match (self.due_ms, self.in_ms) {
            (Some(_), Some(_)) => return Err("give due_ms or in_ms, not both".into()),
            (Some(d), None) => Some(d),
            (None, Some(i)) => Some(now.saturating_add(i)),
            (None, None) => None,
        };
        let when = match (first, self.every_ms) {
            (None, None) => return Err("give due_ms, in_ms or every_ms".into()),
            (Some(d), None) => Reminder::at(d),
            (first, Some(every)) => {
                Reminder { due_ms: first.unwrap_or(now.saturating_add(every)), every_ms: Some(every) }
            }
        };
        let mut json = self.signal.clone();
        let Some(obj) = json.as_object_mut() else {
            return Err("the signal must be a structured CloudEvent object".into());
        };
        obj.entry("specversion").or_insert_with(|| "1.0".into());
        obj.entry("id").or_insert_with(|| "reminder".into());
        obj.entry("source").or_insert_with(|| crate::signal::SOURCE_FALLBACK.into());
        let signal = codec::from_json(json).map_err(|e| format!("the signal: {e}"))?;
        Ok((when, signal))
    }
}

/// Checks what can be checked of a request without the agent (all but the count).
pub fn check(set: &SetReminder) -> Result<(), String> {
    let (when, signal) = set.parse()?;
    make(&Table::new(), &set.name, when, &signal).map(|_| ())
}

/// Handles the host's own signal types ([`OP_SET`], [`OP_CANCEL`], [`OP_LIST`]); `None` for the
/// agent's.
pub(super) fn admin(ctx: &mut Ctx, signal: &Signal) -> Option<Result<Reply, AgentError>> {
    if !signal.ty.starts_with(OP_PREFIX) {
        return None;
    }
    let data = match &signal.data {
        Some(crate::signal::Data::Json(v)) => v.clone(),
        _ => serde_json::Value::Null,
    };
    Some(match signal.ty.as_str() {
        OP_SET => (|| {
            let set: SetReminder =
                serde_json::from_value(data).map_err(|e| AgentError::Failed(format!("{OP_SET}: {e}")))?;
            let (when, sig) = set.parse().map_err(AgentError::Failed)?;
            ctx.remind(&set.name, when, sig)?;
            Ok(serde_json::json!({ "reminder": ctx.reminders.get(&set.name) }))
        })(),
        OP_CANCEL => {
            let name = data.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            let cancelled = ctx.cancel_reminder(&name);
            Ok(serde_json::json!({ "cancelled": cancelled }))
        }
        OP_LIST => Ok(list_reply(&ctx.reminders)),
        other => Err(AgentError::Failed(format!("unknown reminder operation {other:?}"))),
    })
}

pub(super) fn list_reply(table: &Table) -> Reply {
    serde_json::json!({ "reminders": table.values().collect::<Vec<_>>() })
}

/// When a reminder fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reminder {
    /// First due time, Unix ms.
    pub due_ms: u64,
    /// `Some`: then every this many ms.
    pub every_ms: Option<u64>,
}

impl Reminder {
    /// Once, at `unix_ms` (a time past fires at once).
    pub fn at(unix_ms: u64) -> Reminder {
        Reminder { due_ms: unix_ms, every_ms: None }
    }

    /// Once, `delay` from now.
    pub fn after(delay: Duration) -> Reminder {
        Reminder::at(crate::clock::wall_ms().saturating_add(delay.as_millis() as u64))
    }

    /// Every `period`, the first one period from now.
    pub fn every(period: Duration) -> Reminder {
        let every_ms = period.as_millis() as u64;
        Reminder { due_ms: crate::clock::wall_ms().saturating_add(every_ms), every_ms: Some(every_ms) }
    }

    /// Every `period`, the first at `first_ms` (Unix ms).
    pub fn every_from(first_ms: u64, period: Duration) -> Reminder {
        Reminder { due_ms: first_ms, every_ms: Some(period.as_millis() as u64) }
    }
}

/// One reminder as an agent holds it (and `GET .../reminders` shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReminderInfo {
    /// The reminder's name, unique per agent.
    pub name: String,
    /// When the next tick is due (Unix ms).
    pub due_ms: u64,
    /// `Some`: the period in ms; `None`: once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The number of the next tick (0 first).
    pub tick: u64,
    /// The signal each tick sends (structured CloudEvent).
    pub signal: serde_json::Value,
    /// Drawn when the reminder was set: tick ids are `{nonce}-{tick}`.
    pub nonce: String,
}

/// An agent's reminders by name.
pub(crate) type Table = BTreeMap<String, ReminderInfo>;

/// What an agent's stored value holds of its reminders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stored {
    /// What the agent's index key holds (`None`: the agent has none, or it may be gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub list: Table,
}

impl Stored {
    pub(crate) fn is_empty(&self) -> bool {
        self.hint_ms.is_none() && self.list.is_empty()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        if self.is_empty() {
            return Vec::new();
        }
        serde_json::to_vec(self).expect("reminders serialize")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Stored, String> {
        if bytes.is_empty() {
            return Ok(Stored::default());
        }
        serde_json::from_slice(bytes).map_err(|e| format!("stored reminders do not decode: {e}"))
    }
}

/// The earliest due time in `table`.
pub(crate) fn earliest(table: &Table) -> Option<u64> {
    table.values().map(|r| r.due_ms).min()
}

/// Checks and makes the reminder `name` (replacing one of that name).
pub(crate) fn make(table: &Table, name: &str, when: Reminder, signal: &Signal) -> Result<ReminderInfo, String> {
    check_name(name)?;
    if !table.contains_key(name) && table.len() >= REMINDERS_PER_AGENT_MAX {
        return Err(format!("an agent holds at most {REMINDERS_PER_AGENT_MAX} reminders"));
    }
    if let Some(every) = when.every_ms {
        if every < REMINDER_PERIOD_MIN_MS {
            return Err(format!("a period of {every} ms is shorter than {REMINDER_PERIOD_MIN_MS} ms"));
        }
    }
    signal.validate().map_err(|e| format!("the reminder's signal: {e}"))?;
    let json = codec::to_json(signal);
    let len = serde_json::to_vec(&json).map(|v| v.len()).unwrap_or(usize::MAX);
    if len > REMINDER_SIGNAL_BYTES_MAX {
        return Err(format!("the reminder's signal is {len} bytes, more than {REMINDER_SIGNAL_BYTES_MAX}"));
    }
    Ok(ReminderInfo {
        name: name.to_string(),
        due_ms: when.due_ms,
        every_ms: when.every_ms,
        tick: 0,
        signal: json,
        nonce: format!("{:016x}", rand::random::<u64>()),
    })
}

pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > REMINDER_NAME_LEN_MAX || !name.chars().all(ok) {
        return Err(format!("a reminder name is 1 to {REMINDER_NAME_LEN_MAX} characters of [A-Za-z0-9._-]: {name:?}"));
    }
    Ok(())
}

/// The reminder after its tick fired: the next tick (skipping beyond
/// [`REMINDER_MISSED_TICKS_MAX`] missed ones, counted in the second value), or `None` for a
/// one-shot one.
pub(crate) fn advance(r: &ReminderInfo, now_ms: u64) -> (Option<ReminderInfo>, u64) {
    let Some(every) = r.every_ms.filter(|&e| e > 0) else { return (None, 0) };
    let mut next = r.clone();
    next.tick += 1;
    next.due_ms = r.due_ms.saturating_add(every);
    let mut skipped = 0;
    if next.due_ms <= now_ms {
        let behind = (now_ms - next.due_ms) / every;
        if behind > REMINDER_MISSED_TICKS_MAX {
            skipped = behind - REMINDER_MISSED_TICKS_MAX;
            next.tick += skipped;
            next.due_ms = next.due_ms.saturating_add(skipped.saturating_mul(every));
        }
    }
    (Some(next), skipped)
}

/// The signal tick `r.tick` of the reminder sends to `key`.
pub(crate) fn tick_signal(key: &Key, r: &ReminderInfo) -> Result<Signal, String> {
    let mut s =
        codec::from_json(r.signal.clone()).map_err(|e| format!("the stored signal of reminder {:?}: {e}", r.name))?;
    s.id = format!("{}-{}", r.nonce, r.tick);
    if s.source.is_empty() {
        s.source = format!("/agents/{}/{}/reminders/{}", key.ty, key.id, r.name);
    }
    Ok(s.with_extension("cadrereminder", r.name.clone())
        .with_extension("cadretick", r.tick.to_string())
        .with_extension("cadredue", r.due_ms.to_string()))
}

/// The index key of `key`'s reminders (in `shard`, `key`'s shard).
pub(crate) fn index_key(shard: u32, key: &Key) -> Key {
    Key::new(REMINDER_INDEX_TYPE, format!("{shard:0w$}/{}\0{}", key.ty, key.id, w = SHARD_DIGITS))
}

/// The shard an index key belongs to: the one its id names (so that it lives, moves and is
/// replicated with the agent it stands for). `None` for other keys.
pub fn index_shard(key: &Key, shard_count: u32) -> Option<u32> {
    if key.ty != REMINDER_INDEX_TYPE {
        return None;
    }
    let shard: u32 = key.id.get(..SHARD_DIGITS)?.parse().ok()?;
    (shard < shard_count).then_some(shard)
}

/// The agent an index key stands for.
fn agent_of(index: &Key) -> Option<Key> {
    let rest = index.id.get(SHARD_DIGITS + 1..)?;
    let (ty, id) = rest.split_once('\0')?;
    Some(Key::new(ty, id))
}

/// Index keys are at most this much longer than the agent's key.
pub(crate) const INDEX_KEY_OVERHEAD_BYTES: usize = REMINDER_INDEX_TYPE.len() + SHARD_DIGITS + 3;

/// Writes `hint_ms` as `key`'s index entry.
pub(crate) async fn write_index(
    storage: &dyn Storage,
    key: &Key,
    fence: Fence,
    hint_ms: u64,
) -> Result<(), StorageError> {
    let index = index_key(fence.shard, key);
    let value = bytes::Bytes::copy_from_slice(&hint_ms.to_be_bytes());
    // Only this key's activation writes its index: a conflict is a stale revision read here
    // (another node's write, replicated), so read again once.
    for _ in 0..2 {
        let revision = storage.get(&index).await?.map_or(0, |v| v.revision);
        match storage.put(&index, value.clone(), revision, fence).await {
            Ok(_) => return Ok(()),
            Err(StorageError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Backend(format!("the reminder index of {key:?} kept changing")))
}

/// Removes `key`'s index entry, if any.
pub(crate) async fn delete_index(storage: &dyn Storage, key: &Key, fence: Fence) -> Result<(), StorageError> {
    let index = index_key(fence.shard, key);
    match storage.get(&index).await? {
        Some(v) => storage.delete(&index, v.revision, fence).await,
        None => Ok(()),
    }
}

/// The index of one shard: agents and the due times it holds for them.
async fn read_index(storage: &dyn Storage, shard: u32) -> Result<Vec<(Key, u64)>, StorageError> {
    let prefix = format!("{shard:0w$}/", w = SHARD_DIGITS);
    let mut after = Key::new(REMINDER_INDEX_TYPE, prefix.clone());
    let mut out = Vec::new();
    loop {
        let page = storage.scan_keys(Some(&after), SCAN_READ_MAX).await?;
        let full = page.len() == SCAN_READ_MAX;
        let mine: Vec<Key> =
            page.into_iter().take_while(|k| k.ty == REMINDER_INDEX_TYPE && k.id.starts_with(&prefix)).collect();
        let more = full && mine.len() == SCAN_READ_MAX;
        for index in &mine {
            let Some(agent) = agent_of(index) else { continue };
            let Some(v) = storage.get(index).await? else { continue };
            let hint = <[u8; 8]>::try_from(&v.value[..]).map(u64::from_be_bytes).unwrap_or(0);
            out.push((agent, hint));
        }
        match (more, mine.last()) {
            (true, Some(last)) => after = last.clone(),
            _ => return Ok(out),
        }
    }
}

/// The agents with reminders on this node's shards, by next due time.
#[derive(Default)]
pub(crate) struct Schedule {
    due: BTreeSet<(u64, Key)>,
    by_key: HashMap<Key, (u64, u32)>,
    /// Shards whose index is loaded, at the epoch it was loaded under.
    loaded: HashMap<u32, u64>,
}

impl Schedule {
    /// Sets `key`'s next due time (`None`: it has no reminders). Returns whether the schedule's
    /// earliest time became earlier (the loop must wake).
    pub(crate) fn set(&mut self, key: &Key, shard: u32, due_ms: Option<u64>) -> bool {
        if let Some((old, _)) = self.by_key.remove(key) {
            self.due.remove(&(old, key.clone()));
        }
        let Some(due) = due_ms else { return false };
        let earlier = self.next_due().is_none_or(|n| due < n);
        self.by_key.insert(key.clone(), (due, shard));
        self.due.insert((due, key.clone()));
        earlier
    }

    /// A due time from the index: kept unless the key is known already (its activation knows
    /// better).
    fn offer(&mut self, key: Key, shard: u32, due_ms: u64) {
        if !self.by_key.contains_key(&key) {
            self.set(&key, shard, Some(due_ms));
        }
    }

    pub(crate) fn next_due(&self) -> Option<u64> {
        self.due.first().map(|(d, _)| *d)
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Takes at most `max` keys due by `now_ms`; each stays scheduled for a retry at `retry_ms`
    /// until its activation says when it is due next.
    fn take_due(&mut self, now_ms: u64, max: usize, retry_ms: u64) -> Vec<(Key, u32)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((due, _)) = self.due.first() else { break };
            if *due > now_ms {
                break;
            }
            let (_, key) = self.due.pop_first().expect("not empty");
            let shard = self.by_key.get(&key).map_or(0, |(_, s)| *s);
            self.by_key.insert(key.clone(), (retry_ms, shard));
            out.push((key, shard));
        }
        for (key, _) in &out {
            self.due.insert((retry_ms, key.clone()));
        }
        out
    }

    fn drop_shard(&mut self, shard: u32) {
        self.loaded.remove(&shard);
        let gone: Vec<Key> = self.by_key.iter().filter(|(_, (_, s))| *s == shard).map(|(k, _)| k.clone()).collect();
        for key in gone {
            self.set(&key, shard, None);
        }
    }
}

/// The schedule's task: load the index of shards as they come, fire what is due.
pub(super) async fn run(weak: Weak<HostInner>) {
    // Weak: a host dropped without a shutdown ends this task too.
    while let Some(host) = weak.upgrade() {
        let handle = Host { inner: host.clone() };
        let now = crate::clock::wall_ms();
        let next = host.schedule().next_due().unwrap_or(u64::MAX);
        let wait_ms = next.saturating_sub(now).min(SERVED_POLL_MS);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = host.schedule_wake.notified() => {}
            _ = host.cancel.cancelled() => return,
        }
        refresh_served(&host).await;
        fire_due(&host, &handle).await;
    }
}

/// Loads the index of shards newly served here, forgets those no longer served.
async fn refresh_served(host: &HostInner) {
    let served: HashMap<u32, u64> = host.gate.served().into_iter().collect();
    let (gone, new): (Vec<u32>, Vec<(u32, u64)>) = {
        let s = host.schedule();
        let gone = s.loaded.iter().filter(|(sh, e)| served.get(sh) != Some(e)).map(|(sh, _)| *sh).collect();
        let new = served.iter().filter(|(sh, e)| s.loaded.get(sh) != Some(e)).map(|(sh, e)| (*sh, *e)).collect();
        (gone, new)
    };
    for shard in gone {
        host.schedule().drop_shard(shard);
    }
    for (shard, epoch) in new {
        match read_index(host.storage.as_ref(), shard).await {
            Ok(entries) => {
                let mut s = host.schedule();
                if !entries.is_empty() {
                    debug!(shard, agents = entries.len(), "reminders loaded");
                }
                for (key, due) in entries {
                    s.offer(key, shard, due);
                }
                s.loaded.insert(shard, epoch);
            }
            // Not marked loaded: tried again next round.
            Err(e) => warn!(shard, error = %e, "the reminder index of a shard could not be read"),
        }
    }
}

/// Sends a fire message to every agent due now (at most a round's worth).
async fn fire_due(host: &HostInner, handle: &Host) {
    let now = crate::clock::wall_ms();
    let due = host.schedule().take_due(now, REMINDERS_DUE_PER_ROUND_MAX, now + FIRE_RETRY_MS);
    let round_full = due.len() == REMINDERS_DUE_PER_ROUND_MAX;
    for (key, shard) in due {
        match handle.send(&key, Msg::Fire).await {
            Ok(()) => {}
            // Not ours (any more), or a type this node does not run: forget it; a node that
            // serves the shard loads it from the index.
            Err(CallError::NotOwner { .. } | CallError::UnknownType(_) | CallError::InvalidKey(_)) => {
                host.schedule().set(&key, shard, None);
            }
            // Busy or not ready: the retry stays scheduled.
            Err(e) => debug!(key = ?key, error = %e, "a reminder could not fire yet"),
        }
    }
    if round_full {
        host.schedule_wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(due_ms: u64, every_ms: Option<u64>) -> ReminderInfo {
        ReminderInfo {
            name: "r".into(),
            due_ms,
            every_ms,
            tick: 0,
            signal: codec::to_json(&Signal::new("t", serde_json::json!(1))),
            nonce: "n".into(),
        }
    }

    #[test]
    fn periodic_reminders_move_one_tick_and_skip_only_beyond_the_limit() {
        assert_eq!(advance(&info(1000, None), 5000), (None, 0));
        let (next, skipped) = advance(&info(1000, Some(1000)), 1500);
        assert_eq!((next.as_ref().map(|n| (n.tick, n.due_ms)), skipped), (Some((1, 2000)), 0));
        // 10 ticks behind: each fires, none skipped.
        let (next, skipped) = advance(&info(1000, Some(1000)), 12_000);
        assert_eq!((next.unwrap().tick, skipped), (1, 0));
        // Far behind: the older ones are skipped, the last REMINDER_MISSED_TICKS_MAX fire.
        let far = 1000 + (REMINDER_MISSED_TICKS_MAX + 50) * 1000;
        let (next, skipped) = advance(&info(1000, Some(1000)), far);
        let next = next.unwrap();
        assert_eq!(skipped, 49);
        assert_eq!((far - next.due_ms) / 1000, REMINDER_MISSED_TICKS_MAX);
    }

    #[test]
    fn index_keys_name_their_shard_and_agent() {
        let agent = Key::new("order", "o/1\0x");
        let index = index_key(42, &agent);
        assert_eq!(index_shard(&index, 256), Some(42));
        assert_eq!(index_shard(&index, 40), None, "a shard beyond the count is not one");
        assert_eq!(index_shard(&agent, 256), None);
        // The agent's id may hold anything: the type is what comes before the first NUL.
        assert_eq!(agent_of(&index), Some(agent));
    }

    #[test]
    fn names_periods_and_counts_are_checked() {
        let s = Signal::new("t", serde_json::json!(1));
        let mut table = Table::new();
        assert!(make(&table, "", Reminder::at(1), &s).is_err());
        assert!(make(&table, "a/b", Reminder::at(1), &s).is_err());
        assert!(make(&table, &"x".repeat(REMINDER_NAME_LEN_MAX + 1), Reminder::at(1), &s).is_err());
        assert!(
            make(&table, "p", Reminder::every_from(1, Duration::from_millis(REMINDER_PERIOD_MIN_MS - 1)), &s).is_err()
        );
        for n in 0..REMINDERS_PER_AGENT_MAX {
            let r = make(&table, &format!("r{n}"), Reminder::at(1), &s).unwrap();
            table.insert(r.name.clone(), r);
        }
        assert!(make(&table, "one-more", Reminder::at(1), &s).is_err());
        assert!(make(&table, "r0", Reminder::at(2), &s).is_ok(), "replacing one is not one more");
        let big = Signal::new("t", serde_json::json!("x".repeat(REMINDER_SIGNAL_BYTES_MAX)));
        assert!(make(&Table::new(), "big", Reminder::at(1), &big).is_err());
    }

    #[test]
    fn the_schedule_orders_by_due_time_and_keeps_a_retry_for_what_it_fired() {
        let mut s = Schedule::default();
        let (a, b, c) = (Key::new("t", "a"), Key::new("t", "b"), Key::new("t", "c"));
        assert!(s.set(&a, 1, Some(300)));
        assert!(s.set(&b, 2, Some(100)));
        assert!(!s.set(&c, 2, Some(200)), "not earlier than b");
        s.offer(b.clone(), 2, 50);
        assert_eq!(s.next_due(), Some(100), "the index does not override what an activation said");
        assert_eq!(s.take_due(250, 10, 1250), vec![(b.clone(), 2), (c.clone(), 2)]);
        assert_eq!(s.next_due(), Some(300));
        assert_eq!(s.take_due(1300, 1, 2300), vec![(a.clone(), 1)], "at most max per round");
        s.drop_shard(2);
        assert_eq!(s.len(), 1);
        s.set(&a, 1, None);
        assert_eq!((s.len(), s.next_due()), (0, None));
    }
}
