use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use chrono::{DateTime, FixedOffset, TimeZone, Timelike, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::codec::*;
use super::journal::{Direction, Journal, TraceStep, TRACE_STEPS_MAX};
use super::*;

fn sample() -> Signal {
    Signal::bare("1", "/s", "user.created").with_subject("u1").with_extension("tenant", "acme")
}

#[test]
fn validation_errors_name_the_attribute() {
    let mut s = sample();
    s.source.clear();
    assert_eq!(s.validate().unwrap_err().to_string(), r#"missing attribute "source""#);
    let s = sample().with_extension("Bad-Name", "x");
    assert_eq!(s.validate().unwrap_err().to_string(), r#"extension name "Bad-Name" is not lower-case alphanumeric"#);
}

#[test]
fn structured_round_trip() {
    let s = Signal::new("order.placed", serde_json::json!({"n": 1}));
    assert_eq!(decode_structured(&encode_structured(&s)).unwrap(), s);
}

// ---- helpers ----

/// Headers from `(name, value)` pairs, appended in order (so a name may repeat).
fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(HeaderName::try_from(*name).unwrap(), HeaderValue::try_from(*value).unwrap());
    }
    h
}

/// The minimal valid binary-mode headers, without the names in `except`.
fn binary_headers_without(except: &[&str]) -> HeaderMap {
    let all = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("content-type", "text/plain"),
    ];
    let kept: Vec<(&str, &str)> = all.into_iter().filter(|(n, _)| !except.contains(n)).collect();
    headers(&kept)
}

/// The minimal valid structured object, changed by `edit`.
fn structured_with(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut v = json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"});
    edit(v.as_object_mut().unwrap());
    serde_json::to_vec(&v).unwrap()
}

/// Asserts the error is `want` and that its message names the attribute at fault.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(got: Result<T, SignalError>, want: SignalError) {
    let err = got.expect_err("expected an error");
    assert_eq!(err, want);
    if let Some(attribute) = err.attribute() {
        let message = err.to_string();
        assert!(message.contains(&format!("\"{attribute}\"")), "message {message:?} does not name {attribute:?}");
    }
}

fn invalid(attribute: &str) -> impl Fn(SignalError) -> bool + '_ {
    move |e| matches!(&e, SignalError::Invalid { attribute: a, .. } if a == attribute)
}

/// Asserts the error is `Invalid` for `attribute`, names it, and its reason contains `reason`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(got: Result<T, SignalError>, attribute: &str, reason: &str) {
    let err = got.expect_err("expected an error");
    assert!(invalid(attribute)(err.clone()), "expected Invalid for {attribute:?}, got {err:?}");
    let message = err.to_string();
    assert!(message.starts_with(&format!("attribute \"{attribute}\" ")), "{message:?}");
    assert!(message.contains(reason), "{message:?} does not say {reason:?}");
}

fn utc(text: &str) -> DateTime<FixedOffset> {
    DateTime::parse_from_rfc3339(text).unwrap()
}

fn round_trip_all(s: &Signal) {
    s.validate().unwrap();
    assert_eq!(&decode_structured(&encode_structured(s)).unwrap(), s, "structured");
    let (h, body) = encode_binary(s);
    assert_eq!(&decode_binary(&h, &body).unwrap(), s, "binary");
    assert_eq!(decode_batch(&encode_batch(std::slice::from_ref(s))).unwrap(), vec![s.clone()], "batch");
}

// ---- 1. property tests: valid signals in normal form round-trip ----

/// Attribute text: printable ASCII (with space, `%`, `"`) or any non-control Unicode.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{1,24}",
        "[a-zA-Z0-9 %\"/:+.\\\\éü€中😀]{1,24}",
        "\\PC{1,16}",
        Just("Euro € 😀".to_string()),
        Just("%25 %zz \"quoted\"".to_string()),
    ]
}

fn arb_time() -> impl Strategy<Value = DateTime<FixedOffset>> {
    // 0000-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z, the range RFC 3339 can write.
    let secs = -62_167_219_200i64..=253_402_300_799i64;
    (secs, 0u32..1_000_000_000, -86_399i32..=86_399).prop_map(|(secs, nanos, offset)| {
        DateTime::from_timestamp(secs, nanos).unwrap().with_timezone(&FixedOffset::east_opt(offset).unwrap())
    })
}

fn arb_extension_name() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,20}".prop_filter("not reserved", |n| validate_extension_name(n).is_ok() && n != TRACEPARENT)
}

fn arb_extensions() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = prop_oneof!["[ -~]{0,16}", "\\PC{0,16}", Just("true".to_string()), Just("42".to_string())];
    let traceparent = prop::option::of(
        any::<(u128, u64, u8)>()
            .prop_map(|(t, s, f)| TraceParent { trace_id: t | 1, span_id: s | 1, flags: f }.to_string()),
    );
    (prop::collection::btree_map(arb_extension_name(), value, 0..6), traceparent).prop_map(|(mut m, tp)| {
        if let Some(tp) = tp {
            m.insert(TRACEPARENT.to_string(), tp);
        }
        m
    })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![Just(0.5f64), Just(-0.0), Just(1e300), Just(5e-324), Just(3.0)].prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn with_charset(media: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![Just(media.to_string()), Just(format!("{media}; charset=utf-8"))]
}

fn arb_json_type() -> impl Strategy<Value = String> {
    prop_oneof![Just("application/json"), Just("text/json"), Just("application/foo+json"), Just("Application/JSON")]
        .prop_flat_map(with_charset)
}

fn arb_binary_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("text/plain"),
        Just("application/xml"),
        Just("application/octet-stream"),
        Just("image/png"),
        Just("text/xml"),
        Just("application/atom+xml")
    ]
    .prop_flat_map(with_charset)
}

/// Data and its content type, in normal form.
fn arb_data() -> impl Strategy<Value = (Option<String>, Option<Data>)> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..64),
        "\\PC{1,32}".prop_map(String::into_bytes),
        "[ -~]{1,32}".prop_map(String::into_bytes),
    ];
    prop_oneof![
        1 => Just((None, None)),
        1 => prop_oneof![arb_json_type(), arb_binary_type()].prop_map(|ct| (Some(ct), None)),
        3 => (arb_json_type(), arb_json()).prop_map(|(ct, v)| (Some(ct), Some(Data::Json(v)))),
        3 => (arb_binary_type(), bytes).prop_map(|(ct, b)| (Some(ct), Some(Data::Binary(b.into())))),
    ]
}

