//! The `cadre` binary: run a node, inspect a cluster, run the demo and the benchmarks.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_agents;
mod bench_bus;
mod bench_pubsub;
mod bench_reminders;
mod bench_router;
mod demo;
mod hook;
mod proc;
mod shop;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cadre::config::{Config, Secret};
use cadre::{Node, NodeError, NodeOptions};
use clap::{Args, Parser, Subcommand};

/// Exit code for bad usage or configuration (missing secret, invalid config).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "cadre", version, about = "Keyed agents and CloudEvents signals across a cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node until SIGTERM or Ctrl-C (then leave the cluster gracefully and exit 0).
    Node(NodeArgs),
    /// Show the members of a cluster as a table.
    Status {
        /// HTTP address of any node.
        #[arg(long, default_value = "127.0.0.1:8101", env = "CADRE_HTTP")]
        http: String,
    },
    /// List the active agents of a type across the cluster (or, with --stored, the ids with a
    /// stored state), as JSON: one page, or every page with --all.
    Agents {
        /// The agent type.
        agent_type: String,
        #[arg(long)]
        stored: bool,
        /// Start after this id (the `next` of a page).
        #[arg(long)]
        after: Option<String>,
        /// Agents per page (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow `next` to the last page, printing each agent (or id) on a line.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "127.0.0.1:8101", env = "CADRE_HTTP")]
        http: String,
    },
    /// Start a local cluster of node processes, watch it converge, kill one, watch detection.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Send one signal (structured mode) to a node's `POST /v1/signals`; prints the accepted id.
    Send(SendArgs),
    /// Call an agent: send one signal to TYPE/ID and print the reply.
    Call(CallArgs),
    /// An agent's reminders: set NAME (`--in-ms`, `--at-ms` and/or `--every-ms` with
    /// `--signal-type`), `--cancel` it, or list them (without NAME).
    Remind(RemindArgs),
    /// Routing tables.
    Routes {
        #[command(subcommand)]
        which: RoutesCmd,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Internal: the subscriber's node of `cadre bench pubsub` (takes the flags of `node`).
    #[command(hide = true, name = bench_pubsub::PEER_SUBCOMMAND)]
    BenchPubsubPeer(NodeArgs),
    /// Internal: the raw TCP peer of `cadre bench transport`.
    #[command(hide = true)]
    BenchRawServer {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum RoutesCmd {
    /// Validate a routing table (JSON, or TOML by extension) and print, for each listed signal
    /// type, one JSON line with its targets or `"error":"no_match"`. An invalid table exits with 2.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Cross-process tell throughput and ask latency, against raw TCP framing in the same run.
    Transport {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Agents on one node (memory storage): activations/s, local calls against raw channel actors.
    Agents {
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also measure write-through with both nodes on this Postgres database
        /// (postgres://USER@HOST:PORT/DB; tables are created in it).
        #[arg(long, env = "CADRE_BENCH_STORAGE")]
        storage: Option<String>,
        /// Ids of handled signals kept per agent on the side with the record.
        #[arg(long, default_value_t = cadre::config::DEDUPE_IDS_MAX_DEFAULT)]
        dedupe_ids: usize,
        /// Only compare calls with the record of handled signals and without (local, remote).
        #[arg(long)]
        record_only: bool,
        /// Rounds each side of a with/without comparison is split into (each on fresh nodes);
        /// the ratio reported is their median.
        #[arg(long, default_value_t = 8)]
        rounds: usize,
    },
    /// Durable reminders on three in-process nodes: ticks fired per second and their lateness,
    /// against bare tokio timers with the same due times.
    Reminders {
        /// Periodic reminders, one per agent.
        #[arg(long, default_value_t = 100_000)]
        reminders: usize,
        /// Ticks due per second (sets the period: reminders / rate).
        #[arg(long, default_value_t = 10_000)]
        rate: usize,
        /// Seconds measured (after one whole period), 1 to 600.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// Publishing on the node-local bus to a channel subscriber, against a bare tokio channel.
    Bus {
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Other subscriptions on the bus (not matching the published type).
        #[arg(long, default_value_t = 1000)]
        routes: usize,
    },
    /// Cluster pub/sub to a subscriber in another process: publish throughput (eventual, weak),
    /// frames per signal and round-trip latency, against transport tells, asks and raw TCP.
    Pubsub {
        /// Seconds per throughput measure (and for the latency measure), 0.1 to 600.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Bytes of each signal's data (a JSON string), at most 65536.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Routing a signal type against many routes, against an exact hash-map lookup.
    Router {
        #[arg(long, default_value_t = 10_000)]
        routes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        lookups: usize,
    },
}

#[derive(Args)]
struct CallArgs {
    /// HTTP address of a node.
    #[arg(long, default_value = "127.0.0.1:8101", env = "CADRE_HTTP")]
    http: String,
    /// Agent type, e.g. `counter`.
    #[arg(value_name = "TYPE")]
    agent_type: String,
    /// Agent id.
    id: String,
    /// Signal type, e.g. `counter.add`.
    signal_type: String,
    /// JSON data.
    #[arg(long)]
    data: Option<String>,
    /// Do not wait for the handler (`?mode=cast`).
    #[arg(long, conflicts_with = "read")]
    cast: bool,
    /// A read-only call on the stored state, served by the nearest copy (`nearest`: this node's,
    /// the owner's or an in-sync replica's) or by the owner (`owner`) (`?mode=read&from=`).
    #[arg(long, value_name = "FROM", value_parser = ["nearest", "owner"])]
    read: Option<String>,
}

#[derive(Args)]
struct RemindArgs {
    /// HTTP address of a node.
    #[arg(long, default_value = "127.0.0.1:8101", env = "CADRE_HTTP")]
    http: String,
    /// Agent type, e.g. `counter`.
    #[arg(value_name = "TYPE")]
    agent_type: String,
    /// Agent id.
    id: String,
    /// Reminder name; without it, the agent's reminders are listed.
    name: Option<String>,
    /// First (or only) tick this many ms from now.
    #[arg(long, conflicts_with = "at_ms")]
    in_ms: Option<u64>,
    /// First (or only) tick at this Unix time in ms.
    #[arg(long)]
    at_ms: Option<u64>,
    /// Then every this many ms.
    #[arg(long)]
    every_ms: Option<u64>,
    /// Type of the signal each tick sends, e.g. `counter.add`.
    #[arg(long)]
    signal_type: Option<String>,
    /// JSON data of that signal.
    #[arg(long)]
    data: Option<String>,
    /// Cancel the reminder NAME.
    #[arg(long, requires = "name", conflicts_with_all = ["in_ms", "at_ms", "every_ms", "signal_type"])]
    cancel: bool,
}

#[derive(Args)]
struct SendArgs {
    /// HTTP address of a node.
    #[arg(long, default_value = "127.0.0.1:8101", env = "CADRE_HTTP")]
    http: String,
    /// Signal type, e.g. `order.placed`.
    #[arg(long = "type")]
    ty: String,
    /// Signal source (a URI reference).
    #[arg(long, default_value = "cadre-cli")]
    source: String,
    #[arg(long)]
    subject: Option<String>,
    /// JSON data.
    #[arg(long)]
    data: Option<String>,
    /// Signal id; default a fresh UUIDv7.
    #[arg(long)]
    id: Option<String>,
    /// How hard to reach other nodes: weak, eventual or strong.
    #[arg(long, default_value = "eventual", value_parser = ["weak", "eventual", "strong"])]
    delivery: String,
    /// To every live node's subscriptions, through the broadcast tree (best effort).
    #[arg(long, conflicts_with = "delivery")]
    broadcast: bool,
}

#[derive(Args)]
struct NodeArgs {
    /// Node name, unique in the cluster.
    #[arg(long, env = "CADRE_NAME")]
    name: Option<String>,
    /// Transport address (HOST:PORT).
    #[arg(long, env = "CADRE_LISTEN")]
    listen: Option<String>,
    /// Transport address announced to peers, when different from --listen.
    #[arg(long, env = "CADRE_ADVERTISE")]
    advertise: Option<String>,
    /// HTTP API address (HOST:PORT).
    #[arg(long, env = "CADRE_HTTP")]
    http: Option<String>,
    /// Transport address of a node to join through; repeatable.
    #[arg(long = "seed", env = "CADRE_SEEDS", value_delimiter = ',')]
    seeds: Vec<String>,
    /// Directory for node-local state.
    #[arg(long, env = "CADRE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Cluster name; peers with another name are refused.
    #[arg(long, env = "CADRE_CLUSTER")]
    cluster: Option<String>,
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "CADRE_CONFIG")]
    config: Option<PathBuf>,
    /// File holding the shared secret (alternative: CADRE_SECRET).
    #[arg(long, env = "CADRE_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Routing table (JSON, or TOML by extension) whose targets are dispatch configurations,
    /// subscribed at start.
    #[arg(long, env = "CADRE_ROUTES")]
    routes: Option<PathBuf>,
    /// Keep agents' state in this Postgres database, shared by every node of the cluster
    /// (`postgres://USER[:PASSWORD]@HOST:PORT/DB`); default: the embedded store under --data-dir.
    #[arg(long, env = "CADRE_STORAGE", value_name = "URL", hide_env_values = true)]
    storage: Option<String>,
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve address {addr:?}"))?
        .next()
        .with_context(|| format!("address {addr:?} resolves to nothing"))
}

/// Builds the node config from file, environment and flags. Errors here exit with code 2.
fn node_config(args: &NodeArgs) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
            Config::from_toml_str(&text)?
        }
        None => Config::default(),
    };
    if let Some(n) = &args.name {
        cfg.name = n.clone();
    }
    if let Some(c) = &args.cluster {
        cfg.cluster = c.clone();
    }
    if let Some(l) = &args.listen {
        cfg.listen = resolve(l)?;
    }
    if let Some(a) = &args.advertise {
        cfg.advertise = Some(resolve(a)?);
    }
    if let Some(h) = &args.http {
        cfg.http = Some(resolve(h)?);
    }
    if !args.seeds.is_empty() {
        cfg.seeds = args.seeds.iter().filter(|s| !s.is_empty()).map(|s| resolve(s)).collect::<Result<_>>()?;
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = Some(d.clone());
    }
    if let Some(url) = args.storage.as_ref().filter(|u| !u.is_empty()) {
        cfg.storage.url = Some(url.clone());
    }
    if let Some(f) = &args.secret_file {
        cfg.secret_file = Some(f.clone());
    }
    cfg.secret = match (&cfg.secret_file, std::env::var("CADRE_SECRET")) {
        (Some(path), _) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
            Secret::new(bytes)
        }
        (None, Ok(s)) => Secret::new(s),
        (None, Err(_)) => Secret::default(),
    };
    if cfg.secret.is_empty() {
        bail!("no shared secret: pass --secret-file FILE or set CADRE_SECRET (it must not be empty)");
    }
    cfg.validate()?;
    Ok(cfg)
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // openraft logs every election and membership step at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},openraft=warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn read_table(file: &std::path::Path) -> Result<cadre::routes::Table> {
    use cadre::routes::{Format, Table};
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Table::parse(&text, Format::from_path(file)).with_context(|| format!("routes file {}", file.display()))
}

