//! The conformance suite every [`Storage`] backend must pass.
//!
//! [`run`] checks, on one store, each rule of the module docs of [`super`], every check on its own
//! keys and shards (so a backend shared by other tests, like a database, can run it too).
//! [`run_on_empty`] adds the checks that must see the whole store (a scan of an empty store, scans
//! from the start) and runs [`run`]. Backends call one of them from their tests (`run_on_empty`
//! when they can start empty); a failure panics naming the rule.

use std::sync::Arc;

use bytes::Bytes;

use super::{Fence, Key, Storage, StorageError, ENTRIES_READ_MAX, SCAN_READ_MAX, VALUE_LEN_MAX_BYTES};

fn key(prefix: &str, name: &str) -> Key {
    Key::new(format!("conf-{prefix}"), name)
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Runs every check. `prefix` keeps this run's keys apart from other runs on the same store, and
/// `shard_base` its shards.
pub async fn run(store: Arc<dyn Storage>, prefix: &str, shard_base: u32) {
    states_and_revisions(&*store, prefix, shard_base).await;
    fencing(&*store, prefix, shard_base + 1).await;
    deletes_and_no_aba(&*store, prefix, shard_base + 2).await;
    entries(&*store, prefix, shard_base + 3).await;
    limits(&*store, prefix, shard_base + 4).await;
    one_winner_among_concurrent_writers(store.clone(), prefix, shard_base + 5).await;
    scans(&*store, prefix, shard_base + 6).await;
}

/// Runs every check on a store that starts empty and that nothing else writes to meanwhile: an
/// empty store scans empty, then [`run`], then scans from the start list the whole store.
pub async fn run_on_empty(store: Arc<dyn Storage>) {
    let s = &*store;
    assert_eq!(s.scan_keys(None, 10).await.unwrap(), Vec::<Key>::new(), "an empty store has no keys");
    assert_eq!(s.scan_keys(None, usize::MAX).await.unwrap(), Vec::<Key>::new());
    assert_eq!(s.scan_keys(Some(&Key::new("t", "x")), 10).await.unwrap(), Vec::<Key>::new());
    let prefix = "alone";
    run(store.clone(), prefix, 0).await;
    let all = s.scan_keys(None, usize::MAX).await.unwrap();
    assert!(all.len() < SCAN_READ_MAX, "the checks write fewer keys than a scan returns");
    assert!(all.windows(2).all(|w| w[0] < w[1]), "a scan is in key order, without repeats: {all:?}");
    for k in [key(prefix, "state"), key(prefix, "log"), key(prefix, "long-log"), key(prefix, "deleted")] {
        assert!(all.contains(&k), "{k:?} has a state or entries, so it is listed");
    }
    for limit in [1, 2, 5] {
        assert_eq!(page_all(s, None, limit, |_| true).await, all, "paging from the start by {limit}");
    }
    assert_eq!(s.scan_keys(None, 0).await.unwrap(), Vec::<Key>::new(), "a limit of 0");
}

async fn states_and_revisions(s: &dyn Storage, prefix: &str, shard: u32) {
    let k = key(prefix, "state");
    let f = Fence { shard, epoch: 1 };
    assert_eq!(s.get(&k).await.unwrap(), None, "absent key");
    let r1 = s.put(&k, b("one"), 0, f).await.unwrap();
    assert!(r1 > 0, "revisions are positive");
    let got = s.get(&k).await.unwrap().unwrap();
    assert_eq!((got.value, got.revision), (b("one"), r1));
    assert_eq!(
        s.put(&k, b("x"), 0, f).await,
        Err(StorageError::Conflict { expected: 0, actual: r1 }),
        "create of an existing key"
    );
    assert_eq!(s.put(&k, b("x"), r1 + 100, f).await, Err(StorageError::Conflict { expected: r1 + 100, actual: r1 }));
    let r2 = s.put(&k, b("two"), r1, f).await.unwrap();
    assert!(r2 > r1, "revisions grow");
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b("two"), "a refused write changes nothing");
    let other = key(prefix, "state-other");
    let r3 = s.put(&other, Bytes::new(), 0, f).await.unwrap();
    assert!(r3 > r2, "one counter for the store, not per key");
    assert_eq!(s.get(&other).await.unwrap().unwrap().value, Bytes::new(), "empty values are values");
    let binary = Bytes::from((0..=255u8).collect::<Vec<_>>());
    let bk = key(prefix, "binary\u{e9}\u{1F600}");
    let r = s.put(&bk, binary.clone(), 0, f).await.unwrap();
    assert_eq!(s.get(&bk).await.unwrap().unwrap(), super::Versioned { value: binary, revision: r });
    // A value in parts is their concatenation, under the same rules.
    let parts = vec![b("pa"), Bytes::new(), b("rt"), b("s")];
    let r4 = s.put_parts(&k, parts.clone(), r2, f).await.unwrap();
    assert!(r4 > r3, "a write in parts is a write");
    assert_eq!(s.get(&k).await.unwrap().unwrap(), super::Versioned { value: b("parts"), revision: r4 });
    assert_eq!(
        s.put_parts(&k, parts, r2, f).await,
        Err(StorageError::Conflict { expected: r2, actual: r4 }),
        "parts check the revision"
    );
    let r5 = s.put_parts(&k, vec![b("one part")], r4, f).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap().unwrap(), super::Versioned { value: b("one part"), revision: r5 });
    assert_eq!(s.put_parts(&k, vec![], r5, f).await.map(|r| r > r5), Ok(true), "no parts: an empty value");
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, Bytes::new());
}

