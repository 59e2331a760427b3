//! Node configuration.
//!
//! One [`Config`] per node. Every limit is a named field whose name ends in its unit and whose doc
//! comment says what happens when the limit is hit. [`Config::validate`] runs at start and refuses
//! inconsistent values with a typed [`ConfigError`] naming the field.
//!
//! Sources, lowest precedence first: built-in defaults, a TOML file ([`Config::from_toml_str`]),
//! environment and command-line flags (applied by the binary). The shared secret is never read
//! from the TOML file itself: it comes from a file path or the `CADRE_SECRET` environment variable,
//! so configuration files can be shared without leaking it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field has a value the node cannot run with.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The TOML text could not be parsed.
    #[error("config file: {0}")]
    Parse(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

/// The shared cluster secret. Its `Debug` form never shows the bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes; surrounding whitespace (a trailing newline in a file) is trimmed.
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(bytes.as_ref().trim_ascii().to_vec())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// Configuration of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Node name shown to operators; unique within the cluster.
    pub name: String,
    /// Cluster name; a peer presenting another cluster name is refused at the handshake.
    pub cluster: String,
    /// Address the node transport listens on (and that peers dial).
    pub listen: SocketAddr,
    /// Transport address announced to peers, when it differs from `listen` (e.g. listening on
    /// `0.0.0.0`). Defaults to the bound listen address.
    pub advertise: Option<SocketAddr>,
    /// Address of the HTTP API; `None` runs no HTTP server (simulation, embedded use).
    pub http: Option<SocketAddr>,
    /// Transport addresses to join through. Empty: the node forms a cluster of one.
    pub seeds: Vec<SocketAddr>,
    /// Directory for node-local state (incarnation counter now, storage later).
    pub data_dir: Option<PathBuf>,
    /// File holding the shared secret (read by the binary; `CADRE_SECRET` is the alternative).
    pub secret_file: Option<PathBuf>,
    /// Shared secret; never serialized.
    #[serde(skip)]
    pub secret: Secret,
    /// Seed for the node's random choices (membership probing order, handshake nonces).
    /// `None` draws one from the OS; simulations set it so a run replays exactly.
    pub rng_seed: Option<u64>,
    pub net: NetConfig,
    pub membership: MembershipConfig,
    pub signals: SignalsConfig,
    pub pubsub: PubsubConfig,
    pub agents: AgentsConfig,
    pub meta: MetaConfig,
    pub placement: PlacementConfig,
    pub storage: StorageConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "n1".into(),
            cluster: "cadre".into(),
            listen: "127.0.0.1:7101".parse().expect("static address"),
            advertise: None,
            http: None,
            seeds: Vec::new(),
            data_dir: None,
            secret_file: None,
            secret: Secret::default(),
            rng_seed: None,
            net: NetConfig::default(),
            membership: MembershipConfig::default(),
            signals: SignalsConfig::default(),
            pubsub: PubsubConfig::default(),
            agents: AgentsConfig::default(),
            meta: MetaConfig::default(),
            placement: PlacementConfig::default(),
            storage: StorageConfig::default(),
        }
    }
}

