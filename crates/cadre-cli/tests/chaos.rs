//! Chaos over real processes: 3 (or 5) `cadre node` processes, with the embedded store (redb under
//! each node's data dir, replicated between nodes) or with one Postgres database, take
//! `counter.add` calls with known increments from clients on every node's HTTP API while faults are
//! injected one at a time from a schedule derived from a seed:
//!
//! - SIGKILL of a node owning shards, then a restart on the same ports and data dir;
//! - SIGSTOP of a node for longer than its lease (until the others have taken its shards over),
//!   then SIGCONT;
//! - a partition of one node from the other nodes for longer than its lease (until the others have
//!   taken its shards over), then healing.
//!
//! With the embedded store, as root with `ip` (iproute2) at hand, each node runs in a network
//! namespace of its own (`cadre-PID-I`), on `eth0` of a veth pair whose other end is a port of a
//! bridge in the root namespace; the bridge has the first address of a private /24 (10.213.X.0/24,
//! X unused on the machine), the nodes the following ones, and the namespaces have no other route.
//! This test process (clients, cluster polls) reaches every node through the bridge. A partition
//! points, in the victim's namespace, the neighbour entries of the other nodes' addresses at a
//! link-layer address no interface has (and theirs of the victim's address likewise): frames
//! between them are dropped silently in both directions, like on a broken network, while the
//! clients still reach every node (a call through the cut-off node may then time out: its outcome
//! is unknown). Healing deletes those entries. The faults are then a third of each kind, with at
//! least one partition in a run of a number of faults. Namespaces, veths and the bridge are removed when
//! the run ends, also when it fails (nodes killed first); ones left behind by a run whose process
//! is gone are removed at the start. Elsewhere (not root, no `ip`, a namespace cannot be made, or
//! `CADRE_CHAOS_NETNS=0`) the nodes run on loopback and the schedule has no partitions. With
//! Postgres the nodes reach the database (on this process's loopback, which a namespace does not
//! reach) through a TCP relay on the bridge's address: a partition cuts a node off from the other
//! nodes, not from the database, whose epoch fence then keeps it from writing.
//!
//! Between two faults the cluster is awaited back in its fully replicated state (every member
//! answering and owning shards, none moving or unassigned, every replica in sync): the guarantee
//! is one failure at a time. At the end, for every key: acknowledged sum <= value <=
//! acknowledged plus unknown-outcome sum (no acknowledged add lost, none applied twice), every node answers the
//! same value, and no two nodes acknowledged calls on one key under the same shard epoch.
//!
//! In the *retrying* mode (`chaos_embedded_store_retrying`, or `CADRE_CHAOS_RETRY=1`), a client
//! sends every call whose outcome is unknown again, with the same CloudEvent (source and id),
//! through another node, until it is acknowledged (an answer from the agent's record of handled
//! signals counts: the original reply or `"duplicate": true`). No outcome stays unknown, so every
//! key must end **exactly** at the sum of its adds: an add applied twice or lost fails the run. The
//! failover time of each SIGKILL (the kill until a key the killed node owned answers on another
//! node) is printed as p50/p99; timings are figures, never asserted.
//!
//! The default run is bounded for CI. By hand:
//! `CADRE_CHAOS_SEED=7 CADRE_CHAOS_SECONDS=600 CADRE_CHAOS_NODES=5 cargo test -p cadre-cli --test
//! chaos -- --nocapture` (`CADRE_CHAOS_FAULTS` sets the number of faults instead of a duration).
//! A failure prints the seed, the schedule so far and the tail of each node's log.

mod support;

#[path = "../../cadre/tests/support/postgres.rs"]
#[allow(dead_code)]
mod pg;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cadre::api::client::{self, ClientError};
use cadre::api::ClusterJson;
use cadre::signal::{codec, Signal};
use support::exe;
use support::proc::{self, wait_ready, NodeProc, NodeSpec};

const SECRET: &str = "chaos-test-secret-0123456";
/// Time the cluster has to recover from one fault (or to start).
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(25);
/// A client gives up on a call after this long (its outcome is then unknown).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// One attempt of the failover probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause of a client between two calls.
const PACE: Duration = Duration::from_millis(10);
const LEASE_MS: u64 = 1000;
const DRIFT_MS: u64 = 200;
const CONFIG: &str = "\
[placement]
rebalance_interval_ms = 200
max_moves_per_tick = 256
lease_ms = 1000
lease_renew_interval_ms = 200
lease_drift_margin_ms = 200

