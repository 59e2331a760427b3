//! Webhook delivery: POST the structured CloudEvent, sign it, retry, and break the circuit.
//!
//! - Request: `POST <url>` with `Content-Type: application/cloudevents+json` and the structured
//!   event as body. With a secret, header `x-cadre-signature: t=<unix seconds>,v1=<hex
//!   HMAC-SHA256(secret, "<t>.<body>")>`; receivers check it with [`verify`] and refuse old `t`.
//! - Success is a 2xx answer within `webhook_timeout_ms`. A 4xx other than 408 and 429 is the
//!   receiver refusing this signal: no retry, dead letter at once. Anything else (5xx, 408, 429,
//!   connection errors, timeouts) is retried up to `webhook_retries_max` times, waiting
//!   `webhook_backoff_min_ms * 2^k` (capped at `webhook_backoff_max_ms`) with jitter: a uniformly
//!   random delay in [d/2, d], so many failing subscriptions do not retry in lock step.
//! - One breaker per target URL, shared by the subscriptions posting there: `breaker_failures_max`
//!   consecutive failed attempts open it; while open, attempts fail at once without a request;
//!   after `breaker_cooldown_ms` it half-opens and lets one trial through, whose result closes or
//!   re-opens it.
//!
//! Caveats: plain `http://` only (no TLS client yet); URLs with credentials are refused (they
//! would show in listings); answer bodies are read up to 64 KiB and ignored.

use std::sync::Mutex;
use std::time::Duration;

use axum::http::{header, Request, StatusCode, Uri};
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{lock, Inner, Outcome};
use crate::metrics::label;
use crate::signal::codec::{encode_structured, CONTENT_TYPE_STRUCTURED};
use crate::signal::Signal;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-cadre-signature";
/// Idle pooled connections kept per host.
const POOL_IDLE_PER_HOST_MAX: usize = 8;
const POOL_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Most of a receiver's answer body read (to reuse the connection); the rest is dropped.
const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest webhook URL accepted.
const URL_LEN_MAX: usize = 2048;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Where and how to post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The receiver's URL (`http://` only).
    pub url: String,
    /// Signs every post with this secret ([`SIGNATURE_HEADER`]); unsigned without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl WebhookSpec {
    /// Posts to `url`, unsigned.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), secret: None }
    }

    /// Signs the posts with `secret`.
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Checks the URL (at most 2048 bytes, `http://`, a host, no credentials) and that a given
    /// secret is not empty; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.len() > URL_LEN_MAX {
            return Err(format!("url is longer than {URL_LEN_MAX} bytes"));
        }
        let uri: Uri = self.url.parse().map_err(|e| format!("url {:?} is not a URL: {e}", self.url))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("url {:?} must start with http:// (https is not supported yet)", self.url));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("url {:?} has no host", self.url));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // It would be shown in subscription lists and dead letters.
            return Err("url must not carry credentials (user:password@); use the secret".into());
        }
        if self.secret.as_deref() == Some("") {
            return Err("secret is empty (leave it out for unsigned posts)".into());
        }
        Ok(())
    }
}

pub(crate) type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
        .pool_idle_timeout(Duration::from_millis(POOL_IDLE_TIMEOUT_MS))
        .build_http()
}

/// The signature header value for `body` sent at `t` (unix seconds).
/// HMAC-SHA256 over `"<t>.<body>"`.
fn mac(secret: &[u8], t: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The [`SIGNATURE_HEADER`] value for `body` posted at `t` (unix seconds):
/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let digest = mac(secret, t, body).finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Checks a signature header (constant-time), refusing a `t` more than `tolerance_s` from `now_s`
/// (both unix seconds). True if `header` signs `body` with `secret`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_s: u64, tolerance_s: u64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    if t.abs_diff(now_s) > tolerance_s || v1.len() != 64 || !v1.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let Some(expected) =
        (0..32).map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    mac(secret, t, body).verify_slice(&expected).is_ok()
}

/// A circuit breaker for one URL.
#[derive(Debug)]
pub(crate) enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial is in flight.
    HalfOpen,
}

impl Breaker {
    pub(crate) fn new() -> Self {
        Breaker::Closed { failures: 0 }
    }

