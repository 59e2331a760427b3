//! Connection handshake: cluster name and shared secret, checked by HMAC challenge-response.
//!
//! ```text
//! dialer                                   acceptor
//!   Hello{version, cluster, name, listen, lane, nonce_d} ->
//!                                          checks version and cluster
//!   <- Challenge{name, nonce_a, mac_a = HMAC(secret, "acceptor", cluster, nonce_d, nonce_a, name)}
//!   checks mac_a (the acceptor knows the secret)
//!   Auth{mac_d = HMAC(secret, "dialer", cluster, nonce_a, nonce_d, name, listen, lane)} ->
//!                                          checks mac_d (the dialer knows the secret)
//!   <- Welcome
//! ```
//!
//! Both sides prove knowledge of the secret without sending it, and fresh nonces on both sides
//! stop replays. Each MAC covers the claimed names (and the dialer's listen address and lane), so
//! they cannot be altered in flight. Anyone who connects obtains a MAC it could attack offline,
//! which is why secrets must be long (see `SECRET_LEN_MIN_BYTES`). Frames after the handshake are
//! not authenticated: integrity against an on-path attacker needs TLS. Any failure is a typed [`HandshakeError`]; the caller logs and counts it
//! and closes the connection. Left out: confidentiality (use private networks, or mTLS later).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BoxRead, BoxWrite, PeerInfo};
use crate::wire::{self, Handshake, Lane, RefuseReason, MAC_LEN, NONCE_LEN, WIRE_VERSION};

/// Largest handshake frame accepted (names and addresses are short).
pub const HANDSHAKE_FRAME_LEN_MAX: usize = 1024;

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("refused: {}", .0.as_str())]
    Refused(RefuseReason),
    #[error("peer refused us: {}", .0.as_str())]
    RefusedByPeer(RefuseReason),
    #[error("handshake timed out")]
    Timeout,
    #[error("connection closed during handshake")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Refused(r) | HandshakeError::RefusedByPeer(r) => r.as_str(),
            HandshakeError::Timeout => "timeout",
            HandshakeError::Closed => "closed",
            HandshakeError::Io(_) => "io",
        }
    }
}

