//! Signals: CloudEvents 1.0 events, their validation, ids, causality and codecs.
//!
//! A [`Signal`] carries the CloudEvents 1.0 attributes: `id`, `source`, `type` (and the implied
//! `specversion` "1.0"), optional `subject`, `time`, `datacontenttype`, `dataschema`, `data`, and
//! extensions. Codecs for the CloudEvents HTTP binding (structured, binary and batch mode) live in
//! [`codec`].
//!
//! ## Normal form
//! Every codec must give back exactly the signal it was given, so a valid signal is in a normal
//! form in which the spec's equivalent spellings have one representation:
//! - Extension values are strings. The spec's typed values (boolean, integer, ...) all have a
//!   canonical string form, which is what the binary mode carries anyway; structured input with a
//!   boolean or integer extension is stored as its canonical string (`true`, `42`).
//! - Data present means `datacontenttype` present. Structured input with `data` and no content type
//!   gets `application/json` (the spec's implied type); with `data_base64` and none, it gets
//!   `application/octet-stream`.
//! - [`Data::Json`] goes with a JSON content type (`application/json`, `text/json`, `*/*+json`),
//!   [`Data::Binary`] with any other. Structured input with `data_base64` and a JSON type is parsed
//!   as JSON; a JSON string under a non-JSON type (`"data":"<a/>"` with `application/xml`) is
//!   binary data. Empty binary data is no data.
//! - `time` is an instant; it is written back in UTC.
//!
//! ## Causality
//! A signal published while a subscriber's handler runs (see [`Context`]) carries the extension
//! `causationid` with the parent's id and a W3C `traceparent` with the parent's trace id and a new
//! span id. A signal published with no `traceparent` starts a trace.
//!
//! ## Limits
//! String attributes hold at most [`ATTRIBUTE_LEN_MAX_BYTES`]; a signal has at most
//! [`EXTENSIONS_MAX`] extensions. The data is bounded by the transport and the HTTP body limit;
//! JSON data nests at most [`JSON_DEPTH_MAX`] arrays and objects deep (what every codec can decode).
//! `time` is within the years 0000-9999 in UTC (what RFC 3339 can write).

pub mod codec;
pub mod journal;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use chrono::{DateTime, Datelike, FixedOffset, SecondsFormat, Utc};
use uuid::timestamp::context::ContextV7;
use uuid::Uuid;

/// The only `specversion` accepted.
pub const SPEC_VERSION: &str = "1.0";
pub use crate::config::ATTRIBUTE_LEN_MAX_BYTES;
/// Most extensions on one signal.
pub const EXTENSIONS_MAX: usize = 64;
/// Deepest nesting of arrays and objects in JSON data: serde_json parses at most 127 levels, and
/// a structured event adds one (its object) and a batch two (its array and the object).
pub const JSON_DEPTH_MAX: usize = 100;
/// Longest extension name (the spec's limit).
pub const EXTENSION_NAME_LEN_MAX: usize = 20;
/// Extension carrying the id of the signal whose handling emitted this one.
pub const CAUSATION_ID: &str = "causationid";
/// Extension carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Source of signals made outside any node.
pub const SOURCE_FALLBACK: &str = "cadre";

/// Attribute names an extension may not take.
const RESERVED: &[&str] =
    &["id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema", "data", "data_base64"];

/// A signal's payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// JSON data, under a JSON content type.
    Json(serde_json::Value),
    /// Opaque bytes, under a non-JSON content type; never empty.
    Binary(Bytes),
}

/// A CloudEvents 1.0 event.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// `id`: unique per `source` (a UUIDv7 for signals made here).
    pub id: String,
    /// `source`: where the signal comes from (a URI reference; a node's is `[signals] source`, by
    /// default `cadre://<cluster>/<node>`).
    pub source: String,
    /// `type`: dot-separated (`order.placed`); routes and subscriptions match on it.
    pub ty: String,
    /// `subject`: what the signal is about, within the source.
    pub subject: Option<String>,
    /// `time`: when it happened.
    pub time: Option<DateTime<FixedOffset>>,
    /// `datacontenttype`: the media type of `data`; present when `data` is.
    pub datacontenttype: Option<String>,
    /// `dataschema`: a URI of the schema `data` adheres to.
    pub dataschema: Option<String>,
    /// `data`: the payload.
    pub data: Option<Data>,
    /// Extension attributes by name, in their canonical string form.
    pub extensions: BTreeMap<String, String>,
}

