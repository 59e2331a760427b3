//! The placement controller's decision, as a pure function of the metadata and the live nodes.
//!
//! [`plan`] returns the commands to propose, each compare-and-set on the epoch it saw:
//! 1. every shard without an owner, or whose owner is not live (its lease expired: the caller
//!    decides liveness), is assigned at once to its desired owner among the live nodes;
//! 2. then, conservatively, at most `moves_max` active shards whose live owner is not the desired
//!    one start a planned move to it (`BeginMove`; the hand-off and `CompleteMove` follow).
//!
//! Members marked `draining` (leaving gracefully) get no shards: desired owners are chosen among
//! the other live members, and the shards a live draining member owns all start a planned move at
//! once (not capped), so it can leave without losing state. With no other live member, a draining
//! one is treated as any other.
//!
//! Shards already moving are left alone. Planning again after the commands are applied gives
//! nothing new once every shard is with its desired owner (property-tested).
//!
//! ## Replicas ([`Copies::Replicated`])
//! Each shard wants `factor` nodes: the first `factor` live staying nodes by rendezvous score,
//! the owner first. The plan adds the missing ones as replicas (the owner catches them up), drops
//! dead ones, and moves the shard only to an in-sync replica (so a move copies nothing). Extra
//! replicas (an old owner, a node that left the ranking) are dropped once the wanted ones are in
//! sync. A shard whose owner died goes to its best live in-sync replica ([`Cmd::Promote`]); with
//! none, it waits for a node that holds its acknowledged writes to come back (unless the shard
//! never had an owner, or `factor` is 1).

use super::{desired_owner, ranked};
use crate::meta::{Cmd, MetaState, ShardEntry, ShardState};

/// How shards keep their state, as the plan needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// Every node sees the same store: a move needs no copy, a dead owner's shards go anywhere.
    Shared,
    /// Node-local stores with replicas; `factor` nodes per shard (0: 2, or 3 from 3 members on).
    Replicated { factor: u32 },
}

impl Copies {
    /// Nodes per shard, owner included, with `targets` nodes to place on.
    fn factor(self, targets: usize) -> usize {
        match self {
            Copies::Shared => 1,
            Copies::Replicated { factor: 0 } => (if targets >= 3 { 3 } else { 2 }).min(targets),
            Copies::Replicated { factor } => (factor as usize).min(targets),
        }
    }
}

pub fn plan(state: &MetaState, live: &[&str], moves_max: usize, copies: Copies) -> Vec<Cmd> {
    let mut out = Vec::new();
    let live_members: Vec<&str> = live.iter().copied().filter(|n| state.members.contains_key(*n)).collect();
    let staying: Vec<&str> = live_members.iter().copied().filter(|n| !state.members[*n].draining).collect();
    let targets = if staying.is_empty() { &live_members } else { &staying };
    if targets.is_empty() {
        return out;
    }
    let factor = copies.factor(targets.len()).max(1);
    let mut moves = 0;
    for (shard, e) in state.shards.iter().enumerate() {
        let shard = shard as u32;
        let desired = ranked(shard, targets.iter().copied(), factor);
        let owner_live = e.owner.as_deref().is_some_and(|o| live_members.contains(&o));
        if !owner_live {
            out.extend(reassign(shard, e, &live_members, targets, copies));
            continue;
        }
        if copies != Copies::Shared {
            out.extend(replica_changes(shard, e, &live_members, &desired));
        }
        let owner_leaving = e.owner.as_deref().is_some_and(|o| !targets.contains(&o));
        let target_ready = copies == Copies::Shared || e.in_sync(desired[0]);
        if e.state == ShardState::Active
            && e.owner.as_deref() != Some(desired[0])
            && target_ready
            && (owner_leaving || moves < moves_max)
        {
            moves += usize::from(!owner_leaving);
            out.push(Cmd::BeginMove { shard, to: desired[0].to_string(), expected_epoch: e.epoch });
        }
    }
    out
}