async fn fencing(s: &dyn Storage, prefix: &str, shard: u32) {
    let k = key(prefix, "fenced");
    assert_eq!(s.epoch(shard).await.unwrap(), 0);
    let r1 = s.put(&k, b("at 3"), 0, Fence { shard, epoch: 3 }).await.unwrap();
    assert_eq!(s.epoch(shard).await.unwrap(), 3);
    let stale = s.put(&k, b("at 2"), r1, Fence { shard, epoch: 2 }).await;
    assert_eq!(stale, Err(StorageError::Fenced { shard, epoch: 2, current: 3 }), "a lower epoch is fenced");
    let stale = s.put(&k, b("at 2"), 999, Fence { shard, epoch: 2 }).await;
    assert!(matches!(stale, Err(StorageError::Fenced { .. })), "fencing is checked before the revision");
    assert!(matches!(s.delete(&k, r1, Fence { shard, epoch: 2 }).await, Err(StorageError::Fenced { .. })));
    assert!(matches!(s.append(&k, vec![b("e")], 0, Fence { shard, epoch: 2 }).await, Err(StorageError::Fenced { .. })));
    let parts = s.put_parts(&k, vec![b("at "), b("2")], r1, Fence { shard, epoch: 2 }).await;
    assert!(matches!(parts, Err(StorageError::Fenced { .. })), "a write in parts is fenced too");
    let r2 = s.put(&k, b("at 3 again"), r1, Fence { shard, epoch: 3 }).await.unwrap();
    let r3 = s.put(&k, b("at 5"), r2, Fence { shard, epoch: 5 }).await.unwrap();
    assert_eq!(s.epoch(shard).await.unwrap(), 5, "a higher epoch raises the fence");
    assert!(matches!(
        s.put(&k, b("x"), r3, Fence { shard, epoch: 4 }).await,
        Err(StorageError::Fenced { current: 5, .. })
    ));
    // A refused write does not raise the fence.
    let refused = s.put(&k, b("x"), 12345, Fence { shard, epoch: 9 }).await;
    assert!(matches!(refused, Err(StorageError::Conflict { .. })));
    assert_eq!(s.epoch(shard).await.unwrap(), 5);
    // Raising the fence alone: writes below it are refused, at it they pass.
    s.fence(Fence { shard, epoch: 7 }).await.unwrap();
    assert_eq!(s.epoch(shard).await.unwrap(), 7);
    assert!(matches!(s.fence(Fence { shard, epoch: 6 }).await, Err(StorageError::Fenced { current: 7, .. })));
    assert!(matches!(s.put(&k, b("x"), r3, Fence { shard, epoch: 6 }).await, Err(StorageError::Fenced { .. })));
    assert_eq!(s.get(&k).await.unwrap().unwrap().revision, r3, "a fence writes no key");
    s.fence(Fence { shard, epoch: 7 }).await.unwrap();
    // Fences are per shard.
    let other = key(prefix, "fenced-other-shard");
    s.put(&other, b("x"), 0, Fence { shard: shard + 1000, epoch: 1 }).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b("at 5"));
}

async fn deletes_and_no_aba(s: &dyn Storage, prefix: &str, shard: u32) {
    let k = key(prefix, "deleted");
    let f = Fence { shard, epoch: 1 };
    let r1 = s.put(&k, b("v"), 0, f).await.unwrap();
    s.append(&k, vec![b("e0"), b("e1")], 0, f).await.unwrap();
    assert_eq!(s.delete(&k, r1 + 1, f).await, Err(StorageError::Conflict { expected: r1 + 1, actual: r1 }));
    s.delete(&k, r1, f).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), None);
    assert_eq!(s.entries(&k, 0, 10).await.unwrap(), Vec::<Bytes>::new(), "delete removes the entries");
    let r2 = s.put(&k, b("again"), 0, f).await.unwrap();
    assert!(r2 > r1);
    // A writer still holding r1 cannot overwrite the new value.
    assert!(matches!(s.put(&k, b("stale"), r1, f).await, Err(StorageError::Conflict { .. })));
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b("again"));
}

