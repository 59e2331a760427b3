//! What a node does when its table changes, as a state machine: which shards it gave up (their
//! agents passivated) and which of its shards it hands over in a planned move, step by step.
//!
//! ## Design
//! [`Handoffs`] owns which shards this node serves at which epoch and the hand-offs it runs;
//! the table is an input. [`Handoffs::on_table`] answers what a new table asks for (passivate
//! the agents of shards given up, start a hand-off of each shard of this node that is
//! `Moving`); [`Handoffs::step`] takes the outcome of a hand-off's step and answers the next:
//! passivate the shard's agents, report to the leader, and again after a pause when the report
//! failed, until the move completes or the table shows it no longer moving from here (the
//! leader completed it, or aborted it). The runner ([`super::watch_table`]) does each step.
//!
//! ## Caveats
//! - "Done" means this node stops trying; whether the move completed is the table's to say. An
//!   owner cut off after its report keeps a table that shows the shard moving: its gate keeps
//!   refusing new work and owner reads of the shard (the move may be complete elsewhere) until
//!   the table catches up.

use std::collections::{BTreeMap, BTreeSet};

use crate::meta::{MetaState, ShardState};

/// Pause between attempts of a failed report.
pub(crate) const RETRY_MS: u64 = 200;

/// What the runner does for a hand-off or a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HandoffCmd {
    /// Passivate the agents of these shards: this node no longer serves them at the epoch their
    /// activations were loaded under.
    Passivate(BTreeSet<u32>),
    /// A hand-off begins: passivate the shard's agents (in-flight work finishes and is stored;
    /// the gate already refuses new work), then [`HandoffInput::Passivated`].
    Start { shard: u32, epoch: u64, to: String },
    /// Ask the leader to complete the move, then [`HandoffInput::Reported`].
    Report { shard: u32, epoch: u64 },
    /// Wait this long, then [`HandoffInput::Resume`].
    Retry { shard: u32, epoch: u64, after_ms: u64 },
    /// This node stops: the move completed, or the table shows it no longer moving from here.
    Done { shard: u32, epoch: u64, reported: bool },
}

/// The outcome of a hand-off's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandoffInput {
    Passivated,
    Reported { ok: bool },
    Resume,
}

/// The node's shards and hand-offs (see the module docs).
#[derive(Debug)]
pub(crate) struct Handoffs {
    me: String,
    /// Shard → the epoch this node serves it at (active, owned here).
    owned: BTreeMap<u32, u64>,
    /// Hand-offs running: (shard, epoch) → target.
    running: BTreeMap<(u32, u64), String>,
}

impl Handoffs {
    pub(crate) fn new(me: String) -> Handoffs {
        Handoffs { me, owned: BTreeMap::new(), running: BTreeMap::new() }
    }

    /// A new table: what it asks of this node. Any change of a shard's epoch counts as giving
    /// it up (a lagging node may see an owner of e and then of e + 2: lost, then back), and a
    /// shard that starts moving is given up too (its activations end before the report).
    pub(crate) fn on_table(&mut self, st: &MetaState) -> Vec<HandoffCmd> {
        let now_owned: BTreeMap<u32, u64> = st
            .shards
            .iter()
            .enumerate()
            .filter(|(_, e)| e.owner.as_deref() == Some(self.me.as_str()) && e.state == ShardState::Active)
            .map(|(s, e)| (s as u32, e.epoch))
            .collect();
        let lost: BTreeSet<u32> =
            self.owned.iter().filter(|(s, e)| now_owned.get(s) != Some(e)).map(|(s, _)| *s).collect();
        self.owned = now_owned;
        let mut out = Vec::new();
        if !lost.is_empty() {
            out.push(HandoffCmd::Passivate(lost));
        }
        for (shard, e) in st.shards.iter().enumerate() {
            if e.owner.as_deref() != Some(self.me.as_str()) {
                continue;
            }
            let ShardState::Moving { to } = &e.state else { continue };
            let key = (shard as u32, e.epoch);
            if let std::collections::btree_map::Entry::Vacant(v) = self.running.entry(key) {
                v.insert(to.clone());
                out.push(HandoffCmd::Start { shard: key.0, epoch: key.1, to: to.clone() });
            }
        }
        out
    }

    /// The next step of the hand-off of `shard` at `epoch`, after `input`.
    pub(crate) fn step(&mut self, st: &MetaState, shard: u32, epoch: u64, input: HandoffInput) -> HandoffCmd {
        let Some(to) = self.running.get(&(shard, epoch)) else {
            // Over already: a late outcome changes nothing.
            return HandoffCmd::Done { shard, epoch, reported: false };
        };
        let moving = self.still_moving(st, shard, epoch, to);
        let next = match input {
            HandoffInput::Reported { ok: true } => None,
            _ if !moving => None,
            HandoffInput::Passivated | HandoffInput::Resume => Some(HandoffCmd::Report { shard, epoch }),
            HandoffInput::Reported { ok: false } => Some(HandoffCmd::Retry { shard, epoch, after_ms: RETRY_MS }),
        };
        next.unwrap_or_else(|| {
            self.running.remove(&(shard, epoch));
            let reported = input == HandoffInput::Reported { ok: true };
            HandoffCmd::Done { shard, epoch, reported }
        })
    }

    /// Whether the table still shows `shard` moving from this node to `to` at `epoch`.
    fn still_moving(&self, st: &MetaState, shard: u32, epoch: u64, to: &str) -> bool {
        st.shards.get(shard as usize).is_some_and(|e| {
            e.epoch == epoch
                && e.owner.as_deref() == Some(self.me.as_str())
                && matches!(&e.state, ShardState::Moving { to: t } if t == to)
        })
    }

    /// The state, one fact per line (for the scripts).
    #[cfg(test)]
    pub(crate) fn describe(&self) -> String {
        let owned: Vec<String> = self.owned.iter().map(|(s, e)| format!("{s}@{e}")).collect();
        let mut out = format!("serves: [{}]\n", owned.join(" "));
        for ((shard, epoch), to) in &self.running {
            out.push_str(&format!("handing shard {shard}@{epoch} over to {to}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests;
