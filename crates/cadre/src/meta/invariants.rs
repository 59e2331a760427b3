//! What every [`MetaState`] that [`MetaState::apply`] can reach satisfies, as one check.
//!
//! `apply` keeps these by construction; the check is for state that did not come from `apply` on
//! this node: a snapshot received from the leader, one loaded from `meta.redb` at start. Such a
//! state that breaks them is refused with an [`InvariantError`] naming the first rule broken,
//! instead of being installed and panicking later (an owner lookup indexes the shard table by a
//! shard number below `shard_count`). Debug builds also check after every applied batch, so the
//! test suites and simulations catch a command that would break one.
//!
//! ## Caveats
//! - The check walks the whole table and recomputes every route's id: O(shards × replicas +
//!   members + routes). Fine for a snapshot; after each applied batch only in debug builds.
//! - It checks the state, not the history: that epochs only grow is checked by the property test
//!   of `apply` (a snapshot carries no earlier epochs to compare with).

use std::collections::BTreeSet;

use super::{MetaState, ShardState, ROUTES_MAX, SHARD_COUNT_MAX};

/// The first rule a metadata state breaks (a snapshot received, or loaded from `meta.redb`, that
/// is refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantError {
    /// The shard count is over the most allowed.
    #[error("shard count {0} is over {SHARD_COUNT_MAX}")]
    ShardCount(u32),
    /// The shard table's length is not the shard count.
    #[error("the shard table has {len} entries for a shard count of {count}")]
    TableLen {
        /// The table's length.
        len: usize,
        /// The shard count.
        count: u32,
    },
    /// A shard has an owner but is unassigned, or has none but is not.
    #[error("shard {shard} has an owner exactly when it is not unassigned, but is {state} with owner {owner:?}")]
    OwnerState {
        /// The shard.
        shard: u32,
        /// Its state.
        state: String,
        /// Its owner.
        owner: Option<String>,
    },
    /// A shard names a node that is not a member.
    #[error("shard {shard} names {node:?} ({role}), which is not a member")]
    NotMember {
        /// The shard.
        shard: u32,
        /// The node.
        node: String,
        /// What the shard names it as (`owner`, `move target`, `replica`).
        role: &'static str,
    },
    /// A shard moving to its own owner.
    #[error("shard {shard} is moving to its own owner {node:?}")]
    MoveToOwner {
        /// The shard.
        shard: u32,
        /// The owner.
        node: String,
    },
    /// A shard lists a node as a replica twice, or as its owner and a replica.
    #[error("shard {shard} lists {node:?} as a replica twice, or as owner and replica")]
    ReplicaTwice {
        /// The shard.
        shard: u32,
        /// The node.
        node: String,
    },
    /// A replica's generation is 0, over those handed out, or used twice.
    #[error(
        "replica generation {generation} (shard {shard}, {node:?}) is 0, over {handed_out} handed out, or used twice"
    )]
    Generation {
        /// The shard.
        shard: u32,
        /// The replica's node.
        node: String,
        /// The replica's generation.
        generation: u64,
        /// Generations handed out.
        handed_out: u64,
    },
    /// A member's admission position is used twice, or not below the count of admissions.
    #[error("member {name:?} has admission position {position}, used twice or not below {admitted}")]
    Admission {
        /// The member.
        name: String,
        /// Its admission position.
        position: u64,
        /// Admissions so far.
        admitted: u64,
    },
    /// More cluster-wide routes than allowed.
    #[error("{len} routes, over {ROUTES_MAX}")]
    TooManyRoutes {
        /// The count of routes.
        len: usize,
    },
    /// A cluster-wide route filed under another id than its own, or invalid.
    #[error("route {id} is filed under the wrong id or is invalid")]
    BadRoute {
        /// The id it is filed under.
        id: u64,
    },
}

impl MetaState {
    /// Checks every invariant `apply` keeps (see [`invariants`](super::invariants)).
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        self.check_table()?;
        self.check_members()?;
        self.check_routes()
    }

    fn check_table(&self) -> Result<(), InvariantError> {
        let count = self.shard_count;
        if count > SHARD_COUNT_MAX {
            return Err(InvariantError::ShardCount(count));
        }
        if self.shards.len() != count as usize {
            return Err(InvariantError::TableLen { len: self.shards.len(), count });
        }
        let mut generations = BTreeSet::new();
        for (shard, e) in (0u32..).zip(&self.shards) {
            if e.owner.is_none() != (e.state == ShardState::Unassigned) {
                let state = format!("{:?}", e.state);
                return Err(InvariantError::OwnerState { shard, state, owner: e.owner.clone() });
            }
            let not_member = |node: &str, role| InvariantError::NotMember { shard, node: node.into(), role };
            if let Some(owner) = e.owner.as_deref().filter(|o| !self.members.contains_key(*o)) {
                return Err(not_member(owner, "owner"));
            }
            if let ShardState::Moving { to } = &e.state {
                if !self.members.contains_key(to) {
                    return Err(not_member(to, "move target"));
                }
                if e.owner.as_ref() == Some(to) {
                    return Err(InvariantError::MoveToOwner { shard, node: to.clone() });
                }
            }
            let mut nodes: BTreeSet<&str> = e.owner.iter().map(String::as_str).collect();
            for r in &e.replicas {
                if !self.members.contains_key(&r.node) {
                    return Err(not_member(&r.node, "replica"));
                }
                if !nodes.insert(&r.node) {
                    return Err(InvariantError::ReplicaTwice { shard, node: r.node.clone() });
                }
                let fresh = generations.insert(r.generation);
                if r.generation == 0 || r.generation > self.generations || !fresh {
                    let (node, generation, handed_out) = (r.node.clone(), r.generation, self.generations);
                    return Err(InvariantError::Generation { shard, node, generation, handed_out });
                }
            }
        }
        Ok(())
    }

    fn check_members(&self) -> Result<(), InvariantError> {
        let mut positions = BTreeSet::new();
        for (name, m) in &self.members {
            if m.admitted >= self.admitted || !positions.insert(m.admitted) {
                let (name, position, admitted) = (name.clone(), m.admitted, self.admitted);
                return Err(InvariantError::Admission { name, position, admitted });
            }
        }
        Ok(())
    }

    fn check_routes(&self) -> Result<(), InvariantError> {
        if self.routes.len() > ROUTES_MAX {
            return Err(InvariantError::TooManyRoutes { len: self.routes.len() });
        }
        match self.routes.iter().find(|(id, r)| r.id() != **id || r.check().is_err()) {
            Some((id, _)) => Err(InvariantError::BadRoute { id: *id }),
            None => Ok(()),
        }
    }
}