/// A shard whose owner is gone (or that never had one).
fn reassign(shard: u32, e: &ShardEntry, live: &[&str], targets: &[&str], copies: Copies) -> Option<Cmd> {
    let expected_epoch = e.epoch;
    // A live in-sync replica holds every acknowledged write: promote the best ranked one.
    let in_sync: Vec<&str> =
        e.replicas.iter().filter(|r| r.in_sync && live.contains(&r.node.as_str())).map(|r| r.node.as_str()).collect();
    let preferred: Vec<&str> = in_sync.iter().copied().filter(|n| targets.contains(n)).collect();
    let pool = if preferred.is_empty() { &in_sync } else { &preferred };
    if let Some(to) = desired_owner(shard, pool.iter().copied()) {
        return Some(Cmd::Promote { shard, to: to.to_string(), expected_epoch });
    }
    // Acknowledged writes live only on dead nodes: wait for one of them, unless the shard never
    // had an owner or one copy was asked for (whatever the number of live nodes now).
    let replicated = matches!(copies, Copies::Replicated { factor } if factor != 1);
    if replicated && e.epoch > 0 {
        return None;
    }
    let owner = desired_owner(shard, targets.iter().copied())?.to_string();
    Some(Cmd::Assign { shard, owner, expected_epoch })
}

