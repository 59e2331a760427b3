//! `cadre bench agents`: agents on one node with memory storage.
//!
//! - Activations: `counter.get` to distinct keys, `CONCURRENCY` callers at once; each call
//!   activates an agent (load, `on_activate`, handle). Reported per second.
//! - Local calls: `counter.add` (write-through into memory storage) to `HOT_KEYS` active agents,
//!   `CONCURRENCY` callers at once, against a raw baseline in the same run: the same number of
//!   tasks each answering request/reply messages over a tokio channel and a oneshot (what a call
//!   is without the agent machinery). Latency: one call at a time.
//!
//! Calls across nodes need the placement layer (not built yet); the JSON line says so.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cadre::agent::counter::Counter;
use cadre::agent::{Host, HostBuilder};
use cadre::config::AgentsConfig;
use cadre::signal::Signal;
use cadre::storage::memory::MemoryStorage;
use cadre::storage::Key;
use tokio::sync::{mpsc, oneshot};

const CONCURRENCY: usize = 256;
const HOT_KEYS: usize = 1000;
const LATENCY_SAMPLES: usize = 20_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn host() -> Host {
    let cfg = AgentsConfig { agents_active_max: 10_000_000, ..AgentsConfig::default() };
    HostBuilder::new(cfg, std::sync::Arc::new(MemoryStorage::new())).agent::<Counter>().build()
}

fn add() -> Signal {
    let mut s = Signal::bare("b", "/bench", "counter.add");
    s.datacontenttype = Some("application/json".into());
    s.data = Some(cadre::signal::Data::Json(1.into()));
    s
}

/// Runs `per_task(i)` on `CONCURRENCY` tasks until `seconds` pass; returns operations per second.
async fn saturate<F, Fut>(seconds: f64, per_task: F) -> Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let f = per_task.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    f(t, n).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn activations(seconds: f64) -> Result<(f64, usize)> {
    let host = host();
    let get = Signal::bare("b", "/bench", "counter.get");
    let h = host.clone();
    let rate = saturate(seconds, move |t, n| {
        let (h, get) = (h.clone(), get.clone());
        async move {
            let key = Key::new("counter", format!("k{t}-{n}"));
            h.call(&key, get, CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await?;
    let active = host.active();
    host.shutdown().await;
    Ok((rate, active))
}

async fn local_calls(seconds: f64) -> Result<f64> {
    let host = host();
    let h = host.clone();
    let rate = saturate(seconds, move |t, n| {
        let h = h.clone();
        async move {
            let key = Key::new("counter", format!("hot{}", (t * 7 + n as usize) % HOT_KEYS));
            h.call(&key, add(), CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await?;
    host.shutdown().await;
    Ok(rate)
}

type Req = (Signal, oneshot::Sender<i64>);

/// The baseline: `HOT_KEYS` tasks with channels, each adding into a local integer.
fn raw_actors() -> Vec<mpsc::Sender<Req>> {
    (0..HOT_KEYS)
        .map(|_| {
            let (tx, mut rx) = mpsc::channel::<Req>(1024);
            tokio::spawn(async move {
                let mut value = 0i64;
                while let Some((s, reply)) = rx.recv().await {
                    if let Some(cadre::signal::Data::Json(v)) = &s.data {
                        value += v.as_i64().unwrap_or(0);
                    }
                    let _ = reply.send(value);
                }
            });
            tx
        })
        .collect()
}

async fn raw_calls(seconds: f64) -> Result<f64> {
    let actors = std::sync::Arc::new(raw_actors());
    saturate(seconds, move |t, n| {
        let actors = actors.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            actors[(t * 7 + n as usize) % HOT_KEYS].send((add(), tx)).await?;
            rx.await?;
            Ok(())
        }
    })
    .await
}

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

async fn latencies() -> Result<(f64, f64)> {
    let host = host();
    let key = Key::new("counter", "lat");
    host.call(&key, add(), CALL_TIMEOUT).await?;
    let mut agent = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        host.call(&key, add(), CALL_TIMEOUT).await?;
        agent.push(t.elapsed());
    }
    host.shutdown().await;
    let actors = raw_actors();
    let mut raw = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        let (tx, rx) = oneshot::channel();
        actors[0].send((add(), tx)).await?;
        rx.await?;
        raw.push(t.elapsed());
    }
    Ok((p50(agent), p50(raw)))
}

pub async fn run(seconds: f64) -> Result<()> {
    if !(0.1..=600.0).contains(&seconds) {
        bail!("--seconds must be within 0.1..=600");
    }
    let (act, active) = activations(seconds).await?;
    println!("activations       {act:>10.0}/s   ({active} agents active at the end, memory storage)");
    let raw = raw_calls(seconds).await?;
    let local = local_calls(seconds).await?;
    println!("local calls       {local:>10.0}/s   raw channel actors {raw:>10.0}/s   ratio {:.2}", local / raw);
    let (agent_p50, raw_p50) = latencies().await?;
    println!("local call p50    {agent_p50:>10.2} µs   raw {raw_p50:>8.2} µs");
    // Field order as the issue gives it; remote figures need the placement layer (not built yet).
    println!(
        "{{\"bench\":\"agents\",\"activations_per_s\":{act:.0},\"local_calls_per_s\":{local:.0},\
         \"raw_local_calls_per_s\":{raw:.0},\"local_call_p50_us\":{agent_p50:.2},\"raw_local_call_p50_us\":{raw_p50:.2},\
         \"remote_calls_per_s\":null,\"remote_call_p50_us\":null,\"raw_rtt_p50_us\":null}}"
    );
    Ok(())
}
