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

use super::desired_owner;
use crate::meta::{Cmd, MetaState, ShardState};

pub fn plan(state: &MetaState, live: &[&str], moves_max: usize) -> Vec<Cmd> {
    let mut out = Vec::new();
    let live_members: Vec<&str> = live.iter().copied().filter(|n| state.members.contains_key(*n)).collect();
    let staying: Vec<&str> = live_members.iter().copied().filter(|n| !state.members[*n].draining).collect();
    let targets = if staying.is_empty() { &live_members } else { &staying };
    if targets.is_empty() {
        return out;
    }
    let mut moves = 0;
    for (shard, e) in state.shards.iter().enumerate() {
        let shard = shard as u32;
        let desired = desired_owner(shard, targets.iter().copied()).expect("targets is not empty");
        let owner_live = e.owner.as_deref().is_some_and(|o| live_members.contains(&o));
        let owner_leaving = e.owner.as_deref().is_some_and(|o| !targets.contains(&o));
        if !owner_live {
            out.push(Cmd::Assign { shard, owner: desired.to_string(), expected_epoch: e.epoch });
        } else if e.state == ShardState::Active
            && e.owner.as_deref() != Some(desired)
            && (owner_leaving || moves < moves_max)
        {
            moves += usize::from(!owner_leaving);
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

    #[test]
    fn a_draining_member_hands_every_shard_over_at_once() {
        let mut s = cluster(64, &["a", "b", "c"]);
        let first = plan(&s, &["a", "b", "c"], 8);
        apply_all(&mut s, &first);
        let owned_by_c = s.shards.iter().filter(|e| e.owner.as_deref() == Some("c")).count();
        assert!(owned_by_c > 1);
        s.apply(&Cmd::Drain { name: "c".into() }).unwrap();
        let p = plan(&s, &["a", "b", "c"], 1);
        assert_eq!(p.len(), owned_by_c, "not capped by moves_max");
        assert!(p.iter().all(|c| matches!(c, Cmd::BeginMove { to, .. } if to != "c")));
        apply_all(&mut s, &p);
        assert_eq!(s.shard_counts()["c"], 0);
        assert!(plan(&s, &["a", "b", "c"], 8).is_empty(), "settled without c");
        // Alone, a draining member still gets the shards (nowhere else to put them).
        let mut alone = cluster(4, &["a"]);
        alone.apply(&Cmd::Drain { name: "a".into() }).unwrap();
        assert_eq!(plan(&alone, &["a"], 8).len(), 4);
        // Admitted again: no longer draining.
        s.apply(&Cmd::Admit { name: "c".into(), addr: "c:1".into() }).unwrap();
        assert!(!s.members["c"].draining);
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
