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
//! ## What a write costs
//! The value is handed to the store in parts ([`crate::storage::Storage::put_parts`]): the
//! older ids are one sealed run shared by every value that holds them, so a write copies only
//! the header, the newest ids (fewer than `TAIL_IDS_MAX`, 32) and the kept replies; the run is
//! rebuilt once every `TAIL_IDS_MAX` recorded calls. A store that keeps values in memory keeps
//! the parts; the others (a file, a database, a replica's frame) copy them once, as they copy
//! any value. A lookup probes a small table of 16-bit fingerprints (one cache line, usually),
//! not the ids, and dropping the oldest id reads nothing. At 1,000 agents called in turn every
//! record is out of the cache when its agent is called again, so what a call costs is mostly
//! how many separate cache lines it touches, not how many instructions it runs.
//!
//! ## Limits and caveats
//! - At most `agents.dedupe_ids_max` ids per agent (default [`DEDUPE_IDS_MAX_DEFAULT`]; the
//!   oldest goes first): a duplicate that arrives after that many other recorded calls to the same
//!   agent runs again. 0 turns the record off. Each id is 16 bytes of every stored value.
//! - Replies are kept for the newest [`REPLIES_KEPT_MAX`] recorded calls whose reply is at most
//!   [`REPLY_KEPT_BYTES_MAX`] bytes of JSON; older or larger ones answer `Duplicate`. A kept
//!   reply whose id was dropped stays (stored, never answering) until newer replies push it out.
//! - An id is a SHA-256 of the pair, cut to 128 bits: a publisher cannot make another's signal
//!   look handled by choosing its own id (that would take a second preimage).
//! - A call that failed is not recorded: a retry runs it again.

use bytes::{BufMut, Bytes};
use sha2::{Digest, Sha256};

#[cfg_attr(not(feature = "testing"), allow(unused_imports))] // For tests and benchmarks.
pub use crate::config::{DEDUPE_IDS_MAX_DEFAULT, DEDUPE_IDS_MAX_LIMIT};
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

/// Ids the tail of the record holds before it is sealed into the shared run of older ids.
///
/// A write copies the tail (half of this on average, 16 bytes an id) and, once every this many
/// records, the whole record (into a new sealed run): 32 keeps both to a few hundred bytes a
/// write at the default size, against 4 KiB when every write copied every id.
const TAIL_IDS_MAX: usize = 32;

/// The signals an agent handled, newest last.
///
/// The ids are a sealed run (one immutable buffer, shared by every stored value that holds it,
/// so a write does not copy it), minus `skip` dropped at its start, then a tail of the newest.
/// A lookup first probes an [`Index`] of 16-bit fingerprints and confirms a match on the full
/// ids: a new signal, the usual case, touches one line of the index (the ids are 16 bytes
/// each, a scan of them many lines). Ids are SHA-256 outputs, so fingerprints of different
/// signals match rarely; ids chosen to match cost one scan of the ids, what every lookup once
/// cost.
///
/// Dropping the oldest id touches nothing but a counter: its fingerprint stays in the index
/// until the next rebuild (a false match costs a scan), and a kept reply whose id is gone stays
/// until newer replies push it out (a lookup checks the ids first, so it never answers).
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    /// Older ids (16 bytes each), oldest first.
    sealed: Bytes,
    /// Ids dropped from the start of `sealed`.
    skip: usize,
    /// The newest ids, fewer than `TAIL_IDS_MAX`.
    tail: Vec<HandledId>,
    /// Fingerprints of every held id (and of some dropped since the last rebuild).
    index: Index,
    replies: Replies,
}

/// A set of 16-bit fingerprints in an open-addressing table (linear probing, 0 = empty slot),
/// kept at most three-quarters full: a lookup reads a slot or two of one cache line, where a
/// list of fingerprints is a scan of several lines, each cold when its agent is called again.
/// It answers "maybe held" or "not held"; nothing is ever removed (it is rebuilt instead).
#[derive(Debug, Clone, Default)]
struct Index {
    slots: Box<[u16]>,
    used: usize,
}

