//! The HTTP API (axum): cluster views, health, readiness and metrics.
//!
//! - `GET /v1/cluster/members`: `{"self":"n1","members":[{"name","addr","http","state","incarnation"}]}`
//! - `GET /v1/cluster/peers`: smoothed RTT per connected peer
//! - `GET /healthz`: 200 while the node runs
//! - `GET /readyz`: 200 once the node has joined a cluster (or formed one alone), else 503
//! - `GET /metrics`: Prometheus text
//! - signals, subscriptions, dead letters and traces (`POST /v1/signals`, `/v1/subscriptions`,
//!   `GET /v1/deadletters`, `GET /v1/signals/{id}/trace`, `GET /v1/interest`)
//! - agent calls, lookups, state, stops and reminders (`/v1/agents/{type}/{id}...`), the cluster's
//!   shards and members (`GET /v1/cluster`, [`ClusterJson`])
//!
//! The server is started by the node (`[net] http_addr`); public here are a minimal [`client`]
//! and the JSON bodies it reads ([`MembersJson`], [`ClusterJson`]).
//!
//! Connections are limited by `API_CONNECTIONS_MAX` (more wait in the kernel's accept backlog) and
//! requests in flight by `API_REQUESTS_IN_FLIGHT_MAX` (more wait for a slot).

pub(crate) mod agents;
pub mod client;
pub(crate) mod reminders;
pub(crate) mod signals;

pub use crate::cluster::replica::SyncStatus;
pub use crate::membership::MemberState;
pub use agents::{ClusterJson, ClusterMemberJson};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::warn;

use crate::membership::task::Membership;
use crate::metrics::Metrics;
use crate::net::Transport;

/// Requests handled at once; further requests wait.
pub const API_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// HTTP connections open at once; further connections are not accepted until one closes.
pub const API_CONNECTIONS_MAX: usize = 1024;
/// A connection that reads and writes nothing for this long is closed (idle keep-alive, a client
/// that never finishes its request headers).
pub const API_CONN_IDLE_TIMEOUT_MS: u64 = 30_000;

/// What the handlers reach: the node's layers and its API settings.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub membership: Membership,
    pub transport: Transport,
    pub metrics: Metrics,
    pub bus: crate::bus::Bus,
    pub ingress_body_bytes_max: usize,
    pub cluster: crate::cluster::Cluster,
    #[allow(dead_code)] // Set by the node, read by no handler yet.
    pub node_name: String,
    pub call_timeout: Duration,
}

/// One member as shown by `GET /v1/cluster/members`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberJson {
    /// The member's node name.
    pub name: String,
    /// Its transport address.
    pub addr: SocketAddr,
    /// Its HTTP API address, if it serves one.
    pub http: Option<SocketAddr>,
    /// Its state as the answering node sees it.
    pub state: MemberState,
    /// Its incarnation: grows every time the member refutes a suspicion or restarts.
    pub incarnation: u64,
}

/// The body of `GET /v1/cluster/members`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MembersJson {
    /// The answering node's name (`"self"` in JSON).
    #[serde(rename = "self")]
    pub self_name: String,
    /// The members the answering node knows, itself included.
    pub members: Vec<MemberJson>,
}

/// One connected peer as shown by `GET /v1/cluster/peers`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerJson {
    /// The peer's transport address.
    pub addr: SocketAddr,
    /// Smoothed round-trip time to it, in microseconds.
    pub rtt_us: f64,
}

/// The API's routes.
pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/cluster", get(agents::cluster))
        .route("/v1/cluster/members", get(members))
        .route("/v1/cluster/peers", get(peers))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/signals", axum::routing::post(signals::post_signals))
        .route("/v1/signals/{id}/trace", get(signals::trace))
        .route("/v1/subscriptions", get(signals::list_subscriptions).post(signals::post_subscription))
        .route("/v1/subscriptions/{id}", axum::routing::delete(signals::delete_subscription))
        .route("/v1/deadletters", get(signals::deadletters))
        .route("/v1/interest", get(signals::interest))
        .route("/v1/agents/{type}", get(agents::list))
        .route("/v1/agents/{type}/{id}", get(agents::lookup).post(agents::call).delete(agents::stop))
        .route("/v1/agents/{type}/{id}/state", get(agents::state))
        .route("/v1/agents/{type}/{id}/reminders", get(reminders::list))
        .route("/v1/agents/{type}/{id}/reminders/{name}", axum::routing::put(reminders::put).delete(reminders::delete))
        .fallback(signals::not_found)
        .method_not_allowed_fallback(signals::method_not_allowed)
        .layer(tower::limit::ConcurrencyLimitLayer::new(API_REQUESTS_IN_FLIGHT_MAX))
        .with_state(state)
}

