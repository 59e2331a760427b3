//! CloudEvents HTTP binding codecs: structured, binary and batch mode.
//!
//! - Structured (`application/cloudevents+json`): the whole event is one JSON object in the body.
//! - Binary: attributes in `ce-<name>` headers (values percent-encoded as the binding says:
//!   space, `"`, `%` and everything outside printable ASCII), `datacontenttype` in `Content-Type`,
//!   the data as the body.
//! - Batch (`application/cloudevents-batch+json`): a JSON array of structured events, at most
//!   [`BATCH_LEN_MAX`].
//!
//! Decoders validate and return the signal in the normal form described in [`super`]; for any
//! valid signal, `decode(encode(s)) == s` in each mode (property-tested). Decoders never panic on
//! any input (fuzzed): JSON nesting is bounded by serde_json's recursion limit.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use bytes::Bytes;
use chrono::DateTime;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

use super::{is_json_content_type, is_text_content_type, validate_extension_name, Data, Signal, SignalError};

/// Content type of a structured-mode body (one event).
pub const CONTENT_TYPE_STRUCTURED: &str = "application/cloudevents+json";
/// Content type of a batch-mode body (a JSON array of events).
pub const CONTENT_TYPE_BATCH: &str = "application/cloudevents-batch+json";
/// Most signals in one batch.
pub const BATCH_LEN_MAX: usize = 1000;
/// Header prefix of binary-mode attributes.
pub const HEADER_PREFIX: &str = "ce-";

const OCTET_STREAM: &str = "application/octet-stream";
/// What the binding says to percent-encode in header values (non-ASCII is always encoded).
const HEADER_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---- structured ----

/// The structured JSON object of a signal.
pub fn to_json(s: &Signal) -> Value {
    let mut m = Map::new();
    m.insert("specversion".into(), super::SPEC_VERSION.into());
    m.insert("id".into(), s.id.clone().into());
    m.insert("source".into(), s.source.clone().into());
    m.insert("type".into(), s.ty.clone().into());
    let opt = [("subject", &s.subject), ("datacontenttype", &s.datacontenttype), ("dataschema", &s.dataschema)];
    for (name, value) in opt {
        if let Some(v) = value {
            m.insert(name.into(), v.clone().into());
        }
    }
    if let Some(t) = s.time_rfc3339() {
        m.insert("time".into(), t.into());
    }
    for (name, value) in &s.extensions {
        m.insert(name.clone(), value.clone().into());
    }
    match &s.data {
        None => {}
        Some(Data::Json(v)) => {
            m.insert("data".into(), v.clone());
        }
        Some(Data::Binary(b)) => match std::str::from_utf8(b) {
            Ok(text) if s.datacontenttype.as_deref().is_some_and(is_text_content_type) => {
                m.insert("data".into(), text.into());
            }
            _ => {
                m.insert("data_base64".into(), B64.encode(b).into());
            }
        },
    }
    Value::Object(m)
}

/// The structured-mode body of a signal.
pub fn encode_structured(s: &Signal) -> Vec<u8> {
    serde_json::to_vec(&to_json(s)).expect("a JSON value always serialises")
}

/// A signal from a structured-mode body, validated and in normal form; `Malformed` if the body is
/// not a JSON object.
pub fn decode_structured(body: &[u8]) -> Result<Signal, SignalError> {
    from_json(parse(body)?)
}

fn parse(body: &[u8]) -> Result<Value, SignalError> {
    serde_json::from_slice(body).map_err(|e| SignalError::Malformed(format!("not JSON: {e}")))
}