impl Index {
    /// An index of `ids` (`len` of them), with room for `TAIL_IDS_MAX` more before it is
    /// three-quarters full.
    fn of<'a>(ids: impl Iterator<Item = &'a [u8]>, len: usize) -> Index {
        let room = (len + TAIL_IDS_MAX) * 3 / 2;
        let mut index = Index { slots: vec![0; room.next_power_of_two().max(64)].into(), used: 0 };
        for id in ids {
            index.add(id);
        }
        index
    }

    /// The fingerprint (never 0) and the first slot of `id`: different bytes of the id, so
    /// ids that share a fingerprint spread over the table.
    fn place(&self, id: &[u8]) -> (u16, usize) {
        let f = u16::from_le_bytes([id[0], id[1]]).max(1);
        let start = u32::from_le_bytes([id[4], id[5], id[6], id[7]]) as usize;
        (f, start & (self.slots.len() - 1))
    }

    /// Probes for `id`'s fingerprint `f`: `Ok` when it is there, else `Err` with the empty slot
    /// where it would go (the table is never full, so a probe always ends).
    fn probe(&self, id: &[u8]) -> Result<(), (usize, u16)> {
        let (f, mut at) = self.place(id);
        loop {
            match self.slots[at] {
                0 => return Err((at, f)),
                s if s == f => return Ok(()),
                _ => at = (at + 1) & (self.slots.len() - 1),
            }
        }
    }

    fn may_hold(&self, id: &[u8]) -> bool {
        !self.slots.is_empty() && self.probe(id).is_ok()
    }

    /// Adds `id`'s fingerprint; false when the table is too full for it (rebuild it instead).
    fn add(&mut self, id: &[u8]) -> bool {
        if (self.used + 1) * 4 > self.slots.len() * 3 {
            return false;
        }
        if let Err((at, f)) = self.probe(id) {
            self.slots[at] = f;
            self.used += 1;
        }
        true
    }
}

/// The kept replies, oldest first, as they are stored (each its id, a u32 LE length, its JSON):
/// one buffer, so a write copies them in one piece and keeping one allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Replies {
    buf: Vec<u8>,
    len: usize,
}

impl Replies {
    /// Each reply's id and JSON, oldest first.
    fn iter(&self) -> impl Iterator<Item = (HandledId, &[u8])> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let rest = self.buf.get(at..).filter(|r| !r.is_empty())?;
            let id: HandledId = rest[..ID_BYTES].try_into().expect("written by push");
            let len = u32::from_le_bytes(rest[ID_BYTES..ID_BYTES + 4].try_into().expect("4 bytes")) as usize;
            at += ID_BYTES + 4 + len;
            Some((id, &rest[ID_BYTES + 4..ID_BYTES + 4 + len]))
        })
    }

    fn pop_front(&mut self) {
        let first = self.iter().next().map(|(_, json)| ID_BYTES + 4 + json.len());
        if let Some(end) = first {
            self.buf.drain(..end);
            self.len -= 1;
        }
    }

    fn push(&mut self, id: &HandledId, json: &[u8]) {
        if self.len >= REPLIES_KEPT_MAX {
            self.pop_front();
        }
        self.buf.extend_from_slice(id);
        self.buf.put_u32_le(json.len() as u32);
        self.buf.extend_from_slice(json);
        self.len += 1;
    }
}

impl PartialEq for Record {
    /// The same ids and the same replies to them, however the ids are split between the sealed
    /// run and the tail (replies whose id is gone are not compared: they never answer).
    fn eq(&self, other: &Record) -> bool {
        let live = |r: &Record| r.replies.iter().filter(|(id, _)| r.holds(id)).map(|(id, json)| (id, json.to_vec())).collect::<Vec<_>>();
        self.ids().eq(other.ids()) && live(self) == live(other)
    }
}

impl Eq for Record {}

