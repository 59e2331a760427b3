//! The bus's face to other nodes: the figures of its cluster side ([`super::remote`]), advertising this
//! node's patterns, and serving the pub/sub asks other nodes send ([`Bus::on_pubsub_ask`]):
//! batches of signals, broadcasts, interest entries and pulls, waits for a route's mirror.
//!
//! A batch of signals from another node goes to this node's queues all or none (see
//! [`super::publish`]), once per signal id; mirrors of cluster-wide routes are left out, as the
//! publishing node delivered to every route itself. Bad input is refused with a counted reason,
//! never a panic.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::publish::enqueue_all;
use super::subscription::Sub;
use super::{interest, read, remote, Bus, PUBSUB_TAG};
use crate::metrics::label;
use crate::signal::Signal;

impl Bus {
    testing_pub! {
        /// Broadcast figures of this node: copies sent, and the most hops a broadcast took to
        /// reach it.
        fn broadcast_stats(&self) -> remote::BroadcastStats {
            self.inner.remote.as_ref().map(|r| r.broadcast_stats()).unwrap_or_default()
        }
    }

    /// The patterns of this node's node-bound subscriptions.
    fn patterns(&self) -> Vec<String> {
        read(&self.inner.subs).values().filter(|s| s.route_id.is_none()).map(|s| s.pattern.clone()).collect()
    }

    /// Tells the cluster side (and those awaiting a mirror) that the subscriptions changed.
    pub(super) fn advertise(&self) {
        self.inner.subs_changed.send_modify(|n| *n += 1);
        if let Some(r) = self.inner.remote.as_ref() {
            r.set_patterns(self.patterns());
        }
    }

    /// Other nodes this node would send a signal of type `ty` to.
    pub fn remote_nodes_for(&self, ty: &str) -> Vec<String> {
        self.inner.remote.as_ref().map(|r| r.nodes_for(ty)).unwrap_or_default()
    }

