//! The signals sections: signals on one node (`[signals]`) and across the cluster (`[pubsub]`).

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, SIGNALS_BYTES_MAX, SIGNALS_COUNT_MAX};

/// Longest value of a string attribute of a signal (id, source, type, subject, content type,
/// schema, extension).
pub const ATTRIBUTE_LEN_MAX_BYTES: usize = 4096;
/// Most patterns an interest entry received from a peer may carry.
pub const INTEREST_PATTERNS_MAX: usize = 65_536;

/// Signals on one node: ingress, the bus, subscriptions and their delivery.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SignalsConfig {
    /// `source` of signals this node makes; default `cadre://<cluster>/<name>`.
    pub source: Option<String>,
    /// Largest `POST /v1/signals` body; bigger is refused with 413.
    pub ingress_body_bytes_max: usize,
    /// Subscriptions on the node; more are refused.
    pub subscriptions_max: usize,
    /// Default queue length per subscriber (a subscription may choose its own, up to 16x this).
    /// What happens when full is the subscription's overflow policy.
    pub subscriber_queue_len_max: usize,
    /// Bytes (by `Signal::size_hint_bytes`) one subscriber queue may hold; one signal always fits
    /// an empty queue. Full: the overflow policy, as for the length.
    pub subscriber_queue_bytes_max: usize,
    /// Bytes all subscriber queues of the node may hold together. Full: `reject` subscriptions
    /// refuse the publish; `drop_oldest` ones drop from their own queue to make room.
    pub queued_bytes_max: usize,
    /// Signals remembered by the causality journal; the oldest is forgotten first.
    pub journal_len_max: usize,
    /// Dead letters kept; the oldest is dropped (and counted) first.
    pub deadletters_len_max: usize,
    /// Bytes of (encoded) dead letters kept; the oldest is dropped first.
    pub deadletters_bytes_max: usize,
    /// Time a webhook request may take before the attempt counts as failed.
    pub webhook_timeout_ms: u64,
    /// Retries after a failed webhook attempt (so `1 + retries` attempts in all).
    pub webhook_retries_max: u32,
    /// First retry delay; doubles per retry up to `webhook_backoff_max_ms`, with jitter.
    pub webhook_backoff_min_ms: u64,
    /// Longest retry delay (see `webhook_backoff_min_ms`).
    pub webhook_backoff_max_ms: u64,
    /// Consecutive failures that open a target URL's circuit breaker.
    pub breaker_failures_max: u32,
    /// Time an open breaker refuses attempts before letting one trial through.
    pub breaker_cooldown_ms: u64,
    /// Time each middleware may take per call; over it counts as a rejection (fail closed).
    pub middleware_budget_ms: u64,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self {
            source: None,
            ingress_body_bytes_max: 4 << 20,
            subscriptions_max: 10_000,
            subscriber_queue_len_max: 1024,
            subscriber_queue_bytes_max: 16 << 20,
            queued_bytes_max: 256 << 20,
            journal_len_max: 10_000,
            deadletters_len_max: 1000,
            deadletters_bytes_max: 64 << 20,
            webhook_timeout_ms: 5000,
            webhook_retries_max: 5,
            webhook_backoff_min_ms: 100,
            webhook_backoff_max_ms: 10_000,
            breaker_failures_max: 5,
            breaker_cooldown_ms: 30_000,
            middleware_budget_ms: 50,
        }
    }
}

/// Signals across the cluster: the interest map, the buffers to other nodes, de-duplication.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PubsubConfig {
    /// Signals buffered for one other node (sent or waiting to be). Full: an `eventual` or
    /// `strong` publish that would add to it fails with `BufferFull`; a `weak` one skips that node
    /// (counted).
    pub peer_buffer_len_max: usize,
    /// Bytes (encoded signals) buffered for one other node; full as for the length.
    pub peer_buffer_bytes_max: usize,
    /// Most signals in one batch to a node (one ask, one acknowledgement).
    pub batch_len_max: usize,
    /// Most bytes of signals in one batch; must fit a transport frame. A single signal larger than
    /// this goes alone; one larger than a frame cannot go to other nodes (`TooLarge`).
    pub batch_bytes_max: usize,
    /// Time a node has to acknowledge a batch before it is sent again (weak signals in it are dropped).
    pub ack_timeout_ms: u64,
    /// First wait before sending a batch again; doubles up to `retry_ms_max`.
    pub retry_ms_min: u64,
    /// Longest wait before sending a batch again (see `retry_ms_min`).
    pub retry_ms_max: u64,
    /// Signal ids a receiver remembers to drop copies sent twice; the oldest is forgotten first.
    pub dedup_window_len_max: usize,
    /// Time a `strong` publish waits for a majority of its target nodes; then it fails (the
    /// signal may still be delivered from the buffers).
    pub strong_timeout_ms: u64,
    /// Between two pulls of the interest map from a random member.
    pub interest_sync_interval_ms: u64,
    /// Distinct patterns a node advertises; beyond it advertises `**` (gets every signal).
    pub interest_patterns_max: usize,
    /// Time a member may stay down before its buffer is dropped (counted) and its interest
    /// forgotten; until then signals for it are kept and sent when it is back.
    pub down_keep_ms: u64,
    /// Copies a node sends of one broadcast (each receiver reaches its share of the rest).
    pub broadcast_fanout: usize,
}

impl Default for PubsubConfig {
    fn default() -> Self {
        Self {
            peer_buffer_len_max: 65_536,
            peer_buffer_bytes_max: 64 << 20,
            batch_len_max: 1024,
            batch_bytes_max: 512 << 10,
            ack_timeout_ms: 2000,
            retry_ms_min: 50,
            retry_ms_max: 2000,
            dedup_window_len_max: 65_536,
            strong_timeout_ms: 5000,
            interest_sync_interval_ms: 1000,
            interest_patterns_max: 1024,
            down_keep_ms: 600_000,
            broadcast_fanout: 4,
        }
    }
}