/// Limits and timings of the node transport.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Largest frame accepted or produced. A bigger incoming frame closes that connection with a
    /// logged reason; a message that cannot fit in a frame is refused with `SendError::TooLarge`.
    pub frame_len_max_bytes: u32,
    /// Messages queued per peer and lane, including while the peer is unreachable (the queue is the
    /// reconnect buffer and is flushed on reconnect). When full, `try_send` fails with
    /// `SendError::QueueFull` (counted as a drop) and `send` waits for room (back-pressure).
    pub peer_queue_len_max: usize,
    /// Payload bytes queued per peer and lane (with a small per-message overhead). Full: as for
    /// `peer_queue_len_max`. One message larger than this is still accepted into an empty queue.
    pub peer_queue_bytes_max: usize,
    /// Bytes a writer gathers from its queue before one write syscall; more pending messages wait
    /// for the next write.
    pub write_batch_bytes_max: usize,
    /// Distinct peers with outbound queues. A send to one more peer fails with
    /// `SendError::PeersFull`.
    pub peers_max: usize,
    /// Accepted connections open at once; further connections are closed at accept and counted.
    pub inbound_conns_max: usize,
    /// Time allowed for a TCP connect; then the attempt counts as failed and backs off.
    pub connect_timeout_ms: u64,
    /// Time allowed for the handshake; then the connection is closed and counted as refused.
    pub handshake_timeout_ms: u64,
    /// First reconnect delay; doubled after each failure up to `reconnect_backoff_max_ms`.
    pub reconnect_backoff_min_ms: u64,
    /// Largest reconnect delay.
    pub reconnect_backoff_max_ms: u64,
    /// A peer that stays unreachable this long is forgotten: its queued messages are dropped
    /// (counted) and its writer stops. A later send starts afresh.
    pub peer_unreachable_forget_ms: u64,
    /// Interval of RTT pings on each outbound connection.
    pub ping_interval_ms: u64,
    /// A connection that carries no frame (pings included) for this long is closed and redialled.
    pub conn_idle_timeout_ms: u64,
    /// Asks awaiting a reply at once; one more fails with `SendError::TooManyAsks`.
    pub asks_in_flight_max: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            frame_len_max_bytes: 1 << 20,
            peer_queue_len_max: 16 * 1024,
            peer_queue_bytes_max: 64 << 20,
            write_batch_bytes_max: 256 * 1024,
            peers_max: 1024,
            inbound_conns_max: 4096,
            connect_timeout_ms: 1000,
            handshake_timeout_ms: 2000,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 1000,
            peer_unreachable_forget_ms: 60_000,
            ping_interval_ms: 200,
            conn_idle_timeout_ms: 2000,
            asks_in_flight_max: 64 * 1024,
        }
    }
}

/// Timings and limits of SWIM membership.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipConfig {
    /// One member is probed per period; a member that answers neither directly nor indirectly
    /// within the period becomes `suspect`.
    pub probe_period_ms: u64,
    /// Wait for a direct probe reply before asking others to probe indirectly.
    pub probe_rtt_ms: u64,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// A `suspect` member that does not refute within this time becomes `down`.
    pub suspect_to_down_ms: u64,
    /// Interval of extra gossip of membership updates.
    pub gossip_interval_ms: u64,
    /// Members gossiped to per interval.
    pub gossip_fanout: usize,
    /// Interval at which a node asks a random member for more members, and tries members it
    /// considers `down` (this is how partitions heal).
    pub announce_interval_ms: u64,
    /// While not yet joined, seeds are announced to at this interval.
    pub join_retry_interval_ms: u64,
    /// `down` and `left` members stay listed this long, then are removed from the view.
    pub member_retention_ms: u64,
    /// Members kept in the view. Updates about more members are ignored and counted.
    pub members_max: usize,
    /// Largest membership packet produced or accepted; bigger ones are refused by the SWIM layer.
    pub packet_len_max_bytes: usize,
    /// Membership messages waiting for the membership task; when full, new ones are dropped and
    /// counted (SWIM tolerates loss).
    pub inbox_len_max: usize,
    /// Member events buffered per subscriber; a subscriber that falls further behind gets a
    /// `Lagged` error telling how many it missed.
    pub events_len_max: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            probe_period_ms: 200,
            probe_rtt_ms: 60,
            indirect_probes: 3,
            suspect_to_down_ms: 400,
            gossip_interval_ms: 100,
            gossip_fanout: 3,
            announce_interval_ms: 1000,
            join_retry_interval_ms: 500,
            member_retention_ms: 3_600_000,
            members_max: 4096,
            packet_len_max_bytes: 16 * 1024,
            inbox_len_max: 4096,
            events_len_max: 1024,
        }
    }
}

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

