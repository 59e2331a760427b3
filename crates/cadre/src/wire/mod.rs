//! Node-to-node envelopes and their framing.
//!
//! A connection carries length-delimited frames: a 4-byte big-endian body length, then the body.
//! The first frames of a connection are [`Handshake`] messages, one per frame. After the
//! handshake every frame body is `version` (postcard varint) followed by one or more postcard
//! encoded [`Msg`]s back to back; a writer packs as many queued messages as fit into one frame,
//! which is where batching comes from. Postcard has no field tags, so the version is the only
//! way a receiver can tell layouts apart: a frame with an unknown version is refused.
//!
//! Decoding never panics on bad input: a frame longer than the limit, a body that does not parse
//! or an unknown version returns a [`WireError`], and the caller closes that connection.
//! Payloads of decoded messages are zero-copy slices of the frame buffer.
//!
//! What an ask's payload carries (agent, replica, pub/sub or application request) is told by its
//! [`envelope`].
//!
//! Left out: compression and encryption (loopback and private networks first; mTLS is a later
//! option of the handshake).

pub mod envelope;

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version of the frame layout and message set spoken by this build (2: every data-lane ask
/// starts with its [`envelope::Kind`], application asks too; 3: a refused route travels as a
/// typed reason, not as text).
pub const WIRE_VERSION: u16 = 3;
/// Length prefix of every frame.
pub const FRAME_HEADER_LEN: usize = 4;
/// Upper bound on the encoding overhead of one message besides its payload (tag, ids, lengths).
pub const MSG_OVERHEAD_MAX_BYTES: usize = 32;
/// Length of handshake nonces.
pub const NONCE_LEN: usize = 16;
/// Length of handshake MACs (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Which connection a message travels on. Membership and consensus use `Control` so they never
/// queue behind bulk `Data`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Control,
    Data,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Control, Lane::Data];
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::Data => "data",
        }
    }
}

/// Why a handshake was refused.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    WrongCluster,
    WrongSecret,
    UnsupportedVersion,
    Malformed,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::WrongCluster => "wrong_cluster",
            RefuseReason::WrongSecret => "wrong_secret",
            RefuseReason::UnsupportedVersion => "unsupported_version",
            RefuseReason::Malformed => "malformed",
        }
    }
}

/// Handshake messages, one per frame, in this order: dialer `Hello`, acceptor `Challenge`,
/// dialer `Auth`, acceptor `Welcome` (or `Refused` at any step).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    Hello { version: u16, cluster: String, name: String, listen: SocketAddr, lane: Lane, nonce: [u8; NONCE_LEN] },
    Challenge { name: String, nonce: [u8; NONCE_LEN], mac: [u8; MAC_LEN] },
    Auth { mac: [u8; MAC_LEN] },
    Welcome,
    Refused { reason: RefuseReason },
}

/// A message after the handshake. `P` is `Bytes` when sending and `&[u8]` when decoding; both
/// encode the same way.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Msg<P> {
    /// A SWIM packet for the membership layer.
    Membership(P),
    /// The sender leaves the cluster on purpose (its identity's incarnation).
    Leave {
        incarnation: u64,
    },
    /// RTT probe; answered with `Pong` on the same connection.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// One-way application message.
    Tell(P),
    /// Request expecting a `Reply` with the same id.
    Ask {
        id: u64,
        payload: P,
    },
    Reply {
        id: u64,
        payload: P,
    },
}

/// An owned outgoing message.
pub type OutMsg = Msg<Bytes>;

impl<P: AsRef<[u8]>> Msg<P> {
    /// Bytes of payload carried (used for size checks and metrics).
    pub fn payload_len(&self) -> usize {
        match self {
            Msg::Membership(p) | Msg::Tell(p) => p.as_ref().len(),
            Msg::Ask { payload, .. } | Msg::Reply { payload, .. } => payload.as_ref().len(),
            Msg::Leave { .. } | Msg::Ping { .. } | Msg::Pong { .. } => 0,
        }
    }
}

