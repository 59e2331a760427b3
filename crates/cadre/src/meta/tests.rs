use super::*;
use proptest::prelude::*;

fn admit(s: &mut MetaState, name: &str) {
    s.apply(&Cmd::Admit { name: name.into(), addr: format!("{name}:1"), raft_id: 0 }).unwrap();
}

fn state(shards: u32, members: &[&str]) -> MetaState {
    let mut s = MetaState::default();
    s.apply(&Cmd::Init { shard_count: shards }).unwrap();
    for m in members {
        admit(&mut s, m);
    }
    s
}

#[test]
fn init_is_once_and_bounded() {
    let mut s = MetaState::default();
    assert_eq!(
        s.apply(&Cmd::Assign { shard: 0, owner: "x".into(), expected_epoch: 0 }),
        Err(MetaError::UnknownMember("x".into()))
    );
    admit(&mut s, "x");
    assert_eq!(
        s.apply(&Cmd::Assign { shard: 0, owner: "x".into(), expected_epoch: 0 }),
        Err(MetaError::NotInitialized)
    );
    assert_eq!(s.apply(&Cmd::Init { shard_count: 0 }), Err(MetaError::ShardCount(0)));
    assert_eq!(
        s.apply(&Cmd::Init { shard_count: SHARD_COUNT_MAX + 1 }),
        Err(MetaError::ShardCount(SHARD_COUNT_MAX + 1))
    );
    s.apply(&Cmd::Init { shard_count: 4 }).unwrap();
    assert_eq!(s.apply(&Cmd::Init { shard_count: 8 }), Err(MetaError::AlreadyInitialized(4)));
    assert_eq!(s.shards.len(), 4);
}

#[test]
fn members_keep_their_admission_order() {
    let mut s = state(4, &["c", "a", "b"]);
    admit(&mut s, "a");
    assert_eq!(s.members_in_order(), ["c", "a", "b"], "re-admitting keeps the position");
    s.apply(&Cmd::Remove { name: "c".into() }).unwrap();
    admit(&mut s, "c");
    assert_eq!(s.members_in_order(), ["a", "b", "c"], "positions are never reused");
    assert_eq!(s.apply(&Cmd::Remove { name: "zz".into() }), Err(MetaError::UnknownMember("zz".into())));
}

#[test]
fn assignments_are_compare_and_set_on_the_epoch() {
    let mut s = state(4, &["a", "b"]);
    let r = s.apply(&Cmd::Assign { shard: 1, owner: "a".into(), expected_epoch: 0 }).unwrap();
    assert_eq!(r, CmdReply::Shard { shard: 1, owner: Some("a".into()), epoch: 1 });
    // A second controller acting on the same old view loses.
    let stale = s.apply(&Cmd::Assign { shard: 1, owner: "b".into(), expected_epoch: 0 });
    assert_eq!(stale, Err(MetaError::StaleEpoch { shard: 1, expected: 0, actual: 1 }));
    assert_eq!(
        s.apply(&Cmd::Assign { shard: 9, owner: "a".into(), expected_epoch: 0 }),
        Err(MetaError::UnknownShard { shard: 9, count: 4 })
    );
    assert_eq!(s.shard_counts(), BTreeMap::from([("a", 1), ("b", 0)]));
}

#[test]
fn a_planned_move_hands_the_shard_over_at_the_next_epoch() {
    let mut s = state(2, &["a", "b"]);
    s.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    assert!(matches!(s.apply(&Cmd::CompleteMove { shard: 0, expected_epoch: 1 }), Err(MetaError::WrongState { .. })));
    s.apply(&Cmd::BeginMove { shard: 0, to: "b".into(), expected_epoch: 1 }).unwrap();
    assert_eq!(s.shards[0].state, ShardState::Moving { to: "b".into() });
    assert_eq!(s.shards[0].owner.as_deref(), Some("a"), "the old owner serves until the hand-off");
    assert!(matches!(
        s.apply(&Cmd::BeginMove { shard: 0, to: "b".into(), expected_epoch: 1 }),
        Err(MetaError::WrongState { .. })
    ));
    let r = s.apply(&Cmd::CompleteMove { shard: 0, expected_epoch: 1 }).unwrap();
    assert_eq!(r, CmdReply::Shard { shard: 0, owner: Some("b".into()), epoch: 2 });
    // An aborted move leaves the owner in place, one epoch on: the abandoned hand-off is stale.
    s.apply(&Cmd::BeginMove { shard: 0, to: "a".into(), expected_epoch: 2 }).unwrap();
    assert!(matches!(s.apply(&Cmd::AbortMove { shard: 1, expected_epoch: 0 }), Err(MetaError::WrongState { .. })));
    let r = s.apply(&Cmd::AbortMove { shard: 0, expected_epoch: 2 }).unwrap();
    assert_eq!(r, CmdReply::Shard { shard: 0, owner: Some("b".into()), epoch: 3 });
    assert_eq!(s.shards[0].state, ShardState::Active);
    assert!(matches!(s.apply(&Cmd::CompleteMove { shard: 0, expected_epoch: 2 }), Err(MetaError::StaleEpoch { .. })));
}

