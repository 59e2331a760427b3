//! `cadre demo`: a local cluster of node processes, end to end.
//!
//! Starts N nodes on loopback with embedded defaults, shows them converge, SIGKILLs one and
//! measures how long the others take to mark it `down`, then stops the rest with SIGTERM (they
//! leave gracefully and exit 0).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cadre::api::client;
use cadre::api::MembersJson;
use cadre::membership::MemberState;
use indicatif::{ProgressBar, ProgressStyle};

use crate::proc::{wait_ready, NodeProc, NodeSpec};

/// Largest demo cluster (each node is a process with its own runtime).
const DEMO_NODES_MAX: usize = 16;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const DETECT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

pub fn members_table(m: &MembersJson) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  {:<12} {:<22} {:<22} {:<8} {:>11}", "NAME", "ADDR", "HTTP", "STATE", "INCARNATION");
    for x in &m.members {
        let http = x.http.map(|h| h.to_string()).unwrap_or_else(|| "-".into());
        let mark = if x.name == m.self_name { "*" } else { " " };
        let _ = writeln!(
            out,
            "{mark} {:<12} {:<22} {:<22} {:<8} {:>11}",
            x.name,
            x.addr.to_string(),
            http,
            x.state.as_str(),
            x.incarnation
        );
    }
    out.trim_end().to_string()
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"));
    pb.enable_steady_tick(Duration::from_millis(100));
    pb.set_message(msg);
    pb
}

/// How many of the nodes at `nodes` (HTTP addresses) have a member list satisfying `check`.
async fn count_seeing(nodes: &[SocketAddr], check: impl Fn(&MembersJson) -> bool) -> usize {
    let mut n = 0;
    for http in nodes {
        if let Ok(m) = client::members(*http, HTTP_TIMEOUT).await {
            if check(&m) {
                n += 1;
            }
        }
    }
    n
}

fn sees_all_alive(m: &MembersJson, names: &[String]) -> bool {
    names.iter().all(|n| m.members.iter().any(|x| &x.name == n && x.state == MemberState::Alive))
}

fn sees_state(m: &MembersJson, name: &str, states: &[MemberState]) -> bool {
    m.members.iter().any(|x| x.name == name && states.contains(&x.state))
}

/// Polls until `check` holds on every node in `https`, updating the spinner.
async fn wait_all(
    pb: &ProgressBar,
    what: &str,
    https: &[SocketAddr],
    timeout: Duration,
    check: impl Fn(&MembersJson) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let n = count_seeing(https, &check).await;
        pb.set_message(format!("{what} ({n}/{} nodes agree)", https.len()));
        if n == https.len() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not reached within {timeout:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub async fn run(n: usize) -> Result<()> {
    if !(2..=DEMO_NODES_MAX).contains(&n) {
        bail!("--nodes must be within 2..={DEMO_NODES_MAX}");
    }
    let dir = tempfile::Builder::new().prefix("cadre-demo-").tempdir().context("cannot create a temp dir")?;
    let secret = format!("demo-{:016x}", rand::random::<u64>());
    println!("cadre demo: {n} node processes on loopback (logs in {})", dir.path().display());

    let exe = std::env::current_exe().context("cannot find the cadre executable")?;
    let started = Instant::now();
    let mut procs: Vec<NodeProc> = Vec::new();
    for i in 1..=n {
        let seeds: Vec<SocketAddr> = procs.iter().take(3).map(|p| p.addr).collect();
        let name = format!("n{i}");
        let p = NodeProc::spawn(NodeSpec {
            exe: &exe,
            extra: &[],
            name: &name,
            seeds: &seeds,
            dir: dir.path(),
            secret: &secret,
        })?;
        println!("  started {name}: transport {} http {} (pid {})", p.addr, p.http, p.pid().unwrap_or(0));
        procs.push(p);
    }
    let result = drive(&mut procs, started).await;
    if result.is_err() {
        for p in &procs {
            eprintln!("--- last log lines of {} ---\n{}", p.name, p.log_tail());
        }
    }
    result
}

async fn drive(procs: &mut Vec<NodeProc>, started: Instant) -> Result<()> {
    let names: Vec<String> = procs.iter().map(|p| p.name.clone()).collect();
    let https: Vec<SocketAddr> = procs.iter().map(|p| p.http).collect();

    let pb = spinner("waiting for the nodes to start".into());
    for p in procs.iter() {
        wait_ready(p.http, CONVERGE_TIMEOUT).await.with_context(|| format!("{} did not start", p.name))?;
    }
    wait_all(&pb, "converging", &https, CONVERGE_TIMEOUT, |m| sees_all_alive(m, &names)).await?;
    pb.finish_and_clear();
    let t = started.elapsed();
    println!(
        "\nconverged: every node sees {} alive members, {} ms after the first process started",
        names.len(),
        t.as_millis()
    );
    println!("{}", members_table(&client::members(https[0], HTTP_TIMEOUT).await?));

    let mut victim = procs.pop().expect("at least two nodes");
    let others: Vec<SocketAddr> = procs.iter().map(|p| p.http).collect();
    println!("\nkilling {} with SIGKILL (no goodbye) ...", victim.name);
    let pb = spinner(format!("waiting for the others to mark {} down", victim.name));
    victim.signal(libc::SIGKILL)?;
    let killed_at = Instant::now();
    let _ = victim.wait(EXIT_TIMEOUT).await?;
    let vname = victim.name.clone();
    wait_all(&pb, "detecting the crash", &others, DETECT_TIMEOUT, |m| sees_state(m, &vname, &[MemberState::Down]))
        .await?;
    let detect = killed_at.elapsed();
    pb.finish_and_clear();
    println!("detected: every surviving node marks {} down, {} ms after the kill", victim.name, detect.as_millis());
    println!("{}", members_table(&client::members(others[0], HTTP_TIMEOUT).await?));

    println!("\nstopping the rest with SIGTERM (graceful leave) ...");
    let first_http = procs[0].http;
    while procs.len() > 1 {
        let mut p = procs.pop().expect("len > 1");
        p.signal(libc::SIGTERM)?;
        let status = p.wait(EXIT_TIMEOUT).await?;
        if !status.success() {
            bail!("{} exited with {status}", p.name);
        }
        let pname = p.name.clone();
        let pb = spinner(format!("waiting for n1 to see {pname} left"));
        wait_all(&pb, &format!("{pname} leaving"), &[first_http], DETECT_TIMEOUT, |m| {
            sees_state(m, &pname, &[MemberState::Left])
        })
        .await?;
        pb.finish_and_clear();
        println!("  {} exited 0 and is listed as left", p.name);
    }
    println!("{}", members_table(&client::members(first_http, HTTP_TIMEOUT).await?));
    let mut last = procs.pop().expect("one left");
    last.signal(libc::SIGTERM)?;
    let status = last.wait(EXIT_TIMEOUT).await?;
    if !status.success() {
        bail!("{} exited with {status}", last.name);
    }
    println!("  {} exited 0", last.name);
    println!("\ndemo complete: crash detected in {} ms; all nodes stopped cleanly", detect.as_millis());
    Ok(())
}
