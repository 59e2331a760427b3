//! The [`Host`]: the table of activations on this node, one per key, and the handle callers use.
//!
//! The table holds each key as `Active` (its mailbox, its counters, its place in the
//! least-recently-used order) or `Stopping` (gone once its last write is done). A call finds or
//! starts the activation under the table's lock and then sends to its mailbox outside it; a call
//! for a `Stopping` key waits until the slot is gone, so a new activation never loads state older
//! than what the previous one stored. The same lock orders passivation sweeps
//! ([`Host::passivate_where`]) and shutdown against new activations.
//!
//! [`HostBuilder`] registers agent types: each gives a spawner (the activation loop) and a reader
//! (reads of the stored state). Listing ([`Host::list`], [`Host::info`]) reads the counters the
//! activations keep ([`AgentInfo`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activation::{run, Msg};
use super::ctx::check_chain;
use super::read::read;
use super::{reminders, Agent, CallError, Caller, Gate, LocalGate, Reply, Unavailable};
use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::{Key, Storage};

/// Times a call looks for a live activation (one closing as it sends is retried).
pub const CALL_ATTEMPTS_MAX: usize = 3;

/// Publishes what a call emitted (the node's bus); awaited before the call's reply.
pub type Emitter = Arc<dyn Fn(Vec<Signal>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

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
pub(super) struct Stats {
    since_ms: u64,
    pub(super) epoch: std::sync::atomic::AtomicU64,
    pub(super) handled: std::sync::atomic::AtomicU64,
    pub(super) last_call_ms: std::sync::atomic::AtomicU64,
    pub(super) restarts: std::sync::atomic::AtomicU32,
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

pub(super) struct HostInner {
    pub(super) cfg: AgentsConfig,
    pub(super) storage: Arc<dyn Storage>,
    pub(super) gate: Arc<dyn Gate>,
    types: HashMap<&'static str, (Spawner, Reader)>,
    table: Mutex<Table>,
    reads: Arc<tokio::sync::Semaphore>,
    pub(super) cancel: CancellationToken,
    /// Set by [`Host::abort`]: activations end without passivating, as in a crash.
    pub(super) aborted: std::sync::atomic::AtomicBool,
    /// Publishes what handlers emit (the node's bus; without one they are dropped).
    pub(super) emitter: Option<Emitter>,
    /// Carries handlers' calls and casts (the node's cluster; without one, to this host's agents).
    caller: Option<Caller>,
    /// Duplicates answered without running the handler: [reply kept, reply gone].
    pub(super) duplicates: [prometheus_client::metrics::counter::Counter; 2],
    /// Reminder ticks fired: [handled, failed]; ticks skipped as too far behind.
    pub(super) fires: [prometheus_client::metrics::counter::Counter; 2],
    pub(super) skipped: prometheus_client::metrics::counter::Counter,
    schedule: Mutex<reminders::Schedule>,
    pub(super) schedule_wake: Notify,
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
    emitter: Option<Emitter>,
    caller: Option<Caller>,
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
            emitter: None,
            caller: None,
        }
    }

    /// What publishes the signals handlers emit (without one they are dropped).
    pub fn emitter(mut self, emitter: Emitter) -> Self {
        self.emitter = Some(emitter);
        self
    }

    /// What carries handlers' calls and casts to other agents ([`Ctx::call`](super::Ctx::call));
    /// without one they go to this host's own agents.
    pub fn caller(mut self, caller: Caller) -> Self {
        self.caller = Some(caller);
        self
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
                emitter: self.emitter,
                caller: self.caller,
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
    pub(super) inner: Arc<HostInner>,
}

impl HostInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn schedule(&self) -> std::sync::MutexGuard<'_, reminders::Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the schedule when `key` is due next (`None`: it has no reminders).
    pub(super) fn reschedule(&self, key: &Key, shard: u32, due_ms: Option<u64>) {
        if self.schedule().set(key, shard, due_ms) {
            self.schedule_wake.notify_one();
        }
    }

    /// What carries handlers' calls: the node's, else one to this host's own agents (weak: the
    /// activations hold it, and the host must be able to go).
    pub(super) fn caller(self: &Arc<Self>) -> Caller {
        if let Some(c) = &self.caller {
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
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
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
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
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
    /// store holds: for [`Persistence::OnPassivate`](super::Persistence::OnPassivate) types, the
    /// state as of the last passivation.
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

    /// Passivates the agent (after what is in its mailbox) and returns once it has stored its
    /// state and ended; false if it was not active.
    pub async fn stop(&self, key: &Key) -> bool {
        let (tx, ended) = match self.inner.lock().slots.get(key) {
            Some(Slot::Active { tx, ended, .. }) => (tx.clone(), ended.clone()),
            _ => return false,
        };
        if tx.send(Msg::Stop).await.is_err() {
            return false;
        }
        ended.cancelled().await;
        true
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

    pub(super) async fn send(&self, key: &Key, msg: Msg) -> Result<(), CallError> {
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
pub(super) fn begin_stop(host: &HostInner, key: &Key) -> Arc<Notify> {
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

pub(super) fn end_stop(host: &HostInner, key: &Key, done: &Notify) {
    if let Some(Slot::Stopping(_, ended) | Slot::Active { ended, .. }) = host.lock().slots.remove(key) {
        ended.cancel();
    }
    done.notify_waiters();
}
