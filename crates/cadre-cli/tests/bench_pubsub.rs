//! `cadre bench pubsub` end to end, briefly: it starts its subscriber process, gets every
//! accepted signal delivered (it fails otherwise), and prints its table and JSON line; bad flags
//! are refused with the allowed range. No timing is asserted: the figures are only printed.

mod support;

use support::exe;

/// Runs `cadre bench pubsub ARGS` to completion (it bounds its own waits).
fn bench(args: &[&str]) -> std::process::Output {
    std::process::Command::new(exe())
        .args(["bench", "pubsub"])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("cadre runs")
}

#[test]
fn a_short_run_delivers_everything_and_prints_the_table() {
    let out = bench(&["--seconds", "0.2", "--payload", "50"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    for row in ["eventual signals/s", "weak signals/s", "round trip p50 us", "data frames per signal"] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["bench"], "pubsub");
    assert_eq!(json["payload_bytes"], 50);
    // Signals were delivered in both measures (the run fails if an accepted one never arrives).
    assert!(json["eventual_per_s"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["weak_per_s"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["rtt_p50_us"].as_f64().unwrap() > 0.0, "{json}");
}

#[test]
fn bad_flags_are_refused_with_the_range() {
    let out = bench(&["--seconds", "0.01"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seconds must be within 0.1..=600"));
    let out = bench(&["--payload", "70000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload must be at most 65536"));
}