fn arb_signal() -> impl Strategy<Value = Signal> {
    (
        (arb_text(), arb_text(), arb_text(), prop::option::of(arb_text())),
        prop::option::of(arb_time()),
        prop::option::of(arb_text()),
        arb_extensions(),
        arb_data(),
    )
        .prop_map(|((id, source, ty, subject), time, dataschema, extensions, (datacontenttype, data))| Signal {
            id,
            source,
            ty,
            subject,
            time,
            datacontenttype,
            dataschema,
            data,
            extensions,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_signals_are_valid(s in arb_signal()) {
        prop_assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn structured_round_trips(s in arb_signal()) {
        let body = encode_structured(&s);
        prop_assert_eq!(decode_structured(&body).unwrap(), s);
    }

    #[test]
    fn binary_round_trips(s in arb_signal()) {
        let (h, body) = encode_binary(&s);
        prop_assert!(is_binary_mode(&h));
        for (name, value) in &h {
            // Every value is printable ASCII without spaces or quotes (except Content-Type).
            if name.as_str().starts_with(HEADER_PREFIX) {
                prop_assert!(value.as_bytes().iter().all(|b| (0x21..0x7f).contains(b) && *b != b'"'), "{:?}", value);
            }
        }
        prop_assert_eq!(decode_binary(&h, &body).unwrap(), s);
    }

    #[test]
    fn batch_round_trips(signals in prop::collection::vec(arb_signal(), 0..6)) {
        let body = encode_batch(&signals);
        prop_assert_eq!(decode_batch(&body).unwrap(), signals);
    }

    /// Decoding is idempotent on arbitrary objects: whatever decodes re-encodes to itself.
    #[test]
    fn decoded_structured_objects_are_in_normal_form(
        attrs in prop::collection::btree_map(
            prop_oneof![
                Just("subject".to_string()), Just("time".to_string()), Just("datacontenttype".to_string()),
                Just("data".to_string()), Just("data_base64".to_string()), "[a-z]{1,3}",
            ],
            prop_oneof![
                arb_json(),
                Just(json!("2020-02-29T12:00:00.5+05:30")),
                Just(json!("aGVsbG8=")), Just(json!("")), Just(json!("text/plain")), Just(json!("application/json")),
            ],
            0..5,
        )
    ) {
        let mut v = json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"});
        v.as_object_mut().unwrap().extend(attrs);
        if let Ok(s) = from_json(v) {
            prop_assert_eq!(s.validate(), Ok(()));
            prop_assert_eq!(&decode_structured(&encode_structured(&s)).unwrap(), &s);
            let (h, body) = encode_binary(&s);
            prop_assert_eq!(&decode_binary(&h, &body).unwrap(), &s);
        }
    }
}

/// One edit of an encoded message: replace, insert or delete the byte at a position.
fn arb_edits() -> impl Strategy<Value = Vec<(prop::sample::Index, u8, u8)>> {
    let byte = prop_oneof![any::<u8>(), prop::sample::select(b"{}[]\":,0123456789-.eE%tfn \\u".to_vec())];
    prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, byte), 1..4)
}

fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, op, byte) in edits {
        let i = at.index(bytes.len() + 1);
        match op {
            0 if i < bytes.len() => bytes[i] = *byte,
            1 => bytes.insert(i, *byte),
            _ if i < bytes.len() => {
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}

/// What the fuzz targets assert, on stable: decoders never panic on mutated encodings, and
/// whatever decodes re-encodes (in every mode) to the same signal.
#[track_caller]
fn assert_normal_form(s: &Signal) {
    assert_eq!(s.validate(), Ok(()));
    assert_eq!(decode_structured(&encode_structured(s)).as_ref(), Ok(s));
    let (h, body) = encode_binary(s);
    assert_eq!(decode_binary(&h, &body).as_ref(), Ok(s));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_structured_bodies(s in arb_signal(), edits in arb_edits()) {
        if let Ok(d) = decode_structured(&mutate(encode_structured(&s), &edits)) {
            assert_normal_form(&d);
        }
    }

    #[test]
    fn mutated_batches(signals in prop::collection::vec(arb_signal(), 1..4), edits in arb_edits()) {
        if let Ok(batch) = decode_batch(&mutate(encode_batch(&signals), &edits)) {
            prop_assert_eq!(decode_batch(&encode_batch(&batch)), Ok(batch.clone()));
            batch.iter().for_each(assert_normal_form);
        }
    }

    #[test]
    fn mutated_binary_messages(s in arb_signal(), edits in arb_edits(), in_body in any::<bool>()) {
        let (mut h, body) = encode_binary(&s);
        let body = if in_body || h.is_empty() {
            mutate(body.to_vec(), &edits)
        } else {
            // Mutate one header value instead.
            let names: Vec<HeaderName> = h.keys().cloned().collect();
            let name = names[edits[0].0.index(names.len())].clone();
            let value = mutate(h[&name].as_bytes().to_vec(), &edits);
            match HeaderValue::from_bytes(&value) {
                Ok(v) => {
                    h.insert(name, v);
                }
                Err(_) => {
                    h.remove(name);
                }
            }
            body.to_vec()
        };
        if let Ok(d) = decode_binary(&h, &body) {
            assert_normal_form(&d);
        }
    }
}

#[test]
fn percent_encoding_follows_the_binding() {
    // The binding's own example (3.1.3.2).
    let s = Signal::bare("1", "/s", "t").with_subject("Euro € 😀");
    let (h, _) = encode_binary(&s);
    assert_eq!(h["ce-subject"], "Euro%20%E2%82%AC%20%F0%9F%98%80");
    let s = Signal::bare("a b", "\"q\"", "100%");
    let (h, _) = encode_binary(&s);
    assert_eq!([&h["ce-id"], &h["ce-source"], &h["ce-type"]], ["a%20b", "%22q%22", "100%25"]);
    // Decoding accepts lower case and needlessly encoded characters.
    let mut h = binary_headers_without(&[]);
    h.insert("ce-subject", HeaderValue::from_static("Euro%20%e2%82%ac%20%F0%9F%98%80%41"));
    assert_eq!(decode_binary(&h, b"x").unwrap().subject.as_deref(), Some("Euro € 😀A"));
}

#[test]
fn times_round_trip_as_instants_written_in_utc() {
    let t = utc("2020-02-29T23:30:00.123456789-05:00");
    let mut s = Signal::bare("1", "/s", "t");
    s.time = Some(t);
    assert_eq!(s.time_rfc3339().as_deref(), Some("2020-03-01T04:30:00.123456789Z"));
    round_trip_all(&s);
    let decoded = decode_structured(&encode_structured(&s)).unwrap().time.unwrap();
    assert_eq!(decoded, t);
    assert_eq!(decoded.offset().local_minus_utc(), 0);
    assert_eq!(decoded.nanosecond(), 123_456_789);
    // The extremes RFC 3339 can write, lower-case separators and leap seconds.
    for text in [
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T18:59:59-05:00",
        "2018-04-05t03:56:24z",
        "2016-12-31T23:59:60Z",
        "2016-12-31T23:59:60.5+01:00",
    ] {
        s.time = Some(utc(text));
        round_trip_all(&s);
    }
}

#[test]
fn times_rfc3339_cannot_write_are_invalid() {
    // Year 10000 in UTC (even if the local year is 9999) and years before 0 have no RFC 3339 form.
    for t in [
        Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap().fixed_offset(),
        utc("9999-12-31T23:00:00-05:00"),
        Utc.with_ymd_and_hms(-1, 12, 31, 23, 59, 59).unwrap().fixed_offset(),
    ] {
        let mut s = Signal::bare("1", "/s", "t");
        s.time = Some(t);
        assert_invalid(s.validate(), "time", "RFC 3339");
    }
}

#[test]
fn deeply_nested_json_data_is_refused_or_round_trips() {
    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |v, _| Value::Array(vec![v]))
    }
    for depth in [10, JSON_DEPTH_MAX] {
        let s = Signal::bare("1", "/s", "t").with_json(nested(depth));
        round_trip_all(&s);
    }
    let s = Signal::bare("1", "/s", "t").with_json(nested(JSON_DEPTH_MAX + 1));
    assert_invalid(s.validate(), "data", "nests deeper");
    // Very deep values neither overflow the stack in validation nor decode.
    let s = Signal::bare("1", "/s", "t").with_json(nested(100_000));
    assert_invalid(s.validate(), "data", "nests deeper");
    std::mem::forget(s); // serde_json's recursive drop would overflow the test thread's stack
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (h, _) = encode_binary(&Signal::bare("1", "/s", "t").with_json(json!(null)));
    assert!(matches!(decode_binary(&h, deep.as_bytes()), Err(e) if invalid("data")(e.clone())));
}