    /// Waits until the other nodes interested in `ty` satisfy `cond` (the interest map converges
    /// through gossip); false if the bus has no cluster side or `timeout` passes first.
    pub async fn await_remote_nodes(&self, ty: &str, timeout: Duration, cond: impl Fn(&[String]) -> bool) -> bool {
        let Some(r) = self.inner.remote.as_ref() else { return false };
        let mut rx = r.watch();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if cond(&r.nodes_for(ty)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// The interest map as this node holds it: each node's advertised patterns.
    pub(crate) fn interest(&self) -> Vec<interest::Entry> {
        self.inner.remote.as_ref().map(|r| r.newer_than(&[])).unwrap_or_default()
    }

    /// Signal copies buffered for other nodes.
    pub fn remote_buffered(&self) -> usize {
        self.inner.remote.as_ref().map_or(0, |r| r.buffered())
    }

    /// Serves a pub/sub ask from another node (payload starting with `PUBSUB_TAG`); returns
    /// the reply. Bad input is refused with a counted reason, never a panic.
    ///
    /// A batch of signals (up to `batch_len_max`, milliseconds of work) is taken on a task of its
    /// own and answered through `Transport::reply`, so the connection's reader goes
    /// on with other asks meanwhile; order holds, as a sender has one batch in flight. Other
    /// requests are answered at once (`Some`).
    pub(crate) fn on_pubsub_ask(
        &self,
        from: &crate::net::PeerInfo,
        id: u64,
        payload: bytes::Bytes,
    ) -> Option<bytes::Bytes> {
        let signals = payload.get(1) == Some(&remote::SIGNALS_VARIANT);
        let route_wait = payload.get(1) == Some(&remote::AWAIT_ROUTE_VARIANT);
        let transport = self.inner.remote.as_ref().and_then(|r| r.transport());
        match (signals, route_wait, transport) {
            (true, _, Some(transport)) => {
                let (bus, from) = (self.clone(), from.clone());
                self.inner.tasks.spawn(async move {
                    let reply = bus.serve_pubsub(&from.name, &payload);
                    let _ = transport.reply(from.addr, id, reply);
                });
                None
            }
            (_, true, Some(transport)) => {
                let Ok(permit) = self.inner.route_waits.clone().try_acquire_owned() else {
                    // Over the limit: answered at once with what is mirrored now.
                    return Some(self.serve_pubsub(&from.name, &payload));
                };
                let Ok(remote::Req::AwaitRoute { id: route, timeout_ms }) =
                    postcard::from_bytes::<remote::Req<'_>>(&payload[1..])
                else {
                    return Some(self.serve_pubsub(&from.name, &payload));
                };
                let (bus, from) = (self.clone(), from.clone());
                self.inner.tasks.spawn(async move {
                    let wait = Duration::from_millis(timeout_ms.min(remote::ROUTE_WAIT_MS_MAX));
                    // Not past shutdown: answered "not mirrored" then.
                    let count = tokio::select! {
                        mirrored = bus.await_mirror(route, wait) => u32::from(mirrored),
                        () = bus.inner.cancel.cancelled() => 0,
                    };
                    let _ = transport.reply(from.addr, id, remote::encode(&remote::Reply::Accepted { count }));
                    drop(permit);
                });
                None
            }
            _ => Some(self.serve_pubsub(&from.name, &payload)),
        }
    }

    fn serve_pubsub(&self, from: &str, payload: &[u8]) -> bytes::Bytes {
        let Some(r) = self.inner.remote.as_ref() else {
            return remote::encode(&remote::Reply::Refused("not in a cluster yet".into()));
        };
        let req = match payload.strip_prefix(&[PUBSUB_TAG]).map(postcard::from_bytes::<remote::Req<'_>>) {
            Some(Ok(req)) => req,
            _ => {
                warn!(%from, "undecodable pub/sub request");
                r.count_refused("undecodable");
                return remote::encode(&remote::Reply::Refused("undecodable request".into()));
            }
        };
        let reply = match req {
            remote::Req::Signals { signals } => {
                let mut count = 0u32;
                for body in signals {
                    match crate::signal::codec::decode_structured(body) {
                        Ok(signal) => {
                            let signal = Arc::new(signal);
                            if !r.take_once(&signal, || self.deliver_remote(&signal)) {
                                break;
                            }
                        }
                        // Taken as done: sending it again would not make it valid.
                        Err(e) => {
                            warn!(%from, error = %e, "invalid signal from another node");
                            r.count_refused("invalid_signal");
                        }
                    }
                    count += 1;
                }
                remote::Reply::Accepted { count }
            }
            remote::Req::Broadcast { hops, rest, signal } => {
                match crate::signal::codec::decode_structured(signal) {
                    Ok(decoded) => {
                        let decoded = Arc::new(decoded);
                        // Best effort: a full queue here does not stop the others' copies.
                        r.take_once(&decoded, || self.deliver_remote(&decoded));
                        r.forward_broadcast(bytes::Bytes::copy_from_slice(signal), hops, rest);
                        remote::Reply::Accepted { count: 1 }
                    }
                    Err(e) => {
                        warn!(%from, error = %e, "invalid broadcast signal from another node");
                        r.count_refused("invalid_signal");
                        remote::Reply::Refused(format!("invalid signal: {e}"))
                    }
                }
            }
            remote::Req::Interest(entry) => remote::Reply::Accepted { count: r.merge(vec![entry]) },
            remote::Req::Pull(digest) => remote::Reply::Entries(r.newer_than(&digest)),
            remote::Req::AwaitRoute { id, .. } => remote::Reply::Accepted { count: u32::from(self.mirrors(id)) },
        };
        remote::encode(&reply)
    }

    /// Routes a signal from another node to this node's subscriptions, all or none (see
    /// [`enqueue_all`]). False when a queue is full: the sender keeps it and tries again.
    ///
    /// Mirrors of cluster-wide routes are left out: the publishing node delivered to every route
    /// itself, so a copy sent here for this node's own subscriptions must not reach the route
    /// again (with a matching subscription on k other nodes, an agent would get k + 1 copies).
    fn deliver_remote(&self, signal: &Arc<Signal>) -> bool {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return false;
        }
        let mut targets: Vec<Arc<Sub>> = {
            let subs = read(&inner.subs);
            let router = read(&inner.router);
            match router.route(&signal.ty, signal) {
                Ok(ids) => {
                    ids.into_iter().filter_map(|id| subs.get(id).filter(|s| s.route_id.is_none()).cloned()).collect()
                }
                Err(_) => Vec::new(),
            }
        };
        targets.sort_by_key(|s| s.id);
        targets.dedup_by_key(|s| s.id);
        if !enqueue_all(inner, &targets, signal, signal.size_hint_bytes()) {
            inner.metrics.rejected.get_or_create(&label("reason", "remote_queue_full")).inc();
            return false;
        }
        inner.journal.record(signal);
        true
    }

    /// Waits (at most `timeout`) for the buffers to other nodes to empty: a graceful stop
    /// delivers what it acknowledged to the nodes that are reachable.
    pub async fn flush_remote(&self, timeout: Duration) {
        if let Some(r) = self.inner.remote.as_ref() {
            r.flush(timeout).await;
        }
    }
}
