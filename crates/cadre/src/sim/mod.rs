//! Deterministic cluster simulation on turmoil (test support).
//!
//! [`SimCluster`] runs N real nodes (the same `Node`, transport and membership code as
//! production) as turmoil hosts on a simulated network with simulated time. Every random choice
//! is derived from one seed: turmoil's network, each node's RNG and the simulated wall clock,
//! so a seed replays the exact same run. Hosts can be partitioned, repaired, crashed and
//! restarted; the harness observes each node's member view from outside the simulation.
//!
//! [`run_seeds`] runs a scenario over many seeds and, on failure, names the seed and how to
//! replay it (`CADRE_SIM_SEED=<seed>`). `CADRE_SIM_SEEDS=<n>` changes how many seeds run.
//!
//! Caveat: turmoil's TCP drops segments across a partition without retransmission, so a
//! connection that spanned a partition stalls; the transport's idle timeout replaces it, which
//! is also what a half-open real connection needs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::membership::task::{Membership, View};
use crate::membership::MemberState;
use crate::net::TurmoilNet;
use crate::node::{Node, NodeOptions};

/// Transport port every simulated node listens on.
pub const SIM_PORT: u16 = 7000;
/// Secret shared by simulated nodes unless a test overrides it.
pub const SIM_SECRET: &str = "sim-secret-0123456789";
/// Longest simulated time a scenario may run.
const SIM_DURATION_MAX: Duration = Duration::from_secs(3600);

/// Options for one simulated node.
#[derive(Clone, Debug)]
pub struct SimNode {
    pub name: String,
    pub secret: String,
    /// Names of the hosts this node joins through.
    pub seeds: Vec<String>,
}

/// What the harness holds of a running simulated node.
struct Running {
    membership: Membership,
    /// Cancelled by [`SimCluster::crash`]: the node stops abruptly (no leave, no flush).
    kill: CancellationToken,
    /// Set once the node's tasks have all stopped.
    dead: Rc<Cell<bool>>,
}

type Registry = Rc<RefCell<BTreeMap<String, Running>>>;

/// A simulated cluster.
pub struct SimCluster {
    sim: turmoil::Sim<'static>,
    seed: u64,
    registry: Registry,
    nodes: Vec<SimNode>,
    crashed: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("condition not met within {0:?} of simulated time")]
    Timeout(Duration),
    #[error("simulation failed: {0}")]
    Turmoil(String),
}

impl SimCluster {
    /// A simulation with `n` nodes named `n1..nN`, all joining through `n1`, `n2` and `n3`.
    pub fn new(n: usize, seed: u64) -> Self {
        let mut c = Self::empty(seed);
        let seeds: Vec<String> = (1..=n.min(3)).map(|i| format!("n{i}")).collect();
        for i in 1..=n {
            c.add_node(SimNode { name: format!("n{i}"), secret: SIM_SECRET.into(), seeds: seeds.clone() });
        }
        c
    }

