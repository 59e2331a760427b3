//! `cadre bench bus`: publishing on a node's bus to an in-process channel subscriber, against a
//! bare tokio channel carrying the same signals in the same run.
//!
//! Both sides clone a template signal and give it a fresh id per message, so the difference is
//! what the bus adds: validation, a trace context, the journal, routing among `--routes` other
//! subscriptions, the subscriber queue and its worker. Throughput is measured with the producer
//! and the consumer on separate tasks; latency is one signal at a time, publish to receive, the
//! baseline passing through one forwarding task as the bus passes through the subscriber's worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cadre::bus::{Bus, Dispatch, PublishError, SubscriptionSpec};
use cadre::config::SignalsConfig;
use cadre::metrics::Metrics;
use cadre::signal::{new_id, Signal};
use tokio::sync::mpsc;

const CHANNEL_LEN: usize = 16 * 1024;
const LATENCY_SAMPLES: usize = 20_000;

fn template() -> Signal {
    Signal::new("bench.order.placed", serde_json::json!({"order": 12345, "total": 99.5, "items": ["a", "b"]}))
        .with_subject("order-12345")
}

fn fresh(t: &Signal) -> Signal {
    let mut s = t.clone();
    s.id = new_id();
    s
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn raw_throughput(seconds: f64) -> f64 {
    let (tx, mut rx) = mpsc::channel::<Arc<Signal>>(CHANNEL_LEN);
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while rx.recv().await.is_some() {
            n += 1;
        }
        n
    });
    let t = template();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        for _ in 0..256 {
            tx.send(Arc::new(fresh(&t))).await.expect("consumer alive");
        }
    }
    drop(tx);
    let n = consumer.await.expect("consumer task");
    n as f64 / start.elapsed().as_secs_f64()
}

async fn bus_with_noise(noise: usize) -> Result<Bus> {
    let cfg = SignalsConfig {
        subscriber_queue_len_max: CHANNEL_LEN,
        queued_bytes_max: 1 << 30,
        subscriptions_max: noise + 1,
        ..SignalsConfig::default()
    };
    let bus = Bus::new(cfg, "/bench", &Metrics::new());
    for i in 0..noise {
        bus.subscribe_detached(SubscriptionSpec::new(format!("other{i}.*.event"), Dispatch::Log))?;
    }
    Ok(bus)
}

async fn bus_throughput(seconds: f64, noise: usize) -> Result<(f64, u64)> {
    let bus = bus_with_noise(noise).await?;
    let (tx, mut rx) = mpsc::channel(CHANNEL_LEN);
    let sub = bus.subscribe(SubscriptionSpec::new("bench.**", Dispatch::Channel(tx)))?;
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while rx.recv().await.is_some() {
            n += 1;
        }
        n
    });
    let t = template();
    let mut refused = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        for _ in 0..256 {
            match bus.publish(fresh(&t)).await {
                Ok(_) => {}
                // The subscriber is behind: let it run (the refused signal is not counted as
                // received, so it only lowers the figure).
                Err(PublishError::QueueFull { .. }) => {
                    refused += 1;
                    tokio::task::yield_now().await;
                }
                Err(e) => bail!("publish failed: {e}"),
            }
        }
    }
    drop(sub);
    bus.shutdown().await;
    let n = consumer.await?;
    Ok((n as f64 / start.elapsed().as_secs_f64(), refused))
}

/// Through one forwarding task, as the bus's subscriber worker is one task between publisher
/// and channel.
async fn raw_latency() -> Vec<Duration> {
    let (tx, mut hop) = mpsc::channel::<Arc<Signal>>(CHANNEL_LEN);
    let (hop_tx, mut rx) = mpsc::channel::<Arc<Signal>>(CHANNEL_LEN);
    tokio::spawn(async move {
        while let Some(s) = hop.recv().await {
            if hop_tx.send(s).await.is_err() {
                return;
            }
        }
    });
    let t = template();
    let mut out = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let start = Instant::now();
        tx.send(Arc::new(fresh(&t))).await.expect("receiver alive");
        rx.recv().await.expect("sender alive");
        out.push(start.elapsed());
    }
    out
}

async fn bus_latency(noise: usize) -> Result<Vec<Duration>> {
    let bus = bus_with_noise(noise).await?;
    let (tx, mut rx) = mpsc::channel(CHANNEL_LEN);
    let _sub = bus.subscribe(SubscriptionSpec::new("bench.**", Dispatch::Channel(tx)))?;
    let t = template();
    let mut out = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let start = Instant::now();
        bus.publish(fresh(&t)).await?;
        rx.recv().await.expect("subscriber alive");
        out.push(start.elapsed());
    }
    bus.shutdown().await;
    Ok(out)
}

pub async fn run(seconds: f64, noise: usize) -> Result<()> {
    if !(0.1..=600.0).contains(&seconds) || noise > 100_000 {
        bail!("--seconds must be within 0.1..=600 and --routes at most 100000");
    }
    println!("bus: one channel subscriber among {noise} other subscriptions, {seconds} s per throughput run");
    // Interleaved, twice each, so drift on a shared machine hits both.
    let mut raw = Vec::new();
    let mut cadre = Vec::new();
    for _ in 0..2 {
        raw.push(raw_throughput(seconds).await);
        cadre.push(bus_throughput(seconds, noise).await?);
    }
    let raw_best = raw.iter().cloned().fold(0.0, f64::max);
    let (bus_best, refused) = cadre.iter().cloned().fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    println!(
        "throughput  raw channel {:>10.0}/s   bus {:>10.0}/s   ratio {:.2}   (publishes refused by a full queue: {refused})",
        raw_best,
        bus_best,
        bus_best / raw_best
    );
    let mut r = raw_latency().await;
    let mut b = bus_latency(noise).await?;
    r.sort();
    b.sort();
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (rp, bp) = (percentile(&r, p), percentile(&b, p));
        println!(
            "latency {name}  raw channel {:>8.2} µs   bus {:>8.2} µs   ratio {:.2}",
            rp.as_secs_f64() * 1e6,
            bp.as_secs_f64() * 1e6,
            bp.as_secs_f64() / rp.as_secs_f64()
        );
    }
    Ok(())
}