trait WithJson {
    fn with_json(self, v: Value) -> Self;
}

impl WithJson for Signal {
    fn with_json(mut self, v: Value) -> Self {
        self.datacontenttype = Some("application/json".into());
        self.data = Some(Data::Json(v));
        self
    }
}

// ---- 2. validation and decoding errors ----

#[test]
fn missing_required_attributes_structured() {
    for name in ["id", "source", "type", "specversion"] {
        let body = structured_with(|m| {
            m.remove(name);
        });
        assert_error(decode_structured(&body), SignalError::Missing(name));
        // null is absent.
        let body = structured_with(|m| {
            m.insert(name.into(), Value::Null);
        });
        assert_error(decode_structured(&body), SignalError::Missing(name));
    }
    // An empty string is missing too.
    for name in ["id", "source", "type"] {
        let body = structured_with(|m| {
            m.insert(name.into(), json!(""));
        });
        assert_error(decode_structured(&body), SignalError::Missing(name));
    }
}

#[test]
fn missing_required_attributes_binary() {
    for name in ["id", "source", "type", "specversion"] {
        let h = binary_headers_without(&[&format!("ce-{name}")]);
        assert_error(decode_binary(&h, b"x"), SignalError::Missing(name));
    }
    let mut h = binary_headers_without(&[]);
    h.insert("ce-id", HeaderValue::from_static(""));
    assert_error(decode_binary(&h, b"x"), SignalError::Missing("id"));
}

#[test]
fn wrong_specversion() {
    for v in [json!("0.3"), json!("1.0.2"), json!(1.0), json!(1)] {
        let body = structured_with(|m| {
            m.insert("specversion".into(), v.clone());
        });
        assert_invalid(decode_structured(&body), "specversion", "is not supported");
    }
    let mut h = binary_headers_without(&[]);
    h.insert("ce-specversion", HeaderValue::from_static("0.3"));
    assert_invalid(decode_binary(&h, b"x"), "specversion", "is not supported");
}

#[test]
fn attributes_of_the_wrong_json_type() {
    for name in ["id", "source", "type", "subject", "time", "datacontenttype", "dataschema"] {
        for v in [json!(5), json!(true), json!({"a": 1}), json!(["x"])] {
            let body = structured_with(|m| {
                m.insert(name.into(), v.clone());
            });
            assert_invalid(decode_structured(&body), name, "must be a string");
        }
    }
    let body = structured_with(|m| {
        m.insert("data_base64".into(), json!(5));
    });
    assert_invalid(decode_structured(&body), "data_base64", "must be a string");
}

#[test]
fn bad_time() {
    for t in ["yesterday", "2018-04-05", "2018-04-05T03:56:24", "2018-13-05T03:56:24Z", "+10000-01-01T00:00:00Z"] {
        let body = structured_with(|m| {
            m.insert("time".into(), json!(t));
        });
        assert_invalid(decode_structured(&body), "time", "RFC 3339");
        let mut h = binary_headers_without(&[]);
        h.insert("ce-time", HeaderValue::try_from(t).unwrap());
        assert_invalid(decode_binary(&h, b"x"), "time", "RFC 3339");
    }
}

#[test]
fn data_and_data_base64_together() {
    let body = structured_with(|m| {
        m.insert("data".into(), json!({"a": 1}));
        m.insert("data_base64".into(), json!("aGVsbG8="));
    });
    assert_invalid(decode_structured(&body), "data_base64", "together with data");
}

#[test]
fn bad_base64() {
    for text in ["not base64!", "aGVsbG8", "a===", "aGVs\nbG8="] {
        let body = structured_with(|m| {
            m.insert("data_base64".into(), json!(text));
        });
        assert_invalid(decode_structured(&body), "data_base64", "is not base64");
    }
}

#[test]
fn invalid_json_under_a_json_content_type() {
    for ct in ["application/json", "text/json; charset=utf-8", "application/cloudevents+json"] {
        let mut h = binary_headers_without(&["content-type"]);
        h.insert("content-type", HeaderValue::try_from(ct).unwrap());
        assert_invalid(decode_binary(&h, b"{not json"), "data", "is not valid JSON");
        assert_invalid(decode_binary(&h, &[0xff, 0xfe]), "data", "is not valid JSON");
        // The same bytes through data_base64.
        let body = structured_with(|m| {
            m.insert("datacontenttype".into(), json!(ct));
            m.insert("data_base64".into(), json!("e25vdCBqc29u"));
        });
        assert_invalid(decode_structured(&body), "data", "is not valid JSON");
    }
}

#[test]
fn json_data_under_a_non_json_type() {
    for v in [json!({"a": 1}), json!(5), json!(["x"]), json!(true)] {
        let body = structured_with(|m| {
            m.insert("datacontenttype".into(), json!("text/plain"));
            m.insert("data".into(), v.clone());
        });
        assert_invalid(decode_structured(&body), "data", "is not a JSON type");
    }
    let mut s = Signal::bare("1", "/s", "t").with_json(json!(1));
    s.datacontenttype = Some("text/plain".into());
    assert_invalid(s.validate(), "data", "is not a JSON type");
    let s = Signal::bare("1", "/s", "t").with_binary("application/json", &b"{}"[..]);
    assert_invalid(s.validate(), "data", "is a JSON type");
    let mut s = Signal::bare("1", "/s", "t").with_json(json!(1));
    s.datacontenttype = None;
    assert_invalid(s.validate(), "datacontenttype", "is required when data is present");
    let s = Signal::bare("1", "/s", "t").with_binary("text/plain", Bytes::new());
    assert_invalid(s.validate(), "data", "is empty");
    let body = structured_with(|m| {
        m.insert("datacontenttype".into(), json!("text/plain"));
        m.insert("data".into(), json!(""));
    });
    assert_invalid(decode_structured(&body), "data", "is empty");
}

#[test]
fn extension_names() {
    let long = "a".repeat(EXTENSION_NAME_LEN_MAX + 1);
    let cases: Vec<(&str, SignalError)> = vec![
        ("Upper", SignalError::ExtensionName("Upper".into())),
        ("my-ext", SignalError::ExtensionName("my-ext".into())),
        ("my_ext", SignalError::ExtensionName("my_ext".into())),
        ("café", SignalError::ExtensionName("café".into())),
        (&long, SignalError::ExtensionNameLen(long.clone())),
    ];
    for (name, want) in &cases {
        let body = structured_with(|m| {
            m.insert(name.to_string(), json!("x"));
        });
        assert_error(decode_structured(&body), want.clone());
        assert_error(sample().with_extension(*name, "x").validate(), want.clone());
    }
    // Header names are case-insensitive, so an upper-case header is a lower-case extension.
    let h = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("CE-Tenant", "x"),
    ]);
    assert_eq!(decode_binary(&h, b"").unwrap().extension("tenant"), Some("x"));
    for (header, want) in [
        ("ce-my-ext", SignalError::ExtensionName("my-ext".into())),
        ("ce-my_ext", SignalError::ExtensionName("my_ext".into())),
        ("ce-", SignalError::ExtensionName("".into())),
        ("ce-abcdefghijklmnopqrstu", SignalError::ExtensionNameLen("abcdefghijklmnopqrstu".into())),
        ("ce-data", SignalError::ExtensionReserved("data".into())),
    ] {
        let mut h = binary_headers_without(&[]);
        h.insert(HeaderName::try_from(header).unwrap(), HeaderValue::from_static("x"));
        assert_error(decode_binary(&h, b"x"), want);
    }
    // Exactly 20 characters is fine.
    assert_eq!(sample().with_extension("a".repeat(EXTENSION_NAME_LEN_MAX), "x").validate(), Ok(()));
    for name in ["id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema", "data"] {
        assert_error(sample().with_extension(name, "x").validate(), SignalError::ExtensionReserved(name.into()));
    }
}

