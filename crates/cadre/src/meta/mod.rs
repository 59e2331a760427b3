//! Cluster metadata: the replicated state machine that the Raft group drives.
//!
//! [`MetaState`] is pure: [`MetaState::apply`] takes a [`Cmd`] and returns a reply or a typed
//! refusal, with no IO and no clock, so every replica that applies the same commands in the same
//! order holds the same state. It holds:
//! - `shard_count`, fixed by [`Cmd::Init`] (once);
//! - the admitted members, in admission order (the controller picks the Raft voters among the
//!   live ones in that order, up to `meta.voters_max`);
//! - the shard table `shard → (owner, epoch, state, replicas)`.
//!
//! ## Replicas
//! With node-local storage a shard's state is also kept on its replicas. A replica is added out of
//! sync ([`Cmd::AddReplica`]); the owner catches it up and marks it in sync
//! ([`Cmd::ReplicaSynced`]); a replica that misses a write is marked out of sync before the write
//! is acknowledged ([`Cmd::ReplicaOutOfSync`]). So every in-sync replica holds every acknowledged
//! write, and [`Cmd::Promote`] gives a shard whose owner died to one of them. These commands are
//! compare-and-set on the epoch but do not raise it (the epoch counts owners).
//!
//! ## Epochs
//! Every change of a shard's owner raises its epoch by one, and changes are compare-and-set on the
//! epoch the controller saw ([`Cmd::Assign`], [`Cmd::CompleteMove`]), so two controllers acting
//! on the same old view cannot both win. Storage writes carry the epoch (fencing, see
//! [`crate::storage`]): once the new owner writes, the old one is refused.
//!
//! Commands are an enum whose new variants go at the end (the encoding is by position), so new
//! kinds of replicated data can join the same group.
//!
//! The Raft group that replicates it is in [`raft`] (openraft binding, network over the control
//! lane) and [`store`] (log and snapshots in redb); [`crate::cluster`] drives it (voters, leases,
//! the placement controller). [`invariants`] checks what every state `apply` reaches satisfies: a
//! snapshot received or loaded that breaks it is refused.

pub mod invariants;
pub mod raft;
pub mod store;

pub use invariants::InvariantError;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::config::{SHARD_COUNT_DEFAULT, SHARD_COUNT_MAX};

/// An admitted member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Transport address peers dial.
    pub addr: String,
    /// Position in admission order (0-based, never reused).
    pub admitted: u64,
    /// Leaving gracefully: its shards are handed over by planned moves, and none are given to it.
    pub draining: bool,
    /// The Raft id of the process last admitted under this name (0: not known). A new id means a
    /// new process that kept no data dir: see [`Cmd::Admit`].
    pub raft_id: u64,
}

/// What a shard is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    /// No owner.
    Unassigned,
    /// Served by its owner.
    Active,
    /// A planned move: the owner hands off to `to`, then `CompleteMove` makes `to` the owner.
    Moving { to: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub owner: Option<String>,
    pub epoch: u64,
    pub state: ShardState,
    /// Nodes besides the owner that keep a copy of the shard's state (node-local storage). The
    /// owner acknowledges a write only once every `in_sync` one has it.
    pub replicas: Vec<Replica>,
}

/// A node holding a copy of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: String,
    /// Holds every acknowledged write of the shard (it may be promoted); `false` while it is
    /// being caught up, or after it missed a write.
    pub in_sync: bool,
    /// Changes whenever the replica is added or falls out of sync (unique across the metadata): a
    /// `ReplicaSynced` is for one catch-up of one generation, so a late one (its result was lost,
    /// then the replica missed a write or was dropped and added again) changes nothing.
    pub generation: u64,
}

impl ShardEntry {
    pub fn replica(&self, node: &str) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.node == node)
    }
    /// Whether `node` is an in-sync replica.
    pub fn in_sync(&self, node: &str) -> bool {
        self.replica(node).is_some_and(|r| r.in_sync)
    }
}

