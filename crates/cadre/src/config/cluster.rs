//! The sections of keyed agents across the cluster: `[agents]`, `[meta]`, `[placement]`,
//! `[storage]`.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

use super::{invalid, positive, ConfigError, SIGNALS_COUNT_MAX};

/// Shards of a new cluster unless configured otherwise (fixed at cluster creation).
pub const SHARD_COUNT_DEFAULT: u32 = 256;
/// Most shards a cluster may have.
pub const SHARD_COUNT_MAX: u32 = 1 << 16;
/// Ids of handled signals recorded per agent unless configured (`agents.dedupe_ids_max`).
pub const DEDUPE_IDS_MAX_DEFAULT: usize = 256;
/// The most `agents.dedupe_ids_max` may be (each id is in every write of the agent's state).
pub const DEDUPE_IDS_MAX_LIMIT: usize = 65_536;

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
    /// The window over which restarts are counted (see `restarts_max`).
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
    /// Time between the leader's heartbeats to the other members of the group.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time between this and
    /// `election_timeout_max_ms` starts an election.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
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
    /// Checks every field's range and their relations; the error names the first bad field.
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
            shard_count: SHARD_COUNT_DEFAULT,
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
    /// Checks every field's range and their relations; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=SHARD_COUNT_MAX).contains(&self.shard_count) {
            return Err(invalid("placement.shard_count", format!("must be within 1..={}", SHARD_COUNT_MAX)));
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
            .field("url", &self.url.as_deref().map(redact))
            .field("pool_connections_max", &self.pool_connections_max)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl StorageConfig {
    /// Checks every field's range and their relations; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            if url.len() > STORAGE_URL_LEN_MAX_BYTES {
                return Err(invalid("storage.url", format!("longer than {STORAGE_URL_LEN_MAX_BYTES} bytes")));
            }
            parse_url(url).map_err(|e| invalid("storage.url", e.to_string()))?;
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
            dedupe_ids_max: DEDUPE_IDS_MAX_DEFAULT,
        }
    }
}

impl AgentsConfig {
    /// Checks every field's range and their relations; the error names the first bad field.
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
        if self.dedupe_ids_max > DEDUPE_IDS_MAX_LIMIT {
            let limit = DEDUPE_IDS_MAX_LIMIT;
            return Err(invalid("agents.dedupe_ids_max", format!("must be at most {limit}")));
        }
        Ok(())
    }
}

/// A storage URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

/// Parses a `postgres://` (or `postgresql://`) URL. Missing parts come from the `PG*`
/// environment variables and `~/.pgpass`, as with `psql`.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, UrlError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(UrlError(format!("{:?} must start with postgres:// or postgresql://", redact(url))));
    }
    PgConnectOptions::from_str(url).map_err(|e| UrlError(format!("{}: {e}", redact(url))))
}

/// The URL with its password (in the user part or a `password=` parameter) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{}:***{}", &authority[..colon], &authority[at..]),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{}{authority}{tail}", &url[..start])
}