#[test]
fn extension_values_of_the_wrong_json_type() {
    for v in [json!({"a": 1}), json!([1]), json!(1.5), json!(u64::MAX)] {
        let body = structured_with(|m| {
            m.insert("tenant".into(), v.clone());
        });
        assert_invalid(decode_structured(&body), "tenant", "must be a string, boolean or integer");
    }
}

#[test]
fn too_many_or_too_long() {
    let mut s = sample();
    s.extensions = (0..=EXTENSIONS_MAX).map(|i| (format!("e{i}"), "x".to_string())).collect();
    assert_error(s.validate(), SignalError::TooManyExtensions);
    s.extensions.pop_first();
    assert_eq!(s.validate(), Ok(()));
    let long = "x".repeat(ATTRIBUTE_LEN_MAX_BYTES + 1);
    for name in ["id", "source", "type", "subject", "dataschema", "tenant"] {
        let body = structured_with(|m| {
            m.insert(name.into(), json!(long));
        });
        assert_invalid(decode_structured(&body), name, "is longer than");
    }
    let s = Signal::bare("x".repeat(ATTRIBUTE_LEN_MAX_BYTES), "/s", "t");
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn control_characters_and_empty_optionals() {
    for name in ["id", "source", "type", "subject", "dataschema"] {
        for text in ["a\nb", "\u{0}", "tab\there", "\u{7f}", "\u{85}"] {
            let body = structured_with(|m| {
                m.insert(name.into(), json!(text));
            });
            assert_invalid(decode_structured(&body), name, "control characters");
        }
    }
    for name in ["subject", "dataschema", "datacontenttype"] {
        let body = structured_with(|m| {
            m.insert(name.into(), json!(""));
        });
        assert_invalid(decode_structured(&body), name, "is empty");
    }
    let mut h = binary_headers_without(&[]);
    h.insert("ce-subject", HeaderValue::from_static("a%0Ab"));
    assert_invalid(decode_binary(&h, b"x"), "subject", "control characters");
    for ct in [" text/plain", "text/plain ", "text/plain; a=\u{e9}"] {
        let body = structured_with(|m| {
            m.insert("datacontenttype".into(), json!(ct));
        });
        assert_invalid(decode_structured(&body), "datacontenttype", "printable ASCII");
    }
}

#[test]
fn malformed_bodies() {
    for body in [&b"[1]"[..], b"\"x\"", b"null", b"42"] {
        let err = decode_structured(body).unwrap_err();
        assert!(matches!(&err, SignalError::Malformed(m) if m.contains("JSON object")), "{err:?}");
        assert_eq!(err.attribute(), None);
    }
    for body in [&b""[..], b"{", b"\xff", b"{\"id\":1}x"] {
        assert!(matches!(decode_structured(body), Err(SignalError::Malformed(m)) if m.starts_with("not JSON")));
        assert!(matches!(decode_batch(body), Err(SignalError::Malformed(m)) if m.starts_with("not JSON")));
    }
    for body in [&b"{}"[..], b"null", b"\"x\""] {
        let err = decode_batch(body).unwrap_err();
        assert!(matches!(&err, SignalError::Malformed(m) if m.contains("JSON array")), "{err:?}");
    }
    assert_eq!(decode_batch(b"[]").unwrap(), vec![]);
}

#[test]
fn batch_limits_and_element_errors() {
    let one = to_json(&sample());
    let over = Value::Array(vec![one.clone(); BATCH_LEN_MAX + 1]);
    let err = decode_batch(&serde_json::to_vec(&over).unwrap()).unwrap_err();
    assert_eq!(err, SignalError::BatchTooLarge { len: BATCH_LEN_MAX + 1, max: BATCH_LEN_MAX });
    assert_eq!(err.to_string(), format!("batch of {} signals exceeds {BATCH_LEN_MAX}", BATCH_LEN_MAX + 1));
    let full = Value::Array(vec![one.clone(); BATCH_LEN_MAX]);
    assert_eq!(decode_batch(&serde_json::to_vec(&full).unwrap()).unwrap().len(), BATCH_LEN_MAX);

    let mut bad = one.clone();
    bad.as_object_mut().unwrap().remove("id");
    let body = serde_json::to_vec(&json!([one, one, bad, one])).unwrap();
    let err = decode_batch(&body).unwrap_err();
    assert_eq!(err, SignalError::InBatch { index: 2, error: Box::new(SignalError::Missing("id")) });
    assert_eq!(err.to_string(), "signal #2: missing attribute \"id\"");
    assert_eq!(err.attribute(), Some("id"));
    let err = decode_batch(&serde_json::to_vec(&json!([one, 5])).unwrap()).unwrap_err();
    assert!(matches!(&err, SignalError::InBatch { index: 1, error } if matches!(**error, SignalError::Malformed(_))));
    assert!(err.to_string().starts_with("signal #1: malformed"), "{err}");
}

#[test]
fn binary_header_errors() {
    // A duplicated ce- header.
    let mut h = binary_headers_without(&[]);
    h.append("ce-id", HeaderValue::from_static("2"));
    assert_invalid(decode_binary(&h, b"x"), "id", "more than one header");
    let mut h = binary_headers_without(&[]);
    h.append("ce-tenant", HeaderValue::from_static("a"));
    h.append("ce-tenant", HeaderValue::from_static("a"));
    assert_invalid(decode_binary(&h, b"x"), "tenant", "more than one header");
    // datacontenttype travels in Content-Type only.
    let mut h = binary_headers_without(&[]);
    h.insert("ce-datacontenttype", HeaderValue::from_static("text/plain"));
    assert_invalid(decode_binary(&h, b"x"), "datacontenttype", "Content-Type");
    // Percent-encoded bytes that are not UTF-8, including the binding's overlong example.
    for bad in ["%FF", "%C0%A0", "abc%E2%82", "%ED%A0%80"] {
        let mut h = binary_headers_without(&[]);
        h.insert("ce-subject", HeaderValue::from_static(bad));
        assert_invalid(decode_binary(&h, b"x"), "subject", "percent-encoded UTF-8");
    }
    // Header bytes outside visible ASCII.
    let mut h = binary_headers_without(&[]);
    h.insert("ce-subject", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    assert_invalid(decode_binary(&h, b"x"), "subject", "visible ASCII");
    let mut h = binary_headers_without(&["content-type"]);
    h.insert("content-type", HeaderValue::from_bytes(b"text/\xe9").unwrap());
    assert_invalid(decode_binary(&h, b"x"), "datacontenttype", "printable ASCII");
    let mut h = binary_headers_without(&["content-type"]);
    h.insert("content-type", HeaderValue::from_static("text/plain;\ta=b"));
    assert_invalid(decode_binary(&h, b"x"), "datacontenttype", "control characters");
}

#[test]
fn invalid_traceparent() {
    let bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    assert_invalid(sample().with_extension(TRACEPARENT, bad).validate(), TRACEPARENT, "W3C traceparent");
    let body = structured_with(|m| {
        m.insert(TRACEPARENT.into(), json!("nope"));
    });
    assert_invalid(decode_structured(&body), TRACEPARENT, "W3C traceparent");
    let mut h = binary_headers_without(&[]);
    h.insert("ce-traceparent", HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"));
    assert_invalid(decode_binary(&h, b"x"), TRACEPARENT, "W3C traceparent");
}

// ---- 3. the specs' own examples ----

#[test]
fn http_binding_binary_example() {
    // HTTP protocol binding 1.0.2, 3.1.4, with application data that is JSON.
    let h = headers(&[
        ("Host", "webhook.example.com"),
        ("ce-specversion", "1.0"),
        ("ce-type", "com.example.someevent"),
        ("ce-time", "2018-04-05T03:56:24Z"),
        ("ce-id", "1234-1234-1234"),
        ("ce-source", "/mycontext/subcontext"),
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Length", "31"),
    ]);
    assert!(is_binary_mode(&h));
    let body = b"{\n    \"appinfoA\" : \"abc\"\n}\n";
    let s = decode_binary(&h, body).unwrap();
    assert_eq!(s.id, "1234-1234-1234");
    assert_eq!(s.source, "/mycontext/subcontext");
    assert_eq!(s.ty, "com.example.someevent");
    assert_eq!(s.time, Some(utc("2018-04-05T03:56:24Z")));
    assert_eq!(s.time_rfc3339().as_deref(), Some("2018-04-05T03:56:24Z"));
    assert_eq!(s.datacontenttype.as_deref(), Some("application/json; charset=utf-8"));
    assert_eq!(s.data, Some(Data::Json(json!({"appinfoA": "abc"}))));
    assert_eq!((s.subject.as_deref(), s.dataschema.as_deref()), (None, None));
    assert!(s.extensions.is_empty(), "host, content-length are not attributes");
    round_trip_all(&s);
}

#[test]
fn http_binding_structured_examples() {
    // HTTP protocol binding 1.0.2, 3.2.4 (the omitted attributes filled in).
    let body = br#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext/subcontext",
        "id" : "1234-1234-1234",
        "time" : "2018-04-05T03:56:24Z",
        "data" : {
            "appinfoA" : "abc"
        }
    }"#;
    let s = decode_structured(body).unwrap();
    assert_eq!(
        (s.id.as_str(), s.source.as_str(), s.ty.as_str()),
        ("1234-1234-1234", "/mycontext/subcontext", "com.example.someevent")
    );
    assert_eq!(s.time, Some(utc("2018-04-05T03:56:24Z")));
    assert_eq!(s.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(s.data, Some(Data::Json(json!({"appinfoA": "abc"}))));
    round_trip_all(&s);

    // The classic XML example (core spec / JSON format 3.1): a string under text/xml is bytes.
    let body = br#"{
        "specversion" : "1.0",
        "type" : "com.github.pull.create",
        "source" : "https://github.com/cloudevents/spec/pull",
        "subject" : "123",
        "id" : "A234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "text/xml",
        "data" : "<much wow=\"xml\"/>"
    }"#;
    let s = decode_structured(body).unwrap();
    assert_eq!(s.ty, "com.github.pull.create");
    assert_eq!(s.source, "https://github.com/cloudevents/spec/pull");
    assert_eq!(s.subject.as_deref(), Some("123"));
    assert_eq!(s.id, "A234-1234-1234");
    assert_eq!(s.time, Some(utc("2018-04-05T17:31:00Z")));
    assert_eq!(s.extension("comexampleextension1"), Some("value"));
    assert_eq!(s.extension("comexampleothervalue"), Some("5"));
    assert_eq!(s.datacontenttype.as_deref(), Some("text/xml"));
    assert_eq!(s.data, Some(Data::Binary(Bytes::from_static(b"<much wow=\"xml\"/>"))));
    // Written back as a string, and as the raw body in binary mode.
    assert_eq!(to_json(&s)["data"], json!("<much wow=\"xml\"/>"));
    let (h, b) = encode_binary(&s);
    assert_eq!(h["content-type"], "text/xml");
    assert_eq!(&b[..], b"<much wow=\"xml\"/>");
    assert_eq!(h["ce-comexampleothervalue"], "5");
    round_trip_all(&s);
}

#[test]
fn http_binding_batch_example() {
    // HTTP protocol binding 1.0.2, 3.3.3, with the JSON format's batch example attributes.
    let body = br#"[
        {
            "specversion" : "1.0",
            "type" : "com.example.someevent",
            "source" : "/mycontext/4",
            "id" : "B234-1234-1234",
            "time" : "2018-04-05T17:31:00Z",
            "comexampleextension1" : "value",
            "comexampleothervalue" : 5,
            "datacontenttype" : "application/vnd.apache.thrift.binary",
            "data_base64" : "AAECAwQF/w=="
        },
        {
            "specversion" : "1.0",
            "type" : "com.example.someotherevent",
            "source" : "/mycontext/9",
            "id" : "C234-1234-1234",
            "time" : "2018-04-05T17:31:05Z",
            "comexampleextension1" : "value",
            "comexampleothervalue" : 5,
            "datacontenttype" : "application/json",
            "data" : {
                "appinfoA" : "abc",
                "appinfoB" : 123,
                "appinfoC" : true
            }
        }
    ]"#;
    let batch = decode_batch(body).unwrap();
    assert_eq!(batch.len(), 2);
    let (a, b) = (&batch[0], &batch[1]);
    assert_eq!(
        (a.ty.as_str(), a.source.as_str(), a.id.as_str()),
        ("com.example.someevent", "/mycontext/4", "B234-1234-1234")
    );
    assert_eq!(a.datacontenttype.as_deref(), Some("application/vnd.apache.thrift.binary"));
    assert_eq!(a.data, Some(Data::Binary(Bytes::from_static(&[0, 1, 2, 3, 4, 5, 0xff]))));
    assert_eq!(a.extension("comexampleothervalue"), Some("5"));
    assert_eq!(
        (b.ty.as_str(), b.source.as_str(), b.id.as_str()),
        ("com.example.someotherevent", "/mycontext/9", "C234-1234-1234")
    );
    assert_eq!(b.time, Some(utc("2018-04-05T17:31:05Z")));
    assert_eq!(b.data, Some(Data::Json(json!({"appinfoA": "abc", "appinfoB": 123, "appinfoC": true}))));
    assert_eq!(decode_batch(&encode_batch(&batch)).unwrap(), batch);
}

#[test]
fn json_format_examples() {
    // JSON event format 1.0.2, 3.1.1: binary data in data_base64.
    let body = br#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "id" : "A234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "application/vnd.apache.thrift.binary",
        "data_base64" : "3q2+7w=="
    }"#;
    let s = decode_structured(body).unwrap();
    assert_eq!(s.data, Some(Data::Binary(Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]))));
    assert_eq!(s.datacontenttype.as_deref(), Some("application/vnd.apache.thrift.binary"));
    assert_eq!(s.extension("comexampleextension1"), Some("value"));
    assert_eq!(to_json(&s)["data_base64"], json!("3q2+7w=="));
    let (_, b) = encode_binary(&s);
    assert_eq!(&b[..], &[0xde, 0xad, 0xbe, 0xef]);
    round_trip_all(&s);

    // 3.1.2 (v1.0.2): JSON data, with null attributes treated as absent.
    let body = br#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "subject": null,
        "id" : "C234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "unsetextension": null,
        "datacontenttype" : "application/json",
        "data" : {
            "appinfoA" : "abc",
            "appinfoB" : 123,
            "appinfoC" : true
        }
    }"#;
    let s = decode_structured(body).unwrap();
    assert_eq!(s.subject, None);
    assert_eq!(s.extension("unsetextension"), None);
    assert_eq!(s.extensions.len(), 2);
    assert_eq!(s.data, Some(Data::Json(json!({"appinfoA": "abc", "appinfoB": 123, "appinfoC": true}))));
    round_trip_all(&s);

    // 3.1.2: a JSON string as data, no content type.
    let body = br#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "id" : "D234-1234-1234",
        "data" : "I'm just a string"
    }"#;
    let s = decode_structured(body).unwrap();
    assert_eq!(s.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(s.data, Some(Data::Json(json!("I'm just a string"))));
    let (_, b) = encode_binary(&s);
    assert_eq!(&b[..], b"\"I'm just a string\"");
    round_trip_all(&s);
}

