//! Reminders and timers on one host: firing, passivation, crashes, failures, limits.

use std::sync::LazyLock;

use super::*;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::memory::MemoryStorage;
use crate::storage::{Key, Storage};
use serde::Deserialize;

const T: Duration = Duration::from_secs(10);
/// What the test waits for an event at most (a reminder that never fires fails the test).
const WAIT: Duration = Duration::from_secs(30);

/// Every tick and timer an `alarm` handles: (agent id, reminder name or "timer", tick).
static FIRED: LazyLock<tokio::sync::broadcast::Sender<(String, String, u64)>> =
    LazyLock::new(|| tokio::sync::broadcast::channel(1024).0);

/// `alarm.set {"name", "in_ms" | "every_ms", "fail"}` sets a reminder whose ticks are
/// `alarm.tick` (failing when `fail`); `alarm.cancel {"name"}`; `alarm.timer {"ms"}` sets a timer
/// sending `alarm.timed`; `alarm.get` answers the state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Alarm {
    fired: Vec<(String, u64)>,
}

#[derive(Deserialize)]
struct Set {
    name: String,
    in_ms: Option<u64>,
    every_ms: Option<u64>,
    #[serde(default)]
    fail: bool,
}

fn data(signal: &Signal) -> serde_json::Value {
    match &signal.data {
        Some(crate::signal::Data::Json(v)) => v.clone(),
        _ => serde_json::Value::Null,
    }
}

impl Agent for Alarm {
    const TYPE: &'static str = "alarm";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let failed = |e: serde_json::Error| AgentError::Failed(e.to_string());
        match signal.ty.as_str() {
            "alarm.set" => {
                let set: Set = serde_json::from_value(data(&signal)).map_err(failed)?;
                let when = match (set.in_ms, set.every_ms) {
                    (_, Some(every)) => Reminder::every(Duration::from_millis(every)),
                    (Some(ms), None) => Reminder::after(Duration::from_millis(ms)),
                    (None, None) => return Err(AgentError::Failed("in_ms or every_ms".into())),
                };
                let tick = Signal::new("alarm.tick", serde_json::json!({ "fail": set.fail }));
                ctx.remind(&set.name, when, tick)?;
                Ok(Reply::Null)
            }
            "alarm.cancel" => Ok(ctx.cancel_reminder(data(&signal)["name"].as_str().unwrap_or_default()).into()),
            "alarm.timer" => {
                let ms = data(&signal)["ms"].as_u64().unwrap_or(0);
                ctx.timer(Duration::from_millis(ms), Signal::new("alarm.timed", serde_json::json!({})))?;
                Ok(Reply::Null)
            }
            "alarm.tick" | "alarm.timed" => {
                let name = signal.extension("cadrereminder").unwrap_or("timer").to_string();
                let tick = signal.extension("cadretick").and_then(|t| t.parse().ok()).unwrap_or(0);
                self.fired.push((name.clone(), tick));
                let _ = FIRED.send((ctx.key().id.clone(), name, tick));
                if data(&signal)["fail"] == true {
                    return Err(AgentError::Failed("the tick fails".into()));
                }
                Ok(Reply::Null)
            }
            "alarm.get" => Ok(serde_json::to_value(&*self).unwrap()),
            other => Err(AgentError::Failed(format!("alarm does not handle {other}"))),
        }
    }
}

fn host(storage: Arc<dyn Storage>) -> Host {
    HostBuilder::new(AgentsConfig::default(), storage).agent::<Alarm>().build()
}

async fn call(host: &Host, id: &str, ty: &str, data: serde_json::Value) -> Result<Reply, CallError> {
    host.call(&Key::new("alarm", id), Signal::new(ty, data), T).await
}

