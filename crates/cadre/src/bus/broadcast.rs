//! The broadcast tree: who sends a signal addressed to all nodes to whom.
//!
//! A sender holding a list of nodes still to reach splits it into at most `fanout` contiguous,
//! nearly equal chunks and sends to the first node of each chunk, handing it the rest of its chunk
//! to reach in turn. So no node sends more than `fanout` copies, and the list shrinks by a factor
//! of `fanout` per level: n nodes are all reached in at most ⌈log_fanout n⌉ + 1 hops (checked for
//! n up to 300, and some up to 2000, with fanouts 2 to 8, below).
//!
//! Around unreachable nodes: when a node cannot reach a chunk's first node, it takes that node's
//! share over itself (plans the rest of the chunk again), so one dead node costs its own copy,
//! not its subtree's. (The IO is in [`super::remote`]; this is the plan alone.)

/// One send of the plan: to `to`, which then reaches `rest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub to: String,
    pub rest: Vec<String>,
}

/// Splits `targets` into at most `fanout` hops.
pub fn plan(targets: &[String], fanout: usize) -> Vec<Hop> {
    assert!(fanout >= 1, "a broadcast fanout of 0 reaches nobody");
    if targets.is_empty() {
        return Vec::new();
    }
    let chunks = fanout.min(targets.len());
    let (size, extra) = (targets.len() / chunks, targets.len() % chunks);
    let mut hops = Vec::with_capacity(chunks);
    let mut start = 0;
    for i in 0..chunks {
        let len = size + usize::from(i < extra);
        let chunk = &targets[start..start + len];
        hops.push(Hop { to: chunk[0].clone(), rest: chunk[1..].to_vec() });
        start += len;
    }
    debug_assert_eq!(start, targets.len());
    hops
}

/// ⌈log_fanout n⌉ + 1: the most hops a broadcast to `n` other nodes may take.
#[cfg(any(test, feature = "testing"))]
pub fn depth_bound(n: usize, fanout: usize) -> u32 {
    if n == 0 {
        return 0;
    }
    let (mut reach, mut log) = (1usize, 0u32);
    while reach < n {
        reach = reach.saturating_mul(fanout.max(2));
        log += 1;
    }
    log + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i:04}")).collect()
    }

    /// Follows the plan from the root: (nodes reached, most sends by one node, depth).
    fn walk(targets: &[String], fanout: usize) -> (BTreeSet<String>, usize, u32) {
        let mut reached = BTreeSet::new();
        let (mut sends_max, mut depth) = (0, 0);
        let mut level = vec![targets.to_vec()];
        while level.iter().any(|r| !r.is_empty()) {
            depth += 1;
            let mut next = Vec::new();
            for rest in level {
                let hops = plan(&rest, fanout);
                sends_max = sends_max.max(hops.len());
                for h in hops {
                    assert!(reached.insert(h.to.clone()), "{} reached twice", h.to);
                    next.push(h.rest);
                }
            }
            level = next;
        }
        (reached, sends_max, depth)
    }

    #[test]
    fn every_node_is_reached_once_within_fanout_and_depth() {
        let sizes = (0..=300).chain([511, 512, 513, 1000, 1024, 1025, 2000]);
        for n in sizes {
            let targets = nodes(n);
            for fanout in 2..=8 {
                let (reached, sends_max, depth) = walk(&targets, fanout);
                assert_eq!(reached.len(), n, "n {n} fanout {fanout}");
                assert!(sends_max <= fanout, "n {n} fanout {fanout}: {sends_max} sends");
                assert!(depth <= depth_bound(n, fanout), "n {n} fanout {fanout}: depth {depth}");
            }
        }
        // Fanout 1 is a chain.
        assert_eq!(walk(&nodes(5), 1).2, 5);
    }

    #[test]
    fn a_hundred_nodes_with_fanout_four_take_four_hops() {
        let (reached, sends_max, depth) = walk(&nodes(100), 4);
        assert_eq!((reached.len(), sends_max, depth), (100, 4, 4));
        assert_eq!(depth_bound(100, 4), 5);
        let hops = plan(&nodes(10), 4);
        let sizes: Vec<usize> = hops.iter().map(|h| 1 + h.rest.len()).collect();
        assert_eq!(sizes, [3, 3, 2, 2], "nearly equal chunks");
    }
}
