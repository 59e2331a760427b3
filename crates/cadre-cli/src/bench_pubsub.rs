//! `cadre bench pubsub`: cluster pub/sub from a publishing node to a subscriber on another node,
//! with the transport's raw baselines measured in the same run.
//!
//! Processes: this one (the publishing node), a child `cadre bench-pubsub-peer` (a node with the
//! flags of `cadre node` whose bus has the benchmark's subscriptions) and the raw TCP server of
//! `cadre bench transport`. The subscriber is a separate process, as it would be in a cluster and
//! as in the transport benchmark, so the figures include both sides' own cores and the kernel's
//! loopback; its subscription is a function that increments a counter (the cheapest real
//! subscriber: no log line or HTTP request per signal). It answers each `bench.ping` with a
//! `bench.pong` published back, carrying the ping's number and the count of data signals
//! delivered so far: that is how this process learns what arrived, without polling over HTTP.
//! Both nodes run the default configuration; the child reads `CADRE_*` variables as `cadre node`
//! does, so `CADRE_CONFIG=FILE` configures the subscriber's side alone.
//!
//! - Throughput, `--seconds` for each measure, in alternating rounds (so that every measure sees
//!   the same machine conditions): `eventual` publishes as fast as they are accepted (a
//!   `BufferFull` backs off `BACKOFF` and the same signal is published again: back-pressure,
//!   counted), then `weak` ones (a publish whose copy the full buffer skipped is counted and
//!   backs off the same way, not retried); each round ends when everything accepted has been
//!   delivered to the subscriber's function (pings until the pong says so), and the rate is
//!   delivered / (publishing + that drain). Baselines: cadre transport tells and raw TCP framing
//!   (`bench.rs`), with messages as long as one encoded data signal (the bytes pub/sub carries per
//!   signal), every one counted at the receiver.
//! - Frames: data-lane frames and messages out of this node and pub/sub batches, per signal
//!   acknowledged, over the two pub/sub throughput measures (the few pings of the drains
//!   included, on both sides of the ratio).
//! - Latency at low load, `--seconds` in all: one ping published at a time, the pong awaited (a
//!   pub/sub round trip: a publish each way, through both subscriptions' workers), interleaved
//!   with one transport ask (answered by the peer's echo handler) and one raw TCP ping-pong of the
//!   same size, so that all three see the same conditions.
//!
//! Caveats: three processes share two cores, so every figure includes scheduler contention; the
//! signals are clones of one template (fresh ids), and the pong's count is read when the ping's
//! handler runs, which can be before the data subscription's worker has drained its queue (the
//! drain then pings again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use cadre::bus::{Delivery, Dispatch, PublishError, SubscriptionSpec};
use cadre::config::{Config, Secret};
use cadre::node::{Node, NodeOptions};
use cadre::signal::{codec, new_id, Data, Signal, TraceParent, TRACEPARENT};
use cadre::wire::Lane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::bench::{self, percentile, us, RawCounter, ASK_TIMEOUT, RAW_MODE_ECHO};
use crate::proc::{loopback, wait_ready, NodeProc, NodeSpec};

const DATA_TYPE: &str = "bench.data";
const PING_TYPE: &str = "bench.ping";
const PONG_TYPE: &str = "bench.pong";
const PUB_NAME: &str = "bench-pub";
const SUB_NAME: &str = "bench-sub";
/// The hidden subcommand that runs the subscriber's node.
pub const PEER_SUBCOMMAND: &str = "bench-pubsub-peer";

const SECONDS_MIN: f64 = 0.1;
const SECONDS_MAX: f64 = 600.0;
/// Largest `--payload` (bytes of the data string).
const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Alternating rounds of the four throughput measures.
const THROUGHPUT_ROUNDS: u32 = 2;
/// Publishes between two clock reads.
const PUBLISHES_PER_CLOCK_CHECK: u32 = 256;
/// Pause after a publish refused or skipped by the full buffer: the timer's resolution, short
/// next to the time the sender needs to drain a full buffer.
const BACKOFF: Duration = Duration::from_millis(1);
/// Time for the child to start and the interest map to converge.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait for one pong before a warm-up ping is sent again (the child may not know yet that this
/// node subscribes to pongs).
const WARMUP_PONG_WAIT: Duration = Duration::from_millis(200);
/// Wait for one pong once warmed up; a missing pong then fails the benchmark.
const PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait, after a round, for what was accepted to reach the subscriber.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Samples kept per latency measure (memory bound).
const LATENCY_SAMPLES_MAX: usize = 200_000;
/// Time for the subscriber's `/metrics` to answer.
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of the channel the pongs arrive on (one is awaited at a time).
const PONG_CHANNEL_LEN: usize = 64;

