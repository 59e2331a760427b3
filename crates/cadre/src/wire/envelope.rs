//! What kind of request a node-to-node ask carries, so a receiver dispatches it without guessing.
//!
//! ## Data lane
//! Every data-lane ask a node sends starts with a one-byte [`Kind`]: an agent request, a
//! replication request, a pub/sub request, or an application payload for the receiver's data
//! handler. [`encode`] writes the kind and the postcard-encoded request into one buffer sized
//! once (no second copy of the request); [`split`] reads the kind and returns the body as a slice
//! of the payload (no copy). An application payload is always behind [`Kind::App`] ([`app`]), so
//! whatever its first byte it reaches the data handler, never another path.
//!
//! ## Control lane
//! Control-lane asks are a postcard `ControlReq` ([`crate::cluster::protocol`]), whose first byte is
//! postcard's index of the variant: that index is the kind, read by [`control_kind`] only to pick
//! a pool of permits (Raft RPCs, lease renewals, the rest), so a flood of one kind cannot starve
//! another. The control lane has no header byte of its own (nothing else travels there); the
//! indexes are pinned by a test next to `ControlReq`.
//!
//! ## Bad input
//! An empty payload or an unknown kind is an [`EnvelopeError`]; the receiving node counts it,
//! logs it and answers with a refusal: [`refusal`] on the data lane, a `ControlReply::Refused` on
//! the control lane. It never reaches a handler and never stops the node.
//!
//! ## Caveats
//! - Replies carry no kind: the asker knows what it asked. A [`refusal`] is told apart from a
//!   well-formed reply only by an asker that sent a malformed envelope (an application reply may
//!   start with [`REFUSED_TAG`] too).
//! - Tells carry no kind: they only ever go to the data handler.
//! - Sending an application ask through [`app`] copies its payload once, behind the header (an
//!   application that asks the same payload many times encodes it once).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Bytes a data-lane kind takes in front of the body.
pub const HEADER_LEN: usize = 1;
/// First byte of a data-lane reply that refuses a malformed envelope ([`refusal`]).
pub const REFUSED_TAG: u8 = 0xAF;

/// What a data-lane ask carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An agent request for the owner of a key's shard (`cluster::protocol::AgentReq`).
    Agent = 0xA7,
    /// A write or catch-up from a shard's owner to a replica (`cluster::protocol::ReplicaReq`).
    Replica = 0xA8,
    /// Signals, interest or a broadcast between the nodes' buses (`bus::remote`).
    PubSub = 0xA9,
    /// An application payload for the receiver's `DataHandler`.
    App = 0xAA,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Agent, Kind::Replica, Kind::PubSub, Kind::App];

    /// The byte that announces this kind.
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The kind a byte announces, if any.
    pub fn of_tag(tag: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    /// The kind's name, for messages.
    #[cfg(any(test, feature = "testing"))]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Replica => "replica",
            Kind::PubSub => "pubsub",
            Kind::App => "app",
        }
    }
}

/// A payload whose kind cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum EnvelopeError {
    #[error("empty request (no kind)")]
    Empty,
    #[error("unknown request kind {0:#04x}")]
    UnknownKind(u8),
}

impl EnvelopeError {
    /// The `reason` label it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Empty => "empty",
            EnvelopeError::UnknownKind(_) => "unknown_kind",
        }
    }
}

/// The kind of a data-lane ask and its body (a sub-slice of `payload`).
pub fn kind(payload: &[u8]) -> Result<(Kind, &[u8]), EnvelopeError> {
    let (&tag, body) = payload.split_first().ok_or(EnvelopeError::Empty)?;
    let kind = Kind::of_tag(tag).ok_or(EnvelopeError::UnknownKind(tag))?;
    Ok((kind, body))
}

/// As [`kind`], the body a zero-copy slice of `payload`.
pub fn split(payload: &Bytes) -> Result<(Kind, Bytes), EnvelopeError> {
    let (kind, _) = kind(payload)?;
    Ok((kind, payload.slice(HEADER_LEN..)))
}

/// `kind`, then `value` in postcard, in one buffer allocated once at its final size.
pub fn encode<T: Serialize + ?Sized>(kind: Kind, value: &T) -> Bytes {
    // Measuring walks the value without copying it; the buffer then never grows.
    let len = postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .expect("postcard measures our own types");
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u8(kind.tag());
    super::put_postcard(&mut buf, value);
    debug_assert_eq!(buf.len(), HEADER_LEN + len);
    buf.freeze()
}

/// An application payload behind [`Kind::App`]: what the receiver's `DataHandler::on_ask` gets
/// is exactly `body`.
pub fn app(body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + body.len());
    buf.put_u8(Kind::App.tag());
    buf.put_slice(body);
    buf.freeze()
}

/// The reply to a data-lane ask whose envelope is malformed.
pub fn refusal(e: EnvelopeError) -> Bytes {
    let mut buf = BytesMut::with_capacity(8);
    buf.put_u8(REFUSED_TAG);
    super::put_postcard(&mut buf, &e);
    buf.freeze()
}