#[test]
fn removing_a_member_frees_its_shards_and_cancels_moves_to_it() {
    let mut s = state(3, &["a", "b"]);
    s.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::Assign { shard: 1, owner: "b".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::BeginMove { shard: 1, to: "a".into(), expected_epoch: 1 }).unwrap();
    s.apply(&Cmd::Remove { name: "a".into() }).unwrap();
    assert_eq!(
        s.shards[0],
        ShardEntry { owner: None, epoch: 1, state: ShardState::Unassigned, replicas: vec![] },
        "epoch kept: the next owner fences a"
    );
    assert_eq!(
        s.shards[1],
        ShardEntry { owner: Some("b".into()), epoch: 1, state: ShardState::Active, replicas: vec![] }
    );
}

fn arb_cmd() -> impl Strategy<Value = Cmd> {
    let name = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from);
    prop_oneof![
        (1u32..6).prop_map(|shard_count| Cmd::Init { shard_count }),
        name.clone().prop_map(|name| Cmd::Admit { addr: format!("{name}:1"), name, raft_id: 0 }),
        name.clone().prop_map(|name| Cmd::Remove { name }),
        (0u32..6, name.clone(), 0u64..4).prop_map(|(shard, owner, expected_epoch)| Cmd::Assign {
            shard,
            owner,
            expected_epoch
        }),
        (0u32..6, name.clone(), 0u64..4).prop_map(|(shard, to, expected_epoch)| Cmd::BeginMove {
            shard,
            to,
            expected_epoch
        }),
        (0u32..6, 0u64..4).prop_map(|(shard, expected_epoch)| Cmd::CompleteMove { shard, expected_epoch }),
        (0u32..6, 0u64..4).prop_map(|(shard, expected_epoch)| Cmd::AbortMove { shard, expected_epoch }),
        name.clone().prop_map(|name| Cmd::Drain { name }),
        (0u32..6, name.clone(), 0u64..4, 0u8..5).prop_map(|(shard, node, expected_epoch, which)| match which {
            0 => Cmd::AddReplica { shard, node, expected_epoch },
            1 => Cmd::ReplicaSynced { shard, node, expected_epoch, generation: u64::from(shard) },
            2 => Cmd::ReplicaOutOfSync { shard, node, expected_epoch },
            3 => Cmd::DropReplica { shard, node, expected_epoch },
            _ => Cmd::Promote { shard, to: node, expected_epoch },
        }),
    ]
}

proptest! {
    /// Whatever the commands: refused ones change nothing, epochs never go down and go up exactly
    /// when the owner is set, every invariant of `check_invariants` holds after each, and the
    /// state survives its encoding.
    #[test]
    fn invariants_hold_over_any_command_sequence(cmds in prop::collection::vec(arb_cmd(), 0..80)) {
        let mut s = MetaState::default();
        for cmd in &cmds {
            let before = s.clone();
            match s.apply(cmd) {
                Err(_) => prop_assert_eq!(&s, &before),
                Ok(_) => {
                    for (i, (old, new)) in before.shards.iter().zip(&s.shards).enumerate() {
                        prop_assert!(new.epoch >= old.epoch, "shard {} epoch went down", i);
                        let owner_set = matches!(cmd, Cmd::Assign { shard, .. } | Cmd::CompleteMove { shard, .. } | Cmd::AbortMove { shard, .. } | Cmd::Promote { shard, .. } if *shard as usize == i);
                        prop_assert_eq!(new.epoch > old.epoch, owner_set, "shard {}: {:?}", i, cmd);
                    }
                }
            }
            // Owners, targets and replicas are members, no replica twice, generations unique...
            prop_assert_eq!(s.check_invariants(), Ok(()), "after {:?}", cmd);
            // Only an in-sync replica is promoted.
            if let Cmd::Promote { shard, to, .. } = cmd {
                if let Some(old) = before.shards.get(*shard as usize) {
                    if s.shards[*shard as usize].epoch > old.epoch {
                        prop_assert!(old.in_sync(to));
                    }
                }
            }
        }
        let bytes = postcard::to_stdvec(&s).unwrap();
        prop_assert_eq!(postcard::from_bytes::<MetaState>(&bytes).unwrap(), s);
    }
}

