use super::counter::Counter;
use super::*;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::memory::MemoryStorage;
use crate::storage::{Fence, Key, Storage, StorageError};
use serde::Deserialize;

const T: Duration = Duration::from_secs(10);

fn add(n: i64) -> Signal {
    Signal::new("counter.add", serde_json::json!(n))
}

fn get() -> Signal {
    Signal::new("counter.get", serde_json::json!(null))
}

fn key(id: &str) -> Key {
    Key::new("counter", id)
}

fn host_with(cfg: AgentsConfig, storage: Arc<dyn Storage>) -> Host {
    HostBuilder::new(cfg, storage).agent::<Counter>().agent::<Probe>().build()
}

fn host() -> (Host, Arc<MemoryStorage>) {
    let storage = Arc::new(MemoryStorage::new());
    (host_with(AgentsConfig::default(), storage.clone()), storage)
}

#[tokio::test]
async fn calls_activate_the_agent_and_write_through() {
    let (host, storage) = host();
    assert_eq!(host.call(&key("c1"), add(5), T).await.unwrap(), 5);
    assert_eq!(host.call(&key("c1"), add(-2), T).await.unwrap(), 3);
    assert_eq!(host.call(&key("c2"), add(1), T).await.unwrap(), 1);
    assert!(host.is_active(&key("c1")));
    assert_eq!(host.active(), 2);
    // Stored before the reply.
    let stored = storage.get(&key("c1")).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&handled::stored_state(&stored.value).unwrap()).unwrap(),
        serde_json::json!({"value": 3})
    );
    // A get changes nothing, so nothing is written.
    assert_eq!(host.call(&key("c1"), get(), T).await.unwrap(), 3);
    assert_eq!(storage.get(&key("c1")).await.unwrap().unwrap().revision, stored.revision);
    let e = host.call(&key("c1"), Signal::new("counter.add", serde_json::json!("x")), T).await.unwrap_err();
    assert!(matches!(e, CallError::Handler(ref m) if m.contains("integer")), "{e}");
    assert_eq!(host.call(&Key::new("nope", "1"), get(), T).await, Err(CallError::UnknownType("nope".into())));
    host.shutdown().await;
}

#[tokio::test]
async fn state_survives_passivation_and_a_new_host() {
    let (host, storage) = host();
    host.call(&key("c"), add(7), T).await.unwrap();
    assert!(host.stop(&key("c")).await);
    // The next call waits for the old activation's last write, then loads it.
    assert_eq!(host.call(&key("c"), add(1), T).await.unwrap(), 8);
    host.shutdown().await;
    let again = host_with(AgentsConfig::default(), storage);
    assert_eq!(again.call(&key("c"), get(), T).await.unwrap(), 8);
    again.shutdown().await;
}

#[tokio::test]
async fn concurrent_calls_to_one_key_meet_one_activation() {
    let (host, storage) = host();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.call(&key("hot"), add(1), T).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(host.call(&key("hot"), get(), T).await.unwrap(), 200);
    host.shutdown().await;
    let stored = storage.get(&key("hot")).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&handled::stored_state(&stored.value).unwrap()).unwrap()["value"],
        200
    );
}

/// A test agent: records lifecycle events, fails, panics and blocks on request.
#[derive(Default, Serialize, Deserialize)]
struct Probe {
    n: i64,
}

static EVENTS: std::sync::OnceLock<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>> = std::sync::OnceLock::new();

fn events_for(id: &str) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    EVENTS.get_or_init(Default::default).lock().unwrap().insert(id.to_string(), tx);
    rx
}

fn emit(ctx: &Ctx, what: &str) {
    if let Some(tx) = EVENTS.get_or_init(Default::default).lock().unwrap().get(&ctx.key().id) {
        let _ = tx.send(what.to_string());
    }
}

static GATE: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
/// Held by `hold` signals (only the counters test sends them).
static HOLD: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();

