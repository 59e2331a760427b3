//! Route paths and routed types from users: parsing, registering and routing must never panic,
//! and the trie must agree with the naive matcher.
#![no_main]

use cadre::router::{Path, RouteSpec, Router};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // First line: a path; the rest: types to route.
    let mut lines = text.lines();
    let Some(path) = lines.next() else { return };
    let mut router: Router<u8> = Router::new();
    let parsed = Path::parse(path);
    assert_eq!(parsed.is_ok(), router.add(RouteSpec::new(path, 0)).is_ok());
    for ty in lines {
        let routed = router.route(ty, &()).is_ok();
        if let Ok(p) = &parsed {
            assert_eq!(routed, p.matches(ty), "path {path:?} type {ty:?}");
        }
    }
});
