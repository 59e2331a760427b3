//! A bounded node-local journal of published signals and their causes.
//!
//! Each published signal is recorded once (by id) with its `causationid`. A trace walks the
//! chain backward (a signal, its cause, the cause's cause, ...) or forward (the signal and the
//! signals it caused, breadth first), at most [`TRACE_STEPS_MAX`] steps.
//!
//! Memory is bounded by `len_max` entries; the oldest is forgotten first, in O(1): a child is linked
//! to its parent only when the parent is already recorded, so a parent always leaves before the
//! children linked to it, and no child list needs updating.
//!
//! Caveats: a child recorded before its parent (possible once signals cross nodes) is not linked
//! forward from the parent; causation ids are untrusted input, so walks stop at cycles.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::Signal;

/// Most steps a trace returns.
pub const TRACE_STEPS_MAX: usize = 100;

/// One signal in a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStep {
    /// The signal's id.
    pub id: String,
    /// Its type (`"type"` in JSON).
    #[serde(rename = "type")]
    pub ty: String,
    /// Its source.
    pub source: String,
    /// Its time, RFC 3339 in UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The id of the signal that caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// Distance from the signal the trace started at.
    pub depth: usize,
}

/// Which way a trace walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a signal to its cause, the cause's cause, ...
    Backward,
    /// From a signal to the signals it caused, breadth first.
    Forward,
}

struct Entry {
    /// `time` is left out here and written only when a trace is asked for (formatting it on every
    /// publish would cost more than the rest of `record`).
    step: TraceStep,
    time: Option<chrono::DateTime<chrono::FixedOffset>>,
    children: VecDeque<Arc<str>>,
}

impl Entry {
    fn step(&self, depth: usize) -> TraceStep {
        let time = self.time.map(super::rfc3339);
        TraceStep { depth, time, ..self.step.clone() }
    }
}

struct Inner {
    order: VecDeque<Arc<str>>,
    entries: HashMap<Arc<str>, Entry>,
}

/// The journal: at most `len_max` signals, the oldest forgotten first.
pub struct Journal {
    len_max: usize,
    inner: Mutex<Inner>,
}

impl Journal {
    /// An empty journal of at most `len_max` signals (panics on 0).
    pub fn new(len_max: usize) -> Journal {
        assert!(len_max > 0, "a journal needs room for one entry");
        Journal { len_max, inner: Mutex::new(Inner { order: VecDeque::new(), entries: HashMap::new() }) }
    }

    /// Signals recorded.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// True if nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a signal; a second signal with the same id is ignored.
    pub fn record(&self, s: &Signal) {
        let mut inner = self.lock();
        if inner.entries.contains_key(s.id.as_str()) {
            return;
        }
        if inner.order.len() == self.len_max {
            inner.evict_oldest();
        }
        let id: Arc<str> = s.id.as_str().into();
        let cause = s.causation_id().map(str::to_string);
        if let Some(parent) = cause.as_deref().and_then(|c| inner.entries.get_mut(c)) {
            parent.children.push_back(id.clone());
        }
        let step = TraceStep {
            id: s.id.clone(),
            ty: s.ty.clone(),
            source: s.source.clone(),
            time: None,
            causationid: cause,
            depth: 0,
        };
        inner.order.push_back(id.clone());
        inner.entries.insert(id, Entry { step, time: s.time, children: VecDeque::new() });
    }

    /// The chain from `id` in `direction`, starting with `id` itself; `None` if `id` is unknown.
    pub fn trace(&self, id: &str, direction: Direction) -> Option<Vec<TraceStep>> {
        let inner = self.lock();
        let start = inner.entries.get(id)?;
        let mut out = vec![start.step(0)];
        let mut seen: HashSet<&str> = HashSet::from([id]);
        match direction {
            Direction::Backward => {
                let mut cur = start;
                while out.len() < TRACE_STEPS_MAX {
                    let Some(parent) = cur.step.causationid.as_deref() else { break };
                    let Some(p) = inner.entries.get(parent) else { break };
                    if !seen.insert(parent) {
                        break;
                    }
                    out.push(p.step(out.len()));
                    cur = p;
                }
            }
            Direction::Forward => {
                let mut queue: VecDeque<(&Entry, usize)> = VecDeque::from([(start, 0)]);
                'walk: while let Some((e, depth)) = queue.pop_front() {
                    for child in &e.children {
                        let Some(c) = inner.entries.get(child) else { continue };
                        if !seen.insert(child) {
                            continue;
                        }
                        if out.len() == TRACE_STEPS_MAX {
                            break 'walk;
                        }
                        out.push(c.step(depth + 1));
                        queue.push_back((c, depth + 1));
                    }
                }
            }
        }
        Some(out)
    }
}

impl Inner {
    fn evict_oldest(&mut self) {
        let Some(old) = self.order.pop_front() else { return };
        let removed = self.entries.remove(&old);
        assert!(removed.is_some(), "every id in the order has an entry");
    }
}
