//! The shared backend: one Postgres database that every node of the cluster writes to.
//!
//! Every node sees the same store, so a shard that moves between nodes needs no copy of its state
//! ([`Storage::shared`] is true), and an acknowledged write survives the loss of any node: the
//! database is the replica set, and node-to-node replication is off. The database's own
//! durability and availability (its replicas, backups) are the operator's.
//!
//! ## Schema
//! `cadre_states` (key → revision, value), `cadre_entries` ((key, seq) → entry),
//! `cadre_entry_lens` (key → number of entries, only for keys that have some),
//! `cadre_shard_epochs` (shard → highest epoch), the sequence `cadre_revision` (the store's
//! revision counter) and `cadre_schema_version`. Keys are `bytea` columns holding
//! [`Key::encode`]: Postgres orders `bytea` bytewise (memcmp, then length), which is exactly the
//! order of `Vec<u8>` and so [`Key`]'s order, whatever the database's collation; and an id may
//! hold NUL, which `text` cannot. A key scan is the union of two primary-key ranges.
//!
//! ## Writes
//! Each write is one transaction at READ COMMITTED:
//! 1. lock the shard's `cadre_shard_epochs` row (`SELECT ... FOR UPDATE`; the first write to a
//!    shard inserts the row at epoch 0 first, which waits for a concurrent inserter's outcome) and
//!    check the fence against it;
//! 2. a compare-and-set on the key's row: `UPDATE ... WHERE revision = expected`, `INSERT ... ON
//!    CONFLICT DO NOTHING` for a create, `DELETE ... WHERE revision = expected`, and for appends
//!    the same on `cadre_entry_lens` (then the entries are inserted);
//! 3. raise the shard's epoch when the write's is higher, and commit.
//!
//! A refusal rolls the transaction back, so a refused write leaves no trace (the fence included).
//! Several nodes writing at once stay correct through row locks alone: a writer holds its shard's
//! row lock from its fence check to its commit, so a write raising the epoch commits either after
//! every write at the old epoch that got the lock first, or before them, and then they read the
//! raised epoch when they get the lock (a locking read at READ COMMITTED sees the newest committed
//! row) and are `Fenced`. The compare-and-set statements re-check their condition on the newest
//! committed row after waiting for a concurrent writer of the same key, so of two writers holding
//! the same revision exactly one succeeds, even if a caller files one key under two shards. A
//! transaction locks its shard's row first and then the key's rows, so writers cannot deadlock as
//! long as each key is filed under one shard (as the cluster does; otherwise Postgres would detect
//! the deadlock and abort one write, `Backend`).
//!
//! ## Revisions
//! A sequence, not a one-row counter: a counter row would serialize every write of the cluster on
//! one lock. `nextval` never hands a value out twice and is drawn inside the write's transaction,
//! while its shard's lock is held (and the compare-and-set waited for any other writer of the
//! key), so a key's revisions grow with each write and a deleted and re-created key never repeats
//! one (no ABA). Values drawn by a write that then fails are skipped (gaps are allowed), and only
//! state writes draw one.
//!
//! ## Migrations
//! The schema is embedded SQL ([`MIGRATIONS`]) applied at start in one transaction that holds an
//! advisory lock, so nodes starting together apply it once, and a failure leaves nothing half
//! created (DDL is transactional in Postgres). The applied version is recorded in
//! `cadre_schema_version`; a database at a newer version than this build knows is refused at
//! start rather than written with an older layout. Not `sqlx::migrate!`: that needs sqlx's macro
//! crate and migration files at build time, for a list of steps this short.
//!
//! ## Caveats
//! - Writes to one shard run one at a time (its row lock is held for two round trips and the
//!   commit); writes to different shards run in parallel.
//! - Revisions of different keys may become visible out of revision order (a sequence value is
//!   drawn before the commit); only a key's own revisions are ordered.
//! - A write whose commit gets no answer (connection lost, `call_timeout`) may or may not have
//!   happened: `Backend`, as the trait allows.
//! - Pooled connections are not tested before each use (that costs a round trip per call): after
//!   the database restarts, each stale connection fails one call with `Backend`.
//! - An append is sent in statements of at most [`INSERT_BATCH_BYTES_MAX`] (a Postgres message
//!   holds at most 1 GiB), all in its one transaction.
//! - Epochs and revisions are `bigint`: a fence epoch above `i64::MAX` is refused with `Backend`.
//! - The timeouts are sent as session settings in the startup packet (`options`): connect directly
//!   or through a pooler that passes them on (PgBouncer refuses unknown startup parameters).
//! - The fences belong to one cluster's metadata: a database is for one cluster (see the README).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tracing::info;

