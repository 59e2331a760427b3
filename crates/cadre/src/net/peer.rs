//! Outbound side: one writer task per peer and lane.
//!
//! The writer dials, runs the handshake, then loops: take what is queued (up to
//! `write_batch_bytes_max` bytes per write), encode it into frames, write once, and send a ping
//! every `ping_interval_ms`. A second task per connection reads what comes back (pongs for RTT,
//! immediate replies to asks), so a blocked write never stops this side from reading. When the
//! connection fails the writer backs off and redials; queued messages wait in the bounded queue.

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
/// Initial capacity of a writer's buffer.
const WRITE_BUF_BYTES: usize = 64 * 1024;
/// A writer's buffer grown beyond this by large messages is replaced after the write.
const WRITE_BUF_KEEP_BYTES: usize = 1 << 20;
/// Bytes read per syscall on an outbound connection.
const READ_CHUNK_BYTES: usize = 16 * 1024;

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
        let (tx, rx) = queue::channel(inner.cfg.peer_queue_len_max, inner.cfg.peer_queue_bytes_max);
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
    // A connection lost sooner than this after connecting does not reset the backoff, so a peer
    // that accepts and then drops us is not redialled in a hot loop.
    let stable_after = Duration::from_millis(inner.cfg.conn_idle_timeout_ms);
    let mut backoff = min;
    let mut unreachable_since: Option<Instant> = None;
    let mut ever_connected = false;
    // Messages taken from the queue and not yet encoded; they survive a reconnect.
    let mut batch: Vec<OutMsg> = Vec::with_capacity(DRAIN_MSGS_MAX);
    loop {
        if inner.cancel.is_cancelled() {
            drop_rest(&inner, &mut rx, &mut batch, DropReason::Shutdown);
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
                unreachable_since = None;
                let connected_at = Instant::now();
                state.connected[lane as usize].store(true, Ordering::Relaxed);
                let end = run_conn(&inner, &state, lane, &mut rx, &mut batch, r, w, leftover).await;
                state.connected[lane as usize].store(false, Ordering::Relaxed);
                state.srtt_ns.store(0, Ordering::Relaxed);
                match end {
                    ConnEnd::QueueClosed => return,
                    ConnEnd::Cancelled => {
                        drop_rest(&inner, &mut rx, &mut batch, DropReason::Shutdown);
                        return;
                    }
                    ConnEnd::Lost(reason) => {
                        inner.stats.closed(reason);
                        debug!(peer = %state.addr, lane = lane.as_str(), reason, "connection lost");
                        if connected_at.elapsed() >= stable_after {
                            backoff = min;
                        } else if !pause(&inner, &mut backoff, max).await {
                            drop_rest(&inner, &mut rx, &mut batch, DropReason::Shutdown);
                            return;
                        }
                    }
                }
            }
            Err(reason) => {
                inner.stats.connect_failures.inc();
                debug!(peer = %state.addr, lane = lane.as_str(), reason, "connect failed");
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= forget_after {
                    forget(&inner, &state, &mut rx, &mut batch);
                    return;
                }
                if !pause(&inner, &mut backoff, max).await {
                    drop_rest(&inner, &mut rx, &mut batch, DropReason::Shutdown);
                    return;
                }
            }
        }
        if rx.is_closed() && rx.is_empty() && batch.is_empty() {
            return;
        }
    }
}

/// Sleeps for the current backoff and doubles it; false when the transport shuts down meanwhile.
async fn pause(inner: &Inner, backoff: &mut Duration, max: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = inner.cancel.cancelled() => return false,
    }
    *backoff = (*backoff * 2).min(max);
    true
}

/// Counts everything still queued or taken but unsent as dropped for `reason`.
/// Returns how many.
fn drop_rest(inner: &Inner, rx: &mut Receiver<OutMsg>, batch: &mut Vec<OutMsg>, reason: DropReason) -> usize {
    let n = rx.close() + batch.len();
    batch.clear();
    if n > 0 {
        inner.stats.drop(reason, n as u64);
    }
    n
}