#[test]
fn replicas_are_caught_up_marked_and_promoted() {
    let mut s = state(2, &["a", "b", "c"]);
    s.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    assert_eq!(
        s.apply(&Cmd::AddReplica { shard: 0, node: "a".into(), expected_epoch: 1 }),
        Err(MetaError::OwnerAsReplica { shard: 0, node: "a".into() })
    );
    s.apply(&Cmd::AddReplica { shard: 0, node: "b".into(), expected_epoch: 1 }).unwrap();
    s.apply(&Cmd::AddReplica { shard: 0, node: "c".into(), expected_epoch: 1 }).unwrap();
    // Not in sync yet: it cannot be promoted.
    assert_eq!(
        s.apply(&Cmd::Promote { shard: 0, to: "b".into(), expected_epoch: 1 }),
        Err(MetaError::NotInSync { shard: 0, node: "b".into() })
    );
    let gen = |s: &MetaState, node: &str| s.shards[0].replica(node).unwrap().generation;
    s.apply(&Cmd::ReplicaSynced { shard: 0, node: "b".into(), expected_epoch: 1, generation: gen(&s, "b") }).unwrap();
    // A catch-up of another generation (an older attempt's late report) changes nothing.
    let stale = Cmd::ReplicaSynced { shard: 0, node: "c".into(), expected_epoch: 1, generation: gen(&s, "b") };
    assert_eq!(s.apply(&stale), Err(MetaError::NotInSync { shard: 0, node: "c".into() }));
    s.apply(&Cmd::ReplicaSynced { shard: 0, node: "c".into(), expected_epoch: 1, generation: gen(&s, "c") }).unwrap();
    let before = gen(&s, "c");
    s.apply(&Cmd::ReplicaOutOfSync { shard: 0, node: "c".into(), expected_epoch: 1 }).unwrap();
    assert!(s.shards[0].in_sync("b") && !s.shards[0].in_sync("c"));
    assert!(gen(&s, "c") > before, "falling out of sync starts a new generation");
    let late = Cmd::ReplicaSynced { shard: 0, node: "c".into(), expected_epoch: 1, generation: before };
    assert!(s.apply(&late).is_err(), "a late mark of the earlier catch-up is refused");
    // The owner dies: b is promoted at epoch 2; a is no longer anything.
    s.apply(&Cmd::Promote { shard: 0, to: "b".into(), expected_epoch: 1 }).unwrap();
    let e = &s.shards[0];
    assert_eq!((e.owner.as_deref(), e.epoch), (Some("b"), 2));
    assert_eq!(e.replicas.len(), 1);
    assert!(e.replica("c").is_some_and(|r| !r.in_sync));
    // A planned move to an in-sync replica keeps the old owner as an in-sync replica.
    s.apply(&Cmd::ReplicaSynced { shard: 0, node: "c".into(), expected_epoch: 2, generation: gen(&s, "c") }).unwrap();
    s.apply(&Cmd::BeginMove { shard: 0, to: "c".into(), expected_epoch: 2 }).unwrap();
    s.apply(&Cmd::CompleteMove { shard: 0, expected_epoch: 2 }).unwrap();
    assert_eq!(s.shards[0].owner.as_deref(), Some("c"));
    assert_eq!(s.shards[0].replicas.len(), 1);
    assert!(s.shards[0].in_sync("b"));
    // A move to a replica that fell out of sync cannot complete; its target cannot be dropped.
    s.apply(&Cmd::ReplicaOutOfSync { shard: 0, node: "b".into(), expected_epoch: 3 }).unwrap();
    s.apply(&Cmd::BeginMove { shard: 0, to: "b".into(), expected_epoch: 3 }).unwrap();
    assert_eq!(
        s.apply(&Cmd::CompleteMove { shard: 0, expected_epoch: 3 }),
        Err(MetaError::NotInSync { shard: 0, node: "b".into() })
    );
    assert!(matches!(
        s.apply(&Cmd::DropReplica { shard: 0, node: "b".into(), expected_epoch: 3 }),
        Err(MetaError::WrongState { .. })
    ));
    s.apply(&Cmd::AbortMove { shard: 0, expected_epoch: 3 }).unwrap();
    // A fresh assignment (nobody held the state) drops every replica; so does removing a member.
    s.apply(&Cmd::DropReplica { shard: 0, node: "b".into(), expected_epoch: 4 }).unwrap();
    assert!(s.shards[0].replicas.is_empty());
    s.apply(&Cmd::AddReplica { shard: 1, node: "b".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::Remove { name: "b".into() }).unwrap();
    assert!(s.shards[1].replicas.is_empty());
}

#[test]
fn a_member_back_with_a_new_raft_id_holds_no_copy() {
    let mut s = state(2, &["a", "b"]);
    s.apply(&Cmd::Admit { name: "a".into(), addr: "a:1".into(), raft_id: 7 }).unwrap();
    s.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::Assign { shard: 1, owner: "b".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::AddReplica { shard: 1, node: "a".into(), expected_epoch: 1 }).unwrap();
    // The same process again (same id, even at a new address): nothing changes.
    s.apply(&Cmd::Admit { name: "a".into(), addr: "a:2".into(), raft_id: 7 }).unwrap();
    assert_eq!(s.shards[0].owner.as_deref(), Some("a"));
    assert!(s.shards[1].replica("a").is_some());
    // A new process under the name (it lost its data dir): its shards lose their owner at the
    // same epoch, and it is nobody's replica.
    s.apply(&Cmd::Admit { name: "a".into(), addr: "a:2".into(), raft_id: 8 }).unwrap();
    assert_eq!((s.shards[0].owner.as_deref(), s.shards[0].epoch), (None, 1));
    assert!(s.shards[1].replicas.is_empty());
    assert_eq!(s.members["a"].raft_id, 8);
}

#[test]
fn a_batch_applies_each_command_on_its_own_and_is_bounded() {
    let mut s = state(2, &["a", "b"]);
    let batch = Cmd::Batch(vec![
        Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 },
        // Refused (stale epoch): the others still apply.
        Cmd::Assign { shard: 1, owner: "a".into(), expected_epoch: 7 },
        Cmd::AddReplica { shard: 0, node: "b".into(), expected_epoch: 1 },
    ]);
    let CmdReply::Batch(outcomes) = s.apply(&batch).unwrap() else { panic!("a batch answers per command") };
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
    assert_eq!(outcomes[1], Err(MetaError::StaleEpoch { shard: 1, expected: 7, actual: 0 }));
    assert_eq!(s.shards[0].owner.as_deref(), Some("a"));
    assert!(s.shards[0].replica("b").is_some());
    assert_eq!(s.shards[1].owner, None);

    let before = s.clone();
    let nested = Cmd::Batch(vec![Cmd::Batch(vec![])]);
    assert_eq!(s.apply(&nested), Err(MetaError::BadBatch { len: 1 }));
    let drain = Cmd::Drain { name: "b".into() };
    let huge = Cmd::Batch(vec![drain; BATCH_CMDS_MAX + 1]);
    assert_eq!(s.apply(&huge), Err(MetaError::BadBatch { len: BATCH_CMDS_MAX + 1 }));
    assert_eq!(s, before, "a refused batch changes nothing");
}

