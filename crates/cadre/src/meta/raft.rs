//! The openraft binding: type configuration, a runtime with a seedable RNG, and the network over
//! the node transport's control lane.
//!
//! ## Network
//! Every Raft RPC is one transport ask on [`Lane::Control`]: a postcard-encoded [`ControlReq`]
//! answered by a [`ControlReply`]. Snapshots travel whole in one `FullSnapshot` ask
//! (`generic-snapshot-data`), so a snapshot must fit one frame (`net.frame_len_max_bytes`); with the
//! default 1 MiB frames that bounds the shard table at tens of thousands of shards. A transport
//! failure (queue full, timeout, peer gone, oversized message) is reported to openraft as
//! `Unreachable`, which makes it back off; a remote Raft error is passed through as `RemoteError`.
//!
//! ## Determinism
//! openraft draws election timeouts from the runtime's thread-local RNG. [`SeededRuntime`] is
//! tokio's runtime with that RNG replaced by a seedable one ([`seed_rng`]), so a simulation that
//! seeds it replays the same elections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AsyncRuntime, OptionalSend, RaftNetwork, RaftNetworkFactory, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::{Cmd, CmdOutcome, MetaError, MetaState};
use crate::cluster::protocol::ControlError;
use crate::net::WeakTransport;
use crate::wire::Lane;

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

// ------------------------------------------------------------------------------------------------
// Messages on the control lane

/// A Raft RPC.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TC>),
    Vote(VoteRequest<NodeId>),
    FullSnapshot { vote: Vote<NodeId>, meta: SnapshotMeta<NodeId, MetaNode>, data: MetaState },
}

/// A request on the control lane (Raft RPCs and the placement protocol).
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReq {
    /// For the Raft node `to`: a node that restarted with a new id (lost data dir) refuses RPCs
    /// meant for its old one.
    Raft { to: NodeId, rpc: RaftRpc },
    /// A node renews its lease (and asks to be admitted); answered by the leader only.
    Renew(crate::cluster::protocol::RenewReq),
    /// An old owner reports a finished hand-off; answered by the leader only.
    HandedOff { shard: u32, epoch: u64 },
    /// A member leaves gracefully: hand its shards over; answered by the leader only.
    Drain { name: String },
    /// A shard owner's replica reports, batched (at most [`crate::meta::BATCH_CMDS_MAX`]);
    /// answered by the leader only, one result per report.
    Replicas(Vec<ReplicaReport>),
    /// Adds (`Some`) or removes a cluster-wide agent route; answered by the leader only.
    Route(RouteChange),
}

/// A change of the cluster-wide agent routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    Add(crate::meta::AgentRoute),
    Remove(u64),
}

/// A replica that missed a write (`in_sync: false`) or that its owner caught up (`true`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub shard: u32,
    pub epoch: u64,
    pub node: String,
    pub in_sync: bool,
    /// The replica's, when its catch-up began (for `in_sync: true`).
    pub generation: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    FullSnapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    Renew(crate::cluster::protocol::RenewReply),
    HandedOff(Result<(), ControlError>),
    Drain(Result<(), ControlError>),
    /// The batch's outcome, or one result per report.
    Replicas(Result<Vec<Result<(), MetaError>>, ControlError>),
    /// The route's id (added), or whether one was removed.
    Route(Result<u64, ControlError>),
    /// The request could not be decoded or served.
    Refused(String),
}

pub fn encode<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain data types into a Vec cannot fail.
    Bytes::from(postcard::to_allocvec(v).expect("control message serializes"))
}

/// Serves a Raft RPC addressed to `me`. A snapshot that breaks the metadata's invariants is
/// refused (counted in `snapshots_refused`, logged) and this node keeps the state it has: the
/// sender's next attempt may carry a sound one.
pub async fn serve(
    raft: &Raft,
    me: NodeId,
    to: NodeId,
    rpc: RaftRpc,
    snapshots_refused: &prometheus_client::metrics::counter::Counter,
) -> ControlReply {
    if to != me {
        return ControlReply::Refused(format!("this node is Raft member {me}, not {to}"));
    }
    match rpc {
        RaftRpc::Append(r) => ControlReply::Append(raft.append_entries(r).await),
        RaftRpc::Vote(r) => ControlReply::Vote(raft.vote(r).await),
        RaftRpc::FullSnapshot { vote, meta, data } => {
            if let Err(e) = data.check_invariants() {
                snapshots_refused.inc();
                tracing::warn!(snapshot = %meta.snapshot_id, error = %e, "refused a metadata snapshot that breaks its invariants");
                return ControlReply::Refused(format!("snapshot {} refused: {e}", meta.snapshot_id));
            }
            let snapshot = Snapshot { meta, snapshot: Box::new(data) };
            ControlReply::FullSnapshot(raft.install_full_snapshot(vote, snapshot).await)
        }
    }
}

/// Sends one control request and decodes the reply.
pub async fn ask(
    transport: &WeakTransport,
    to: SocketAddr,
    req: &ControlReq,
    timeout: Duration,
) -> Result<ControlReply, ControlError> {
    let t = transport.upgrade().ok_or(ControlError::ShuttingDown)?;
    let bytes = t.ask_on(Lane::Control, to, encode(req), timeout).await;
    drop(t);
    let bytes = bytes.map_err(|e| ControlError::Transport(e.to_string()))?;
    postcard::from_bytes(&bytes).map_err(|e| ControlError::Protocol(format!("undecodable control reply: {e}")))
}