async fn entries(s: &dyn Storage, prefix: &str, shard: u32) {
    let k = key(prefix, "log");
    let f = Fence { shard, epoch: 1 };
    assert_eq!(s.entries(&k, 0, 10).await.unwrap(), Vec::<Bytes>::new());
    assert_eq!(s.append(&k, vec![b("a"), b("b")], 0, f).await.unwrap(), 2);
    assert_eq!(s.append(&k, vec![b("x")], 0, f).await, Err(StorageError::Conflict { expected: 0, actual: 2 }));
    assert_eq!(s.append(&k, vec![b("c")], 2, f).await.unwrap(), 3);
    assert_eq!(s.append(&k, vec![], 3, f).await.unwrap(), 3, "an empty append checks the length only");
    assert_eq!(s.entries(&k, 0, 10).await.unwrap(), [b("a"), b("b"), b("c")]);
    assert_eq!(s.entries(&k, 1, 1).await.unwrap(), [b("b")]);
    assert_eq!(s.entries(&k, 3, 10).await.unwrap(), Vec::<Bytes>::new());
    assert_eq!(s.entries(&k, u64::MAX, 10).await.unwrap(), Vec::<Bytes>::new());
    // Entries of one key do not leak into another whose name extends it.
    let k2 = key(prefix, "log2");
    s.append(&k2, vec![b("z")], 0, f).await.unwrap();
    assert_eq!(s.entries(&k, 0, 10).await.unwrap().len(), 3);
    assert_eq!(s.get(&k).await.unwrap(), None, "entries and state are separate");
    let many: Vec<Bytes> = (0..ENTRIES_READ_MAX + 5).map(|i| Bytes::from(i.to_string())).collect();
    let k3 = key(prefix, "long-log");
    s.append(&k3, many, 0, f).await.unwrap();
    assert_eq!(s.entries(&k3, 0, usize::MAX).await.unwrap().len(), ENTRIES_READ_MAX, "reads are capped");
}

async fn limits(s: &dyn Storage, prefix: &str, shard: u32) {
    let f = Fence { shard, epoch: 1 };
    let k = key(prefix, "big");
    let big = Bytes::from(vec![7u8; VALUE_LEN_MAX_BYTES + 1]);
    assert_eq!(s.put(&k, big.clone(), 0, f).await, Err(StorageError::TooLarge { len: VALUE_LEN_MAX_BYTES + 1 }));
    assert!(matches!(s.append(&k, vec![big], 0, f).await, Err(StorageError::TooLarge { .. })));
    // Parts each within the limit, together over it.
    let half = Bytes::from(vec![7u8; VALUE_LEN_MAX_BYTES / 2 + 1]);
    assert_eq!(
        s.put_parts(&k, vec![half.clone(), half], 0, f).await,
        Err(StorageError::TooLarge { len: 2 * (VALUE_LEN_MAX_BYTES / 2 + 1) })
    );
    assert_eq!(s.get(&k).await.unwrap(), None);
    let bad = Key::new("", "x");
    assert!(matches!(s.put(&bad, b("x"), 0, f).await, Err(StorageError::InvalidKey(_))));
    let long = Key::new("t", "x".repeat(super::KEY_LEN_MAX_BYTES));
    assert!(matches!(s.put(&long, b("x"), 0, f).await, Err(StorageError::InvalidKey(_))));
    assert_eq!(s.epoch(shard).await.unwrap(), 0, "refused writes leave no trace");
}

async fn one_winner_among_concurrent_writers(s: Arc<dyn Storage>, prefix: &str, shard: u32) {
    const WRITERS: usize = 8;
    let k = key(prefix, "contended");
    let f = Fence { shard, epoch: 1 };
    let base = s.put(&k, b("base"), 0, f).await.unwrap();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move { s.put(&k, Bytes::from(i.to_string()), base, f).await })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => winners.push(i),
            Err(StorageError::Conflict { .. }) => {}
            Err(e) => panic!("writer {i}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, Bytes::from(winners[0].to_string()));
}

