//! The metadata group's network: every Raft RPC is one transport ask on [`Lane::Control`], a
//! postcard-encoded [`ControlReq::Raft`] answered by a [`ControlReply`]. Snapshots travel whole in
//! one `FullSnapshot` ask (`generic-snapshot-data`), so a snapshot must fit one frame
//! (`net.frame_len_max_bytes`); with the default 1 MiB frames that bounds the shard table at tens
//! of thousands of shards. A transport failure (queue full, timeout, peer gone, oversized message)
//! is reported to openraft as `Unreachable`, which makes it back off; a remote Raft error is passed
//! through as `RemoteError`.
//!
//! It lives with the cluster, not with the metadata: the control lane is the cluster's, and
//! [`crate::meta`] knows nothing of the transport.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetwork, RaftNetworkFactory, Snapshot, Vote};

use super::protocol::{encode, ControlError, ControlReply, ControlReq, RaftRpc};
use crate::meta::raft::{BadAddress, MetaNode, NodeId, Raft, TC};
use crate::net::WeakTransport;
use crate::wire::Lane;

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