/// A pong: the ping it answers and the data signals the subscriber's function had seen.
struct Pong {
    seq: u64,
    delivered: u64,
}

/// The publishing side: this process's node, the subscriber's process, the pongs.
struct Bench {
    node: Node,
    pongs: mpsc::Receiver<Arc<Signal>>,
    template: Signal,
    seq: u64,
    /// Data signals the buffers accepted, since the start.
    accepted: u64,
    /// Data signals the subscriber has been seen to have, since the start.
    delivered: u64,
}

/// One throughput measure, summed over its rounds.
#[derive(Default)]
struct Flow {
    delivered: u64,
    time: Duration,
    /// `eventual`: publishes refused with `BufferFull` (then retried).
    backoffs: u64,
    /// `weak`: publishes whose copy the full buffer skipped (not retried).
    skipped: u64,
}

impl Flow {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.time.as_secs_f64()
    }
}

/// Counters of this node, to take differences of.
#[derive(Default, Clone, Copy)]
struct Counters {
    frames: u64,
    msgs: u64,
    batches: u64,
    sent: u64,
}

impl Counters {
    fn read(node: &Node) -> Counters {
        let stats = node.transport().stats();
        let text = node.metrics().render();
        Counters {
            frames: stats.sent.frames(Lane::Data),
            msgs: stats.sent.msgs(Lane::Data),
            batches: metric(&text, "cadre_pubsub_batches_total", ""),
            sent: metric(&text, "cadre_pubsub_sent_total", ""),
        }
    }

    fn add_since(&mut self, before: Counters, after: Counters) {
        self.frames += after.frames - before.frames;
        self.msgs += after.msgs - before.msgs;
        self.batches += after.batches - before.batches;
        self.sent += after.sent - before.sent;
    }
}

