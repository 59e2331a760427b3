//! A bounded multi-producer, single-consumer queue that the consumer drains in batches.
//!
//! The transport's writers take everything queued at once. With a per-message channel every
//! dequeue releases one slot and, under back-pressure, wakes a blocked sender per message; here
//! the writer takes a whole batch under one lock and wakes blocked senders once per batch. FIFO
//! order across all producers is the order in which they took the lock.
//!
//! The queue is bounded twice: by item count and by the sum of the items' byte weights (given by
//! the caller per item). When either bound would be exceeded, `try_send` fails with
//! [`TrySendError::Full`] and `send` waits for room. An item heavier than the whole byte budget is
//! still accepted into an empty queue, so it cannot block forever. Blocked senders are woken
//! together; small messages may take freed room before a large one (no FIFO fairness). When every
//! sender is gone the receiver sees the end after draining what is left; when the receiver is
//! gone, sends fail with `Closed`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    Full(T),
    Closed(T),
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    /// Sum of the queued items' weights.
    bytes: usize,
    /// A send was refused as full since the last drain: the drain must wake waiting senders.
    refused: bool,
    senders: usize,
    rx_closed: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    cap: usize,
    bytes_cap: usize,
    /// Wakes the consumer when the queue goes from empty to non-empty, or the last sender leaves.
    not_empty: Notify,
    /// Wakes blocked senders after a drain that follows a refused send, or when the receiver closes.
    not_full: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code path panics while holding this lock; recover rather than propagate if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) fn channel<T>(cap: usize, bytes_cap: usize) -> (Sender<T>, Receiver<T>) {
    assert!(cap > 0 && bytes_cap > 0, "queue bounds must be positive");
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), bytes: 0, refused: false, senders: 1, rx_closed: false }),
        cap,
        bytes_cap,
        not_empty: Notify::new(),
        not_full: Notify::new(),
    });
    (Sender { shared: shared.clone() }, Receiver { shared })
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender { shared: self.shared.clone() }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.shared.not_empty.notify_one();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` weighing `bytes`, or fails at once.
    pub fn try_send(&self, item: T, bytes: usize) -> Result<(), TrySendError<T>> {
        let was_empty = {
            let mut st = self.shared.lock();
            if st.rx_closed {
                return Err(TrySendError::Closed(item));
            }
            let over_bytes = !st.items.is_empty() && st.bytes + bytes > self.shared.bytes_cap;
            if st.items.len() >= self.shared.cap || over_bytes {
                st.refused = true;
                return Err(TrySendError::Full(item));
            }
            st.items.push_back((item, bytes));
            st.bytes += bytes;
            st.items.len() == 1
        };
        if was_empty {
            self.shared.not_empty.notify_one();
        }
        Ok(())
    }

    /// Waits for room; fails only when the receiver is gone.
    pub async fn send(&self, item: T, bytes: usize) -> Result<(), T> {
        // Fast path without registering as a waiter.
        let mut item = match self.try_send(item, bytes) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(it)) => return Err(it),
            Err(TrySendError::Full(it)) => it,
        };
        loop {
            let notified = self.shared.not_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_send(item, bytes) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(it)) => return Err(it),
                Err(TrySendError::Full(it)) => item = it,
            }
            notified.await;
        }
    }

    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }
}

impl<T> Receiver<T> {
    /// Moves up to `max` items into `out` without waiting; returns how many.
    pub fn try_recv_batch(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let (n, may_have_waiters) = {
            let mut st = self.shared.lock();
            let n = st.items.len().min(max);
            let mut freed = 0;
            out.extend(st.items.drain(..n).map(|(item, bytes)| {
                freed += bytes;
                item
            }));
            st.bytes -= freed;
            let may_have_waiters = n > 0 && std::mem::take(&mut st.refused);
            (n, may_have_waiters)
        };
        if may_have_waiters {
            self.shared.not_full.notify_waiters();
        }
        n
    }

    /// Waits until items are queued and moves up to `max` of them into `out`; returns 0 once
    /// every sender is gone and the queue is empty. Cancel-safe: items are moved in the same poll
    /// that returns.
    pub async fn recv_batch(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let n = self.try_recv_batch(out, max);
        if n > 0 {
            return n;
        }
        let shared = self.shared.clone();
        loop {
            let notified = shared.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let n = self.try_recv_batch(out, max);
            if n > 0 {
                return n;
            }
            if self.shared.lock().senders == 0 {
                // A last sender may have pushed just before leaving: take that too.
                return self.try_recv_batch(out, max);
            }
            notified.await;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.shared.lock().items.is_empty()
    }

    /// True once every sender is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().senders == 0
    }

    /// Refuses further sends and returns what was still queued.
    pub fn close(&mut self) -> usize {
        let n = {
            let mut st = self.shared.lock();
            st.rx_closed = true;
            let n = st.items.len();
            st.items.clear();
            st.bytes = 0;
            n
        };
        self.shared.not_full.notify_waiters();
        n
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_closed_are_reported() {
        let (tx, mut rx) = channel(2, 1000);
        tx.try_send(1, 1).unwrap();
        tx.try_send(2, 1).unwrap();
        assert_eq!(tx.try_send(3, 1), Err(TrySendError::Full(3)));
        let mut out = Vec::new();
        assert_eq!(rx.try_recv_batch(&mut out, 10), 2);
        assert_eq!(out, [1, 2]);
        assert_eq!(rx.close(), 0);
        assert_eq!(tx.try_send(4, 1), Err(TrySendError::Closed(4)));
    }

    #[test]
    fn the_byte_budget_bounds_the_queue_but_admits_one_oversized_item() {
        let (tx, mut rx) = channel(100, 10);
        tx.try_send("big", 50).unwrap();
        assert_eq!(tx.try_send("small", 1), Err(TrySendError::Full("small")));
        let mut out = Vec::new();
        rx.try_recv_batch(&mut out, 10);
        tx.try_send("a", 6).unwrap();
        assert_eq!(tx.try_send("b", 6), Err(TrySendError::Full("b")));
        tx.try_send("c", 4).unwrap();
    }

    #[tokio::test]
    async fn a_sender_refused_by_the_byte_budget_is_woken_by_a_small_drain() {
        let (tx, mut rx) = channel(100, 100);
        tx.try_send(0, 40).unwrap();
        let blocked = tokio::spawn(async move { tx.send(1, 70).await });
        tokio::task::yield_now().await;
        let mut out = Vec::new();
        while out.is_empty() {
            rx.recv_batch(&mut out, 1).await;
        }
        assert_eq!(out, [0]);
        blocked.await.unwrap().unwrap();
        out.clear();
        rx.recv_batch(&mut out, 10).await;
        assert_eq!(out, [1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producers_block_when_full_and_order_is_kept_per_producer() {
        let (tx, mut rx) = channel::<(u8, u32)>(8, 1 << 20);
        let mut producers = Vec::new();
        for p in 0..4u8 {
            let tx = tx.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..10_000u32 {
                    tx.send((p, i), 1).await.unwrap();
                }
            }));
        }
        drop(tx);
        let mut next = [0u32; 4];
        let mut out = Vec::new();
        while rx.recv_batch(&mut out, 5).await > 0 {
            assert!(out.len() <= 5);
            for (p, i) in out.drain(..) {
                assert_eq!(next[p as usize], i, "producer {p} out of order");
                next[p as usize] += 1;
            }
        }
        assert_eq!(next, [10_000; 4]);
        for p in producers {
            p.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_closed_receiver_releases_blocked_senders() {
        let (tx, mut rx) = channel(1, 10);
        tx.try_send(0, 1).unwrap();
        let blocked = tokio::spawn(async move { tx.send(1, 1).await });
        tokio::task::yield_now().await;
        assert_eq!(rx.close(), 1);
        assert_eq!(blocked.await.unwrap(), Err(1));
    }
}