async fn run_node(cfg: Config, routes: Option<cadre::routes::Table>) -> Result<()> {
    // The demo's order-flow types are there on every node (they cost nothing unless called).
    let mut opts = NodeOptions::default().agent::<shop::Inventory>().agent::<shop::Payment>();
    opts.routes = routes;
    let node = Node::start(cfg, opts).await?;
    wait_for_shutdown_signal().await?;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the cluster"),
        _ = int.recv() => tracing::info!("SIGINT: leaving the cluster"),
    }
    Ok(())
}

async fn status(http: &str) -> Result<()> {
    let addr = resolve(http)?;
    let m = cadre::api::client::members(addr, Duration::from_secs(5)).await?;
    println!("{}", demo::members_table(&m));
    let c = cadre::api::client::cluster(addr, Duration::from_secs(5)).await?;
    println!("\n{}", demo::cluster_table(&c));
    Ok(())
}

/// `cadre agents`: pages of `GET /v1/agents/{type}`.
async fn agents(http: &str, ty: &str, stored: bool, mut after: Option<String>, limit: usize, all: bool) -> Result<()> {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let addr = resolve(http)?;
    loop {
        let mut path =
            format!("/v1/agents/{}?limit={limit}&stored={stored}", utf8_percent_encode(ty, NON_ALPHANUMERIC));
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", utf8_percent_encode(a, NON_ALPHANUMERIC)));
        }
        let (status, body) = cadre::api::client::get(addr, &path, Duration::from_secs(30)).await?;
        if status != 200 {
            bail!("GET {path} failed ({status}): {}", String::from_utf8_lossy(&body));
        }
        let page: serde_json::Value = serde_json::from_slice(&body).context("the page is not JSON")?;
        if !all {
            println!("{}", serde_json::to_string_pretty(&page)?);
            return Ok(());
        }
        let items = page[if stored { "ids" } else { "agents" }].as_array().cloned().unwrap_or_default();
        for item in items {
            println!("{item}");
        }
        if let Some(unreachable) = page["unreachable"].as_array().filter(|u| !u.is_empty()) {
            eprintln!("not answered (their agents are missing): {unreachable:?}");
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(()),
        }
    }
}

