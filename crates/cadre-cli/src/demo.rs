//! `cadre demo`: a local cluster of node processes, end to end.
//!
//! Starts N nodes on loopback with embedded defaults, shows them converge, runs an order flow
//! across nodes (a signed webhook subscription on the first node, cluster-wide routes to the
//! `inventory` and `payment` agents added on the second, orders placed on the last, each flowing
//! through both agents to the webhook), counts with a `counter` agent, runs a counter workload through
//! every node, starts one more node and shows shards moving to it (state handed over), prints
//! the final counter values next to the expected ones, SIGKILLs one node and measures how long
//! the others take to mark it `down`, then stops the rest with SIGTERM (they leave gracefully and
//! exit 0). The nodes rebalance faster than the defaults (a config file in the demo's dir).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cadre::api::client;
use cadre::api::MembersJson;
use cadre::MemberState;
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

/// Leader, shards and agents per member, from `GET /v1/cluster`.
pub fn cluster_table(c: &cadre::api::ClusterJson) -> String {
    let mut out = String::new();
    let leader = c.leader.as_deref().unwrap_or("(none)");
    let _ = writeln!(
        out,
        "  leader {leader} (term {}), {} shards ({} moving, {} unassigned), {} active agents",
        c.term, c.shard_count, c.shards_moving, c.shards_unassigned, c.active_agents_total
    );
    let _ = writeln!(out, "  replicas: {} in sync, {} catching up", c.replicas_in_sync, c.replicas_behind);
    let _ = writeln!(
        out,
        "  {:<12} {:<22} {:<7} {:>6} {:>8} {:>8} {:>9}",
        "NAME", "ADDR", "ROLE", "SHARDS", "REPLICAS", "AGENTS", "SYNCING"
    );
    for m in &c.members {
        let role = if m.voter { "voter" } else { "learner" };
        let agents = m.active_agents.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        let syncing = m.catching_up.len();
        let _ = writeln!(
            out,
            "  {:<12} {:<22} {:<7} {:>6} {:>8} {:>8} {:>9}",
            m.name, m.addr, role, m.shards, m.replica_of, agents, syncing
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
    let config = dir.path().join("demo.toml");
    std::fs::write(&config, DEMO_CONFIG).context("cannot write the demo config")?;
    let spawner = Spawner { exe, config: config.display().to_string(), dir: dir.path().to_path_buf(), secret };
    let started = Instant::now();
    let mut procs: Vec<NodeProc> = Vec::new();
    for i in 1..=n {
        procs.push(spawner.spawn(&format!("n{i}"), &procs)?);
    }
    let result = drive(&mut procs, &spawner, started).await;
    if result.is_err() {
        for p in &procs {
            eprintln!("--- last log lines of {} ---\n{}", p.name, p.log_tail());
        }
    }
    result
}

/// Faster rebalancing than the conservative defaults, so the demo shows a join settling.
const DEMO_CONFIG: &str = "[placement]\nrebalance_interval_ms = 300\nmax_moves_per_tick = 64\n";
/// Keys of the counter workload.
const WORKLOAD_KEYS: usize = 12;
const REBALANCE_TIMEOUT: Duration = Duration::from_secs(60);

struct Spawner {
    exe: std::path::PathBuf,
    config: String,
    dir: std::path::PathBuf,
    secret: String,
}

impl Spawner {
    fn spawn(&self, name: &str, procs: &[NodeProc]) -> Result<NodeProc> {
        let seeds: Vec<SocketAddr> = procs.iter().take(3).map(|p| p.addr).collect();
        let extra = ["--config", self.config.as_str()];
        let p = NodeProc::spawn(NodeSpec {
            exe: &self.exe,
            extra: &extra,
            name,
            seeds: &seeds,
            dir: &self.dir,
            secret: &self.secret,
        })?;
        println!("  started {name}: transport {} http {} (pid {})", p.addr, p.http, p.pid().unwrap_or(0));
        Ok(p)
    }
}

async fn drive(procs: &mut Vec<NodeProc>, spawner: &Spawner, started: Instant) -> Result<()> {
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

    order_flow(&https, &names).await?;
    agents(https[0]).await?;
    let expected = workload(&https).await?;
    println!("{}", cluster_table(&client::cluster(https[0], HTTP_TIMEOUT).await?));

    let name = format!("n{}", procs.len() + 1);
    println!("\n{name} joins; shards move to it, each handed over with its agents' state ...");
    let joined = spawner.spawn(&name, procs)?;
    wait_ready(joined.http, CONVERGE_TIMEOUT).await.with_context(|| format!("{name} did not start"))?;
    let moved = rebalance(https[0], &name).await?;
    procs.push(joined);
    println!("rebalanced: {name} owns {} shards, {} ms after it started", moved.0, moved.1.as_millis());
    println!("{}", cluster_table(&client::cluster(https[0], HTTP_TIMEOUT).await?));
    final_values(procs.last().expect("just pushed").http, &expected).await?;

    let mut victim = procs.pop().expect("at least two nodes");
    let others: Vec<SocketAddr> = procs.iter().map(|p| p.http).collect();
    let reminder = set_reminder(victim.http, &victim.name).await?;
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
    reminder_fired(others[0], &victim.name, &reminder).await?;

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

/// How long after it is set the demo's reminder is due: after the kill that follows.
const REMINDER_IN_MS: u64 = 1500;
/// How long the demo waits for its reminder to fire once its owner is gone.
const REMINDER_TIMEOUT: Duration = Duration::from_secs(30);

/// A reminder (`counter.add` 1, once) on a counter that `owner` owns: `(path, due_ms)`.
async fn set_reminder(http: SocketAddr, owner: &str) -> Result<(String, u64)> {
    let mut found = None;
    for i in 0..1000 {
        let path = format!("/v1/agents/counter/alarm{i}");
        let (status, body) = client::get(http, &path, HTTP_TIMEOUT).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status == 200 && v["owner"] == owner {
            found = Some(path);
            break;
        }
    }
    let path = found.with_context(|| format!("no counter of 1000 is owned by {owner}"))?;
    let body = serde_json::json!({"in_ms": REMINDER_IN_MS, "signal": {"type": "counter.add", "data": 1}});
    let headers = [("content-type", "application/json")];
    let payload = bytes::Bytes::from(body.to_string());
    let reminders = format!("{path}/reminders/wake");
    let (status, res) = client::request(http, client::Method::PUT, &reminders, &headers, payload, HTTP_TIMEOUT).await?;
    if status != 200 {
        bail!("PUT {reminders} failed ({status}): {}", String::from_utf8_lossy(&res));
    }
    let v: serde_json::Value = serde_json::from_slice(&res)?;
    let due_ms = v["reminder"]["due_ms"].as_u64().context("the reminder has no due time")?;
    println!(
        "\n  {owner}: a reminder on {} due in {REMINDER_IN_MS} ms (counter.add 1, stored with the agent's state)",
        &path[11..]
    );
    Ok((path, due_ms))
}

/// Waits for the reminder set on the killed node to fire on the key's new owner.
async fn reminder_fired(http: SocketAddr, killed: &str, (path, due_ms): &(String, u64)) -> Result<()> {
    let pb = spinner(format!("waiting for the reminder on {} to fire", &path[11..]));
    let start = Instant::now();
    loop {
        // Unanswered while the key's shard fails over: asked again.
        let v = post_counter(http, path, "counter.get", serde_json::Value::Null).await.unwrap_or_default();
        if v["reply"] == 1 {
            pb.finish_and_clear();
            let late = cadre::clock::wall_ms().saturating_sub(*due_ms);
            println!(
                "reminder: {} fired once on {} after {killed} was killed ({late} ms after it was due)",
                &path[11..],
                v["node"].as_str().unwrap_or("?")
            );
            return Ok(());
        }
        if v["reply"].as_i64().is_some_and(|n| n > 1) {
            bail!("the reminder on {path} fired more than once: {}", v["reply"]);
        }
        if start.elapsed() > REMINDER_TIMEOUT {
            bail!("the reminder on {path} did not fire within {REMINDER_TIMEOUT:?} of {killed}'s crash");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A counter agent called over HTTP on one node.
async fn agents(http: SocketAddr) -> Result<()> {
    use bytes::Bytes;
    use cadre::signal::codec::CONTENT_TYPE_STRUCTURED;
    use cadre::signal::Signal;

    let adds = [5i64, 12, -3, 30];
    let mut last = serde_json::Value::Null;
    let post = |s: &Signal| {
        let body = Bytes::from(cadre::signal::codec::encode_structured(s));
        async move {
            let (status, res) =
                client::post(http, "/v1/agents/counter/demo", CONTENT_TYPE_STRUCTURED, body, HTTP_TIMEOUT).await?;
            if status != 200 {
                bail!("counter call failed ({status}): {}", String::from_utf8_lossy(&res));
            }
            anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&res)?)
        }
    };
    let mut sent = Vec::new();
    for n in adds {
        let s = Signal::new("counter.add", serde_json::json!(n));
        last = post(&s).await?;
        sent.push(s);
    }
    let expected: i64 = adds.iter().sum();
    println!(
        "agents: counter/demo after adding {adds:?}: {} (expected {expected}), stored before each reply",
        last["reply"]
    );
    if last["reply"] != expected {
        bail!("the counter is {} instead of {expected}", last["reply"]);
    }
    // A client that did not get its answer sends the same signal (source and id) again.
    let retry = post(&sent[1]).await?;
    let now = post(&Signal::new("counter.get", serde_json::Value::Null)).await?;
    println!(
        "agents: the add of {} sent again with the same id: answered {} (its original reply), counter still {}",
        adds[1], retry["reply"], now["reply"]
    );
    if retry["reply"] != adds[0] + adds[1] || now["reply"] != expected {
        bail!("a retried add was handled again: {retry} then {now}");
    }
    Ok(())
}

fn counter_path(i: usize) -> String {
    format!("/v1/agents/counter/w{i}")
}

async fn post_counter(http: SocketAddr, path: &str, ty: &str, data: serde_json::Value) -> Result<serde_json::Value> {
    use cadre::signal::codec::CONTENT_TYPE_STRUCTURED;
    let s = cadre::signal::Signal::new(ty, data);
    let body = bytes::Bytes::from(cadre::signal::codec::encode_structured(&s));
    let (status, res) = client::post(http, path, CONTENT_TYPE_STRUCTURED, body, WORKLOAD_CALL_TIMEOUT).await?;
    if status != 200 {
        bail!("{ty} on {path} failed ({status}): {}", String::from_utf8_lossy(&res));
    }
    Ok(serde_json::from_slice(&res)?)
}

/// Time a workload call may take (a shard being handed over makes it wait).
const WORKLOAD_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Adds to every workload key through every node; returns the expected values.
async fn workload(https: &[SocketAddr]) -> Result<Vec<i64>> {
    println!("\nagents: a counter workload on {WORKLOAD_KEYS} keys, each added to through every node");
    let mut expected = vec![0i64; WORKLOAD_KEYS];
    let mut served_by = std::collections::BTreeMap::<String, usize>::new();
    for (round, http) in https.iter().enumerate() {
        for (i, total) in expected.iter_mut().enumerate() {
            let n = (round * WORKLOAD_KEYS + i + 1) as i64;
            let v = post_counter(*http, &counter_path(i), "counter.add", serde_json::json!(n)).await?;
            *total += n;
            if v["reply"] != *total {
                bail!("counter w{i} answered {} instead of {total}", v["reply"]);
            }
            *served_by.entry(v["node"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
    }
    println!("  {} calls, served by the owners of the keys' shards: {served_by:?}", https.len() * WORKLOAD_KEYS);
    Ok(expected)
}

/// Waits until no shard is moving and `joined` owns some; returns its shards and the time taken.
async fn rebalance(http: SocketAddr, joined: &str) -> Result<(usize, Duration)> {
    let start = Instant::now();
    let pb = spinner("rebalancing".into());
    loop {
        if let Ok(c) = client::cluster(http, HTTP_TIMEOUT).await {
            let owned = c.members.iter().find(|m| m.name == joined).map_or(0, |m| m.shards);
            pb.set_message(format!("rebalancing: {joined} owns {owned} shards, {} moving", c.shards_moving));
            if owned > 0 && c.shards_moving == 0 && c.shards_unassigned == 0 {
                let settled = start.elapsed();
                // Settled means no move in progress; another round may still start: give it one look.
                tokio::time::sleep(Duration::from_millis(400)).await;
                let again = client::cluster(http, HTTP_TIMEOUT).await?;
                if again.shards_moving == 0 {
                    pb.finish_and_clear();
                    let owned = again.members.iter().find(|m| m.name == joined).map_or(0, |m| m.shards);
                    return Ok((owned, settled));
                }
            }
        }
        if start.elapsed() > REBALANCE_TIMEOUT {
            bail!("rebalancing onto {joined} did not settle within {REBALANCE_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Reads every workload key through `http` and prints it next to the expected value.
async fn final_values(http: SocketAddr, expected: &[i64]) -> Result<()> {
    println!("  {:<6} {:>8} {:>8}  OWNER (EPOCH)", "KEY", "VALUE", "EXPECTED");
    let mut wrong = 0;
    for (i, want) in expected.iter().enumerate() {
        let v = post_counter(http, &counter_path(i), "counter.get", serde_json::Value::Null).await?;
        let ok = v["reply"] == *want;
        wrong += usize::from(!ok);
        println!(
            "  w{i:<5} {:>8} {:>8}  {} ({}){}",
            v["reply"],
            want,
            v["node"].as_str().unwrap_or("?"),
            v["epoch"],
            if ok { "" } else { "  <-- WRONG" }
        );
    }
    if wrong > 0 {
        bail!("{wrong} counters differ from the expected values");
    }
    println!("final values: all {} counters match the sum of their acknowledged adds", expected.len());
    Ok(())
}

/// Orders the demo places, as (order, SKU, quantity).
const ORDERS: [(&str, &str, i64); 3] = [("o1", "sku-a", 2), ("o2", "sku-b", 1), ("o3", "sku-a", 3)];
const HOOK_SECRET: &str = "demo-webhook-secret";

/// Signals across nodes: a webhook subscription on the first node, cluster-wide routes to the
/// `inventory` and `payment` agents added on the second, orders placed on the last; each order
/// flows through both agents, wherever they live, to the webhook.
async fn order_flow(https: &[SocketAddr], names: &[String]) -> Result<()> {
    let (first, second, last) = (https[0], https[1], https[https.len() - 1]);
    let last_name = &names[names.len() - 1];
    println!("\nsignals across nodes: an order flow");
    crate::proc::await_json(first, "/v1/cluster", "a metadata leader and every shard owned", CONVERGE_TIMEOUT, |c| {
        !c["leader"].is_null() && c["shard_count"].as_u64().is_some_and(|n| n > 0) && c["shards_unassigned"] == 0
    })
    .await?;
    let (hook, mut received) = crate::hook::webhook_receiver(HOOK_SECRET).await?;
    let url = format!("http://{hook}/payments");
    let sub = serde_json::json!({"pattern": "payment.captured", "dispatch": {"webhook": {"url": url, "secret": HOOK_SECRET}}});
    post_json(first, "/v1/subscriptions", sub).await?;
    println!("  {}: a signed webhook subscription for payment.captured", names[0]);
    let routes = [
        ("order.placed", serde_json::json!({"agent": {"type": "inventory", "key": "/sku"}})),
        ("inventory.reserved", serde_json::json!({"agent": {"type": "payment", "key": "/order"}})),
    ];
    let mut ids = Vec::new();
    for (pattern, dispatch) in routes {
        let created =
            post_json(second, "/v1/subscriptions", serde_json::json!({"pattern": pattern, "dispatch": dispatch}))
                .await?;
        ids.push(created["route"].as_str().unwrap_or_default().to_string());
        println!("  {}: a cluster-wide route {pattern} -> {dispatch}", names[1]);
    }
    for http in https {
        crate::proc::await_json(*http, "/v1/interest", "the webhook's interest known", CONVERGE_TIMEOUT, |v| {
            v["nodes"].as_array().is_some_and(|n| n.iter().any(|e| e["node"] == names[0].as_str()))
        })
        .await?;
        for id in &ids {
            crate::proc::await_json(*http, "/v1/subscriptions", "the routes mirrored", CONVERGE_TIMEOUT, |v| {
                v["subscriptions"].as_array().is_some_and(|s| s.iter().any(|x| x["route"] == id.as_str()))
            })
            .await?;
        }
    }
    let orders: Vec<cadre::signal::Signal> = ORDERS
        .iter()
        .map(|(order, sku, qty)| {
            let data = serde_json::json!({"order": order, "sku": sku, "qty": qty});
            cadre::signal::Signal::new("order.placed", data).with_subject(*order)
        })
        .collect();
    let body = bytes::Bytes::from(cadre::signal::codec::encode_batch(&orders));
    let path = "/v1/signals?delivery=strong";
    let (status, res) = client::post(last, path, cadre::signal::codec::CONTENT_TYPE_BATCH, body, HTTP_TIMEOUT).await?;
    if status != 202 {
        bail!("placing orders failed ({status}): {}", String::from_utf8_lossy(&res));
    }
    println!("  {last_name}: {} orders placed (POST /v1/signals?delivery=strong)", ORDERS.len());
    for _ in 0..ORDERS.len() {
        let (order, signed) = tokio::time::timeout(DETECT_TIMEOUT, received.recv())
            .await
            .context("the webhook heard of no captured payment")?
            .context("the webhook receiver stopped")?;
        let (_, sku, qty) = ORDERS.iter().find(|o| o.0 == order).context("a payment for an unknown order")?;
        let stock = post_agent(first, &format!("/v1/agents/inventory/{sku}"), "inventory.get").await?;
        let paid = post_agent(first, &format!("/v1/agents/payment/{order}"), "payment.get").await?;
        println!(
            "  {order}: placed on {last_name} -> inventory/{sku} on {} reserved {qty} (stock now {}) -> payment/{order} on {} {} -> webhook on {} (signature {})",
            stock["node"].as_str().unwrap_or("?"),
            stock["reply"]["stock"],
            paid["node"].as_str().unwrap_or("?"),
            paid["reply"]["status"].as_str().unwrap_or("?"),
            names[0],
            if signed { "valid" } else { "INVALID" }
        );
        if !signed {
            bail!("a webhook signature did not verify");
        }
    }
    duplicate_order(https, last_name, &orders[0]).await?;
    let refund = post_agent(last, "/v1/agents/payment/o1", "payment.refund").await?;
    if refund["reply"]["status"] != "refunded" {
        bail!("the refund of o1 failed: {refund}");
    }
    println!(
        "  o1 refunded on {}: payment/o1 called inventory/sku-a (an agent-to-agent call), stock back to {}",
        refund["node"].as_str().unwrap_or("?"),
        refund["reply"]["stock"]
    );
    Ok(())
}

/// Publishes `order` again, same source and id: its inventory agent answers it from its record of
/// handled signals instead of handling it again (awaited on the nodes' duplicate counters).
async fn duplicate_order(https: &[SocketAddr], last_name: &str, order: &cadre::signal::Signal) -> Result<()> {
    let (first, last) = (https[0], https[https.len() - 1]);
    let before = duplicates(https).await?;
    let stock_before =
        post_agent(first, "/v1/agents/inventory/sku-a", "inventory.get").await?["reply"]["stock"].clone();
    let body = bytes::Bytes::from(cadre::signal::codec::encode_batch(std::slice::from_ref(order)));
    let path = "/v1/signals?delivery=strong";
    let (status, res) = client::post(last, path, cadre::signal::codec::CONTENT_TYPE_BATCH, body, HTTP_TIMEOUT).await?;
    if status != 202 {
        bail!("publishing o1 again failed ({status}): {}", String::from_utf8_lossy(&res));
    }
    let deadline = Instant::now() + DETECT_TIMEOUT;
    while duplicates(https).await? <= before {
        if Instant::now() > deadline {
            bail!("o1 published again was not answered as a duplicate");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stock = post_agent(first, "/v1/agents/inventory/sku-a", "inventory.get").await?["reply"]["stock"].clone();
    if stock != stock_before {
        bail!("o1 published again changed the stock: {stock_before} -> {stock}");
    }
    println!(
        "  {last_name}: o1 published again with the same id: answered as a duplicate, not handled again (stock still {stock})"
    );
    Ok(())
}

/// Signals answered as duplicates on all the nodes (`cadre_agent_duplicates_total`).
async fn duplicates(https: &[SocketAddr]) -> Result<f64> {
    let mut sum = 0.0;
    for http in https {
        let (_, body) = client::get(*http, "/metrics", HTTP_TIMEOUT).await?;
        let text = String::from_utf8_lossy(&body);
        let series = text.lines().filter(|l| l.starts_with("cadre_agent_duplicates_total"));
        sum += series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>();
    }
    Ok(sum)
}

async fn post_json(http: SocketAddr, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    let (status, res) =
        client::post(http, path, "application/json", bytes::Bytes::from(body.to_string()), HTTP_TIMEOUT).await?;
    if !(200..300).contains(&status) {
        bail!("POST {path} failed ({status}): {}", String::from_utf8_lossy(&res));
    }
    Ok(serde_json::from_slice(&res)?)
}

/// Calls an agent with a signal of type `ty` and no data; its reply and where it ran.
async fn post_agent(http: SocketAddr, path: &str, ty: &str) -> Result<serde_json::Value> {
    post_counter(http, path, ty, serde_json::Value::Null).await
}
