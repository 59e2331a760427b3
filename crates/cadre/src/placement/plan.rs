//! The placement controller's decision, as a pure function of the metadata and the live nodes.
//!
//! [`plan`] returns the commands to propose, each compare-and-set on the epoch it saw:
//! 1. every shard without an owner, or whose owner is not live (its lease expired: the caller
//!    decides liveness), is assigned at once to its desired owner among the live nodes;
//! 2. then, conservatively, at most `moves_max` active shards whose live owner is not the desired
//!    one start a planned move to it (`BeginMove`; the hand-off and `CompleteMove` follow).
//!
//! Shards already moving are left alone. Planning again after the commands are applied gives
//! nothing new once every shard is with its desired owner (property-tested).

use super::desired_owner;
use crate::meta::{Cmd, MetaState, ShardState};

pub fn plan(state: &MetaState, live: &[&str], moves_max: usize) -> Vec<Cmd> {
    let mut out = Vec::new();
    let live_members: Vec<&str> = live.iter().copied().filter(|n| state.members.contains_key(*n)).collect();
    if live_members.is_empty() {
        return out;
    }
    let mut moves = 0;
    for (shard, e) in state.shards.iter().enumerate() {
        let shard = shard as u32;
        let desired = desired_owner(shard, live_members.iter().copied()).expect("live_members is not empty");
        let owner_live = e.owner.as_deref().is_some_and(|o| live_members.contains(&o));
        if !owner_live {
            out.push(Cmd::Assign { shard, owner: desired.to_string(), expected_epoch: e.epoch });
        } else if e.state == ShardState::Active && e.owner.as_deref() != Some(desired) && moves < moves_max {
            moves += 1;
            out.push(Cmd::BeginMove { shard, to: desired.to_string(), expected_epoch: e.epoch });
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
            s.apply(&Cmd::Admit { name: m.to_string(), addr: format!("{m}:1") }).unwrap();
        }
        s
    }

    /// Applies a plan, completing every move it starts (as hand-offs would).
    fn apply_all(s: &mut MetaState, cmds: &[Cmd]) {
        for c in cmds {
            s.apply(c).unwrap();
            if let Cmd::BeginMove { shard, expected_epoch, .. } = c {
                s.apply(&Cmd::CompleteMove { shard: *shard, expected_epoch: *expected_epoch }).unwrap();
            }
        }
    }

    #[test]
    fn unowned_shards_are_assigned_at_once_and_moves_are_capped() {
        let mut s = cluster(64, &["a", "b"]);
        let first = plan(&s, &["a", "b"], 8);
        assert_eq!(first.len(), 64);
        assert!(first.iter().all(|c| matches!(c, Cmd::Assign { expected_epoch: 0, .. })));
        apply_all(&mut s, &first);
        assert!(plan(&s, &["a", "b"], 8).is_empty(), "settled");
        // A third node joins: only moves, at most 8 per plan.
        s.apply(&Cmd::Admit { name: "c".into(), addr: "c:1".into() }).unwrap();
        let p = plan(&s, &["a", "b", "c"], 8);
        assert!(!p.is_empty() && p.len() <= 8);
        assert!(p.iter().all(|c| matches!(c, Cmd::BeginMove { to, .. } if to == "c")));
        // "b" dies: its shards are reassigned at once, not as capped moves.
        let p = plan(&s, &["a", "c"], 0);
        let owned_by_b = s.shards.iter().filter(|e| e.owner.as_deref() == Some("b")).count();
        assert_eq!(p.len(), owned_by_b);
        assert!(p.iter().all(|c| matches!(c, Cmd::Assign { owner, .. } if owner != "b")));
        assert!(plan(&s, &[], 8).is_empty(), "no live node, nothing to do");
    }

    proptest! {
        /// From any membership change, planning and applying converges to every shard with its
        /// desired owner, every command applies, and epochs only grow.
        #[test]
        fn planning_converges(before in prop::collection::btree_set("[a-f]", 1..5), after in prop::collection::btree_set("[a-f]", 1..5)) {
            let all: Vec<String> = before.union(&after).cloned().collect();
            let names: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut s = cluster(32, &names);
            let live_before: Vec<&str> = before.iter().map(String::as_str).collect();
            let live_after: Vec<&str> = after.iter().map(String::as_str).collect();
            let first = plan(&s, &live_before, 4);
            apply_all(&mut s, &first);
            let mut rounds = 0;
            loop {
                let epochs: Vec<u64> = s.shards.iter().map(|e| e.epoch).collect();
                let p = plan(&s, &live_after, 4);
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