// ------------------------------------------------------------------------------------------------
// openraft's network

/// A member's current address by name (from gossip), if known.
pub type Resolver = Arc<dyn Fn(&str) -> Option<SocketAddr> + Send + Sync>;

/// Makes one [`NetClient`] per target.
#[derive(Clone)]
pub struct NetFactory {
    pub transport: WeakTransport,
    /// Preferred over the address in the Raft membership, which is the one a member had when it
    /// was added: after a whole-cluster restart on new addresses, that one is stale.
    pub resolve: Resolver,
}

pub struct NetClient {
    transport: WeakTransport,
    target: NodeId,
    name: String,
    resolve: Resolver,
    addr: Result<SocketAddr, BadAddress>,
}

/// A member whose address in the Raft membership does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("member {name}@{addr}: bad address: {source}")]
pub struct BadAddress {
    pub name: String,
    pub addr: String,
    pub source: std::net::AddrParseError,
}

impl RaftNetworkFactory<TC> for NetFactory {
    type Network = NetClient;
    async fn new_client(&mut self, target: NodeId, node: &MetaNode) -> NetClient {
        let addr = node.socket_addr();
        NetClient {
            transport: self.transport.clone(),
            target,
            name: node.name.clone(),
            resolve: self.resolve.clone(),
            addr,
        }
    }
}

/// Why a Raft RPC got no answer openraft can use.
#[derive(Debug, thiserror::Error)]
enum NetErr {
    #[error(transparent)]
    Address(#[from] BadAddress),
    #[error(transparent)]
    Ask(#[from] ControlError),
    /// The receiver refused the request ([`ControlReply::Refused`]).
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply kind")]
    BadReply,
    #[error("chunked snapshots are not used")]
    Chunked,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, MetaNode, RaftError<NodeId, E>>;

impl NetClient {
    async fn call(&self, rpc: RaftRpc, timeout: Duration) -> Result<ControlReply, NetErr> {
        // The Raft id in the request makes a process at that address that is not `target` refuse.
        let addr = match (self.resolve)(&self.name) {
            Some(a) => a,
            None => self.addr.clone()?,
        };
        let req = ControlReq::Raft { to: self.target, rpc };
        match ask(&self.transport, addr, &req, timeout).await? {
            ControlReply::Refused(why) => Err(NetErr::Refused(why)),
            reply => Ok(reply),
        }
    }
}

fn bad_reply() -> NetworkError {
    NetworkError::new(&NetErr::BadReply)
}

impl RaftNetwork<TC> for NetClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TC>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await {
            Ok(ControlReply::Append(Ok(r))) => Ok(r),
            Ok(ControlReply::Append(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(RPCError::Network(bad_reply())),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await {
            Ok(ControlReply::Vote(Ok(r))) => Ok(r),
            Ok(ControlReply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(RPCError::Network(bad_reply())),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    #[allow(deprecated)]
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TC>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        // With `generic-snapshot-data` openraft sends snapshots through `full_snapshot` only.
        Err(RPCError::Network(NetworkError::new(&NetErr::Chunked)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TC>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TC, Fatal<NodeId>>> {
        let req = RaftRpc::FullSnapshot { vote, meta: snapshot.meta, data: *snapshot.snapshot };
        match self.call(req, option.hard_ttl()).await {
            Ok(ControlReply::FullSnapshot(Ok(r))) => Ok(r),
            Ok(ControlReply::FullSnapshot(Err(e))) => {
                Err(StreamingError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(StreamingError::Network(bad_reply())),
            Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::{
        control_kind, ControlKind, EnvelopeError, CONTROL_RAFT, CONTROL_RENEW, CONTROL_VARIANTS,
    };

    /// The kind admission reads from a request's first byte, by variant (a new variant fails to
    /// compile here until it is given one).
    fn expected(req: &ControlReq) -> ControlKind {
        match req {
            ControlReq::Raft { .. } => ControlKind::Raft,
            ControlReq::Renew(_) => ControlKind::Renew,
            ControlReq::HandedOff { .. }
            | ControlReq::Drain { .. }
            | ControlReq::Replicas(_)
            | ControlReq::Route(_) => ControlKind::Other,
        }
    }

    #[test]
    fn the_control_kind_is_the_variant_index_of_the_encoded_request() {
        let renew =
            crate::cluster::protocol::RenewReq { name: "a".into(), addr: "x".into(), raft_id: 3, draining: false };
        let one_of_each = [
            ControlReq::Raft { to: 1, rpc: RaftRpc::Vote(VoteRequest::new(Vote::new(2, 1), None)) },
            ControlReq::Renew(renew),
            ControlReq::HandedOff { shard: 1, epoch: 2 },
            ControlReq::Drain { name: "a".into() },
            ControlReq::Replicas(vec![]),
            ControlReq::Route(RouteChange::Remove(7)),
        ];
        assert_eq!(one_of_each.len(), CONTROL_VARIANTS as usize);
        for (index, req) in one_of_each.iter().enumerate() {
            let bytes = encode(req);
            assert_eq!(bytes[0] as usize, index, "{req:?}");
            assert_eq!(control_kind(&bytes), Ok(expected(req)), "{req:?}");
        }
        assert_eq!((encode(&one_of_each[0])[0], encode(&one_of_each[1])[0]), (CONTROL_RAFT, CONTROL_RENEW));
        assert_eq!(control_kind(&[CONTROL_VARIANTS]), Err(EnvelopeError::UnknownKind(CONTROL_VARIANTS)));
    }

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