impl Msg<&[u8]> {
    /// Converts borrowed payloads into zero-copy slices of `frame`, which must contain them.
    pub fn into_owned_in(self, frame: &Bytes) -> OutMsg {
        match self {
            Msg::Membership(p) => Msg::Membership(frame.slice_ref(p)),
            Msg::Tell(p) => Msg::Tell(frame.slice_ref(p)),
            Msg::Ask { id, payload } => Msg::Ask { id, payload: frame.slice_ref(payload) },
            Msg::Reply { id, payload } => Msg::Reply { id, payload: frame.slice_ref(payload) },
            Msg::Leave { incarnation } => Msg::Leave { incarnation },
            Msg::Ping { nonce } => Msg::Ping { nonce },
            Msg::Pong { nonce } => Msg::Pong { nonce },
        }
    }
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame")]
    EmptyFrame,
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Appends postcard output straight into a `BytesMut`.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.put_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn put_postcard<T: Serialize + ?Sized>(buf: &mut BytesMut, value: &T) {
    // Serializing our own types into a growable buffer cannot fail.
    postcard::serialize_with_flavor(value, BytesMutFlavor(buf)).expect("postcard into BytesMut");
}

/// Encodes one handshake message as a complete frame.
pub fn encode_handshake(buf: &mut BytesMut, msg: &Handshake) {
    let start = buf.len();
    buf.put_u32(0);
    put_postcard(buf, msg);
    let len = (buf.len() - start - FRAME_HEADER_LEN) as u32;
    buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Decodes a handshake frame body.
pub fn decode_handshake(body: &[u8]) -> Result<Handshake, WireError> {
    postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Largest message payload that fits in a frame of `frame_len_max` bytes (after the version tag
/// and the message's own overhead).
pub fn payload_len_max(frame_len_max: usize) -> usize {
    frame_len_max - MSG_OVERHEAD_MAX_BYTES - 4
}

/// Builds frames of messages into a buffer; several frames may share one buffer (one syscall).
pub struct FrameWriter {
    frame_len_max: usize,
    /// Offset of the open frame's length prefix, if a frame is open.
    open: Option<usize>,
    /// Frames closed so far (for metrics).
    pub frames: u64,
    /// Messages encoded so far (for metrics).
    pub msgs: u64,
}

impl FrameWriter {
    pub fn new(frame_len_max: usize) -> Self {
        assert!(frame_len_max > MSG_OVERHEAD_MAX_BYTES + FRAME_HEADER_LEN);
        Self { frame_len_max, open: None, frames: 0, msgs: 0 }
    }

    /// Largest payload that fits in one frame.
    pub fn payload_len_max(&self) -> usize {
        payload_len_max(self.frame_len_max)
    }

    /// Appends `msg`, opening a new frame when the open one has no room for it.
    /// The caller has checked `payload_len() <= payload_len_max()`.
    pub fn push<P: AsRef<[u8]> + Serialize>(&mut self, buf: &mut BytesMut, msg: &Msg<P>) {
        let need = msg.payload_len() + MSG_OVERHEAD_MAX_BYTES;
        assert!(msg.payload_len() <= self.payload_len_max(), "oversized message reached the writer");
        if let Some(start) = self.open {
            if buf.len() - start - FRAME_HEADER_LEN + need > self.frame_len_max {
                self.close(buf);
            }
        }
        if self.open.is_none() {
            self.open = Some(buf.len());
            buf.put_u32(0);
            put_postcard(buf, &WIRE_VERSION);
        }
        put_postcard(buf, msg);
        self.msgs += 1;
    }

    /// Closes the open frame, if any, by writing its length.
    pub fn close(&mut self, buf: &mut BytesMut) {
        if let Some(start) = self.open.take() {
            let len = buf.len() - start - FRAME_HEADER_LEN;
            debug_assert!(len <= self.frame_len_max);
            buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
            self.frames += 1;
        }
    }
}

/// Splits complete frames off a read buffer.
///
/// Returns `Ok(None)` when more bytes are needed, and an error (the connection must be closed)
/// when the announced length exceeds `frame_len_max`.
pub fn take_frame(buf: &mut BytesMut, frame_len_max: usize) -> Result<Option<Bytes>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..FRAME_HEADER_LEN].try_into().expect("4 bytes")) as usize;
    if len > frame_len_max {
        return Err(WireError::FrameTooLarge { len, max: frame_len_max });
    }
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(FRAME_HEADER_LEN + len);
    let _ = frame.split_to(FRAME_HEADER_LEN);
    Ok(Some(frame.freeze()))
}

/// Decodes a message frame body, calling `f` for every message with zero-copy payloads.
/// Returns the number of messages. On error, messages before the bad one have been delivered.
pub fn decode_frame(body: &Bytes, mut f: impl FnMut(OutMsg)) -> Result<usize, WireError> {
    let malformed = |e: postcard::Error| WireError::Malformed(e.to_string());
    let (version, mut rest) = postcard::take_from_bytes::<u16>(body).map_err(malformed)?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    if rest.is_empty() {
        return Err(WireError::EmptyFrame);
    }
    let mut count = 0;
    while !rest.is_empty() {
        let (msg, tail) = postcard::take_from_bytes::<Msg<&[u8]>>(rest).map_err(malformed)?;
        f(msg.into_owned_in(body));
        rest = tail;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(msgs: &[OutMsg], frame_len_max: usize) -> (Vec<OutMsg>, u64) {
        let mut w = FrameWriter::new(frame_len_max);
        let mut buf = BytesMut::new();
        for m in msgs {
            w.push(&mut buf, m);
        }
        w.close(&mut buf);
        let mut out = Vec::new();
        let mut frames = 0;
        while let Some(frame) = take_frame(&mut buf, frame_len_max).unwrap() {
            decode_frame(&frame, |m| out.push(m)).unwrap();
            frames += 1;
        }
        assert!(buf.is_empty());
        assert_eq!(frames, w.frames);
        (out, frames)
    }

    fn arb_msg() -> impl Strategy<Value = OutMsg> {
        let payload = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            payload.clone().prop_map(Msg::Membership),
            payload.clone().prop_map(Msg::Tell),
            (any::<u64>(), payload.clone()).prop_map(|(id, payload)| Msg::Ask { id, payload }),
            (any::<u64>(), payload).prop_map(|(id, payload)| Msg::Reply { id, payload }),
            any::<u64>().prop_map(|incarnation| Msg::Leave { incarnation }),
            any::<u64>().prop_map(|nonce| Msg::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Msg::Pong { nonce }),
        ]
    }

    proptest! {
        #[test]
        fn messages_roundtrip_through_frames(msgs in proptest::collection::vec(arb_msg(), 0..64)) {
            let (out, _) = roundtrip(&msgs, 4096);
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = take_frame(&mut buf, 1024) {
                let _ = decode_frame(&frame, |_| {});
                let _ = decode_handshake(&frame);
            }
        }
    }

    #[test]
    fn many_small_messages_share_frames() {
        let msgs: Vec<OutMsg> = (0..1000).map(|_| Msg::Tell(Bytes::from(vec![7u8; 100]))).collect();
        let (out, frames) = roundtrip(&msgs, 64 * 1024);
        assert_eq!(out.len(), 1000);
        assert!(frames <= 2, "{frames} frames");
    }

    #[test]
    fn oversized_and_bad_frames_are_errors() {
        let mut buf = BytesMut::new();
        buf.put_u32(10_000);
        assert_eq!(take_frame(&mut buf, 1024), Err(WireError::FrameTooLarge { len: 10_000, max: 1024 }));
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        assert_eq!(take_frame(&mut buf, 1024), Err(WireError::EmptyFrame));
        let mut body = BytesMut::new();
        put_postcard(&mut body, &(WIRE_VERSION + 1));
        body.put_u8(0);
        assert_eq!(decode_frame(&body.freeze(), |_| {}), Err(WireError::UnsupportedVersion(WIRE_VERSION + 1)));
        let bad = Bytes::from(vec![WIRE_VERSION as u8, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_frame(&bad, |_| {}), Err(WireError::Malformed(_))));
    }

    #[test]
    fn handshake_roundtrip() {
        let hello = Handshake::Hello {
            version: WIRE_VERSION,
            cluster: "c".into(),
            name: "n1".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            lane: Lane::Data,
            nonce: [3; NONCE_LEN],
        };
        let mut buf = BytesMut::new();
        encode_handshake(&mut buf, &hello);
        let frame = take_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(decode_handshake(&frame).unwrap(), hello);
    }
}