// ---- 4. normal form ----

#[test]
fn data_without_a_content_type_is_json() {
    let body = structured_with(|m| {
        m.insert("data".into(), json!({"a": [1, 2.5, null]}));
    });
    let s = decode_structured(&body).unwrap();
    assert_eq!(s.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(s.data, Some(Data::Json(json!({"a": [1, 2.5, null]}))));
    // Explicit JSON null is JSON data.
    let body = structured_with(|m| {
        m.insert("data".into(), Value::Null);
    });
    let s = decode_structured(&body).unwrap();
    assert_eq!(s.data, Some(Data::Json(Value::Null)));
    round_trip_all(&s);
}

#[test]
fn data_base64_without_a_content_type_is_octet_stream() {
    let body = structured_with(|m| {
        m.insert("data_base64".into(), json!("aGVsbG8="));
    });
    let s = decode_structured(&body).unwrap();
    assert_eq!(s.datacontenttype.as_deref(), Some("application/octet-stream"));
    assert_eq!(s.data, Some(Data::Binary(Bytes::from_static(b"hello"))));
    // A binary-mode body without Content-Type too.
    let h = binary_headers_without(&["content-type"]);
    let s = decode_binary(&h, b"hello").unwrap();
    assert_eq!(s.datacontenttype.as_deref(), Some("application/octet-stream"));
    assert_eq!(s.data, Some(Data::Binary(Bytes::from_static(b"hello"))));
    round_trip_all(&s);
}

#[test]
fn data_base64_under_a_json_type_is_json() {
    for ct in ["application/json", "text/json; charset=utf-8", "application/foo+json"] {
        let body = structured_with(|m| {
            m.insert("datacontenttype".into(), json!(ct));
            m.insert("data_base64".into(), json!("eyJhIjpbMSx0cnVlXX0=")); // {"a":[1,true]}
        });
        let s = decode_structured(&body).unwrap();
        assert_eq!(s.data, Some(Data::Json(json!({"a": [1, true]}))));
        assert_eq!(s.datacontenttype.as_deref(), Some(ct));
        assert_eq!(to_json(&s)["data"], json!({"a": [1, true]}));
        round_trip_all(&s);
    }
}

#[test]
fn typed_extensions_become_strings() {
    let body = structured_with(|m| {
        m.insert("flag".into(), json!(true));
        m.insert("off".into(), json!(false));
        m.insert("count".into(), json!(42));
        m.insert("neg".into(), json!(-7));
        m.insert("text".into(), json!("42"));
        m.insert("gone".into(), Value::Null);
    });
    let s = decode_structured(&body).unwrap();
    let want: BTreeMap<String, String> =
        [("count", "42"), ("flag", "true"), ("neg", "-7"), ("off", "false"), ("text", "42")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(s.extensions, want);
    assert_eq!(to_json(&s)["flag"], json!("true"));
    round_trip_all(&s);
}

#[test]
fn empty_data_is_no_data() {
    let body = structured_with(|m| {
        m.insert("datacontenttype".into(), json!("image/png"));
        m.insert("data_base64".into(), json!(""));
    });
    let s = decode_structured(&body).unwrap();
    assert_eq!(s.data, None);
    assert_eq!(s.datacontenttype.as_deref(), Some("image/png"));
    // With no content type, none is implied.
    let body = structured_with(|m| {
        m.insert("data_base64".into(), json!(""));
    });
    let s = decode_structured(&body).unwrap();
    assert_eq!((s.data, s.datacontenttype), (None, None));
    // An empty binary-mode body, even under a JSON type.
    let s = decode_binary(&binary_headers_without(&["content-type"]), b"").unwrap();
    assert_eq!((s.data.clone(), s.datacontenttype.clone()), (None, None));
    let mut h = binary_headers_without(&["content-type"]);
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let s = decode_binary(&h, b"").unwrap();
    assert_eq!((s.data.as_ref(), s.datacontenttype.as_deref()), (None, Some("application/json")));
    round_trip_all(&s);
}

#[test]
fn a_string_under_a_non_json_type_is_binary() {
    for ct in ["text/xml", "text/plain; charset=utf-8", "application/octet-stream", "image/svg+xml"] {
        let body = structured_with(|m| {
            m.insert("datacontenttype".into(), json!(ct));
            m.insert("data".into(), json!("<a b=\"c\"/> é"));
        });
        let s = decode_structured(&body).unwrap();
        assert_eq!(s.data, Some(Data::Binary(Bytes::from("<a b=\"c\"/> é"))), "{ct}");
        round_trip_all(&s);
    }
    // Text types carry UTF-8 as a string, anything else as base64.
    let text = Signal::bare("1", "/s", "t").with_binary("text/plain", "héllo");
    assert_eq!(to_json(&text)["data"], json!("héllo"));
    let not_utf8 = Signal::bare("1", "/s", "t").with_binary("text/plain", &[0xffu8, 0][..]);
    assert_eq!(to_json(&not_utf8)["data_base64"], json!("/wA="));
    let png = Signal::bare("1", "/s", "t").with_binary("image/png", "hello");
    assert_eq!(to_json(&png)["data_base64"], json!("aGVsbG8="));
    for s in [text, not_utf8, png] {
        round_trip_all(&s);
    }
}

#[test]
fn json_content_types() {
    for ct in [
        "application/json",
        "text/json",
        "application/foo+json",
        "APPLICATION/JSON; charset=utf-8",
        " application/json ",
    ] {
        assert!(is_json_content_type(ct), "{ct}");
    }
    for ct in ["text/plain", "application/jsonx", "+json", "application/json-seq", "application/xml", ""] {
        assert!(!is_json_content_type(ct), "{ct}");
    }
}

// ---- 5. causality ----

const W3C_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn caused_by_continues_the_parents_trace() {
    let parent = Signal::bare("p", "/s", "t").with_extension(TRACEPARENT, W3C_EXAMPLE);
    let child = Signal::bare("c", "/s", "t").caused_by(&parent);
    assert_eq!(child.causation_id(), Some("p"));
    let tp = TraceParent::parse(child.extension(TRACEPARENT).unwrap()).unwrap();
    let ptp = TraceParent::parse(W3C_EXAMPLE).unwrap();
    assert_eq!(tp.trace_id, ptp.trace_id);
    assert_eq!(tp.flags, ptp.flags);
    assert_ne!(tp.span_id, ptp.span_id);
    assert_eq!(child.validate(), Ok(()));
    // A grandchild stays in the same trace.
    let grandchild = Signal::bare("g", "/s", "t").caused_by(&child);
    assert_eq!(grandchild.causation_id(), Some("c"));
    let gtp = TraceParent::parse(grandchild.extension(TRACEPARENT).unwrap()).unwrap();
    assert_eq!(gtp.trace_id, ptp.trace_id);
    assert_ne!(gtp.span_id, tp.span_id);
}

#[test]
fn caused_by_a_parent_without_a_trace_starts_one() {
    for parent in [Signal::bare("p", "/s", "t"), Signal::bare("p", "/s", "t").with_extension(TRACEPARENT, "garbage")] {
        let a = Signal::bare("a", "/s", "t").caused_by(&parent);
        let b = Signal::bare("b", "/s", "t").caused_by(&parent);
        assert_eq!(a.causation_id(), Some("p"));
        let ta = TraceParent::parse(a.extension(TRACEPARENT).unwrap()).unwrap();
        let tb = TraceParent::parse(b.extension(TRACEPARENT).unwrap()).unwrap();
        assert_ne!(ta.trace_id, tb.trace_id, "each root is a new trace");
        assert_eq!(ta.flags, 1);
        assert_eq!(a.validate(), Ok(()));
    }
    // caused_by overwrites an existing cause and trace.
    let parent = Signal::bare("p", "/s", "t").with_extension(TRACEPARENT, W3C_EXAMPLE);
    let s = Signal::bare("c", "/s", "t").with_extension(CAUSATION_ID, "old").with_extension(TRACEPARENT, "x");
    let s = s.caused_by(&parent);
    assert_eq!(s.causation_id(), Some("p"));
    assert!(s.extension(TRACEPARENT).unwrap().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
}

#[test]
fn traceparent_parse_and_format() {
    let tp = TraceParent::parse(W3C_EXAMPLE).unwrap();
    assert_eq!(tp, TraceParent { trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736, span_id: 0x00f067aa0ba902b7, flags: 1 });
    assert_eq!(tp.to_string(), W3C_EXAMPLE);
    let small = TraceParent { trace_id: 1, span_id: 2, flags: 0 };
    assert_eq!(small.to_string(), "00-00000000000000000000000000000001-0000000000000002-00");
    assert_eq!(TraceParent::parse(&small.to_string()), Some(small));
    for _ in 0..100 {
        let root = TraceParent::root();
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
        let child = root.child();
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
    }
    for bad in [
        "",
        "00",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e47360-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    ] {
        assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn new_ids_are_increasing_uuid_v7() {
    let mut previous = String::new();
    for _ in 0..10_000 {
        let id = new_id();
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        assert_eq!(uuid.hyphenated().to_string(), id, "canonical lower-case form");
        assert!(id > previous, "{id} after {previous}");
        previous = id;
    }
    // From several threads at once, all distinct.
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| (0..1000).map(|_| new_id()).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
}

#[test]
fn new_signals_are_valid_and_carry_now() {
    let before = now();
    let s = Signal::new("order.placed", json!({"n": 1}));
    assert_eq!(s.validate(), Ok(()));
    assert!(s.time.unwrap() >= before);
    assert_eq!(uuid::Uuid::parse_str(&s.id).unwrap().get_version_num(), 7);
    assert_eq!(s.datacontenttype.as_deref(), Some("application/json"));
    round_trip_all(&s);
}

#[tokio::test]
async fn context_sets_the_source_and_parent() {
    let parent = Arc::new(Signal::bare("p", "/s", "t"));
    let ctx = Context { source: "/node/a".into(), parent: Some(parent.clone()) };
    let (source, got) = ctx.scope(async { (Signal::new("x", json!(null)).source, Context::current_parent()) }).await;
    assert_eq!(source, "/node/a");
    assert_eq!(got.as_deref(), Some(&*parent));
    assert!(Context::current_parent().is_none());
}

// ---- 6. journal ----

fn signal(id: &str, cause: Option<&str>) -> Signal {
    let s = Signal::bare(id, "/s", format!("t.{id}"));
    match cause {
        Some(c) => s.with_extension(CAUSATION_ID, c),
        None => s,
    }
}

fn ids(steps: &[TraceStep]) -> Vec<(&str, usize)> {
    steps.iter().map(|s| (s.id.as_str(), s.depth)).collect()
}

#[test]
fn journal_traces_a_chain() {
    let j = Journal::new(100);
    assert!(j.is_empty());
    let mut root = signal("a", None);
    root.time = Some(utc("2020-01-01T01:00:00+01:00"));
    j.record(&root);
    j.record(&signal("b", Some("a")));
    j.record(&signal("c", Some("b")));
    assert_eq!(j.len(), 3);
    let back = j.trace("c", Direction::Backward).unwrap();
    assert_eq!(ids(&back), [("c", 0), ("b", 1), ("a", 2)]);
    assert_eq!(back[0].ty, "t.c");
    assert_eq!(back[0].causationid.as_deref(), Some("b"));
    assert_eq!(back[2].time.as_deref(), Some("2020-01-01T00:00:00Z"));
    assert_eq!(back[2].causationid, None);
    assert_eq!(ids(&j.trace("a", Direction::Forward).unwrap()), [("a", 0), ("b", 1), ("c", 2)]);
    assert_eq!(ids(&j.trace("b", Direction::Forward).unwrap()), [("b", 0), ("c", 1)]);
    assert_eq!(ids(&j.trace("a", Direction::Backward).unwrap()), [("a", 0)]);
    assert_eq!(j.trace("zzz", Direction::Backward), None);
    // A cause that was never recorded ends the walk.
    j.record(&signal("x", Some("unknown")));
    assert_eq!(ids(&j.trace("x", Direction::Backward).unwrap()), [("x", 0)]);
}

#[test]
fn journal_traces_a_tree_breadth_first() {
    //        r
    //      /   \
    //     a     b
    //    / \     \
    //   a1  a2    b1
    //   |
    //  a11
    let j = Journal::new(100);
    for (id, cause) in [
        ("r", None),
        ("a", Some("r")),
        ("b", Some("r")),
        ("a1", Some("a")),
        ("b1", Some("b")),
        ("a2", Some("a")),
        ("a11", Some("a1")),
    ] {
        j.record(&signal(id, cause));
    }
    let forward = j.trace("r", Direction::Forward).unwrap();
    assert_eq!(ids(&forward), [("r", 0), ("a", 1), ("b", 1), ("a1", 2), ("a2", 2), ("b1", 2), ("a11", 3)]);
    assert_eq!(ids(&j.trace("a", Direction::Forward).unwrap()), [("a", 0), ("a1", 1), ("a2", 1), ("a11", 2)]);
    assert_eq!(ids(&j.trace("a11", Direction::Backward).unwrap()), [("a11", 0), ("a1", 1), ("a", 2), ("r", 3)]);
    assert_eq!(ids(&j.trace("b1", Direction::Backward).unwrap()), [("b1", 0), ("b", 1), ("r", 2)]);
}

#[test]
fn journal_traces_are_bounded() {
    let j = Journal::new(1000);
    j.record(&signal("s0", None));
    for i in 1..250 {
        j.record(&signal(&format!("s{i}"), Some(&format!("s{}", i - 1))));
    }
    let back = j.trace("s249", Direction::Backward).unwrap();
    assert_eq!(back.len(), TRACE_STEPS_MAX);
    assert_eq!(back.last().map(|s| (s.id.as_str(), s.depth)), Some(("s150", TRACE_STEPS_MAX - 1)));
    let forward = j.trace("s0", Direction::Forward).unwrap();
    assert_eq!(forward.len(), TRACE_STEPS_MAX);
    assert_eq!(forward.last().map(|s| (s.id.as_str(), s.depth)), Some(("s99", TRACE_STEPS_MAX - 1)));
    // A wide fan-out is bounded too.
    let j = Journal::new(1000);
    j.record(&signal("root", None));
    for i in 0..300 {
        j.record(&signal(&format!("c{i}"), Some("root")));
    }
    let forward = j.trace("root", Direction::Forward).unwrap();
    assert_eq!(forward.len(), TRACE_STEPS_MAX);
    assert!(forward[1..].iter().all(|s| s.depth == 1));
    assert_eq!(forward.last().unwrap().id, format!("c{}", TRACE_STEPS_MAX - 2));
}

#[test]
fn journal_evicts_the_oldest() {
    let j = Journal::new(10);
    j.record(&signal("s0", None));
    for i in 1..25 {
        j.record(&signal(&format!("s{i}"), Some(&format!("s{}", i - 1))));
        assert!(j.len() <= 10);
    }
    assert_eq!(j.len(), 10);
    for i in 0..15 {
        assert_eq!(j.trace(&format!("s{i}"), Direction::Backward), None, "s{i}");
        assert_eq!(j.trace(&format!("s{i}"), Direction::Forward), None, "s{i}");
    }
    let back = j.trace("s24", Direction::Backward).unwrap();
    assert_eq!(back.len(), 10);
    assert_eq!(back.last().unwrap().id, "s15");
    assert_eq!(j.trace("s15", Direction::Forward).unwrap().len(), 10);
    // A one-entry journal keeps only the last.
    let j = Journal::new(1);
    j.record(&signal("a", None));
    j.record(&signal("b", Some("a")));
    assert_eq!((j.len(), j.trace("a", Direction::Forward)), (1, None));
    assert_eq!(ids(&j.trace("b", Direction::Backward).unwrap()), [("b", 0)]);
}

#[test]
fn journal_ignores_duplicate_ids() {
    let j = Journal::new(10);
    j.record(&signal("a", None));
    j.record(&signal("b", Some("a")));
    j.record(&signal("b", Some("a")));
    j.record(&Signal::bare("a", "/other", "other").with_extension(CAUSATION_ID, "b"));
    assert_eq!(j.len(), 2);
    let a = j.trace("a", Direction::Forward).unwrap();
    assert_eq!(ids(&a), [("a", 0), ("b", 1)]);
    assert_eq!((a[0].ty.as_str(), a[0].causationid.as_deref()), ("t.a", None), "the first record stays");
}

#[test]
fn journal_walks_stop_at_cycles() {
    let j = Journal::new(10);
    // a names b as its cause before b exists; b names a.
    j.record(&signal("a", Some("b")));
    j.record(&signal("b", Some("a")));
    assert_eq!(ids(&j.trace("a", Direction::Backward).unwrap()), [("a", 0), ("b", 1)]);
    assert_eq!(ids(&j.trace("b", Direction::Backward).unwrap()), [("b", 0), ("a", 1)]);
    assert_eq!(ids(&j.trace("a", Direction::Forward).unwrap()), [("a", 0), ("b", 1)]);
    assert_eq!(ids(&j.trace("b", Direction::Forward).unwrap()), [("b", 0)]);
    // Its own cause.
    j.record(&signal("self", Some("self")));
    assert_eq!(ids(&j.trace("self", Direction::Backward).unwrap()), [("self", 0)]);
    assert_eq!(ids(&j.trace("self", Direction::Forward).unwrap()), [("self", 0)]);
    // A longer cycle.
    let j = Journal::new(10);
    j.record(&signal("x", Some("z")));
    j.record(&signal("y", Some("x")));
    j.record(&signal("z", Some("y")));
    assert_eq!(ids(&j.trace("z", Direction::Backward).unwrap()), [("z", 0), ("y", 1), ("x", 2)]);
}

/// A naive journal: every record kept in order, with the entry its cause linked to when recorded.
#[derive(Default)]
struct Model {
    /// (sequence number, id, cause, sequence number of the parent entry it was linked to)
    entries: Vec<(usize, String, Option<String>, Option<usize>)>,
    next: usize,
}

impl Model {
    fn record(&mut self, id: &str, cause: Option<&str>, len_max: usize) {
        if self.entries.iter().any(|e| e.1 == id) {
            return;
        }
        if self.entries.len() == len_max {
            self.entries.remove(0);
        }
        let parent = cause.and_then(|c| self.entries.iter().find(|e| e.1 == c)).map(|e| e.0);
        self.entries.push((self.next, id.to_string(), cause.map(str::to_string), parent));
        self.next += 1;
    }

    fn trace(&self, id: &str, direction: Direction) -> Option<Vec<(String, usize)>> {
        let start = self.entries.iter().find(|e| e.1 == id)?;
        let mut out = vec![(start.1.clone(), 0)];
        let mut seen = vec![start.1.clone()];
        match direction {
            Direction::Backward => {
                let mut cur = start;
                while out.len() < TRACE_STEPS_MAX {
                    let Some(p) = cur.2.as_ref().and_then(|c| self.entries.iter().find(|e| &e.1 == c)) else { break };
                    if seen.contains(&p.1) {
                        break;
                    }
                    seen.push(p.1.clone());
                    out.push((p.1.clone(), out.len()));
                    cur = p;
                }
            }
            Direction::Forward => {
                let mut queue = std::collections::VecDeque::from([(start.0, 0)]);
                'walk: while let Some((seq, depth)) = queue.pop_front() {
                    for child in self.entries.iter().filter(|e| e.3 == Some(seq)) {
                        if seen.contains(&child.1) {
                            continue;
                        }
                        if out.len() == TRACE_STEPS_MAX {
                            break 'walk;
                        }
                        seen.push(child.1.clone());
                        out.push((child.1.clone(), depth + 1));
                        queue.push_back((child.0, depth + 1));
                    }
                }
            }
        }
        Some(out)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The journal agrees with the naive model, however ids repeat, causes dangle and entries
    /// leave; its size stays within len_max.
    #[test]
    fn journal_agrees_with_a_naive_model(
        len_max in 1usize..12,
        // Each record: an id, and a cause that is none, any id, or the previous record (chains).
        records in prop::collection::vec((0u8..12, 0u8..4, 0u8..12), 0..80),
    ) {
        let j = Journal::new(len_max);
        let mut model = Model::default();
        let mut previous: Option<String> = None;
        for (id, kind, cause) in records {
            let id = format!("s{id}");
            let cause = match kind {
                0 => None,
                1 => Some(format!("s{cause}")),
                _ => previous.clone(),
            };
            previous = Some(id.clone());
            j.record(&signal(&id, cause.as_deref()));
            model.record(&id, cause.as_deref(), len_max);
            prop_assert!(j.len() <= len_max);
            prop_assert_eq!(j.len(), model.entries.len());
            for probe in 0..12 {
                let probe = format!("s{probe}");
                for direction in [Direction::Backward, Direction::Forward] {
                    let got = j.trace(&probe, direction).map(|steps| {
                        steps.into_iter().map(|s| (s.id, s.depth)).collect::<Vec<_>>()
                    });
                    prop_assert_eq!(got, model.trace(&probe, direction), "{} {:?}", probe, direction);
                }
            }
        }
    }
}

#[test]
fn extension_values_refuse_control_characters() {
    let s = Signal::bare("1", "/s", "t").with_extension("ext", "a\u{0}b");
    let e = s.validate().unwrap_err();
    assert_eq!(e.attribute(), Some("ext"));
    assert!(e.to_string().contains("control"), "{e}");
    let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":"a\u0007b"}"#;
    assert_eq!(decode_structured(body).unwrap_err().attribute(), Some("ext"));
}