#[test]
fn routes_are_idempotent_checked_and_bounded() {
    let mut s = MetaState::default();
    let route = |pattern: &str, key: &str| AgentRoute {
        pattern: pattern.into(),
        target: AgentTarget::Agent { ty: "order".into(), key: key.into() },
    };
    let r = route("order.**", "subject");
    let id = r.id();
    assert_eq!(s.apply(&Cmd::AddRoute(r.clone())), Ok(CmdReply::Route { id }));
    assert_eq!(s.apply(&Cmd::AddRoute(r.clone())), Ok(CmdReply::Route { id }), "the same route twice is one");
    assert_eq!(s.routes.len(), 1);
    let pool = AgentRoute { pattern: "job.*".into(), target: AgentTarget::Pool { ty: "worker".into() } };
    assert_ne!(pool.id(), id);
    s.apply(&Cmd::AddRoute(pool)).unwrap();
    assert_eq!(s.routes.len(), 2);
    let long_key = format!("/{}", "k".repeat(ROUTE_FIELD_LEN_MAX));
    let cut_key = long_key[..ROUTE_FIELD_LEN_MAX].to_string();
    for (bad, why) in [
        (route("", "subject"), AgentRouteError::FieldLength),
        (route("order.*", "data.id"), AgentRouteError::Key { key: "data.id".into() }),
        (route(&"x".repeat(ROUTE_FIELD_LEN_MAX + 1), "/id"), AgentRouteError::FieldLength),
        (route("order.*", &long_key), AgentRouteError::Key { key: cut_key.clone() }),
    ] {
        assert_eq!(s.apply(&Cmd::AddRoute(bad)), Err(MetaError::BadRoute(why)));
    }
    assert_eq!(s.apply(&Cmd::RemoveRoute { id }), Ok(CmdReply::Done));
    assert_eq!(s.apply(&Cmd::RemoveRoute { id }), Err(MetaError::UnknownRoute(id)));
    while s.routes.len() < ROUTES_MAX {
        s.apply(&Cmd::AddRoute(route(&format!("t{}", s.routes.len()), "/id"))).unwrap();
    }
    assert_eq!(s.apply(&Cmd::AddRoute(route("one.more", "/id"))), Err(MetaError::TooManyRoutes));
    let existing = s.routes.values().next().unwrap().clone();
    assert!(s.apply(&Cmd::AddRoute(existing)).is_ok(), "adding an existing route at the limit is fine");
}