use super::{
    check_write, fence_check, scan_check, Fence, Key, Revision, Storage, StorageError, Versioned, ENTRIES_READ_MAX,
};
use crate::config::StorageConfig;

/// The schema, one step per version: step `i` brings the database to version `i + 1`. Released
/// steps are never edited; a change is a new step.
pub const MIGRATIONS: &[&str] = &[
    // Version 1. `fillfactor` leaves room on each page of states, rewritten on every put, so that
    // the new row version can stay on its page without touching the index (a HOT update).
    "CREATE SEQUENCE cadre_revision AS bigint MINVALUE 1 NO CYCLE;
     CREATE TABLE cadre_states (
         key bytea PRIMARY KEY,
         revision bigint NOT NULL CHECK (revision > 0),
         value bytea NOT NULL
     ) WITH (fillfactor = 80);
     CREATE TABLE cadre_entry_lens (
         key bytea PRIMARY KEY,
         len bigint NOT NULL CHECK (len > 0)
     );
     CREATE TABLE cadre_entries (
         key bytea NOT NULL,
         seq bigint NOT NULL CHECK (seq >= 0),
         value bytea NOT NULL,
         PRIMARY KEY (key, seq)
     );
     CREATE TABLE cadre_shard_epochs (
         shard bigint PRIMARY KEY CHECK (shard >= 0),
         epoch bigint NOT NULL CHECK (epoch >= 0)
     );",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
/// Advisory lock key held while migrating ("cadre" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x63_6164_7265;
/// Bytes of entries sent in one statement of an append.
pub const INSERT_BATCH_BYTES_MAX: usize = 64 << 20;

const SELECT_STATE: &str = "SELECT revision, value FROM cadre_states WHERE key = $1";
const SELECT_REVISION: &str = "SELECT revision FROM cadre_states WHERE key = $1";
const CREATE_STATE: &str =
    "INSERT INTO cadre_states (key, revision, value) VALUES ($1, nextval('cadre_revision'), $2) \
     ON CONFLICT (key) DO NOTHING RETURNING revision";
const REPLACE_STATE: &str = "UPDATE cadre_states SET revision = nextval('cadre_revision'), value = $2 \
     WHERE key = $1 AND revision = $3 RETURNING revision";
const DELETE_STATE: &str = "DELETE FROM cadre_states WHERE key = $1 AND revision = $2 RETURNING revision";
const DELETE_ENTRIES: &str =
    "WITH lens AS (DELETE FROM cadre_entry_lens WHERE key = $1) DELETE FROM cadre_entries WHERE key = $1";
const SELECT_LEN: &str = "SELECT len FROM cadre_entry_lens WHERE key = $1";
const CREATE_LEN: &str =
    "INSERT INTO cadre_entry_lens (key, len) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING len";
const GROW_LEN: &str = "UPDATE cadre_entry_lens SET len = len + $2 WHERE key = $1 AND len = $3 RETURNING len";
const INSERT_ENTRIES: &str = "INSERT INTO cadre_entries (key, seq, value) \
     SELECT $1, $2 + t.ord - 1, t.value FROM unnest($3::bytea[]) WITH ORDINALITY AS t(value, ord)";
const SELECT_ENTRIES: &str = "SELECT value FROM cadre_entries WHERE key = $1 AND seq >= $2 ORDER BY seq LIMIT $3";
const SELECT_EPOCH: &str = "SELECT epoch FROM cadre_shard_epochs WHERE shard = $1";
const LOCK_EPOCH: &str = "SELECT epoch FROM cadre_shard_epochs WHERE shard = $1 FOR UPDATE";
const CREATE_EPOCH: &str =
    "INSERT INTO cadre_shard_epochs (shard, epoch) VALUES ($1, 0) ON CONFLICT (shard) DO NOTHING";
const RAISE_EPOCH: &str = "UPDATE cadre_shard_epochs SET epoch = $2 WHERE shard = $1";
/// Both key sets from `$1` on, each cut at the limit (the first `limit` keys of the union are
/// among the first `limit` of each), merged in `bytea` order.
const SCAN_KEYS: &str = "SELECT key FROM ( \
       (SELECT key FROM cadre_states WHERE key > $1 ORDER BY key LIMIT $2) \
       UNION (SELECT key FROM cadre_entry_lens WHERE key > $1 ORDER BY key LIMIT $2) \
     ) AS k ORDER BY key LIMIT $2";

/// Why [`PostgresStorage::open`] failed. Messages name the database without its password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL cannot be used.
    #[error("storage URL: {0}")]
    InvalidUrl(#[from] UrlError),
    /// The database did not answer within `storage.connect_timeout_ms`.
    #[error("database {target}: no answer within {timeout_ms} ms (storage.connect_timeout_ms)")]
    Timeout {
        /// The database, without its password.
        target: String,
        /// The time waited, in milliseconds.
        timeout_ms: u64,
    },
    /// The database refused the connection (login, TLS, unknown database, ...).
    #[error("database {target}: cannot connect: {reason}")]
    Connect {
        /// The database, without its password.
        target: String,
        /// The database's or the driver's message.
        reason: String,
    },
    /// The schema could not be created or migrated.
    #[error("database {target}: cannot apply the schema: {reason}")]
    Migrate {
        /// The database, without its password.
        target: String,
        /// The database's or the driver's message.
        reason: String,
    },
    #[error(
        "database {target}: its schema is at version {found}, newer than the {known} this build knows; \
         run a newer cadre"
    )]
    /// The database was migrated by a newer build, to a schema this one does not know.
    SchemaTooNew {
        /// The database, without its password.
        target: String,
        /// The database's schema version.
        found: i32,
        /// The newest version this build knows ([`SCHEMA_VERSION`]).
        known: i32,
    },
}