[agents]
call_timeout_ms = 2000
";
/// Transport and HTTP ports of a node in a network namespace of its own (each has its address).
const NETNS_PORT: u16 = 7100;
const NETNS_HTTP_PORT: u16 = 7200;
/// A link-layer address no interface has: frames sent there are dropped by every receiver.
const NOWHERE_MAC: &str = "02:00:00:de:ad:00";
const KEYS: usize = 24;
const CLIENTS: u64 = 4;

/// The chaos tests run one at a time: each has a cluster of its own on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_embedded_store() {
    let _serial = SERIAL.lock().await;
    run(Backend::Embedded).await;
}

/// Every unknown outcome retried with the same signal until acknowledged: exact sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_embedded_store_retrying() {
    let _serial = SERIAL.lock().await;
    run_with(Backend::Embedded, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres() {
    let _serial = SERIAL.lock().await;
    let db = pg::database("chaos").await;
    run(Backend::Postgres(db.url.clone())).await;
}

#[derive(Clone, Debug)]
enum Backend {
    Embedded,
    Postgres(String),
}

/// SplitMix64: the schedule and the workload follow from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

struct Settings {
    seed: u64,
    nodes: usize,
    /// Faults to inject, unless `seconds` is set.
    faults: usize,
    /// Inject faults until this much time has passed.
    seconds: Option<u64>,
    /// Nodes in network namespaces of their own (with partitions) where the machine allows it.
    netns: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let seed = env_u64("CADRE_CHAOS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        let nodes = env_u64("CADRE_CHAOS_NODES").unwrap_or(3) as usize;
        assert!(nodes >= 3, "CADRE_CHAOS_NODES must be at least 3");
        let seconds = env_u64("CADRE_CHAOS_SECONDS");
        let faults = env_u64("CADRE_CHAOS_FAULTS").unwrap_or(if seconds.is_some() { usize::MAX as u64 } else { 6 });
        let netns = env_u64("CADRE_CHAOS_NETNS") != Some(0);
        Settings { seed, nodes, faults: faults as usize, seconds, netns }
    }
}

#[derive(Debug, Clone)]
enum Fault {
    Kill { node: usize },
    Stop { node: usize, min_ms: u64 },
    Partition { node: usize, ms: u64 },
}

/// What one call did.
enum Outcome {
    /// 2xx with the new value: applied once.
    Acked { value: i64, node: String, epoch: u64 },
    /// 2xx `"duplicate": true`: the signal was applied once before (a retry's answer).
    Duplicate,
    /// Timeout, 5xx, broken connection: applied at most once.
    Unknown(String),
    /// The connection was refused: nothing was sent.
    NotSent,
}

#[derive(Default, Clone)]
struct KeyLedger {
    acked_sum: i64,
    unknown_sum: i64,
    acked: u64,
    unknown: u64,
    max_acked_value: i64,
}

#[derive(Default)]
struct Ledger {
    keys: Vec<KeyLedger>,
    /// (key, epoch) → the node that acknowledged a call on the key under that epoch.
    served: HashMap<(usize, u64), String>,
    violations: Vec<String>,
    not_sent: u64,
    unknown_kinds: HashMap<String, u64>,
    /// Calls sent again with the same signal (retrying mode).
    retries: u64,
    /// Retries answered `"duplicate": true`: the first attempt had been applied.
    duplicates: u64,
    /// Retrying mode: every add acknowledged, so values must equal the acknowledged sums.
    exact: bool,
}

fn key_id(k: usize) -> String {
    format!("k{k}")
}

async fn call(http: SocketAddr, id: &str, ty: &str, data: serde_json::Value, timeout: Duration) -> Outcome {
    call_with(http, id, &Signal::new(ty, data), timeout).await
}

async fn call_with(http: SocketAddr, id: &str, signal: &Signal, timeout: Duration) -> Outcome {
    let body = bytes::Bytes::from(codec::encode_structured(signal));
    let path = format!("/v1/agents/counter/{id}");
    match client::post(http, &path, codec::CONTENT_TYPE_STRUCTURED, body, timeout).await {
        Ok((200, body)) => {
            let v: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Outcome::Unknown(format!("bad body: {e}")),
            };
            match (v["reply"].as_i64(), v["node"].as_str(), v["epoch"].as_u64()) {
                (Some(value), Some(node), Some(epoch)) => Outcome::Acked { value, node: node.to_string(), epoch },
                _ if v["duplicate"] == true => Outcome::Duplicate,
                _ => Outcome::Unknown(format!("bad body: {v}")),
            }
        }
        Ok((status, _)) => Outcome::Unknown(format!("status {status}")),
        Err(ClientError::Connect { .. }) => Outcome::NotSent,
        Err(ClientError::Timeout(_)) => Outcome::Unknown("timeout".into()),
        Err(e) => Outcome::Unknown(format!("{e}").chars().take(40).collect()),
    }
}

