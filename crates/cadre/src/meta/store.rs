//! Where the metadata group keeps its log, vote and snapshots: one redb database, a file under the
//! data dir (`meta.redb`) or redb's in-memory backend (no data dir, simulations).
//!
//! - **Log** (`log`: index → postcard entry), **vote** and **committed** (`kv`): every write is one
//!   redb transaction committed durably before openraft is told (`LogFlushed` after the commit).
//! - **State machine**: [`MetaState`] lives in memory. Snapshots are stored (`kv`) when built or
//!   installed, and the log before a snapshot is purged; at start the state is the last snapshot
//!   and openraft re-applies the committed log after it. So the state machine needs no write per
//!   applied entry.
//! - **Node id**: the Raft id of this node's data dir, drawn once and kept (`kv`). A node that
//!   loses its data dir comes back as a new member; its old id is replaced like a dead voter.
//!
//! A file-backed database is used from tokio's blocking pool; the in-memory one inline (it does
//! no IO, and simulations must not leave the runtime thread).
//!
//! Every applied batch publishes the new state on a `watch` channel: the node's routing copy.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); the helpers here
// return it so `?` works inside them.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::raft::{MetaNode, NodeId, TC};
use super::{CmdOutcome, MetaState};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";
const NODE_ID: &str = "node_id";

type SE = StorageError<NodeId>;