/// Replica set changes toward `desired` (owner first) for a shard with a live owner.
fn replica_changes(shard: u32, e: &ShardEntry, live: &[&str], desired: &[&str]) -> Vec<Cmd> {
    let mut out = Vec::new();
    let expected_epoch = e.epoch;
    let moving_to = match &e.state {
        ShardState::Moving { to } => Some(to.as_str()),
        _ => None,
    };
    let owner = e.owner.as_deref();
    for r in &e.replicas {
        // Dead: drop it (not the target of a move in progress; the move is aborted first).
        if !live.contains(&r.node.as_str()) && moving_to != Some(r.node.as_str()) {
            out.push(Cmd::DropReplica { shard, node: r.node.clone(), expected_epoch });
        }
    }
    for d in desired.iter().copied().filter(|d| Some(*d) != owner && e.replica(d).is_none()) {
        out.push(Cmd::AddReplica { shard, node: d.to_string(), expected_epoch });
    }
    // Extra copies go once the desired ones are all in sync with the desired owner.
    let settled = owner == Some(desired[0]) && desired[1..].iter().all(|d| e.in_sync(d)) && moving_to.is_none();
    if settled {
        for r in e.replicas.iter().filter(|r| !desired.contains(&r.node.as_str()) && live.contains(&r.node.as_str())) {
            out.push(Cmd::DropReplica { shard, node: r.node.clone(), expected_epoch });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cluster(shards: u32, members: &[&str]) -> MetaState {
        let mut s = MetaState::default();
        s.apply(&Cmd::Init { shard_count: shards }).unwrap();
        for m in members {
            s.apply(&Cmd::Admit { name: m.to_string(), addr: format!("{m}:1"), raft_id: 0 }).unwrap();
        }
        s
    }

    /// Applies a plan, completing every move it starts (as hand-offs would), then catches up
    /// every replica (as owners would).
    fn apply_all(s: &mut MetaState, cmds: &[Cmd]) {
        for c in cmds {
            s.apply(c).unwrap();
            if let Cmd::BeginMove { shard, expected_epoch, .. } = c {
                s.apply(&Cmd::CompleteMove { shard: *shard, expected_epoch: *expected_epoch }).unwrap();
            }
        }
        let behind: Vec<Cmd> = s
            .shards
            .iter()
            .enumerate()
            .flat_map(|(shard, e)| {
                e.replicas.iter().filter(|r| !r.in_sync).map(move |r| Cmd::ReplicaSynced {
                    shard: shard as u32,
                    node: r.node.clone(),
                    expected_epoch: e.epoch,
                    generation: r.generation,
                })
            })
            .collect();
        for c in &behind {
            s.apply(c).unwrap();
        }
    }

    /// Plans and applies until nothing is left to do; the number of rounds.
    fn settle(s: &mut MetaState, live: &[&str], copies: Copies) -> usize {
        for round in 0..64 {
            let p = plan(s, live, 4, copies);
            if p.is_empty() {
                return round;
            }
            apply_all(s, &p);
        }
        panic!("no convergence in 64 rounds");
    }

    #[test]
    fn replicas_are_added_then_moves_go_to_in_sync_ones() {
        let copies = Copies::Replicated { factor: 0 };
        let mut s = cluster(16, &["a", "b", "c"]);
        // One node: its shards, no replica (nowhere to put one).
        let p = plan(&s, &["a"], 8, copies);
        apply_all(&mut s, &p);
        assert!(s.shards.iter().all(|e| e.owner.as_deref() == Some("a") && e.replicas.is_empty()));
        // b joins: it is added as a replica everywhere first, out of sync; no move yet.
        let p = plan(&s, &["a", "b"], 8, copies);
        assert!(p.iter().all(|c| matches!(c, Cmd::AddReplica { node, .. } if node == "b")), "{p:?}");
        assert_eq!(p.len(), 16);
        for c in &p {
            s.apply(c).unwrap();
        }
        assert!(plan(&s, &["a", "b"], 8, copies).is_empty(), "moves wait for the catch-up");
        settle(&mut s, &["a", "b", "c"], copies);
        for (shard, e) in s.shards.iter().enumerate() {
            let want = ranked(shard as u32, ["a", "b", "c"], 3);
            assert_eq!(e.owner.as_deref(), Some(want[0]));
            let mut reps: Vec<&str> = e.replicas.iter().map(|r| r.node.as_str()).collect();
            reps.sort();
            let mut others = want[1..].to_vec();
            others.sort();
            assert_eq!(reps, others, "shard {shard}");
            assert!(e.replicas.iter().all(|r| r.in_sync));
        }
        // c dies: its shards go to an in-sync replica at once, never to a fresh node.
        let owned_by_c: Vec<usize> =
            s.shards.iter().enumerate().filter(|(_, e)| e.owner.as_deref() == Some("c")).map(|(i, _)| i).collect();
        let p = plan(&s, &["a", "b"], 0, copies);
        let promotes: Vec<&Cmd> = p.iter().filter(|c| matches!(c, Cmd::Promote { .. })).collect();
        assert_eq!(promotes.len(), owned_by_c.len());
        // Every shard but those drops c as a replica.
        let drops = p.iter().filter(|c| matches!(c, Cmd::DropReplica { node, .. } if node == "c")).count();
        assert_eq!(drops, 16 - owned_by_c.len());
    }

    #[test]
    fn a_dead_owner_without_an_in_sync_replica_is_waited_for() {
        let copies = Copies::Replicated { factor: 2 };
        let mut s = cluster(4, &["a", "b"]);
        let p = plan(&s, &["a"], 8, copies);
        apply_all(&mut s, &p);
        // b was added but not caught up when a died: nobody else has a's acknowledged writes.
        for shard in 0..4 {
            s.apply(&Cmd::AddReplica { shard, node: "b".into(), expected_epoch: 1 }).unwrap();
        }
        assert!(!plan(&s, &["b"], 8, copies).iter().any(|c| matches!(c, Cmd::Assign { .. } | Cmd::Promote { .. })));
        // With one copy asked for, it is given away (state lost, as configured).
        let one = plan(&s, &["b"], 8, Copies::Replicated { factor: 1 });
        assert_eq!(one.iter().filter(|c| matches!(c, Cmd::Assign { .. })).count(), 4);
        // Never-assigned shards are assigned at once.
        let fresh = cluster(4, &["a", "b"]);
        assert_eq!(plan(&fresh, &["b"], 8, copies).len(), 4);
    }

    #[test]
    fn unowned_shards_are_assigned_at_once_and_moves_are_capped() {
        let mut s = cluster(64, &["a", "b"]);
        let first = plan(&s, &["a", "b"], 8, Copies::Shared);
        assert_eq!(first.len(), 64);
        assert!(first.iter().all(|c| matches!(c, Cmd::Assign { expected_epoch: 0, .. })));
        apply_all(&mut s, &first);
        assert!(plan(&s, &["a", "b"], 8, Copies::Shared).is_empty(), "settled");
        // A third node joins: only moves, at most 8 per plan.
        s.apply(&Cmd::Admit { name: "c".into(), addr: "c:1".into(), raft_id: 0 }).unwrap();
        let p = plan(&s, &["a", "b", "c"], 8, Copies::Shared);
        assert!(!p.is_empty() && p.len() <= 8);
        assert!(p.iter().all(|c| matches!(c, Cmd::BeginMove { to, .. } if to == "c")));
        // "b" dies: its shards are reassigned at once, not as capped moves.
        let p = plan(&s, &["a", "c"], 0, Copies::Shared);
        let owned_by_b = s.shards.iter().filter(|e| e.owner.as_deref() == Some("b")).count();
        assert_eq!(p.len(), owned_by_b);
        assert!(p.iter().all(|c| matches!(c, Cmd::Assign { owner, .. } if owner != "b")));
        assert!(plan(&s, &[], 8, Copies::Shared).is_empty(), "no live node, nothing to do");
    }

    #[test]
    fn a_draining_member_hands_every_shard_over_at_once() {
        let mut s = cluster(64, &["a", "b", "c"]);
        let first = plan(&s, &["a", "b", "c"], 8, Copies::Shared);
        apply_all(&mut s, &first);
        let owned_by_c = s.shards.iter().filter(|e| e.owner.as_deref() == Some("c")).count();
        assert!(owned_by_c > 1);
        s.apply(&Cmd::Drain { name: "c".into() }).unwrap();
        let p = plan(&s, &["a", "b", "c"], 1, Copies::Shared);
        assert_eq!(p.len(), owned_by_c, "not capped by moves_max");
        assert!(p.iter().all(|c| matches!(c, Cmd::BeginMove { to, .. } if to != "c")));
        apply_all(&mut s, &p);
        assert_eq!(s.shard_counts()["c"], 0);
        assert!(plan(&s, &["a", "b", "c"], 8, Copies::Shared).is_empty(), "settled without c");
        // Alone, a draining member still gets the shards (nowhere else to put them).
        let mut alone = cluster(4, &["a"]);
        alone.apply(&Cmd::Drain { name: "a".into() }).unwrap();
        assert_eq!(plan(&alone, &["a"], 8, Copies::Shared).len(), 4);
        // Admitted again: no longer draining.
        s.apply(&Cmd::Admit { name: "c".into(), addr: "c:1".into(), raft_id: 0 }).unwrap();
        assert!(!s.members["c"].draining);
    }

    proptest! {
        /// With replicas: from any start, the cluster settles with each shard on its ranked
        /// nodes, all in sync; then after any change of live nodes, every shard either settles
        /// again or waits because every node holding its writes is dead.
        #[test]
        fn replicated_planning_converges(
            before in prop::collection::btree_set("[a-e]", 1..5),
            after in prop::collection::btree_set("[a-e]", 1..5),
            factor in 0u32..4,
        ) {
            let copies = Copies::Replicated { factor };
            let all: Vec<String> = before.union(&after).cloned().collect();
            let names: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut s = cluster(16, &names);
            let live_before: Vec<&str> = before.iter().map(String::as_str).collect();
            let live_after: Vec<&str> = after.iter().map(String::as_str).collect();
            settle(&mut s, &live_before, copies);
            let holders_before: Vec<Vec<String>> = s.shards.iter().map(|e| {
                let mut h: Vec<String> = e.replicas.iter().filter(|r| r.in_sync).map(|r| r.node.clone()).collect();
                h.extend(e.owner.clone());
                h
            }).collect();
            settle(&mut s, &live_after, copies);
            let f = copies.factor(live_after.len());
            for (shard, e) in s.shards.iter().enumerate() {
                let stuck = factor != 1 && !holders_before[shard].iter().any(|h| live_after.contains(&h.as_str()));
                if stuck {
                    prop_assert!(e.owner.as_deref().is_none_or(|o| !live_after.contains(&o)), "shard {}", shard);
                    continue;
                }
                let want = ranked(shard as u32, live_after.iter().copied(), f);
                prop_assert_eq!(e.owner.as_deref(), Some(want[0]));
                prop_assert_eq!(e.replicas.len(), want.len() - 1, "shard {}: {:?}", shard, e);
                prop_assert!(e.replicas.iter().all(|r| r.in_sync && want.contains(&r.node.as_str())));
            }
        }

        /// From any membership change, planning and applying converges to every shard with its
        /// desired owner, every command applies, and epochs only grow.
        #[test]
        fn planning_converges(before in prop::collection::btree_set("[a-f]", 1..5), after in prop::collection::btree_set("[a-f]", 1..5)) {
            let all: Vec<String> = before.union(&after).cloned().collect();
            let names: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut s = cluster(32, &names);
            let live_before: Vec<&str> = before.iter().map(String::as_str).collect();
            let live_after: Vec<&str> = after.iter().map(String::as_str).collect();
            let first = plan(&s, &live_before, 4, Copies::Shared);
            apply_all(&mut s, &first);
            let mut rounds = 0;
            loop {
                let epochs: Vec<u64> = s.shards.iter().map(|e| e.epoch).collect();
                let p = plan(&s, &live_after, 4, Copies::Shared);
                if p.is_empty() {
                    break;
                }
                apply_all(&mut s, &p);
                prop_assert!(s.shards.iter().zip(&epochs).all(|(e, old)| e.epoch >= *old));
                rounds += 1;
                prop_assert!(rounds <= 32 / 4 + 2, "no convergence after {} rounds", rounds);
            }
            for (shard, e) in s.shards.iter().enumerate() {
                prop_assert_eq!(e.owner.as_deref(), desired_owner(shard as u32, live_after.iter().copied()));
            }
        }
    }
}