/// The next event of agent `id`.
async fn next(rx: &mut tokio::sync::broadcast::Receiver<(String, String, u64)>, id: &str) -> (String, u64) {
    let wait = async {
        loop {
            let (who, name, tick) = rx.recv().await.expect("the event channel keeps up");
            if who == id {
                return (name, tick);
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| panic!("no event for {id} within {WAIT:?}"))
}

fn fired(reply: Reply) -> Vec<(String, u64)> {
    serde_json::from_value(reply["fired"].clone()).unwrap()
}

#[tokio::test]
async fn a_reminder_fires_once_and_wakes_its_passivated_agent() {
    let mut rx = FIRED.subscribe();
    let h = host(Arc::new(MemoryStorage::new()));
    let key = Key::new("alarm", "once");
    call(&h, "once", "alarm.set", serde_json::json!({"name": "r", "in_ms": 300})).await.unwrap();
    assert_eq!(h.reminders_scheduled(), 1);
    assert!(h.stop(&key).await);
    assert_eq!(next(&mut rx, "once").await, ("r".into(), 0));
    assert_eq!(fired(call(&h, "once", "alarm.get", serde_json::json!({})).await.unwrap()), [("r".to_string(), 0)]);
    // Gone from the agent and from the schedule: it cannot fire again.
    let list = h.read(&key, Some(Signal::new(reminders::OP_LIST, serde_json::json!({})))).await.unwrap();
    assert_eq!(list["reminders"], serde_json::json!([]));
    assert_eq!(h.reminders_scheduled(), 0);
    assert_eq!(h.inner.fires[0].get(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn periodic_reminders_fire_each_tick_in_order_until_cancelled() {
    let mut rx = FIRED.subscribe();
    let h = host(Arc::new(MemoryStorage::new()));
    let every = reminders::REMINDER_PERIOD_MIN_MS;
    call(&h, "every", "alarm.set", serde_json::json!({"name": "p", "every_ms": every})).await.unwrap();
    for tick in 0..3 {
        assert_eq!(next(&mut rx, "every").await, ("p".into(), tick));
    }
    assert_eq!(call(&h, "every", "alarm.cancel", serde_json::json!({"name": "p"})).await.unwrap(), true);
    let state = fired(call(&h, "every", "alarm.get", serde_json::json!({})).await.unwrap());
    assert!(state.len() >= 3 && state.iter().enumerate().all(|(i, (_, t))| *t == i as u64), "{state:?}");
    assert_eq!(h.reminders_scheduled(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn a_reminder_survives_a_crash_and_fires_from_a_new_host_on_the_same_store() {
    let mut rx = FIRED.subscribe();
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let first = host(storage.clone());
    call(&first, "crash", "alarm.set", serde_json::json!({"name": "r", "in_ms": 500})).await.unwrap();
    first.abort().await;
    // A new process: it knows the reminder only from the store's index.
    let second = host(storage.clone());
    assert_eq!(next(&mut rx, "crash").await, ("r".into(), 0));
    assert_eq!(
        fired(call(&second, "crash", "alarm.get", serde_json::json!({})).await.unwrap()),
        [("r".to_string(), 0)]
    );
    second.shutdown().await;
    // Its index entry went with the reminder.
    let left = storage.scan_keys(None, 100).await.unwrap();
    assert!(left.iter().all(|k| k.ty != reminders::REMINDER_INDEX_TYPE), "{left:?}");
}

#[tokio::test]
async fn a_failing_tick_rolls_back_its_state_and_is_not_fired_again() {
    let mut rx = FIRED.subscribe();
    let h = HostBuilder::new(AgentsConfig::default(), Arc::new(MemoryStorage::new()))
        .metrics(&crate::metrics::Metrics::new())
        .agent::<Alarm>()
        .build();
    call(&h, "fails", "alarm.set", serde_json::json!({"name": "bad", "in_ms": 100, "fail": true})).await.unwrap();
    call(&h, "fails", "alarm.set", serde_json::json!({"name": "good", "in_ms": 400})).await.unwrap();
    assert_eq!(next(&mut rx, "fails").await, ("bad".into(), 0));
    // The next event is the other reminder: the failed one was not fired again meanwhile.
    assert_eq!(next(&mut rx, "fails").await, ("good".into(), 0));
    assert_eq!(fired(call(&h, "fails", "alarm.get", serde_json::json!({})).await.unwrap()), [("good".to_string(), 0)]);
    assert_eq!((h.inner.fires[0].get(), h.inner.fires[1].get()), (1, 1));
    h.shutdown().await;
}

#[tokio::test]
async fn timers_fire_while_their_activation_lives_and_die_with_it() {
    let mut rx = FIRED.subscribe();
    let h = host(Arc::new(MemoryStorage::new()));
    let key = Key::new("alarm", "timer");
    call(&h, "timer", "alarm.timer", serde_json::json!({"ms": 50})).await.unwrap();
    assert_eq!(next(&mut rx, "timer").await, ("timer".into(), 0));
    // A timer set, then the activation ends: the next event is the reminder due after it.
    call(&h, "timer", "alarm.timer", serde_json::json!({"ms": 200})).await.unwrap();
    call(&h, "timer", "alarm.set", serde_json::json!({"name": "later", "in_ms": 1200})).await.unwrap();
    assert!(h.stop(&key).await);
    assert_eq!(next(&mut rx, "timer").await, ("later".into(), 0));
    h.shutdown().await;
}

#[tokio::test]
async fn bad_reminders_are_refused_and_the_host_types_set_list_and_cancel() {
    let h = host(Arc::new(MemoryStorage::new()));
    let key = Key::new("alarm", "ops");
    let short = call(&h, "ops", "alarm.set", serde_json::json!({"name": "p", "every_ms": 10})).await;
    assert!(matches!(&short, Err(CallError::Handler(m)) if m.contains("shorter")), "{short:?}");
    let bad_name = call(&h, "ops", "alarm.set", serde_json::json!({"name": "a b", "in_ms": 10})).await;
    assert!(matches!(bad_name, Err(CallError::Handler(_))));
    for n in 0..reminders::REMINDERS_PER_AGENT_MAX {
        call(&h, "ops", "alarm.set", serde_json::json!({"name": format!("r{n}"), "in_ms": 3_600_000})).await.unwrap();
    }
    let over = call(&h, "ops", "alarm.set", serde_json::json!({"name": "more", "in_ms": 10})).await;
    assert!(matches!(&over, Err(CallError::Handler(m)) if m.contains("at most")), "{over:?}");
    // What the HTTP API sends: set, list (a read, or a call), cancel.
    let set = serde_json::json!({"name": "r0", "every_ms": 60_000, "signal": {"type": "alarm.tick", "data": {}}});
    let reply = h.call(&key, Signal::new(reminders::OP_SET, set), T).await.unwrap();
    assert_eq!(reply["reminder"]["every_ms"], 60_000);
    let bad = serde_json::json!({"name": "x", "in_ms": 1, "due_ms": 1, "signal": {"type": "t"}});
    assert!(matches!(h.call(&key, Signal::new(reminders::OP_SET, bad), T).await, Err(CallError::Handler(_))));
    let list = h.read(&key, Some(Signal::new(reminders::OP_LIST, serde_json::json!({})))).await.unwrap();
    assert_eq!(list["reminders"].as_array().unwrap().len(), reminders::REMINDERS_PER_AGENT_MAX);
    let cancel = |name: &str| Signal::new(reminders::OP_CANCEL, serde_json::json!({ "name": name }));
    assert_eq!(h.call(&key, cancel("r0"), T).await.unwrap()["cancelled"], true);
    assert_eq!(h.call(&key, cancel("r0"), T).await.unwrap()["cancelled"], false);
    let listed = h.call(&key, Signal::new(reminders::OP_LIST, serde_json::json!({})), T).await.unwrap();
    assert_eq!(listed["reminders"].as_array().unwrap().len(), reminders::REMINDERS_PER_AGENT_MAX - 1);
    h.shutdown().await;
}