pub use crate::config::{parse_url, redact, UrlError};

/// `postgres://user@host:port/db`, for messages.
fn describe(o: &PgConnectOptions) -> String {
    let db = o.get_database().unwrap_or(o.get_username());
    match o.get_socket() {
        Some(dir) => format!("postgres://{}@{}/{db} (socket {})", o.get_username(), o.get_host(), dir.display()),
        None => format!("postgres://{}@{}:{}/{db}", o.get_username(), o.get_host(), o.get_port()),
    }
}

fn backend(e: sqlx::Error) -> StorageError {
    StorageError::Backend(format!("postgres: {e}"))
}

/// A `bigint` read back where the schema allows only non-negative values.
fn unsigned(v: i64, what: &str) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| StorageError::Backend(format!("corrupt store: negative {what} {v}")))
}

/// A store in a Postgres database, shared by every node (see the module docs).
pub struct PostgresStorage {
    pool: PgPool,
    /// Longest a call may take in all; then it fails with `Backend` (see `StorageConfig`).
    call_timeout: Duration,
}

impl PostgresStorage {
    /// Connects, applies the schema, and returns a store whose pool opens connections on demand
    /// (at most `pool_connections_max`). Fails within `connect_timeout_ms` when the database does
    /// not answer, at once when it refuses.
    pub async fn open(url: &str, cfg: &StorageConfig) -> Result<PostgresStorage, OpenError> {
        let statement_timeout_ms = cfg.statement_timeout_ms.to_string();
        let opts = parse_url(url)?.application_name("cadre").options([
            ("statement_timeout", statement_timeout_ms.as_str()),
            ("idle_in_transaction_session_timeout", statement_timeout_ms.as_str()),
        ]);
        let target = describe(&opts);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let call_timeout = connect_timeout + 2 * Duration::from_millis(cfg.statement_timeout_ms);
        let timed_out = || OpenError::Timeout { target: target.clone(), timeout_ms: cfg.connect_timeout_ms };
        // One connection of our own first: the pool would retry a refused connection until its
        // timeout and then report only that it timed out, hiding the reason.
        let mut conn = tokio::time::timeout(connect_timeout, PgConnection::connect_with(&opts))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| OpenError::Connect { target: target.clone(), reason: e.to_string() })?;
        let migrated = tokio::time::timeout(call_timeout, migrate(&mut conn, &target)).await.map_err(|_| timed_out());
        // Closing only says goodbye to the server; a failure changes nothing.
        let _ = conn.close().await;
        migrated??;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_connections_max)
            .min_connections(0)
            .acquire_timeout(connect_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(opts);
        info!(database = %target, schema_version = SCHEMA_VERSION, "postgres storage ready");
        Ok(PostgresStorage { pool, call_timeout })
    }

    /// Runs one call, bounded by `call_timeout`.
    fn call<'a, T: Send + 'a>(
        &self,
        fut: impl Future<Output = Result<T, StorageError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        let timeout = self.call_timeout;
        async move {
            tokio::time::timeout(timeout, fut).await.unwrap_or_else(|_| {
                Err(StorageError::Backend(format!(
                    "postgres: no answer within {} ms (a write may or may not have happened)",
                    timeout.as_millis()
                )))
            })
        }
        .boxed()
    }

    /// Runs a write in one transaction: fence, then `op`, then the raised epoch; committed only
    /// if all of it succeeds.
    async fn write(&self, key: &Key, fence: Fence, op: Write<'_>) -> Result<u64, StorageError> {
        let k = key.encode();
        let mut tx = self.pool.begin().await.map_err(backend)?;
        match fenced(&mut tx, &k, fence, op).await {
            Ok(out) => {
                tx.commit().await.map_err(|e| {
                    StorageError::Backend(format!(
                        "postgres: commit failed (the write may or may not have happened): {e}"
                    ))
                })?;
                Ok(out)
            }
            Err(refused) => {
                // A rollback that fails means the connection is gone, and the server aborts the
                // transaction itself; the refusal is what the caller needs to know.
                let _ = tx.rollback().await;
                Err(refused)
            }
        }
    }
}