/// A signal from its structured JSON object, validated and in normal form.
pub fn from_json(v: Value) -> Result<Signal, SignalError> {
    let Value::Object(mut m) = v else {
        return Err(SignalError::Malformed("a structured event must be a JSON object".into()));
    };
    match m.remove("specversion") {
        None | Some(Value::Null) => return Err(SignalError::Missing("specversion")),
        Some(Value::String(v)) if v == super::SPEC_VERSION => {}
        Some(other) => {
            return Err(SignalError::invalid("specversion", format!("{other} is not supported (only \"1.0\")")))
        }
    }
    let mut s =
        Signal::bare(take_required(&mut m, "id")?, take_required(&mut m, "source")?, take_required(&mut m, "type")?);
    s.subject = take_string(&mut m, "subject")?;
    s.datacontenttype = take_string(&mut m, "datacontenttype")?;
    s.dataschema = take_string(&mut m, "dataschema")?;
    if let Some(t) = take_string(&mut m, "time")? {
        s.time = Some(parse_time(&t)?);
    }
    let data = m.remove("data");
    let data_b64 = match m.remove("data_base64") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            Some(B64.decode(text).map_err(|e| SignalError::invalid("data_base64", format!("is not base64: {e}")))?)
        }
        Some(_) => return Err(SignalError::invalid("data_base64", "must be a string")),
    };
    s.data = match (data, data_b64) {
        (Some(_), Some(_)) => return Err(SignalError::invalid("data_base64", "cannot be present together with data")),
        (Some(v), None) => Some(json_data(&mut s, v)?),
        (None, Some(bytes)) => binary_data(&mut s, bytes)?,
        (None, None) => None,
    };
    for (name, value) in m {
        let text = match value {
            Value::Null => continue,
            Value::String(t) => t,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) if n.is_i64() => n.to_string(),
            _ => return Err(SignalError::invalid(&name, "must be a string, boolean or integer")),
        };
        validate_extension_name(&name)?;
        s.extensions.insert(name, text);
    }
    s.validate()?;
    Ok(s)
}

fn take_required(m: &mut Map<String, Value>, name: &'static str) -> Result<String, SignalError> {
    take_string(m, name)?.ok_or(SignalError::Missing(name))
}

fn take_string(m: &mut Map<String, Value>, name: &str) -> Result<Option<String>, SignalError> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(SignalError::invalid(name, "must be a string")),
    }
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::FixedOffset>, SignalError> {
    DateTime::parse_from_rfc3339(text)
        .map_err(|e| SignalError::invalid("time", format!("is not an RFC 3339 timestamp ({e}): {text:?}")))
}

/// `data` given as JSON: JSON data under a JSON (or no) content type; a string under another type
/// is that type's bytes.
fn json_data(s: &mut Signal, v: Value) -> Result<Data, SignalError> {
    let ct = s.datacontenttype.get_or_insert_with(|| "application/json".into());
    if is_json_content_type(ct) {
        return Ok(Data::Json(v));
    }
    match v {
        Value::String(text) if !text.is_empty() => Ok(Data::Binary(Bytes::from(text))),
        Value::String(_) => Err(SignalError::invalid("data", "is empty; leave it out instead")),
        _ => Err(SignalError::invalid("data", format!("is JSON but datacontenttype \"{ct}\" is not a JSON type"))),
    }
}

/// `data_base64` (or a binary-mode body): bytes, parsed as JSON under a JSON content type.
fn binary_data(s: &mut Signal, bytes: Vec<u8>) -> Result<Option<Data>, SignalError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let ct = s.datacontenttype.get_or_insert_with(|| OCTET_STREAM.into());
    if is_json_content_type(ct) {
        let v = serde_json::from_slice(&bytes).map_err(|e| {
            SignalError::invalid("data", format!("is not valid JSON under datacontenttype \"{ct}\": {e}"))
        })?;
        return Ok(Some(Data::Json(v)));
    }
    Ok(Some(Data::Binary(Bytes::from(bytes))))
}

// ---- batch ----

/// The batch-mode body of signals.
pub fn encode_batch(signals: &[Signal]) -> Vec<u8> {
    serde_json::to_vec(&Value::Array(signals.iter().map(to_json).collect())).expect("a JSON value always serialises")
}

