//! Binary-mode requests from clients: header lines `name: value` up to an empty line, then the
//! body. Decoding must never panic, and whatever decodes is in normal form: encoding it again
//! (binary or structured) and decoding gives the same signal.
#![no_main]

use cadre::signal::codec;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// Headers (lines up to the first empty one; lines that are not valid headers are skipped, and
/// a name may repeat) and the body after them.
fn split(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    loop {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = after;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return (headers, rest);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (headers, body) = split(data);
    let _ = codec::is_binary_mode(&headers);
    let Ok(signal) = codec::decode_binary(&headers, body) else { return };
    let (headers, body) = codec::encode_binary(&signal);
    assert_eq!(codec::decode_binary(&headers, &body).as_ref(), Ok(&signal));
    assert_eq!(codec::decode_structured(&codec::encode_structured(&signal)).as_ref(), Ok(&signal));
});