/// Key scans, on this run's own stretch of the key order: the keys whose type starts with
/// `conf-{prefix}/scan/` (a contiguous stretch, whatever other keys the store holds around it).
async fn scans(s: &dyn Storage, prefix: &str, shard: u32) {
    let f = Fence { shard, epoch: 1 };
    let base = format!("conf-{prefix}/scan/");
    let mine = |k: &Key| k.ty.starts_with(&base);
    let k = |ty: &str, id: &str| Key::new(format!("{base}{ty}"), id);
    // Before every key of the stretch: their types are longer.
    let start = Key::new(base.clone(), "");
    assert_eq!(page_all(s, Some(&start), 10, mine).await, Vec::<Key>::new(), "nothing listed before any write");

    // In key order. Type "a" is a prefix of type "ab", yet every "a" key comes first, whatever its
    // id ("\u{1F600}" > "b" as bytes): the type is compared first.
    let expected = vec![
        k("a", ""),
        k("a", "\0"),
        k("a", "b"),
        k("a", "b\0"),
        k("a", "\u{e9}"),
        k("a", "\u{1F600}"),
        k("ab", ""),
        k("ab", "a"),
        k("b", "x"),
    ];
    assert!(expected.windows(2).all(|w| w[0] < w[1]), "the expected list is in key order");
    // Written out of order; odd ones get only entries, every third both.
    let mut order: Vec<usize> = (0..expected.len()).collect();
    order.reverse();
    order.swap(1, 5);
    for i in order {
        let key = &expected[i];
        if i % 2 == 0 {
            s.put(key, b("state"), 0, f).await.unwrap();
        }
        if i % 2 == 1 || i % 3 == 0 {
            s.append(key, vec![b("entry")], 0, f).await.unwrap();
        }
    }
    // Not listed: a key deleted with its state and entries, one whose only entries were deleted
    // (expected revision 0), and one that an empty append left without entries.
    let gone = k("a", "gone");
    let r = s.put(&gone, b("state"), 0, f).await.unwrap();
    s.append(&gone, vec![b("entry")], 0, f).await.unwrap();
    s.delete(&gone, r, f).await.unwrap();
    let gone_entries = k("ab", "gone");
    s.append(&gone_entries, vec![b("entry")], 0, f).await.unwrap();
    s.delete(&gone_entries, 0, f).await.unwrap();
    let never = k("ab", "empty append");
    assert_eq!(s.append(&never, vec![], 0, f).await.unwrap(), 0);

    assert_eq!(page_all(s, Some(&start), usize::MAX, mine).await, expected, "one scan lists the stretch in order");
    for limit in [1, 2, 3, 4, expected.len(), expected.len() + 1] {
        assert_eq!(page_all(s, Some(&start), limit, mine).await, expected, "paging by {limit}: each key once");
    }
    assert_eq!(s.scan_keys(Some(&start), 0).await.unwrap(), Vec::<Key>::new(), "a limit of 0");
    assert_eq!(s.scan_keys(Some(&expected[0]), 2).await.unwrap(), expected[1..3], "strictly after `after`");
    // `after` need not be a stored key.
    assert_eq!(s.scan_keys(Some(&k("a", "c")), 2).await.unwrap(), expected[4..6]);
    assert_eq!(s.scan_keys(Some(&k("aa", "")), 1).await.unwrap(), expected[6..7]);
    let bad = Key::new("a\0b", "");
    assert!(
        matches!(s.scan_keys(Some(&bad), 1).await, Err(StorageError::InvalidKey(_))),
        "a NUL in the type of `after`"
    );
    // The cap at SCAN_READ_MAX needs more keys than a suite run on a durable store can write in
    // time (one commit each); each backend's unit tests check it on bulk-loaded keys.
    s.put(&gone, b("again"), 0, f).await.unwrap();
    let mut with_gone = expected.clone();
    with_gone.insert(4, gone);
    assert_eq!(page_all(s, Some(&start), 3, mine).await, with_gone, "a key written again is listed again");
}

/// Pages through the keys after `after`, `limit` at a time, while `keep` holds; checks every page.
async fn page_all(s: &dyn Storage, after: Option<&Key>, limit: usize, keep: impl Fn(&Key) -> bool) -> Vec<Key> {
    let mut after = after.cloned();
    let mut out = Vec::new();
    loop {
        let page = s.scan_keys(after.as_ref(), limit).await.unwrap();
        assert!(page.len() <= limit.min(SCAN_READ_MAX), "at most the limit: {} > {limit}", page.len());
        assert!(page.windows(2).all(|w| w[0] < w[1]), "a page is in key order, without repeats: {page:?}");
        if let (Some(after), Some(first)) = (&after, page.first()) {
            assert!(first > after, "strictly after {after:?}: {first:?}");
        }
        let len = page.len();
        let kept: Vec<Key> = page.into_iter().take_while(|k| keep(k)).collect();
        let done = kept.len() < len || len < limit.min(SCAN_READ_MAX) || len == 0;
        after = kept.last().cloned().or(after);
        out.extend(kept);
        if done {
            return out;
        }
    }
}