impl Record {
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.sealed_ids().len() / ID_BYTES + self.tail.len()
    }

    fn sealed_ids(&self) -> &[u8] {
        &self.sealed[self.skip * ID_BYTES..]
    }

    /// Every id, oldest first.
    fn ids(&self) -> impl Iterator<Item = HandledId> + '_ {
        let sealed = self.sealed_ids().chunks_exact(ID_BYTES).map(|c| c.try_into().expect("16 bytes"));
        sealed.chain(self.tail.iter().copied())
    }

    /// Whether `id` is held: its fingerprint first, then (on a match) the ids, the tail first
    /// (a retry usually comes soon after its original).
    fn holds(&self, id: &HandledId) -> bool {
        if !self.index.may_hold(id) {
            return false;
        }
        // As integers: two word compares per id instead of a `memcmp` call.
        let wanted = u128::from_ne_bytes(*id);
        self.tail.iter().rev().any(|h| u128::from_ne_bytes(*h) == wanted)
            || self
                .sealed_ids()
                .chunks_exact(ID_BYTES)
                .any(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == wanted)
    }

    pub(crate) fn find(&self, id: &HandledId) -> Option<Seen> {
        if !self.holds(id) {
            return None;
        }
        // The newest: an id dropped and handled again has an older reply too.
        let reply = self.replies.iter().filter(|(h, _)| h == id).last();
        Some(reply.map_or(Seen::Handled, |(_, r)| Seen::Reply(Bytes::copy_from_slice(r))))
    }

    /// Records `id` (with its reply's JSON when small enough), dropping the oldest beyond
    /// `ids_max`.
    pub(crate) fn insert(&mut self, id: HandledId, reply: Option<&[u8]>, ids_max: usize) {
        if ids_max == 0 {
            return;
        }
        while self.len() >= ids_max {
            self.drop_oldest();
        }
        self.push(id);
        if let Some(reply) = reply.filter(|r| r.len() <= REPLY_KEPT_BYTES_MAX) {
            self.replies.push(&id, reply);
        }
        debug_assert!(self.len() <= ids_max && self.replies.len <= REPLIES_KEPT_MAX);
        debug_assert!(self.index.used * 4 <= self.index.slots.len() * 3);
    }

    fn push(&mut self, id: HandledId) {
        self.tail.push(id);
        if self.tail.len() == TAIL_IDS_MAX {
            // A new run; stored values holding the old one keep it. The index starts again
            // from the held ids, without the fingerprints of those dropped.
            let mut run = Vec::with_capacity(self.sealed_ids().len() + TAIL_IDS_MAX * ID_BYTES);
            run.extend_from_slice(self.sealed_ids());
            run.extend_from_slice(self.tail.as_flattened());
            self.sealed = Bytes::from(run);
            self.skip = 0;
            self.tail.clear();
            self.reindex();
        } else if !self.index.add(&id) {
            // Full of fingerprints of dropped ids (a record of fewer ids than a tail is never
            // sealed): rebuilt from the held ones.
            self.reindex();
        }
    }

    /// Builds the index anew from the held ids.
    fn reindex(&mut self) {
        let held = self.sealed_ids().chunks_exact(ID_BYTES).chain(self.tail.iter().map(|h| &h[..]));
        self.index = Index::of(held, self.len());
    }

    /// Drops the oldest id: its fingerprint stays in the index until the next rebuild, and its
    /// reply (if still kept) until newer ones push it out, so nothing of it is read.
    fn drop_oldest(&mut self) {
        if self.sealed_ids().is_empty() {
            self.tail.remove(0);
        } else {
            self.skip += 1;
        }
    }
}

