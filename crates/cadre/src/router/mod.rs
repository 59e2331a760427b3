//! The pattern router: which routes match a signal type, in which order.
//!
//! A signal type is a dot-separated list of segments (`user.123.created`). A route path is a
//! pattern over such lists:
//! - a segment is `[A-Za-z0-9_-]+` (matches that exact segment), `*` (exactly one segment) or `**`
//!   (zero or more segments);
//! - a pattern matches whole types only: `user` does not match `user.created`, `user.**` does
//!   (and also matches `user` itself, `**` consuming nothing);
//! - invalid paths are refused with a [`PathError`]: empty path, empty segment (leading, trailing
//!   or doubled dot), a wildcard inside a segment (`us*r`, `a**`), two adjacent `**`, any other
//!   character.
//!
//! Each route has one or more targets and a priority in `-100..=100` (default 0). Results are
//! ordered by specificity (descending), then priority (descending), then registration order; a
//! route's targets keep their own order. Specificity of a path with `n` segments, segment index
//! `i` from 0: `n*2000 + Σ_exact 3000*(n-i) - Σ_** (2000-200*i) - Σ_* (1000-100*i)`, so
//! `user.123.created` = 24000, `user.*.created` = 17100, `user.**` = 8200, `*.*.created` = 7100,
//! `**` = 0. A route yields its targets once per lookup however many ways its wildcards match.
//! No matching route is [`NoMatch`], not an empty success.
//!
//! Routes may carry a predicate over the routed value (`S`, the signal); a predicate that returns
//! false, or panics, makes that route not match. Routes are added and removed at run time;
//! [`Router::remove_path`] removes exactly the routes registered with that path.
//!
//! Implementation: a trie keyed by segment with separate `*` and `**` children; a lookup walks it
//! once (`**` tries every split point), collects route ids, sorts and de-duplicates them. The
//! property tests check it against a naive pattern-by-pattern matcher.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

// FxHash: segment and id lookups dominate routing time and keys are not attacker-chosen hash
// floods of consequence here (paths come from configuration, types only probe).
use rustc_hash::FxHashMap as HashMap;

/// Lowest route priority.
pub const PRIORITY_MIN: i32 = -100;
/// Highest route priority.
pub const PRIORITY_MAX: i32 = 100;
/// Longest accepted path, in bytes.
pub const PATH_LEN_MAX_BYTES: usize = 1024;
/// Most segments in a path (and in a routed type; longer types match nothing).
pub const SEGMENTS_MAX: usize = 64;
/// Segments of a routed type split without a heap allocation.
const SEGMENTS_INLINE: usize = 16;

/// Why a route path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// Longer than 1024 bytes.
    #[error("path longer than {PATH_LEN_MAX_BYTES} bytes")]
    TooLong,
    /// More than 64 segments.
    #[error("more than {SEGMENTS_MAX} segments")]
    TooManySegments,
    /// A leading, trailing or doubled dot.
    #[error("empty segment at position {index} (leading, trailing or doubled dot)")]
    EmptySegment {
        /// The segment's position (0-based).
        index: usize,
    },
    /// `*` or `**` with other characters in one segment (`us*r`).
    #[error("wildcard inside segment {segment:?}")]
    WildcardInSegment {
        /// The segment.
        segment: String,
    },
    /// `**.**`.
    #[error("two adjacent `**` at position {index}")]
    AdjacentGlobstar {
        /// The second one's position (0-based).
        index: usize,
    },
    /// A character outside the allowed set.
    #[error("character {ch:?} not allowed in segment {segment:?}")]
    InvalidCharacter {
        /// The segment.
        segment: String,
        /// The character.
        ch: char,
    },
}

/// Why a route was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The path is invalid.
    #[error("route {path:?}: {reason}")]
    Path {
        /// The route's path.
        path: String,
        /// What is wrong with it.
        reason: PathError,
    },
    /// The priority is outside -100..=100.
    #[error("route {path:?}: priority {priority} outside {PRIORITY_MIN}..={PRIORITY_MAX}")]
    Priority {
        /// The route's path.
        path: String,
        /// The priority given.
        priority: i32,
    },
    /// The route has no target.
    #[error("route {path:?}: no targets")]
    NoTargets {
        /// The route's path.
        path: String,
    },
}

/// No route matched the type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no route matches {ty:?}")]
pub struct NoMatch {
    pub ty: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Exact(Box<str>),
    Star,
    Globstar,
}

/// A validated route path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    text: String,
    segments: Vec<Segment>,
}

