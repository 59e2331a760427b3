//! Outbound side: one writer task per peer and lane.
//!
//! The writer dials, runs the handshake, then loops: take everything queued (up to
//! `write_batch_bytes_max` bytes), encode it into frames, write once. Between writes it reads
//! pongs for RTT and sends a ping every `ping_interval_ms`. When the connection fails it backs off
//! and redials; queued messages wait in the bounded queue meanwhile.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{self, Credentials};
use super::queue::{self, Receiver, Sender};
use super::{BoxRead, BoxWrite, DropReason, Inner};
use crate::wire::{self, FrameWriter, Lane, Msg, OutMsg};

/// Messages taken from the queue per wake-up before encoding.
const DRAIN_MSGS_MAX: usize = 1024;

/// Shared state of a peer, readable without its queues.
pub(crate) struct PeerState {
    pub addr: SocketAddr,
    connected: [AtomicBool; 2],
    /// Smoothed RTT in nanoseconds; 0 until the first pong.
    srtt_ns: AtomicU64,
}

impl PeerState {
    pub fn is_connected(&self, lane: Lane) -> bool {
        self.connected[lane as usize].load(Ordering::Relaxed)
    }

    pub fn rtt(&self) -> Option<Duration> {
        match self.srtt_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    fn record_rtt(&self, sample_ns: u64) {
        let sample_ns = sample_ns.max(1);
        let old = self.srtt_ns.load(Ordering::Relaxed);
        // RFC 6298 smoothing: srtt = 7/8 srtt + 1/8 sample.
        let new = if old == 0 { sample_ns } else { (old * 7 + sample_ns) / 8 };
        self.srtt_ns.store(new.max(1), Ordering::Relaxed);
    }
}

/// The map entry of a peer: its queues and state. Dropping every clone closes the queues.
#[derive(Clone)]
pub(crate) struct Peer {
    pub lanes: [Arc<Sender<OutMsg>>; 2],
    pub state: Arc<PeerState>,
}

impl Peer {
    pub fn queue_len(&self, lane: Lane) -> usize {
        self.lanes[lane as usize].len()
    }
}

pub(crate) fn spawn(inner: &Arc<Inner>, addr: SocketAddr) -> Peer {
    let state = Arc::new(PeerState {
        addr,
        connected: [AtomicBool::new(false), AtomicBool::new(false)],
        srtt_ns: AtomicU64::new(0),
    });
    let lanes = Lane::ALL.map(|lane| {
        let (tx, rx) = queue::channel(inner.cfg.peer_queue_len_max);
        inner.writers.spawn(writer(inner.clone(), state.clone(), lane, rx));
        Arc::new(tx)
    });
    Peer { lanes, state }
}

enum ConnEnd {
    /// Every sender is gone and the queue is empty.
    QueueClosed,
    Cancelled,
    Lost(&'static str),
}

async fn writer(inner: Arc<Inner>, state: Arc<PeerState>, lane: Lane, mut rx: Receiver<OutMsg>) {
    let min = Duration::from_millis(inner.cfg.reconnect_backoff_min_ms);
    let max = Duration::from_millis(inner.cfg.reconnect_backoff_max_ms);
    let forget_after = Duration::from_millis(inner.cfg.peer_unreachable_forget_ms);
    let mut backoff = min;
    let mut unreachable_since: Option<Instant> = None;
    let mut ever_connected = false;
    loop {
        if inner.cancel.is_cancelled() {
            return;
        }
        match connect(&inner, state.addr, lane).await {
            Ok((r, w, peer_name, leftover)) => {
                if ever_connected {
                    inner.stats.reconnects.inc();
                    info!(peer = %state.addr, name = %peer_name, lane = lane.as_str(), "reconnected");
                } else {
                    debug!(peer = %state.addr, name = %peer_name, lane = lane.as_str(), "connected");
                }
                ever_connected = true;
                backoff = min;
                unreachable_since = None;
                state.connected[lane as usize].store(true, Ordering::Relaxed);
                let end = run_conn(&inner, &state, lane, &mut rx, r, w, leftover).await;
                state.connected[lane as usize].store(false, Ordering::Relaxed);
                match end {
                    ConnEnd::QueueClosed | ConnEnd::Cancelled => return,
                    ConnEnd::Lost(reason) => {
                        inner.stats.closed(reason);
                        debug!(peer = %state.addr, lane = lane.as_str(), reason, "connection lost");
                    }
                }
            }
            Err(reason) => {
                inner.stats.connect_failures.inc();
                debug!(peer = %state.addr, lane = lane.as_str(), reason, "connect failed");
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= forget_after {
                    forget(&inner, &state, &mut rx);
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = inner.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(max);
            }
        }
        if rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

fn forget(inner: &Inner, state: &Arc<PeerState>, rx: &mut Receiver<OutMsg>) {
    inner.forget(state);
    let dropped = rx.close() as u64;
    inner.stats.drop(DropReason::Forgotten, dropped);
    warn!(peer = %state.addr, dropped, "peer unreachable for too long; forgotten");
}

async fn connect(
    inner: &Inner,
    addr: SocketAddr,
    lane: Lane,
) -> Result<(BoxRead, BoxWrite, String, BytesMut), &'static str> {
    let timeout = Duration::from_millis(inner.cfg.connect_timeout_ms);
    let (mut r, mut w) = match tokio::time::timeout(timeout, inner.net.connect(addr)).await {
        Ok(Ok(rw)) => rw,
        Ok(Err(_)) => return Err("connect_error"),
        Err(_) => return Err("connect_timeout"),
    };
    let creds = Credentials { cluster: &inner.cluster, secret: inner.secret.as_bytes(), local: &inner.local };
    let hs_timeout = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    match auth::dial(&mut r, &mut w, &creds, lane, inner.nonce(), hs_timeout).await {
        Ok((name, leftover)) => Ok((r, w, name, leftover)),
        Err(e) => {
            let reason = e.reason();
            if matches!(e, auth::HandshakeError::Refused(_) | auth::HandshakeError::RefusedByPeer(_)) {
                inner.stats.refused("dialer", reason);
                warn!(peer = %addr, reason, "handshake refused");
            }
            Err("handshake")
        }
    }
}

async fn run_conn(
    inner: &Inner,
    state: &PeerState,
    lane: Lane,
    rx: &mut Receiver<OutMsg>,
    mut r: BoxRead,
    mut w: BoxWrite,
    mut rbuf: BytesMut,
) -> ConnEnd {
    let frame_len_max = inner.cfg.frame_len_max_bytes as usize;
    let idle = Duration::from_millis(inner.cfg.conn_idle_timeout_ms);
    let mut ping = tokio::time::interval(Duration::from_millis(inner.cfg.ping_interval_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fw = FrameWriter::new(frame_len_max);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut batch: Vec<OutMsg> = Vec::with_capacity(DRAIN_MSGS_MAX);
    let mut last_rx = Instant::now();
    loop {
        rbuf.reserve(4096);
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => return ConnEnd::Cancelled,
            n = rx.recv_batch(&mut batch, DRAIN_MSGS_MAX) => {
                if n == 0 {
                    return ConnEnd::QueueClosed;
                }
                fill(inner, rx, &mut batch, &mut fw, &mut wbuf);
            }
            _ = ping.tick() => {
                if last_rx.elapsed() >= idle {
                    return ConnEnd::Lost("idle");
                }
                fw.push(&mut wbuf, &Msg::<&[u8]>::Ping { nonce: inner.now_ns() });
            }
            res = r.read_buf(&mut rbuf) => {
                match res {
                    Ok(0) => return ConnEnd::Lost("closed"),
                    Err(_) => return ConnEnd::Lost("io"),
                    Ok(_) => {
                        last_rx = Instant::now();
                        if let Err(reason) = read_returns(inner, state, lane, &mut rbuf, frame_len_max) {
                            return ConnEnd::Lost(reason);
                        }
                    }
                }
            }
        }
        if !wbuf.is_empty() {
            fw.close(&mut wbuf);
            let (frames, msgs) = (fw.frames, fw.msgs);
            fw.frames = 0;
            fw.msgs = 0;
            let bytes = wbuf.len() as u64;
            match tokio::time::timeout(idle, w.write_all(&wbuf)).await {
                Ok(Ok(())) => inner.stats.sent.add(lane, frames, msgs, bytes),
                Ok(Err(_)) | Err(_) => {
                    inner.stats.drop(DropReason::WriteFailed, msgs);
                    return ConnEnd::Lost("write");
                }
            }
            wbuf.clear();
        }
    }
}

/// Encodes the drained batch, then keeps draining without waiting while there is room.
fn fill(inner: &Inner, rx: &mut Receiver<OutMsg>, batch: &mut Vec<OutMsg>, fw: &mut FrameWriter, wbuf: &mut BytesMut) {
    let limit = inner.cfg.write_batch_bytes_max;
    loop {
        for msg in batch.drain(..) {
            fw.push(wbuf, &msg);
        }
        if wbuf.len() >= limit {
            return;
        }
        if rx.try_recv_batch(batch, DRAIN_MSGS_MAX) == 0 {
            return;
        }
    }
}

/// Handles what comes back on an outbound connection: pongs and immediate replies.
fn read_returns(
    inner: &Inner,
    state: &PeerState,
    lane: Lane,
    rbuf: &mut BytesMut,
    frame_len_max: usize,
) -> Result<(), &'static str> {
    loop {
        let frame = match wire::take_frame(rbuf, frame_len_max) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(_) => return Err("malformed"),
        };
        let now = inner.now_ns();
        let res = wire::decode_frame(&frame, |msg| match msg {
            Msg::Pong { nonce } => state.record_rtt(now.saturating_sub(nonce)),
            Msg::Reply { id, payload } => inner.complete_ask(id, payload),
            _ => {}
        });
        match res {
            Ok(n) => inner.stats.received.add(lane, 1, n as u64, frame.len() as u64 + 4),
            Err(_) => return Err("malformed"),
        }
        if let Some(rtt) = state.rtt() {
            inner
                .stats
                .peer_rtt
                .get_or_create(&crate::metrics::label("peer", state.addr.to_string()))
                .set(rtt.as_secs_f64());
        }
    }
}
