//! `cadre bench reminders`: durable reminders across three in-process nodes (memory storage,
//! the default replication), against bare tokio timers in the same run.
//!
//! Each of `--reminders` agents sets one periodic reminder; the periods and first due times are
//! spread so that `--rate` ticks fall due per second (period = reminders / rate). After the set-up
//! (reported as reminders set per second, `CONCURRENCY` callers), the bench waits one whole period
//! (the first ticks, late by however long the set-up took, fire meanwhile), then measures for
//! `--seconds`: ticks fired per second and each tick's lateness (when its handler ran, minus when
//! it was due). The baseline: the same number of tokio tasks, each sleeping until the same due
//! times, measured the same way: what timers cost without a store, a schedule or a mailbox.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cadre::agent::{Agent, AgentError, Ctx, Reminder, Reply};
use cadre::signal::Signal;
use cadre::storage::Key;

const CONCURRENCY: usize = 256;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Lateness samples kept (ms), by who fired them; filled while `MEASURING`.
static LATE_MS: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static MEASURING: AtomicBool = AtomicBool::new(false);

/// `beep.set {"first_ms", "every_ms"}` sets the reminder; each `beep` tick records its lateness.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Beeper {}

impl Agent for Beeper {
    const TYPE: &'static str = "beeper";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        if signal.ty == "beep.set" {
            let Some(cadre::signal::Data::Json(d)) = &signal.data else {
                return Err(AgentError::Failed("beep.set needs data".into()));
            };
            let (first, every) = (d["first_ms"].as_u64().unwrap_or(0), d["every_ms"].as_u64().unwrap_or(1000));
            ctx.remind(
                "beep",
                Reminder::every_from(first, Duration::from_millis(every)),
                Signal::new("beep", 0.into()),
            )?;
            return Ok(Reply::Null);
        }
        if MEASURING.load(Ordering::Relaxed) {
            let due: u64 = signal.extension("cadredue").and_then(|d| d.parse().ok()).unwrap_or(0);
            LATE_MS.lock().unwrap().push(cadre::clock::wall_ms().saturating_sub(due));
        }
        Ok(Reply::Null)
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// (ticks per second, p50, p99, max lateness in ms) of what was recorded.
fn summary(seconds: f64) -> (f64, u64, u64, u64) {
    let mut v = std::mem::take(&mut *LATE_MS.lock().unwrap());
    v.sort_unstable();
    (v.len() as f64 / seconds, percentile(&v, 0.5), percentile(&v, 0.99), v.last().copied().unwrap_or(0))
}

async fn start_three() -> Result<Vec<cadre::node::Node>> {
    use cadre::config::{AgentsConfig, Config, PlacementConfig, Secret};
    use cadre::node::{Node, NodeOptions};
    let config = |name: &str, seeds| Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().expect("static address"),
        seeds,
        secret: Secret::new("bench-reminders-secret-0123"),
        agents: AgentsConfig { agents_active_max: 10_000_000, ..AgentsConfig::default() },
        placement: PlacementConfig {
            rebalance_interval_ms: 50,
            max_moves_per_tick: 1024,
            ..PlacementConfig::default()
        },
        ..Config::default()
    };
    let a = Node::start(config("a", vec![]), NodeOptions::default().agent::<Beeper>()).await?;
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default().agent::<Beeper>()).await?;
    let c = Node::start(config("c", vec![a.addr()]), NodeOptions::default().agent::<Beeper>()).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.cluster().state();
        let counts = st.shard_counts();
        let settled = st
            .shards
            .iter()
            .all(|e| matches!(e.state, cadre::meta::ShardState::Active) && e.replicas.iter().all(|r| r.in_sync));
        if st.shard_count > 0 && settled && ["a", "b", "c"].iter().all(|n| counts.get(*n) > Some(&0)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the three bench nodes did not settle: {counts:?}");
        }
        let mut rx = c.cluster().watch();
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    Ok(vec![a, b, c])
}