/// Keyed agents on the node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// Signals queued per agent; a call to a full mailbox is refused at once (HTTP 503).
    pub mailbox_len_max: usize,
    /// An agent that handles nothing for this long is passivated (stored and stopped).
    pub idle_timeout_ms: u64,
    /// Active agents on the node; beyond it the least recently used is passivated.
    pub agents_active_max: usize,
    /// Restarts (fatal errors, panics) allowed within `restart_window_ms`; one more stops the agent.
    pub restarts_max: u32,
    pub restart_window_ms: u64,
    /// Time a call over HTTP waits for its reply (HTTP 504 after).
    pub call_timeout_ms: u64,
    /// Signals (by source and id) each agent remembers having handled, stored with its state: a
    /// duplicate among them is not handled again (0: none remembered). Each costs 16 bytes of
    /// every write of the agent's state.
    pub dedupe_ids_max: usize,
}

/// The metadata Raft group.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetaConfig {
    /// Voters of the group: the first admitted nodes up to this many (3 or 5; 1 for one node).
    pub voters_max: usize,
    /// A voter unreachable for this long is replaced by a live non-voter.
    pub voter_down_replace_ms: u64,
    /// A member without a lease for this long (as the leader saw it), owning no shard and no
    /// longer a voter, is removed from the metadata (and from the group's learners); coming back,
    /// it is admitted again as a new member.
    pub member_gone_remove_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Applied entries between two snapshots (the log before a snapshot is purged).
    pub snapshot_logs_since_last: u64,
    /// Time one Raft RPC or forwarded request waits for its answer.
    pub rpc_timeout_ms: u64,
}

impl Default for MetaConfig {
    fn default() -> Self {
        Self {
            voters_max: 3,
            voter_down_replace_ms: 30_000,
            member_gone_remove_ms: 86_400_000,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_logs_since_last: 1000,
            rpc_timeout_ms: 1000,
        }
    }
}

impl MetaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=7).contains(&self.voters_max) {
            return Err(invalid("meta.voters_max", "must be within 1..=7 (3 or 5 in practice)"));
        }
        positive("meta.voter_down_replace_ms", self.voter_down_replace_ms)?;
        positive("meta.member_gone_remove_ms", self.member_gone_remove_ms)?;
        positive("meta.heartbeat_interval_ms", self.heartbeat_interval_ms)?;
        positive("meta.election_timeout_min_ms", self.election_timeout_min_ms)?;
        positive("meta.election_timeout_max_ms", self.election_timeout_max_ms)?;
        positive("meta.snapshot_logs_since_last", self.snapshot_logs_since_last)?;
        positive("meta.rpc_timeout_ms", self.rpc_timeout_ms)?;
        if self.heartbeat_interval_ms >= self.election_timeout_min_ms {
            return Err(invalid("meta.heartbeat_interval_ms", "must be below meta.election_timeout_min_ms"));
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return Err(invalid("meta.election_timeout_min_ms", "must be below meta.election_timeout_max_ms"));
        }
        Ok(())
    }
}

/// Shards, leases and the placement controller.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// Shards of a new cluster; fixed when the cluster is created (later values are ignored).
    pub shard_count: u32,
    /// A node serves its shards only this long after its last lease renewal was sent.
    pub lease_ms: u64,
    /// How often a node renews its lease through the leader.
    pub lease_renew_interval_ms: u64,
    /// Added by the leader before it treats a lease as expired (clock rate differences).
    pub lease_drift_margin_ms: u64,
    /// How often the controller on the leader looks at the shard table.
    pub controller_tick_ms: u64,
    /// Minimum time between two rounds of planned moves.
    pub rebalance_interval_ms: u64,
    /// Planned moves started per round.
    pub max_moves_per_tick: usize,
    /// Times a call follows a redirect (or waits out a hand-off) before failing `Unavailable`.
    pub redirects_max: u32,
    /// Time an old owner has to hand a shard over before the move is abandoned.
    pub handoff_timeout_ms: u64,
    /// Nodes that hold each shard's state (the owner included) when storage is node-local:
    /// 0 picks it from the cluster size (2, or 3 once the cluster has at least 3 members), 1 turns
    /// replication off. Capped by the number of members. Ignored with shared storage (a database).
    pub replication_factor: u32,
    /// Time a replica has to acknowledge a write. A replica that does not is taken out of the
    /// shard's replica set (through the metadata) before the write is acknowledged, and caught up
    /// again in the background.
    pub replica_write_timeout_ms: u64,
    /// Bandwidth one owner spends catching up a new replica of a shard (state transfer); writes to
    /// the shard keep flowing meanwhile.
    pub replica_sync_bytes_per_s: u64,
    /// Reads from the nearest copy: an in-sync replica answers only while its last lease renewal
    /// is at most this old, so its answer reflects every write acknowledged more than this long
    /// ago. The default for reads that set no bound of their own (`stale_ms_max`, tighter or
    /// looser). At least `lease_renew_interval_ms`.
    pub replica_read_stale_ms_max: u64,
}

