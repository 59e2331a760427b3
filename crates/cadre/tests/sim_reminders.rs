//! Reminders in deterministic simulation, over several seeds: tickers with a periodic reminder
//! (every second) and a one-shot one, on 3 to 5 nodes sharing one store, while partitions,
//! crashes and restarts come and go. Once faults stop, each ticker's state must hold every tick
//! that fell due exactly once, in order (none skipped, none repeated), and its one-shot tick once.
//! A failure prints its seed and the command that replays it.

#[path = "support/sim.rs"]
mod simkit;

use std::sync::Arc;
use std::time::Duration;

use cadre::agent::{Agent, AgentError, Ctx, Reminder, Reply};
use cadre::config::{Config, PlacementConfig};
use cadre::meta::ShardState;
use cadre::node::NodeOptions;
use cadre::placement::desired_owner;
use cadre::signal::Signal;
use cadre::sim::{run_seeds_in, SimCluster, SimNode, SIM_SECRET};
use cadre::storage::memory::MemoryStorage;
use cadre::storage::{Key, Storage};
use simkit::{crash_is_safe, names, strs, Rng};

const TICKERS: usize = 8;
const PERIOD_MS: u64 = 1000;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Once faults stop, the time the cluster has to fire what fell due meanwhile.
const CATCH_UP: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A partition in force: the two sides, by node name.
type Cut = (Vec<String>, Vec<String>);

/// `ticker.set {"first_ms", "once_ms"}` sets both reminders; ticks are recorded in order.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Ticker {
    ticks: Vec<(String, u64, u64)>,
}

impl Agent for Ticker {
    const TYPE: &'static str = "ticker";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let data = match &signal.data {
            Some(cadre::signal::Data::Json(v)) => v.clone(),
            _ => Reply::Null,
        };
        match signal.ty.as_str() {
            "ticker.set" => {
                let first = data["first_ms"].as_u64().unwrap_or(0);
                let every = Reminder::every_from(first, Duration::from_millis(PERIOD_MS));
                ctx.remind("every", every, Signal::new("ticker.tick", Reply::Null))?;
                let once = Reminder::at(data["once_ms"].as_u64().unwrap_or(0));
                ctx.remind("once", once, Signal::new("ticker.tick", Reply::Null))?;
                Ok(Reply::Null)
            }
            "ticker.tick" => {
                let name = signal.extension("cadrereminder").unwrap_or_default().to_string();
                let tick = signal.extension("cadretick").and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
                let due = signal.extension("cadredue").and_then(|t| t.parse().ok()).unwrap_or(0);
                self.ticks.push((name, tick, due));
                Ok(Reply::Null)
            }
            _ => Ok(serde_json::to_value(&self.ticks).expect("serializes")),
        }
    }
}

fn ticker(i: usize) -> Key {
    Key::new("ticker", format!("t{i}"))
}

fn settled(c: &SimCluster) -> bool {
    let live = c.running();
    !live.is_empty()
        && live.iter().all(|n| {
            c.cluster(n).is_some_and(|cl| {
                let st = cl.state();
                st.shard_count > 0
                    && st.shards.iter().enumerate().all(|(s, e)| {
                        e.state == ShardState::Active
                            && e.owner.as_deref() == desired_owner(s as u32, live.iter().map(String::as_str))
                    })
            })
        })
}

