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
//! any value. A lookup scans 16-bit fingerprints, not the ids.
//!
//! ## Limits and caveats
//! - At most `agents.dedupe_ids_max` ids per agent (default [`DEDUPE_IDS_MAX_DEFAULT`]; the
//!   oldest goes first): a duplicate that arrives after that many other recorded calls to the same
//!   agent runs again. 0 turns the record off. Each id is 16 bytes of every stored value.
//! - Replies are kept for the newest [`REPLIES_KEPT_MAX`] recorded calls whose reply is at most
//!   [`REPLY_KEPT_BYTES_MAX`] bytes of JSON; older or larger ones answer `Duplicate`.
//! - An id is a SHA-256 of the pair, cut to 128 bits: a publisher cannot make another's signal
//!   look handled by choosing its own id (that would take a second preimage).
//! - A call that failed is not recorded: a retry runs it again.

use std::collections::VecDeque;

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
/// A lookup first scans 16-bit fingerprints of the ids (a few cache lines, where the ids are
/// 16 bytes each) and confirms a match on the full ids: a new signal, the usual case, touches
/// the fingerprints only. Ids are SHA-256 outputs, so fingerprints of different signals match
/// rarely; ids chosen to match cost one scan of the ids, what every lookup once cost.
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    /// Older ids (16 bytes each), oldest first.
    sealed: Bytes,
    /// Ids dropped from the start of `sealed`.
    skip: usize,
    /// The newest ids, fewer than `TAIL_IDS_MAX`.
    tail: Vec<HandledId>,
    /// One per held id, in the same order.
    fingerprints: VecDeque<u16>,
    replies: Replies,
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

    fn front_id(&self) -> Option<HandledId> {
        self.iter().next().map(|(id, _)| id)
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

fn fingerprint(id: &HandledId) -> u16 {
    u16::from_le_bytes([id[0], id[1]])
}

impl PartialEq for Record {
    /// The same ids and replies, however they are split between the sealed run and the tail.
    fn eq(&self, other: &Record) -> bool {
        self.ids().eq(other.ids()) && self.replies == other.replies
    }
}

impl Eq for Record {}

impl Record {
    pub(crate) fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.fingerprints.len()
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
        let f = fingerprint(id);
        let (older, newer) = self.fingerprints.as_slices();
        if !older.contains(&f) && !newer.contains(&f) {
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
        let reply = self.replies.iter().find(|(h, _)| h == id);
        Some(reply.map_or(Seen::Handled, |(_, r)| Seen::Reply(Bytes::copy_from_slice(r))))
    }

    /// Records `id` (with its reply's JSON when small enough), dropping the oldest beyond
    /// `ids_max`.
    pub(crate) fn insert(&mut self, id: HandledId, reply: Option<&[u8]>, ids_max: usize) {
        if ids_max == 0 {
            return;
        }
        while self.fingerprints.len() >= ids_max {
            self.drop_oldest();
        }
        self.push(id);
        if let Some(reply) = reply.filter(|r| r.len() <= REPLY_KEPT_BYTES_MAX) {
            self.replies.push(&id, reply);
        }
        debug_assert!(self.fingerprints.len() <= ids_max && self.replies.len <= REPLIES_KEPT_MAX);
        debug_assert_eq!(self.fingerprints.len(), self.sealed_ids().len() / ID_BYTES + self.tail.len());
    }

    fn push(&mut self, id: HandledId) {
        self.fingerprints.push_back(fingerprint(&id));
        self.tail.push(id);
        if self.tail.len() == TAIL_IDS_MAX {
            // A new run; stored values holding the old one keep it.
            let mut run = Vec::with_capacity(self.sealed_ids().len() + TAIL_IDS_MAX * ID_BYTES);
            run.extend_from_slice(self.sealed_ids());
            run.extend_from_slice(self.tail.as_flattened());
            self.sealed = Bytes::from(run);
            self.skip = 0;
            self.tail.clear();
        }
    }

    fn drop_oldest(&mut self) {
        self.fingerprints.pop_front();
        let gone: HandledId = if self.sealed_ids().is_empty() {
            self.tail.remove(0)
        } else {
            let gone = self.sealed_ids()[..ID_BYTES].try_into().expect("16 bytes");
            self.skip += 1;
            gone
        };
        // Both rings are oldest first, so a reply of the oldest id can only be the oldest reply:
        // one compare, not a scan (this runs on every call once the record is full).
        if self.replies.front_id() == Some(gone) {
            self.replies.pop_front();
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
    head.put_u32_le(record.fingerprints.len() as u32);
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
    record.fingerprints = ids.chunks_exact(ID_BYTES).map(|c| fingerprint(&c.try_into().expect("16 bytes"))).collect();
    let replies_len = u32_at(take(4)?);
    if replies_len > ids_len.min(REPLIES_KEPT_MAX) {
        return Err(format!("stored record holds {replies_len} replies for {ids_len} ids"));
    }
    for _ in 0..replies_len {
        let id: HandledId = stored[take(ID_BYTES)?].try_into().expect("16 bytes");
        let len = u32_at(take(4)?);
        let json = &stored[take(len)?];
        // A reply answers only for an id the record holds (`find` checks the ids first); one
        // whose id is not there is dropped, so the replies stay a subsequence of the ids, as
        // `insert` expects.
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
    /// without a record (each side twice). The hash of the id is paid by both. Run:
    /// `cargo test --release -p cadre --lib record_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn record_cost_per_call() {
        const AGENTS: usize = 1000;
        const IDS: usize = 256;
        const CALLS: usize = 4_000_000;
        let state = Bytes::from_static(br#"{"value":12345}"#);
        for with in [true, false, true, false] {
            let mut records = vec![Record::default(); AGENTS];
            let mut stored = vec![Vec::new(); AGENTS];
            let mut n = 0u64;
            let mut call = |i: usize| {
                n += 1;
                let id = handled_id("/bench", &n.to_string());
                let agent = (i * 7919) % AGENTS;
                assert!(records[agent].find(&id).is_none());
                if with {
                    records[agent].insert(id, Some(br#"{"value":12345}"#), IDS);
                }
                stored[agent] = encode_stored(&records[agent], &Bytes::new(), &state);
            };
            (0..AGENTS * IDS).for_each(&mut call);
            let started = std::time::Instant::now();
            (0..CALLS).for_each(&mut call);
            let ns = started.elapsed().as_nanos() as f64 / CALLS as f64;
            println!("record {}: {ns:.0} ns a call (hash, lookup, insert, encoding)", if with { "on " } else { "off" });
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
