//! The openraft binding: the type configuration and a runtime with a seedable RNG. The network
//! that carries the group's RPCs is the cluster's ([`crate::cluster`] sends them on the
//! transport's control lane); the metadata layer knows nothing of the transport.
//!
//! ## Determinism
//! openraft draws election timeouts from the runtime's thread-local RNG. [`SeededRuntime`] is
//! tokio's runtime with that RNG replaced by a seedable one ([`seed_rng`]), so a simulation that
//! seeds it replays the same elections.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend};
use serde::{Deserialize, Serialize};

use super::{Cmd, CmdOutcome, MetaState};

/// A member of the Raft group: the node's name and transport address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    pub name: String,
    pub addr: String,
}

impl MetaNode {
    /// Its transport address, parsed.
    pub fn socket_addr(&self) -> Result<SocketAddr, BadAddress> {
        self.addr.parse().map_err(|source| BadAddress { name: self.name.clone(), addr: self.addr.clone(), source })
    }
}

/// A member whose address in the Raft membership does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("member {name}@{addr}: bad address: {source}")]
pub struct BadAddress {
    pub name: String,
    pub addr: String,
    pub source: std::net::AddrParseError,
}

impl std::fmt::Display for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// The metadata group's type configuration.
    pub TC:
        D = Cmd,
        R = CmdOutcome,
        NodeId = u64,
        Node = MetaNode,
        Entry = openraft::Entry<TC>,
        SnapshotData = MetaState,
        AsyncRuntime = SeededRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TC>;

// ------------------------------------------------------------------------------------------------
// Runtime with a seedable RNG

thread_local! {
    static RNG: std::cell::RefCell<rand08::rngs::StdRng> =
        std::cell::RefCell::new(<rand08::rngs::StdRng as rand08::SeedableRng>::seed_from_u64(rand::random()));
}

/// Reseeds the RNG openraft draws election timeouts from (on this thread).
pub fn seed_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = rand08::SeedableRng::seed_from_u64(seed));
}

/// A handle to the thread-local RNG.
pub struct ThreadRng;

impl rand08::RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        RNG.with(|r| r.borrow_mut().next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        RNG.with(|r| r.borrow_mut().next_u64())
    }
    fn fill_bytes(&mut self, d: &mut [u8]) {
        RNG.with(|r| r.borrow_mut().fill_bytes(d))
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand08::Error> {
        RNG.with(|r| r.borrow_mut().try_fill_bytes(d))
    }
}

/// tokio, with [`ThreadRng`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeededRuntime;

type Tk = openraft::TokioRuntime;

impl AsyncRuntime for SeededRuntime {
    type JoinError = <Tk as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tk as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tk as AsyncRuntime>::Sleep;
    type Instant = <Tk as AsyncRuntime>::Instant;
    type TimeoutError = <Tk as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tk as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = <Tk as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tk as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tk as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(f: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tk::spawn(f)
    }
    fn sleep(d: Duration) -> Self::Sleep {
        Tk::sleep(d)
    }
    fn sleep_until(d: Self::Instant) -> Self::Sleep {
        Tk::sleep_until(d)
    }
    fn timeout<R, F: Future<Output = R> + OptionalSend>(d: Duration, f: F) -> Self::Timeout<R, F> {
        Tk::timeout(d, f)
    }
    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(d: Self::Instant, f: F) -> Self::Timeout<R, F> {
        Tk::timeout_at(d, f)
    }
    fn is_panic(e: &Self::JoinError) -> bool {
        Tk::is_panic(e)
    }
    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }
    fn oneshot<T: OptionalSend>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>) {
        Tk::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_with_an_unparsable_address_is_a_typed_error() {
        let good = MetaNode { name: "a".into(), addr: "127.0.0.1:7000".into() };
        assert_eq!(good.socket_addr(), Ok("127.0.0.1:7000".parse().unwrap()));
        let node = MetaNode { name: "b".into(), addr: "not an address".into() };
        let err = node.socket_addr().unwrap_err();
        assert_eq!((err.name.as_str(), err.addr.as_str()), ("b", "not an address"));
        assert!(err.to_string().starts_with("member b@not an address: bad address: "), "{err}");
    }
}