impl Path {
    pub fn parse(text: &str) -> Result<Path, PathError> {
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        if text.len() > PATH_LEN_MAX_BYTES {
            return Err(PathError::TooLong);
        }
        let mut segments = Vec::new();
        for (index, seg) in text.split('.').enumerate() {
            if index >= SEGMENTS_MAX {
                return Err(PathError::TooManySegments);
            }
            let s = match seg {
                "" => return Err(PathError::EmptySegment { index }),
                "*" => Segment::Star,
                "**" => {
                    if segments.last() == Some(&Segment::Globstar) {
                        return Err(PathError::AdjacentGlobstar { index });
                    }
                    Segment::Globstar
                }
                _ if seg.contains('*') => return Err(PathError::WildcardInSegment { segment: seg.into() }),
                _ => {
                    if let Some(ch) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
                        return Err(PathError::InvalidCharacter { segment: seg.into(), ch });
                    }
                    Segment::Exact(seg.into())
                }
            };
            segments.push(s);
        }
        Ok(Path { text: text.to_string(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// See the module documentation for the formula.
    pub fn specificity(&self) -> i64 {
        let n = self.segments.len() as i64;
        let mut score = n * 2000;
        for (i, s) in self.segments.iter().enumerate() {
            let i = i as i64;
            score += match s {
                Segment::Exact(_) => 3000 * (n - i),
                Segment::Globstar => -(2000 - 200 * i),
                Segment::Star => -(1000 - 100 * i),
            };
        }
        score
    }

    /// Pattern-by-pattern matching, used as the reference for the trie.
    #[cfg(any(test, feature = "testing"))]
    pub fn matches(&self, ty: &str) -> bool {
        let segs: Vec<&str> = ty.split('.').collect();
        naive(&self.segments, &segs)
    }
}

#[cfg(any(test, feature = "testing"))]
fn naive(pat: &[Segment], ty: &[&str]) -> bool {
    match pat.split_first() {
        None => ty.is_empty(),
        Some((Segment::Globstar, rest)) => (0..=ty.len()).any(|k| naive(rest, &ty[k..])),
        Some((Segment::Star, rest)) => !ty.is_empty() && naive(rest, &ty[1..]),
        Some((Segment::Exact(e), rest)) => ty.first().is_some_and(|t| **t == **e) && naive(rest, &ty[1..]),
    }
}

/// A predicate over the routed value.
pub type Predicate<S> = Arc<dyn Fn(&S) -> bool + Send + Sync>;

/// What to register.
pub struct RouteSpec<T, S> {
    pub path: String,
    pub targets: Vec<T>,
    pub priority: i32,
    pub predicate: Option<Predicate<S>>,
}

impl<T, S> RouteSpec<T, S> {
    pub fn new(path: impl Into<String>, target: T) -> Self {
        RouteSpec { path: path.into(), targets: vec![target], priority: 0, predicate: None }
    }
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn target(mut self, target: T) -> Self {
        self.targets.push(target);
        self
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn predicate(mut self, p: impl Fn(&S) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(p));
        self
    }
}

/// Identifies a registered route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(u64);

struct Route<T, S> {
    path: Path,
    targets: Vec<T>,
    priority: i32,
    predicate: Option<Predicate<S>>,
    specificity: i64,
}

struct TrieNode {
    exact: HashMap<Box<str>, TrieNode>,
    star: Option<Box<TrieNode>>,
    globstar: Option<Box<TrieNode>>,
    /// Routes whose path ends here.
    routes: Vec<RouteId>,
}

impl TrieNode {
    fn new() -> Self {
        TrieNode { exact: HashMap::default(), star: None, globstar: None, routes: Vec::new() }
    }

    fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.exact.is_empty() && self.star.is_none() && self.globstar.is_none()
    }

    fn child_mut(&mut self, s: &Segment) -> &mut TrieNode {
        match s {
            Segment::Exact(e) => self.exact.entry(e.clone()).or_insert_with(TrieNode::new),
            Segment::Star => self.star.get_or_insert_with(|| Box::new(TrieNode::new())),
            Segment::Globstar => self.globstar.get_or_insert_with(|| Box::new(TrieNode::new())),
        }
    }

    /// Removes `id` under `segs`; prunes emptied nodes. Returns true if found.
    fn remove(&mut self, segs: &[Segment], id: RouteId) -> bool {
        let Some((first, rest)) = segs.split_first() else {
            let before = self.routes.len();
            self.routes.retain(|r| *r != id);
            return self.routes.len() != before;
        };
        let found = match first {
            Segment::Exact(e) => {
                let Some(child) = self.exact.get_mut(e) else { return false };
                let found = child.remove(rest, id);
                if child.is_empty() {
                    self.exact.remove(e);
                }
                found
            }
            Segment::Star | Segment::Globstar => {
                let slot = if *first == Segment::Star { &mut self.star } else { &mut self.globstar };
                let Some(child) = slot.as_mut() else { return false };
                let found = child.remove(rest, id);
                if child.is_empty() {
                    *slot = None;
                }
                found
            }
        };
        found
    }

    fn collect(&self, ty: &[&str], out: &mut Vec<RouteId>) {
        match ty.split_first() {
            None => out.extend_from_slice(&self.routes),
            Some((first, rest)) => {
                if let Some(child) = self.exact.get(*first) {
                    child.collect(rest, out);
                }
                if let Some(child) = &self.star {
                    child.collect(rest, out);
                }
            }
        }
        if let Some(g) = &self.globstar {
            // `**` consumes 0..=len segments.
            for k in 0..=ty.len() {
                g.collect(&ty[k..], out);
            }
        }
    }
}

/// One matched route in result order.
pub struct RouteMatch<'a, T> {
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))] // Read by tests and fuzzing.
    pub id: RouteId,
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub path: &'a str,
    pub specificity: i64,
    pub priority: i32,
    pub targets: &'a [T],
}