/// Signals from a batch-mode body: all valid, or the first invalid one's error
/// ([`SignalError::InBatch`]); `BatchTooLarge` beyond [`BATCH_LEN_MAX`].
pub fn decode_batch(body: &[u8]) -> Result<Vec<Signal>, SignalError> {
    let Value::Array(items) = parse(body)? else {
        return Err(SignalError::Malformed("a batch must be a JSON array".into()));
    };
    if items.len() > BATCH_LEN_MAX {
        return Err(SignalError::BatchTooLarge { len: items.len(), max: BATCH_LEN_MAX });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, v)| from_json(v).map_err(|e| SignalError::InBatch { index, error: Box::new(e) }))
        .collect()
}

// ---- binary ----

/// Whether a request is in binary mode: it has a `ce-specversion` header.
pub fn is_binary_mode(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
}

/// Headers and body of a binary-mode message.
pub fn encode_binary(s: &Signal) -> (HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        let name = HeaderName::try_from(format!("{HEADER_PREFIX}{name}")).expect("attribute names are valid headers");
        let value = utf8_percent_encode(value, HEADER_ENCODE).to_string();
        h.insert(name, HeaderValue::try_from(value).expect("percent-encoded text is a valid header value"));
    };
    put("specversion", super::SPEC_VERSION);
    put("id", &s.id);
    put("source", &s.source);
    put("type", &s.ty);
    if let Some(v) = &s.subject {
        put("subject", v);
    }
    if let Some(t) = s.time_rfc3339() {
        put("time", &t);
    }
    if let Some(v) = &s.dataschema {
        put("dataschema", v);
    }
    for (name, value) in &s.extensions {
        put(name, value);
    }
    if let Some(ct) = &s.datacontenttype {
        // Validation keeps content types to printable ASCII.
        h.insert(header::CONTENT_TYPE, HeaderValue::try_from(ct.as_str()).expect("content type is printable ASCII"));
    }
    let body = match &s.data {
        None => Bytes::new(),
        Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).expect("a JSON value always serialises")),
        Some(Data::Binary(b)) => b.clone(),
    };
    (h, body)
}

/// A signal from a binary-mode message (`ce-*` headers, `Content-Type`, body), validated and in
/// normal form.
pub fn decode_binary(headers: &HeaderMap, body: &[u8]) -> Result<Signal, SignalError> {
    let mut attrs: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix(HEADER_PREFIX) else { continue };
        let mut values = headers.get_all(name).iter();
        let (Some(raw), None) = (values.next(), values.next()) else {
            return Err(SignalError::invalid(attr, "appears in more than one header"));
        };
        let text = raw.to_str().map_err(|_| SignalError::invalid(attr, "header is not visible ASCII"))?;
        let value = percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| SignalError::invalid(attr, "is not percent-encoded UTF-8"))?;
        attrs.insert(attr.to_string(), value.into_owned());
    }
    match attrs.remove("specversion") {
        None => return Err(SignalError::Missing("specversion")),
        Some(v) if v == super::SPEC_VERSION => {}
        Some(v) => return Err(SignalError::invalid("specversion", format!("\"{v}\" is not supported (only \"1.0\")"))),
    }
    if attrs.contains_key("datacontenttype") {
        return Err(SignalError::invalid(
            "datacontenttype",
            "travels in Content-Type in binary mode, not ce-datacontenttype",
        ));
    }
    let mut take = |name: &'static str| attrs.remove(name);
    let mut s = Signal::bare(
        take("id").ok_or(SignalError::Missing("id"))?,
        take("source").ok_or(SignalError::Missing("source"))?,
        take("type").ok_or(SignalError::Missing("type"))?,
    );
    s.subject = take("subject");
    s.dataschema = take("dataschema");
    if let Some(t) = take("time") {
        s.time = Some(parse_time(&t)?);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().map_err(|_| SignalError::invalid("datacontenttype", "is not printable ASCII"))?;
        s.datacontenttype = Some(ct.to_string());
    }
    s.data = binary_data(&mut s, body.to_vec())?;
    for (name, value) in attrs {
        validate_extension_name(&name)?;
        s.extensions.insert(name, value);
    }
    s.validate()?;
    Ok(s)
}