/// Sum of the series of `name` whose labels contain `labels`, in Prometheus text.
fn metric(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Weak copies the sender dropped after they were accepted (their batch failed, or the node was
/// forgotten): they will never arrive.
fn lost(node: &Node) -> u64 {
    let text = node.metrics().render();
    metric(&text, "cadre_pubsub_dropped_total", "reason=\"weak_failed\"")
        + metric(&text, "cadre_pubsub_dropped_total", "reason=\"node_gone\"")
}

fn template(payload_len: usize) -> Signal {
    Signal::new(DATA_TYPE, serde_json::Value::String("x".repeat(payload_len)))
}

/// Bytes of one data signal as sent to other nodes (with the trace context a publish adds).
fn encoded_len(template: &Signal) -> usize {
    let mut s = template.clone();
    s.extensions.insert(TRACEPARENT.into(), TraceParent::root().to_string());
    codec::encode_structured(&s).len()
}

fn check_flags(seconds: f64, payload_len: usize) -> Result<()> {
    if !(SECONDS_MIN..=SECONDS_MAX).contains(&seconds) {
        bail!("--seconds must be within {SECONDS_MIN}..={SECONDS_MAX}, not {seconds}");
    }
    if payload_len > PAYLOAD_BYTES_MAX {
        bail!("--payload must be at most {PAYLOAD_BYTES_MAX} bytes, not {payload_len}");
    }
    Ok(())
}

pub async fn run(seconds: f64, payload_len: usize) -> Result<()> {
    check_flags(seconds, payload_len)?;
    let phase = Duration::from_secs_f64(seconds);
    let dir = tempfile::Builder::new().prefix("cadre-bench-").tempdir()?;
    let secret = format!("bench-{:016x}", rand::random::<u64>());
    let exe = std::env::current_exe()?;
    let cfg = Config { name: PUB_NAME.into(), listen: loopback(0), secret: Secret::new(&secret), ..Config::default() };
    let node = Node::start(cfg, NodeOptions::default()).await?;
    let (tx, pongs) = mpsc::channel(PONG_CHANNEL_LEN);
    node.bus().subscribe_detached(SubscriptionSpec::new(PONG_TYPE, Dispatch::Channel(tx)))?;
    let spec =
        NodeSpec { exe: &exe, name: SUB_NAME, seeds: &[node.addr()], dir: dir.path(), secret: &secret, extra: &[] };
    let sub = NodeProc::spawn_as(spec, PEER_SUBCOMMAND)?;
    let (_raw, raw_addr) = bench::spawn_raw_server(&exe)?;
    let mut b = Bench { node, pongs, template: template(payload_len), seq: 0, accepted: 0, delivered: 0 };
    b.converge(&sub).await.with_context(|| format!("subscriber's log:\n{}", sub.log_tail()))?;
    let msg_len = encoded_len(&b.template);
    eprintln!(
        "bench pubsub: data {payload_len} B (encoded signal {msg_len} B), {seconds} s per measure, subscriber in a child process"
    );
    let payload = Bytes::from(vec![0xabu8; msg_len]);
    let result = measure(&mut b, &sub, raw_addr, &payload, phase).await;
    // The measurement is over: a graceful leave would wait for shards to be handed over.
    b.node.kill().await;
    drop(sub);
    report(&result.with_context(|| "pub/sub benchmark failed")?, payload_len, msg_len);
    Ok(())
}

/// Everything measured.
struct Results {
    eventual: Flow,
    weak: Flow,
    tells: Flow,
    raw: Flow,
    frames: Counters,
    rtt: Vec<Duration>,
    ask: Vec<Duration>,
    raw_rtt: Vec<Duration>,
    /// Batches the subscriber's node acknowledged in part because its subscription queue was
    /// full (the sender waits before sending the rest again).
    sub_queue_full: u64,
    /// Weak signals accepted, then dropped at the sender (never delivered).
    weak_lost: u64,
}

async fn measure(
    b: &mut Bench,
    sub: &NodeProc,
    raw_addr: std::net::SocketAddr,
    payload: &Bytes,
    phase: Duration,
) -> Result<Results> {
    let peer = b.node.transport().peer(sub.addr)?;
    let mut raw_counter = RawCounter::connect(raw_addr).await?;
    let round = phase / THROUGHPUT_ROUNDS;
    let [mut eventual, mut weak, mut tells, mut raw]: [Flow; 4] = Default::default();
    let mut frames = Counters::default();
    for _ in 0..THROUGHPUT_ROUNDS {
        for (level, flow) in [(Delivery::Eventual, &mut eventual), (Delivery::Weak, &mut weak)] {
            let before = Counters::read(&b.node);
            b.publish_for(level, round, flow).await?;
            frames.add_since(before, Counters::read(&b.node));
        }
        let (n, t) = bench::cadre_tells(&b.node, &peer, sub.addr, payload, round).await?;
        add(&mut tells, n, t);
        let (n, t) = raw_counter.run(payload, round).await?;
        add(&mut raw, n, t);
    }
    let (rtt, ask, raw_rtt) = latencies(b, &peer, raw_addr, payload, phase).await?;
    let sub_queue_full = subscriber_queue_full(sub).await?;
    let weak_lost = lost(&b.node);
    Ok(Results { eventual, weak, tells, raw, frames, rtt, ask, raw_rtt, sub_queue_full, weak_lost })
}

/// The subscriber's count of batches it took in part because a subscription queue was full (it
/// counts the first signal refused; the sender waits, then sends the rest again), from its
/// `/metrics`.
async fn subscriber_queue_full(sub: &NodeProc) -> Result<u64> {
    let (status, body) = cadre::api::client::get(sub.http, "/metrics", METRICS_TIMEOUT).await?;
    if status != 200 {
        bail!("the subscriber's /metrics answered {status}");
    }
    let text = String::from_utf8_lossy(&body);
    Ok(metric(&text, "cadre_signals_rejected_total", "reason=\"remote_queue_full\""))
}

fn add(flow: &mut Flow, n: u64, t: Duration) {
    flow.delivered += n;
    flow.time += t;
}

/// One pub/sub round trip, one ask and one raw ping-pong at a time, in turn, for `phase`.
async fn latencies(
    b: &mut Bench,
    peer: &cadre::net::PeerSender,
    raw_addr: std::net::SocketAddr,
    payload: &Bytes,
    phase: Duration,
) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let mut echo = bench::raw_connect(raw_addr, RAW_MODE_ECHO).await?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let mut back = vec![0u8; frame.len()];
    let (mut rtt, mut ask, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    // An application ask (its kind in front, encoded once): the echo handler answers the payload.
    let app_ask = cadre::wire::envelope::app(payload);
    let start = Instant::now();
    while start.elapsed() < phase && rtt.len() < LATENCY_SAMPLES_MAX {
        let t = Instant::now();
        b.round_trip(PONG_TIMEOUT).await?.context("no pong")?;
        rtt.push(t.elapsed());
        let t = Instant::now();
        let reply = peer.ask(app_ask.clone(), ASK_TIMEOUT).await?;
        ask.push(t.elapsed());
        if reply.len() != payload.len() {
            bail!("ask reply of {} bytes, expected {}", reply.len(), payload.len());
        }
        let t = Instant::now();
        echo.write_all(&frame).await?;
        echo.read_exact(&mut back).await?;
        raw.push(t.elapsed());
    }
    for v in [&mut rtt, &mut ask, &mut raw] {
        v.sort();
    }
    Ok((rtt, ask, raw))
}

impl Bench {
    /// Waits for the subscriber's node, for this node to see its interest, and for a first pong
    /// (the subscriber then sees this node's interest in pongs).
    async fn converge(&mut self, sub: &NodeProc) -> Result<()> {
        wait_ready(sub.http, SETUP_TIMEOUT).await?;
        for ty in [DATA_TYPE, PING_TYPE] {
            let ok = self.node.bus().await_remote_nodes(ty, SETUP_TIMEOUT, |n| n == [SUB_NAME]).await;
            if !ok {
                bail!("the subscriber's interest in {ty} did not reach this node within {SETUP_TIMEOUT:?}");
            }
        }
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while Instant::now() < deadline {
            if self.round_trip(WARMUP_PONG_WAIT).await?.is_some() {
                return Ok(());
            }
        }
        bail!("no pong from the subscriber within {SETUP_TIMEOUT:?}")
    }

    /// Publishes a ping and waits at most `wait` for its pong (older pongs are skipped).
    async fn round_trip(&mut self, wait: Duration) -> Result<Option<Pong>> {
        self.seq += 1;
        let ping = Signal::new(PING_TYPE, serde_json::json!({ "seq": self.seq }));
        while let Err(e) = self.node.bus().publish(ping.clone()).await {
            match e {
                PublishError::BufferFull { .. } => tokio::time::sleep(BACKOFF).await,
                e => bail!("ping refused: {e}"),
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(signal) = tokio::time::timeout_at(deadline, self.pongs.recv()).await else { return Ok(None) };
            let signal = signal.context("the pong subscription closed")?;
            let pong = parse_pong(&signal)?;
            if pong.seq == self.seq {
                return Ok(Some(pong));
            }
        }
    }

    /// Publishes data signals at `level` for `round`, then waits until the subscriber has every
    /// accepted one; adds the round to `flow`.
    async fn publish_for(&mut self, level: Delivery, round: Duration, flow: &mut Flow) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < round {
            for _ in 0..PUBLISHES_PER_CLOCK_CHECK {
                self.publish_one(level, flow).await?;
            }
        }
        let before = self.delivered;
        self.drain().await?;
        flow.delivered += self.delivered - before;
        flow.time += start.elapsed();
        Ok(())
    }

    /// One data signal: `eventual` retried (same id) while the buffer is full; `weak` skipped.
    async fn publish_one(&mut self, level: Delivery, flow: &mut Flow) -> Result<()> {
        let id = new_id();
        loop {
            let mut s = self.template.clone();
            s.id = id.clone();
            match self.node.bus().publish_with(s, level).await {
                Ok(p) if p.remote_nodes > 0 => {
                    self.accepted += 1;
                    return Ok(());
                }
                Ok(_) => {
                    flow.skipped += 1;
                    tokio::time::sleep(BACKOFF).await;
                    return Ok(());
                }
                Err(PublishError::BufferFull { .. }) => {
                    flow.backoffs += 1;
                    tokio::time::sleep(BACKOFF).await;
                }
                Err(e) => bail!("{} publish refused: {e}", level.as_str()),
            }
        }
    }

    /// Pings until the subscriber has every accepted signal that was not dropped at the sender.
    async fn drain(&mut self) -> Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let pong = self.round_trip(PONG_TIMEOUT).await?.context("no pong while draining")?;
            if pong.delivered > self.accepted {
                bail!("the subscriber has {} signals, {} were accepted: duplicates", pong.delivered, self.accepted);
            }
            self.delivered = pong.delivered;
            if pong.delivered + lost(&self.node) >= self.accepted {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "after {DRAIN_TIMEOUT:?} the subscriber has {} of the {} signals accepted",
                    pong.delivered,
                    self.accepted
                );
            }
        }
    }
}

