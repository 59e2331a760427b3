//! The main job runs end to end: `cadre demo` with two node processes exits 0 and shows each step,
//! the order flow across nodes among them.

#[tokio::test]
async fn the_demo_runs_end_to_end() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cadre"))
        .args(["demo", "--nodes", "2"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for step in [
        "converged: every node sees 2 alive members",
        "n2: 3 orders placed (POST /v1/signals?delivery=strong)",
        "o3: placed on n2 -> inventory/sku-a on",
        "captured -> webhook on n1 (signature valid)",
        "o1 published again with the same id: answered as a duplicate, not handled again",
        "payment/o1 called inventory/sku-a (an agent-to-agent call), stock back to",
        "(expected 44)",
        "rebalanced: n3 owns",
        "final values: all 12 counters match",
        "marks n3 down",
        "after n3 was killed (",
        "demo complete",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}
