//! Which nodes have subscriptions matching which signal types: the interest map.
//!
//! Each node advertises the patterns of its node-bound subscriptions (log, webhook, channel,
//! function) as one entry: its name, a stamp and the sorted, distinct patterns. Only the node
//! itself writes its entry, and each write has a larger stamp, so merging two maps is keeping the
//! larger stamp per node: a state-based CRDT (commutative, associative, idempotent) that needs no
//! coordination and keeps working on both sides of a partition. Entries travel over the transport
//! (see [`super::remote`]): a node pushes its own entry to every member when it changes and pulls
//! what it lacks from one random member per sync interval, so maps converge after joins, restarts
//! and healed partitions.
//!
//! The map answers "which nodes want a signal of type T" with a router over all entries, so a
//! publish sends one copy per interested node, however many subscribers that node has.
//!
//! ## Bounds
//! - A node advertises at most `patterns_max` patterns; beyond that it advertises `**` alone (it
//!   then receives every signal and its own router filters them: more traffic, nothing lost).
//! - An entry received with more patterns than [`PATTERNS_MAX`], a pattern that does not parse,
//!   or a name that is empty is refused with [`InterestError`] (bad input never enters the map).
//! - Entries: at most one per member; the owner of the map forgets members that left.
//!
//! ## Caveats
//! The stamp is `(started_ms, version)`: a restarted node's entry wins over its previous life's
//! only if its wall clock moved forward. Predicates of subscriptions are not advertised (a node
//! may receive signals that its predicates then filter out).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::router::{RouteError, RouteId, RouteSpec, Router};

pub use crate::config::INTEREST_PATTERNS_MAX as PATTERNS_MAX;
/// Longest node name an entry may carry (as membership names).
pub const NAME_LEN_MAX: usize = 255;

/// Orders the entries of one node: a later process start, then a later change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub started_ms: u64,
    pub version: u64,
}

/// One node's advertised patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: String,
    pub stamp: Stamp,
    /// Sorted and distinct.
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterestError {
    #[error("entry of {node:?} has {len} patterns, more than {max}")]
    TooManyPatterns { node: String, len: usize, max: usize },
    #[error("entry with an empty or over-long node name")]
    BadName,
    #[error("entry of {node:?}: {source}")]
    Pattern { node: String, source: RouteError },
}

struct Held {
    stamp: Stamp,
    patterns: Vec<String>,
    routes: Vec<RouteId>,
}

/// The interest map as one node holds it.
pub struct Interest {
    me: String,
    entries: BTreeMap<String, Held>,
    /// Routes every advertised pattern to the node advertising it.
    router: Router<String>,
}

/// Sorts and de-duplicates `patterns`; more than `max` distinct patterns become `["**"]`.
pub fn normalize(patterns: impl IntoIterator<Item = String>, max: usize) -> Vec<String> {
    let set: BTreeSet<String> = patterns.into_iter().collect();
    if set.len() > max {
        return vec!["**".to_string()];
    }
    set.into_iter().collect()
}

impl Interest {
    pub fn new(me: impl Into<String>) -> Self {
        Interest { me: me.into(), entries: BTreeMap::new(), router: Router::new() }
    }

    /// Replaces this node's own entry; returns it (to push to the members).
    pub fn set_own(&mut self, stamp: Stamp, patterns: Vec<String>) -> Result<Entry, InterestError> {
        let entry = Entry { node: self.me.clone(), stamp, patterns };
        let changed = self.merge(entry.clone())?;
        assert!(changed, "an own entry must carry a newer stamp");
        Ok(entry)
    }

    /// Merges an entry: kept if its stamp is newer than the one held. Returns whether it changed
    /// the map. A refused entry leaves the map as it was.
    pub fn merge(&mut self, entry: Entry) -> Result<bool, InterestError> {
        if entry.node.is_empty() || entry.node.len() > NAME_LEN_MAX {
            return Err(InterestError::BadName);
        }
        if entry.patterns.len() > PATTERNS_MAX {
            return Err(InterestError::TooManyPatterns {
                node: entry.node,
                len: entry.patterns.len(),
                max: PATTERNS_MAX,
            });
        }
        if self.entries.get(&entry.node).is_some_and(|h| h.stamp >= entry.stamp) {
            return Ok(false);
        }
        let mut routes = Vec::with_capacity(entry.patterns.len());
        for p in &entry.patterns {
            match self.router.add(RouteSpec::new(p.clone(), entry.node.clone())) {
                Ok(id) => routes.push(id),
                Err(source) => {
                    for id in routes {
                        self.router.remove(id);
                    }
                    return Err(InterestError::Pattern { node: entry.node, source });
                }
            }
        }
        if let Some(old) = self.entries.remove(&entry.node) {
            for id in old.routes {
                self.router.remove(id);
            }
        }
        let held = Held { stamp: entry.stamp, patterns: entry.patterns, routes };
        self.entries.insert(entry.node, held);
        Ok(true)
    }

    /// Forgets a node's entry (it left the cluster). Returns whether there was one.
    pub fn forget(&mut self, node: &str) -> bool {
        assert_ne!(node, self.me, "a node does not forget its own entry");
        match self.entries.remove(node) {
            Some(h) => {
                for id in h.routes {
                    self.router.remove(id);
                }
                true
            }
            None => false,
        }
    }

    /// Each node's stamp, to send to a peer that answers with what is newer.
    pub fn digest(&self) -> Vec<(String, Stamp)> {
        self.entries.iter().map(|(n, h)| (n.clone(), h.stamp)).collect()
    }