fn parse_pong(s: &Signal) -> Result<Pong> {
    let Some(Data::Json(v)) = &s.data else { bail!("a pong without JSON data") };
    let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).with_context(|| format!("a pong without {k}"));
    Ok(Pong { seq: field("seq")?, delivered: field("delivered")? })
}

/// The subscriber's node (`cadre bench-pubsub-peer`, a child process): counts the data signals
/// its function is delivered, answers each ping with a pong carrying that count.
pub async fn peer(cfg: Config) -> Result<()> {
    let node = Node::start(cfg, NodeOptions::default()).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let count = delivered.clone();
    let data = Dispatch::function(move |_| {
        count.fetch_add(1, Ordering::Relaxed);
        async { Ok(()) }
    });
    node.bus().subscribe_detached(SubscriptionSpec::new(DATA_TYPE, data))?;
    // The handler holds the bus it is subscribed on: a cycle, for the life of the process.
    let bus = node.bus().clone();
    let pong = Dispatch::function(move |ping: Arc<Signal>| {
        let (bus, n) = (bus.clone(), delivered.load(Ordering::Relaxed));
        async move {
            let seq = match &ping.data {
                Some(Data::Json(v)) => v.get("seq").and_then(|x| x.as_u64()).ok_or("a ping without seq")?,
                _ => return Err("a ping without JSON data".into()),
            };
            let pong = Signal::new(PONG_TYPE, serde_json::json!({ "seq": seq, "delivered": n }));
            bus.publish(pong).await.map(|_| ()).map_err(|e| e.to_string())
        }
    });
    node.bus().subscribe_detached(SubscriptionSpec::new(PING_TYPE, pong))?;
    crate::wait_for_shutdown_signal().await?;
    node.shutdown().await;
    Ok(())
}