/// A client: adds of 1..=9 to random keys through random nodes until told to stop. Retrying, it
/// sends an add whose outcome is unknown again (the same signal, through the next node) until it
/// is acknowledged, also after being told to stop (for at most `WAIT`).
async fn client_loop(
    mut rng: Rng,
    http: Vec<SocketAddr>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    retry: bool,
) {
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(KEYS as u64) as usize;
        let mut via = rng.below(http.len() as u64) as usize;
        let inc = 1 + rng.below(9) as i64;
        let signal = Signal::new("counter.add", serde_json::json!(inc));
        let mut outcome = call_with(http[via], &key_id(k), &signal, CALL_TIMEOUT).await;
        let mut stopped_at: Option<Instant> = None;
        while retry && matches!(outcome, Outcome::Unknown(_) | Outcome::NotSent) {
            if let Outcome::Unknown(kind) = &outcome {
                *ledger.lock().unwrap().unknown_kinds.entry(format!("retried after {kind}")).or_default() += 1;
            }
            if stop.load(Ordering::Relaxed) && stopped_at.get_or_insert_with(Instant::now).elapsed() > WAIT {
                break;
            }
            ledger.lock().unwrap().retries += 1;
            tokio::time::sleep(PACE).await;
            via = (via + 1) % http.len();
            outcome = call_with(http[via], &key_id(k), &signal, CALL_TIMEOUT).await;
        }
        record(&mut ledger.lock().unwrap(), k, inc, outcome);
        tokio::time::sleep(PACE).await;
    }
}

fn record(l: &mut Ledger, k: usize, inc: i64, outcome: Outcome) {
    match outcome {
        Outcome::Acked { value, node, epoch } => {
            let e = &mut l.keys[k];
            e.acked_sum += inc;
            e.acked += 1;
            e.max_acked_value = e.max_acked_value.max(value);
            if let Some(other) = l.served.insert((k, epoch), node.clone()) {
                if other != node {
                    let v = format!("{} acknowledged by {other} and {node} under epoch {epoch}", key_id(k));
                    l.violations.push(v);
                }
            }
        }
        Outcome::Duplicate => {
            l.duplicates += 1;
            let e = &mut l.keys[k];
            e.acked_sum += inc;
            e.acked += 1;
        }
        Outcome::Unknown(kind) => {
            if l.exact {
                l.violations.push(format!("{}: an add of {inc} was never acknowledged ({kind})", key_id(k)));
            }
            let e = &mut l.keys[k];
            e.unknown_sum += inc;
            e.unknown += 1;
            *l.unknown_kinds.entry(kind).or_default() += 1;
        }
        Outcome::NotSent => l.not_sent += 1,
    }
}