/// Why a signal is invalid. The message names the attribute and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// A required attribute is missing or empty.
    #[error("missing attribute \"{0}\"")]
    Missing(&'static str),
    /// An attribute has a value that is not allowed.
    #[error("attribute \"{attribute}\" {reason}")]
    Invalid {
        /// The attribute's name.
        attribute: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// An extension name with characters other than `a-z` and `0-9`.
    #[error("extension name \"{0}\" is not lower-case alphanumeric")]
    ExtensionName(String),
    /// An extension name longer than [`EXTENSION_NAME_LEN_MAX`].
    #[error("extension name \"{0}\" is longer than {EXTENSION_NAME_LEN_MAX} characters")]
    ExtensionNameLen(String),
    /// An extension named as a CloudEvents attribute (`id`, `data`, ...).
    #[error("extension name \"{0}\" is a reserved attribute name")]
    ExtensionReserved(String),
    /// More than [`EXTENSIONS_MAX`] extensions.
    #[error("more than {EXTENSIONS_MAX} extensions")]
    TooManyExtensions,
    /// Not a CloudEvent at all (not JSON, not an object, a batch that is not an array, ...).
    #[error("malformed: {0}")]
    Malformed(String),
    /// A batch with more signals than allowed.
    #[error("batch of {len} signals exceeds {max}")]
    BatchTooLarge {
        /// Signals in the batch.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// A signal of a batch is invalid (the whole batch is refused).
    #[error("signal #{index}: {error}")]
    InBatch {
        /// The signal's position in the batch (0-based).
        index: usize,
        /// What is wrong with it.
        error: Box<SignalError>,
    },
}

impl SignalError {
    pub(crate) fn invalid(attribute: &str, reason: impl Into<String>) -> Self {
        SignalError::Invalid { attribute: attribute.to_string(), reason: reason.into() }
    }

    /// The attribute at fault, when there is one.
    pub fn attribute(&self) -> Option<&str> {
        match self {
            SignalError::Missing(a) => Some(a),
            SignalError::Invalid { attribute, .. } => Some(attribute),
            SignalError::ExtensionName(n) | SignalError::ExtensionNameLen(n) | SignalError::ExtensionReserved(n) => {
                Some(n)
            }
            SignalError::InBatch { error, .. } => error.attribute(),
            _ => None,
        }
    }
}

/// Whether a media type carries JSON: `application/json`, `text/json` or `*/*+json` (parameters
/// after `;` ignored, case-insensitive).
pub fn is_json_content_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    media == "application/json" || media == "text/json" || (media.contains('/') && media.ends_with("+json"))
}

/// Whether binary data of this type is text (written as a string in structured mode when UTF-8).
pub(crate) fn is_text_content_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    media.starts_with("text/") || media == "application/xml" || media.ends_with("+xml")
}

impl Signal {
    /// A signal of type `ty` with JSON data, a fresh UUIDv7 id, the current time, and the source
    /// of the node whose handler is running (or the process default, see [`set_default_source`]).
    pub fn new(ty: impl Into<String>, data: serde_json::Value) -> Signal {
        let mut s = Signal::bare(new_id(), current_source(), ty);
        s.time = Some(now());
        s.datacontenttype = Some("application/json".into());
        s.data = Some(Data::Json(data));
        s
    }