fn report(r: &Results, payload_len: usize, msg_len: usize) {
    let (ev, weak, tells, raw) = (r.eventual.rate(), r.weak.rate(), r.tells.rate(), r.raw.rate());
    let f = &r.frames;
    let per_signal = |n: u64| n as f64 / f.sent.max(1) as f64;
    let row = |what: &str, ours: String, base: &str, theirs: String, ratio: String| {
        println!("{what:<34} {ours:>12}   {base:<20} {theirs:>12} {ratio:>8}");
    };
    row("measure", "pub/sub".into(), "baseline", "baseline".into(), "ratio".into());
    for (name, rate) in [("eventual signals/s", ev), ("weak signals/s", weak)] {
        row(name, format!("{rate:.0}"), "cadre tells/s", format!("{tells:.0}"), format!("{:.3}", rate / tells));
        row(name, format!("{rate:.0}"), "raw tcp frames/s", format!("{raw:.0}"), format!("{:.3}", rate / raw));
    }
    let (p50, p99) = (us(percentile(&r.rtt, 0.5)), us(percentile(&r.rtt, 0.99)));
    for (name, p, ours) in [("round trip p50 us", 0.5, p50), ("round trip p99 us", 0.99, p99)] {
        let (ask, raw_rtt) = (us(percentile(&r.ask, p)), us(percentile(&r.raw_rtt, p)));
        row(name, format!("{ours:.1}"), "cadre ask", format!("{ask:.1}"), format!("{:.2}", ours / ask));
        row(name, format!("{ours:.1}"), "raw tcp ping-pong", format!("{raw_rtt:.1}"), format!("{:.2}", ours / raw_rtt));
    }
    let dash = || "-".to_string();
    row("data frames per signal", format!("{:.4}", per_signal(f.frames)), "-", dash(), dash());
    row("data msgs per signal", format!("{:.4}", per_signal(f.msgs)), "-", dash(), dash());
    row("batches per signal", format!("{:.4}", per_signal(f.batches)), "-", dash(), dash());
    row("signals per batch", format!("{:.1}", f.sent as f64 / f.batches.max(1) as f64), "-", dash(), dash());
    row("fewer frames than signals", format!("{:.2}%", 100.0 * (1.0 - per_signal(f.frames))), "-", dash(), dash());
    row("eventual BufferFull back-offs", r.eventual.backoffs.to_string(), "-", dash(), dash());
    row("weak skipped (buffer full)", r.weak.skipped.to_string(), "-", dash(), dash());
    row("weak dropped after acceptance", r.weak_lost.to_string(), "-", dash(), dash());
    row("batches cut by a full sub queue", r.sub_queue_full.to_string(), "-", dash(), dash());
    let samples = format!("{}/{}/{}", r.eventual.delivered, r.weak.delivered, r.rtt.len());
    row("samples (eventual/weak/rtt)", samples, "-", dash(), dash());
    let round1 = |x: f64, k: f64| (x * k).round() / k;
    let json = serde_json::json!({
        "bench": "pubsub",
        "payload_bytes": payload_len,
        "signal_bytes": msg_len,
        "eventual_per_s": ev.round(),
        "weak_per_s": weak.round(),
        "tells_per_s": tells.round(),
        "raw_frames_per_s": raw.round(),
        "eventual_vs_tells": round1(ev / tells, 1000.0),
        "eventual_vs_raw": round1(ev / raw, 1000.0),
        "rtt_p50_us": round1(p50, 10.0),
        "rtt_p99_us": round1(p99, 10.0),
        "ask_p50_us": round1(us(percentile(&r.ask, 0.5)), 10.0),
        "raw_rtt_p50_us": round1(us(percentile(&r.raw_rtt, 0.5)), 10.0),
        "frames_per_signal": round1(per_signal(f.frames), 10000.0),
        "batches_per_signal": round1(per_signal(f.batches), 10000.0),
        "eventual_backoffs": r.eventual.backoffs,
        "weak_skipped": r.weak.skipped,
        "weak_lost": r.weak_lost,
        "subscriber_queue_full": r.sub_queue_full,
    });
    println!("{json}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_out_of_range_are_refused_with_the_range() {
        let e = check_flags(0.05, 100).unwrap_err().to_string();
        assert!(e.contains("--seconds must be within 0.1..=600"), "{e}");
        assert!(check_flags(601.0, 100).is_err());
        let e = check_flags(1.0, PAYLOAD_BYTES_MAX + 1).unwrap_err().to_string();
        assert!(e.contains("--payload must be at most 65536"), "{e}");
        assert!(check_flags(0.1, PAYLOAD_BYTES_MAX).is_ok());
    }

    #[test]
    fn metric_sums_the_series_of_one_name_only() {
        let text = "cadre_pubsub_sent_total 12\n\
                    cadre_pubsub_sent_total_other 5\n\
                    cadre_pubsub_dropped_total{reason=\"weak_failed\"} 3\n\
                    cadre_pubsub_dropped_total{reason=\"buffer_full\"} 7\n";
        assert_eq!(metric(text, "cadre_pubsub_sent_total", ""), 12);
        assert_eq!(metric(text, "cadre_pubsub_dropped_total", ""), 10);
        assert_eq!(metric(text, "cadre_pubsub_dropped_total", "reason=\"weak_failed\""), 3);
    }
}