/// A signal from the command line: fresh id, the time, JSON data if given.
fn cli_signal(source: String, ty: String, data: Option<String>) -> Result<cadre::signal::Signal> {
    use cadre::signal::{new_id, now, Data, Signal};
    let mut s = Signal::bare(new_id(), source, ty);
    s.time = Some(now());
    if let Some(text) = data {
        let v: serde_json::Value = serde_json::from_str(&text).context("--data is not JSON")?;
        s.datacontenttype = Some("application/json".into());
        s.data = Some(Data::Json(v));
    }
    s.validate()?;
    Ok(s)
}

async fn remind(args: RemindArgs) -> Result<()> {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let addr = resolve(&args.http)?;
    let t = Duration::from_secs(30);
    let base = format!(
        "/v1/agents/{}/{}/reminders",
        utf8_percent_encode(&args.agent_type, NON_ALPHANUMERIC),
        utf8_percent_encode(&args.id, NON_ALPHANUMERIC)
    );
    let Some(name) = &args.name else {
        let (status, body) = cadre::api::client::get(addr, &base, t).await?;
        if status != 200 {
            bail!("GET {base} failed ({status}): {}", String::from_utf8_lossy(&body));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).context("the answer is not JSON")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    };
    let path = format!("{base}/{}", utf8_percent_encode(name, NON_ALPHANUMERIC));
    if args.cancel {
        let (status, body) = cadre::api::client::delete(addr, &path, t).await?;
        match status {
            204 => println!("cancelled {name}"),
            _ => bail!("DELETE {path} failed ({status}): {}", String::from_utf8_lossy(&body)),
        }
        return Ok(());
    }
    let ty = args.signal_type.context("setting a reminder needs --signal-type")?;
    if args.in_ms.is_none() && args.at_ms.is_none() && args.every_ms.is_none() {
        bail!("setting a reminder needs --in-ms, --at-ms or --every-ms");
    }
    let signal = cli_signal("cadre-cli".into(), ty, args.data)?;
    let body = serde_json::json!({
        "in_ms": args.in_ms,
        "due_ms": args.at_ms,
        "every_ms": args.every_ms,
        "signal": cadre::signal::codec::to_json(&signal),
    });
    // Absent options are left out (the API refuses nulls it does not expect).
    let body: serde_json::Map<String, serde_json::Value> = body
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let headers = [("content-type", "application/json")];
    let payload = bytes::Bytes::from(serde_json::Value::Object(body).to_string());
    let (status, body) =
        cadre::api::client::request(addr, cadre::api::client::Method::PUT, &path, &headers, payload, t).await?;
    if status != 200 {
        bail!("PUT {path} failed ({status}): {}", String::from_utf8_lossy(&body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("the answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

async fn call(args: CallArgs) -> Result<()> {
    use cadre::signal::codec;
    let addr = resolve(&args.http)?;
    let s = cli_signal("cadre-cli".into(), args.signal_type, args.data)?;
    let path = format!(
        "/v1/agents/{}/{}{}",
        percent_encoding::utf8_percent_encode(&args.agent_type, percent_encoding::NON_ALPHANUMERIC),
        percent_encoding::utf8_percent_encode(&args.id, percent_encoding::NON_ALPHANUMERIC),
        match (&args.read, args.cast) {
            (Some(from), _) => format!("?mode=read&from={from}"),
            (None, true) => "?mode=cast".into(),
            (None, false) => String::new(),
        }
    );
    let body = bytes::Bytes::from(codec::encode_structured(&s));
    let (status, body) =
        cadre::api::client::post(addr, &path, codec::CONTENT_TYPE_STRUCTURED, body, Duration::from_secs(30)).await?;
    let text = String::from_utf8_lossy(&body);
    if status != 200 && status != 202 {
        bail!("the node answered {status}: {text}");
    }
    println!("{text}");
    Ok(())
}

async fn send(args: SendArgs) -> Result<()> {
    use cadre::signal::codec;
    let addr = resolve(&args.http)?;
    let mut s = cli_signal(args.source, args.ty, args.data)?;
    if let Some(id) = args.id {
        s.id = id;
    }
    s.subject = args.subject;
    s.validate()?;
    let body = bytes::Bytes::from(codec::encode_structured(&s));
    let path = match args.broadcast {
        true => "/v1/signals?broadcast=true".to_string(),
        false => format!("/v1/signals?delivery={}", args.delivery),
    };
    let (status, body) =
        cadre::api::client::post(addr, &path, codec::CONTENT_TYPE_STRUCTURED, body, Duration::from_secs(10)).await?;
    let text = String::from_utf8_lossy(&body);
    if status != 202 {
        bail!("the node answered {status}: {text}");
    }
    println!("{text}");
    Ok(())
}

fn routes_check(file: &std::path::Path) -> Result<()> {
    let t = read_table(file)?;
    for line in cadre::routes::check(&t)? {
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = match cli.cmd {
        Cmd::Node(args) => {
            init_logging("info");
            let routes = args.routes.as_deref().map(read_table).transpose();
            let (cfg, routes) = match (node_config(&args), routes) {
                (Ok(cfg), Ok(routes)) => (cfg, routes),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match rt.block_on(run_node(cfg, routes)) {
                Err(e) if matches!(e.downcast_ref(), Some(NodeError::Routes(_) | NodeError::Config(_))) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(EXIT_USAGE);
                }
                other => other,
            }
        }
        Cmd::Send(args) => rt.block_on(send(args)),
        Cmd::Call(args) => rt.block_on(call(args)),
        Cmd::Status { http } => rt.block_on(status(&http)),
        Cmd::Remind(args) => rt.block_on(remind(args)),
        Cmd::Agents { agent_type, stored, after, limit, all, http } => {
            rt.block_on(agents(&http, &agent_type, stored, after, limit, all))
        }
        Cmd::Routes { which: RoutesCmd::Check { file } } => match routes_check(&file) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Cmd::Demo { nodes } => {
            init_logging("warn");
            rt.block_on(demo::run(nodes))
        }
        Cmd::Bench { which: BenchCmd::Transport { seconds, payload } } => {
            init_logging("warn");
            // On a worker thread, like application code; raw baselines run in the same task.
            rt.block_on(async move { tokio::spawn(bench::transport(seconds, payload)).await? })
        }
        Cmd::Bench { which: BenchCmd::Agents { seconds, storage, dedupe_ids, record_only, rounds } } => {
            init_logging("warn");
            let record = bench_agents::RecordOpts { dedupe_ids_max: dedupe_ids, only: record_only, rounds };
            rt.block_on(async move { tokio::spawn(bench_agents::run(seconds, storage, record)).await? })
        }
        Cmd::Bench { which: BenchCmd::Reminders { reminders, rate, seconds } } => {
            init_logging("warn");
            rt.block_on(async move { tokio::spawn(bench_reminders::run(reminders, rate, seconds)).await? })
        }
        Cmd::Bench { which: BenchCmd::Bus { seconds, routes } } => {
            init_logging("warn");
            rt.block_on(async move { tokio::spawn(bench_bus::run(seconds, routes)).await? })
        }
        Cmd::Bench { which: BenchCmd::Pubsub { seconds, payload } } => {
            init_logging("warn");
            rt.block_on(async move { tokio::spawn(bench_pubsub::run(seconds, payload)).await? })
        }
        Cmd::Bench { which: BenchCmd::Router { routes, lookups } } => bench_router::run(routes, lookups),
        Cmd::BenchPubsubPeer(args) => {
            init_logging("warn");
            node_config(&args).and_then(|cfg| rt.block_on(bench_pubsub::peer(cfg)))
        }
        Cmd::BenchRawServer { listen } => rt.block_on(bench::raw_server(listen)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
