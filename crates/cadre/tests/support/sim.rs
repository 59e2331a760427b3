//! What the agent simulations share: a seeded RNG for the tests' own choices, node names, the
//! `counter` signals, reading every key back through one node, and whether a crash is safe.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use cadre::signal::Signal;
use cadre::sim::SimCluster;
use cadre::storage::Key;
use tokio::time::Instant;

/// Counter keys the workloads use: `k0` to `k19`.
pub const KEYS: usize = 20;
/// One call of the workload or of a read.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A small deterministic RNG (splitmix64) for the test's own choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

pub fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn key(i: usize) -> Key {
    Key::new("counter", format!("k{i}"))
}

pub fn add(n: i64) -> Signal {
    Signal::new("counter.add", serde_json::json!(n))
}

pub fn get() -> Signal {
    Signal::new("counter.get", serde_json::Value::Null)
}

/// Reads every key through `via`, retrying each until it answers; fails past `bound`.
/// Returns the values and the time it took.
pub fn read_all(c: &mut SimCluster, via: &str, bound: Duration) -> Result<(Vec<i64>, Duration), String> {
    let out = c
        .run_on(via, bound + Duration::from_secs(1), move |cl| async move {
            let start = Instant::now();
            let mut values = Vec::with_capacity(KEYS);
            for k in 0..KEYS {
                loop {
                    let left = bound.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(format!("key k{k} did not answer within {bound:?}"));
                    }
                    match cl.call(&key(k), get(), left.min(CALL_TIMEOUT)).await {
                        Ok(s) => {
                            values.push(s.reply.as_i64().ok_or(format!("k{k}: not a number: {}", s.reply))?);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
            Ok((values, start.elapsed()))
        })
        .map_err(|e| format!("reading through {via}: {e}"))?;
    out.ok_or(format!("{via} is not running"))?
}

/// Whether crashing `victim` leaves the metadata group a quorum for good: at least three voters,
/// each a running node's current Raft id (a restarted node has a new id; its old one is a dead
/// voter until the leader replaces it).
pub fn crash_is_safe(c: &SimCluster, victim: &str) -> bool {
    let running = c.running();
    let mut ids = BTreeSet::new();
    let mut voters = BTreeSet::new();
    for n in &running {
        let Some(cl) = c.cluster(n) else { return false };
        ids.insert(cl.raft_id());
        let m = cl.raft().metrics().borrow().clone();
        voters.extend(m.membership_config.membership().voter_ids());
    }
    let Some(victim_id) = c.cluster(victim).map(|cl| cl.raft_id()) else { return false };
    voters.len() >= 3 && voters.iter().all(|v| ids.contains(v)) && running.len() > 1 && ids.contains(&victim_id)
}
