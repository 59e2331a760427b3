//! Placement: which shard a key is in, and which node should own a shard.
//!
//! - Shard of a key: `xxh3_64(type ‖ 0x00 ‖ id) mod shard_count` ([`shard_of`]).
//! - Score of a node for a shard: `xxh3_64_with_seed(node_name, seed = shard)` ([`score`]); the
//!   desired owner is the live node with the highest score, ties broken by the smaller name
//!   ([`desired_owner`]). This is rendezvous (highest-random-weight) hashing: when a node joins,
//!   only the shards it now wins move (to it); when one leaves, only its shards move.
//!
//! Both use xxh3's one-shot functions, whose output is fixed by the xxHash specification: the same
//! in every version and language, so nodes of different builds agree. (`DefaultHasher` and ahash
//! are not stable and must never be used here.)
//!
//! [`plan`] is the controller's decision, sans-IO: from the metadata and the live nodes, the
//! commands to propose. The loop that runs it on the Raft leader, with the leases that say which
//! nodes are live, is in [`crate::cluster`].

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::storage::Key;

#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use crate::meta::{SHARD_COUNT_DEFAULT, SHARD_COUNT_MAX};

pub mod plan;

/// The shard of a key.
pub fn shard_of(key: &Key, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "a cluster has at least one shard");
    // An agent's reminder index entry lives in the agent's shard, which its id names.
    if let Some(shard) = crate::agent::reminders::index_shard(key, shard_count) {
        return shard;
    }
    (xxh3_64(&key.encode()) % u64::from(shard_count)) as u32
}

/// A node's rendezvous score for a shard.
pub fn score(node: &str, shard: u32) -> u64 {
    xxh3_64_with_seed(node.as_bytes(), u64::from(shard))
}

/// The node that should own `shard` among `nodes`; `None` if there are none.
pub fn desired_owner<'a>(shard: u32, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes.into_iter().max_by(|a, b| score(a, shard).cmp(&score(b, shard)).then_with(|| b.cmp(a)))
}

/// The `n` best nodes for `shard`, best first (the owner, then replicas).
pub fn ranked<'a>(shard: u32, nodes: impl IntoIterator<Item = &'a str>, n: usize) -> Vec<&'a str> {
    let mut all: Vec<&str> = nodes.into_iter().collect();
    all.sort_by(|a, b| score(b, shard).cmp(&score(a, shard)).then_with(|| a.cmp(b)));
    all.dedup();
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hashes_are_pinned() {
        // The spec's values: a change here means nodes of different builds would disagree.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(shard_of(&Key::new("counter", "c1"), 256), (xxh3_64(b"counter\0c1") % 256) as u32);
        // Cross-checked with Python's `xxhash` package (xxh3_64_intdigest).
        let shards: Vec<u32> = ["a", "b", "c"].iter().map(|id| shard_of(&Key::new("counter", *id), 256)).collect();
        assert_eq!(shards, [247, 126, 72]);
        assert_eq!(score("n1", 0), 15_506_916_534_570_490_772);
        assert_eq!(score("n2", 17), 5_844_746_639_453_817_709);
    }

    #[test]
    fn keys_spread_evenly_over_shards() {
        const KEYS: usize = 256_000;
        let mut counts = vec![0usize; 256];
        for i in 0..KEYS {
            counts[shard_of(&Key::new("order", i.to_string()), 256) as usize] += 1;
        }
        let mean = KEYS / 256;
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        // Deterministic (fixed keys, fixed hash): the spread of a good hash over 1000 per shard.
        assert!(min > mean * 85 / 100 && max < mean * 115 / 100, "min {min} max {max} mean {mean}");
    }

    #[test]
    fn shards_spread_evenly_over_nodes() {
        let nodes: Vec<String> = (1..=5).map(|i| format!("n{i}")).collect();
        let mut owned = std::collections::HashMap::new();
        for shard in 0..4096 {
            *owned.entry(desired_owner(shard, nodes.iter().map(String::as_str)).unwrap()).or_insert(0) += 1;
        }
        for n in &nodes {
            let c = owned[n.as_str()];
            assert!((650..=990).contains(&c), "{n} owns {c} of 4096");
        }
    }

    proptest! {
        /// A joining node takes only shards it now wins; nothing else moves. A leaving node's
        /// shards move; nothing else moves.
        #[test]
        fn membership_changes_move_only_what_they_must(n in 1usize..12, new in "[a-z]{1,8}", shard in 0u32..1024) {
            let nodes: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let before = desired_owner(shard, nodes.iter().map(String::as_str)).unwrap().to_string();
            let mut grown = nodes.clone();
            grown.push(new.clone());
            let after = desired_owner(shard, grown.iter().map(String::as_str)).unwrap();
            prop_assert!(after == before || after == new);
            let shrunk: Vec<&str> = nodes.iter().map(String::as_str).filter(|x| *x != before).collect();
            if let Some(next) = desired_owner(shard, shrunk.iter().copied()) {
                // The next owner was second in the ranking before.
                prop_assert_eq!(ranked(shard, nodes.iter().map(String::as_str), 2)[1], next);
            }
            prop_assert_eq!(ranked(shard, nodes.iter().map(String::as_str), 1), vec![before.as_str()]);
        }
    }

    #[test]
    fn no_nodes_no_owner() {
        assert_eq!(desired_owner(3, std::iter::empty()), None);
        assert!(ranked(3, std::iter::empty(), 2).is_empty());
    }
}
