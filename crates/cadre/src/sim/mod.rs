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
//! ## Nodes, restarts, work
//! - [`SimCluster::add_node_with`] adjusts a node's [`Config`] and [`NodeOptions`] at every start
//!   (e.g. a [`crate::config::PlacementConfig`], or a storage all nodes share).
//! - A node started without seeds founds the cluster's metadata group. Its metadata lives in memory,
//!   so after a restart it joins through the other nodes instead of founding a second group. Every
//!   restart also gets a fresh RNG seed, hence a fresh Raft id: a restarted process has lost its
//!   log and vote, and must not come back as the voter it was.
//! - Work runs *inside* a node's host, as that node's process would run it: [`SimHandle::run_on`]
//!   hands a closure the node's [`Cluster`] and returns its result, or `None` when the node is not
//!   running or crashes first (the work dies with it). [`SimCluster::client`] adds a turmoil client
//!   (a workload driver) that can hold a [`SimHandle`].
//!
//! Caveat: turmoil's TCP drops segments across a partition without retransmission, so a
//! connection that spanned a partition stalls; the transport's idle timeout replaces it, which
//! is also what a half-open real connection needs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::future::LocalBoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::cluster::Cluster;
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
    /// The node's name, also its host's name.
    pub name: String,
    /// The cluster secret it presents.
    pub secret: String,
    /// Names of the hosts this node joins through.
    pub seeds: Vec<String>,
}

/// Work handed to a running node (see [`SimHandle::run_on`]).
type Job = Box<dyn FnOnce(Cluster, Bus) -> LocalBoxFuture<'static, ()>>;

/// Adjusts a node's config and options at each start; the `u32` counts earlier starts (0 first).
type Setup = Rc<dyn Fn(&mut Config, &mut NodeOptions, u32)>;

/// What the harness holds of a running simulated node.
struct Running {
    membership: Membership,
    cluster: Cluster,
    bus: Bus,
    /// Work to run inside the node's host.
    jobs: mpsc::UnboundedSender<Job>,
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
    /// Names of every node added, for restarted founders to join through.
    names: Rc<RefCell<Vec<String>>>,
    crashed: BTreeSet<String>,
}

/// A handle on the running nodes, usable from inside the simulation (a [`SimCluster::client`]).
#[derive(Clone)]
pub struct SimHandle {
    registry: Registry,
}

impl SimHandle {
    /// Names of the nodes running now (started and not crashed), in name order.
    pub fn running(&self) -> Vec<String> {
        self.registry.borrow().keys().cloned().collect()
    }

    /// Runs `f` inside `node`'s host, as part of that node's process, and returns its output:
    /// `None` if the node is not running, or crashes before `f` finishes (its work dies with it).
    pub fn run_on<T, F, Fut>(&self, node: &str, f: F) -> impl Future<Output = Option<T>> + 'static
    where
        T: 'static,
        F: FnOnce(Cluster) -> Fut + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_with_bus(node, move |cluster, _| f(cluster))
    }

    /// As [`SimHandle::run_on`], with the node's bus too.
    pub fn run_with_bus<T, F, Fut>(&self, node: &str, f: F) -> impl Future<Output = Option<T>> + 'static
    where
        T: 'static,
        F: FnOnce(Cluster, Bus) -> Fut + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |cluster, bus| {
            Box::pin(async move {
                let _ = tx.send(f(cluster, bus).await);
            })
        });
        let sent = self.registry.borrow().get(node).is_some_and(|r| r.jobs.send(job).is_ok());
        async move {
            if !sent {
                return None;
            }
            rx.await.ok()
        }
    }
}

/// The address of a simulated node's transport (inside the simulation only: it asks turmoil's DNS).
pub fn sim_addr(name: &str) -> SocketAddr {
    SocketAddr::new(turmoil::lookup(name), SIM_PORT)
}