impl PubsubConfig {
    /// Checks the section against the transport's `frame_len_max_bytes`.
    pub fn validate(&self, frame_len_max_bytes: usize) -> Result<(), ConfigError> {
        let counts = [
            ("pubsub.peer_buffer_len_max", self.peer_buffer_len_max),
            ("pubsub.batch_len_max", self.batch_len_max),
            ("pubsub.dedup_window_len_max", self.dedup_window_len_max),
            ("pubsub.interest_patterns_max", self.interest_patterns_max),
        ];
        for (field, v) in counts {
            positive(field, v as u64)?;
            if v > SIGNALS_COUNT_MAX {
                return Err(invalid(field, format!("must be at most {SIGNALS_COUNT_MAX}")));
            }
        }
        positive("pubsub.peer_buffer_bytes_max", self.peer_buffer_bytes_max as u64)?;
        if self.peer_buffer_bytes_max > SIGNALS_BYTES_MAX {
            return Err(invalid("pubsub.peer_buffer_bytes_max", "must be at most 64 GiB"));
        }
        if self.interest_patterns_max > INTEREST_PATTERNS_MAX {
            return Err(invalid("pubsub.interest_patterns_max", "must be at most 65536"));
        }
        let batch_max = crate::bus::remote::batch_bytes_limit(frame_len_max_bytes);
        if self.batch_bytes_max == 0 || self.batch_bytes_max > batch_max {
            return Err(invalid(
                "pubsub.batch_bytes_max",
                format!("must be within 1..={batch_max} (net.frame_len_max_bytes)"),
            ));
        }
        for (field, v) in [
            ("pubsub.ack_timeout_ms", self.ack_timeout_ms),
            ("pubsub.retry_ms_min", self.retry_ms_min),
            ("pubsub.retry_ms_max", self.retry_ms_max),
            ("pubsub.strong_timeout_ms", self.strong_timeout_ms),
            ("pubsub.interest_sync_interval_ms", self.interest_sync_interval_ms),
            ("pubsub.down_keep_ms", self.down_keep_ms),
        ] {
            positive(field, v)?;
        }
        if self.retry_ms_min > self.retry_ms_max {
            return Err(invalid("pubsub.retry_ms_min", "must not exceed pubsub.retry_ms_max"));
        }
        if !(2..=BROADCAST_FANOUT_MAX).contains(&self.broadcast_fanout) {
            return Err(invalid("pubsub.broadcast_fanout", format!("must be within 2..={BROADCAST_FANOUT_MAX}")));
        }
        Ok(())
    }
}

/// Largest broadcast fanout.
const BROADCAST_FANOUT_MAX: usize = 64;

impl SignalsConfig {
    /// Checks every field's range and their relations; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.source {
            let long = s.len() > ATTRIBUTE_LEN_MAX_BYTES;
            if s.is_empty() || long || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(invalid("signals.source", "must be a URI reference of 1..=4096 bytes without spaces"));
            }
        }
        let counts = [
            ("signals.subscriptions_max", self.subscriptions_max),
            ("signals.subscriber_queue_len_max", self.subscriber_queue_len_max),
            ("signals.journal_len_max", self.journal_len_max),
            ("signals.deadletters_len_max", self.deadletters_len_max),
        ];
        for (field, value) in counts {
            if value > SIGNALS_COUNT_MAX {
                return Err(invalid(field, format!("must be at most {SIGNALS_COUNT_MAX}")));
            }
        }
        for (field, value) in [
            ("signals.subscriber_queue_bytes_max", self.subscriber_queue_bytes_max),
            ("signals.queued_bytes_max", self.queued_bytes_max),
            ("signals.deadletters_bytes_max", self.deadletters_bytes_max),
        ] {
            if value == 0 || value > SIGNALS_BYTES_MAX {
                return Err(invalid(field, format!("must be within 1..={SIGNALS_BYTES_MAX}")));
            }
        }
        positive("signals.ingress_body_bytes_max", self.ingress_body_bytes_max as u64)?;
        if self.ingress_body_bytes_max > 256 << 20 {
            return Err(invalid("signals.ingress_body_bytes_max", "must be at most 256 MiB"));
        }
        positive("signals.subscriptions_max", self.subscriptions_max as u64)?;
        positive("signals.subscriber_queue_len_max", self.subscriber_queue_len_max as u64)?;
        positive("signals.journal_len_max", self.journal_len_max as u64)?;
        positive("signals.deadletters_len_max", self.deadletters_len_max as u64)?;
        positive("signals.webhook_timeout_ms", self.webhook_timeout_ms)?;
        positive("signals.webhook_backoff_min_ms", self.webhook_backoff_min_ms)?;
        positive("signals.webhook_backoff_max_ms", self.webhook_backoff_max_ms)?;
        positive("signals.breaker_failures_max", self.breaker_failures_max as u64)?;
        positive("signals.breaker_cooldown_ms", self.breaker_cooldown_ms)?;
        positive("signals.middleware_budget_ms", self.middleware_budget_ms)?;
        if self.webhook_retries_max > 100 {
            return Err(invalid("signals.webhook_retries_max", "must be at most 100"));
        }
        if self.webhook_backoff_min_ms > self.webhook_backoff_max_ms {
            return Err(invalid("signals.webhook_backoff_min_ms", "must not exceed signals.webhook_backoff_max_ms"));
        }
        Ok(())
    }
}