/// A write's own part, between the fence check and the epoch raise.
enum Write<'a> {
    Put {
        value: &'a [u8],
        expected: Revision,
    },
    Delete {
        expected: Revision,
    },
    Append {
        entries: &'a [Bytes],
        expected_len: u64,
    },
    /// Only the fence: raises the shard's epoch, touches no key.
    Fence,
}

async fn fenced(conn: &mut PgConnection, key: &[u8], fence: Fence, op: Write<'_>) -> Result<u64, StorageError> {
    let current = lock_epoch(conn, fence.shard).await?;
    let epoch = fence_check(fence, current)?;
    let out = match op {
        Write::Put { value, expected } => put_state(conn, key, value, expected).await?,
        Write::Delete { expected } => delete_key(conn, key, expected).await?,
        Write::Append { entries, expected_len } => append_entries(conn, key, entries, expected_len).await?,
        Write::Fence => 0,
    };
    if epoch > current {
        let e = i64::try_from(epoch)
            .map_err(|_| StorageError::Backend(format!("epoch {epoch} is beyond what the database stores")))?;
        sqlx::query(RAISE_EPOCH).bind(i64::from(fence.shard)).bind(e).execute(&mut *conn).await.map_err(backend)?;
    }
    Ok(out)
}

/// Locks the shard's epoch row (creating it at 0 on the shard's first write) and returns the epoch.
async fn lock_epoch(conn: &mut PgConnection, shard: u32) -> Result<u64, StorageError> {
    if let Some(e) = locked_epoch(conn, shard).await? {
        return Ok(e);
    }
    // Waits for a concurrent first writer of the shard; the lock below then sees its row, or ours.
    sqlx::query(CREATE_EPOCH).bind(i64::from(shard)).execute(&mut *conn).await.map_err(backend)?;
    locked_epoch(conn, shard)
        .await?
        .ok_or_else(|| StorageError::Backend(format!("postgres: the epoch row of shard {shard} vanished")))
}