/// The value to store, in parts whose concatenation is the layout above: `state` (JSON) alone
/// when the record and `extra` (the reminders) are empty. The record's sealed run, the reminders
/// and the state are shared, not copied; only the header, the tail of the newest ids and the
/// kept replies are written anew.
pub(crate) fn encode_stored(record: &Record, extra: &Bytes, state: &Bytes) -> Vec<Bytes> {
    if record.is_empty() && extra.is_empty() {
        return vec![state.clone()];
    }
    let mut parts = Vec::with_capacity(5);
    let mut head = Vec::with_capacity(MAGIC.len() + 4);
    head.extend_from_slice(if extra.is_empty() { &MAGIC } else { &MAGIC_EXTRA });
    head.put_u32_le(record.len() as u32);
    parts.push(Bytes::from(head));
    if !record.sealed_ids().is_empty() {
        parts.push(record.sealed.slice(record.skip * ID_BYTES..));
    }
    // Exactly its length: `Bytes::from` a full vector takes it as it is, where spare capacity
    // costs one more allocation per write.
    let extra_len = if extra.is_empty() { 0 } else { 4 };
    let mut mid = Vec::with_capacity(record.tail.len() * ID_BYTES + 4 + record.replies.buf.len() + extra_len);
    mid.extend_from_slice(record.tail.as_flattened());
    mid.put_u32_le(record.replies.len as u32);
    mid.extend_from_slice(&record.replies.buf);
    if !extra.is_empty() {
        mid.put_u32_le(extra.len() as u32);
    }
    debug_assert_eq!(mid.len(), mid.capacity());
    parts.push(Bytes::from(mid));
    if !extra.is_empty() {
        parts.push(extra.clone());
    }
    parts.push(state.clone());
    parts
}