/// A state change. New variants go at the end (the encoding is by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmd {
    /// Fixes the shard count; only once.
    Init { shard_count: u32 },
    /// Admits a member (again: updates its address, keeps its position). Admitted again with
    /// another Raft id, it is a new process that lost its data dir, so it holds none of the state
    /// the table credits it with: it stops being a replica, and the shards it owned lose their
    /// owner (at the same epoch; an in-sync replica is promoted).
    Admit { name: String, addr: String, raft_id: u64 },
    /// Removes a member; its shards become unassigned (epoch kept, so the next owner is fenced
    /// against it).
    Remove { name: String },
    /// Gives a shard to `owner` at `expected_epoch + 1`, if its epoch is still `expected_epoch`.
    Assign { shard: u32, owner: String, expected_epoch: u64 },
    /// Starts a planned move of an active shard to `to`.
    BeginMove { shard: u32, to: String, expected_epoch: u64 },
    /// Ends a planned move: `to` owns the shard at `expected_epoch + 1`.
    CompleteMove { shard: u32, expected_epoch: u64 },
    /// Gives up a planned move (its target died, or the hand-off took too long): the owner keeps
    /// the shard, at `expected_epoch + 1` so that nothing of the abandoned hand-off (a late
    /// report, a late copy) can be taken for a later move's.
    AbortMove { shard: u32, expected_epoch: u64 },
    /// Marks a member as leaving (an `Admit` clears it).
    Drain { name: String },
    /// Adds a replica of a shard, not in sync yet (its owner catches it up).
    AddReplica { shard: u32, node: String, expected_epoch: u64 },
    /// The owner caught a replica up (the catch-up began at `generation`): it now counts for
    /// acknowledgements and may be promoted.
    ReplicaSynced { shard: u32, node: String, expected_epoch: u64, generation: u64 },
    /// A replica missed a write: it no longer counts (nor may be promoted) until caught up again.
    ReplicaOutOfSync { shard: u32, node: String, expected_epoch: u64 },
    /// Removes a replica (dead, or no longer wanted there).
    DropReplica { shard: u32, node: String, expected_epoch: u64 },
    /// Makes an in-sync replica the owner at `expected_epoch + 1` (the owner's lease expired):
    /// it holds every acknowledged write. The old owner is no longer a replica.
    Promote { shard: u32, to: String, expected_epoch: u64 },
    /// Several commands in one log entry, each applied on its own (one refused changes nothing
    /// of the others): replica reports from many shards cost one entry, not one each. At most
    /// [`BATCH_CMDS_MAX`]; not nested.
    Batch(Vec<Cmd>),
    /// Adds a cluster-wide route to agents (idempotent: the same route has the same id).
    AddRoute(AgentRoute),
    /// Removes a cluster-wide route.
    RemoveRoute { id: u64 },
}

/// Most cluster-wide agent routes.
pub const ROUTES_MAX: usize = 10_000;
/// Longest pattern, agent type or key pointer of a route, in bytes.
pub const ROUTE_FIELD_LEN_MAX: usize = 1024;

/// A cluster-wide subscription whose target is an agent: every node delivers the matching signals
/// it publishes to the agent, wherever that lives (see [`crate::bus`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentRoute {
    pub pattern: String,
    pub target: AgentTarget,
}

/// Which agent a routed signal goes to: the target of a cluster-wide route (its JSON form,
/// `{"agent":{"type":"order","key":"subject"}}` or `{"pool":{"type":"worker"}}`, is a dispatch of
/// `POST /v1/subscriptions` and of routes files). The subscriptions that mirror such a route on
/// every node have it as their [`Dispatch::Agent`](crate::Dispatch::Agent).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentTarget {
    /// The agent of type `ty` whose id is the signal's `subject` (`key: "subject"`) or the string
    /// at a JSON pointer into its data (`key: "/order/id"`).
    Agent {
        /// The agent type.
        #[serde(rename = "type")]
        ty: String,
        /// What names the agent: `subject`, or a JSON pointer into the signal's data.
        key: String,
    },
    /// One agent of type `ty`, preferably on the publishing node (stateless workers).
    Pool {
        /// The agent type.
        #[serde(rename = "type")]
        ty: String,
    },
}

