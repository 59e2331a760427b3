//! Cluster scenarios in deterministic simulation, each over many seeds.
//! A failure prints the seed and the command that replays it.

use std::time::Duration;

use cadre::membership::MemberState;
use cadre::sim::{run_seeds, SimCluster, SimNode};

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Simulated time allowed for a cluster to form.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Target: a crashed node is `down` in every other view within this time.
const CRASH_DETECT_MAX: Duration = Duration::from_millis(1500);
/// Target: a partition is seen on both sides within this time.
const PARTITION_DETECT_MAX: Duration = Duration::from_millis(1500);

#[test]
fn five_nodes_converge() {
    run_seeds("five_nodes_converge", 50, |seed| {
        let mut c = SimCluster::new(5, seed);
        let all = names(5);
        let t = c.run_until(CONVERGE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| e.to_string())?;
        // Stable: still converged a while later.
        c.run_for(Duration::from_secs(2)).map_err(|e| e.to_string())?;
        if !c.all_see_alive(&all, &all) {
            return Err("views diverged after converging".into());
        }
        Ok(format!("converged in {t:?}"))
    });
}

#[test]
fn crash_is_detected_by_all_within_target() {
    run_seeds("crash_is_detected_by_all_within_target", 50, |seed| {
        let mut c = SimCluster::new(5, seed);
        let all = names(5);
        c.run_until(CONVERGE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| e.to_string())?;
        c.run_for(Duration::from_millis(500)).map_err(|e| e.to_string())?;
        let victim = format!("n{}", 1 + seed % 5);
        c.crash(&victim);
        let others: Vec<String> = all.iter().filter(|n| **n != victim).cloned().collect();
        let t = c
            .run_until(Duration::from_secs(10), |c| c.all_see(&others, &victim, &[MemberState::Down]))
            .map_err(|e| format!("{victim} not seen down: {e}"))?;
        if t > CRASH_DETECT_MAX {
            return Err(format!("crash of {victim} detected by all after {t:?} (> {CRASH_DETECT_MAX:?})"));
        }
        // It comes back as a new incarnation and everyone sees it alive again.
        c.restart(&victim);
        c.run_until(CONVERGE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| format!("after restart: {e}"))?;
        Ok(format!("{victim} detected in {t:?}"))
    });
}

#[test]
fn partition_is_detected_on_both_sides_and_heals() {
    run_seeds("partition_is_detected_on_both_sides_and_heals", 50, |seed| {
        let mut c = SimCluster::new(5, seed);
        let all = names(5);
        c.run_until(CONVERGE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| e.to_string())?;
        let (a, b) = (names(5)[..3].to_vec(), names(5)[3..].to_vec());
        c.partition(&strs(&a), &strs(&b));
        let t = c
            .run_until(Duration::from_secs(10), |c| c.all_see_alive(&a, &a) && c.all_see_alive(&b, &b))
            .map_err(|e| format!("partition not detected: {e}"))?;
        if t > PARTITION_DETECT_MAX {
            return Err(format!("partition detected after {t:?} (> {PARTITION_DETECT_MAX:?})"));
        }
        c.repair(&strs(&a), &strs(&b));
        let heal = c
            .run_until(Duration::from_secs(30), |c| c.all_see_alive(&all, &all))
            .map_err(|e| format!("did not re-converge after repair: {e}"))?;
        Ok(format!("detected in {t:?}, healed in {heal:?}"))
    });
}

#[test]
fn wrong_secret_never_becomes_a_member() {
    run_seeds("wrong_secret_never_becomes_a_member", 50, |seed| {
        let mut c = SimCluster::new(3, seed);
        c.add_node(SimNode { name: "intruder".into(), secret: "not-the-secret-at-all".into(), seeds: names(3) });
        let all = names(3);
        let mut seen = false;
        c.run_until(CONVERGE_TIMEOUT, |c| c.all_see_alive(&all, &all)).map_err(|e| e.to_string())?;
        c.run_until(Duration::from_secs(3), |c| {
            seen |= all.iter().any(|n| c.view(n).is_some_and(|v| v.state_of("intruder").is_some()));
            false
        })
        .ok();
        if seen {
            return Err("intruder appeared in a member list".into());
        }
        match c.view("intruder") {
            Some(v) if v.joined || v.members.len() > 1 => {
                Err(format!("intruder joined: {:?}", v.names(MemberState::Alive)))
            }
            _ => Ok(String::new()),
        }
    });
}

#[test]
fn hundred_nodes_converge() {
    run_seeds("hundred_nodes_converge", 3, |seed| {
        let mut c = SimCluster::new(100, seed);
        let all = names(100);
        let t = c.run_until(Duration::from_secs(30), |c| c.all_see_alive(&all, &all)).map_err(|e| e.to_string())?;
        Ok(format!("100 nodes converged in {t:?} of simulated time"))
    });
}

/// One run's observable trace: per step of 10 ms, every node's view (state and incarnation).
fn trace_of(seed: u64) -> Vec<String> {
    let mut c = SimCluster::new(5, seed);
    let mut trace = Vec::new();
    let mut record = |c: &SimCluster| {
        let mut line = format!("{:?}", c.elapsed());
        for n in c.running() {
            if let Some(v) = c.view(&n) {
                for m in v.members {
                    line.push_str(&format!(" {n}:{}={}@{}", m.meta.name, m.state.as_str(), m.meta.incarnation));
                }
            }
        }
        trace.push(line);
    };
    for step in 0..300 {
        if step == 100 {
            c.crash("n4");
        }
        if step == 200 {
            c.restart("n4");
        }
        c.run_for(Duration::from_millis(10)).unwrap();
        record(&c);
    }
    trace
}

#[test]
fn a_seed_replays_exactly() {
    let a = trace_of(42);
    let b = trace_of(42);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "runs of the same seed diverged");
    }
    assert_ne!(trace_of(43), a, "different seeds should give different runs");
}
