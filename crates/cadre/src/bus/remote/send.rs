//! The sender of one node's buffer: batches as many queued signals as fit, one batch in flight,
//! retried with back-off until acknowledged (weak signals dropped after a failure); see the
//! module docs of [`super`].

use super::*;

/// Sends one node's buffer in batches, one in flight, until the buffer is dropped.
pub(super) async fn send_loop(remote: Arc<Remote>, peer: Arc<PeerOut>) {
    let mut retry_ms = remote.cfg.retry_ms_min;
    let mut view = remote.membership.watch();
    loop {
        while peer.lock().items.is_empty() {
            tokio::select! {
                _ = peer.notify.notified() => {}
                _ = peer.cancel.cancelled() => return,
            }
        }
        let (payload, n) = batch(&remote.cfg, &peer);
        remote.metrics.batches.inc();
        // `Some(count)`: the receiver answered and took the first `count` (fewer than `n` when its
        // subscriber queues are full: back-pressure, the rest waits). `None`: the batch failed.
        let taken = match remote.ask(&peer.name, payload).await {
            Some(Reply::Accepted { count }) => Some((count as usize).min(n)),
            Some(other) => {
                warn!(node = %peer.name, reply = ?other, "signals refused by the receiver");
                None
            }
            None => None,
        };
        match taken {
            Some(count) if count == n => {
                ack(&remote, &peer, count);
                retry_ms = remote.cfg.retry_ms_min;
                continue;
            }
            // Progress: go on after a short pause (the receiver's queues are draining).
            Some(count) if count > 0 => {
                ack(&remote, &peer, count);
                retry_ms = remote.cfg.retry_ms_min;
            }
            // The receiver is full: back off, keeping even the weak signals (nothing failed).
            Some(_) => {}
            None => drop_weak(&remote, &peer, n),
        }
        // Wait, or less when the membership view changes (a node back).
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(retry_ms)) => {}
            _ = view.changed() => {}
            _ = peer.cancel.cancelled() => return,
        }
        let progress = matches!(taken, Some(c) if c > 0);
        retry_ms = if progress { remote.cfg.retry_ms_min } else { (retry_ms * 2).min(remote.cfg.retry_ms_max) };
    }
}

/// The first signals of the buffer that fit one batch, encoded; and how many.
fn batch(cfg: &PubsubConfig, peer: &PeerOut) -> (Bytes, usize) {
    let outbox = peer.lock();
    let mut bodies: Vec<&[u8]> = Vec::new();
    let mut bytes = 0;
    for item in outbox.items.iter().take(cfg.batch_len_max) {
        let size = item.body.len() + SIGNAL_OVERHEAD_BYTES;
        if !bodies.is_empty() && bytes + size > cfg.batch_bytes_max {
            break;
        }
        bytes += size;
        bodies.push(&item.body);
    }
    let n = bodies.len();
    (encode(&Req::Signals { signals: bodies }), n)
}

/// Removes the first `n` signals, acknowledged.
fn ack(remote: &Remote, peer: &PeerOut, n: usize) {
    let done: Vec<Item> = {
        let mut outbox = peer.lock();
        let done: Vec<Item> = outbox.items.drain(..n).collect();
        outbox.bytes -= done.iter().map(|i| i.body.len()).sum::<usize>();
        done
    };
    for item in &done {
        if let Some(q) = &item.quorum {
            q.acks.add_permits(1);
        }
    }
    remote.metrics.sent.inc_by(n as u64);
    remote.metrics.buffered.dec_by(n as i64);
}

/// After a failed batch of `n`: its `weak` signals are dropped (counted), the others stay.
fn drop_weak(remote: &Remote, peer: &PeerOut, n: usize) {
    let mut outbox = peer.lock();
    let mut kept = VecDeque::with_capacity(outbox.items.len());
    let mut dropped = 0;
    for (i, item) in outbox.items.drain(..).enumerate() {
        if i < n && item.level == Delivery::Weak {
            dropped += 1;
            continue;
        }
        kept.push_back(item);
    }
    outbox.bytes = kept.iter().map(|i| i.body.len()).sum();
    outbox.items = kept;
    drop(outbox);
    if dropped > 0 {
        remote.metrics.dropped.get_or_create(&label("reason", "weak_failed")).inc_by(dropped);
        remote.metrics.buffered.dec_by(dropped as i64);
    }
}