impl AgentTarget {
    /// The agent type.
    pub fn ty(&self) -> &str {
        match self {
            AgentTarget::Agent { ty, .. } | AgentTarget::Pool { ty } => ty,
        }
    }
}

impl AgentRoute {
    /// The route's id: a hash of its content, so adding it twice (every node loading the same
    /// routes file) gives one route.
    pub fn id(&self) -> u64 {
        let bytes = postcard::to_allocvec(self).expect("postcard into a Vec");
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// Checks what can be checked without a router: lengths and the key source.
    pub fn check(&self) -> Result<(), AgentRouteError> {
        let long = |s: &str| s.is_empty() || s.len() > ROUTE_FIELD_LEN_MAX;
        if long(&self.pattern) || long(self.target.ty()) {
            return Err(AgentRouteError::FieldLength);
        }
        if let AgentTarget::Agent { key, .. } = &self.target {
            if key != "subject" && !(key.starts_with('/') && key.len() <= ROUTE_FIELD_LEN_MAX) {
                let mut key = key.clone();
                key.truncate(key.floor_char_boundary(ROUTE_FIELD_LEN_MAX));
                return Err(AgentRouteError::Key { key });
            }
        }
        Ok(())
    }
}

/// Why a cluster-wide route to agents cannot be added as given (checked before it is
/// proposed, and again by the metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AgentRouteError {
    /// The pattern or the agent type is empty or longer than `ROUTE_FIELD_LEN_MAX` (1024) bytes.
    #[error("pattern and type must be 1..={ROUTE_FIELD_LEN_MAX} bytes")]
    FieldLength,
    /// The key source is neither `subject` nor a JSON pointer of at most `ROUTE_FIELD_LEN_MAX`
    /// (1024) bytes.
    #[error("key {key:?} must be \"subject\" or a JSON pointer (\"/field\")")]
    Key {
        /// The key source given, cut at `ROUTE_FIELD_LEN_MAX` bytes.
        key: String,
    },
}

/// Commands in one [`Cmd::Batch`].
pub const BATCH_CMDS_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdReply {
    Done,
    /// The shard's new owner and epoch.
    Shard {
        shard: u32,
        owner: Option<String>,
        epoch: u64,
    },
    /// Each command of a [`Cmd::Batch`], in order.
    Batch(Vec<CmdOutcome>),
    /// The id of the route added (or already there).
    Route {
        id: u64,
    },
}

/// What applying a command gave: the Raft group's response type.
pub type CmdOutcome = Result<CmdReply, MetaError>;

/// Why the cluster's metadata refused a change (a command of its replicated state machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    /// The shard count is not fixed yet.
    #[error("the cluster has no shard count yet")]
    NotInitialized,
    /// The shard count is fixed already (at this count).
    #[error("the shard count is fixed at {0}")]
    AlreadyInitialized(u32),
    /// A shard count out of range.
    #[error("shard count {0} must be within 1..={SHARD_COUNT_MAX}")]
    ShardCount(u32),
    /// No member of this name.
    #[error("no member {0:?}")]
    UnknownMember(String),
    /// No shard of this number.
    #[error("no shard {shard} (the cluster has {count})")]
    UnknownShard {
        /// The shard asked for.
        shard: u32,
        /// The cluster's shard count.
        count: u32,
    },
    /// The shard's epoch changed since the change was decided (another change came first).
    #[error("shard {shard} is at epoch {actual}, not {expected}")]
    StaleEpoch {
        /// The shard.
        shard: u32,
        /// The epoch the change expected.
        expected: u64,
        /// The shard's epoch.
        actual: u64,
    },
    /// The shard is not in the state the change needs.
    #[error("shard {shard} is {state}; that change needs it {needed}")]
    WrongState {
        /// The shard.
        shard: u32,
        /// Its state.
        state: String,
        /// The state the change needs.
        needed: String,
    },
    /// The node is not an in-sync replica of the shard.
    #[error("{node} is not an in-sync replica of shard {shard}")]
    NotInSync {
        /// The shard.
        shard: u32,
        /// The node.
        node: String,
    },
    /// The node owns the shard, so it cannot be its replica.
    #[error("{node} owns shard {shard}; it cannot also be its replica")]
    OwnerAsReplica {
        /// The shard.
        shard: u32,
        /// The node.
        node: String,
    },
    /// A batch of commands too long, or nested in another.
    #[error("a batch of {len} commands is over {BATCH_CMDS_MAX}, or nested")]
    BadBatch {
        /// Its length.
        len: usize,
    },
    /// A cluster-wide route to agents that is invalid.
    #[error("invalid route: {0}")]
    BadRoute(AgentRouteError),
    /// The cluster has as many cluster-wide routes as allowed.
    #[error("the cluster has {ROUTES_MAX} routes, its limit")]
    TooManyRoutes,
    /// No cluster-wide route of this id.
    #[error("no route {0}")]
    UnknownRoute(u64),
    /// The node owns the shard, so it cannot be the target of its move.
    #[error("{node} owns shard {shard}; it cannot be its move's target")]
    MoveToOwner {
        /// The shard.
        shard: u32,
        /// The node.
        node: String,
    },
}