/// Runs `ip ARGS...`; its output, or what went wrong.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`ip {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pid_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `PREFIX<pid>...` of ours, if it is one.
fn pid_in(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The network namespaces of one run: node `i` in `cadre-PID-i` with `addrs[i]` on `eth0`, the
/// end of a veth pair whose other end `cdrPIDvI` is a port of the bridge `cdrPIDb` in the root
/// namespace, which has `gateway`. Removed when dropped (also when the test panics).
struct Net {
    bridge: Option<String>,
    /// Namespaces and root-side veths, as created.
    namespaces: Vec<String>,
    veths: Vec<String>,
    gateway: Ipv4Addr,
    addrs: Vec<Ipv4Addr>,
}

impl Net {
    /// Namespaces, veths and the bridge for `n` nodes, or why they cannot be made.
    fn setup(n: usize) -> Result<Net, String> {
        assert!(n <= 200, "at most 200 nodes in namespaces");
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        Self::remove_stale()?;
        let pid = std::process::id();
        let x = Self::free_subnet(pid)?;
        let mut net = Net {
            bridge: None,
            namespaces: Vec::new(),
            veths: Vec::new(),
            gateway: Ipv4Addr::new(10, 213, x, 1),
            addrs: (0..n).map(|i| Ipv4Addr::new(10, 213, x, 10 + i as u8)).collect(),
        };
        let bridge = format!("cdr{pid}b");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        net.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", net.gateway), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let (ns, veth) = (format!("cadre-{pid}-{i}"), format!("cdr{pid}v{i}"));
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            net.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.addrs[i]), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Removes the namespaces, veths and bridges of runs whose process is gone (or of an
    /// earlier run of this process that could not remove them).
    fn remove_stale() -> Result<(), String> {
        let own = std::process::id();
        let stale = |pid: Option<u32>| pid.is_some_and(|p| p == own || pid_gone(p));
        for line in ip(&["netns", "list"])?.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if stale(pid_in(name, "cadre-")) {
                let _ = ip(&["netns", "del", name]);
            }
        }
        // Lines `N: NAME[@PEER]: <FLAGS> ...`; bridges before veths would not matter.
        for line in ip(&["-o", "link", "show"])?.lines() {
            let name = line.split(": ").nth(1).unwrap_or_default().split('@').next().unwrap_or_default();
            if stale(pid_in(name, "cdr")) {
                let _ = ip(&["link", "del", name]);
            }
        }
        Ok(())
    }

    /// An X such that no route of the machine but the default one covers or lies in 10.213.X.0/24.
    fn free_subnet(pid: u32) -> Result<u8, String> {
        for k in 0..250 {
            let x = (pid + k) % 250 + 1;
            let prefix = format!("10.213.{x}.0/24");
            let covering = ip(&["-4", "route", "show", "match", &prefix])?;
            let inside = ip(&["-4", "route", "show", "root", &prefix])?;
            if covering.lines().chain(inside.lines()).all(|l| l.trim().is_empty() || l.starts_with("default")) {
                return Ok(x as u8);
            }
        }
        Err("no free 10.213.X.0/24".into())
    }

    /// Cuts node `i` off from the other nodes (`cut`) or heals that: in both directions, the
    /// neighbour entry of the other's address points at a link-layer address nobody has.
    fn cut(&self, i: usize, cut: bool) -> Result<(), String> {
        for j in (0..self.addrs.len()).filter(|&j| j != i) {
            for (at, peer) in [(i, j), (j, i)] {
                let (ns, peer) = (&self.namespaces[at], self.addrs[peer].to_string());
                if cut {
                    let to = ["lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent"];
                    ip(&[&["-n", ns, "neigh", "replace", &peer][..], &to].concat())?;
                } else {
                    ip(&["-n", ns, "neigh", "del", &peer, "dev", "eth0"])?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        for veth in &self.veths {
            if let Err(e) = ip(&["link", "del", veth]) {
                eprintln!("chaos: {e}");
            }
        }
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("chaos: {e}");
            }
        }
        if let Some(bridge) = &self.bridge {
            if let Err(e) = ip(&["link", "del", bridge]) {
                eprintln!("chaos: {e}");
            }
        }
    }
}

struct Chaos {
    settings: Settings,
    backend: Backend,
    /// Data dirs, logs and the config; removed when the run passes, kept when it fails.
    dir: PathBuf,
    config: PathBuf,
    names: Vec<String>,
    /// (transport, HTTP) of each node; kept across restarts.
    places: Vec<(SocketAddr, SocketAddr)>,
    procs: Vec<Option<NodeProc>>,
    /// The nodes' network namespaces, if they run in ones (after `procs`: dropped after the
    /// nodes are killed).
    net: Option<Net>,
    /// Restarts of each node (earlier logs are kept as `NAME.log.N`).
    generation: Vec<u32>,
    schedule: Vec<String>,
    started: Instant,
}

impl Chaos {
    fn extra(&self) -> Vec<String> {
        let mut extra = vec!["--config".to_string(), self.config.display().to_string()];
        if let Backend::Postgres(url) = &self.backend {
            extra.extend(["--storage".to_string(), url.clone()]);
        }
        extra
    }

    fn spawn(&mut self, i: usize, seeds: &[SocketAddr]) {
        let extra = self.extra();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let spec = NodeSpec { exe: exe(), name: &self.names[i], seeds, dir: &self.dir, secret: SECRET, extra: &extra };
        let (addr, http) = self.places[i];
        let netns = self.net.as_ref().map(|n| n.namespaces[i].as_str());
        match NodeProc::spawn_in(spec, netns, addr, http) {
            Ok(p) => self.procs[i] = Some(p),
            Err(e) => self.fail(format!("cannot start {}: {e:#}", self.names[i])),
        }
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.names.len()).filter(|&i| self.procs[i].is_some()).collect()
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>8.3}s {what}", self.started.elapsed().as_secs_f64());
        eprintln!("chaos: {line}");
        self.schedule.push(line);
    }

    /// Fails the test with the seed, the schedule so far and the tail of each node's log.
    fn fail(&self, msg: String) -> ! {
        let mut out = format!(
            "CHAOS FAILURE: {msg}\nseed {} ({} nodes, {:?} backend, {}); rerun with CADRE_CHAOS_SEED={}\nschedule so far:\n",
            self.settings.seed,
            self.names.len(),
            match self.backend {
                Backend::Embedded => "embedded",
                Backend::Postgres(_) => "postgres",
            },
            if self.net.is_some() {
                "nodes in network namespaces; CADRE_CHAOS_NETNS=0 for loopback"
            } else {
                "nodes on loopback"
            },
            self.settings.seed
        );
        for s in &self.schedule {
            let _ = writeln!(out, "  {s}");
        }
        for (i, name) in self.names.iter().enumerate() {
            let log = self.dir.join(format!("{name}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(
                out,
                "--- {name} (restarts: {}, {}) log tail:\n{}",
                self.generation[i],
                if self.procs[i].is_some() { "running" } else { "not running" },
                strip_ansi(&lines[lines.len().saturating_sub(30)..].join("\n"))
            );
        }
        let _ = writeln!(out, "data dirs and full logs kept in {}", self.dir.display());
        panic!("{out}");
    }

    fn replication_copies(&self) -> usize {
        match self.backend {
            Backend::Embedded => self.names.len().min(3) - 1,
            Backend::Postgres(_) => 0,
        }
    }

    /// Every member answering and owning shards, none moving or unassigned, every replica in sync.
    fn healthy(&self, c: &ClusterJson) -> bool {
        c.members.len() == self.names.len()
            && c.members.iter().all(|m| m.active_agents.is_some() && m.shards > 0)
            && c.shards_moving == 0
            && c.shards_unassigned == 0
            && c.replicas_behind == 0
            && c.replicas_in_sync == self.replication_copies() * c.shard_count as usize
    }

    /// Polls `GET /v1/cluster` on `http` until `cond` holds, or fails the test.
    async fn await_cluster(&self, http: SocketAddr, what: &str, cond: impl Fn(&ClusterJson) -> bool) -> ClusterJson {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match client::cluster(http, Duration::from_secs(2)).await {
                Ok(c) if cond(&c) => return c,
                Ok(c) => format!("{c:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                self.fail(format!("not reached within {WAIT:?} on {http}: {what}; last: {last}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every running node sees the cluster healthy.
    async fn await_healthy(&self, what: &str) {
        for i in self.alive() {
            let http = self.places[i].1;
            self.await_cluster(http, &format!("{what}: healthy as {} sees it", self.names[i]), |c| self.healthy(c))
                .await;
        }
    }

    async fn await_ready(&self, i: usize) {
        if let Err(e) = wait_ready(self.places[i].1, WAIT).await {
            self.fail(format!("{} never became ready: {e}", self.names[i]));
        }
    }

    async fn start(&mut self) {
        self.spawn(0, &[]);
        let seeds = [self.places[0].0];
        for i in 1..self.names.len() {
            self.spawn(i, &seeds);
        }
        for i in 0..self.names.len() {
            self.await_ready(i).await;
        }
        self.await_healthy("started").await;
        self.note(format!("{} nodes up and replicated", self.names.len()));
    }

    /// A key `victim` owns, as another node sees it: a workload key if one is, else a probe key.
    async fn key_owned_by(&self, victim: usize, via: SocketAddr) -> String {
        let ids = (0..KEYS).map(key_id).chain((0..1000).map(|j| format!("probe{j}")));
        for id in ids {
            let path = format!("/v1/agents/counter/{id}");
            if let Ok((200, body)) = client::get(via, &path, Duration::from_secs(2)).await {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if v["owner"].as_str() == Some(self.names[victim].as_str()) {
                    return id;
                }
            }
        }
        self.fail(format!("no key owned by {} found", self.names[victim]))
    }

    /// SIGKILL `victim`, time until a key it owned answers on another node, restart it where it was.
    async fn kill(&mut self, victim: usize) -> Duration {
        let others: Vec<usize> = self.alive().into_iter().filter(|&i| i != victim).collect();
        let key = self.key_owned_by(victim, self.places[others[0]].1).await;
        self.note(format!("SIGKILL {} (owner of {key})", self.names[victim]));
        let killed_at = Instant::now();
        let mut proc = self.procs[victim].take().unwrap();
        if let Err(e) = proc.signal(libc::SIGKILL) {
            self.fail(format!("cannot kill {}: {e}", self.names[victim]));
        }
        if let Err(e) = proc.wait(WAIT).await {
            self.fail(format!("{e}"));
        }
        // The key answers on another node.
        let deadline = killed_at + WAIT;
        let mut attempt = 0;
        let failover = loop {
            let via = self.places[others[attempt % others.len()]].1;
            attempt += 1;
            if let Outcome::Acked { node, .. } =
                call(via, &key, "counter.get", serde_json::Value::Null, PROBE_TIMEOUT).await
            {
                if node != self.names[victim] {
                    break killed_at.elapsed();
                }
            }
            if Instant::now() >= deadline {
                self.fail(format!("{key}, owned by the killed {}, never answered elsewhere", self.names[victim]));
            }
            tokio::time::sleep(POLL).await;
        };
        self.note(format!("{key} answers elsewhere {:.0} ms after the kill", failover.as_secs_f64() * 1000.0));
        // Restart on the same ports and data dir; the old log is kept.
        self.generation[victim] += 1;
        let name = &self.names[victim];
        let log = self.dir.join(format!("{name}.log"));
        let _ = std::fs::rename(&log, self.dir.join(format!("{name}.log.{}", self.generation[victim])));
        let seeds: Vec<SocketAddr> = others.iter().map(|&i| self.places[i].0).collect();
        self.spawn(victim, &seeds);
        self.await_ready(victim).await;
        self.note(format!("{} restarted", self.names[victim]));
        failover
    }

    /// SIGSTOP `victim` until at least `min_ms` have passed and the others have taken its shards
    /// over (its lease ran out), then SIGCONT.
    async fn stop(&mut self, victim: usize, min_ms: u64) {
        self.note(format!("SIGSTOP {} for at least {min_ms} ms", self.names[victim]));
        let stopped_at = Instant::now();
        let proc = self.procs[victim].as_ref().unwrap();
        if let Err(e) = proc.signal(libc::SIGSTOP) {
            self.fail(format!("cannot stop {}: {e}", self.names[victim]));
        }
        let via = self.alive().into_iter().find(|&i| i != victim).unwrap();
        let name = self.names[victim].clone();
        self.await_cluster(self.places[via].1, &format!("{name}'s shards taken over while it is stopped"), |c| {
            c.shards_unassigned == 0 && c.members.iter().all(|m| m.name != name || m.shards == 0)
        })
        .await;
        let taken_over = stopped_at.elapsed();
        tokio::time::sleep(Duration::from_millis(min_ms).saturating_sub(stopped_at.elapsed())).await;
        let proc = self.procs[victim].as_ref().unwrap();
        if let Err(e) = proc.signal(libc::SIGCONT) {
            self.fail(format!("cannot continue {}: {e}", self.names[victim]));
        }
        self.note(format!(
            "SIGCONT {} after {:.0} ms (shards taken over after {:.0} ms)",
            self.names[victim],
            stopped_at.elapsed().as_secs_f64() * 1000.0,
            taken_over.as_secs_f64() * 1000.0
        ));
    }

    /// Cuts `victim` off from the other nodes until at least `ms` have passed and the others have
    /// taken its shards over (its lease ran out), then heals the partition.
    async fn partition(&mut self, victim: usize, ms: u64) {
        let name = self.names[victim].clone();
        self.note(format!("partition {name} from the other nodes for at least {ms} ms"));
        let cut_at = Instant::now();
        if let Err(e) = self.net.as_ref().unwrap().cut(victim, true) {
            self.fail(format!("cannot partition {name}: {e}"));
        }
        let via = self.alive().into_iter().find(|&i| i != victim).unwrap();
        self.await_cluster(self.places[via].1, &format!("{name}'s shards taken over while it is cut off"), |c| {
            c.shards_unassigned == 0 && c.members.iter().all(|m| m.name != name || m.shards == 0)
        })
        .await;
        let taken_over = cut_at.elapsed();
        tokio::time::sleep(Duration::from_millis(ms).saturating_sub(cut_at.elapsed())).await;
        if let Err(e) = self.net.as_ref().unwrap().cut(victim, false) {
            self.fail(format!("cannot heal the partition of {name}: {e}"));
        }
        self.note(format!(
            "partition of {name} healed after {:.0} ms (shards taken over after {:.0} ms)",
            cut_at.elapsed().as_secs_f64() * 1000.0,
            taken_over.as_secs_f64() * 1000.0
        ));
    }

    /// The value of a key as `http` answers it, retried until the deadline.
    async fn value(&self, k: usize, i: usize) -> i64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let last =
                match call(self.places[i].1, &key_id(k), "counter.get", serde_json::Value::Null, CALL_TIMEOUT).await {
                    Outcome::Acked { value, .. } => return value,
                    Outcome::Duplicate => "a duplicate answer to a read".into(),
                    Outcome::Unknown(e) => e,
                    Outcome::NotSent => "connection refused".into(),
                };
            if Instant::now() >= deadline {
                self.fail(format!("{} does not answer via {}: {last}", key_id(k), self.names[i]));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Chaos {
    /// Kills the nodes still running and waits for them to be gone (for [`Net`] to remove
    /// their namespaces next), also when the test panics.
    fn drop(&mut self) {
        let pids: Vec<u32> = self.procs.iter().flatten().filter_map(|p| p.pid()).collect();
        for p in self.procs.iter().flatten() {
            let _ = p.signal(libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            // Gone, or a zombie (its namespaces already released).
            let dead = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
            };
            while !dead() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    // Nearest rank.
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Starts a relay on `gateway` to the database of `url` (`postgres://USERINFO@HOST:PORT/REST`):
/// the same URL with the relay's address, for the nodes.
async fn relay_database(url: &str, gateway: Ipv4Addr) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
    let (user, rest) = rest.rsplit_once('@').ok_or("no user")?;
    let (host, path) = rest.split_once('/').ok_or("no database")?;
    let to: SocketAddr = host.parse().map_err(|e| format!("{host}: not an IP address and port: {e}"))?;
    let listener = tokio::net::TcpListener::bind((gateway, 0)).await.map_err(|e| e.to_string())?;
    let at = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // Ends with the test's runtime; one task per connection (pools of a few nodes).
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    Ok(format!("{scheme}://{user}@{at}/{path}"))
}

async fn run(backend: Backend) {
    run_with(backend, env_u64("CADRE_CHAOS_RETRY") == Some(1)).await;
}

async fn run_with(backend: Backend, retry: bool) {
    let settings = Settings::from_env();
    let n = settings.nodes;
    let dir = tempfile::Builder::new().prefix("cadre-chaos").tempdir().unwrap().keep();
    let config = dir.join("chaos.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut backend = backend;
    let net = if settings.netns {
        Net::setup(n).map_err(|e| format!("no network namespaces: {e}"))
    } else {
        Err("CADRE_CHAOS_NETNS=0".to_string())
    };
    // The database listens where this process runs, which a namespace does not reach: a relay on
    // the bridge's address carries the nodes' connections to it (partitions cut nodes off from
    // each other, not from the database).
    let net = match (net, &backend) {
        (Ok(net), Backend::Postgres(url)) => match relay_database(url, net.gateway).await {
            Ok(relayed) => {
                backend = Backend::Postgres(relayed);
                Ok(net)
            }
            Err(e) => Err(format!("no relay to the database: {e}")),
        },
        (net, _) => net,
    };
    let (net, places) = match net {
        Ok(net) => {
            eprintln!("chaos: nodes in network namespaces on {}/24, with partitions", net.gateway);
            let at = |a: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(a), port);
            let places = net.addrs.iter().map(|&a| (at(a, NETNS_PORT), at(a, NETNS_HTTP_PORT))).collect();
            (Some(net), places)
        }
        Err(why) => {
            eprintln!("chaos: nodes on loopback, no partitions ({why})");
            let places = (0..n)
                .map(|_| (proc::loopback(proc::free_port().unwrap()), proc::loopback(proc::free_port().unwrap())))
                .collect();
            (None, places)
        }
    };
    let mut chaos = Chaos {
        backend,
        dir,
        config,
        names: (1..=n).map(|i| format!("c{i}")).collect(),
        places,
        procs: (0..n).map(|_| None).collect(),
        net,
        generation: vec![0; n],
        schedule: Vec::new(),
        started: Instant::now(),
        settings,
    };
    eprintln!(
        "chaos: seed {} ({n} nodes, {:?}); rerun with CADRE_CHAOS_SEED={}",
        chaos.settings.seed,
        match chaos.backend {
            Backend::Embedded => "embedded store",
            Backend::Postgres(_) => "postgres",
        },
        chaos.settings.seed
    );
    chaos.start().await;

    let ledger =
        Arc::new(Mutex::new(Ledger { keys: vec![KeyLedger::default(); KEYS], exact: retry, ..Ledger::default() }));
    let stop = Arc::new(AtomicBool::new(false));
    let http: Vec<SocketAddr> = chaos.places.iter().map(|p| p.1).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let rng = Rng(chaos.settings.seed ^ (c + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            tokio::spawn(client_loop(rng, http.clone(), ledger.clone(), stop.clone(), retry))
        })
        .collect();

    let mut rng = Rng(chaos.settings.seed);
    let mut failovers = Vec::new();
    let partitions = chaos.net.is_some();
    let (mut kills, mut stops, mut cuts) = (0, 0, 0);
    let faults_started = Instant::now();
    for f in 0..chaos.settings.faults {
        if let Some(s) = chaos.settings.seconds {
            if faults_started.elapsed() >= Duration::from_secs(s) {
                break;
            }
        }
        let node = rng.below(n as u64) as usize;
        // With partitions, a third of each kind, and at least one partition in a run of a number
        // of faults; without, two kills for one stop (kills give failover figures).
        let kind = match rng.below(3) {
            k if partitions => k,
            0 | 1 => 0,
            _ => 1,
        };
        let last = chaos.settings.seconds.is_none() && f + 1 == chaos.settings.faults;
        let kind = if partitions && last && cuts == 0 { 2 } else { kind };
        let ms = if kind == 0 { 0 } else { LEASE_MS + DRIFT_MS + 300 + rng.below(1000) };
        let fault = match kind {
            0 => Fault::Kill { node },
            1 => Fault::Stop { node, min_ms: ms },
            _ => Fault::Partition { node, ms },
        };
        // Let the workload run a little on the healthy cluster.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        chaos.note(format!("fault {}: {fault:?}", f + 1));
        match fault {
            Fault::Kill { node } => {
                failovers.push(chaos.kill(node).await);
                kills += 1;
            }
            Fault::Stop { node, min_ms } => {
                chaos.stop(node, min_ms).await;
                stops += 1;
            }
            Fault::Partition { node, ms } => {
                chaos.partition(node, ms).await;
                cuts += 1;
            }
        }
        let recovery = Instant::now();
        chaos.await_healthy(&format!("after fault {}", f + 1)).await;
        chaos.note(format!("healthy again after {:.0} ms", recovery.elapsed().as_secs_f64() * 1000.0));
    }

    // A last stretch of calls on the healthy cluster, then the checks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    chaos.note("workload stopped".into());
    chaos.await_healthy("at the end").await;

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let mut problems = ledger.violations.clone();
    for (k, e) in ledger.keys.iter().enumerate() {
        let values = {
            let mut v = Vec::new();
            for i in 0..n {
                v.push(chaos.value(k, i).await);
            }
            v
        };
        let value = values[0];
        let id = key_id(k);
        if values.iter().any(|&v| v != value) {
            problems.push(format!("{id}: the nodes answer different values {values:?}"));
        }
        if value < e.acked_sum {
            problems.push(format!(
                "{id}: value {value} < acknowledged sum {} (an acknowledged add was lost; {} acked, {} unknown of sum {})",
                e.acked_sum, e.acked, e.unknown, e.unknown_sum
            ));
        }
        if value > e.acked_sum + e.unknown_sum {
            problems.push(format!(
                "{id}: value {value} > acknowledged {} + unknown {} (an add applied twice)",
                e.acked_sum, e.unknown_sum
            ));
        }
        if ledger.exact && value != e.acked_sum {
            problems.push(format!(
                "{id}: value {value} != the sum of its adds {} (every add was acknowledged, retries included)",
                e.acked_sum
            ));
        }
        if value < e.max_acked_value {
            problems.push(format!("{id}: value {value} < a value acknowledged earlier {}", e.max_acked_value));
        }
    }
    let acked: u64 = ledger.keys.iter().map(|e| e.acked).sum();
    let unknown: u64 = ledger.keys.iter().map(|e| e.unknown).sum();
    let mut sorted = failovers.clone();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mode = if ledger.exact {
        format!("retrying ({} retries, {} answered as duplicates, exact sums)", ledger.retries, ledger.duplicates)
    } else {
        "once".into()
    };
    let mut report = format!(
        "chaos: seed {} — {mode} — {n} nodes, {} faults: {kills} kills, {stops} stops, {cuts} partitions in {:.1} s; calls: {acked} acknowledged, {unknown} unknown {:?}, {} refused",
        chaos.settings.seed,
        kills + stops + cuts,
        chaos.started.elapsed().as_secs_f64(),
        ledger.unknown_kinds,
        ledger.not_sent
    );
    if !sorted.is_empty() {
        let all: Vec<String> = failovers.iter().map(|d| format!("{:.0}", ms(*d))).collect();
        let _ = write!(
            report,
            "\nchaos: failover after SIGKILL: p50 {:.0} ms, p99 {:.0} ms over {} kills (ms: {})",
            ms(percentile(&sorted, 50)),
            ms(percentile(&sorted, 99)),
            sorted.len(),
            all.join(", ")
        );
    }
    println!("{report}");
    eprintln!("{report}");
    if !problems.is_empty() {
        chaos.fail(format!("{} violations:\n{}", problems.len(), problems.join("\n")));
    }
    if acked == 0 {
        chaos.fail("no call was acknowledged".into());
    }

    for i in chaos.alive() {
        let mut p = chaos.procs[i].take().unwrap();
        let _ = p.signal(libc::SIGTERM);
        if p.wait(WAIT).await.is_err() {
            let _ = p.signal(libc::SIGKILL);
        }
    }
    let _ = std::fs::remove_dir_all(&chaos.dir);
}