fn io_err(e: impl std::fmt::Display) -> SE {
    StorageIOError::write(&std::io::Error::other(e.to_string())).into()
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, SE> {
    postcard::to_allocvec(v).map_err(io_err)
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, SE> {
    postcard::from_bytes(b).map_err(io_err)
}

/// Why the metadata database cannot be opened, or its node id read or kept.
#[derive(Debug, thiserror::Error)]
pub enum MetaDbError {
    /// The file cannot be opened or created.
    #[error("{}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: redb::DatabaseError,
    },
    /// A transaction cannot begin.
    #[error(transparent)]
    Transaction(#[from] redb::TransactionError),
    /// A table cannot be opened.
    #[error(transparent)]
    Table(#[from] redb::TableError),
    /// A read or write failed.
    #[error(transparent)]
    Storage(#[from] redb::StorageError),
    /// A write cannot be committed.
    #[error(transparent)]
    Commit(#[from] redb::CommitError),
    /// A stored value that does not decode.
    #[error("the stored {what} is unreadable: {source}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// The decoding error.
        source: postcard::Error,
    },
}

/// The database behind the log and the snapshots.
#[derive(Clone)]
pub struct MetaDb {
    db: Arc<Database>,
    inline: bool,
}

impl MetaDb {
    /// Opens (or creates) the file.
    pub fn open(path: &Path) -> Result<MetaDb, MetaDbError> {
        let db = Database::create(path).map_err(|source| MetaDbError::Open { path: path.to_path_buf(), source })?;
        Self::init(db, false)
    }

    /// A database in memory (gone with the process).
    pub fn memory() -> MetaDb {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database opens");
        Self::init(db, true).expect("an in-memory database initializes")
    }

    fn init(db: Database, inline: bool) -> Result<MetaDb, MetaDbError> {
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(KV)?;
        tx.commit()?;
        Ok(MetaDb { db: Arc::new(db), inline })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, SE> + Send + 'static,
    ) -> Result<T, SE> {
        if self.inline {
            return f(&self.db);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(io_err)?
    }

    fn get_kv<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, SE> {
        let tx = db.begin_read().map_err(io_err)?;
        let table = tx.open_table(KV).map_err(io_err)?;
        let v = table.get(key).map_err(io_err)?;
        v.map(|g| dec(g.value())).transpose()
    }

    /// Stores a snapshot unless the one stored is newer (a build finishing after an install of a
    /// newer snapshot must not replace it: the log before the newer one may be purged).
    fn put_snapshot(db: &Database, snapshot: &StoredSnapshot) -> Result<(), SE> {
        let tx = db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(KV).map_err(io_err)?;
            let stored = table.get(SNAPSHOT).map_err(io_err)?.map(|g| dec::<StoredSnapshot>(g.value())).transpose()?;
            if stored.is_some_and(|s| s.meta.last_log_id > snapshot.meta.last_log_id) {
                return Ok(());
            }
            table.insert(SNAPSHOT, enc(snapshot)?.as_slice()).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)
    }

    fn put_kv(db: &Database, key: &str, value: Vec<u8>) -> Result<(), SE> {
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(KV).map_err(io_err)?.insert(key, value.as_slice()).map_err(io_err)?;
        tx.commit().map_err(io_err)
    }

    /// This data dir's Raft id: stored, or `fresh` stored now (one transaction).
    pub fn node_id(&self, fresh: NodeId) -> Result<NodeId, MetaDbError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(KV)?;
            let stored = table.get(NODE_ID)?.map(|g| postcard::from_bytes::<NodeId>(g.value()));
            match stored {
                Some(Ok(id)) => return Ok(id),
                Some(Err(source)) => return Err(MetaDbError::Corrupt { what: NODE_ID, source }),
                None => {
                    let value = postcard::to_allocvec(&fresh).expect("postcard into a Vec");
                    table.insert(NODE_ID, value.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(fresh)
    }
}

// ------------------------------------------------------------------------------------------------
// Log

/// The Raft log, vote and commit index.
#[derive(Clone)]
pub struct LogStore {
    db: MetaDb,
}

impl LogStore {
    pub fn new(db: MetaDb) -> LogStore {
        LogStore { db }
    }
}

fn bound_owned(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(v) => Bound::Included(*v),
        Bound::Excluded(v) => Bound::Excluded(*v),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TC> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TC>>, SE> {
        let range = (bound_owned(range.start_bound()), bound_owned(range.end_bound()));
        self.db
            .run(move |db| {
                let tx = db.begin_read().map_err(io_err)?;
                let table = tx.open_table(LOG).map_err(io_err)?;
                let mut out = Vec::new();
                for row in table.range::<u64>(range).map_err(io_err)? {
                    let (_, v) = row.map_err(io_err)?;
                    out.push(dec(v.value())?);
                }
                Ok(out)
            })
            .await
    }
}

impl RaftLogStorage<TC> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TC>, SE> {
        self.db
            .run(|db| {
                let purged: Option<LogId<NodeId>> = MetaDb::get_kv(db, PURGED)?;
                let tx = db.begin_read().map_err(io_err)?;
                let table = tx.open_table(LOG).map_err(io_err)?;
                let last = match table.last().map_err(io_err)? {
                    Some((_, v)) => Some(dec::<Entry<TC>>(v.value())?.log_id),
                    None => purged,
                };
                Ok(LogState { last_purged_log_id: purged, last_log_id: last })
            })
            .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        let v = enc(vote)?;
        self.db.run(move |db| MetaDb::put_kv(db, VOTE, v)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        self.db.run(|db| MetaDb::get_kv(db, VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SE> {
        let v = enc(&committed)?;
        self.db.run(move |db| MetaDb::put_kv(db, COMMITTED, v)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SE> {
        Ok(self.db.run(|db| MetaDb::get_kv::<Option<LogId<NodeId>>>(db, COMMITTED)).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TC>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TC>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries.into_iter().map(|e| Ok((e.log_id.index, enc(&e)?))).collect::<Result<Vec<_>, SE>>()?;
        let r = self
            .db
            .run(move |db| {
                let tx = db.begin_write().map_err(io_err)?;
                {
                    let mut table = tx.open_table(LOG).map_err(io_err)?;
                    for (index, bytes) in &rows {
                        table.insert(*index, bytes.as_slice()).map_err(io_err)?;
                    }
                }
                tx.commit().map_err(io_err)
            })
            .await;
        // Durable (committed) before openraft learns it is.
        callback.log_io_completed(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        r
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        self.db
            .run(move |db| {
                let tx = db.begin_write().map_err(io_err)?;
                tx.open_table(LOG).map_err(io_err)?.retain_in(log_id.index.., |_, _| false).map_err(io_err)?;
                tx.commit().map_err(io_err)
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let purged = enc(&log_id)?;
        self.db
            .run(move |db| {
                let tx = db.begin_write().map_err(io_err)?;
                tx.open_table(KV).map_err(io_err)?.insert(PURGED, purged.as_slice()).map_err(io_err)?;
                tx.open_table(LOG).map_err(io_err)?.retain_in(..=log_id.index, |_, _| false).map_err(io_err)?;
                tx.commit().map_err(io_err)
            })
            .await
    }
}

// ------------------------------------------------------------------------------------------------
// State machine

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MetaNode>,
    data: MetaState,
}

struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, MetaNode>,
    state: MetaState,
    snapshot_seq: u64,
}

/// Why the state machine could not start from its database.
#[derive(Debug, thiserror::Error)]
pub enum SmOpenError {
    /// The stored snapshot cannot be read.
    #[error("cannot read the stored metadata snapshot: {0}")]
    Read(Box<SE>),
    /// The stored snapshot breaks a rule every metadata state keeps (a damaged or foreign
    /// `meta.redb`): the node does not start from it.
    #[error("the stored metadata snapshot is inconsistent ({0}); refusing to start from it")]
    Invariant(super::InvariantError),
}

/// The state machine: [`MetaState`] in memory, snapshots in the database.
#[derive(Clone)]
pub struct SmStore {
    db: MetaDb,
    inner: Arc<Mutex<SmInner>>,
    tx: Arc<watch::Sender<Arc<MetaState>>>,
}

impl SmStore {
    /// Starts from the stored snapshot, if any: refused if it breaks the metadata's invariants
    /// (a damaged or foreign `meta.redb`), rather than served until a lookup panics on it.
    pub fn open(db: MetaDb) -> Result<SmStore, SmOpenError> {
        let stored: Option<StoredSnapshot> =
            MetaDb::get_kv(&db.db, SNAPSHOT).map_err(|e| SmOpenError::Read(Box::new(e)))?;
        if let Some(s) = &stored {
            s.data.check_invariants().map_err(SmOpenError::Invariant)?;
        }
        let inner = match stored {
            Some(s) => SmInner {
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership.clone(),
                state: s.data,
                snapshot_seq: 0,
            },
            None => SmInner {
                last_applied: None,
                membership: StoredMembership::default(),
                state: MetaState::default(),
                snapshot_seq: 0,
            },
        };
        let (tx, _) = watch::channel(Arc::new(inner.state.clone()));
        Ok(SmStore { db, inner: Arc::new(Mutex::new(inner)), tx: Arc::new(tx) })
    }

    /// The applied state, updated after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.tx.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, state: MetaState) {
        self.tx.send_replace(Arc::new(state));
    }
}

impl RaftSnapshotBuilder<TC> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TC>, SE> {
        let stored = {
            let mut g = self.lock();
            g.snapshot_seq += 1;
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
                snapshot_id: format!("{}-{}", g.last_applied.map_or(0, |l| l.index), g.snapshot_seq),
            };
            StoredSnapshot { meta, data: g.state.clone() }
        };
        let stored = Arc::new(stored);
        let s2 = stored.clone();
        self.db.run(move |db| MetaDb::put_snapshot(db, &s2)).await?;
        Ok(Snapshot { meta: stored.meta.clone(), snapshot: Box::new(stored.data.clone()) })
    }
}

impl RaftStateMachine<TC> for SmStore {
    type SnapshotBuilder = SmStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MetaNode>), SE> {
        let g = self.lock();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CmdOutcome>, SE>
    where
        I: IntoIterator<Item = Entry<TC>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let state = {
            let mut g = self.lock();
            for e in entries {
                g.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Ok(super::CmdReply::Done)),
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Ok(super::CmdReply::Done));
                    }
                    EntryPayload::Normal(cmd) => out.push(g.state.apply(&cmd)),
                }
            }
            // `apply` keeps them by construction: a debug build (tests, simulations) says so.
            #[cfg(debug_assertions)]
            if let Err(e) = g.state.check_invariants() {
                panic!("applying up to {:?} broke the metadata's invariants: {e}", g.last_applied);
            }
            g.state.clone()
        };
        self.publish(state);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<MetaState>, SE> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MetaNode>,
        snapshot: Box<MetaState>,
    ) -> Result<(), SE> {
        let stored = Arc::new(StoredSnapshot { meta: meta.clone(), data: *snapshot });
        let s2 = stored.clone();
        self.db.run(move |db| MetaDb::put_snapshot(db, &s2)).await?;
        {
            let mut g = self.lock();
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            g.state = stored.data.clone();
        }
        self.publish(stored.data.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TC>>, SE> {
        let stored: Option<StoredSnapshot> = self.db.run(|db| MetaDb::get_kv(db, SNAPSHOT)).await?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(s.data) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(data: MetaState) -> StoredSnapshot {
        StoredSnapshot { meta: SnapshotMeta::default(), data }
    }

    fn sound() -> MetaState {
        let mut s = MetaState::default();
        s.apply(&super::super::Cmd::Init { shard_count: 4 }).unwrap();
        s
    }

    #[test]
    fn the_node_id_is_drawn_once_and_an_unreadable_one_is_a_typed_error() {
        let db = MetaDb::memory();
        assert_eq!(db.node_id(5).unwrap(), 5);
        assert_eq!(db.node_id(9).unwrap(), 5, "kept");
        MetaDb::put_kv(&db.db, NODE_ID, vec![]).unwrap();
        let err = db.node_id(9).unwrap_err();
        assert!(matches!(err, MetaDbError::Corrupt { what: NODE_ID, .. }), "{err}");
        assert!(err.to_string().starts_with("the stored node_id is unreadable"), "{err}");
    }

    #[test]
    fn a_database_that_cannot_be_created_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("meta.redb");
        match MetaDb::open(&path) {
            Err(e @ MetaDbError::Open { .. }) => assert!(e.to_string().contains("missing"), "{e}"),
            other => panic!("expected Open, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_stored_snapshot_that_breaks_the_invariants_is_refused_at_start() {
        let db = MetaDb::memory();
        MetaDb::put_snapshot(&db.db, &stored(sound())).unwrap();
        let sm = SmStore::open(db).expect("a sound snapshot opens");
        assert_eq!(sm.subscribe().borrow().shard_count, 4);

        // A shard table shorter than its shard count: an owner lookup would index past it.
        let mut bad = sound();
        bad.shards.truncate(2);
        let db = MetaDb::memory();
        MetaDb::put_snapshot(&db.db, &stored(bad)).unwrap();
        match SmStore::open(db) {
            Err(SmOpenError::Invariant(super::super::InvariantError::TableLen { len: 2, count: 4 })) => {}
            other => panic!("expected a typed refusal, got {:?}", other.map(|_| ())),
        }
    }
}