/// Most nodes holding one shard.
pub const REPLICATION_FACTOR_MAX: u32 = 5;

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            shard_count: crate::meta::SHARD_COUNT_DEFAULT,
            lease_ms: 2000,
            lease_renew_interval_ms: 500,
            lease_drift_margin_ms: 500,
            controller_tick_ms: 200,
            rebalance_interval_ms: 5000,
            max_moves_per_tick: 8,
            redirects_max: 5,
            handoff_timeout_ms: 30_000,
            replication_factor: 0,
            replica_write_timeout_ms: 1000,
            replica_sync_bytes_per_s: 32 << 20,
            replica_read_stale_ms_max: 1000,
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=crate::meta::SHARD_COUNT_MAX).contains(&self.shard_count) {
            return Err(invalid(
                "placement.shard_count",
                format!("must be within 1..={}", crate::meta::SHARD_COUNT_MAX),
            ));
        }
        positive("placement.lease_ms", self.lease_ms)?;
        positive("placement.lease_renew_interval_ms", self.lease_renew_interval_ms)?;
        positive("placement.lease_drift_margin_ms", self.lease_drift_margin_ms)?;
        positive("placement.controller_tick_ms", self.controller_tick_ms)?;
        positive("placement.rebalance_interval_ms", self.rebalance_interval_ms)?;
        positive("placement.handoff_timeout_ms", self.handoff_timeout_ms)?;
        if self.lease_renew_interval_ms * 2 > self.lease_ms {
            // One lost renewal must not cost the lease.
            return Err(invalid("placement.lease_renew_interval_ms", "must be at most half of placement.lease_ms"));
        }
        if !(1..=10_000).contains(&self.max_moves_per_tick) {
            return Err(invalid("placement.max_moves_per_tick", "must be within 1..=10000"));
        }
        if !(1..=100).contains(&self.redirects_max) {
            return Err(invalid("placement.redirects_max", "must be within 1..=100"));
        }
        if self.replication_factor > REPLICATION_FACTOR_MAX {
            return Err(invalid(
                "placement.replication_factor",
                format!("must be within 0..={REPLICATION_FACTOR_MAX} (0: automatic)"),
            ));
        }
        positive("placement.replica_write_timeout_ms", self.replica_write_timeout_ms)?;
        positive("placement.replica_sync_bytes_per_s", self.replica_sync_bytes_per_s)?;
        if self.replica_read_stale_ms_max < self.lease_renew_interval_ms {
            // Renewals come that often: a tighter bound would refuse most replica reads.
            return Err(invalid(
                "placement.replica_read_stale_ms_max",
                "must be at least placement.lease_renew_interval_ms",
            ));
        }
        Ok(())
    }
}

/// Where agents' state lives: the embedded store, or a shared Postgres database.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB[?sslmode=...]`: every node of the cluster keeps its
    /// agents' state in this database (the schema is created or upgraded at start). `None`: the
    /// embedded store under `data_dir` (memory without one). A URL that does not parse is refused
    /// by `validate`; a database that cannot be reached, or refuses the login, fails the start.
    pub url: Option<String>,
    /// Connections each node keeps to the database at most. When all are busy, a storage call
    /// waits for one (up to `connect_timeout_ms`), then fails with `StorageError::Backend`.
    pub pool_connections_max: u32,
    /// Time allowed to get a connection: at start, to connect and log in (then the start fails
    /// with `NodeError::StorageOpen`); later, for a storage call to get a pooled connection or
    /// open a new one (then the call fails with `StorageError::Backend`).
    pub connect_timeout_ms: u64,
    /// Time the database lets one statement run, lock waits included, and lets a transaction sit
    /// idle (a frozen node cannot hold a shard's lock longer). Over it the statement is cancelled
    /// and the call fails with `StorageError::Backend` (a write then did not happen). A call that
    /// gets no answer for `connect_timeout_ms` + 2 x this (an unreachable database) fails the same
    /// way, except that a write may then have happened.
    pub statement_timeout_ms: u64,
}