/// The error a [`refusal`] carries, if `reply` is one.
#[cfg(any(test, feature = "testing"))]
pub fn refused(reply: &[u8]) -> Option<EnvelopeError> {
    postcard::from_bytes(reply.strip_prefix(&[REFUSED_TAG])?).ok()
}

/// What a control-lane ask carries, as far as admission cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlKind {
    /// A Raft RPC (`ControlReq::Raft`).
    Raft,
    /// A lease renewal (`ControlReq::Renew`).
    Renew,
    /// Any other placement request to the leader.
    Other,
}

/// Postcard's index of `ControlReq::Raft`, the first byte of its encoding.
pub const CONTROL_RAFT: u8 = 0;
/// Postcard's index of `ControlReq::Renew`.
pub const CONTROL_RENEW: u8 = 1;
/// How many variants `ControlReq` has: a first byte from here on is no request.
pub const CONTROL_VARIANTS: u8 = 6;

/// The kind of a control-lane ask, from its first byte (postcard's variant index of its
/// `ControlReq`; indexes below 128 take one byte).
pub fn control_kind(payload: &[u8]) -> Result<ControlKind, EnvelopeError> {
    match payload.first().copied() {
        None => Err(EnvelopeError::Empty),
        Some(CONTROL_RAFT) => Ok(ControlKind::Raft),
        Some(CONTROL_RENEW) => Ok(ControlKind::Renew),
        Some(i) if i < CONTROL_VARIANTS => Ok(ControlKind::Other),
        Some(i) => Err(EnvelopeError::UnknownKind(i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_kind_roundtrips_and_the_body_is_a_slice_of_the_payload() {
        for k in Kind::ALL {
            let payload = encode(k, &("body", 7u32));
            assert_eq!(payload[0], k.tag());
            let (got, body) = split(&payload).unwrap();
            assert_eq!(got, k);
            assert_eq!(postcard::from_bytes::<(&str, u32)>(&body).unwrap(), ("body", 7));
            assert_eq!(body.as_ptr(), payload[HEADER_LEN..].as_ptr(), "not copied");
        }
    }

    #[test]
    fn the_tags_of_agent_replica_and_pubsub_requests_are_unchanged() {
        assert_eq!((Kind::Agent.tag(), Kind::Replica.tag(), Kind::PubSub.tag()), (0xA7, 0xA8, 0xA9));
        assert!(Kind::of_tag(REFUSED_TAG).is_none());
    }

    #[test]
    fn an_application_payload_starting_with_another_kinds_tag_stays_an_application_payload() {
        for k in Kind::ALL {
            let body = [k.tag(), 1, 2, 3];
            let (got, rest) = kind(&app(&body)).map(|(k, b)| (k, b.to_vec())).unwrap();
            assert_eq!((got, rest.as_slice()), (Kind::App, &body[..]));
        }
    }

    #[test]
    fn malformed_envelopes_are_typed_errors() {
        assert_eq!(kind(&[]), Err(EnvelopeError::Empty));
        assert_eq!(split(&Bytes::new()).unwrap_err(), EnvelopeError::Empty);
        assert_eq!(kind(&[0x00, 1]), Err(EnvelopeError::UnknownKind(0)));
        assert_eq!(kind(&[REFUSED_TAG]), Err(EnvelopeError::UnknownKind(REFUSED_TAG)));
        assert_eq!(EnvelopeError::UnknownKind(0x42).to_string(), "unknown request kind 0x42");
        assert_eq!(control_kind(&[]), Err(EnvelopeError::Empty));
        assert_eq!(control_kind(&[CONTROL_VARIANTS]), Err(EnvelopeError::UnknownKind(CONTROL_VARIANTS)));
        assert_eq!(control_kind(&[0xff, 0xff]), Err(EnvelopeError::UnknownKind(0xff)));
        assert_eq!(control_kind(&[CONTROL_RAFT]), Ok(ControlKind::Raft));
        assert_eq!(control_kind(&[CONTROL_RENEW, 9]), Ok(ControlKind::Renew));
        assert_eq!(control_kind(&[CONTROL_VARIANTS - 1]), Ok(ControlKind::Other));
    }

    #[test]
    fn a_refusal_carries_its_error() {
        for e in [EnvelopeError::Empty, EnvelopeError::UnknownKind(0x42)] {
            assert_eq!(refused(&refusal(e)), Some(e));
        }
        assert_eq!(refused(b"an application reply"), None);
    }

    proptest! {
        #[test]
        fn any_payload_splits_or_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let payload = Bytes::from(bytes.clone());
            match split(&payload) {
                Ok((k, body)) => {
                    prop_assert_eq!(k.tag(), bytes[0]);
                    prop_assert_eq!(&body[..], &bytes[1..]);
                }
                Err(EnvelopeError::Empty) => prop_assert!(bytes.is_empty()),
                Err(EnvelopeError::UnknownKind(t)) => prop_assert_eq!(t, bytes[0]),
            }
            let _ = control_kind(&bytes);
        }
    }
}