    pub(crate) fn state_name(&self) -> &'static str {
        match self {
            Breaker::Closed { .. } => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen => "half_open",
        }
    }

    /// Whether an attempt may go out now.
    fn allow(&mut self, now: Instant) -> bool {
        match *self {
            Breaker::Closed { .. } => true,
            Breaker::Open { until } if now >= until => {
                *self = Breaker::HalfOpen;
                true
            }
            Breaker::Open { .. } | Breaker::HalfOpen => false,
        }
    }

    fn success(&mut self) {
        *self = Breaker::Closed { failures: 0 };
    }

    /// Records a failed attempt; true if this opened the breaker.
    fn failure(&mut self, now: Instant, failures_max: u32, cooldown: Duration) -> bool {
        match *self {
            Breaker::Closed { failures } if failures + 1 < failures_max => {
                *self = Breaker::Closed { failures: failures + 1 };
                false
            }
            Breaker::Open { .. } => false,
            _ => {
                *self = Breaker::Open { until: now + cooldown };
                true
            }
        }
    }
}

enum Attempt {
    Ok,
    /// Worth retrying.
    Retry(String),
    /// The receiver refused this signal.
    Refused(String),
}

/// Delivers one signal with retries; the outcome says how many requests were tried.
pub(crate) async fn deliver(
    inner: &Inner,
    spec: &WebhookSpec,
    breaker: &Mutex<Breaker>,
    cancel: &CancellationToken,
    signal: &Signal,
) -> Outcome {
    let cfg = &inner.cfg;
    let body = Bytes::from(encode_structured(signal));
    let attempts_max = 1 + cfg.webhook_retries_max;
    let mut attempts = 0;
    let mut last = String::new();
    for k in 0..attempts_max {
        if k > 0 {
            let delay = backoff(cfg.webhook_backoff_min_ms, cfg.webhook_backoff_max_ms, k - 1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {
                    return Outcome::Failed { attempts, reason: format!("unsubscribed or shutting down; last error: {last}") };
                }
            }
        }
        if !lock(breaker).allow(Instant::now()) {
            last = "circuit open".into();
            inner.metrics.webhook_attempts.get_or_create(&label("outcome", "breaker_open")).inc();
            continue;
        }
        attempts += 1;
        let result = tokio::select! {
            r = attempt(inner, spec, body.clone()) => r,
            _ = cancel.cancelled() => {
                // The trial (if it was one) never finished: let the next one through.
                let mut b = lock(breaker);
                if matches!(*b, Breaker::HalfOpen) {
                    *b = Breaker::Open { until: Instant::now() };
                }
                return Outcome::Failed { attempts, reason: "unsubscribed or shutting down during a request".into() };
            }
        };
        let now = Instant::now();
        match result {
            Attempt::Ok => {
                lock(breaker).success();
                inner.metrics.webhook_attempts.get_or_create(&label("outcome", "ok")).inc();
                return Outcome::Delivered { attempts };
            }
            Attempt::Refused(reason) => {
                // The receiver is up and answered; that is not a failure of the URL.
                lock(breaker).success();
                inner.metrics.webhook_attempts.get_or_create(&label("outcome", "refused")).inc();
                return Outcome::Failed { attempts, reason };
            }
            Attempt::Retry(reason) => {
                inner.metrics.webhook_attempts.get_or_create(&label("outcome", "failed")).inc();
                let cooldown = Duration::from_millis(cfg.breaker_cooldown_ms);
                if lock(breaker).failure(now, cfg.breaker_failures_max, cooldown) {
                    inner.metrics.breaker_opened.inc();
                    tracing::warn!(url = %spec.url, "webhook circuit breaker opened");
                }
                last = reason;
            }
        }
    }
    Outcome::Failed { attempts, reason: format!("gave up after {attempts} attempts: {last}") }
}