    /// A signal with only the required attributes.
    pub fn bare(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Signal {
        Signal {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Replaces the data with bytes of a (non-JSON) content type.
    pub fn with_binary(mut self, content_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        self.datacontenttype = Some(content_type.into());
        self.data = Some(Data::Binary(data.into()));
        self
    }

    /// Sets an extension attribute (checked by [`Signal::validate`]).
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// An extension attribute's value.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }

    /// The id of the signal whose handling emitted this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.extension(CAUSATION_ID)
    }

    /// Marks this signal as emitted while handling `parent`: `causationid` = the parent's id and a
    /// `traceparent` in the parent's trace (a new trace when the parent has none).
    pub fn caused_by(mut self, parent: &Signal) -> Self {
        self.extensions.insert(CAUSATION_ID.into(), parent.id.clone());
        let tp = match parent.extension(TRACEPARENT).and_then(TraceParent::parse) {
            Some(p) => p.child(),
            None => TraceParent::root(),
        };
        self.extensions.insert(TRACEPARENT.into(), tp.to_string());
        self
    }

    /// Checks every rule of the module docs; the error names the first attribute at fault.
    pub fn validate(&self) -> Result<(), SignalError> {
        required("id", &self.id)?;
        required("source", &self.source)?;
        required("type", &self.ty)?;
        optional("subject", self.subject.as_deref())?;
        optional("datacontenttype", self.datacontenttype.as_deref())?;
        if let Some(ct) = &self.datacontenttype {
            // It travels as an HTTP header in binary mode.
            if !ct.bytes().all(|b| (0x20..0x7f).contains(&b)) || ct.trim() != ct {
                return Err(SignalError::invalid(
                    "datacontenttype",
                    "is not printable ASCII without surrounding spaces",
                ));
            }
        }
        if self.time.is_some_and(|t| !(0..=9999).contains(&t.with_timezone(&Utc).year())) {
            return Err(SignalError::invalid("time", "is outside the years 0000-9999 (in UTC) RFC 3339 can write"));
        }
        optional("dataschema", self.dataschema.as_deref())?;
        if self.extensions.len() > EXTENSIONS_MAX {
            return Err(SignalError::TooManyExtensions);
        }
        for (name, value) in &self.extensions {
            validate_extension_name(name)?;
            check_text(name, value)?;
        }
        if let Some(tp) = self.extension(TRACEPARENT) {
            if TraceParent::parse(tp).is_none() {
                return Err(SignalError::invalid(
                    TRACEPARENT,
                    "is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
                ));
            }
        }
        self.validate_data()
    }

    fn validate_data(&self) -> Result<(), SignalError> {
        let Some(data) = &self.data else { return Ok(()) };
        let Some(ct) = self.datacontenttype.as_deref() else {
            return Err(SignalError::invalid("datacontenttype", "is required when data is present"));
        };
        match data {
            Data::Json(v) if json_deeper_than(v, JSON_DEPTH_MAX) => {
                Err(SignalError::invalid("data", format!("nests deeper than {JSON_DEPTH_MAX} arrays and objects")))
            }
            Data::Json(_) if !is_json_content_type(ct) => {
                Err(SignalError::invalid("data", format!("is JSON but datacontenttype \"{ct}\" is not a JSON type")))
            }
            Data::Binary(b) if b.is_empty() => Err(SignalError::invalid("data", "is empty; leave it out instead")),
            Data::Binary(_) if is_json_content_type(ct) => {
                Err(SignalError::invalid("data", format!("is bytes but datacontenttype \"{ct}\" is a JSON type")))
            }
            _ => Ok(()),
        }
    }

    /// `time` as RFC 3339 in UTC, nanoseconds when present.
    pub fn time_rfc3339(&self) -> Option<String> {
        self.time.map(rfc3339)
    }
}

impl Signal {
    /// About how many bytes of memory the signal holds (its strings, extensions and data, with a
    /// per-value overhead for JSON); what bounded queues count.
    pub fn size_hint_bytes(&self) -> usize {
        const ENTRY_OVERHEAD_BYTES: usize = 48;
        let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        let attrs = self.id.len()
            + self.source.len()
            + self.ty.len()
            + opt(&self.subject)
            + opt(&self.datacontenttype)
            + opt(&self.dataschema);
        let exts: usize = self.extensions.iter().map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD_BYTES).sum();
        let data = match &self.data {
            None => 0,
            Some(Data::Binary(b)) => b.len(),
            Some(Data::Json(v)) => json_size_bytes(v),
        };
        std::mem::size_of::<Signal>() + attrs + exts + data
    }
}

/// Memory held by a JSON value: each value's own size, plus strings and keys, plus a per-entry
/// overhead for objects (without recursion).
fn json_size_bytes(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    const VALUE_BYTES: usize = std::mem::size_of::<Value>();
    const MAP_ENTRY_OVERHEAD_BYTES: usize = 32;
    let mut total = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += VALUE_BYTES;
        match v {
            Value::String(s) => total += s.len(),
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(m) => {
                total += m.keys().map(|k| k.len() + MAP_ENTRY_OVERHEAD_BYTES).sum::<usize>();
                stack.extend(m.values());
            }
            _ => {}
        }
    }
    total
}

/// Whether arrays and objects nest more than `max` deep in `v` (without recursion: `v` may be
/// deeper than the stack allows).
fn json_deeper_than(v: &serde_json::Value, max: usize) -> bool {
    use serde_json::Value;
    // Each value with the number of arrays and objects around it.
    let mut stack = vec![(v, 0)];
    while let Some((v, around)) = stack.pop() {
        match v {
            Value::Array(_) | Value::Object(_) if around == max => return true,
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, around + 1))),
            Value::Object(m) => stack.extend(m.values().map(|c| (c, around + 1))),
            _ => {}
        }
    }
    false
}

fn required(attribute: &'static str, value: &str) -> Result<(), SignalError> {
    if value.is_empty() {
        return Err(SignalError::Missing(attribute));
    }
    check_text(attribute, value)
}