/// What both sides need to know to run a handshake.
pub struct Credentials<'a> {
    pub cluster: &'a str,
    pub secret: &'a [u8],
    pub local: &'a PeerInfo,
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn mac_eq(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    // Constant time: no early exit on the first differing byte.
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn acceptor_mac(c: &Credentials<'_>, nonce_d: &[u8], nonce_a: &[u8], acceptor_name: &str) -> [u8; MAC_LEN] {
    mac(c.secret, &[b"acceptor", c.cluster.as_bytes(), nonce_d, nonce_a, acceptor_name.as_bytes()])
}

fn dialer_mac(
    secret: &[u8],
    cluster: &str,
    nonce_a: &[u8],
    nonce_d: &[u8],
    name: &str,
    listen: SocketAddr,
    lane: Lane,
) -> [u8; MAC_LEN] {
    let listen = listen.to_string();
    mac(
        secret,
        &[
            b"dialer",
            cluster.as_bytes(),
            nonce_a,
            nonce_d,
            name.as_bytes(),
            listen.as_bytes(),
            lane.as_str().as_bytes(),
        ],
    )
}

async fn send(w: &mut BoxWrite, msg: &Handshake) -> Result<(), HandshakeError> {
    let mut buf = BytesMut::new();
    wire::encode_handshake(&mut buf, msg);
    w.write_all(&buf).await?;
    Ok(())
}

async fn recv(r: &mut BoxRead, buf: &mut BytesMut) -> Result<Handshake, HandshakeError> {
    loop {
        match wire::take_frame(buf, HANDSHAKE_FRAME_LEN_MAX) {
            Ok(Some(frame)) => {
                return wire::decode_handshake(&frame).map_err(|_| HandshakeError::Refused(RefuseReason::Malformed))
            }
            Ok(None) => {}
            Err(_) => return Err(HandshakeError::Refused(RefuseReason::Malformed)),
        }
        buf.reserve(HANDSHAKE_FRAME_LEN_MAX);
        if r.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// Runs the dialer side. On success returns the acceptor's name and any bytes read past the
/// handshake (the caller keeps reading from them).
pub async fn dial(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    creds: &Credentials<'_>,
    lane: Lane,
    nonce_d: [u8; NONCE_LEN],
    timeout: Duration,
) -> Result<(String, BytesMut), HandshakeError> {
    tokio::time::timeout(timeout, dial_inner(r, w, creds, lane, nonce_d)).await.map_err(|_| HandshakeError::Timeout)?
}

async fn dial_inner(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    c: &Credentials<'_>,
    lane: Lane,
    nonce_d: [u8; NONCE_LEN],
) -> Result<(String, BytesMut), HandshakeError> {
    let hello = Handshake::Hello {
        version: WIRE_VERSION,
        cluster: c.cluster.to_string(),
        name: c.local.name.to_string(),
        listen: c.local.addr,
        lane,
        nonce: nonce_d,
    };
    send(w, &hello).await?;
    let mut buf = BytesMut::with_capacity(HANDSHAKE_FRAME_LEN_MAX);
    let acceptor_ok;
    let (name, nonce_a) = match recv(r, &mut buf).await? {
        Handshake::Challenge { name, nonce, mac } => {
            acceptor_ok = mac_eq(&mac, &acceptor_mac(c, &nonce_d, &nonce, &name));
            (name, nonce)
        }
        Handshake::Refused { reason } => return Err(HandshakeError::RefusedByPeer(reason)),
        _ => return Err(HandshakeError::Refused(RefuseReason::Malformed)),
    };
    let mac_d = dialer_mac(c.secret, c.cluster, &nonce_a, &nonce_d, &c.local.name, c.local.addr, lane);
    // Even when the acceptor's proof is wrong we answer, so that both sides log the refusal.
    send(w, &Handshake::Auth { mac: mac_d }).await?;
    if !acceptor_ok {
        return Err(HandshakeError::Refused(RefuseReason::WrongSecret));
    }
    match recv(r, &mut buf).await? {
        Handshake::Welcome => Ok((name, buf)),
        Handshake::Refused { reason } => Err(HandshakeError::RefusedByPeer(reason)),
        _ => Err(HandshakeError::Refused(RefuseReason::Malformed)),
    }
}

/// Runs the acceptor side. On success returns the authenticated dialer, its lane and any bytes
/// read past the handshake.
pub async fn accept(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    creds: &Credentials<'_>,
    nonce_a: [u8; NONCE_LEN],
    timeout: Duration,
) -> Result<(PeerInfo, Lane, BytesMut), HandshakeError> {
    tokio::time::timeout(timeout, accept_inner(r, w, creds, nonce_a)).await.map_err(|_| HandshakeError::Timeout)?
}

async fn refuse(w: &mut BoxWrite, reason: RefuseReason) -> HandshakeError {
    // Best effort: the peer may already be gone.
    let _ = send(w, &Handshake::Refused { reason }).await;
    HandshakeError::Refused(reason)
}

async fn accept_inner(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    c: &Credentials<'_>,
    nonce_a: [u8; NONCE_LEN],
) -> Result<(PeerInfo, Lane, BytesMut), HandshakeError> {
    let mut buf = BytesMut::with_capacity(HANDSHAKE_FRAME_LEN_MAX);
    let hello = match recv(r, &mut buf).await {
        Ok(h) => h,
        Err(HandshakeError::Refused(reason)) => return Err(refuse(w, reason).await),
        Err(e) => return Err(e),
    };
    let Handshake::Hello { version, cluster, name, listen, lane, nonce: nonce_d } = hello else {
        return Err(refuse(w, RefuseReason::Malformed).await);
    };
    if version != WIRE_VERSION {
        return Err(refuse(w, RefuseReason::UnsupportedVersion).await);
    }
    if cluster != c.cluster {
        return Err(refuse(w, RefuseReason::WrongCluster).await);
    }
    let challenge = Handshake::Challenge {
        name: c.local.name.to_string(),
        nonce: nonce_a,
        mac: acceptor_mac(c, &nonce_d, &nonce_a, &c.local.name),
    };
    send(w, &challenge).await?;
    let Handshake::Auth { mac } = recv(r, &mut buf).await? else {
        return Err(refuse(w, RefuseReason::Malformed).await);
    };
    if !mac_eq(&mac, &dialer_mac(c.secret, c.cluster, &nonce_a, &nonce_d, &name, listen, lane)) {
        return Err(refuse(w, RefuseReason::WrongSecret).await);
    }
    send(w, &Handshake::Welcome).await?;
    Ok((PeerInfo { name: name.into(), addr: listen }, lane, buf))
}