/// The replicated metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub shard_count: u32,
    pub members: BTreeMap<String, MemberRecord>,
    pub shards: Vec<ShardEntry>,
    /// Admissions so far (the next member's position).
    pub admitted: u64,
    /// Replica generations handed out so far.
    pub generations: u64,
    /// Cluster-wide routes to agents, by id.
    pub routes: BTreeMap<u64, AgentRoute>,
}

impl MetaState {
    /// Applies one command. A refused command changes nothing.
    pub fn apply(&mut self, cmd: &Cmd) -> Result<CmdReply, MetaError> {
        match cmd {
            Cmd::Init { shard_count } => self.init(*shard_count),
            Cmd::Admit { name, addr, raft_id } => {
                let position = self.admitted;
                let record = self.members.entry(name.clone()).or_insert_with(|| MemberRecord {
                    addr: addr.clone(),
                    admitted: position,
                    draining: false,
                    raft_id: *raft_id,
                });
                if record.admitted == position {
                    self.admitted += 1;
                }
                record.addr = addr.clone();
                record.draining = false;
                let reborn = record.raft_id != 0 && *raft_id != 0 && record.raft_id != *raft_id;
                record.raft_id = *raft_id;
                if reborn {
                    self.forget_copies(name);
                }
                Ok(CmdReply::Done)
            }
            Cmd::Remove { name } => self.remove(name),
            Cmd::Drain { name } => {
                self.members.get_mut(name).ok_or_else(|| MetaError::UnknownMember(name.clone()))?.draining = true;
                Ok(CmdReply::Done)
            }
            Cmd::Assign { shard, owner, expected_epoch } => {
                self.member(owner)?;
                let e = self.shard_at(*shard, *expected_epoch)?;
                e.owner = Some(owner.clone());
                e.epoch += 1;
                e.state = ShardState::Active;
                // A fresh owner holds none of the state the replicas have: they must not count.
                e.replicas.clear();
                Ok(self.reply(*shard))
            }
            Cmd::BeginMove { shard, to, expected_epoch } => {
                self.member(to)?;
                let e = self.shard_at(*shard, *expected_epoch)?;
                if e.state != ShardState::Active {
                    return Err(wrong_state(*shard, &e.state, "active"));
                }
                if e.owner.as_ref() == Some(to) {
                    return Err(MetaError::MoveToOwner { shard: *shard, node: to.clone() });
                }
                e.state = ShardState::Moving { to: to.clone() };
                Ok(self.reply(*shard))
            }
            Cmd::CompleteMove { shard, expected_epoch } => {
                let e = self.shard_at(*shard, *expected_epoch)?;
                let to = match &e.state {
                    ShardState::Moving { to } => to.clone(),
                    other => return Err(wrong_state(*shard, other, "moving")),
                };
                // A replica target must hold every acknowledged write (it may have missed one
                // since the move began); a replicated shard moves only to one of its replicas.
                if e.replica(&to).is_some_and(|r| !r.in_sync) || (!e.replicas.is_empty() && e.replica(&to).is_none()) {
                    return Err(MetaError::NotInSync { shard: *shard, node: to });
                }
                self.member(&to)?;
                let generation = self.generations + 1;
                let e = &mut self.shards[*shard as usize];
                // A replicated shard: the old owner has everything, so it stays as a replica.
                let mut used = false;
                if let Some(i) = e.replicas.iter().position(|r| r.node == to) {
                    e.replicas.remove(i);
                    if let Some(old) = e.owner.take() {
                        e.replicas.push(Replica { node: old, in_sync: true, generation });
                        used = true;
                    }
                }
                e.owner = Some(to);
                e.epoch += 1;
                e.state = ShardState::Active;
                self.generations += u64::from(used);
                Ok(self.reply(*shard))
            }
            Cmd::AbortMove { shard, expected_epoch } => {
                let e = self.shard_at(*shard, *expected_epoch)?;
                if !matches!(e.state, ShardState::Moving { .. }) {
                    return Err(wrong_state(*shard, &e.state, "moving"));
                }
                e.state = ShardState::Active;
                e.epoch += 1;
                Ok(self.reply(*shard))
            }
            Cmd::AddReplica { shard, node, expected_epoch } => {
                self.member(node)?;
                let e = self.shard_at(*shard, *expected_epoch)?;
                if e.owner.as_deref() == Some(node.as_str()) {
                    return Err(MetaError::OwnerAsReplica { shard: *shard, node: node.clone() });
                }
                if e.replica(node).is_none() {
                    self.generations += 1;
                    let generation = self.generations;
                    let e = &mut self.shards[*shard as usize];
                    e.replicas.push(Replica { node: node.clone(), in_sync: false, generation });
                }
                Ok(self.reply(*shard))
            }
            Cmd::ReplicaSynced { shard, node, expected_epoch, generation } => {
                let e = self.shard_at(*shard, *expected_epoch)?;
                let r = e.replicas.iter_mut().find(|r| r.node == *node && r.generation == *generation);
                r.ok_or_else(|| MetaError::NotInSync { shard: *shard, node: node.clone() })?.in_sync = true;
                Ok(self.reply(*shard))
            }
            Cmd::ReplicaOutOfSync { shard, node, expected_epoch } => {
                self.shard_at(*shard, *expected_epoch)?;
                self.generations += 1;
                let generation = self.generations;
                let e = &mut self.shards[*shard as usize];
                if let Some(r) = e.replicas.iter_mut().find(|r| r.node == *node) {
                    r.in_sync = false;
                    r.generation = generation;
                }
                Ok(self.reply(*shard))
            }
            Cmd::DropReplica { shard, node, expected_epoch } => {
                let e = self.shard_at(*shard, *expected_epoch)?;
                if matches!(&e.state, ShardState::Moving { to } if to == node) {
                    // The move is aborted first: completing it must find the target in sync.
                    return Err(wrong_state(*shard, &e.state, "not moving to it"));
                }
                e.replicas.retain(|r| r.node != *node);
                Ok(self.reply(*shard))
            }
            Cmd::Promote { shard, to, expected_epoch } => {
                self.member(to)?;
                let e = self.shard_at(*shard, *expected_epoch)?;
                if !e.in_sync(to) {
                    return Err(MetaError::NotInSync { shard: *shard, node: to.clone() });
                }
                e.replicas.retain(|r| r.node != *to);
                e.owner = Some(to.clone());
                e.epoch += 1;
                e.state = ShardState::Active;
                Ok(self.reply(*shard))
            }
            Cmd::Batch(cmds) => {
                if cmds.len() > BATCH_CMDS_MAX || cmds.iter().any(|c| matches!(c, Cmd::Batch(_))) {
                    return Err(MetaError::BadBatch { len: cmds.len() });
                }
                Ok(CmdReply::Batch(cmds.iter().map(|c| self.apply(c)).collect()))
            }
            Cmd::AddRoute(route) => {
                route.check().map_err(MetaError::BadRoute)?;
                let id = route.id();
                if !self.routes.contains_key(&id) && self.routes.len() >= ROUTES_MAX {
                    return Err(MetaError::TooManyRoutes);
                }
                self.routes.insert(id, route.clone());
                Ok(CmdReply::Route { id })
            }
            Cmd::RemoveRoute { id } => match self.routes.remove(id) {
                Some(_) => Ok(CmdReply::Done),
                None => Err(MetaError::UnknownRoute(*id)),
            },
        }
    }

