//! Effectively-once handling: the record of the signals an agent handled, stored with its state.
//!
//! A signal can reach an agent more than once: a client retries a call or a publish whose answer
//! it did not get, a route delivery is retried across a shard move or a failover, a pub/sub copy
//! is sent twice. Each agent therefore keeps a bounded record of the signals it handled, by
//! `(source, id)` (CloudEvents say the pair identifies an event), and a signal found in it is
//! answered without running the handler: with the original reply when it is still kept, else
//! with [`super::CallError::Duplicate`]. Nothing is emitted again.
//!
//! The record is part of the stored value, written in the same `put` as the state, so whoever
//! loads the state (a new activation, a new owner after a move or a failover, a replica promoted)
//! knows what it reflects. Only calls that changed the state or emitted signals are recorded (for
//! write-through agents): running a call that did neither again changes nothing.
//!
//! ## Layout of a stored value
//! A state stored without a record is the state's JSON, as before the record existed. With one:
//! `MAGIC` (4 bytes, starting with a 0 byte, which no JSON text starts with), the id count (u32
//! LE) and the ids (16 bytes each, oldest first), the reply count (u32 LE) and each reply (its id,
//! a u32 LE length, its JSON), then the state's JSON. Decoding checks every length against what is
//! left, so a corrupt value is an error, never a panic.
//!
//! ## Limits and caveats
//! - At most `agents.dedupe_ids_max` ids per agent (default [`DEDUPE_IDS_MAX_DEFAULT`]; the
//!   oldest goes first): a duplicate that arrives after that many other recorded calls to the same
//!   agent runs again. 0 turns the record off. Each id costs 16 bytes of every write.
//! - Replies are kept for the newest [`REPLIES_KEPT_MAX`] recorded calls whose reply is at most
//!   [`REPLY_KEPT_BYTES_MAX`] bytes of JSON; older or larger ones answer `Duplicate`.
//! - An id is a SHA-256 of the pair, cut to 128 bits: a publisher cannot make another's signal
//!   look handled by choosing its own id (that would take a second preimage).
//! - A call that failed is not recorded: a retry runs it again.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes};
use sha2::{Digest, Sha256};

/// Ids recorded per agent unless configured (`agents.dedupe_ids_max`).
pub const DEDUPE_IDS_MAX_DEFAULT: usize = 256;
/// The most `agents.dedupe_ids_max` may be (each id is in every write of the agent's state).
pub const DEDUPE_IDS_MAX_LIMIT: usize = 65_536;
/// Replies kept for duplicates: the newest this many recorded calls.
pub const REPLIES_KEPT_MAX: usize = 8;
/// A reply longer than this (JSON bytes) is not kept; its duplicates answer `Duplicate`.
pub const REPLY_KEPT_BYTES_MAX: usize = 512;

const MAGIC: [u8; 4] = [0x00, b'c', b'd', 0x01];
const MAGIC_EXTRA: [u8; 4] = [0x00, b'c', b'd', 0x02];
/// Largest reminders section of a stored value.
const EXTRA_BYTES_MAX: usize = 16 << 20;
const ID_BYTES: usize = 16;

/// What identifies a handled signal: 128 bits of SHA-256 over its source and id.
pub(crate) type HandledId = [u8; ID_BYTES];

pub(crate) fn handled_id(source: &str, id: &str) -> HandledId {
    let mut h = Sha256::new();
    // The length first: ("ab", "c") and ("a", "bc") are different pairs.
    h.update((source.len() as u64).to_le_bytes());
    h.update(source.as_bytes());
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut out = [0; ID_BYTES];
    out.copy_from_slice(&digest[..ID_BYTES]);
    out
}

/// What the record knows of a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Handled; this was its reply (JSON).
    Reply(Bytes),
    /// Handled; its reply is no longer kept.
    Handled,
}

/// The signals an agent handled, newest last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Record {
    ids: VecDeque<HandledId>,
    replies: VecDeque<(HandledId, Bytes)>,
}

impl Record {
    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Newest first: a retry usually comes soon after its original.
    pub(crate) fn find(&self, id: &HandledId) -> Option<Seen> {
        // As integers: two word compares per id instead of a `memcmp` call (this scan runs on
        // every call).
        let wanted = u128::from_ne_bytes(*id);
        self.ids.iter().rev().find(|h| u128::from_ne_bytes(**h) == wanted)?;
        let reply = self.replies.iter().rev().find(|(h, _)| h == id);
        Some(reply.map_or(Seen::Handled, |(_, r)| Seen::Reply(r.clone())))
    }

