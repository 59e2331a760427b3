//! Inbound side: the accept loop and one reader task per accepted connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::auth::{self, Credentials, HandshakeError};
use super::{BoxRead, BoxWrite, Handler, Inner, Listener, PeerInfo};
use crate::wire::{self, FrameWriter, Lane, Msg};

/// Bytes read per syscall on an inbound connection (more when a frame needs it).
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Pause after an accept error (e.g. out of file descriptors) before accepting again.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;
/// Idle checks per `conn_idle_timeout_ms` (an idle connection is closed within 1.25x the timeout).
const IDLE_CHECKS_PER_TIMEOUT: u32 = 4;

/// Accepts until the transport stops; each reader hands what it reads to `handler`.
pub(crate) async fn accept_loop(inner: Arc<Inner>, listener: Box<dyn Listener>, handler: Arc<dyn Handler>) {
    loop {
        let accepted = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            res = listener.accept() => res,
        };
        match accepted {
            Ok((r, w, remote)) => {
                let Ok(permit) = inner.inbound_permits.clone().try_acquire_owned() else {
                    inner.stats.closed("too_many_connections");
                    warn!(%remote, "inbound connection limit reached; closing");
                    continue;
                };
                let task = serve(inner.clone(), handler.clone(), r, w, remote, permit);
                inner.tasks.spawn(task);
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
            }
        }
    }
}

/// A live inbound reader, as recorded per (peer, lane).
pub(crate) struct InboundEntry {
    generation: u64,
    stop: CancellationToken,
    finished: CancellationToken,
}

struct InboundSlot {
    generation: u64,
    stop: CancellationToken,
    finished: CancellationToken,
    older_finished: Option<CancellationToken>,
}

impl Inner {
    /// Records a new authenticated inbound connection and stops the reader of any older one from
    /// the same peer and lane (its unread bytes are dropped, counted as `superseded`: delivery
    /// stays in send order and at most once). The new reader waits for the old one to finish.
    fn register_inbound(&self, peer: SocketAddr, lane: Lane) -> InboundSlot {
        let generation = self.inbound_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stop = self.cancel.child_token();
        let finished = CancellationToken::new();
        let entry = InboundEntry { generation, stop: stop.clone(), finished: finished.clone() };
        let old = self.inbound.lock().unwrap_or_else(|e| e.into_inner()).insert((peer, lane), entry);
        let older_finished = old.map(|old| {
            old.stop.cancel();
            old.finished
        });
        InboundSlot { generation, stop, finished, older_finished }
    }

    fn unregister_inbound(&self, peer: SocketAddr, lane: Lane, generation: u64) {
        let mut map = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&(peer, lane)).is_some_and(|e| e.generation == generation) {
            map.remove(&(peer, lane));
        }
    }
}

async fn serve(
    inner: Arc<Inner>,
    handler: Arc<dyn Handler>,
    mut r: BoxRead,
    mut w: BoxWrite,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let creds = Credentials { cluster: &inner.cluster, secret: inner.secret.as_bytes(), local: &inner.local };
    let timeout = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    let handshake = tokio::select! {
        _ = inner.cancel.cancelled() => return,
        res = auth::accept(&mut r, &mut w, &creds, inner.nonce(), timeout) => res,
    };
    let (peer, lane, rbuf) = match handshake {
        Ok(ok) => ok,
        Err(e) => {
            let reason = e.reason();
            inner.stats.refused("acceptor", reason);
            match e {
                HandshakeError::Refused(_) => warn!(%remote, reason, "refused peer at handshake"),
                _ => debug!(%remote, reason, "handshake did not complete"),
            }
            return;
        }
    };
    debug!(%remote, peer = %peer.name, lane = lane.as_str(), "accepted");
    let slot = inner.register_inbound(peer.addr, lane);
    let _finished = slot.finished.clone().drop_guard();
    if let Some(older) = &slot.older_finished {
        // The older reader stops at its next step; deliver nothing of ours before it has.
        tokio::select! {
            _ = older.cancelled() => {}
            _ = slot.stop.cancelled() => return,
        }
    }
    let res = read_loop(&inner, &*handler, &peer, lane, r, w, rbuf, &slot.stop).await;
    inner.unregister_inbound(peer.addr, lane, slot.generation);
    if let Err(reason) = res {
        inner.stats.closed(reason);
        if matches!(reason, "malformed" | "oversized") {
            warn!(peer = %peer.name, addr = %peer.addr, reason, "closing connection on bad input");
        } else {
            debug!(peer = %peer.name, reason, "inbound connection ended");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    inner: &Inner,
    handler: &dyn Handler,
    peer: &PeerInfo,
    lane: Lane,
    mut r: BoxRead,
    mut w: BoxWrite,
    mut rbuf: BytesMut,
    stop: &CancellationToken,
) -> Result<(), &'static str> {
    let frame_len_max = inner.cfg.frame_len_max_bytes as usize;
    let idle = Duration::from_millis(inner.cfg.conn_idle_timeout_ms);
    // Pongs and immediate replies, written back on this connection after each read.
    let mut back = BytesMut::new();
    let mut back_writer = FrameWriter::new(frame_len_max);
    // Idleness is checked on a coarse tick rather than with a timer per read (cheaper per message).
    let mut idle_check = tokio::time::interval(idle / IDLE_CHECKS_PER_TIMEOUT);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        loop {
            match wire::take_frame(&mut rbuf, frame_len_max) {
                Ok(Some(frame)) => {
                    let res = wire::decode_frame(&frame, |msg| match msg {
                        Msg::Ping { nonce } => back_writer.push(&mut back, &Msg::<&[u8]>::Pong { nonce }),
                        other => {
                            if let Some(reply) = inner.deliver(handler, peer, lane, other) {
                                if reply.payload_len() <= back_writer.payload_len_max() {
                                    back_writer.push(&mut back, &reply);
                                } else {
                                    inner.stats.drop(super::DropReason::TooLarge, 1);
                                }
                            }
                        }
                    });
                    match res {
                        Ok(n) => inner.stats.received.add(lane, 1, n as u64, frame.len() as u64 + 4),
                        Err(e) => {
                            warn!(peer = %peer.name, error = %e, "bad frame");
                            return Err("malformed");
                        }
                    }
                }
                Ok(None) => break,
                Err(wire::WireError::FrameTooLarge { len, max }) => {
                    warn!(peer = %peer.name, len, max, "frame too large");
                    return Err("oversized");
                }
                Err(_) => return Err("malformed"),
            }
        }
        if !back.is_empty() {
            back_writer.close(&mut back);
            let (frames, msgs) = (std::mem::take(&mut back_writer.frames), std::mem::take(&mut back_writer.msgs));
            if tokio::time::timeout(idle, w.write_all(&back)).await.map_or(true, |r| r.is_err()) {
                return Err("write");
            }
            inner.stats.sent.add(lane, frames, msgs, back.len() as u64);
            back.clear();
        }
        rbuf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            biased;
            // Shutdown, or a newer connection from the same peer and lane took over.
            _ = stop.cancelled() => return if inner.cancel.is_cancelled() { Ok(()) } else { Err("superseded") },
            res = r.read_buf(&mut rbuf) => match res {
                Err(_) => return Err("io"),
                Ok(0) => return Ok(()),
                Ok(_) => last_rx = Instant::now(),
            },
            _ = idle_check.tick() => {
                if last_rx.elapsed() >= idle {
                    return Err("idle");
                }
            }
        }
    }
}
