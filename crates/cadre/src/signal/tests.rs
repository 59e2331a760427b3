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
    // The extremes RFC 3339 can write.
    for text in ["0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z", "9999-12-31T18:59:59-05:00"] {
        s.time = Some(utc(text));
        round_trip_all(&s);
    }
}

#[test]
fn probe() {
    let mut s = Signal::bare("1", "/s", "t");
    s.time = Some(Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap().fixed_offset());
    println!("validate {:?} text {:?}", s.validate(), s.time_rfc3339());
    println!("decode {:?}", decode_structured(&encode_structured(&s)).map(|_| ()));
    s.time = Some(utc("9999-12-31T23:00:00-05:00"));
    println!("validate {:?} text {:?}", s.validate(), s.time_rfc3339());
    println!("decode {:?}", decode_structured(&encode_structured(&s)).map(|_| ()));
    s.time = Some(Utc.with_ymd_and_hms(-1, 12, 31, 23, 59, 59).unwrap().fixed_offset());
    println!("validate {:?} text {:?}", s.validate(), s.time_rfc3339());
    println!("decode {:?}", decode_structured(&encode_structured(&s)).map(|_| ()));
    s.time = None;
    for depth in [120usize, 125, 126, 127, 128, 129] {
        let v = (0..depth).fold(json!(1), |v, _| json!([v]));
        s.datacontenttype = Some("application/json".into());
        s.data = Some(Data::Json(v));
        let (h, b) = encode_binary(&s);
        println!(
            "depth {depth}: validate {:?} structured {:?} binary {:?} batch {:?}",
            s.validate().is_ok(),
            decode_structured(&encode_structured(&s)).is_ok(),
            decode_binary(&h, &b).is_ok(),
            decode_batch(&encode_batch(&[s.clone()])).is_ok()
        );
    }
}