/// Time open HTTP connections get to finish after shutdown starts; then they are dropped (a client
/// that never completes its request cannot hold the node up).
pub const API_SHUTDOWN_GRACE_MS: u64 = 2000;

/// Serves the API on `listener` until `cancel`, then for at most [`API_SHUTDOWN_GRACE_MS`].
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: ApiState, cancel: CancellationToken) {
    let app = router(state);
    // Cancelled after the shutdown grace time: every connection's IO then fails, which ends the
    // per-connection tasks axum spawned (dropping the server future alone would not).
    let kill = CancellationToken::new();
    let listener = LimitedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(API_CONNECTIONS_MAX)),
        kill: kill.clone(),
        idle: Duration::from_millis(API_CONN_IDLE_TIMEOUT_MS),
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned());
    let deadline = async {
        cancel.cancelled().await;
        tokio::time::sleep(Duration::from_millis(API_SHUTDOWN_GRACE_MS)).await;
    };
    tokio::select! {
        res = server => {
            if let Err(e) = res {
                warn!(error = %e, "http server stopped");
            }
        }
        _ = deadline => warn!("http connections still open after the shutdown grace time; closing them"),
    }
    kill.cancel();
}

async fn members(State(s): State<ApiState>) -> Json<MembersJson> {
    let view = s.membership.view();
    let members = view
        .members
        .iter()
        .map(|m| MemberJson {
            name: m.meta.name.clone(),
            addr: m.meta.addr,
            http: m.meta.http,
            state: m.state,
            incarnation: m.meta.incarnation,
        })
        .collect();
    Json(MembersJson { self_name: view.me.name, members })
}

async fn peers(State(s): State<ApiState>) -> Json<Vec<PeerJson>> {
    let peers = s.transport.peer_rtts();
    Json(peers.into_iter().map(|(addr, rtt)| PeerJson { addr, rtt_us: rtt.as_secs_f64() * 1e6 }).collect())
}

async fn readyz(State(s): State<ApiState>) -> impl IntoResponse {
    if s.membership.view().joined {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "joining\n")
    }
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    s.transport.refresh_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// A TCP listener that holds a semaphore permit per open connection.
struct LimitedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
    kill: CancellationToken,
    idle: Duration,
}

/// A connection and its permit; the permit returns when the connection is dropped. Its IO fails
/// once `kill` fires or after `idle` without any byte read or written.
struct LimitedIo {
    io: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl LimitedIo {
    /// Fails the IO if the connection was killed or has been idle too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        if self.kill.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "node shutting down"));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "http connection idle"));
        }
        Ok(())
    }

    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, SocketAddr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        // axum's TcpListener impl retries (and logs) accept errors itself.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let io = LimitedIo {
            io,
            _permit: permit,
            kill: Box::pin(self.kill.clone().cancelled_owned()),
            idle: self.idle,
            deadline: Box::pin(tokio::time::sleep(self.idle)),
        };
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        res
    }
}

impl LimitedIo {
    /// A write through the idle and kill checks; bytes written count as activity.
    fn guarded_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut tokio::net::TcpStream>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let res = write(Pin::new(&mut self.io), cx);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        res
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.guarded_write(cx, |io, cx| io.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.guarded_write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_closes() {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut l = LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(1)),
            kill: CancellationToken::new(),
            idle: Duration::from_secs(60),
        };
        let _c1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _c2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        {
            let second = l.accept();
            tokio::pin!(second);
            assert!(futures::poll!(second.as_mut()).is_pending(), "no permit left");
            drop(first);
            let (_io, _) = second.await;
        }
    }

    #[tokio::test]
    async fn killed_or_idle_connections_fail_their_io() {
        use tokio::io::AsyncReadExt;
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let kill = CancellationToken::new();
        let mut l = LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(4)),
            kill: kill.clone(),
            idle: Duration::from_millis(50),
        };
        let _c1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut idle_io, _) = l.accept().await;
        let err = idle_io.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let _c2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        let reading = tokio::spawn(async move { io.read(&mut [0u8; 8]).await });
        kill.cancel();
        assert_eq!(reading.await.unwrap().unwrap_err().kind(), std::io::ErrorKind::ConnectionAborted);
    }
}
