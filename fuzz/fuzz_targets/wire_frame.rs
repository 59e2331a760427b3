//! Bytes from a peer: frame splitting, message frames and handshake frames must never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = cadre::wire::take_frame(&mut buf, 64 * 1024) {
        let _ = cadre::wire::decode_frame(&frame, |_| {});
        let _ = cadre::wire::decode_handshake(&frame);
    }
});
