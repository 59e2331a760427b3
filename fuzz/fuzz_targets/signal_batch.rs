//! Batch-mode bodies from clients: decoding must never panic, and whatever decodes is in normal
//! form: encoding the batch again and decoding gives the same signals, and so does each signal
//! through binary mode.
#![no_main]

use cadre::signal::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(signals) = codec::decode_batch(data) else { return };
    assert!(signals.len() <= codec::BATCH_LEN_MAX);
    assert_eq!(codec::decode_batch(&codec::encode_batch(&signals)).as_ref(), Ok(&signals));
    for signal in &signals {
        let (headers, body) = codec::encode_binary(signal);
        assert_eq!(codec::decode_binary(&headers, &body).as_ref(), Ok(signal));
    }
});