impl Agent for Probe {
    const TYPE: &'static str = "probe";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        self.n += 1;
        match signal.ty.as_str() {
            "fail" => Err(AgentError::Failed("refused".into())),
            "fatal" => Err(AgentError::Fatal("broken".into())),
            "panic" => panic!("probe bug"),
            "hold" => {
                emit(ctx, "held");
                let _permit = HOLD.get_or_init(|| tokio::sync::Semaphore::new(0)).acquire().await.unwrap();
                Ok(self.n.into())
            }
            "block" => {
                emit(ctx, "blocked");
                let _permit = GATE.get_or_init(|| tokio::sync::Semaphore::new(0)).acquire().await.unwrap();
                Ok(self.n.into())
            }
            _ => Ok(self.n.into()),
        }
    }

    async fn on_activate(&mut self, ctx: &mut Ctx) {
        emit(ctx, "activate");
    }

    async fn on_passivate(&mut self, ctx: &mut Ctx) {
        emit(ctx, "passivate");
    }
}

fn probe(id: &str) -> Key {
    Key::new("probe", id)
}

fn sig(ty: &str) -> Signal {
    Signal::bare(crate::signal::new_id(), "/t", ty)
}

#[tokio::test]
async fn a_failed_call_rolls_back_and_fatal_errors_restart_until_the_limit() {
    let cfg = AgentsConfig { restarts_max: 2, ..AgentsConfig::default() };
    let host = host_with(cfg, Arc::new(MemoryStorage::new()));
    let k = probe("sup");
    assert_eq!(host.call(&k, sig("ok"), T).await.unwrap(), 1);
    assert_eq!(host.call(&k, sig("fail"), T).await, Err(CallError::Handler("refused".into())));
    assert_eq!(host.call(&k, sig("ok"), T).await.unwrap(), 2, "the failed call's change was rolled back");
    assert_eq!(host.call(&k, sig("fatal"), T).await, Err(CallError::Handler("broken".into())));
    assert_eq!(host.call(&k, sig("panic"), T).await, Err(CallError::Handler("handler panicked".into())));
    assert_eq!(host.call(&k, sig("ok"), T).await.unwrap(), 3, "restarted from the stored state");
    // The third restart within the window is over the limit: stopped, callers told.
    assert_eq!(host.call(&k, sig("fatal"), T).await, Err(CallError::Crashed));
    assert!(!host.is_active(&k));
    // A later call starts a new activation from the stored state.
    assert_eq!(host.call(&k, sig("ok"), T).await.unwrap(), 4);
    host.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_agents_passivate() {
    let cfg = AgentsConfig { idle_timeout_ms: 1000, ..AgentsConfig::default() };
    let host = host_with(cfg, Arc::new(MemoryStorage::new()));
    let mut events = events_for("idle");
    host.call(&probe("idle"), sig("ok"), T).await.unwrap();
    assert_eq!(events.recv().await.unwrap(), "activate");
    // The paused clock jumps to the idle deadline once everything waits.
    assert_eq!(events.recv().await.unwrap(), "passivate");
    assert!(!host.is_active(&probe("idle")));
    assert_eq!(host.call(&probe("idle"), sig("ok"), T).await.unwrap(), 2, "stored at passivation");
    host.shutdown().await;
}

#[tokio::test]
async fn over_the_active_limit_the_least_recently_used_passivates() {
    let cfg = AgentsConfig { agents_active_max: 2, ..AgentsConfig::default() };
    let host = host_with(cfg, Arc::new(MemoryStorage::new()));
    let mut a = events_for("lru-a");
    let _b = events_for("lru-b");
    host.call(&probe("lru-a"), sig("ok"), T).await.unwrap();
    host.call(&probe("lru-b"), sig("ok"), T).await.unwrap();
    host.call(&probe("lru-b"), sig("ok"), T).await.unwrap();
    host.call(&probe("lru-c"), sig("ok"), T).await.unwrap();
    assert_eq!(a.recv().await.unwrap(), "activate");
    assert_eq!(a.recv().await.unwrap(), "passivate");
    assert!(host.is_active(&probe("lru-b")) && host.is_active(&probe("lru-c")));
    assert!(host.active() <= 2);
    host.shutdown().await;
}

#[tokio::test]
async fn a_full_mailbox_refuses_at_once() {
    let cfg = AgentsConfig { mailbox_len_max: 1, ..AgentsConfig::default() };
    let host = host_with(cfg, Arc::new(MemoryStorage::new()));
    let mut events = events_for("busy");
    let k = probe("busy");
    let first = {
        let host = host.clone();
        let k = k.clone();
        tokio::spawn(async move { host.call(&k, sig("block"), T).await })
    };
    assert_eq!(events.recv().await.unwrap(), "activate");
    assert_eq!(events.recv().await.unwrap(), "blocked");
    host.cast(&k, sig("ok")).await.unwrap();
    assert!(matches!(host.cast(&k, sig("ok")).await, Err(CallError::MailboxFull(_))));
    GATE.get().unwrap().add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    host.shutdown().await;
}

#[tokio::test]
async fn a_write_fenced_by_a_newer_epoch_stops_the_activation() {
    let storage = Arc::new(MemoryStorage::new());
    let host = host_with(AgentsConfig::default(), storage.clone());
    let k = key("fenced");
    host.call(&k, add(1), T).await.unwrap();
    // Another owner takes the shard over at a newer epoch and writes.
    let shard = crate::placement::shard_of(&k, crate::placement::SHARD_COUNT_DEFAULT);
    let rev = storage.get(&k).await.unwrap().unwrap().revision;
    storage.put(&k, Bytes::from_static(br#"{"value":100}"#), rev, Fence { shard, epoch: 2 }).await.unwrap();
    let e = host.call(&k, add(1), T).await.unwrap_err();
    assert!(matches!(e, CallError::Storage(StorageError::Fenced { current: 2, .. })), "{e}");
    assert!(!host.is_active(&k), "a fenced activation stops");
    host.shutdown().await;
}

#[derive(Default, Serialize, Deserialize)]
struct Lazy {
    n: i64,
}

impl Agent for Lazy {
    const TYPE: &'static str = "lazy";
    const PERSISTENCE: Persistence = Persistence::OnPassivate;

    async fn handle(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        self.n += 1;
        Ok(self.n.into())
    }
}

#[tokio::test]
async fn on_passivate_persistence_writes_at_shutdown_only() {
    let storage = Arc::new(MemoryStorage::new());
    let host = HostBuilder::new(AgentsConfig::default(), storage.clone()).agent::<Lazy>().build();
    let k = Key::new("lazy", "1");
    for _ in 0..3 {
        host.call(&k, sig("x"), T).await.unwrap();
    }
    assert_eq!(storage.get(&k).await.unwrap(), None, "nothing written yet");
    host.shutdown().await;
    #[derive(Deserialize)]
    struct N {
        n: i64,
    }
    let stored = storage.get(&k).await.unwrap().unwrap().value;
    let stored: N = serde_json::from_slice(&handled::stored_state(&stored).unwrap()).unwrap();
    assert_eq!(stored.n, 3);
}

static ACT_PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Panics in its hooks on request; keeps a field that is not stored.
#[derive(Default, Serialize, Deserialize)]
struct Grumpy {
    n: i64,
    #[serde(skip)]
    conn: Option<String>,
}

impl Agent for Grumpy {
    const TYPE: &'static str = "grumpy";

    async fn handle(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        self.n += 1;
        match signal.ty.as_str() {
            "fail" => Err(AgentError::Failed("refused".into())),
            "conn" => Ok(serde_json::json!(self.conn)),
            _ => Ok(self.n.into()),
        }
    }

    async fn on_activate(&mut self, ctx: &mut Ctx) {
        if ctx.key().id == "act" && ACT_PANICS.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("on_activate bug");
        }
        self.conn = Some("db".into());
    }

    async fn on_passivate(&mut self, ctx: &mut Ctx) {
        assert_ne!(ctx.key().id, "pas", "on_passivate bug");
    }
}

fn grumpy_host(cfg: AgentsConfig) -> (Host, Arc<MemoryStorage>) {
    let storage = Arc::new(MemoryStorage::new());
    (HostBuilder::new(cfg, storage.clone()).agent::<Grumpy>().agent::<Probe>().build(), storage)
}

#[tokio::test]
async fn panicking_hooks_neither_brick_the_key_nor_skip_the_last_write() {
    let (host, storage) = grumpy_host(AgentsConfig::default());
    let k = Key::new("grumpy", "pas");
    host.call(&k, sig("x"), T).await.unwrap();
    assert!(host.stop(&k).await);
    // Waits for the stopping activation (whose on_passivate panics), then activates again.
    assert_eq!(host.call(&k, sig("x"), T).await.unwrap(), 2);
    assert!(storage.get(&k).await.unwrap().is_some());
    let k = Key::new("grumpy", "act");
    assert_eq!(host.call(&k, sig("x"), T).await.unwrap(), 1, "on_activate panicked; the activation goes on");
    host.shutdown().await;
}

#[tokio::test]
async fn a_rollback_runs_on_activate_again() {
    let (host, _) = grumpy_host(AgentsConfig::default());
    let k = Key::new("grumpy", "skip");
    assert_eq!(host.call(&k, sig("conn"), T).await.unwrap(), serde_json::json!("db"));
    assert!(host.call(&k, sig("fail"), T).await.is_err());
    assert_eq!(host.call(&k, sig("conn"), T).await.unwrap(), serde_json::json!("db"));
    host.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_activations_keeps_the_active_limit() {
    let (host, _) = grumpy_host(AgentsConfig { agents_active_max: 1, ..AgentsConfig::default() });
    let mut events: Vec<_> = (0..5).map(|i| events_for(&format!("burst{i}"))).collect();
    for i in 0..5 {
        host.ensure(&probe(&format!("burst{i}"))).await.unwrap();
    }
    for ev in events.iter_mut().take(4) {
        assert_eq!(ev.recv().await.unwrap(), "activate");
        assert_eq!(ev.recv().await.unwrap(), "passivate");
    }
    assert_eq!(host.active(), 1);
    assert!(host.is_active(&probe("burst4")));
    host.shutdown().await;
}

#[derive(Default, Serialize, Deserialize)]
struct LazyFail {
    n: i64,
}

impl Agent for LazyFail {
    const TYPE: &'static str = "lazyfail";
    const PERSISTENCE: Persistence = Persistence::OnPassivate;

    async fn handle(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        self.n += 1;
        match signal.ty.as_str() {
            "fail" => Err(AgentError::Failed("refused".into())),
            _ => Ok(self.n.into()),
        }
    }
}

#[tokio::test]
async fn on_passivate_agents_roll_back_one_call_not_all_since_activation() {
    let host = HostBuilder::new(AgentsConfig::default(), Arc::new(MemoryStorage::new())).agent::<LazyFail>().build();
    let k = Key::new("lazyfail", "1");
    for i in 1..=3 {
        assert_eq!(host.call(&k, sig("x"), T).await.unwrap(), i);
    }
    assert!(host.call(&k, sig("fail"), T).await.is_err());
    assert_eq!(host.call(&k, sig("x"), T).await.unwrap(), 4);
    host.shutdown().await;
}

#[tokio::test]
async fn reading_an_absent_agent_stores_nothing() {
    let (host, storage) = host();
    assert_eq!(host.call(&key("ghost"), get(), T).await.unwrap(), 0);
    assert_eq!(storage.get(&key("ghost")).await.unwrap(), None);
    let long = Key::new("counter", "x".repeat(crate::storage::KEY_LEN_MAX_BYTES));
    assert!(matches!(host.call(&long, get(), T).await, Err(CallError::InvalidKey(_))));
    host.shutdown().await;
}

/// After `shutdown` returns nothing writes any more: activations are never spawned after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_writes_after_shutdown_returns() {
    async fn stored(s: &MemoryStorage) -> usize {
        let mut n = 0;
        for i in 0..8 {
            for j in 0..50 {
                n += s.get(&key(&format!("r{i}-{j}"))).await.unwrap().is_some() as usize;
            }
        }
        n
    }
    for round in 0..200 {
        let storage = Arc::new(MemoryStorage::new());
        let host = host_with(AgentsConfig::default(), storage.clone());
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let host = host.clone();
                tokio::spawn(async move {
                    for j in 0..50 {
                        let _ = host.cast(&key(&format!("r{i}-{j}")), add(1)).await;
                    }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        host.shutdown().await;
        let at_shutdown = stored(&storage).await;
        for c in callers {
            c.await.unwrap();
        }
        assert_eq!(stored(&storage).await, at_shutdown, "round {round}: a write after shutdown returned");
    }
}

#[tokio::test]
async fn abort_ends_activations_without_their_last_write() {
    let storage = Arc::new(MemoryStorage::new());
    let host = HostBuilder::new(AgentsConfig::default(), storage.clone()).agent::<Lazy>().agent::<Counter>().build();
    host.call(&Key::new("lazy", "1"), sig("x"), T).await.unwrap();
    host.call(&key("w"), add(3), T).await.unwrap();
    host.abort().await;
    assert_eq!(storage.get(&Key::new("lazy", "1")).await.unwrap(), None, "an abort stores nothing more");
    assert!(storage.get(&key("w")).await.unwrap().is_some(), "write-through state stays");
    assert!(matches!(host.call(&key("w"), get(), T).await, Err(CallError::Unavailable(_))));
}

#[tokio::test]
async fn routes_dispatch_by_signal_type_and_refuse_others() {
    let host = host_with(AgentsConfig::default(), Arc::new(MemoryStorage::new()));
    let k = key("routed");
    assert_eq!(host.call(&k, add(4), T).await.unwrap(), 4);
    let get = Signal::new("counter.get", serde_json::Value::Null);
    assert_eq!(host.call(&k, get, T).await.unwrap(), 4);
    let e = host.call(&k, Signal::new("counter.nope", serde_json::Value::Null), T).await.unwrap_err();
    assert!(matches!(&e, CallError::Handler(m) if m.contains("does not handle \"counter.nope\"")), "{e}");
    host.shutdown().await;
}

/// Emits `relay.out` with its count for each `relay.in`; `relay.fail` emits, then fails.
#[derive(Default, Serialize, Deserialize)]
struct Relay {
    n: u64,
}

impl Agent for Relay {
    const TYPE: &'static str = "relay";
    const ROUTES: &'static [(&'static str, Route<Self>)] =
        &[("relay.in", Relay::relay), ("relay.fail", Relay::fail), ("relay.ping", Relay::ping)];
}

impl Relay {
    fn relay(&mut self, ctx: &mut Ctx, _s: Signal) -> Result<Reply, AgentError> {
        self.n += 1;
        ctx.emit(Signal::new("relay.out", serde_json::json!(self.n)))?;
        Ok(self.n.into())
    }
    /// Emits without changing the state.
    fn ping(&mut self, ctx: &mut Ctx, _s: Signal) -> Result<Reply, AgentError> {
        ctx.emit(Signal::new("relay.out", serde_json::json!("pong")))?;
        Ok(self.n.into())
    }
    fn fail(&mut self, ctx: &mut Ctx, _s: Signal) -> Result<Reply, AgentError> {
        self.n += 100;
        ctx.emit(Signal::new("relay.out", serde_json::json!("never")))?;
        Err(AgentError::Failed("refused".into()))
    }
}

/// An emitter that keeps what it is given in `out`.
fn collect_into(out: &Arc<Mutex<Vec<Signal>>>) -> crate::agent::Emitter {
    let sink = out.clone();
    Arc::new(move |signals| {
        sink.lock().unwrap().extend(signals);
        futures::future::ready(()).boxed()
    })
}

/// A host of counters and relays on `storage`, whose emitted signals are collected in `out`.
fn counters_and_relays(storage: &Arc<MemoryStorage>, out: &Arc<Mutex<Vec<Signal>>>) -> Host {
    HostBuilder::new(AgentsConfig::default(), storage.clone())
        .agent::<Counter>()
        .agent::<Relay>()
        .emitter(collect_into(out))
        .build()
}

#[tokio::test]
async fn signals_a_handler_emits_go_out_after_a_successful_call_with_its_cause() {
    let out: Arc<Mutex<Vec<Signal>>> = Arc::default();
    let host = HostBuilder::new(AgentsConfig::default(), Arc::new(MemoryStorage::new()))
        .agent::<Relay>()
        .emitter(collect_into(&out))
        .build();
    let k = Key::new("relay", "r");
    let first = Signal::new("relay.in", serde_json::json!(null));
    assert_eq!(host.call(&k, first.clone(), T).await.unwrap(), 1);
    // Emitted before the reply: already out.
    {
        let out = out.lock().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, Some(crate::signal::Data::Json(serde_json::json!(1))));
        assert_eq!(out[0].causation_id(), Some(first.id.as_str()));
    }
    // A failed call emits nothing (and its state is rolled back).
    assert!(host.call(&k, Signal::new("relay.fail", serde_json::json!(null)), T).await.is_err());
    assert_eq!(host.call(&k, Signal::new("relay.in", serde_json::json!(null)), T).await.unwrap(), 2);
    let emitted = out.lock().unwrap().clone();
    assert_eq!(emitted.len(), 2, "{emitted:?}");
    assert_eq!(emitted[1].data, Some(crate::signal::Data::Json(serde_json::json!(2))));
    host.shutdown().await;
}

#[tokio::test]
async fn reads_run_on_the_stored_state_and_refuse_what_is_not_a_read() {
    let storage = Arc::new(MemoryStorage::new());
    let out: Arc<Mutex<Vec<Signal>>> = Arc::default();
    let host = counters_and_relays(&storage, &out);
    let k = key("r1");
    // Nothing stored: the default state, and no activation, no write.
    assert_eq!(host.read(&k, None).await.unwrap(), serde_json::json!({"value": 0}));
    assert_eq!(host.read(&k, Some(get())).await.unwrap(), 0);
    assert!(!host.is_active(&k));
    assert!(storage.get(&k).await.unwrap().is_none());
    assert_eq!(host.call(&k, add(7), T).await.unwrap(), 7);
    let revision = storage.get(&k).await.unwrap().unwrap().revision;
    assert_eq!(host.read(&k, Some(get())).await.unwrap(), 7);
    assert_eq!(host.read(&k, None).await.unwrap(), serde_json::json!({"value": 7}));
    // A handler that changes the state is not a read: refused, nothing written, state kept.
    let e = host.read(&k, Some(add(1))).await.unwrap_err();
    assert!(matches!(&e, CallError::NotRead(m) if m.contains("changed the state")), "{e}");
    assert_eq!(storage.get(&k).await.unwrap().unwrap().revision, revision);
    assert_eq!(host.call(&k, get(), T).await.unwrap(), 7);
    // Handler errors are the handler's; unknown types and bad keys are refused as for calls.
    let bad = Signal::new("counter.nope", serde_json::json!(null));
    assert!(matches!(host.read(&k, Some(bad)).await, Err(CallError::Handler(_))));
    assert_eq!(host.read(&Key::new("nope", "1"), None).await, Err(CallError::UnknownType("nope".into())));
    let long = Key::new("counter", "x".repeat(crate::storage::KEY_LEN_MAX_BYTES + 1));
    assert!(matches!(host.read(&long, None).await, Err(CallError::InvalidKey(_))));
    // Emitting is an effect: refused, and nothing goes out.
    let r = Key::new("relay", "x");
    let e = host.read(&r, Some(Signal::new("relay.ping", serde_json::json!(null)))).await.unwrap_err();
    assert!(matches!(&e, CallError::NotRead(m) if m.contains("emitted 1")), "{e}");
    assert!(out.lock().unwrap().is_empty());
    // A read of a state the store cannot decode fails; the host carries on.
    storage.put(&key("junk"), bytes::Bytes::from_static(b"{not json"), 0, Fence { shard: 0, epoch: 1 }).await.unwrap();
    assert!(matches!(host.read(&key("junk"), Some(get())).await, Err(CallError::Unavailable(_))));
    host.shutdown().await;
    // After shutdown, reads are refused rather than served by a stopped node.
    assert!(matches!(host.read(&k, None).await, Err(CallError::Unavailable(_))));
}

/// Counts its activations in its state and announces each.
#[derive(Default, Serialize, Deserialize)]
struct Warm {
    activations: u64,
}

impl Agent for Warm {
    const TYPE: &'static str = "warm";
    const ROUTES: &'static [(&'static str, Route<Self>)] = &[("warm.get", Warm::get)];

    fn on_activate(&mut self, ctx: &mut Ctx) -> impl Future<Output = ()> + Send {
        self.activations += 1;
        let _ = ctx.emit(Signal::new("warm.up", serde_json::json!(self.activations)));
        async {}
    }
}

