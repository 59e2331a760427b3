//! `cadre bench agents`: agents on one node with memory storage.
//!
//! - Activations: `counter.get` to distinct keys, `CONCURRENCY` callers at once; each call
//!   activates an agent (load, `on_activate`, handle). Reported per second.
//! - Local calls: `counter.add` (write-through into memory storage) to `HOT_KEYS` active agents,
//!   `CONCURRENCY` callers at once, against a raw baseline in the same run: the same number of
//!   tasks each answering request/reply messages over a tokio channel and a oneshot (what a call
//!   is without the agent machinery). Latency: one call at a time.
//!
//! - Remote calls: two in-process nodes on loopback; `counter.add` from node b to keys whose
//!   shard node a owns (the call crosses the transport's data lane and back), `CONCURRENCY`
//!   callers, against raw transport asks b → a of the same payload size in the same run.
//!   Latency: one call (one ask) at a time. No replicas here (replication factor 1).
//! - Write-through: `counter.add` on the owner's node, with replication factor 1 and then 2 (each
//!   write is acknowledged once the other node's store has it too); the ratio is the cost of a
//!   replica.
//! - Reads: two nodes, replication factor 2 (each holds a copy of every shard); `counter.get`
//!   as a read-only call from node b to keys whose shard node a owns: from the nearest copy
//!   (b's own replica: no hop) against from the owner (a hop to a), both on the stored state,
//!   and the share of nearest reads that b served itself.

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

/// Agents with a record of `dedupe_ids_max` handled signals each (0: none kept).
fn agents_config(dedupe_ids_max: usize) -> AgentsConfig {
    AgentsConfig { agents_active_max: 10_000_000, dedupe_ids_max, ..AgentsConfig::default() }
}

fn host_with(dedupe_ids_max: usize) -> Host {
    HostBuilder::new(agents_config(dedupe_ids_max), std::sync::Arc::new(MemoryStorage::new()))
        .agent::<Counter>()
        .build()
}

fn host() -> Host {
    host_with(DEDUPE_DEFAULT)
}

const DEDUPE_DEFAULT: usize = cadre::agent::handled::DEDUPE_IDS_MAX_DEFAULT;

