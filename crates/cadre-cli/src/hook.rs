//! A webhook receiver on loopback (the demo's, and the real-process tests'): each request's
//! subject and whether its signature verified go to a channel.

use std::net::SocketAddr;

use anyhow::Result;

/// Requests the receiver holds for its reader; more wait (the webhook's sender waits too).
const RECEIVED_LEN_MAX: usize = 1024;

/// A webhook receiver on loopback, at any path: sends each request's subject and whether its
/// signature verified.
pub async fn webhook_receiver(
    secret: &'static str,
) -> Result<(SocketAddr, tokio::sync::mpsc::Receiver<(String, bool)>)> {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::HeaderMap;
    type Tx = tokio::sync::mpsc::Sender<(String, bool)>;
    let (tx, rx) = tokio::sync::mpsc::channel(RECEIVED_LEN_MAX);
    let app = axum::Router::new()
        .fallback(axum::routing::post(move |State(tx): State<Tx>, headers: HeaderMap, body: Bytes| async move {
            let now = cadre::clock::wall_since_epoch().as_secs();
            let signed = headers
                .get(cadre::webhook::SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|h| cadre::webhook::verify(secret.as_bytes(), h, &body, now, 300));
            let subject = cadre::signal::codec::decode_structured(&body)
                .ok()
                .and_then(|s| s.subject)
                .unwrap_or_else(|| "(no subject)".into());
            let _ = tx.send((subject, signed)).await;
            "ok"
        }))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, rx))
}