    /// The entries newer than (or missing from) `digest`.
    pub fn newer_than(&self, digest: &[(String, Stamp)]) -> Vec<Entry> {
        let theirs: BTreeMap<&str, Stamp> = digest.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        self.entries
            .iter()
            .filter(|(n, h)| theirs.get(n.as_str()).is_none_or(|s| *s < h.stamp))
            .map(|(n, h)| Entry { node: n.clone(), stamp: h.stamp, patterns: h.patterns.clone() })
            .collect()
    }

    /// The entry of `node`, if held.
    pub fn entry(&self, node: &str) -> Option<Entry> {
        self.entries.get(node).map(|h| Entry { node: node.to_string(), stamp: h.stamp, patterns: h.patterns.clone() })
    }

    /// Nodes held, this one included.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|n| n.as_str())
    }

    /// The other nodes with a pattern matching `ty`, sorted and distinct.
    pub fn remote_nodes_for(&self, ty: &str) -> Vec<String> {
        let Ok(found) = self.router.route(ty, &()) else { return Vec::new() };
        let set: BTreeSet<&String> = found.into_iter().filter(|n| **n != self.me).collect();
        set.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: &str, started_ms: u64, version: u64, patterns: &[&str]) -> Entry {
        let patterns = normalize(patterns.iter().map(|p| p.to_string()), 100);
        Entry { node: node.into(), stamp: Stamp { started_ms, version }, patterns }
    }

    #[test]
    fn routes_one_copy_per_node_whatever_its_patterns() {
        let mut m = Interest::new("a");
        m.set_own(Stamp { started_ms: 1, version: 1 }, vec!["order.**".into()]).unwrap();
        m.merge(entry("b", 1, 1, &["order.placed", "order.*", "**"])).unwrap();
        m.merge(entry("c", 1, 1, &["payment.**"])).unwrap();
        assert_eq!(m.remote_nodes_for("order.placed"), ["b"]);
        assert_eq!(m.remote_nodes_for("payment.done"), ["b", "c"]);
        assert!(Interest::new("x").remote_nodes_for("order.placed").is_empty());
    }

    #[test]
    fn the_newer_stamp_wins_in_any_order_and_merging_twice_changes_nothing() {
        let updates = [
            entry("b", 1, 1, &["x.*"]),
            entry("b", 1, 2, &["y.*"]),
            entry("b", 2, 1, &["z.*"]), // a restart: a later start wins over any version
            entry("c", 5, 9, &["x.*"]),
        ];
        // Every order of the updates gives the same map (commutative, associative).
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]];
        let mut results = Vec::new();
        for order in orders {
            let mut m = Interest::new("a");
            for i in order {
                m.merge(updates[i].clone()).unwrap();
            }
            // Idempotent: merging everything again changes nothing.
            for u in &updates {
                assert!(!m.merge(u.clone()).unwrap());
            }
            results.push((m.digest(), m.remote_nodes_for("x.a"), m.remote_nodes_for("z.a")));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
        assert_eq!(results[0].1, ["c"]);
        assert_eq!(results[0].2, ["b"]);
    }

    #[test]
    fn a_digest_exchange_makes_two_maps_equal() {
        let mut a = Interest::new("a");
        let mut b = Interest::new("b");
        a.set_own(Stamp { started_ms: 1, version: 3 }, vec!["a.*".into()]).unwrap();
        b.set_own(Stamp { started_ms: 1, version: 1 }, vec!["b.*".into()]).unwrap();
        a.merge(entry("c", 1, 1, &["old.*"])).unwrap();
        b.merge(entry("c", 1, 2, &["new.*"])).unwrap();
        for e in b.newer_than(&a.digest()) {
            a.merge(e).unwrap();
        }
        for e in a.newer_than(&b.digest()) {
            b.merge(e).unwrap();
        }
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.entry("c").unwrap().patterns, ["new.*"]);
        assert_eq!(a.remote_nodes_for("new.x"), ["c"]);
        assert!(a.remote_nodes_for("old.x").is_empty(), "the replaced pattern no longer routes");
    }

    #[test]
    fn bad_entries_are_refused_and_leave_the_map_as_it_was() {
        let mut m = Interest::new("a");
        m.merge(entry("b", 1, 1, &["ok.*"])).unwrap();
        let bad = Entry {
            node: "b".into(),
            stamp: Stamp { started_ms: 1, version: 2 },
            patterns: vec!["ok.*".into(), "a..b".into()],
        };
        assert!(matches!(m.merge(bad), Err(InterestError::Pattern { .. })));
        assert_eq!(m.remote_nodes_for("ok.x"), ["b"]);
        let nameless = Entry { node: String::new(), stamp: Stamp { started_ms: 1, version: 1 }, patterns: vec![] };
        assert_eq!(m.merge(nameless), Err(InterestError::BadName));
        let many = Entry {
            node: "c".into(),
            stamp: Stamp { started_ms: 1, version: 1 },
            patterns: (0..=PATTERNS_MAX).map(|i| format!("p{i}")).collect(),
        };
        assert!(matches!(m.merge(many), Err(InterestError::TooManyPatterns { .. })));
        assert_eq!(m.digest().len(), 1);
        assert!(m.forget("b"));
        assert!(m.remote_nodes_for("ok.x").is_empty());
    }

    #[test]
    fn too_many_patterns_advertise_everything() {
        assert_eq!(normalize(["b".into(), "a".into(), "b".into()], 2), ["a", "b"]);
        assert_eq!(normalize(["a".into(), "b".into(), "c".into()], 2), ["**"]);
    }
}