    fn init(&mut self, shard_count: u32) -> Result<CmdReply, MetaError> {
        if self.shard_count != 0 {
            return Err(MetaError::AlreadyInitialized(self.shard_count));
        }
        if !(1..=SHARD_COUNT_MAX).contains(&shard_count) {
            return Err(MetaError::ShardCount(shard_count));
        }
        self.shard_count = shard_count;
        let empty = ShardEntry { owner: None, epoch: 0, state: ShardState::Unassigned, replicas: Vec::new() };
        self.shards = vec![empty; shard_count as usize];
        Ok(CmdReply::Done)
    }

    /// `name` holds no copy any more: it leaves every replica set and its shards lose their owner.
    fn forget_copies(&mut self, name: &str) {
        for e in &mut self.shards {
            e.replicas.retain(|r| r.node != name);
            if e.owner.as_deref() == Some(name) {
                e.owner = None;
                e.state = ShardState::Unassigned;
            } else if matches!(&e.state, ShardState::Moving { to } if to == name) {
                e.state = ShardState::Active;
            }
        }
    }

    fn remove(&mut self, name: &str) -> Result<CmdReply, MetaError> {
        self.members.remove(name).ok_or_else(|| MetaError::UnknownMember(name.to_string()))?;
        // Its copies go; the shards it owned keep their replicas (one can be promoted).
        self.forget_copies(name);
        Ok(CmdReply::Done)
    }