    /// A simulation with no nodes yet.
    pub fn empty(seed: u64) -> Self {
        let sim = turmoil::Builder::new()
            .rng_seed(seed)
            .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
            .simulation_duration(SIM_DURATION_MAX)
            .min_message_latency(Duration::from_micros(200))
            .max_message_latency(Duration::from_millis(5))
            .tcp_capacity(4096)
            .build();
        SimCluster { sim, seed, registry: Rc::default(), nodes: Vec::new(), crashed: BTreeSet::new() }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Adds and starts a node host.
    pub fn add_node(&mut self, node: SimNode) {
        let index = self.nodes.len() as u64;
        let registry = self.registry.clone();
        let seed = self.seed;
        let spec = node.clone();
        self.sim.host(node.name.as_str(), move || {
            let registry = registry.clone();
            let spec = spec.clone();
            async move {
                let ip = turmoil::lookup(spec.name.as_str());
                let seeds = spec.seeds.iter().map(|s| SocketAddr::new(turmoil::lookup(s.as_str()), SIM_PORT)).collect();
                let cfg = Config {
                    name: spec.name.clone(),
                    cluster: "sim".into(),
                    listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), SIM_PORT),
                    advertise: Some(SocketAddr::new(ip, SIM_PORT)),
                    seeds,
                    secret: Secret::new(&spec.secret),
                    rng_seed: Some(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index)),
                    ..Config::default()
                };
                let opts = NodeOptions { net: Arc::new(TurmoilNet), ..NodeOptions::default() };
                let node = Node::start(cfg, opts).await?;
                let kill = CancellationToken::new();
                let dead = Rc::new(Cell::new(false));
                let running = Running { membership: node.membership().clone(), kill: kill.clone(), dead: dead.clone() };
                registry.borrow_mut().insert(spec.name.clone(), running);
                kill.cancelled().await;
                node.kill().await;
                dead.set(true);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        self.nodes.push(node);
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// The current view of a running node.
    pub fn view(&self, name: &str) -> Option<View> {
        if self.crashed.contains(name) {
            return None;
        }
        self.registry.borrow().get(name).map(|r| r.membership.view())
    }

    /// Names of nodes that are running (not crashed).
    pub fn running(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).filter(|n| !self.crashed.contains(n)).collect()
    }

    /// Advances simulated time by `d`.
    pub fn run_for(&mut self, d: Duration) -> Result<(), SimError> {
        let end = self.sim.elapsed() + d;
        while self.sim.elapsed() < end {
            self.sim.step().map_err(|e| SimError::Turmoil(e.to_string()))?;
        }
        Ok(())
    }

    /// Steps until `pred` holds, at most `timeout` of simulated time; returns the time it took.
    pub fn run_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&SimCluster) -> bool,
    ) -> Result<Duration, SimError> {
        let start = self.sim.elapsed();
        loop {
            if pred(self) {
                return Ok(self.sim.elapsed() - start);
            }
            if self.sim.elapsed() - start >= timeout {
                return Err(SimError::Timeout(timeout));
            }
            self.sim.step().map_err(|e| SimError::Turmoil(e.to_string()))?;
        }
    }

    /// Cuts every link between the two groups.
    pub fn partition(&mut self, a: &[&str], b: &[&str]) {
        for x in a {
            for y in b {
                self.sim.partition(*x, *y);
            }
        }
    }

    /// Restores every link between the two groups.
    pub fn repair(&mut self, a: &[&str], b: &[&str]) {
        for x in a {
            for y in b {
                self.sim.repair(*x, *y);
            }
        }
    }

    /// Stops a host abruptly: no leave, no flush; its connections close.
    ///
    /// The node's tasks are stopped from inside the simulation first, in scheduling order, and only
    /// then is the host crashed. (Dropping live tasks at crash time would close their sockets in an
    /// order that depends on process-global task ids, which breaks replay when tests run in
    /// parallel.)
    pub fn crash(&mut self, name: &str) {
        let running = self.registry.borrow_mut().remove(name);
        if let Some(r) = running {
            r.kill.cancel();
            while !r.dead.get() {
                if self.sim.step().is_err() {
                    break;
                }
            }
        }
        self.sim.crash(name);
        self.crashed.insert(name.to_string());
    }

    /// Starts a crashed host again (same name and address, a new process).
    pub fn restart(&mut self, name: &str) {
        self.sim.bounce(name);
        self.crashed.remove(name);
    }

    /// True when every running node in `names` sees exactly `alive` as its alive members.
    pub fn all_see_alive(&self, names: &[String], alive: &[String]) -> bool {
        let mut want: Vec<String> = alive.to_vec();
        want.sort();
        names.iter().all(|n| self.view(n).is_some_and(|v| v.names(MemberState::Alive) == want))
    }

    /// True when every node in `observers` sees `target` in one of `states`.
    pub fn all_see(&self, observers: &[String], target: &str, states: &[MemberState]) -> bool {
        observers.iter().all(|n| self.view(n).and_then(|v| v.state_of(target)).is_some_and(|s| states.contains(&s)))
    }
}

/// Runs `scenario` for `default_count` seeds (or `CADRE_SIM_SEEDS`), or only `CADRE_SIM_SEED`.
/// Panics with the failing seed and the command that replays it.
pub fn run_seeds(name: &str, default_count: u64, mut scenario: impl FnMut(u64) -> Result<String, String>) {
    let seeds: Vec<u64> = match std::env::var("CADRE_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => {
            let n = std::env::var("CADRE_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_count);
            (1..=n).collect()
        }
    };
    for seed in seeds {
        match scenario(seed) {
            Ok(report) => {
                if !report.is_empty() {
                    println!("{name} seed {seed}: {report}");
                }
            }
            Err(msg) => panic!(
                "simulation `{name}` failed with seed {seed}: {msg}\n\
                 replay: CADRE_SIM_SEED={seed} cargo test -p cadre --test sim -- {name} --nocapture"
            ),
        }
    }
}