fn optional(attribute: &'static str, value: Option<&str>) -> Result<(), SignalError> {
    match value {
        Some("") => Err(SignalError::invalid(attribute, "is empty")),
        Some(v) => check_text(attribute, v),
        None => Ok(()),
    }
}

fn check_text(attribute: &str, value: &str) -> Result<(), SignalError> {
    if value.len() > ATTRIBUTE_LEN_MAX_BYTES {
        return Err(SignalError::invalid(attribute, format!("is longer than {ATTRIBUTE_LEN_MAX_BYTES} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(SignalError::invalid(attribute, "contains control characters"));
    }
    Ok(())
}

/// Extension names: `[a-z0-9]{1,20}`, not a core attribute name.
pub fn validate_extension_name(name: &str) -> Result<(), SignalError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(SignalError::ExtensionName(name.to_string()));
    }
    if name.len() > EXTENSION_NAME_LEN_MAX {
        return Err(SignalError::ExtensionNameLen(name.to_string()));
    }
    if RESERVED.contains(&name) {
        return Err(SignalError::ExtensionReserved(name.to_string()));
    }
    Ok(())
}

/// A time as signals write it: RFC 3339 in UTC, with the fraction it has.
pub fn rfc3339(t: DateTime<FixedOffset>) -> String {
    t.with_timezone(&Utc).to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A fresh UUIDv7, ordered within the process (one shared counter context).
pub fn new_id() -> String {
    static CONTEXT: Mutex<ContextV7> = Mutex::new(ContextV7::new());
    let since = crate::clock::wall_since_epoch();
    let ts = uuid::Timestamp::from_unix(&CONTEXT, since.as_secs(), since.subsec_nanos());
    Uuid::new_v7(ts).to_string()
}

/// The current (possibly simulated) wall time.
pub fn now() -> DateTime<FixedOffset> {
    let since = crate::clock::wall_since_epoch();
    DateTime::from_timestamp(since.as_secs() as i64, since.subsec_nanos()).unwrap_or_default().fixed_offset()
}

static DEFAULT_SOURCE: RwLock<Option<Arc<str>>> = RwLock::new(None);

/// Sets the source of signals made outside any handler, unless one is set already (the first
/// node started in a process sets it to its own source).
pub fn set_default_source(source: &str) {
    let mut s = DEFAULT_SOURCE.write().unwrap_or_else(|e| e.into_inner());
    if s.is_none() {
        *s = Some(source.into());
    }
}

fn current_source() -> String {
    if let Ok(s) = CONTEXT.try_with(|c| c.source.clone()) {
        return s.to_string();
    }
    let s = DEFAULT_SOURCE.read().unwrap_or_else(|e| e.into_inner());
    s.as_deref().unwrap_or(SOURCE_FALLBACK).to_string()
}

tokio::task_local! {
    static CONTEXT: Context;
}

/// What a handler runs within: its node's source and the signal being handled. Signals made with
/// [`Signal::new`] take the source; signals published take the parent as their cause.
#[derive(Clone)]
pub struct Context {
    /// The node's source: the `source` of signals made with [`Signal::new`].
    pub source: Arc<str>,
    /// The signal being handled, if any: the cause of signals published meanwhile.
    pub parent: Option<Arc<Signal>>,
}

impl Context {
    /// Runs `fut` within this context.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CONTEXT.scope(self, fut).await
    }

    /// The signal whose handler is running on this task, if any.
    pub fn current_parent() -> Option<Arc<Signal>> {
        CONTEXT.try_with(|c| c.parent.clone()).ok().flatten()
    }
}

/// A W3C trace context `traceparent` value (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace's id (16 bytes, never 0).
    pub trace_id: u128,
    /// The span's id (8 bytes, never 0).
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` (lower case, non-zero ids);
    /// `None` for anything else.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut parts = text.split('-');
        let (v, t, s, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |p: &str, len: usize| p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if parts.next().is_some() || v != "00" || !hex(t, 32) || !hex(s, 16) || !hex(f, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(t, 16).ok()?;
        let span_id = u64::from_str_radix(s, 16).ok()?;
        // All-zero ids are invalid by the spec.
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceParent { trace_id, span_id, flags: u8::from_str_radix(f, 16).ok()? })
    }

    /// A new trace, sampled.
    pub fn root() -> TraceParent {
        TraceParent { trace_id: rand::random::<u128>() | 1, span_id: rand::random::<u64>() | 1, flags: 1 }
    }

    /// The same trace, a new span.
    pub fn child(&self) -> TraceParent {
        TraceParent { span_id: rand::random::<u64>() | 1, ..*self }
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}