/// Most connections one node may keep to the database.
pub const STORAGE_POOL_CONNECTIONS_MAX: u32 = 1000;
/// Longest accepted storage URL.
const STORAGE_URL_LEN_MAX_BYTES: usize = 4096;

impl Default for StorageConfig {
    fn default() -> Self {
        Self { url: None, pool_connections_max: 16, connect_timeout_ms: 5000, statement_timeout_ms: 5000 }
    }
}

impl std::fmt::Debug for StorageConfig {
    /// Without the URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &self.url.as_deref().map(crate::storage::postgres::redact))
            .field("pool_connections_max", &self.pool_connections_max)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            if url.len() > STORAGE_URL_LEN_MAX_BYTES {
                return Err(invalid("storage.url", format!("longer than {STORAGE_URL_LEN_MAX_BYTES} bytes")));
            }
            crate::storage::postgres::parse_url(url).map_err(|e| invalid("storage.url", e.to_string()))?;
        }
        if !(1..=STORAGE_POOL_CONNECTIONS_MAX).contains(&self.pool_connections_max) {
            return Err(invalid(
                "storage.pool_connections_max",
                format!("must be within 1..={STORAGE_POOL_CONNECTIONS_MAX}"),
            ));
        }
        positive("storage.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("storage.statement_timeout_ms", self.statement_timeout_ms)?;
        Ok(())
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            mailbox_len_max: 1024,
            idle_timeout_ms: 120_000,
            agents_active_max: 1_000_000,
            restarts_max: 3,
            restart_window_ms: 60_000,
            call_timeout_ms: 10_000,
            dedupe_ids_max: crate::agent::handled::DEDUPE_IDS_MAX_DEFAULT,
        }
    }
}

impl AgentsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("agents.idle_timeout_ms", self.idle_timeout_ms)?;
        positive("agents.restart_window_ms", self.restart_window_ms)?;
        positive("agents.call_timeout_ms", self.call_timeout_ms)?;
        for (field, value) in
            [("agents.mailbox_len_max", self.mailbox_len_max), ("agents.agents_active_max", self.agents_active_max)]
        {
            if value == 0 || value > SIGNALS_COUNT_MAX {
                return Err(invalid(field, format!("must be within 1..={SIGNALS_COUNT_MAX}")));
            }
        }
        if self.restarts_max > 1000 {
            return Err(invalid("agents.restarts_max", "must be at most 1000"));
        }
        if self.dedupe_ids_max > crate::agent::handled::DEDUPE_IDS_MAX_LIMIT {
            let limit = crate::agent::handled::DEDUPE_IDS_MAX_LIMIT;
            return Err(invalid("agents.dedupe_ids_max", format!("must be at most {limit}")));
        }
        Ok(())
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
        if self.interest_patterns_max > crate::bus::interest::PATTERNS_MAX {
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

/// Upper bound of the signals section's counts (queue lengths, subscriptions, journal entries).
const SIGNALS_COUNT_MAX: usize = 10_000_000;
/// Upper bound of the signals section's byte budgets (64 GiB).
const SIGNALS_BYTES_MAX: usize = 64 << 30;

impl SignalsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.source {
            let long = s.len() > crate::signal::ATTRIBUTE_LEN_MAX_BYTES;
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

/// Shortest accepted shared secret.
pub const SECRET_LEN_MIN_BYTES: usize = 16;

/// Upper bounds that keep validated values sane (a typo of three zeros is an error, not a hang).
const TIMEOUT_MS_MAX: u64 = 24 * 3_600_000;
const FRAME_LEN_MIN_BYTES: u32 = 4 * 1024;
const FRAME_LEN_MAX_BYTES: u32 = 64 << 20;

impl Config {
    /// Parses a TOML document; absent fields keep their defaults.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name("name", &self.name)?;
        validate_name("cluster", &self.cluster)?;
        if self.secret.is_empty() {
            return Err(invalid("secret", "missing or empty (use --secret-file or CADRE_SECRET)"));
        }
        if self.secret.as_bytes().len() < SECRET_LEN_MIN_BYTES {
            // The handshake gives MACs to anyone who connects; a short secret could be guessed
            // offline from one of them.
            return Err(invalid("secret", format!("must be at least {SECRET_LEN_MIN_BYTES} bytes")));
        }
        if let Some(a) = self.advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(invalid("advertise", "must be a concrete address peers can dial"));
            }
        } else if self.listen.ip().is_unspecified() {
            return Err(invalid("advertise", "required when listening on an unspecified address (0.0.0.0 or ::)"));
        }
        self.net.validate()?;
        self.membership.validate()?;
        self.signals.validate()?;
        self.pubsub.validate(self.net.frame_len_max_bytes as usize)?;
        self.agents.validate()?;
        self.meta.validate()?;
        self.placement.validate()?;
        self.storage.validate()
    }

    /// The `source` of signals this node makes.
    pub fn signal_source(&self) -> String {
        self.signals.source.clone().unwrap_or_else(|| format!("cadre://{}/{}", self.cluster, self.name))
    }
}