/// Why a simulation step failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A condition waited for did not hold in time.
    #[error("condition not met within {0:?} of simulated time")]
    Timeout(Duration),
    /// turmoil stopped the simulation (a host panicked or failed, or the duration ran out).
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
        crate::cluster::reset_start_count();
        let sim = turmoil::Builder::new()
            .rng_seed(seed)
            .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
            .simulation_duration(SIM_DURATION_MAX)
            .min_message_latency(Duration::from_micros(200))
            .max_message_latency(Duration::from_millis(5))
            .tcp_capacity(4096)
            .build();
        SimCluster {
            sim,
            seed,
            registry: Rc::default(),
            nodes: Vec::new(),
            names: Rc::default(),
            crashed: BTreeSet::new(),
        }
    }

    /// The seed the simulation was built from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Adds and starts a node host.
    pub fn add_node(&mut self, node: SimNode) {
        self.add_node_with(node, |_, _, _| {});
    }

    /// Adds and starts a node host; `setup` adjusts its config and options at every start (the
    /// last argument counts the earlier starts: 0 the first time, then one more per restart).
    pub fn add_node_with(&mut self, node: SimNode, setup: impl Fn(&mut Config, &mut NodeOptions, u32) + 'static) {
        let index = self.nodes.len() as u64;
        let registry = self.registry.clone();
        let names = self.names.clone();
        let seed = self.seed;
        let spec = node.clone();
        let setup: Setup = Rc::new(setup);
        let boots = Rc::new(Cell::new(0u32));
        self.names.borrow_mut().push(node.name.clone());
        self.sim.host(node.name.as_str(), move || {
            let registry = registry.clone();
            let spec = spec.clone();
            let setup = setup.clone();
            let boot = boots.replace(boots.get() + 1);
            // A founder's metadata was in memory: restarted, it joins the group it founded.
            let seed_names: Vec<String> = if boot > 0 && spec.seeds.is_empty() {
                names.borrow().iter().filter(|n| **n != spec.name).cloned().collect()
            } else {
                spec.seeds.clone()
            };
            async move {
                let ip = turmoil::lookup(spec.name.as_str());
                let seeds = seed_names.iter().map(|s| sim_addr(s)).collect();
                // A fresh seed per start (the first is unchanged): a new process, a new Raft id.
                let rng_seed =
                    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index).wrapping_add(u64::from(boot) << 32);
                let mut cfg = Config {
                    name: spec.name.clone(),
                    cluster: "sim".into(),
                    listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), SIM_PORT),
                    advertise: Some(SocketAddr::new(ip, SIM_PORT)),
                    seeds,
                    secret: Secret::new(&spec.secret),
                    rng_seed: Some(rng_seed),
                    ..Config::default()
                };
                let mut opts = NodeOptions { net: Arc::new(TurmoilNet), ..NodeOptions::default() };
                setup(&mut cfg, &mut opts, boot);
                let node = Node::start(cfg, opts).await?;
                let kill = CancellationToken::new();
                let dead = Rc::new(Cell::new(false));
                let (jobs, mut inbox) = mpsc::unbounded_channel::<Job>();
                let running = Running {
                    membership: node.membership().clone(),
                    cluster: node.cluster().clone(),
                    bus: node.bus().clone(),
                    jobs,
                    kill: kill.clone(),
                    dead: dead.clone(),
                };
                registry.borrow_mut().insert(spec.name.clone(), running);
                let work = TaskTracker::new();
                loop {
                    tokio::select! {
                        biased;
                        _ = kill.cancelled() => break,
                        Some(job) = inbox.recv() => {
                            let fut = job(node.cluster().clone(), node.bus().clone());
                            let kill = kill.clone();
                            work.spawn_local(async move {
                                tokio::select! {
                                    biased;
                                    _ = kill.cancelled() => {}
                                    _ = fut => {}
                                }
                            });
                        }
                    }
                }
                // As a crash: work in progress ends with the process, before the node's tasks.
                drop(inbox);
                work.close();
                work.wait().await;
                node.kill().await;
                dead.set(true);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        self.nodes.push(node);
    }

    /// Adds a turmoil client (a workload driver, not a node); it may hold a [`SimHandle`].
    /// An error it returns fails the simulation.
    pub fn client<F>(&mut self, name: &str, client: F)
    where
        F: Future<Output = Result<(), String>> + 'static,
    {
        self.sim.client(name, async move { client.await.map_err(Into::into) });
    }

    /// A handle on the running nodes, for clients and for work submitted from the test.
    pub fn handle(&self) -> SimHandle {
        SimHandle { registry: self.registry.clone() }
    }

    /// The cluster handle of a running node (its metadata copy, placement, Raft metrics).
    /// Anything async on it must run inside the simulation: see [`SimCluster::run_on`].
    pub fn cluster(&self, name: &str) -> Option<Cluster> {
        if self.crashed.contains(name) {
            return None;
        }
        self.registry.borrow().get(name).map(|r| r.cluster.clone())
    }

    /// The bus of a running node (for what is synchronous on it: interest, buffers, subscriptions).
    pub fn bus(&self, name: &str) -> Option<Bus> {
        if self.crashed.contains(name) {
            return None;
        }
        self.registry.borrow().get(name).map(|r| r.bus.clone())
    }

    /// Runs `f` inside `node`'s host (see [`SimHandle::run_on`]) and steps the simulation until it
    /// finishes, at most `timeout` of simulated time. `Ok(None)`: the node is not running or crashed.
    pub fn run_on<T, F, Fut>(&mut self, node: &str, timeout: Duration, f: F) -> Result<Option<T>, SimError>
    where
        T: 'static,
        F: FnOnce(Cluster) -> Fut + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_with_bus(node, timeout, move |cluster, _| f(cluster))
    }

    /// As [`SimCluster::run_on`], with the node's bus too.
    pub fn run_with_bus<T, F, Fut>(&mut self, node: &str, timeout: Duration, f: F) -> Result<Option<T>, SimError>
    where
        T: 'static,
        F: FnOnce(Cluster, Bus) -> Fut + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let out: Rc<RefCell<Option<Option<T>>>> = Rc::default();
        let fut = self.handle().run_with_bus(node, f);
        let slot = out.clone();
        let mut fut = Box::pin(async move {
            *slot.borrow_mut() = Some(fut.await);
        });
        // The wrapper holds no runtime resources: poll it by hand between steps.
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        self.run_until(timeout, |_| {
            let _ = fut.as_mut().poll(&mut cx);
            out.borrow().is_some()
        })?;
        let result = out.borrow_mut().take().flatten();
        Ok(result)
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
/// Panics with the failing seed and the command that replays it (for `tests/sim.rs`).
pub fn run_seeds(name: &str, default_count: u64, scenario: impl FnMut(u64) -> Result<String, String>) {
    run_seeds_in("sim", name, default_count, scenario);
}

/// [`run_seeds`] for a scenario in the test file `tests/<test>.rs` (named in the replay command).
pub fn run_seeds_in(
    test: &str,
    name: &str,
    default_count: u64,
    mut scenario: impl FnMut(u64) -> Result<String, String>,
) {
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
                 replay: CADRE_SIM_SEED={seed} cargo test -p cadre --test {test} -- {name} --nocapture"
            ),
        }
    }
}