/// Routes from patterns to targets of type `T`, with optional predicates over `S`.
pub struct Router<T, S = ()> {
    root: TrieNode,
    routes: HashMap<RouteId, Route<T, S>>,
    next_id: u64,
}

impl<T, S> Default for Router<T, S> {
    fn default() -> Self {
        Router { root: TrieNode::new(), routes: HashMap::default(), next_id: 0 }
    }
}

impl<T, S> Router<T, S> {
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Validates and registers a route.
    pub fn add(&mut self, spec: RouteSpec<T, S>) -> Result<RouteId, RouteError> {
        let path = Path::parse(&spec.path).map_err(|reason| RouteError::Path { path: spec.path.clone(), reason })?;
        if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&spec.priority) {
            return Err(RouteError::Priority { path: spec.path, priority: spec.priority });
        }
        if spec.targets.is_empty() {
            return Err(RouteError::NoTargets { path: spec.path });
        }
        // Ids grow with registration, so sorting by id is registration order.
        let id = RouteId(self.next_id);
        self.next_id += 1;
        let mut node = &mut self.root;
        for s in &path.segments {
            node = node.child_mut(s);
        }
        node.routes.push(id);
        let specificity = path.specificity();
        self.routes.insert(
            id,
            Route { path, targets: spec.targets, priority: spec.priority, predicate: spec.predicate, specificity },
        );
        Ok(id)
    }

    /// Removes one route.
    pub fn remove(&mut self, id: RouteId) -> bool {
        let Some(route) = self.routes.remove(&id) else { return false };
        let removed = self.root.remove(&route.path.segments, id);
        debug_assert!(removed, "route {id:?} was in the map but not in the trie");
        true
    }

    /// Removes every route registered with exactly this path; returns how many.
    #[cfg(any(test, feature = "testing"))]
    pub fn remove_path(&mut self, path: &str) -> usize {
        let ids: Vec<RouteId> = self.routes.iter().filter(|(_, r)| r.path.text == path).map(|(id, _)| *id).collect();
        for id in &ids {
            self.remove(*id);
        }
        ids.len()
    }

    /// Matching routes for `ty` (and `value`, for predicates), in result order.
    pub fn matches<'a>(&'a self, ty: &str, value: &S) -> Result<Vec<RouteMatch<'a, T>>, NoMatch> {
        // Most types have few segments: split onto the stack, fall back to the heap.
        let mut stack: [&str; SEGMENTS_INLINE] = [""; SEGMENTS_INLINE];
        let mut n = 0;
        let mut heap: Vec<&str> = Vec::new();
        for (i, seg) in ty.split('.').enumerate() {
            if i < SEGMENTS_INLINE {
                stack[i] = seg;
                n += 1;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack);
                }
                heap.push(seg);
            }
        }
        let segs: &[&str] = if heap.is_empty() { &stack[..n] } else { &heap };
        let mut ids = Vec::with_capacity(8);
        if segs.len() <= SEGMENTS_MAX {
            self.root.collect(segs, &mut ids);
        }
        ids.sort_unstable();
        ids.dedup();
        let mut found: Vec<RouteMatch<'a, T>> = ids
            .into_iter()
            .filter_map(|id| {
                let r = self.routes.get(&id)?;
                if let Some(p) = &r.predicate {
                    // A panicking predicate counts as no match.
                    if !catch_unwind(AssertUnwindSafe(|| p(value))).unwrap_or(false) {
                        return None;
                    }
                }
                Some(RouteMatch {
                    id,
                    path: r.path.as_str(),
                    specificity: r.specificity,
                    priority: r.priority,
                    targets: &r.targets,
                })
            })
            .collect();
        if found.is_empty() {
            return Err(NoMatch { ty: ty.to_string() });
        }
        // Stable sort over ids in registration order keeps registration order for ties.
        found.sort_by(|a, b| b.specificity.cmp(&a.specificity).then(b.priority.cmp(&a.priority)));
        Ok(found)
    }

    /// The targets for `ty`, in result order.
    pub fn route<'a>(&'a self, ty: &str, value: &S) -> Result<Vec<&'a T>, NoMatch> {
        Ok(self.matches(ty, value)?.into_iter().flat_map(|m| m.targets.iter()).collect())
    }
}

pub mod table;

#[cfg(test)]
mod tests;