fn validate_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    const NAME_LEN_MAX: usize = 64;
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(invalid(field, format!("must be 1..={NAME_LEN_MAX} characters")));
    }
    let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(field, "only ASCII letters, digits, '-', '_' and '.' are allowed"));
    }
    Ok(())
}

fn positive(field: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(field, "must be greater than zero"));
    }
    if value > TIMEOUT_MS_MAX {
        return Err(invalid(field, format!("must be at most {TIMEOUT_MS_MAX}")));
    }
    Ok(())
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(FRAME_LEN_MIN_BYTES..=FRAME_LEN_MAX_BYTES).contains(&self.frame_len_max_bytes) {
            return Err(invalid(
                "net.frame_len_max_bytes",
                format!("must be within {FRAME_LEN_MIN_BYTES}..={FRAME_LEN_MAX_BYTES}"),
            ));
        }
        positive("net.peer_queue_len_max", self.peer_queue_len_max as u64)?;
        positive("net.peer_queue_bytes_max", self.peer_queue_bytes_max as u64)?;
        positive("net.write_batch_bytes_max", self.write_batch_bytes_max as u64)?;
        positive("net.peers_max", self.peers_max as u64)?;
        positive("net.inbound_conns_max", self.inbound_conns_max as u64)?;
        positive("net.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("net.handshake_timeout_ms", self.handshake_timeout_ms)?;
        positive("net.reconnect_backoff_min_ms", self.reconnect_backoff_min_ms)?;
        positive("net.reconnect_backoff_max_ms", self.reconnect_backoff_max_ms)?;
        positive("net.peer_unreachable_forget_ms", self.peer_unreachable_forget_ms)?;
        positive("net.ping_interval_ms", self.ping_interval_ms)?;
        positive("net.conn_idle_timeout_ms", self.conn_idle_timeout_ms)?;
        positive("net.asks_in_flight_max", self.asks_in_flight_max as u64)?;
        if self.reconnect_backoff_min_ms > self.reconnect_backoff_max_ms {
            return Err(invalid("net.reconnect_backoff_min_ms", "must not exceed net.reconnect_backoff_max_ms"));
        }
        if self.conn_idle_timeout_ms <= 2 * self.ping_interval_ms {
            return Err(invalid(
                "net.conn_idle_timeout_ms",
                "must exceed twice net.ping_interval_ms, or idle connections would be closed",
            ));
        }
        Ok(())
    }
}