/// A `counter.add` of 1 with an id of its own (a repeated id would be a duplicate, not handled).
fn add() -> Signal {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = Signal::bare(format!("b{n}"), "/bench", "counter.add");
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

/// `counter.add` calls/s on `host` to `HOT_KEYS` keys, `CONCURRENCY` callers for `seconds`.
async fn local_calls(host: &Host, seconds: f64) -> Result<f64> {
    let h = host.clone();
    saturate(seconds, move |t, n| {
        let h = h.clone();
        async move {
            h.call(&hot_key("hot", t, n), add(), CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await
}

/// The hot key caller `t` calls on its `n`th call.
fn hot_key(prefix: &str, t: usize, n: u64) -> Key {
    Key::new("counter", format!("{prefix}{}", (t * 7 + n as usize) % HOT_KEYS))
}

/// `adds` untimed `counter.add` calls to each hot key through `call`, `CONCURRENCY` at a time:
/// with `adds` = the record's size, every agent's record is full, so the timed rounds measure
/// the steady state (every write carries the whole record) rather than records filling up.
async fn fill<F, Fut>(adds: usize, call: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let total = HOT_KEYS * adds;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let call = call.clone();
            tokio::spawn(async move {
                for i in (t..total).step_by(CONCURRENCY) {
                    call(i % HOT_KEYS).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Most rounds per side of a with/without comparison (`--rounds`).
const ROUNDS_MAX: usize = 1000;

/// A with/without comparison: mean rate of each side and the rounds' ratios (with/without of
/// the same round), of which the median is the figure (one slow moment of the machine moves the
/// mean of one side, not the median ratio) and the quartiles show the spread.
struct Paired {
    with: f64,
    without: f64,
    /// Sorted.
    ratios: Vec<f64>,
}

impl Paired {
    fn quantile(&self, q: f64) -> f64 {
        let at = q * (self.ratios.len() - 1) as f64;
        let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
        self.ratios[lo] + (self.ratios[hi] - self.ratios[lo]) * (at - lo as f64)
    }

    fn ratio(&self) -> f64 {
        self.quantile(0.5)
    }

    /// "median 0.91 (quartiles 0.85–0.97, 8 rounds)"
    fn describe(&self) -> String {
        let (q1, q3) = (self.quantile(0.25), self.quantile(0.75));
        format!("median {:.2} (quartiles {q1:.2}–{q3:.2}, {} rounds)", self.ratio(), self.ratios.len())
    }
}

/// Runs `rounds` rounds of each side (`side(true, seconds)` with the record, `false`
/// without), alternating which goes first so that a drift in the machine's load reaches both
/// sides alike. Each round starts fresh nodes: two instances of the same setup differed by up to
/// 20 % for their whole life on this machine, so one instance per side would measure the
/// instances, not the record.
async fn paired<S, SF>(seconds: f64, rounds: usize, side: S) -> Result<Paired>
where
    S: Fn(bool, f64) -> SF,
    SF: std::future::Future<Output = Result<f64>>,
{
    let round = seconds / rounds as f64;
    let (mut sum_with, mut sum_without, mut ratios) = (0.0, 0.0, Vec::with_capacity(rounds));
    for r in 0..rounds {
        let (w, o) = if r % 2 == 0 {
            let w = side(true, round).await?;
            (w, side(false, round).await?)
        } else {
            let o = side(false, round).await?;
            (side(true, round).await?, o)
        };
        sum_with += w;
        sum_without += o;
        ratios.push(w / o);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(Paired { with: sum_with / rounds as f64, without: sum_without / rounds as f64, ratios })
}

/// Local calls with the record of handled signals and without. Both sides get the same untimed
/// calls first (the record's size per agent), so the record is full: the timed calls measure
/// the steady state, where every write carries the whole record.
async fn local_with_and_without(seconds: f64, dedupe_ids_max: usize, rounds: usize) -> Result<Paired> {
    paired(seconds, rounds, |with_record, round| async move {
        let host = host_with(if with_record { dedupe_ids_max } else { 0 });
        let h = host.clone();
        fill(dedupe_ids_max, move |k| {
            let h = h.clone();
            async move {
                h.call(&hot_key("hot", k, 0), add(), CALL_TIMEOUT).await?;
                Ok(())
            }
        })
        .await?;
        let rate = local_calls(&host, round).await;
        host.shutdown().await;
        rate
    })
    .await
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

/// Two nodes on loopback with memory storage (or one Postgres database, `storage`), settled:
/// both own shards, none moving, and each shard has `replication_factor - 1` replicas in sync
/// (none with Postgres: the database is the replica set).
async fn start_pair(replication_factor: u32, storage: Option<&str>) -> Result<(cadre::node::Node, cadre::node::Node)> {
    start_pair_with(replication_factor, storage, DEDUPE_DEFAULT).await
}

async fn start_pair_with(
    replication_factor: u32,
    storage: Option<&str>,
    dedupe_ids_max: usize,
) -> Result<(cadre::node::Node, cadre::node::Node)> {
    use cadre::config::{Config, PlacementConfig, Secret, StorageConfig};
    use cadre::node::{Node, NodeOptions};
    let config = |name: &str, seeds| Config {
        name: name.into(),
        listen: "127.0.0.1:0".parse().expect("static address"),
        seeds,
        secret: Secret::new("bench-agents-secret-0123456"),
        agents: agents_config(dedupe_ids_max),
        placement: PlacementConfig {
            rebalance_interval_ms: 50,
            max_moves_per_tick: 1024,
            replication_factor,
            ..PlacementConfig::default()
        },
        storage: StorageConfig { url: storage.map(str::to_string), ..StorageConfig::default() },
        ..Config::default()
    };
    let a = Node::start(config("a", vec![]), NodeOptions::default()).await?;
    let b = Node::start(config("b", vec![a.addr()]), NodeOptions::default()).await?;
    // Settled: both own shards, none moving, b's copy agrees.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = b.cluster().state();
        let counts = st.shard_counts();
        let moving = st.shards.iter().any(|e| !matches!(e.state, cadre::meta::ShardState::Active));
        let copies = if storage.is_some() { 0 } else { replication_factor as usize - 1 };
        let replicated = st.shards.iter().all(|e| e.replicas.len() == copies && e.replicas.iter().all(|r| r.in_sync));
        if st.shard_count > 0 && !moving && replicated && counts.get("a") > Some(&0) && counts.get("b") > Some(&0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the two bench nodes did not settle: {counts:?}");
        }
        let mut rx = b.cluster().watch();
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    Ok((a, b))
}

/// `HOT_KEYS` keys whose shards node a owns, as `b` sees the table.
fn keys_of_a(b: &cadre::node::Node) -> Vec<Key> {
    (0..)
        .map(|i| Key::new("counter", format!("r{i}")))
        .filter(|k| b.cluster().placement(k).ok().and_then(|p| p.owner).as_deref() == Some("a"))
        .take(HOT_KEYS)
        .collect()
}

/// `counter.add` calls/s from `cluster` to `keys`, `CONCURRENCY` callers for `seconds`.
async fn remote_call_rate(
    cluster: &cadre::cluster::Cluster,
    keys: &std::sync::Arc<Vec<Key>>,
    seconds: f64,
) -> Result<f64> {
    let (c, k) = (cluster.clone(), keys.clone());
    saturate(seconds, move |t, n| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.call(&k[(t * 7 + n as usize) % HOT_KEYS], add(), CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await
}

/// Remote calls with the record of handled signals and without, each round on a fresh pair of
/// nodes (the record's size is a node's setting), every record full first (filled from a, the
/// owner: local calls, faster than through b).
async fn remote_with_and_without(seconds: f64, dedupe_ids_max: usize, rounds: usize) -> Result<Paired> {
    paired(seconds, rounds, |with_record, round| async move {
        let (a, b) = start_pair_with(1, None, if with_record { dedupe_ids_max } else { 0 }).await?;
        let keys = std::sync::Arc::new(keys_of_a(&b));
        let (c, k) = (a.cluster().clone(), keys.clone());
        fill(dedupe_ids_max, move |i| {
            let (c, k) = (c.clone(), k.clone());
            async move {
                c.call(&k[i], add(), CALL_TIMEOUT).await?;
                Ok(())
            }
        })
        .await?;
        let rate = remote_call_rate(b.cluster(), &keys, round).await;
        b.shutdown().await;
        a.shutdown().await;
        rate
    })
    .await
}

/// Remote calls/s, raw asks/s, remote call p50 µs, raw ask p50 µs (no replicas: the call path
/// alone).
async fn remote(seconds: f64, dedupe_ids_max: usize) -> Result<(f64, f64, f64, f64)> {
    let (a, b) = start_pair_with(1, None, dedupe_ids_max).await?;
    let keys = std::sync::Arc::new(keys_of_a(&b));
    let cluster = b.cluster().clone();
    let calls = remote_call_rate(&cluster, &keys, seconds).await?;
    // Application asks (answered by the echo handler) as long as a call's signal.
    let payload = cadre::wire::envelope::app(&vec![7u8; cadre::signal::codec::encode_structured(&add()).len()]);
    let (transport, to) = (b.transport().clone(), a.addr());
    let (t2, p2) = (transport.clone(), payload.clone());
    let asks = saturate(seconds, move |_, _| {
        let (t, p) = (t2.clone(), p2.clone());
        async move {
            t.ask(to, p, CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await?;
    let mut call_lat = Vec::with_capacity(LATENCY_SAMPLES);
    let mut ask_lat = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        cluster.call(&keys[i % HOT_KEYS], add(), CALL_TIMEOUT).await?;
        call_lat.push(t.elapsed());
        let t = Instant::now();
        transport.ask(to, payload.clone(), CALL_TIMEOUT).await?;
        ask_lat.push(t.elapsed());
    }
    b.shutdown().await;
    a.shutdown().await;
    Ok((calls, asks, p50(call_lat), p50(ask_lat)))
}

/// Write-through `counter.add` on the owner's node with `replication_factor` copies (2: each
/// write also reaches the other node's store before it is acknowledged), or on a Postgres
/// database (`storage`): calls/s and p50 µs.
async fn write_through(
    seconds: f64,
    replication_factor: u32,
    storage: Option<&str>,
    dedupe_ids_max: usize,
) -> Result<(f64, f64)> {
    let (a, b) = start_pair_with(replication_factor, storage, dedupe_ids_max).await?;
    let keys: Vec<Key> = (0..)
        .map(|i| Key::new("counter", format!("w{i}")))
        .filter(|k| a.cluster().placement(k).ok().and_then(|p| p.owner).as_deref() == Some("a"))
        .take(HOT_KEYS)
        .collect();
    let keys = std::sync::Arc::new(keys);
    let cluster = a.cluster().clone();
    let (c, k) = (cluster.clone(), keys.clone());
    let calls = saturate(seconds, move |t, n| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.call(&k[(t * 7 + n as usize) % HOT_KEYS], add(), CALL_TIMEOUT).await?;
            Ok(())
        }
    })
    .await?;
    let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        cluster.call(&keys[i % HOT_KEYS], add(), CALL_TIMEOUT).await?;
        lat.push(t.elapsed());
    }
    b.shutdown().await;
    a.shutdown().await;
    Ok((calls, p50(lat)))
}

/// Read-only `counter.get` from b to keys a owns, b holding replicas (factor 2): reads/s and p50 µs
/// from the nearest copy, the same from the owner, and the share of nearest reads b served.
async fn reads(seconds: f64) -> Result<((f64, f64), (f64, f64), f64)> {
    use cadre::cluster::read::{ReadFrom, ReadOpts};
    let (a, b) = start_pair(2, None).await?;
    let keys: Vec<Key> = (0..)
        .map(|i| Key::new("counter", format!("q{i}")))
        .filter(|k| b.cluster().placement(k).ok().and_then(|p| p.owner).as_deref() == Some("a"))
        .take(HOT_KEYS)
        .collect();
    for k in &keys {
        a.cluster().call(k, add(), CALL_TIMEOUT).await?;
    }
    let keys = std::sync::Arc::new(keys);
    let cluster = b.cluster().clone();
    let get = || Signal::bare("q", "/bench", "counter.get");
    let mut out = Vec::new();
    // Nearest reads b served itself, and all nearest reads.
    let counts = std::sync::Arc::new([std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)]);
    for from in [ReadFrom::Nearest, ReadFrom::Owner] {
        let opts = ReadOpts { from, stale_ms_max: None };
        let (c, k, l) = (cluster.clone(), keys.clone(), counts.clone());
        let rate = saturate(seconds, move |t, n| {
            let (c, k, l) = (c.clone(), k.clone(), l.clone());
            async move {
                let r = c.read(&k[(t * 7 + n as usize) % HOT_KEYS], Some(get()), opts, CALL_TIMEOUT).await?;
                if from == ReadFrom::Nearest {
                    l[usize::from(r.node != "b")].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await?;
        let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
        for i in 0..LATENCY_SAMPLES {
            let t = Instant::now();
            cluster.read(&keys[i % HOT_KEYS], Some(get()), opts, CALL_TIMEOUT).await?;
            lat.push(t.elapsed());
        }
        out.push((rate, p50(lat)));
    }
    let [here, elsewhere] = counts.as_ref();
    let (here, elsewhere) =
        (here.load(std::sync::atomic::Ordering::Relaxed), elsewhere.load(std::sync::atomic::Ordering::Relaxed));
    let share = here as f64 / (here + elsewhere).max(1) as f64;
    b.shutdown().await;
    a.shutdown().await;
    Ok((out[0], out[1], share))
}

/// What `cadre bench agents` measures of the record of handled signals.
pub struct RecordOpts {
    /// Ids kept per agent on the "with" side of each comparison.
    pub dedupe_ids_max: usize,
    /// Only the with/without comparisons (local and remote calls).
    pub only: bool,
    /// Rounds per side of each comparison.
    pub rounds: usize,
}

pub async fn run(seconds: f64, storage: Option<String>, record: RecordOpts) -> Result<()> {
    if !(0.1..=600.0).contains(&seconds) {
        bail!("--seconds must be within 0.1..=600");
    }
    let ids = record.dedupe_ids_max;
    if !(1..=cadre::agent::handled::DEDUPE_IDS_MAX_LIMIT).contains(&ids) {
        bail!("--dedupe-ids must be within 1..={}", cadre::agent::handled::DEDUPE_IDS_MAX_LIMIT);
    }
    if !(2..=ROUNDS_MAX).contains(&record.rounds) {
        bail!("--rounds must be within 2..={ROUNDS_MAX}");
    }
    if record.only {
        return record_only(seconds, ids, record.rounds).await;
    }
    let (act, active) = activations(seconds).await?;
    println!("activations       {act:>10.0}/s   ({active} agents active at the end, memory storage)");
    let raw = raw_calls(seconds).await?;
    let paired_local = local_with_and_without(seconds, ids, record.rounds).await?;
    let (local, local_off) = (paired_local.with, paired_local.without);
    println!("local calls       {local:>10.0}/s   raw channel actors {raw:>10.0}/s   ratio {:.2}", local / raw);
    println!(
        "  without record  {local_off:>10.0}/s   ratio with/without {}   ({ids} ids kept per agent)",
        paired_local.describe()
    );
    let (agent_p50, raw_p50) = latencies().await?;
    println!("local call p50    {agent_p50:>10.2} µs   raw {raw_p50:>8.2} µs");
    let (remote_calls, raw_asks, remote_p50, rtt_p50) = remote(seconds, ids).await?;
    println!(
        "remote calls      {remote_calls:>10.0}/s   raw transport asks {raw_asks:>10.0}/s   ratio {:.2}",
        remote_calls / raw_asks
    );
    let (remote_off, _, remote_off_p50, _) = remote(seconds, 0).await?;
    println!(
        "  without record  {remote_off:>10.0}/s   p50 {remote_off_p50:>8.2} µs   ratio with/without {:.2}",
        remote_calls / remote_off
    );
    println!("remote call p50   {remote_p50:>10.2} µs   raw ask {rtt_p50:>8.2} µs");
    let (rf1, rf1_p50) = write_through(seconds, 1, None, ids).await?;
    let (rf2, rf2_p50) = write_through(seconds, 2, None, ids).await?;
    println!("write-through rf1 {rf1:>10.0}/s   p50 {rf1_p50:>8.2} µs   (memory storage)");
    println!("write-through rf2 {rf2:>10.0}/s   p50 {rf2_p50:>8.2} µs   ratio rf2/rf1 {:.2}", rf2 / rf1);
    let (rf2_off, rf2_off_p50) = write_through(seconds, 2, None, 0).await?;
    println!(
        "  without record  {rf2_off:>10.0}/s   p50 {rf2_off_p50:>8.2} µs   ratio with/without {:.2}",
        rf2 / rf2_off
    );
    let ((near, near_p50), (own, own_p50), local_share) = reads(seconds).await?;
    println!(
        "reads nearest     {near:>10.0}/s   p50 {near_p50:>8.2} µs   ({:.1}% served by the reader's own replica)",
        local_share * 100.0
    );
    println!(
        "reads from owner  {own:>10.0}/s   p50 {own_p50:>8.2} µs   ratio nearest/owner {:.2} (rate), {:.2} (p50)",
        near / own,
        near_p50 / own_p50
    );
    let (pg, pg_p50) = match storage.as_deref().filter(|s| !s.is_empty()) {
        Some(url) => {
            let (pg, pg_p50) = write_through(seconds, 1, Some(url), DEDUPE_DEFAULT).await?;
            let shown = cadre::storage::postgres::redact(url);
            println!(
                "write-through pg  {pg:>10.0}/s   p50 {pg_p50:>8.2} µs   ratio pg/rf2 {:.2}   ({shown})",
                pg / rf2
            );
            (format!("{pg:.0}"), format!("{pg_p50:.2}"))
        }
        None => ("null".to_string(), "null".to_string()),
    };
    // Field order as the issue gives it.
    println!(
        "{{\"bench\":\"agents\",\"activations_per_s\":{act:.0},\"local_calls_per_s\":{local:.0},\
         \"raw_local_calls_per_s\":{raw:.0},\"local_call_p50_us\":{agent_p50:.2},\"raw_local_call_p50_us\":{raw_p50:.2},\
         \"remote_calls_per_s\":{remote_calls:.0},\"raw_asks_per_s\":{raw_asks:.0},\
         \"remote_call_p50_us\":{remote_p50:.2},\"raw_rtt_p50_us\":{rtt_p50:.2},\
         \"write_rf1_per_s\":{rf1:.0},\"write_rf2_per_s\":{rf2:.0},\"write_rf1_p50_us\":{rf1_p50:.2},\
         \"write_rf2_p50_us\":{rf2_p50:.2},\"write_pg_per_s\":{pg},\"write_pg_p50_us\":{pg_p50},\
         \"reads_nearest_per_s\":{near:.0},\"reads_nearest_p50_us\":{near_p50:.2},\"reads_owner_per_s\":{own:.0},\
         \"reads_owner_p50_us\":{own_p50:.2},\"reads_nearest_local_share\":{local_share:.4},\
         \"local_calls_no_record_per_s\":{local_off:.0},\"remote_calls_no_record_per_s\":{remote_off:.0},\
         \"write_rf2_no_record_per_s\":{rf2_off:.0}}}"
    );
    Ok(())
}

/// The record's cost alone: local calls, then remote calls, with and without it in alternating
/// rounds, each side `seconds` long in all.
async fn record_only(seconds: f64, ids: usize, rounds: usize) -> Result<()> {
    let local = local_with_and_without(seconds, ids, rounds).await?;
    println!(
        "local calls       {:>10.0}/s   without record {:>10.0}/s   ratio {}   ({ids} ids kept per agent)",
        local.with,
        local.without,
        local.describe()
    );
    let remote = remote_with_and_without(seconds, ids, rounds).await?;
    println!(
        "remote calls      {:>10.0}/s   without record {:>10.0}/s   ratio {}",
        remote.with,
        remote.without,
        remote.describe()
    );
    println!(
        "{{\"bench\":\"agents_record\",\"dedupe_ids_max\":{ids},\"local_calls_per_s\":{:.0},\
         \"local_calls_no_record_per_s\":{:.0},\"local_ratio_median\":{:.3},\"remote_calls_per_s\":{:.0},\
         \"remote_calls_no_record_per_s\":{:.0},\"remote_ratio_median\":{:.3}}}",
        local.with,
        local.without,
        local.ratio(),
        remote.with,
        remote.without,
        remote.ratio()
    );
    Ok(())
}
