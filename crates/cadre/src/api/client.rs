//! A minimal HTTP/1.1 client for the node API (used by `cadre status`, the demo and tests).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper_util::rt::TokioIo;

use super::MembersJson;

/// Largest response body read.
const BODY_LEN_MAX_BYTES: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The connect error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (handshake, request, connection lost).
    #[error("http: {0}")]
    Http(String),
    /// No complete response within the timeout.
    #[error("request to {0} timed out")]
    Timeout(SocketAddr),
    /// A status other than 200 where a JSON body was expected ([`members`], [`cluster`]).
    #[error("unexpected status {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The response body, lossily decoded as UTF-8.
        body: String,
    },
    /// The body could not be read (over 16 MiB, cut short) or decoded.
    #[error("bad response body: {0}")]
    Body(String),
}

/// `GET path` on `addr`; returns the status code and body.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Bytes), ClientError> {
    request(addr, Method::GET, path, &[], Bytes::new(), timeout).await
}

/// `POST path` with a body of `content_type`; returns the status code and body.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    request(addr, Method::POST, path, &[("content-type", content_type)], body, timeout).await
}

/// `DELETE path` on `addr`; returns the status code and body.
pub async fn delete(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Bytes), ClientError> {
    request(addr, Method::DELETE, path, &[], Bytes::new(), timeout).await
}

/// One request on a new connection, with extra `headers`; returns the status code and body. The
/// whole exchange is bounded by `timeout` ([`ClientError::Timeout`]).
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    tokio::time::timeout(timeout, request_inner(addr, method, path, headers, body))
        .await
        .map_err(|_| ClientError::Timeout(addr))?
}

async fn request_inner(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, Bytes), ClientError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).map_err(|e| ClientError::Http(e.to_string()))?;
    let res = sender.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
    let status = res.status().as_u16();
    let body = http_body_util::Limited::new(res.into_body(), BODY_LEN_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| ClientError::Body(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// `GET /v1/cluster/members`.
pub async fn members(addr: SocketAddr, timeout: Duration) -> Result<MembersJson, ClientError> {
    let (status, body) = get(addr, "/v1/cluster/members", timeout).await?;
    if status != 200 {
        return Err(ClientError::Status { status, body: String::from_utf8_lossy(&body).into_owned() });
    }
    serde_json::from_slice(&body).map_err(|e| ClientError::Body(e.to_string()))
}

/// `GET /v1/cluster`: leader, shards and agents per member.
pub async fn cluster(addr: SocketAddr, timeout: Duration) -> Result<super::ClusterJson, ClientError> {
    let (status, body) = get(addr, "/v1/cluster", timeout).await?;
    if status != 200 {
        return Err(ClientError::Status { status, body: String::from_utf8_lossy(&body).into_owned() });
    }
    serde_json::from_slice(&body).map_err(|e| ClientError::Body(e.to_string()))
}