    fn member(&self, name: &str) -> Result<&MemberRecord, MetaError> {
        self.members.get(name).ok_or_else(|| MetaError::UnknownMember(name.to_string()))
    }

    /// The shard, if it exists and is still at `expected` epoch.
    fn shard_at(&mut self, shard: u32, expected: u64) -> Result<&mut ShardEntry, MetaError> {
        if self.shard_count == 0 {
            return Err(MetaError::NotInitialized);
        }
        let count = self.shard_count;
        let e = self.shards.get_mut(shard as usize).ok_or(MetaError::UnknownShard { shard, count })?;
        if e.epoch != expected {
            return Err(MetaError::StaleEpoch { shard, expected, actual: e.epoch });
        }
        Ok(e)
    }

    fn reply(&self, shard: u32) -> CmdReply {
        let e = &self.shards[shard as usize];
        CmdReply::Shard { shard, owner: e.owner.clone(), epoch: e.epoch }
    }

    /// Members in admission order.
    pub fn members_in_order(&self) -> Vec<&str> {
        let mut list: Vec<(&str, u64)> = self.members.iter().map(|(n, r)| (n.as_str(), r.admitted)).collect();
        list.sort_by_key(|(_, a)| *a);
        list.into_iter().map(|(n, _)| n).collect()
    }

    /// Shards owned per member.
    pub fn shard_counts(&self) -> BTreeMap<&str, usize> {
        let mut out: BTreeMap<&str, usize> = self.members.keys().map(|n| (n.as_str(), 0)).collect();
        for e in &self.shards {
            if let Some(o) = &e.owner {
                *out.entry(o.as_str()).or_default() += 1;
            }
        }
        out
    }
}

fn wrong_state(shard: u32, state: &ShardState, needed: &'static str) -> MetaError {
    MetaError::WrongState { shard, state: format!("{state:?}"), needed: needed.to_string() }
}

#[cfg(test)]
mod tests;
