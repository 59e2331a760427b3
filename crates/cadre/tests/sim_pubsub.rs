//! Cluster pub/sub in deterministic simulation, over several seeds: five nodes, each with one
//! subscription to `evt.**`; a client publishes through random nodes (`eventual` mostly, `strong`
//! one in four) while the cluster is partitioned 2 | 3 and healed.
//!
//! Checks: (a) after the heal, every acknowledged signal reaches every node's subscription exactly
//! once, within [`DELIVERY_BOUND`]; (b) nothing is delivered twice, and nothing that was not
//! published; (c) from each publisher to each subscriber, signals arrive in publish order; (d)
//! every publish ends (none hangs): `strong` publishes on the minority side, once it sees the
//! partition, fail with `StrongUnmet`, and those on the majority side succeed. A failure prints
//! its seed and the command that replays it.
//!
//! Also: a route to agents added while one node is cut off answers naming that node as
//! unconfirmed, which mirrors the route once healed; one added with every node reachable answers
//! only once every node mirrors it.

#[path = "support/sim.rs"]
mod simkit;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use cadre::bus::{Delivery, Dispatch, PublishError, SubscriptionSpec};
use cadre::config::PubsubConfig;
use cadre::membership::MemberState;
use cadre::meta::{AgentRoute, AgentTarget};
use cadre::signal::Signal;
use cadre::sim::{run_seeds_in, SimCluster, SimNode, SIM_SECRET};
use simkit::{names, strs, Rng};

const NODES: usize = 5;
const PUBLISH_EVERY: Duration = Duration::from_millis(40);
/// A `strong` publish waits this long for a majority (the nodes' `strong_timeout_ms`).
const STRONG_TIMEOUT: Duration = Duration::from_secs(2);
/// After the heal, every acknowledged signal must be everywhere within this much simulated time.
const DELIVERY_BOUND: Duration = Duration::from_secs(30);
/// Time a fresh cluster has to converge (membership and interest).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What each node's subscription received, in order: (receiver, signal id).
type Received = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

#[derive(Debug, Clone)]
enum Outcome {
    Pending,
    Acked,
    Failed(PublishError),
    /// The node was not running.
    Lost,
}

#[derive(Debug, Clone)]
struct Publish {
    id: String,
    via: String,
    level: Delivery,
    sent: Duration,
    outcome: Outcome,
}

fn cluster(seed: u64) -> SimCluster {
    cluster_of(NODES, seed)
}

fn cluster_of(n: usize, seed: u64) -> SimCluster {
    let mut c = SimCluster::empty(seed);
    let all = names(n);
    for (i, name) in all.iter().enumerate() {
        let seeds = if i == 0 { vec![] } else { vec![all[0].clone()] };
        let node = SimNode { name: name.clone(), secret: SIM_SECRET.into(), seeds };
        c.add_node_with(node, |cfg, _, _| {
            cfg.pubsub = PubsubConfig {
                strong_timeout_ms: STRONG_TIMEOUT.as_millis() as u64,
                ack_timeout_ms: 1000,
                ..PubsubConfig::default()
            };
        });
    }
    c
}

fn subscribe_all(c: &mut SimCluster, received: &Received) -> Result<(), String> {
    subscribe_each(c, &names(NODES), "evt.**", received)
}