impl Warm {
    fn get(&mut self, _ctx: &mut Ctx, _s: Signal) -> Result<Reply, AgentError> {
        Ok(self.activations.into())
    }
}

#[tokio::test]
async fn what_on_activate_changes_or_emits_is_not_held_against_a_read() {
    let host = HostBuilder::new(AgentsConfig::default(), Arc::new(MemoryStorage::new())).agent::<Warm>().build();
    let k = Key::new("warm", "w");
    // The handler sees the state as an activation would set it up, and nothing is kept.
    assert_eq!(host.read(&k, Some(Signal::new("warm.get", serde_json::json!(null)))).await.unwrap(), 1);
    assert_eq!(host.read(&k, None).await.unwrap(), serde_json::json!({"activations": 0}));
    host.shutdown().await;
}

#[tokio::test]
async fn a_signal_handled_before_is_answered_with_its_reply_and_not_handled_again() {
    let storage = Arc::new(MemoryStorage::new());
    let out: Arc<Mutex<Vec<Signal>>> = Arc::default();
    let host = counters_and_relays(&storage, &out);
    let k = key("once");
    let first = add(5);
    assert_eq!(host.call(&k, first.clone(), T).await.unwrap(), 5);
    assert_eq!(host.call(&k, add(1), T).await.unwrap(), 6);
    // The same (source, id) again: the original reply, the state unchanged, no write.
    let revision = storage.get(&k).await.unwrap().unwrap().revision;
    assert_eq!(host.call(&k, first.clone(), T).await.unwrap(), 5);
    assert_eq!(host.call(&k, get(), T).await.unwrap(), 6);
    assert_eq!(storage.get(&k).await.unwrap().unwrap().revision, revision);
    // The same id from another source is another signal.
    let mut other = first.clone();
    other.source = "/elsewhere".into();
    assert_eq!(host.call(&k, other, T).await.unwrap(), 11);
    // A new activation loads the record with the state.
    assert_eq!(host.passivate_where(|x| *x == k).await, 1);
    assert!(!host.is_active(&k));
    assert_eq!(host.call(&k, first, T).await.unwrap(), 5, "known after passivation");
    assert_eq!(host.call(&k, get(), T).await.unwrap(), 11);

    // What a call emitted is not emitted again by its duplicate.
    let r = Key::new("relay", "r");
    let relay = Signal::new("relay.in", serde_json::json!(null));
    assert_eq!(host.call(&r, relay.clone(), T).await.unwrap(), 1);
    assert_eq!(host.call(&r, relay, T).await.unwrap(), 1);
    // A call that emits without changing the state is recorded too.
    let ping = Signal::new("relay.ping", serde_json::json!(null));
    host.call(&r, ping.clone(), T).await.unwrap();
    host.call(&r, ping, T).await.unwrap();
    assert_eq!(out.lock().unwrap().len(), 2, "{:?}", out.lock().unwrap());
    host.shutdown().await;
}