    /// Records `id` (with its reply when small enough), dropping the oldest beyond `ids_max`.
    pub(crate) fn insert(&mut self, id: HandledId, reply: Option<Bytes>, ids_max: usize) {
        if ids_max == 0 {
            return;
        }
        while self.ids.len() >= ids_max {
            let gone = self.ids.pop_front().expect("a full record is not empty");
            // Both rings are oldest first, so a reply of the oldest id can only be the oldest
            // reply: one compare, not a scan (this runs on every call once the record is full).
            if self.replies.front().is_some_and(|(h, _)| u128::from_ne_bytes(*h) == u128::from_ne_bytes(gone)) {
                self.replies.pop_front();
            }
        }
        self.ids.push_back(id);
        if let Some(reply) = reply.filter(|r| r.len() <= REPLY_KEPT_BYTES_MAX) {
            if self.replies.len() >= REPLIES_KEPT_MAX {
                self.replies.pop_front();
            }
            self.replies.push_back((id, reply));
        }
        debug_assert!(self.ids.len() <= ids_max && self.replies.len() <= REPLIES_KEPT_MAX);
    }
}

/// The value to store: `state` (JSON) alone when the record and `extra` (the reminders) are
/// empty, else with them.
pub(crate) fn encode_stored(record: &Record, extra: &[u8], state: &[u8]) -> Bytes {
    if record.is_empty() && extra.is_empty() {
        return Bytes::copy_from_slice(state);
    }
    let replies: usize = record.replies.iter().map(|(_, r)| ID_BYTES + 4 + r.len()).sum();
    let len = MAGIC.len() + 12 + record.ids.len() * ID_BYTES + replies + extra.len() + state.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(if extra.is_empty() { &MAGIC } else { &MAGIC_EXTRA });
    out.put_u32_le(record.ids.len() as u32);
    // Two copies of contiguous memory (the ring's halves), not one per id: this runs on every
    // write.
    let (older, newer) = record.ids.as_slices();
    out.extend_from_slice(older.as_flattened());
    out.extend_from_slice(newer.as_flattened());
    out.put_u32_le(record.replies.len() as u32);
    for (id, reply) in &record.replies {
        out.extend_from_slice(id);
        out.put_u32_le(reply.len() as u32);
        out.extend_from_slice(reply);
    }
    if !extra.is_empty() {
        out.put_u32_le(extra.len() as u32);
        out.extend_from_slice(extra);
    }
    out.extend_from_slice(state);
    Bytes::from(out)
}

/// Splits a stored value into its record, its reminders' JSON (empty: none) and its state's JSON
/// (a value stored without a record is all state).
pub(crate) fn decode_stored(stored: &Bytes) -> Result<(Record, Bytes, Bytes), String> {
    let with_extra = stored.starts_with(&MAGIC_EXTRA);
    if !stored.starts_with(&MAGIC) && !with_extra {
        return Ok((Record::default(), Bytes::new(), stored.clone()));
    }
    let mut at = MAGIC.len();
    let mut take = |n: usize| -> Result<std::ops::Range<usize>, String> {
        let end = at.checked_add(n).filter(|&e| e <= stored.len());
        let end = end.ok_or_else(|| format!("stored record cut short at byte {at} of {}", stored.len()))?;
        let range = at..end;
        at = end;
        Ok(range)
    };
    let u32_at = |r: std::ops::Range<usize>| u32::from_le_bytes(stored[r].try_into().expect("4 bytes")) as usize;
    let ids_len = u32_at(take(4)?);
    if ids_len > DEDUPE_IDS_MAX_LIMIT {
        return Err(format!("stored record holds {ids_len} ids, more than {DEDUPE_IDS_MAX_LIMIT}"));
    }
    let mut record = Record::default();
    let ids = &stored[take(ids_len * ID_BYTES)?];
    record.ids = ids.chunks_exact(ID_BYTES).map(|c| c.try_into().expect("16 bytes")).collect();
    let replies_len = u32_at(take(4)?);
    if replies_len > ids_len.min(REPLIES_KEPT_MAX) {
        return Err(format!("stored record holds {replies_len} replies for {ids_len} ids"));
    }
    for _ in 0..replies_len {
        let id: HandledId = stored[take(ID_BYTES)?].try_into().expect("16 bytes");
        let len = u32_at(take(4)?);
        let reply = stored.slice(take(len)?);
        record.replies.push_back((id, reply));
    }
    // A reply answers only for an id the record holds (`find` checks the ids first); one whose id
    // is not there is dropped, so the replies stay a subsequence of the ids, as `insert` expects.
    let ids = &record.ids;
    record.replies.retain(|(h, _)| ids.contains(h));
    let mut extra = Bytes::new();
    if with_extra {
        let len = u32_at(take(4)?);
        if len > EXTRA_BYTES_MAX {
            return Err(format!("stored reminders of {len} bytes, more than {EXTRA_BYTES_MAX}"));
        }
        extra = stored.slice(take(len)?);
    }
    let state = stored.slice(at..);
    Ok((record, extra, state))
}