/// Calls `signal` on every ticker through `via`, retrying each until it answers.
fn call_all(c: &mut SimCluster, via: &str, signal: impl Fn(usize) -> Signal + 'static) -> Result<Vec<Reply>, String> {
    let bound = CATCH_UP;
    let out = c
        .run_on(via, bound + Duration::from_secs(1), move |cl| async move {
            let start = tokio::time::Instant::now();
            let mut replies = Vec::new();
            for i in 0..TICKERS {
                loop {
                    if start.elapsed() > bound {
                        return Err(format!("t{i} did not answer within {bound:?}"));
                    }
                    match cl.call(&ticker(i), signal(i), CALL_TIMEOUT).await {
                        Ok(s) => break replies.push(s.reply),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
            Ok(replies)
        })
        .map_err(|e| format!("calling through {via}: {e}"))?;
    out.ok_or(format!("{via} is not running"))?
}

/// The simulated wall clock (read inside the simulation, on `via`).
fn sim_now_ms(c: &mut SimCluster, via: &str) -> Result<u64, String> {
    let now =
        c.run_on(via, Duration::from_secs(1), |_| async { cadre::clock::wall_ms() }).map_err(|e| e.to_string())?;
    now.ok_or(format!("{via} is not running"))
}

fn scenario(seed: u64) -> Result<String, String> {
    let n = 3 + (seed % 3) as usize;
    let all = names(n);
    let mut c = SimCluster::empty(seed);
    let store = Arc::new(MemoryStorage::new());
    for name in &all {
        let seeds = if name == "n1" { Vec::new() } else { all.clone() };
        let storage: Arc<dyn Storage> = store.clone();
        c.add_node_with(
            SimNode { name: name.clone(), secret: SIM_SECRET.into(), seeds },
            move |cfg: &mut Config, opts: &mut NodeOptions, _| {
                cfg.placement = PlacementConfig {
                    shard_count: 32,
                    lease_ms: 1000,
                    lease_renew_interval_ms: 200,
                    lease_drift_margin_ms: 200,
                    controller_tick_ms: 50,
                    rebalance_interval_ms: 100,
                    ..PlacementConfig::default()
                };
                cfg.meta.voter_down_replace_ms = 2000;
                opts.storage = Some(storage.clone());
                *opts = std::mem::take(opts).agent::<Ticker>();
            },
        );
    }
    c.run_until(SETTLE_TIMEOUT, settled).map_err(|e| format!("shards not placed: {e}"))?;
    let mut rng = Rng::new(seed);
    let now_ms = sim_now_ms(&mut c, "n1")?;
    let first_ms = now_ms + 1000;
    let once: Vec<u64> = (0..TICKERS).map(|_| now_ms + rng.millis(2000, 15_000).as_millis() as u64).collect();
    let once_at = once.clone();
    call_all(&mut c, "n1", move |i| {
        Signal::new("ticker.set", serde_json::json!({ "first_ms": first_ms, "once_ms": once_at[i] }))
    })?;
    // Faults, as the agent simulations make them (a crash only while another node is up).
    let mut trace = String::new();
    let mut cut: Option<Cut> = None;
    let mut down: Option<String> = None;
    for _ in 0..8 {
        c.run_for(rng.millis(300, 2500)).map_err(|e| e.to_string())?;
        let roll = rng.below(10);
        let event = if cut.is_some() && roll < 5 {
            let (a, b) = cut.take().expect("checked");
            c.repair(&strs(&a), &strs(&b));
            format!("heal {a:?}|{b:?}")
        } else if down.is_some() && roll >= 5 {
            let v = down.take().expect("checked");
            c.restart(&v);
            format!("restart {v}")
        } else if cut.is_none() && down.is_none() && roll.is_multiple_of(2) {
            let mut side = all.clone();
            let a = vec![side.remove(rng.below(side.len()))];
            c.partition(&strs(&a), &strs(&side));
            let e = format!("partition {a:?}|{side:?}");
            cut = Some((a, side));
            e
        } else if cut.is_none() && down.is_none() {
            let running = c.running();
            let v = running[rng.below(running.len())].clone();
            if crash_is_safe(&c, &v) {
                c.crash(&v);
                down = Some(v.clone());
                format!("crash {v}")
            } else {
                format!("crash of {v} skipped (the group could lose its quorum)")
            }
        } else {
            "nothing".into()
        };
        trace.push_str(&format!("{:?} {event}\n", c.elapsed()));
    }
    if let Some((a, b)) = cut.take() {
        c.repair(&strs(&a), &strs(&b));
    }
    if let Some(v) = down.take() {
        c.restart(&v);
    }
    c.run_until(SETTLE_TIMEOUT, settled).map_err(|e| format!("not placed after the faults: {e}\n{trace}"))?;
    c.run_for(CATCH_UP).map_err(|e| e.to_string())?;
    let read_ms = sim_now_ms(&mut c, "n1")?;
    let replies = call_all(&mut c, "n1", |_| Signal::new("ticker.get", Reply::Null))?;
    let mut fired = 0;
    for (i, reply) in replies.into_iter().enumerate() {
        let ticks: Vec<(String, u64, u64)> = serde_json::from_value(reply).map_err(|e| e.to_string())?;
        let every: Vec<u64> = ticks.iter().filter(|(n, _, _)| n == "every").map(|(_, t, _)| *t).collect();
        if every.iter().enumerate().any(|(k, t)| *t != k as u64) {
            return Err(format!("t{i}: ticks not each once in order: {every:?}\nfaults:\n{trace}"));
        }
        // Every tick due a period before the read has fired (the last one may be in flight).
        let due = (read_ms.saturating_sub(first_ms + PERIOD_MS)) / PERIOD_MS + 1;
        if (every.len() as u64) < due {
            return Err(format!("t{i}: {} ticks fired, {due} were due\nfaults:\n{trace}", every.len()));
        }
        let onces = ticks.iter().filter(|(n, _, _)| n == "once").count();
        if onces != 1 {
            return Err(format!("t{i}: the one-shot reminder fired {onces} times\nfaults:\n{trace}"));
        }
        fired += every.len();
    }
    Ok(format!("{n} nodes; {fired} periodic ticks fired, each once in order; faults: {}", trace.lines().count()))
}

#[test]
fn reminders_fire_each_tick_once_through_partitions_crashes_and_restarts() {
    run_seeds_in("sim_reminders", "reminders_fire_each_tick_once_through_partitions_crashes_and_restarts", 6, scenario);
}
