//! Agents that call agents: replies, casts, call chains, cycles and retries.

use super::*;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::AgentsConfig;
use crate::signal::Signal;
use crate::storage::memory::MemoryStorage;
use crate::storage::Key;
use serde::Deserialize;

const T: Duration = Duration::from_secs(10);

/// `relay.go` `{"path": [ids], "fail": bool, "cast": bool}`: with a path, calls (or, with
/// `cast`, casts to) the relay of the first id with the rest of the path, and answers the depth
/// below it (or the call's error, as `{"error"}`); at the end of a path, counts itself and
/// answers 0. `fail` fails the call after its own call went out.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Relay {
    handled: i64,
}

#[derive(Deserialize)]
struct Go {
    #[serde(default)]
    path: Vec<String>,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    cast: bool,
}

impl Agent for Relay {
    const TYPE: &'static str = "relay";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        if signal.ty == "relay.get" {
            return Ok(self.handled.into());
        }
        let Some(crate::signal::Data::Json(data)) = signal.data else {
            return Err(AgentError::Failed("relay.go needs JSON data".into()));
        };
        let go: Go = serde_json::from_value(data).map_err(|e| AgentError::Failed(e.to_string()))?;
        let Some((next, rest)) = go.path.split_first() else {
            self.handled += 1;
            return Ok(0.into());
        };
        let out = ctx.signal("relay.go", serde_json::json!({ "path": rest }));
        let to = Key::new("relay", next.clone());
        let reply = if go.cast {
            ctx.cast(to, out)?;
            serde_json::json!("cast")
        } else {
            match ctx.call(&to, out).await {
                // An error from further down goes up as it is.
                Ok(below) if below.is_object() => below,
                Ok(depth) => (depth.as_i64().unwrap_or(i64::MIN) + 1).into(),
                Err(e) => serde_json::json!({ "error": format!("{e:?}") }),
            }
        };
        if go.fail {
            return Err(AgentError::Failed("asked to fail".into()));
        }
        Ok(reply)
    }
}

fn host() -> Host {
    HostBuilder::new(AgentsConfig::default(), Arc::new(MemoryStorage::new())).agent::<Relay>().build()
}

fn relay(id: &str) -> Key {
    Key::new("relay", id)
}

fn go(data: serde_json::Value) -> Signal {
    Signal::new("relay.go", data)
}

async fn handled(host: &Host, id: &str) -> i64 {
    host.call(&relay(id), Signal::new("relay.get", serde_json::json!(null)), T).await.unwrap().as_i64().unwrap()
}

fn error_of(reply: &Reply) -> &str {
    reply["error"].as_str().unwrap_or_else(|| panic!("no error in {reply}"))
}

#[tokio::test]
async fn a_handler_calls_agents_down_a_chain_and_gets_their_replies() {
    let host = host();
    let reply = host.call(&relay("a"), go(serde_json::json!({"path": ["b", "c"]})), T).await.unwrap();
    assert_eq!(reply, 2);
    assert_eq!(handled(&host, "c").await, 1);
    // The inner agents ran, the outer ones only relayed.
    assert_eq!(handled(&host, "b").await, 0);
    host.shutdown().await;
}

#[tokio::test]
async fn a_call_back_to_a_waiting_agent_fails_at_once_with_a_cycle() {
    let host = host();
    // To itself: a waits on the call it makes.
    let reply = host.call(&relay("a"), go(serde_json::json!({"path": ["a"]})), T).await.unwrap();
    assert!(error_of(&reply).starts_with("Cycle"), "{reply}");
    // Through another: b's call to a comes back to a, which waits on b. Without the chain this
    // would wait until a timeout (`T` here: the call would fail with `Timeout`).
    let reply = host.call(&relay("a"), go(serde_json::json!({"path": ["b", "c", "a"]})), T).await.unwrap();
    assert!(error_of(&reply).starts_with("Cycle"), "{reply}");
    // Nothing waits on a cast: a cast back to the caller is no cycle.
    let reply = host.call(&relay("a"), go(serde_json::json!({"path": ["b"], "cast": true})), T).await.unwrap();
    assert_eq!(reply, "cast");
    // The same agent twice on a path is fine once the first call has returned.
    assert_eq!(host.call(&relay("a"), go(serde_json::json!({"path": ["b"]})), T).await.unwrap(), 1);
    assert_eq!(host.call(&relay("a"), go(serde_json::json!({"path": ["b"]})), T).await.unwrap(), 1);
    host.shutdown().await;
}

#[tokio::test]
async fn a_chain_longer_than_the_limit_fails_with_too_deep() {
    let host = host();
    let path: Vec<String> = (0..CALL_DEPTH_MAX + 4).map(|i| format!("r{i}")).collect();
    let reply = host.call(&relay("a"), go(serde_json::json!({ "path": path })), T).await.unwrap();
    assert_eq!(error_of(&reply), format!("TooDeep({})", CALL_DEPTH_MAX + 1), "{reply}");
    // Up to the limit is fine: a, then CALL_DEPTH_MAX - 1 more callers, then the last callee.
    let path: Vec<String> = (0..CALL_DEPTH_MAX).map(|i| format!("s{i}")).collect();
    let reply = host.call(&relay("a"), go(serde_json::json!({ "path": path })), T).await.unwrap();
    assert_eq!(reply, CALL_DEPTH_MAX as i64);
    host.shutdown().await;
}

#[tokio::test]
async fn a_retried_caller_reaches_its_callee_as_a_duplicate() {
    let host = host();
    // a calls b, then fails: b's count went up, a's call is not recorded, and the client retries.
    let first = go(serde_json::json!({"path": ["b"], "fail": true}));
    for _ in 0..3 {
        let e = host.call(&relay("a"), first.clone(), T).await.unwrap_err();
        assert_eq!(e, CallError::Handler("asked to fail".into()));
    }
    // Each retry made the same signal for b (`Ctx::signal`), so b handled it once.
    assert_eq!(handled(&host, "b").await, 1);
    // A new signal is a new call.
    host.call(&relay("a"), go(serde_json::json!({"path": ["b"]})), T).await.unwrap();
    assert_eq!(handled(&host, "b").await, 2);
    host.shutdown().await;
}

#[tokio::test]
async fn casts_go_out_once_the_call_succeeds_and_not_when_it_fails() {
    let host = host();
    let failed = host.call(&relay("a"), go(serde_json::json!({"path": ["b"], "cast": true, "fail": true})), T).await;
    assert!(failed.is_err());
    assert_eq!(host.call(&relay("a"), go(serde_json::json!({"path": ["b"], "cast": true})), T).await.unwrap(), "cast");
    // The cast is in b's mailbox before a replies, so this get comes after it.
    assert_eq!(handled(&host, "b").await, 1);
    host.shutdown().await;
}

#[tokio::test]
async fn a_read_makes_no_calls() {
    let host = host();
    let reply = host.read(&relay("a"), Some(go(serde_json::json!({"path": ["b"]})))).await.unwrap();
    assert!(error_of(&reply).starts_with("NotRead"), "{reply}");
    assert!(!host.is_active(&relay("b")));
    let e = host.read(&relay("a"), Some(go(serde_json::json!({"path": ["b"], "cast": true})))).await.unwrap_err();
    assert!(matches!(e, CallError::Handler(ref m) if m.contains("casts to no agent")), "{e}");
    host.shutdown().await;
}