async fn locked_epoch(conn: &mut PgConnection, shard: u32) -> Result<Option<u64>, StorageError> {
    let e: Option<i64> =
        sqlx::query_scalar(LOCK_EPOCH).bind(i64::from(shard)).fetch_optional(&mut *conn).await.map_err(backend)?;
    e.map(|e| unsigned(e, "epoch")).transpose()
}

async fn revision_of(conn: &mut PgConnection, key: &[u8]) -> Result<Revision, StorageError> {
    let r: Option<i64> =
        sqlx::query_scalar(SELECT_REVISION).bind(key).fetch_optional(&mut *conn).await.map_err(backend)?;
    r.map_or(Ok(0), |r| unsigned(r, "revision"))
}

async fn entry_len(conn: &mut PgConnection, key: &[u8]) -> Result<u64, StorageError> {
    let len: Option<i64> =
        sqlx::query_scalar(SELECT_LEN).bind(key).fetch_optional(&mut *conn).await.map_err(backend)?;
    len.map_or(Ok(0), |l| unsigned(l, "entry count"))
}

/// Compare-and-set of the state; the new revision.
async fn put_state(conn: &mut PgConnection, key: &[u8], value: &[u8], expected: Revision) -> Result<u64, StorageError> {
    let written: Option<i64> = match (expected, i64::try_from(expected)) {
        (0, _) => sqlx::query_scalar(CREATE_STATE).bind(key).bind(value).fetch_optional(&mut *conn).await,
        (_, Ok(exp)) => {
            sqlx::query_scalar(REPLACE_STATE).bind(key).bind(value).bind(exp).fetch_optional(&mut *conn).await
        }
        // No stored revision is that high.
        (_, Err(_)) => Ok(None),
    }
    .map_err(backend)?;
    match written {
        Some(r) => unsigned(r, "revision"),
        None => Err(StorageError::Conflict { expected, actual: revision_of(conn, key).await? }),
    }
}

/// Removes the state (if at `expected`) and the entries.
async fn delete_key(conn: &mut PgConnection, key: &[u8], expected: Revision) -> Result<u64, StorageError> {
    let deleted = match (expected, i64::try_from(expected)) {
        (0, _) => revision_of(conn, key).await? == 0,
        (_, Ok(exp)) => {
            let r: Option<i64> = sqlx::query_scalar(DELETE_STATE)
                .bind(key)
                .bind(exp)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
            r.is_some()
        }
        (_, Err(_)) => false,
    };
    if !deleted {
        return Err(StorageError::Conflict { expected, actual: revision_of(conn, key).await? });
    }
    sqlx::query(DELETE_ENTRIES).bind(key).execute(&mut *conn).await.map_err(backend)?;
    Ok(0)
}

