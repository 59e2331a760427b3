use proptest::prelude::*;

use super::*;

fn router(routes: &[(&str, &'static str, i32)]) -> Router<&'static str> {
    let mut r = Router::new();
    for (path, target, prio) in routes {
        r.add(RouteSpec::new(*path, *target).priority(*prio)).unwrap();
    }
    r
}

fn targets(r: &Router<&'static str>, ty: &str) -> Vec<&'static str> {
    r.route(ty, &()).map(|v| v.into_iter().copied().collect()).unwrap_or_default()
}

#[test]
fn specificity_examples() {
    for (path, want) in
        [("user.123.created", 24000), ("user.*.created", 17100), ("user.**", 8200), ("*.*.created", 7100), ("**", 0)]
    {
        assert_eq!(Path::parse(path).unwrap().specificity(), want, "{path}");
    }
}

#[test]
fn invalid_paths_name_the_reason() {
    let cases: [(&str, PathError); 8] = [
        ("", PathError::Empty),
        (".a", PathError::EmptySegment { index: 0 }),
        ("a.", PathError::EmptySegment { index: 1 }),
        ("a..b", PathError::EmptySegment { index: 1 }),
        ("us*r", PathError::WildcardInSegment { segment: "us*r".into() }),
        ("a**", PathError::WildcardInSegment { segment: "a**".into() }),
        ("a.**.**", PathError::AdjacentGlobstar { index: 2 }),
        ("a.b c", PathError::InvalidCharacter { segment: "b c".into(), ch: ' ' }),
    ];
    for (path, want) in cases {
        assert_eq!(Path::parse(path), Err(want), "{path:?}");
    }
    let long = vec!["a"; SEGMENTS_MAX + 1].join(".");
    assert_eq!(Path::parse(&long), Err(PathError::TooManySegments));
    assert_eq!(Path::parse(&"a".repeat(PATH_LEN_MAX_BYTES + 1)), Err(PathError::TooLong));
}

#[test]
fn priority_outside_the_range_is_refused() {
    let mut r: Router<&str> = Router::new();
    assert_eq!(
        r.add(RouteSpec::new("a", "x").priority(101)).unwrap_err(),
        RouteError::Priority { path: "a".into(), priority: 101 }
    );
    assert!(r.add(RouteSpec::new("a", "x").priority(-101)).is_err());
    assert!(r.add(RouteSpec::new("a", "x").priority(100)).is_ok());
    let none = RouteSpec { path: "a".into(), targets: Vec::<&str>::new(), priority: 0, predicate: None };
    assert_eq!(r.add(none).unwrap_err(), RouteError::NoTargets { path: "a".into() });
}

#[test]
fn whole_types_only_and_globstar_matches_zero_or_more() {
    let r = router(&[("user", "exact", 0), ("user.**", "glob", 0), ("user.*", "star", 0)]);
    // By the formula, `user.**` (8200) is more specific than `user` (5000).
    assert_eq!(targets(&r, "user"), ["glob", "exact"]);
    assert_eq!(targets(&r, "user.created"), ["star", "glob"]);
    assert_eq!(targets(&r, "user.1.created"), ["glob"]);
    assert_eq!(r.route("order.created", &()).unwrap_err(), NoMatch { ty: "order.created".into() });
}

#[test]
fn results_order_by_specificity_then_priority_then_registration() {
    let r = router(&[
        ("**", "all", 100),
        ("user.*.created", "star-low", -5),
        ("user.**", "glob", 0),
        ("user.123.created", "exact", 0),
        ("user.*.created", "star-high", 5),
        ("*.*.created", "any-created", 0),
        ("user.*.created", "star-low-later", -5),
    ]);
    assert_eq!(
        targets(&r, "user.123.created"),
        ["exact", "star-high", "star-low", "star-low-later", "glob", "any-created", "all"]
    );
}

#[test]
fn a_route_yields_its_targets_once_in_registration_order() {
    let mut r: Router<&str> = Router::new();
    r.add(RouteSpec::new("a.**.b.**", "t1").target("t2")).unwrap();
    // `a.b.b.b` matches `a.**.b.**` in several ways.
    assert_eq!(r.route("a.b.b.b", &()).unwrap(), [&"t1", &"t2"]);
}

#[test]
fn routes_are_added_and_removed_at_run_time() {
    let mut r = router(&[("a.*", "x", 0), ("a.b", "y", 0), ("a.*", "z", 0)]);
    assert_eq!(targets(&r, "a.b"), ["y", "x", "z"]);
    assert_eq!(r.remove_path("a.*"), 2);
    assert_eq!(targets(&r, "a.b"), ["y"]);
    assert_eq!(targets(&r, "a.c"), Vec::<&str>::new());
    let id = r.add(RouteSpec::new("a.*", "w")).unwrap();
    assert_eq!(targets(&r, "a.c"), ["w"]);
    assert!(r.remove(id));
    assert!(!r.remove(id));
    assert_eq!(r.remove_path("a.b"), 1);
    assert!(r.is_empty());
    assert!(r.root.is_empty(), "emptied trie nodes are pruned");
}

#[test]
fn predicates_filter_and_a_panicking_predicate_is_no_match() {
    let mut r: Router<&str, u32> = Router::new();
    r.add(RouteSpec::new("a", "even").predicate(|v: &u32| v.is_multiple_of(2))).unwrap();
    r.add(RouteSpec::new("a", "panics").predicate(|_: &u32| panic!("predicate bug"))).unwrap();
    r.add(RouteSpec::new("a", "always")).unwrap();
    assert_eq!(r.route("a", &2).unwrap(), [&"even", &"always"]);
    assert_eq!(r.route("a", &3).unwrap(), [&"always"]);
}

fn arb_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("c".to_string()),
        Just("*".into()),
        Just("**".into())
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(arb_segment(), 1..5).prop_map(|v| v.join("."))
}

fn arb_type() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")], 1..6).prop_map(|v| v.join("."))
}

proptest! {
    #[test]
    fn the_trie_agrees_with_the_naive_matcher(paths in proptest::collection::vec(arb_path(), 1..30), types in proptest::collection::vec(arb_type(), 1..20)) {
        let mut r: Router<usize> = Router::new();
        let mut valid = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            if let Ok(parsed) = Path::parse(p) {
                r.add(RouteSpec::new(p.clone(), i)).unwrap();
                valid.push((i, parsed));
            }
        }
        for ty in &types {
            let mut want: Vec<(i64, usize)> = valid.iter().filter(|(_, p)| p.matches(ty)).map(|(i, p)| (-p.specificity(), *i)).collect();
            want.sort();
            let want: Vec<usize> = want.into_iter().map(|(_, i)| i).collect();
            let got: Vec<usize> = r.route(ty, &()).map(|v| v.into_iter().copied().collect()).unwrap_or_default();
            prop_assert_eq!(got, want, "type {}", ty);
        }
    }
}