impl MembershipConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("membership.probe_period_ms", self.probe_period_ms)?;
        positive("membership.probe_rtt_ms", self.probe_rtt_ms)?;
        positive("membership.indirect_probes", self.indirect_probes as u64)?;
        positive("membership.suspect_to_down_ms", self.suspect_to_down_ms)?;
        positive("membership.gossip_interval_ms", self.gossip_interval_ms)?;
        positive("membership.gossip_fanout", self.gossip_fanout as u64)?;
        positive("membership.announce_interval_ms", self.announce_interval_ms)?;
        positive("membership.join_retry_interval_ms", self.join_retry_interval_ms)?;
        positive("membership.member_retention_ms", self.member_retention_ms)?;
        positive("membership.members_max", self.members_max as u64)?;
        positive("membership.inbox_len_max", self.inbox_len_max as u64)?;
        positive("membership.events_len_max", self.events_len_max as u64)?;
        if self.probe_rtt_ms >= self.probe_period_ms {
            return Err(invalid("membership.probe_rtt_ms", "must be smaller than membership.probe_period_ms"));
        }
        if !(1024..=1 << 20).contains(&self.packet_len_max_bytes) {
            return Err(invalid("membership.packet_len_max_bytes", "must be within 1024..=1048576"));
        }
        if self.indirect_probes > 16 || self.gossip_fanout > 64 {
            return Err(invalid("membership.gossip_fanout", "fan-outs are limited to 16/64"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config { secret: Secret::new("s3cret-s3cret-s3cret"), ..Config::default() }
    }

    #[test]
    fn defaults_with_a_secret_are_valid() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn missing_secret_is_named() {
        let err = Config::default().validate().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { field: "secret", .. }), "{err}");
    }

    #[test]
    fn short_secrets_are_refused() {
        let c = Config { secret: Secret::new("short"), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "secret", .. })));
    }

    #[test]
    fn secret_is_trimmed_and_never_printed() {
        let s = Secret::new("abc\n");
        assert_eq!(s.as_bytes(), b"abc");
        assert!(!format!("{s:?}").contains("abc"));
        assert!(Secret::new(" \n").is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = valid();
        c.name = "bad name".into();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "name", .. })));
        let mut c = valid();
        c.membership.probe_rtt_ms = c.membership.probe_period_ms;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "membership.probe_rtt_ms", .. })));
        let mut c = valid();
        c.net.frame_len_max_bytes = 10;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "net.frame_len_max_bytes", .. })));
        let mut c = valid();
        c.listen = "0.0.0.0:7000".parse().unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "advertise", .. })));
        c.advertise = Some("10.0.0.1:7000".parse().unwrap());
        assert_eq!(c.validate(), Ok(()));
        let mut c = valid();
        c.net.peer_queue_len_max = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "net.peer_queue_len_max", .. })));
    }

    #[test]
    fn storage_urls_are_checked_and_never_printed_with_their_password() {
        let c = Config::from_toml_str("[storage]\nurl = \"postgres://cadre:pw@db.example:5433/cadre\"\n").unwrap();
        assert_eq!(c.storage.url.as_deref(), Some("postgres://cadre:pw@db.example:5433/cadre"));
        let mut c = Config { secret: Secret::new("s3cret-s3cret-s3cret"), ..c };
        assert_eq!(c.validate(), Ok(()));
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
        for bad in ["mysql://x@h/db", "not a url", "postgres://x@h:99999/db", ""] {
            c.storage.url = Some(bad.into());
            assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "storage.url", .. })), "{bad}");
        }
        c.storage.url = None;
        c.storage.pool_connections_max = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "storage.pool_connections_max", .. })));
        c.storage.pool_connections_max = 1;
        c.storage.statement_timeout_ms = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "storage.statement_timeout_ms", .. })));
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_fields() {
        let c = Config::from_toml_str("name = \"a\"\nseeds = [\"127.0.0.1:7000\"]\n[net]\npeer_queue_len_max = 7\n")
            .unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(c.seeds.len(), 1);
        assert_eq!(c.net.peer_queue_len_max, 7);
        assert_eq!(c.net.ping_interval_ms, NetConfig::default().ping_interval_ms);
        let err = Config::from_toml_str("nme = \"a\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(ref m) if m.contains("nme")), "{err}");
    }
}