/// Compare-and-set of the entry count, then the entries; the new count.
async fn append_entries(
    conn: &mut PgConnection,
    key: &[u8],
    entries: &[Bytes],
    expected_len: u64,
) -> Result<u64, StorageError> {
    let conflict = |actual| StorageError::Conflict { expected: expected_len, actual };
    if entries.is_empty() {
        let actual = entry_len(conn, key).await?;
        return if actual == expected_len { Ok(actual) } else { Err(conflict(actual)) };
    }
    let added = i64::try_from(entries.len()).map_err(|_| StorageError::TooLarge { len: entries.len() })?;
    let len: Option<i64> = match (expected_len, i64::try_from(expected_len)) {
        (0, _) => sqlx::query_scalar(CREATE_LEN).bind(key).bind(added).fetch_optional(&mut *conn).await,
        (_, Ok(exp)) => sqlx::query_scalar(GROW_LEN).bind(key).bind(added).bind(exp).fetch_optional(&mut *conn).await,
        (_, Err(_)) => Ok(None),
    }
    .map_err(backend)?;
    let Some(len) = len else { return Err(conflict(entry_len(conn, key).await?)) };
    let mut seq = expected_len;
    for batch in batches(entries, INSERT_BATCH_BYTES_MAX) {
        let values: Vec<&[u8]> = batch.iter().map(|e| e.as_ref()).collect();
        let first = i64::try_from(seq).map_err(|_| StorageError::Backend("entry sequence overflow".into()))?;
        sqlx::query(INSERT_ENTRIES).bind(key).bind(first).bind(values).execute(&mut *conn).await.map_err(backend)?;
        seq += batch.len() as u64;
    }
    unsigned(len, "entry count")
}

/// Consecutive non-empty runs of `entries` of at most `bytes_max` bytes each (a longer entry is
/// a run of its own).
fn batches(entries: &[Bytes], bytes_max: usize) -> Vec<&[Bytes]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        if i > start && bytes + e.len() > bytes_max {
            out.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += e.len();
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

fn refused<'a, T: Send + 'a>(e: StorageError) -> BoxFuture<'a, Result<T, StorageError>> {
    futures::future::ready(Err(e)).boxed()
}

impl Storage for PostgresStorage {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Versioned>, StorageError>> {
        self.call(async move {
            let row: Option<(i64, Vec<u8>)> =
                sqlx::query_as(SELECT_STATE).bind(key.encode()).fetch_optional(&self.pool).await.map_err(backend)?;
            row.map(|(revision, value)| {
                Ok(Versioned { value: Bytes::from(value), revision: unsigned(revision, "revision")? })
            })
            .transpose()
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        expected: Revision,
        fence: Fence,
    ) -> BoxFuture<'a, Result<Revision, StorageError>> {
        if let Err(e) = check_write(key, &[&value]) {
            return refused(e);
        }
        self.call(async move { self.write(key, fence, Write::Put { value: &value, expected }).await })
    }