fn forget(inner: &Inner, state: &Arc<PeerState>, rx: &mut Receiver<OutMsg>, batch: &mut Vec<OutMsg>) {
    inner.forget(state);
    let dropped = drop_rest(inner, rx, batch, DropReason::Forgotten);
    inner.stats.peer_rtt.remove(&crate::metrics::label("peer", state.addr.to_string()));
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

#[allow(clippy::too_many_arguments)]
async fn run_conn(
    inner: &Arc<Inner>,
    state: &Arc<PeerState>,
    lane: Lane,
    rx: &mut Receiver<OutMsg>,
    batch: &mut Vec<OutMsg>,
    r: BoxRead,
    mut w: BoxWrite,
    rbuf: BytesMut,
) -> ConnEnd {
    let frame_len_max = inner.cfg.frame_len_max_bytes as usize;
    let limit = inner.cfg.write_batch_bytes_max;
    let idle = Duration::from_millis(inner.cfg.conn_idle_timeout_ms);
    let mut ping = tokio::time::interval(Duration::from_millis(inner.cfg.ping_interval_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fw = FrameWriter::new(frame_len_max);
    let mut wbuf = BytesMut::with_capacity(WRITE_BUF_BYTES);
    // Pongs and replies are read by their own task, so a blocked write can never stop this side
    // from reading (two nodes writing large messages at each other would otherwise deadlock).
    let stop_reader = inner.cancel.child_token();
    let last_rx_ns = Arc::new(AtomicU64::new(inner.now_ns()));
    let mut reader = inner.tasks.spawn(read_returns(
        inner.clone(),
        state.clone(),
        lane,
        r,
        rbuf,
        last_rx_ns.clone(),
        stop_reader.clone(),
    ));
    let _stop_reader = stop_reader.drop_guard();
    loop {
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => return ConnEnd::Cancelled,
            res = &mut reader => return ConnEnd::Lost(res.unwrap_or("reader_failed")),
            _ = ping.tick() => {
                let silent_ns = inner.now_ns().saturating_sub(last_rx_ns.load(Ordering::Relaxed));
                if silent_ns >= idle.as_nanos() as u64 {
                    return ConnEnd::Lost("idle");
                }
                fw.push(&mut wbuf, &Msg::<&[u8]>::Ping { nonce: inner.now_ns() });
            }
            n = rx.recv_batch(batch, DRAIN_MSGS_MAX), if batch.is_empty() => {
                if n == 0 {
                    return ConnEnd::QueueClosed;
                }
            }
            // A backlog: write on without waiting, but still see cancellation and a dead reader.
            _ = std::future::ready(()), if !batch.is_empty() => {}
        }
        encode(rx, batch, &mut fw, &mut wbuf, limit);
        if wbuf.is_empty() {
            continue;
        }
        fw.close(&mut wbuf);
        let (frames, msgs) = (std::mem::take(&mut fw.frames), std::mem::take(&mut fw.msgs));
        let bytes = wbuf.len() as u64;
        match tokio::time::timeout(idle, w.write_all(&wbuf)).await {
            Ok(Ok(())) => inner.stats.sent.add(lane, frames, msgs, bytes),
            Ok(Err(_)) | Err(_) => {
                inner.stats.drop(DropReason::WriteFailed, msgs);
                return ConnEnd::Lost("write");
            }
        }
        wbuf.clear();
        if wbuf.capacity() > WRITE_BUF_KEEP_BYTES.max(2 * limit) {
            // A burst of large messages grew the buffer; do not keep it for the connection's life.
            wbuf = BytesMut::with_capacity(WRITE_BUF_BYTES);
        }
    }
}

/// Encodes taken messages until `limit` bytes are buffered, taking more from the queue (without
/// waiting) while there is room. Messages that do not fit stay in `batch` for the next write.
fn encode(rx: &mut Receiver<OutMsg>, batch: &mut Vec<OutMsg>, fw: &mut FrameWriter, wbuf: &mut BytesMut, limit: usize) {
    loop {
        let mut taken = 0;
        for msg in batch.iter() {
            if wbuf.len() >= limit {
                break;
            }
            fw.push(wbuf, msg);
            taken += 1;
        }
        batch.drain(..taken);
        if wbuf.len() >= limit || rx.try_recv_batch(batch, DRAIN_MSGS_MAX) == 0 {
            return;
        }
    }
}

/// Reads what comes back on an outbound connection (pongs and immediate replies) until the
/// connection fails or `stop` fires; returns why it ended.
async fn read_returns(
    inner: Arc<Inner>,
    state: Arc<PeerState>,
    lane: Lane,
    mut r: BoxRead,
    mut rbuf: BytesMut,
    last_rx_ns: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> &'static str {
    let frame_len_max = inner.cfg.frame_len_max_bytes as usize;
    loop {
        if let Err(reason) = take_returns(&inner, &state, lane, &mut rbuf, frame_len_max) {
            return reason;
        }
        rbuf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return "stopped",
            res = r.read_buf(&mut rbuf) => match res {
                Ok(0) => return "closed",
                Err(_) => return "io",
                Ok(_) => last_rx_ns.store(inner.now_ns(), Ordering::Relaxed),
            },
        }
    }
}

/// Handles the complete frames in `rbuf`: pongs update the RTT, replies complete asks.
fn take_returns(
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
        let mut pong = false;
        let res = wire::decode_frame(&frame, |msg| match msg {
            Msg::Pong { nonce } => {
                state.record_rtt(now.saturating_sub(nonce));
                pong = true;
            }
            Msg::Reply { id, payload } => inner.complete_ask(state.addr, id, payload),
            _ => {}
        });
        match res {
            Ok(n) => inner.stats.received.add(lane, 1, n as u64, frame.len() as u64 + 4),
            Err(_) => return Err("malformed"),
        }
        // Only after a pong: frames of replies must not pay for a label lookup.
        if let (true, Some(rtt)) = (pong, state.rtt()) {
            inner
                .stats
                .peer_rtt
                .get_or_create(&crate::metrics::label("peer", state.addr.to_string()))
                .set(rtt.as_secs_f64());
        }
    }
}