/// Writes `reply`'s JSON into `buf` (cleared first) if it is short enough to keep
/// ([`REPLY_KEPT_BYTES_MAX`]). Encoding stops at the limit, so a large reply costs neither its
/// whole encoding nor a buffer of its size (the activation keeps `buf` for every call).
pub(crate) fn reply_json<'b>(reply: &serde_json::Value, buf: &'b mut Vec<u8>) -> Option<&'b [u8]> {
    struct Capped<'a>(&'a mut Vec<u8>);
    impl std::io::Write for Capped<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0.len() + b.len() > REPLY_KEPT_BYTES_MAX {
                return Err(std::io::Error::other("reply too long to keep"));
            }
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    buf.clear();
    serde_json::to_writer(Capped(buf), reply).ok()?;
    Some(buf)
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
    // Copied, not sliced: a run sharing the loaded value would keep its state alive too.
    let ids = &stored[take(ids_len * ID_BYTES)?];
    record.sealed = Bytes::copy_from_slice(ids);
    record.reindex();
    let replies_len = u32_at(take(4)?);
    if replies_len > REPLIES_KEPT_MAX {
        return Err(format!("stored record holds {replies_len} replies, more than {REPLIES_KEPT_MAX}"));
    }
    for _ in 0..replies_len {
        let id: HandledId = stored[take(ID_BYTES)?].try_into().expect("16 bytes");
        let len = u32_at(take(4)?);
        let json = &stored[take(len)?];
        // A reply answers only for an id the record holds (`find` checks the ids first); one
        // whose id is gone is dropped here.
        if record.holds(&id) {
            record.replies.push(&id, json);
        }
    }
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
#[cfg(any(test, feature = "testing"))]
pub fn stored_state(stored: &Bytes) -> Result<Bytes, String> {
    decode_stored(stored).map(|(_, _, state)| state)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use proptest::prelude::*;

    fn id(n: u32) -> HandledId {
        handled_id("test", &n.to_string())
    }

    /// An id whose fingerprint is one of three: ids chosen to collide.
    fn colliding(n: u32) -> HandledId {
        let mut id = [0; ID_BYTES];
        id[..2].copy_from_slice(&((n % 3) as u16).to_le_bytes());
        id[8..12].copy_from_slice(&n.to_le_bytes());
        id
    }

    /// The stored value as one buffer.
    fn enc(r: &Record, extra: &[u8], state: &[u8]) -> Bytes {
        crate::storage::joined(&encode_stored(r, &Bytes::copy_from_slice(extra), &Bytes::copy_from_slice(state)))
    }

    #[test]
    fn a_dropped_id_handled_again_answers_with_its_newest_reply() {
        let mut r = Record::default();
        r.insert(id(1), Some(b"\"first\""), 2);
        r.insert(id(2), None, 2);
        r.insert(id(3), None, 2);
        assert_eq!(r.find(&id(1)), None, "dropped");
        r.insert(id(1), Some(b"\"second\""), 2);
        let second = Some(Seen::Reply(Bytes::from("\"second\"")));
        assert_eq!(r.find(&id(1)), second);
        // Both replies are stored (the first has not been pushed out); the newest answers.
        let (back, _, _) = decode_stored(&enc(&r, b"", b"{}")).unwrap();
        assert_eq!(back.find(&id(1)), second);
        assert_eq!(back, r);
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
            r.insert(id(n), Some(n.to_string().as_bytes()), 4);
        }
        assert_eq!(r.len(), 4);
        assert_eq!(r.find(&id(5)), None, "evicted");
        assert_eq!(r.find(&id(9)), Some(Seen::Reply(Bytes::from("9"))));
        // Only REPLIES_KEPT_MAX replies: past them, a duplicate is known without its reply.
        let mut r = Record::default();
        for n in 0..(REPLIES_KEPT_MAX as u32 + 2) {
            r.insert(id(n), Some(b"r"), 100);
        }
        assert_eq!(r.find(&id(0)), Some(Seen::Handled));
        assert_eq!(r.find(&id(REPLIES_KEPT_MAX as u32 + 1)), Some(Seen::Reply(Bytes::from("r"))));
        // A large reply is not kept; an off record keeps nothing.
        r.insert(id(1000), Some(&[b'1'; REPLY_KEPT_BYTES_MAX + 1]), 100);
        assert_eq!(r.find(&id(1000)), Some(Seen::Handled));
        let mut off = Record::default();
        off.insert(id(1), None, 0);
        assert!(off.is_empty());
    }

    #[test]
    fn only_short_replies_are_encoded_for_keeping() {
        let mut buf = Vec::new();
        assert_eq!(reply_json(&serde_json::json!({"value": 3}), &mut buf), Some(&br#"{"value":3}"#[..]));
        let long = serde_json::Value::String("x".repeat(REPLY_KEPT_BYTES_MAX));
        assert_eq!(reply_json(&long, &mut buf), None, "longer than the limit once quoted");
        assert!(buf.len() <= REPLY_KEPT_BYTES_MAX, "encoding stopped at the limit");
        let exact = serde_json::Value::String("x".repeat(REPLY_KEPT_BYTES_MAX - 2));
        assert_eq!(reply_json(&exact, &mut buf).map(<[u8]>::len), Some(REPLY_KEPT_BYTES_MAX));
    }

    #[test]
    fn a_state_without_a_record_is_stored_as_plain_json() {
        let state = Bytes::from_static(br#"{"value":3}"#);
        let parts = encode_stored(&Record::default(), &Bytes::new(), &state);
        assert_eq!(parts, vec![state.clone()], "shared, not copied");
        let stored = crate::storage::joined(&parts);
        assert_eq!(decode_stored(&stored).unwrap(), (Record::default(), Bytes::new(), state));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let mut r = Record::default();
        r.insert(id(1), Some(b"1"), 8);
        let stored = enc(&r, b"", b"{}");
        for cut in MAGIC.len()..stored.len() - 2 {
            assert!(decode_stored(&stored.slice(..cut)).is_err(), "cut at {cut}");
        }
        let stored = enc(&r, b"[1]", b"{}");
        for cut in MAGIC.len()..stored.len() - 2 {
            assert!(decode_stored(&stored.slice(..cut)).is_err(), "with reminders, cut at {cut}");
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_stored(&Bytes::from(huge)).is_err());
    }

    /// The record's cost per call outside the runtime: 1,000 full records (256 ids, a short
    /// reply each) written in turn, as the local-call benchmark does, against the same calls
    /// without a record (each side twice). The hash of the id is paid by both. Between calls
    /// it writes 16 lines of a 4 MiB buffer, standing in for the rest of a call's work (the
    /// agent's task, its mailbox, the caller), which in the runtime pushes each record out of
    /// the cache before its agent is called again. Run:
    /// `cargo test --release -p cadre --lib record_cost -- --ignored --nocapture`.
    ///
    /// Timings on a shared machine vary more than the differences worth measuring; a cache
    /// simulator counts the misses exactly. `RECORD_COST_SIDES=on` (or `off`) runs one side
    /// once, to be run under valgrind (the record's misses per call are the difference of the
    /// two runs' totals divided by the calls printed):
    /// `RECORD_COST_SIDES=on valgrind --tool=cachegrind --cache-sim=yes --D1=32768,8,64
    /// --LL=524288,8,64 target/release/deps/cadre-HASH record_cost --ignored --nocapture`.
    #[test]
    #[ignore]
    fn record_cost_per_call() {
        const AGENTS: usize = 1000;
        const IDS: usize = 256;
        const CALLS: usize = 1_000_000;
        const JUNK_BYTES: usize = 4 << 20;
        let sides = std::env::var("RECORD_COST_SIDES").unwrap_or_else(|_| "on,off,on,off".into());
        let state = Bytes::from_static(br#"{"value":12345}"#);
        let mut junk = vec![0u8; JUNK_BYTES];
        for side in sides.split(',') {
            let with = side == "on";
            let mut records = vec![Record::default(); AGENTS];
            let mut stored = vec![Vec::new(); AGENTS];
            let (mut n, mut j) = (0u64, 0usize);
            let mut call = |i: usize| {
                n += 1;
                for _ in 0..16 {
                    j = (j + 4160) % JUNK_BYTES;
                    junk[j] = junk[j].wrapping_add(1);
                }
                let id = handled_id("/bench", &n.to_string());
                let agent = (i * 7919) % AGENTS;
                assert!(records[agent].find(&id).is_none());
                if with {
                    records[agent].insert(id, Some(b"12345"), IDS);
                }
                stored[agent] = encode_stored(&records[agent], &Bytes::new(), &state);
            };
            (0..AGENTS * IDS).for_each(&mut call);
            let started = std::time::Instant::now();
            (0..CALLS).for_each(&mut call);
            let ns = started.elapsed().as_nanos() as f64 / CALLS as f64;
            let calls = AGENTS * IDS + CALLS;
            println!("record {side}: {ns:.0} ns a call (hash, lookup, insert, encoding); {calls} calls in all");
        }
    }

    proptest! {
        #[test]
        fn records_round_trip(ops in proptest::collection::vec((0u32..50, proptest::option::of("[a-z]{0,20}")), 0..100),
                              ids_max in 1usize..40,
                              extra in "[ -~]{0,20}",
                              state in "[ -~]{0,40}") {
            let mut r = Record::default();
            for (n, reply) in ops {
                r.insert(id(n), reply.as_deref().map(str::as_bytes), ids_max);
            }
            let stored = enc(&r, extra.as_bytes(), state.as_bytes());
            let (back, ex, st) = decode_stored(&stored).unwrap();
            prop_assert_eq!(back, r);
            prop_assert_eq!(&ex[..], extra.as_bytes());
            prop_assert_eq!(&st[..], state.as_bytes());
        }

        /// The sealed, fingerprinted record answers as a plain list of the newest `ids_max` ids
        /// would, with hashed ids and with ids whose index prefixes collide.
        #[test]
        fn the_record_answers_as_a_list_of_the_newest_ids(ops in proptest::collection::vec(0u32..120, 0..400),
                                                          ids_max in 1usize..80,
                                                          collide in any::<bool>()) {
            let make = |n: u32| if collide { colliding(n) } else { id(n) };
            let (mut r, mut model) = (Record::default(), VecDeque::new());
            for n in ops {
                let found = r.find(&make(n)).is_some();
                prop_assert_eq!(found, model.contains(&n), "find({}) before inserting", n);
                if found {
                    continue;
                }
                r.insert(make(n), None, ids_max);
                if model.len() == ids_max {
                    model.pop_front();
                }
                model.push_back(n);
                prop_assert_eq!(r.len(), model.len());
            }
            for n in 0..120 {
                prop_assert_eq!(r.find(&make(n)).is_some(), model.contains(&n), "find({}) at the end", n);
            }
            let (back, _, _) = decode_stored(&enc(&r, b"", b"{}")).unwrap();
            prop_assert_eq!(&back, &r);
            for n in 0..120 {
                prop_assert_eq!(back.find(&make(n)).is_some(), model.contains(&n), "find({}) after decoding", n);
            }
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