    fn delete<'a>(&'a self, key: &'a Key, expected: Revision, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        if let Err(e) = key.check() {
            return refused(e);
        }
        self.call(async move { self.write(key, fence, Write::Delete { expected }).await.map(drop) })
    }

    fn append<'a>(
        &'a self,
        key: &'a Key,
        entries: Vec<Bytes>,
        expected_len: u64,
        fence: Fence,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        if let Err(e) = check_write(key, &entries.iter().collect::<Vec<_>>()) {
            return refused(e);
        }
        self.call(async move { self.write(key, fence, Write::Append { entries: &entries, expected_len }).await })
    }

    fn entries<'a>(&'a self, key: &'a Key, from: u64, limit: usize) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>> {
        if let Err(e) = key.check() {
            return refused(e);
        }
        // Past the largest sequence number the database holds: nothing.
        let Ok(from) = i64::try_from(from) else { return futures::future::ready(Ok(Vec::new())).boxed() };
        let limit = limit.min(ENTRIES_READ_MAX) as i64;
        self.call(async move {
            let rows: Vec<Vec<u8>> = sqlx::query_scalar(SELECT_ENTRIES)
                .bind(key.encode())
                .bind(from)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
            Ok(rows.into_iter().map(Bytes::from).collect())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn epoch<'a>(&'a self, shard: u32) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.call(async move {
            let e: Option<i64> = sqlx::query_scalar(SELECT_EPOCH)
                .bind(i64::from(shard))
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            e.map_or(Ok(0), |e| unsigned(e, "epoch"))
        })
    }

    fn fence<'a>(&'a self, fence: Fence) -> BoxFuture<'a, Result<(), StorageError>> {
        // The key is not used by `Write::Fence`; any valid one names no row.
        let key = Key::new("-", "");
        self.call(async move { self.write(&key, fence, Write::Fence).await.map(drop) })
    }

    fn scan_keys<'a>(&'a self, after: Option<&'a Key>, limit: usize) -> BoxFuture<'a, Result<Vec<Key>, StorageError>> {
        let limit = match scan_check(after, limit) {
            Ok(limit) => limit as i64,
            Err(e) => return refused(e),
        };
        // Every stored key is longer than the empty string: `after = ''` lists from the start.
        let after = after.map(Key::encode).unwrap_or_default();
        self.call(async move {
            let keys: Vec<Vec<u8>> =
                sqlx::query_scalar(SCAN_KEYS).bind(after).bind(limit).fetch_all(&self.pool).await.map_err(backend)?;
            keys.iter().map(|k| Key::decode(k)).collect()
        })
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction, under the migration lock.
async fn migrate(conn: &mut PgConnection, target: &str) -> Result<(), OpenError> {
    let failed = |e: sqlx::Error| OpenError::Migrate { target: target.to_string(), reason: e.to_string() };
    let mut tx = conn.begin().await.map_err(failed)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut *tx).await.map_err(failed)?;
    // Checked rather than `CREATE TABLE IF NOT EXISTS`, which needs the CREATE privilege even when
    // the table exists: a migrated database needs no DDL rights.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('cadre_schema_version') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
    let found: i32 = if exists {
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM cadre_schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?
    } else {
        sqlx::raw_sql(
            "CREATE TABLE cadre_schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        0
    };
    if found > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew { target: target.to_string(), found, known: SCHEMA_VERSION });
    }
    for (version, step) in (1..).zip(MIGRATIONS).skip(found.max(0) as usize) {
        sqlx::raw_sql(*step).execute(&mut *tx).await.map_err(failed)?;
        sqlx::query("INSERT INTO cadre_schema_version (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        info!(database = %target, version, "storage schema migrated");
    }
    tx.commit().await.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(parse_url("postgres://u@h:5432/db").is_ok());
        assert!(parse_url("postgresql://u@h/db?sslmode=require").is_ok());
        for bad in ["mysql://u@h/db", "u@h/db", "postgres://u@h:notaport/db"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let e = parse_url("postgres://u:hunter2@h:notaport/db").unwrap_err().to_string();
        assert!(!e.contains("hunter2") && e.contains("u:***@h"), "{e}");
        assert_eq!(redact("postgres://u:pw@h:1/db?sslmode=require"), "postgres://u:***@h:1/db?sslmode=require");
        assert_eq!(redact("postgres://u@h/db?password=pw&x=1"), "postgres://u@h/db?password=***&x=1");
        assert_eq!(redact("postgres://h"), "postgres://h");
        assert_eq!(redact("postgres://a:b@c@h/db"), "postgres://a:***@h/db", "the last @ ends the user part");
    }

    #[test]
    fn appends_are_cut_into_bounded_batches() {
        let e = |n: usize| Bytes::from(vec![0u8; n]);
        let entries = vec![e(3), e(3), e(5), e(1), e(9), e(0)];
        let lens: Vec<usize> = batches(&entries, 6).iter().map(|b| b.len()).collect();
        assert_eq!(lens, [2, 2, 1, 1], "3+3 | 5+1 | 9 (alone: over the bound) | 0");
        assert_eq!(batches(&entries, usize::MAX).len(), 1);
        assert!(batches(&[], 6).is_empty());
    }
}
