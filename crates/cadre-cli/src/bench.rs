//! `cadre bench transport`: cross-process tells and asks through the cadre transport, with the
//! raw baseline measured in the same run.
//!
//! Processes: this one (the sender node) and two children: a `cadre node` (the receiver, whose
//! built-in echo handler counts tells and answers asks) and a raw TCP server.
//! - throughput, `--seconds` each for cadre and raw, in alternating rounds: cadre sends tells as
//!   fast as the transport accepts them (back-pressure, no drops), then asks the receiver how many
//!   arrived (throughput = arrived / time until that answer); raw writes length-prefixed frames
//!   over one plain tokio TCP connection (buffered writes) and the server counts them, same
//!   accounting;
//! - latency, `--seconds` in all: sequential asks alternating with raw ping-pongs (one frame out,
//!   the same frame back) on one plain connection, so both see the same conditions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use cadre::config::{Config, Secret};
use cadre::net::PeerSender;
use cadre::node::{Node, NodeOptions, ECHO_COUNT_ASK};
use cadre::wire::{Lane, Msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use crate::proc::{free_port, loopback, wait_ready, NodeProc, NodeSpec};

pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Raw protocol: first byte of a connection selects the mode.
const RAW_MODE_COUNT: u8 = b'C';
pub(crate) const RAW_MODE_ECHO: u8 = b'E';
/// Raw frames are at most this long (the raw server refuses longer ones).
const RAW_FRAME_LEN_MAX: usize = 1 << 20;
const RAW_BUF_BYTES: usize = 256 * 1024;
/// Sends between two clock reads in the throughput loops.
const SENDS_PER_CLOCK_CHECK: u64 = 1024;
/// Alternating rounds of cadre and raw throughput.
const THROUGHPUT_ROUNDS: u32 = 4;

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub async fn transport(seconds: f64, payload_len: usize) -> Result<()> {
    if !(0.1..=600.0).contains(&seconds) {
        bail!("--seconds must be within 0.1..=600");
    }
    if payload_len > 512 * 1024 {
        bail!("--payload must be at most 524288 bytes");
    }
    let phase = Duration::from_secs_f64(seconds);
    let dir = tempfile::Builder::new().prefix("cadre-bench-").tempdir()?;
    let secret = format!("bench-{:016x}", rand::random::<u64>());
    let exe = std::env::current_exe()?;
    let rx = NodeProc::spawn(NodeSpec {
        exe: &exe,
        extra: &[],
        name: "bench-rx",
        seeds: &[],
        dir: dir.path(),
        secret: &secret,
    })?;
    let (mut raw, raw_addr) = spawn_raw_server(&exe)?;
    wait_ready(rx.http, Duration::from_secs(20)).await.with_context(|| rx.log_tail())?;

    let cfg =
        Config { name: "bench-tx".into(), listen: loopback(0), secret: Secret::new(&secret), ..Config::default() };
    let node = Node::start(cfg, NodeOptions::default()).await?;
    let payload = Bytes::from(vec![0xabu8; payload_len]);
    eprintln!("bench transport: payload {payload_len} B, {seconds} s per phase");

    // Warm up: establish the connection.
    node.ask(rx.addr, Bytes::from_static(b"warm"), ASK_TIMEOUT).await?;
    let peer = node.transport().peer(rx.addr)?;

    // Phases 1 and 3 alternate in rounds, and phases 2 and 4 alternate message by message, so that
    // cadre and the raw baseline see the same machine conditions (this VM's speed drifts).
    let mut raw_counter = RawCounter::connect(raw_addr).await?;
    let stats = node.transport().stats();
    let (frames0, msgs0) = (stats.sent.frames(Lane::Data), stats.sent.msgs(Lane::Data));
    let (mut arrived, mut tell_time) = (0u64, Duration::ZERO);
    let (mut raw_frames, mut raw_time) = (0u64, Duration::ZERO);
    for _ in 0..THROUGHPUT_ROUNDS {
        let round = phase / THROUGHPUT_ROUNDS;
        let (n, t) = cadre_tells(&node, &peer, rx.addr, &payload, round).await?;
        arrived += n;
        tell_time += t;
        let (n, t) = raw_counter.run(&payload, round).await?;
        raw_frames += n;
        raw_time += t;
    }
    let (frames, msgs) = (stats.sent.frames(Lane::Data) - frames0, stats.sent.msgs(Lane::Data) - msgs0);
    let tell_rate = arrived as f64 / tell_time.as_secs_f64();
    let raw_rate = raw_frames as f64 / raw_time.as_secs_f64();
    let frames_per_msg = frames as f64 / msgs.max(1) as f64;

    let mut echo = raw_connect(raw_addr, RAW_MODE_ECHO).await?;
    let mut frame = Vec::with_capacity(4 + payload_len);
    frame.extend_from_slice(&(payload_len as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut back = vec![0u8; frame.len()];
    let (mut lat, mut raw_lat) = (Vec::new(), Vec::new());
    // An application ask (its kind in front, encoded once): the echo handler answers the payload.
    let ask = cadre::wire::envelope::app(&payload);
    let start = Instant::now();
    while start.elapsed() < phase {
        let t = Instant::now();
        let reply = peer.ask(ask.clone(), ASK_TIMEOUT).await?;
        lat.push(t.elapsed());
        if reply.len() != payload_len {
            bail!("ask reply of {} bytes, expected {payload_len}", reply.len());
        }
        let t = Instant::now();
        echo.write_all(&frame).await?;
        echo.read_exact(&mut back).await?;
        raw_lat.push(t.elapsed());
    }
    lat.sort();
    raw_lat.sort();
    let (ask_p50, ask_p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let (raw_p50, raw_p99) = (percentile(&raw_lat, 0.5), percentile(&raw_lat, 0.99));
    let asks = lat.len();

    node.shutdown().await;
    let _ = raw.start_kill();
    drop(rx);

    let tell_ratio = tell_rate / raw_rate;
    println!("{:<34} {:>14} {:>14} {:>8}", "measure", "cadre", "raw tcp", "ratio");
    println!("{:<34} {:>14.0} {:>14.0} {:>8.3}", "tell msgs/s", tell_rate, raw_rate, tell_ratio);
    println!("{:<34} {:>14.1} {:>14.1} {:>8.2}", "ask p50 us", us(ask_p50), us(raw_p50), us(ask_p50) / us(raw_p50));
    println!("{:<34} {:>14.1} {:>14.1} {:>8.2}", "ask p99 us", us(ask_p99), us(raw_p99), us(ask_p99) / us(raw_p99));
    println!("{:<34} {:>14.4} {:>14} {:>8}", "frames per msg (tell phase)", frames_per_msg, "-", "-");
    println!("{:<34} {:>14.1} {:>14} {:>8}", "msgs per frame (tell phase)", 1.0 / frames_per_msg.max(1e-12), "-", "-");
    println!("{:<34} {:>14} {:>14} {:>8}", "samples (tells / asks)", format!("{arrived}/{asks}"), "-", "-");
    let json = serde_json::json!({
        "bench": "transport",
        "payload_bytes": payload_len,
        "tell_msgs_per_s": tell_rate.round(),
        "raw_frames_per_s": raw_rate.round(),
        "tell_ratio": (tell_ratio * 1000.0).round() / 1000.0,
        "ask_p50_us": (us(ask_p50) * 10.0).round() / 10.0,
        "ask_p99_us": (us(ask_p99) * 10.0).round() / 10.0,
        "raw_rtt_p50_us": (us(raw_p50) * 10.0).round() / 10.0,
        "raw_rtt_p99_us": (us(raw_p99) * 10.0).round() / 10.0,
        "frames_per_msg": (frames_per_msg * 10000.0).round() / 10000.0,
    });
    println!("{json}");
    Ok(())
}

/// Starts the raw TCP server (`cadre bench-raw-server`) as a child process, killed when dropped;
/// [`raw_connect`] waits for it to listen.
pub(crate) fn spawn_raw_server(exe: &std::path::Path) -> Result<(tokio::process::Child, SocketAddr)> {
    let addr = loopback(free_port()?);
    let child = tokio::process::Command::new(exe)
        .args(["bench-raw-server", "--listen", &addr.to_string()])
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the raw server")?;
    Ok((child, addr))
}

async fn ask_count(node: &Node, to: SocketAddr) -> Result<u64> {
    let reply = node.ask(to, Bytes::from_static(ECHO_COUNT_ASK), ASK_TIMEOUT).await?;
    let bytes: [u8; 8] = reply.as_ref().try_into().context("count reply is not 8 bytes")?;
    Ok(u64::from_le_bytes(bytes))
}

pub(crate) async fn raw_connect(addr: SocketAddr, mode: u8) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                s.write_all(&[mode]).await?;
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => return Err(e).context("raw server unreachable"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Sends tells for `round`, then asks the receiver how many arrived. Every tell must arrive.
pub(crate) async fn cadre_tells(
    node: &Node,
    peer: &PeerSender,
    to: SocketAddr,
    payload: &Bytes,
    round: Duration,
) -> Result<(u64, Duration)> {
    let before = ask_count(node, to).await?;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < round {
        for _ in 0..SENDS_PER_CLOCK_CHECK {
            peer.send(Lane::Data, Msg::Tell(payload.clone())).await?;
        }
        sent += SENDS_PER_CLOCK_CHECK;
    }
    let arrived = ask_count(node, to).await? - before;
    let elapsed = start.elapsed();
    if arrived != sent {
        bail!("sent {sent} tells but {arrived} arrived");
    }
    Ok((arrived, elapsed))
}

/// One plain connection with buffered writes of length-prefixed frames; a zero-length frame asks
/// the server for its count (which it then resets).
pub(crate) struct RawCounter {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
}

impl RawCounter {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self> {
        let (r, w) = raw_connect(addr, RAW_MODE_COUNT).await?.into_split();
        Ok(RawCounter { r: BufReader::new(r), w: BufWriter::with_capacity(RAW_BUF_BYTES, w) })
    }

    pub(crate) async fn run(&mut self, payload: &[u8], round: Duration) -> Result<(u64, Duration)> {
        let len = (payload.len() as u32).to_be_bytes();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < round {
            for _ in 0..SENDS_PER_CLOCK_CHECK {
                self.w.write_all(&len).await?;
                self.w.write_all(payload).await?;
            }
            sent += SENDS_PER_CLOCK_CHECK;
        }
        self.w.write_all(&0u32.to_be_bytes()).await?;
        self.w.flush().await?;
        let count = self.r.read_u64().await?;
        let elapsed = start.elapsed();
        if count != sent {
            bail!("raw: sent {sent} frames, server counted {count}");
        }
        Ok((count, elapsed))
    }
}

/// The raw baseline's receiving side (a child process of the benchmark).
pub async fn raw_server(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(e) = raw_conn(s).await {
                eprintln!("raw server: {e:#}");
            }
        });
    }
}

async fn raw_conn(s: TcpStream) -> Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(RAW_BUF_BYTES, r);
    let mode = r.read_u8().await?;
    let mut buf = vec![0u8; 4 + RAW_FRAME_LEN_MAX];
    let mut count = 0u64;
    loop {
        let len = match r.read_u32().await {
            Ok(len) => len as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if len > RAW_FRAME_LEN_MAX {
            bail!("raw frame of {len} bytes");
        }
        if mode == RAW_MODE_COUNT && len == 0 {
            w.write_all(&count.to_be_bytes()).await?;
            count = 0;
            continue;
        }
        r.read_exact(&mut buf[4..4 + len]).await?;
        match mode {
            RAW_MODE_COUNT => count += 1,
            RAW_MODE_ECHO => {
                // One write per echo, as the cadre writer does.
                buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
                w.write_all(&buf[..4 + len]).await?;
            }
            _ => bail!("unknown raw mode {mode}"),
        }
    }
}
