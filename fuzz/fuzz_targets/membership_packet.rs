//! Membership packets from peers: the SWIM core must refuse garbage without panicking.
#![no_main]

use cadre::config::MembershipConfig;
use cadre::membership::{Core, NodeMeta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let me = NodeMeta {
        name: "fuzz".into(),
        addr: "127.0.0.1:7000".parse().unwrap(),
        http: None,
        incarnation: 1,
        started_ms: 0,
    };
    let now = tokio::time::Instant::now();
    let mut core = Core::new(me, MembershipConfig::default(), vec![], 1, now);
    let _ = core.handle_packet(now, data);
});