fn subscribe_each(c: &mut SimCluster, nodes: &[String], pattern: &str, received: &Received) -> Result<(), String> {
    for name in nodes {
        let pattern = pattern.to_string();
        let (log, me) = (received.clone(), name.clone());
        let record = Dispatch::function(move |s: Arc<Signal>| {
            log.lock().unwrap().entry(me.clone()).or_default().push(s.id.clone());
            futures::future::ready(Ok(()))
        });
        let done = c
            .run_with_bus(name, Duration::from_secs(1), move |_, bus| async move {
                bus.subscribe_detached(SubscriptionSpec::new(pattern, record)).map(|_| ())
            })
            .map_err(|e| e.to_string())?;
        done.ok_or(format!("{name} not running"))?.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every node sees every other interested in `evt.x`.
fn interest_converged(c: &SimCluster) -> bool {
    names(NODES).iter().all(|n| c.bus(n).is_some_and(|b| b.remote_nodes_for("evt.x").len() == NODES - 1))
}

/// Publishes through a random running node every [`PUBLISH_EVERY`] until `stop`; `done` once
/// every publish has an outcome.
fn start_load(
    c: &mut SimCluster,
    seed: u64,
    log: Rc<RefCell<Vec<Publish>>>,
    stop: Rc<Cell<bool>>,
    done: Rc<Cell<bool>>,
) {
    let h = c.handle();
    c.client("publisher", async move {
        let mut rng = Rng::new(seed.wrapping_add(7));
        let tracker = TaskTracker::new();
        let mut seq: BTreeMap<String, usize> = BTreeMap::new();
        while !stop.get() {
            tokio::time::sleep(PUBLISH_EVERY).await;
            let nodes = h.running();
            let via = nodes[rng.below(nodes.len())].clone();
            let n = seq.entry(via.clone()).or_default();
            *n += 1;
            // Ids sort in publish order per publisher.
            let id = format!("{via}-{:06}", *n);
            let level = if rng.below(4) == 0 { Delivery::Strong } else { Delivery::Eventual };
            let sent = turmoil::sim_elapsed().unwrap_or_default();
            let i = {
                let mut log = log.borrow_mut();
                log.push(Publish { id: id.clone(), via: via.clone(), level, sent, outcome: Outcome::Pending });
                log.len() - 1
            };
            let mut signal = Signal::new("evt.x", serde_json::json!(i));
            signal.id = id;
            let fut = h.run_with_bus(&via, move |_, bus| async move { bus.publish_with(signal, level).await });
            let log = log.clone();
            tracker.spawn_local(async move {
                let outcome = match fut.await {
                    None => Outcome::Lost,
                    Some(Ok(_)) => Outcome::Acked,
                    Some(Err(e)) => Outcome::Failed(e),
                };
                log.borrow_mut()[i].outcome = outcome;
            });
        }
        tracker.close();
        tracker.wait().await;
        done.set(true);
        Ok(())
    });
}

fn scenario(seed: u64) -> Result<String, String> {
    let mut c = cluster(seed);
    let all = names(NODES);
    c.run_until(SETTLE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| format!("membership: {e}"))?;
    let received = Received::default();
    subscribe_all(&mut c, &received)?;
    c.run_until(SETTLE_TIMEOUT, interest_converged).map_err(|e| format!("interest map: {e}"))?;

    let (log, stop, done) = (Rc::new(RefCell::new(Vec::new())), Rc::new(Cell::new(false)), Rc::new(Cell::new(false)));
    start_load(&mut c, seed, log.clone(), stop.clone(), done.clone());
    c.run_for(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    let (minority, majority) = (all[..2].to_vec(), all[2..].to_vec());
    c.partition(&strs(&minority), &strs(&majority));
    let cut_at = c.elapsed();
    // Both sides see the cut (the minority's strong publishes can only fail once they do).
    let seen = |c: &SimCluster| {
        majority.iter().all(|m| c.all_see(&minority, m, &[MemberState::Down]))
            && minority.iter().all(|m| c.all_see(&majority, m, &[MemberState::Down]))
    };
    c.run_until(Duration::from_secs(10), seen).map_err(|e| format!("partition not seen: {e}"))?;
    let seen_at = c.elapsed();
    c.run_for(STRONG_TIMEOUT * 3).map_err(|e| e.to_string())?;
    c.repair(&strs(&minority), &strs(&majority));
    let healed_at = c.elapsed();
    // What was acknowledged before the heal (much of it buffered across the cut) arrives.
    let before: Vec<String> =
        log.borrow().iter().filter(|p| matches!(p.outcome, Outcome::Acked)).map(|p| p.id.clone()).collect();
    let flushed = |_: &SimCluster| {
        let got = received.lock().unwrap();
        all.iter().all(|n| {
            let ids: BTreeSet<&String> = got.get(n).map(|v| v.iter().collect()).unwrap_or_default();
            before.iter().all(|id| ids.contains(id))
        })
    };
    let flush_time =
        c.run_until(DELIVERY_BOUND, flushed).map_err(|e| format!("(a) not flushed after the heal: {e}"))?;
    stop.set(true);
    let publish_bound = STRONG_TIMEOUT * 2;
    c.run_until(publish_bound, |_| done.get()).map_err(|e| format!("(d) publishes still pending: {e}"))?;

    let log = log.borrow().clone();
    let acked: Vec<&Publish> = log.iter().filter(|p| matches!(p.outcome, Outcome::Acked)).collect();
    let everywhere = |_: &SimCluster| {
        let got = received.lock().unwrap();
        all.iter().all(|n| {
            let ids: BTreeSet<&String> = got.get(n).map(|v| v.iter().collect()).unwrap_or_default();
            acked.iter().all(|p| ids.contains(&p.id))
        })
    };
    let delivered = c.run_until(DELIVERY_BOUND, everywhere);
    let got = received.lock().unwrap().clone();
    let missing: Vec<(String, usize)> = all
        .iter()
        .map(|n| {
            let ids: BTreeSet<&String> = got.get(n).map(|v| v.iter().collect()).unwrap_or_default();
            (n.clone(), acked.iter().filter(|p| !ids.contains(&p.id)).count())
        })
        .collect();
    delivered
        .map_err(|e| format!("(a) acknowledged signals missing after the heal (node, count): {missing:?}: {e}"))?;

    check_deliveries(&log, &got)?;
    check_strong(&log, &minority, seen_at, healed_at)?;
    let strong_ok = log.iter().filter(|p| p.level == Delivery::Strong && matches!(p.outcome, Outcome::Acked)).count();
    let strong_failed =
        log.iter().filter(|p| matches!(p.outcome, Outcome::Failed(PublishError::StrongUnmet { .. }))).count();
    Ok(format!(
        "{} publishes ({} acknowledged; strong: {strong_ok} met, {strong_failed} unmet); cut at {:?}, seen after {:?}; \
         the {} acknowledged before the heal on every node {:?} after it",
        log.len(),
        acked.len(),
        cut_at,
        seen_at - cut_at,
        before.len(),
        flush_time
    ))
}

/// (b) no duplicates and nothing unpublished; (c) per publisher, in publish order.
fn check_deliveries(log: &[Publish], got: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
    let published: BTreeMap<&str, &Publish> = log.iter().map(|p| (p.id.as_str(), p)).collect();
    for (node, ids) in got {
        let mut seen = BTreeSet::new();
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(format!("(b) {node} received {id} twice"));
            }
            let Some(p) = published.get(id.as_str()) else {
                return Err(format!("(b) {node} received {id}, never published"));
            };
            if let Some(prev) = last.insert(p.via.as_str(), id.as_str()) {
                if prev > id.as_str() {
                    return Err(format!("(c) {node} received {id} after {prev} (both from {})", p.via));
                }
            }
        }
    }
    Ok(())
}

/// (d) strong publishes: on the minority side while it sees the cut, unmet; on the majority
/// side, met. Nothing else fails.
fn check_strong(log: &[Publish], minority: &[String], seen_at: Duration, healed_at: Duration) -> Result<(), String> {
    let mut majority_met = 0;
    for p in log {
        let cut = p.sent >= seen_at && p.sent + STRONG_TIMEOUT < healed_at;
        let on_minority = minority.contains(&p.via);
        match (&p.outcome, p.level) {
            (Outcome::Pending, _) => return Err(format!("(d) {} never ended", p.id)),
            (Outcome::Failed(PublishError::StrongUnmet { .. }), Delivery::Strong) if cut && on_minority => {}
            (Outcome::Acked, Delivery::Strong) if cut && on_minority => {
                return Err(format!("(d) strong {} met on the minority side during the cut", p.id));
            }
            (Outcome::Acked, Delivery::Strong) if cut => majority_met += 1,
            (Outcome::Acked, _) => {}
            // Around the cut's edges a strong publish may go either way.
            (Outcome::Failed(PublishError::StrongUnmet { .. }), Delivery::Strong) if !cut => {}
            (other, level) => return Err(format!("(d) {} ({level:?} via {}) ended {other:?}", p.id, p.via)),
        }
    }
    if majority_met == 0 {
        return Err("(d) no strong publish on the majority side met during the cut".into());
    }
    Ok(())
}

/// Nodes of the broadcast scenario, and their fanout.
const BROADCAST_NODES: usize = 100;
const FANOUT: usize = 4;

/// Waits until every node in `nodes` received the signal `id`.
fn await_everywhere(c: &mut SimCluster, nodes: &[String], id: &str, received: &Received) -> Result<Duration, String> {
    let reached = |_: &SimCluster| {
        let got = received.lock().unwrap();
        nodes.iter().all(|n| got.get(n).is_some_and(|ids| ids.iter().any(|x| x == id)))
    };
    c.run_until(Duration::from_secs(10), reached).map_err(|e| {
        let got = received.lock().unwrap();
        let missing: Vec<&String> =
            nodes.iter().filter(|n| !got.get(*n).is_some_and(|ids| ids.iter().any(|x| x == id))).collect();
        format!("{id} did not reach {missing:?}: {e}")
    })
}

fn broadcast_from(c: &mut SimCluster, via: &str, id: &str) -> Result<usize, String> {
    let mut signal = Signal::new("cache.invalidate", serde_json::json!({"key": "k"}));
    signal.id = id.to_string();
    let published = c
        .run_with_bus(via, Duration::from_secs(10), move |_, bus| async move { bus.broadcast(signal).await })
        .map_err(|e| e.to_string())?
        .ok_or(format!("{via} not running"))?
        .map_err(|e| e.to_string())?;
    Ok(published.remote_nodes)
}

/// 100 nodes: a broadcast reaches all, no node sends more than the fanout, within the depth
/// bound; then, with the root cut off from its first hops (not yet seen down), the others are
/// still reached around them.
fn broadcast_scenario(seed: u64) -> Result<String, String> {
    let mut c = cluster_of(BROADCAST_NODES, seed);
    let all = names(BROADCAST_NODES);
    c.run_until(Duration::from_secs(30), |c| c.all_see_alive(&all, &all)).map_err(|e| format!("membership: {e}"))?;
    let received = Received::default();
    subscribe_each(&mut c, &all, "cache.*", &received)?;
    let root = &all[0];
    let n = broadcast_from(&mut c, root, "b-1")?;
    if n != BROADCAST_NODES - 1 {
        return Err(format!("broadcast for {n} nodes, not {}", BROADCAST_NODES - 1));
    }
    let took = await_everywhere(&mut c, &all, "b-1", &received)?;
    let stats: Vec<(String, cadre::bus::remote::BroadcastStats)> =
        all.iter().map(|n| (n.clone(), c.bus(n).map(|b| b.broadcast_stats()).unwrap_or_default())).collect();
    let sends_max = stats.iter().map(|(_, s)| s.sent).max().unwrap_or(0);
    let depth = stats.iter().map(|(_, s)| s.depth_max).max().unwrap_or(0);
    let bound = cadre::bus::broadcast::depth_bound(BROADCAST_NODES - 1, FANOUT);
    if sends_max > FANOUT as u64 {
        let over: Vec<_> = stats.iter().filter(|(_, s)| s.sent > FANOUT as u64).collect();
        return Err(format!("nodes sent more than the fanout {FANOUT}: {over:?}"));
    }
    if depth > bound {
        return Err(format!("depth {depth} over the bound {bound}"));
    }
    let total: u64 = stats.iter().map(|(_, s)| s.sent).sum();
    if total != (BROADCAST_NODES - 1) as u64 {
        return Err(format!("{total} copies sent for {} nodes", BROADCAST_NODES - 1));
    }

    // The root is cut off from its first hops; nobody has noticed yet. (The tree is planned over
    // the names in order.)
    let mut others: Vec<String> = all[1..].to_vec();
    others.sort();
    let first: Vec<String> = cadre::bus::broadcast::plan(&others, FANOUT).into_iter().map(|h| h.to).collect();
    c.partition(&[root.as_str()], &strs(&first));
    let before = c.bus(root).map(|b| b.broadcast_stats()).unwrap_or_default();
    broadcast_from(&mut c, root, "b-2")?;
    let live: Vec<String> = all.iter().filter(|n| !first.contains(n)).cloned().collect();
    let rerouted_took = await_everywhere(&mut c, &live, "b-2", &received)?;
    let after = c.bus(root).map(|b| b.broadcast_stats()).unwrap_or_default();
    let rerouted = after.rerouted - before.rerouted;
    if rerouted < first.len() as u64 {
        return Err(format!(
            "the root rerouted {rerouted} hops, not its dead first hops {first:?}: {before:?} -> {after:?}"
        ));
    }
    Ok(format!(
        "{BROADCAST_NODES} nodes reached in {took:?}: {total} copies, at most {sends_max} per node, depth {depth} \
         (bound {bound}); with the {} first hops cut off, the other {} reached in {rerouted_took:?}",
        first.len(),
        live.len()
    ))
}

/// Adds a route to counters for `pattern` through `via`; its id and the unconfirmed members.
fn add_route(c: &mut SimCluster, via: &str, pattern: &str) -> Result<(u64, Vec<String>), String> {
    let route = AgentRoute {
        pattern: pattern.into(),
        target: AgentTarget::Agent { ty: "counter".into(), key: "subject".into() },
    };
    let added = c
        .run_with_bus(via, Duration::from_secs(10), move |_, bus| async move {
            bus.add_route(route, Duration::from_secs(3)).await
        })
        .map_err(|e| e.to_string())?
        .ok_or(format!("{via} not running"))?
        .map_err(|e| e.to_string())?;
    Ok((added.id, added.unconfirmed))
}

/// Every node serving (a lease: admitted, with the table) and seeing every other alive.
fn settled(c: &SimCluster, nodes: &[String]) -> bool {
    nodes.iter().all(|n| {
        c.cluster(n).is_some_and(|cl| cl.lease_valid())
            && c.view(n).is_some_and(|v| v.members.iter().filter(|m| m.state.is_active()).count() == nodes.len())
    })
}

fn route_scenario(seed: u64) -> Result<String, String> {
    let nodes = names(3);
    let mut c = cluster_of(3, seed);
    c.run_until(SETTLE_TIMEOUT, |c| settled(c, &nodes)).map_err(|e| format!("not settled: {e}"))?;
    // n3 cut off: still alive in the others' views for a while, but it cannot confirm.
    c.partition(&["n3"], &["n1", "n2"]);
    let (cut_route, unconfirmed) = add_route(&mut c, "n1", "cut.*")?;
    if unconfirmed != ["n3"] {
        return Err(format!("with n3 cut off, unconfirmed: {unconfirmed:?}"));
    }
    for n in ["n1", "n2"] {
        if !c.bus(n).is_some_and(|b| b.mirrors(cut_route)) {
            return Err(format!("{n} does not mirror the route when add_route answers"));
        }
    }
    c.repair(&["n3"], &["n1", "n2"]);
    let healed = c
        .run_until(SETTLE_TIMEOUT, |c| c.bus("n3").is_some_and(|b| b.mirrors(cut_route)))
        .map_err(|e| format!("n3 never mirrored the route after the heal: {e}"))?;
    // All reachable: the answer comes once every node mirrors the route.
    c.run_until(SETTLE_TIMEOUT, |c| settled(c, &nodes)).map_err(|e| format!("not settled after the heal: {e}"))?;
    let (route, unconfirmed) = add_route(&mut c, "n2", "all.*")?;
    if !unconfirmed.is_empty() {
        return Err(format!("all reachable, unconfirmed: {unconfirmed:?}"));
    }
    for n in &nodes {
        if !c.bus(n).is_some_and(|b| b.mirrors(route)) {
            return Err(format!("{n} does not mirror the route when add_route answers"));
        }
    }
    Ok(format!("n3 mirrored the route added while it was cut off {healed:?} after the heal"))
}

#[test]
fn a_route_answers_once_every_reachable_member_mirrors_it_and_names_the_others() {
    run_seeds_in(
        "sim_pubsub",
        "a_route_answers_once_every_reachable_member_mirrors_it_and_names_the_others",
        4,
        route_scenario,
    );
}

#[test]
fn a_broadcast_reaches_a_hundred_nodes_within_fanout_and_depth_and_around_unreachable_ones() {
    run_seeds_in(
        "sim_pubsub",
        "a_broadcast_reaches_a_hundred_nodes_within_fanout_and_depth_and_around_unreachable_ones",
        1,
        broadcast_scenario,
    );
}

#[test]
fn acknowledged_signals_reach_every_subscriber_once_in_order_after_a_partition_heals() {
    run_seeds_in(
        "sim_pubsub",
        "acknowledged_signals_reach_every_subscriber_once_in_order_after_a_partition_heals",
        6,
        scenario,
    );
}
