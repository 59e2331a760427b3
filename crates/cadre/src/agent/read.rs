//! Reads of an agent's stored state outside its activation ([`Host::read`](super::Host::read)).
//!
//! The state is decoded from the store, the type's handler runs on that copy, and the read fails
//! with [`CallError::NotRead`] if the handler changed the state or emitted anything: nothing is
//! written, no activation starts, no mailbox is used. The gate is not asked; the caller decides
//! whether this node's copy may be read.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use super::activation::{decode, encode, hook};
use super::host::HostInner;
use super::{handled, reminders, Agent, CallError, Ctx, Reply, Unavailable};
use crate::signal::Signal;
use crate::storage::Key;

/// One read ([`Host::read`]) of a type: decode the stored state, run the handler on it, and
/// check that it left the state as it was and emitted nothing.
pub(super) async fn read<A: Agent>(host: &HostInner, key: &Key, query: Option<Signal>) -> Result<Reply, CallError> {
    let found = host.storage.get(key).await.map_err(CallError::Storage)?;
    let (stored, revision) = found.map(|v| (v.value, v.revision)).unwrap_or_default();
    let (_, extra, stored) =
        handled::decode_stored(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    if query.as_ref().is_some_and(|q| q.ty == reminders::OP_LIST) {
        let rem = reminders::Stored::decode(&extra).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        return Ok(reminders::list_reply(&rem.list));
    }
    let mut agent = decode::<A>(&stored).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    let Some(signal) = query else {
        let state = encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
        return serde_json::from_slice(&state).map_err(|e| CallError::Unavailable(Unavailable::State(e.to_string())));
    };
    let mut ctx = Ctx::new(key.clone(), revision, Duration::from_millis(host.cfg.call_timeout_ms));
    ctx.reading = true;
    // Derived fields (`serde(skip)`) are set up as in an activation; what the hook changes or
    // emits is the activation's, not the read's (and, as the read, is not kept).
    hook(key, "on_activate", agent.on_activate(&mut ctx)).await;
    ctx.begin(&signal);
    let before = encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))?;
    let ty = signal.ty.clone();
    let outcome = AssertUnwindSafe(agent.handle(&mut ctx, signal)).catch_unwind().await;
    let reply = match outcome {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return Err(CallError::Handler(e.to_string())),
        Err(_) => return Err(CallError::Handler("handler panicked".into())),
    };
    if !ctx.emitted.is_empty() || !ctx.casts.is_empty() {
        return Err(CallError::NotRead(format!("{ty:?} emitted {} signals", ctx.emitted.len() + ctx.casts.len())));
    }
    if encode(&agent).map_err(|e| CallError::Unavailable(Unavailable::State(e)))? != before {
        return Err(CallError::NotRead(format!("{ty:?} changed the state of {key:?}")));
    }
    Ok(reply)
}