/// The state's JSON in a value an agent stored (without the record of handled signals), for
/// tools and tests that read a store directly.
pub fn stored_state(stored: &Bytes) -> Result<Bytes, String> {
    decode_stored(stored).map(|(_, _, state)| state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u32) -> HandledId {
        handled_id("test", &n.to_string())
    }

    #[test]
    fn ids_tell_source_and_id_apart() {
        assert_eq!(handled_id("a", "b"), handled_id("a", "b"));
        assert_ne!(handled_id("ab", "c"), handled_id("a", "bc"));
        assert_ne!(handled_id("a", "b"), handled_id("b", "a"));
    }

    #[test]
    fn the_oldest_ids_and_replies_go_first() {
        let mut r = Record::default();
        for n in 0..10 {
            r.insert(id(n), Some(Bytes::from(n.to_string())), 4);
        }
        assert_eq!(r.len(), 4);
        assert_eq!(r.find(&id(5)), None, "evicted");
        assert_eq!(r.find(&id(9)), Some(Seen::Reply(Bytes::from("9"))));
        // Only REPLIES_KEPT_MAX replies: past them, a duplicate is known without its reply.
        let mut r = Record::default();
        for n in 0..(REPLIES_KEPT_MAX as u32 + 2) {
            r.insert(id(n), Some(Bytes::from("r")), 100);
        }
        assert_eq!(r.find(&id(0)), Some(Seen::Handled));
        assert_eq!(r.find(&id(REPLIES_KEPT_MAX as u32 + 1)), Some(Seen::Reply(Bytes::from("r"))));
        // A large reply is not kept; an off record keeps nothing.
        r.insert(id(1000), Some(Bytes::from(vec![b'1'; REPLY_KEPT_BYTES_MAX + 1])), 100);
        assert_eq!(r.find(&id(1000)), Some(Seen::Handled));
        let mut off = Record::default();
        off.insert(id(1), None, 0);
        assert!(off.is_empty());
    }

    #[test]
    fn a_state_without_a_record_is_stored_as_plain_json() {
        let state = Bytes::from_static(br#"{"value":3}"#);
        let stored = encode_stored(&Record::default(), b"", &state);
        assert_eq!(stored, state);
        assert_eq!(decode_stored(&stored).unwrap(), (Record::default(), Bytes::new(), state));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let mut r = Record::default();
        r.insert(id(1), Some(Bytes::from("1")), 8);
        let stored = encode_stored(&r, b"", b"{}");
        for cut in MAGIC.len()..stored.len() - 2 {
            assert!(decode_stored(&stored.slice(..cut)).is_err(), "cut at {cut}");
        }
        let stored = encode_stored(&r, b"[1]", b"{}");
        for cut in MAGIC.len()..stored.len() - 2 {
            assert!(decode_stored(&stored.slice(..cut)).is_err(), "with reminders, cut at {cut}");
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_stored(&Bytes::from(huge)).is_err());
    }

    proptest! {
        #[test]
        fn records_round_trip(ops in proptest::collection::vec((0u32..50, proptest::option::of("[a-z]{0,20}")), 0..100),
                              ids_max in 1usize..40,
                              extra in "[ -~]{0,20}",
                              state in "[ -~]{0,40}") {
            let mut r = Record::default();
            for (n, reply) in ops {
                r.insert(id(n), reply.map(Bytes::from), ids_max);
            }
            let stored = encode_stored(&r, extra.as_bytes(), state.as_bytes());
            let (back, ex, st) = decode_stored(&stored).unwrap();
            prop_assert_eq!(back, r);
            prop_assert_eq!(&ex[..], extra.as_bytes());
            prop_assert_eq!(&st[..], state.as_bytes());
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for magic in [MAGIC, MAGIC_EXTRA] {
                let mut b = magic.to_vec();
                b.extend_from_slice(&bytes);
                let _ = decode_stored(&Bytes::from(b));
            }
        }
    }
}