/// A sound state with an owner, a move, replicas and a route, to break one rule at a time.
fn sound() -> MetaState {
    let mut s = state(3, &["a", "b", "c"]);
    s.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::Assign { shard: 1, owner: "b".into(), expected_epoch: 0 }).unwrap();
    s.apply(&Cmd::AddReplica { shard: 0, node: "b".into(), expected_epoch: 1 }).unwrap();
    s.apply(&Cmd::AddReplica { shard: 0, node: "c".into(), expected_epoch: 1 }).unwrap();
    s.apply(&Cmd::BeginMove { shard: 1, to: "c".into(), expected_epoch: 1 }).unwrap();
    let route = AgentRoute { pattern: "o.**".into(), target: AgentTarget::Pool { ty: "w".into() } };
    s.apply(&Cmd::AddRoute(route)).unwrap();
    s
}

#[test]
fn a_state_that_breaks_an_invariant_is_named_by_the_rule_it_breaks() {
    use super::InvariantError as E;
    assert_eq!(sound().check_invariants(), Ok(()));
    // `apply` refuses what would break one: a move to the shard's own owner.
    assert_eq!(
        sound().apply(&Cmd::BeginMove { shard: 0, to: "a".into(), expected_epoch: 1 }),
        Err(MetaError::MoveToOwner { shard: 0, node: "a".into() })
    );
    assert_eq!(MetaState::default().check_invariants(), Ok(()));
    let broken = |f: &dyn Fn(&mut MetaState)| {
        let mut s = sound();
        f(&mut s);
        s.check_invariants().expect_err("a broken state")
    };
    assert_eq!(broken(&|s| s.shards.pop().map(drop).unwrap()), E::TableLen { len: 2, count: 3 });
    assert_eq!(broken(&|s| s.shard_count = SHARD_COUNT_MAX + 1), E::ShardCount(SHARD_COUNT_MAX + 1));
    assert!(matches!(broken(&|s| s.shards[2].owner = Some("a".into())), E::OwnerState { shard: 2, .. }));
    assert!(matches!(broken(&|s| s.shards[0].state = ShardState::Unassigned), E::OwnerState { shard: 0, .. }));
    assert!(matches!(broken(&|s| s.shards[0].owner = Some("z".into())), E::NotMember { role: "owner", .. }));
    let to = |n: &str| ShardState::Moving { to: n.into() };
    assert!(matches!(broken(&|s| s.shards[1].state = to("z")), E::NotMember { role: "move target", .. }));
    assert!(matches!(broken(&|s| s.shards[1].state = to("b")), E::MoveToOwner { shard: 1, .. }));
    assert!(matches!(broken(&|s| s.shards[0].replicas[1].node = "z".into()), E::NotMember { role: "replica", .. }));
    assert!(matches!(broken(&|s| s.shards[0].replicas[1].node = "b".into()), E::ReplicaTwice { shard: 0, .. }));
    assert!(matches!(broken(&|s| s.shards[0].replicas[1].node = "a".into()), E::ReplicaTwice { shard: 0, .. }));
    let reused = |s: &mut MetaState| s.shards[0].replicas[1].generation = s.shards[0].replicas[0].generation;
    assert!(matches!(broken(&reused), E::Generation { shard: 0, .. }));
    assert!(matches!(broken(&|s| s.generations = 1), E::Generation { shard: 0, .. }));
    assert!(matches!(broken(&|s| s.members.get_mut("c").unwrap().admitted = 0), E::Admission { .. }));
    assert!(matches!(broken(&|s| s.admitted = 2), E::Admission { .. }));
    let misfiled = |s: &mut MetaState| {
        let (id, route) = s.routes.pop_first().unwrap();
        s.routes.insert(id + 1, route);
    };
    assert!(matches!(broken(&misfiled), E::BadRoute { .. }));
}
