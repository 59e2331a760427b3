//! Transport metrics: frames and messages are counted separately so batching is visible.

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{label, CounterFamily, FloatGaugeFamily, GaugeFamily, Metrics};
use crate::wire::Lane;

/// Why a message handed to the transport was not delivered to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    TooLarge,
    PeersFull,
    /// The peer stayed unreachable past `peer_unreachable_forget_ms`.
    Forgotten,
    /// The connection failed while the message was being written.
    WriteFailed,
    /// An ask refused because `asks_in_flight_max` asks were awaiting replies.
    TooManyAsks,
    /// Still queued when the transport shut down (after the flush time) or was aborted.
    Shutdown,
    /// Sent through a handle whose peer had been forgotten.
    PeerGone,
}

impl DropReason {
    /// In declaration order: a reason's discriminant indexes its counter.
    const ALL: [DropReason; 8] = [
        DropReason::QueueFull,
        DropReason::TooLarge,
        DropReason::PeersFull,
        DropReason::Forgotten,
        DropReason::WriteFailed,
        DropReason::TooManyAsks,
        DropReason::Shutdown,
        DropReason::PeerGone,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::PeersFull => "peers_full",
            DropReason::Forgotten => "forgotten",
            DropReason::WriteFailed => "write_failed",
            DropReason::TooManyAsks => "too_many_asks",
            DropReason::Shutdown => "shutdown",
            DropReason::PeerGone => "peer_gone",
        }
    }
}

/// Counters per lane, indexed by `lane as usize`.
pub struct LaneCounters {
    pub frames: [Counter; 2],
    pub msgs: [Counter; 2],
    pub bytes: [Counter; 2],
}

impl LaneCounters {
    fn new(metrics: &Metrics, dir: &str) -> Self {
        let frames = metrics.counters(&format!("net_frames_{dir}"), &format!("Frames {dir}"));
        let msgs = metrics.counters(&format!("net_messages_{dir}"), &format!("Messages {dir}"));
        let bytes = metrics.counters(&format!("net_bytes_{dir}"), &format!("Bytes {dir}"));
        let by_lane = |f: &CounterFamily| Lane::ALL.map(|l| f.get_or_create_owned(&label("lane", l.as_str())));
        Self { frames: by_lane(&frames), msgs: by_lane(&msgs), bytes: by_lane(&bytes) }
    }

    pub fn add(&self, lane: Lane, frames: u64, msgs: u64, bytes: u64) {
        let i = lane as usize;
        self.frames[i].inc_by(frames);
        self.msgs[i].inc_by(msgs);
        self.bytes[i].inc_by(bytes);
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn frames(&self, lane: Lane) -> u64 {
        self.frames[lane as usize].get()
    }
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn msgs(&self, lane: Lane) -> u64 {
        self.msgs[lane as usize].get()
    }
}

pub struct NetStats {
    pub sent: LaneCounters,
    pub received: LaneCounters,
    dropped: [Counter; 8],
    pub reconnects: Counter,
    pub connect_failures: Counter,
    pub handshake_refused: CounterFamily,
    pub conn_closed: CounterFamily,
    pub queue_depth: GaugeFamily,
    pub peers_connected: GaugeFamily,
    pub peer_rtt: FloatGaugeFamily,
}

impl NetStats {
    pub fn new(metrics: &Metrics) -> Self {
        let dropped = metrics.counters("net_dropped_messages", "Messages not sent, by reason");
        Self {
            sent: LaneCounters::new(metrics, "sent"),
            received: LaneCounters::new(metrics, "received"),
            dropped: DropReason::ALL.map(|r| dropped.get_or_create_owned(&label("reason", r.as_str()))),
            reconnects: metrics
                .counters("net_reconnects", "Outbound connections re-established after a loss")
                .get_or_create_owned(&vec![]),
            connect_failures: metrics
                .counters("net_connect_failures", "Failed outbound connection attempts")
                .get_or_create_owned(&vec![]),
            handshake_refused: metrics.counters("net_handshake_refused", "Handshakes refused, by side and reason"),
            conn_closed: metrics
                .counters("net_connections_closed", "Connections closed because of an error, by reason"),
            queue_depth: metrics.gauges("net_queue_depth", "Messages queued for peers, by lane"),
            peers_connected: metrics.gauges("net_peers_connected", "Peers with a live outbound connection, by lane"),
            peer_rtt: metrics.float_gauges("net_peer_rtt_seconds", "Smoothed round-trip time per peer"),
        }
    }

    pub fn drop(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].inc_by(n);
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].get()
    }

    pub fn refused(&self, side: &'static str, reason: &str) {
        self.handshake_refused.get_or_create(&vec![("side", side.to_string()), ("reason", reason.to_string())]).inc();
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn refused_count(&self, side: &'static str, reason: &str) -> u64 {
        self.handshake_refused
            .get(&vec![("side", side.to_string()), ("reason", reason.to_string())])
            .map(|c| c.get())
            .unwrap_or(0)
    }

    pub fn closed(&self, reason: &'static str) {
        self.conn_closed.get_or_create(&label("reason", reason)).inc();
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub fn closed_count(&self, reason: &'static str) -> u64 {
        self.conn_closed.get(&label("reason", reason)).map(|c| c.get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::DropReason;

    #[test]
    fn reasons_are_listed_in_discriminant_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