/// Sets the reminders; returns how many were set per second.
async fn set_all(nodes: &[cadre::node::Node], reminders: usize, every_ms: u64, first_ms: u64) -> Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let (cluster, next) = (nodes[t % nodes.len()].cluster().clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reminders {
                    return Ok::<(), anyhow::Error>(());
                }
                let first = first_ms + (i as u64 * every_ms) / reminders as u64;
                let data = serde_json::json!({ "first_ms": first, "every_ms": every_ms });
                let key = Key::new("beeper", format!("b{i}"));
                cluster.call(&key, Signal::new("beep.set", data), CALL_TIMEOUT).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(reminders as f64 / start.elapsed().as_secs_f64())
}

/// The baseline: `reminders` tokio tasks sleeping until the same due times, measured for
/// `seconds` after one period.
async fn tokio_timers(reminders: usize, every_ms: u64, seconds: f64) -> (f64, u64, u64, u64) {
    let first_ms = cadre::clock::wall_ms() + every_ms;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..reminders {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut due = first_ms + (i as u64 * every_ms) / reminders as u64;
            while !stop.load(Ordering::Relaxed) {
                let wait = due.saturating_sub(cadre::clock::wall_ms());
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if MEASURING.load(Ordering::Relaxed) {
                    LATE_MS.lock().unwrap().push(cadre::clock::wall_ms().saturating_sub(due));
                }
                due += every_ms;
            }
        }));
    }
    measure(every_ms, seconds).await;
    let out = summary(seconds);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    out
}

/// Waits until one period passed since the reminders' first due time, then records for `seconds`.
async fn measure(every_ms: u64, seconds: f64) {
    tokio::time::sleep(Duration::from_millis(every_ms)).await;
    LATE_MS.lock().unwrap().clear();
    MEASURING.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    MEASURING.store(false, Ordering::Relaxed);
}

pub async fn run(reminders: usize, rate: usize, seconds: f64) -> Result<()> {
    if reminders == 0 || rate == 0 || !(1.0..=600.0).contains(&seconds) {
        bail!("--reminders and --rate must be positive, --seconds within 1 to 600");
    }
    let every_ms = (reminders as u64 * 1000 / rate as u64).max(cadre::agent::reminders::REMINDER_PERIOD_MIN_MS);
    println!("reminders: {reminders} periodic reminders on 3 nodes, every {every_ms} ms ({rate} ticks/s due)");
    let nodes = start_three().await?;
    let first_ms = cadre::clock::wall_ms() + 2000;
    let set_per_s = set_all(&nodes, reminders, every_ms, first_ms).await?;
    println!("  set: {set_per_s:.0} reminders/s ({CONCURRENCY} callers)");
    let scheduled: usize = nodes.iter().map(|n| n.agents().reminders_scheduled()).sum();
    println!("  scheduled on the owners: {scheduled}");
    let wait_ms = first_ms.saturating_sub(cadre::clock::wall_ms());
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    measure(every_ms, seconds).await;
    let (fires, p50, p99, max) = summary(seconds);
    for n in nodes {
        n.shutdown().await;
    }
    let (t_fires, t_p50, t_p99, t_max) = tokio_timers(reminders, every_ms, seconds).await;
    println!("  {:<28} {:>12} {:>10} {:>10} {:>10}", "", "ticks/s", "p50 ms", "p99 ms", "max ms");
    println!("  {:<28} {fires:>12.0} {p50:>10} {p99:>10} {max:>10}", "cadre reminders");
    println!("  {:<28} {t_fires:>12.0} {t_p50:>10} {t_p99:>10} {t_max:>10}", "tokio timers (baseline)");
    println!("  ticks/s vs due: {:.2}; vs tokio timers: {:.2}", fires / rate as f64, fires / t_fires.max(1.0));
    Ok(())
}