async fn attempt(inner: &Inner, spec: &WebhookSpec, body: Bytes) -> Attempt {
    let mut req = Request::post(spec.url.as_str())
        .header(header::CONTENT_TYPE, CONTENT_TYPE_STRUCTURED)
        .header(header::USER_AGENT, concat!("cadre/", env!("CARGO_PKG_VERSION")));
    if let Some(secret) = &spec.secret {
        let t = crate::clock::wall_since_epoch().as_secs();
        req = req.header(SIGNATURE_HEADER, signature(secret.as_bytes(), t, &body));
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return Attempt::Refused(format!("cannot build the request: {e}")),
    };
    let timeout = Duration::from_millis(inner.cfg.webhook_timeout_ms);
    let started = Instant::now();
    match tokio::time::timeout(timeout, inner.http.request(req)).await {
        Err(_) => Attempt::Retry(format!("no answer within {}ms", timeout.as_millis())),
        Ok(Err(e)) => Attempt::Retry(format!("request failed: {e}")),
        Ok(Ok(res)) => {
            let status = res.status();
            // Read the (usually empty) answer so the connection goes back to the pool; a large one
            // is cut off and its connection closed.
            let rest = timeout.saturating_sub(started.elapsed());
            let body = http_body_util::Limited::new(res.into_body(), RESPONSE_BODY_BYTES_MAX);
            let _ = tokio::time::timeout(rest, http_body_util::BodyExt::collect(body)).await;
            if status.is_success() {
                Attempt::Ok
            } else if status.is_client_error()
                && status != StatusCode::REQUEST_TIMEOUT
                && status != StatusCode::TOO_MANY_REQUESTS
            {
                Attempt::Refused(format!("receiver answered {status}"))
            } else {
                Attempt::Retry(format!("receiver answered {status}"))
            }
        }
    }
}

/// Delay before retry `k` (0-based): `min * 2^k` capped at `max`, uniformly jittered into [d/2, d].
pub(crate) fn backoff(min_ms: u64, max_ms: u64, k: u32) -> Duration {
    let d = min_ms.saturating_mul(1u64 << k.min(32)).min(max_ms).max(1);
    Duration::from_millis(rand::random_range(d.div_ceil(2)..=d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_tampering() {
        let h = signature(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="), "{h}");
        assert!(verify(b"s3cret", &h, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify(b"s3cret", &h, b"{\"a\":2}", 1_700_000_010, 300), "other body");
        assert!(!verify(b"other", &h, b"{\"a\":1}", 1_700_000_010, 300), "other secret");
        assert!(!verify(b"s3cret", &h, b"{\"a\":1}", 1_700_001_000, 300), "too old");
        assert!(!verify(b"s3cret", "t=1,v1=zz", b"", 1, 300), "malformed");
        let non_ascii = format!("t=1,v1=a\u{e9}{}", "0".repeat(61));
        assert_eq!(non_ascii.len() - "t=1,v1=".len(), 64);
        assert!(!verify(b"s3cret", &non_ascii, b"", 1, 300), "non-ASCII, no panic");
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let now = Instant::now();
        let cool = Duration::from_secs(10);
        let mut b = Breaker::new();
        assert!(!b.failure(now, 3, cool));
        assert!(!b.failure(now, 3, cool));
        assert!(b.failure(now, 3, cool), "third failure opens");
        assert!(!b.allow(now + Duration::from_secs(1)), "open refuses");
        assert!(b.allow(now + cool), "after the cool-down one trial passes");
        assert_eq!(b.state_name(), "half_open");
        assert!(!b.allow(now + cool), "only one trial at a time");
        assert!(b.failure(now + cool, 3, cool), "a failed trial re-opens");
        assert!(b.allow(now + cool * 2));
        b.success();
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        for k in 0..10 {
            let d = backoff(100, 1000, k).as_millis() as u64;
            let full = (100u64 << k).min(1000);
            assert!((full / 2..=full).contains(&d), "k={k} d={d}");
        }
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert!(WebhookSpec::new("http://127.0.0.1:9/hook").validate().is_ok());
        assert!(WebhookSpec::new("https://example.com/").validate().unwrap_err().contains("http://"));
        assert!(WebhookSpec::new("not a url").validate().is_err());
        assert!(WebhookSpec::new("http://x/").with_secret("").validate().is_err());
        assert!(WebhookSpec::new("http://u:p@x/").validate().unwrap_err().contains("credentials"));
    }
}
