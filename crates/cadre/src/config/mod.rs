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

mod cluster;
mod signals;
pub use cluster::*;
pub use signals::*;

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field has a value the node cannot run with.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// The field, as in the TOML file (`net.frame_len_max_bytes`).
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
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
    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// True if no secret was given.
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
    /// `[net]`: the transport between nodes.
    pub net: NetConfig,
    /// `[membership]`: failure detection and gossip (SWIM).
    pub membership: MembershipConfig,
    /// `[signals]`: the bus on one node (queues, webhooks, dead letters, traces).
    pub signals: SignalsConfig,
    /// `[pubsub]`: signals across the cluster.
    pub pubsub: PubsubConfig,
    /// `[agents]`: agents on one node (mailboxes, passivation, restarts).
    pub agents: AgentsConfig,
    /// `[meta]`: the metadata group (Raft).
    pub meta: MetaConfig,
    /// `[placement]`: shards, replicas, leases and hand-offs.
    pub placement: PlacementConfig,
    /// `[storage]`: where agent state lives.
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

/// Shortest accepted shared secret.
pub const SECRET_LEN_MIN_BYTES: usize = 16;

/// Upper bound of counts (queue lengths, subscriptions, journal entries, agents).
const SIGNALS_COUNT_MAX: usize = 10_000_000;
/// Upper bound of byte budgets (64 GiB).
const SIGNALS_BYTES_MAX: usize = 64 << 30;

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
    /// Checks every field's range and their relations; the error names the first bad field.
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
    /// Checks every field's range and their relations; the error names the first bad field.
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