#[tokio::test]
async fn duplicates_past_the_kept_replies_answer_duplicate_and_reads_failures_and_evicted_ids_run_again() {
    let cfg = AgentsConfig { dedupe_ids_max: handled::REPLIES_KEPT_MAX + 4, ..AgentsConfig::default() };
    let storage = Arc::new(MemoryStorage::new());
    let host = host_with(cfg.clone(), storage.clone());
    let k = key("window");
    let adds: Vec<Signal> = (0..cfg.dedupe_ids_max + 2).map(|_| add(1)).collect();
    for (i, s) in adds.iter().enumerate() {
        assert_eq!(host.call(&k, s.clone(), T).await.unwrap(), i as i64 + 1);
    }
    let total = adds.len() as i64;
    // The newest replies are kept; older ids are known without their reply; the oldest are gone.
    assert_eq!(host.call(&k, adds[adds.len() - 1].clone(), T).await.unwrap(), total);
    assert_eq!(host.call(&k, adds[3].clone(), T).await, Err(CallError::Duplicate));
    assert_eq!(host.call(&k, adds[0].clone(), T).await.unwrap(), total + 1, "evicted: handled again");
    // A read changed nothing: not recorded, so its repeat runs (and sees the new value).
    let read = get();
    assert_eq!(host.call(&k, read.clone(), T).await.unwrap(), total + 1);
    assert_eq!(host.call(&k, add(1), T).await.unwrap(), total + 2);
    assert_eq!(host.call(&k, read, T).await.unwrap(), total + 2);
    // A failed call is not recorded: its retry runs.
    let bad = Signal::new("counter.add", serde_json::json!("x"));
    assert!(matches!(host.call(&k, bad.clone(), T).await, Err(CallError::Handler(_))));
    assert!(matches!(host.call(&k, bad, T).await, Err(CallError::Handler(_))));
    host.shutdown().await;

    // Without a record, a repeat is handled again; a state stored before records existed loads.
    let off = host_with(AgentsConfig { dedupe_ids_max: 0, ..AgentsConfig::default() }, storage.clone());
    let k = key("off");
    let s = add(2);
    assert_eq!(off.call(&k, s.clone(), T).await.unwrap(), 2);
    assert_eq!(off.call(&k, s, T).await.unwrap(), 4);
    let stored = storage.get(&k).await.unwrap().unwrap().value;
    assert_eq!(&stored[..], br#"{"value":4}"#, "no record, plain JSON");
    off.shutdown().await;
    let on = host_with(AgentsConfig::default(), storage.clone());
    assert_eq!(on.call(&k, add(1), T).await.unwrap(), 5);
    on.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_record_fails_the_activation_not_the_node() {
    let storage = Arc::new(MemoryStorage::new());
    let k = key("corrupt");
    let fence = LocalGate.write(&k).unwrap();
    storage.put(&k, Bytes::from_static(b"\0cd\x01\xff"), 0, fence).await.unwrap();
    let host = host_with(AgentsConfig::default(), storage.clone());
    let e = host.call(&k, add(1), T).await.unwrap_err();
    assert!(matches!(&e, CallError::Unavailable(crate::agent::Unavailable::State(m)) if m.contains("record")), "{e}");
    assert!(matches!(host.read(&k, None).await, Err(CallError::Unavailable(_))));
    assert_eq!(host.call(&key("fine"), add(1), T).await.unwrap(), 1);
    host.shutdown().await;
}

#[tokio::test]
async fn active_agents_list_by_id_in_pages_with_their_counters() {
    let (host, _) = host();
    for i in [3, 1, 4, 0, 2] {
        host.call(&key(&format!("c{i}")), add(i + 1), T).await.unwrap();
    }
    host.call(&key("c4"), add(1), T).await.unwrap();
    host.call(&probe("p"), sig("ok"), T).await.unwrap();
    let ids = |page: Vec<AgentInfo>| page.into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(ids(host.list("counter", None, 2)), ["c0", "c1"]);
    assert_eq!(ids(host.list("counter", Some("c1"), 2)), ["c2", "c3"]);
    assert_eq!(ids(host.list("counter", Some("c3"), 2)), ["c4"]);
    assert_eq!(ids(host.list("probe", None, 10)), ["p"]);
    assert!(host.list("counter", None, 0).is_empty());
    let c4 = host.info(&key("c4")).unwrap();
    assert_eq!((c4.handled, c4.mailbox_len, c4.restarts, c4.epoch), (2, 0, 0, 1));
    assert!(c4.last_call_ms >= c4.since_ms && c4.since_ms > 0, "{c4:?}");
    assert_eq!(host.info(&key("absent")), None);
    // Stored ids, by type, in pages.
    assert_eq!(host.stored("counter", None, 3).await.unwrap(), ["c0", "c1", "c2"]);
    assert_eq!(host.stored("counter", Some("c2"), 3).await.unwrap(), ["c3", "c4"]);
    assert_eq!(host.stored("nope", None, 3).await, Err(CallError::UnknownType("nope".into())));
    host.shutdown().await;
}

#[tokio::test]
async fn restarts_and_queued_signals_show_in_the_agents_counters() {
    let (host, _) = host();
    let p = probe("counted");
    let mut events = events_for("counted");
    host.call(&p, sig("ok"), T).await.unwrap();
    assert!(host.call(&p, sig("fatal"), T).await.is_err());
    let info = host.info(&p).unwrap();
    assert_eq!((info.handled, info.restarts, info.mailbox_len), (2, 1, 0), "{info:?}");
    // Held in a handler, with three more queued behind it.
    host.cast(&p, sig("hold")).await.unwrap();
    while events.recv().await.unwrap() != "held" {}
    for _ in 0..3 {
        host.cast(&p, sig("ok")).await.unwrap();
    }
    assert_eq!(host.info(&p).unwrap().mailbox_len, 3);
    HOLD.get().unwrap().add_permits(1);
    assert_eq!(host.call(&p, sig("ok"), T).await.unwrap(), 6);
    assert_eq!(host.info(&p).unwrap().handled, 7);
    host.shutdown().await;
}
