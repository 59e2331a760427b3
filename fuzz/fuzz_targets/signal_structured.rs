//! Structured-mode bodies from clients: decoding must never panic, and whatever decodes is in
//! normal form: encoding it again (structured or binary) and decoding gives the same signal.
#![no_main]

use cadre::signal::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(signal) = codec::decode_structured(data) else { return };
    assert_eq!(codec::decode_structured(&codec::encode_structured(&signal)).as_ref(), Ok(&signal));
    let (headers, body) = codec::encode_binary(&signal);
    assert_eq!(codec::decode_binary(&headers, &body).as_ref(), Ok(&signal));
});
