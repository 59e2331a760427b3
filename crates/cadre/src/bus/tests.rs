use super::*;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::mpsc;

use super::webhook::WebhookSpec;
use crate::config::SignalsConfig;
use crate::metrics::Metrics;
use crate::signal::journal::Direction;
use crate::signal::CAUSATION_ID;
use crate::signal::{Signal, SignalError, TraceParent, TRACEPARENT};

fn bus() -> Bus {
    Bus::new(SignalsConfig::default(), "/test", &Metrics::new())
}

fn sig(ty: &str, n: i64) -> Signal {
    Signal::new(ty, serde_json::json!(n))
}

fn channel(bus: &Bus, pattern: &str, cap: usize) -> (Subscription, mpsc::Receiver<Arc<Signal>>) {
    let (tx, rx) = mpsc::channel(cap);
    (bus.subscribe(SubscriptionSpec::new(pattern, Dispatch::Channel(tx))).unwrap(), rx)
}

fn n_of(s: &Signal) -> i64 {
    match &s.data {
        Some(crate::signal::Data::Json(v)) => v.as_i64().unwrap(),
        other => panic!("unexpected data {other:?}"),
    }
}

#[tokio::test]
async fn signals_reach_every_matching_subscriber_in_publish_order() {
    let bus = bus();
    let (_a, mut ra) = channel(&bus, "order.**", 1000);
    let (_b, mut rb) = channel(&bus, "order.*.placed", 1000);
    let (_c, mut rc) = channel(&bus, "user.**", 1000);
    for n in 0..200 {
        let ty = if n % 2 == 0 { "order.eu.placed" } else { "order.eu.paid" };
        let p = bus.publish(sig(ty, n)).await.unwrap();
        assert_eq!(p.deliveries, if n % 2 == 0 { 2 } else { 1 });
    }
    for n in 0..200 {
        assert_eq!(n_of(&ra.recv().await.unwrap()), n);
    }
    for n in (0..200).step_by(2) {
        assert_eq!(n_of(&rb.recv().await.unwrap()), n);
    }
    assert!(rc.try_recv().is_err(), "user.** matched nothing");
    assert_eq!(bus.publish(sig("nobody.listens", 0)).await.unwrap().deliveries, 0);
    bus.shutdown().await;
}

#[tokio::test]
async fn invalid_signals_are_refused_naming_the_attribute() {
    let bus = bus();
    let mut s = sig("a", 1);
    s.source.clear();
    let e = bus.publish(s).await.unwrap_err();
    assert_eq!(e, PublishError::Invalid(SignalError::Missing("source")));
    bus.shutdown().await;
}

#[tokio::test]
async fn a_full_reject_queue_fails_the_publish_and_drop_oldest_counts() {
    let bus = bus();
    // A channel of 1 whose receiver never reads: the worker holds one signal in `send`, the
    // channel holds one, the subscription queue holds the rest.
    let (tx, _rx) = mpsc::channel(1);
    let rej = bus.subscribe(SubscriptionSpec::new("r", Dispatch::Channel(tx)).queue_len_max(2)).unwrap();
    let (tx2, mut rx2) = mpsc::channel(1);
    let drop = bus
        .subscribe(SubscriptionSpec::new("d", Dispatch::Channel(tx2)).queue_len_max(2).overflow(Overflow::DropOldest))
        .unwrap();
    let mut refused = None;
    for n in 0..10 {
        if let Err(e) = bus.publish(sig("r", n)).await {
            refused = Some(e);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        matches!(refused, Some(PublishError::QueueFull { subscription, delivered: 0 }) if subscription == rej.id())
    );
    // The drop-oldest subscriber never refuses; what it lost is counted.
    let first = {
        bus.publish(sig("d", 0)).await.unwrap();
        rx2.recv().await.unwrap()
    };
    assert_eq!(n_of(&first), 0);
    for n in 1..=20 {
        bus.publish(sig("d", n)).await.unwrap();
    }
    let info = bus.subscription(drop.id()).unwrap();
    assert!(info.dropped > 0, "{info:?}");
    // The newest always survives.
    let mut last = 0;
    while let Ok(Some(s)) = tokio::time::timeout(Duration::from_millis(200), rx2.recv()).await {
        last = n_of(&s);
        if last == 20 {
            break;
        }
    }
    assert_eq!(last, 20);
    bus.shutdown().await;
}

#[tokio::test]
async fn dropping_the_handle_unsubscribes_and_detach_keeps_it() {
    let bus = bus();
    let (a, _ra) = channel(&bus, "x", 10);
    let (b, _rb) = channel(&bus, "x", 10);
    let kept = b.detach();
    assert_eq!(bus.publish(sig("x", 1)).await.unwrap().deliveries, 2);
    drop(a);
    assert_eq!(bus.publish(sig("x", 2)).await.unwrap().deliveries, 1);
    assert!(bus.unsubscribe(kept));
    assert!(!bus.unsubscribe(kept));
    assert_eq!(bus.publish(sig("x", 3)).await.unwrap().deliveries, 0);
    assert!(bus.subscriptions().is_empty());
    bus.shutdown().await;
}

#[tokio::test]
async fn bad_patterns_and_queue_lengths_are_refused() {
    let bus = bus();
    let (tx, _rx) = mpsc::channel(1);
    let e = bus.subscribe(SubscriptionSpec::new("a..b", Dispatch::Channel(tx.clone()))).err().unwrap();
    assert!(matches!(e, SubscribeError::Route(_)), "{e}");
    let e = bus.subscribe(SubscriptionSpec::new("a", Dispatch::Channel(tx)).queue_len_max(0)).err().unwrap();
    assert!(matches!(e, SubscribeError::QueueLen { len: 0, .. }), "{e}");
    let e = bus.subscribe(SubscriptionSpec::new("a", Dispatch::Webhook(WebhookSpec::new("ftp://x")))).err().unwrap();
    assert!(matches!(e, SubscribeError::Dispatch(_)), "{e}");
    bus.shutdown().await;
}

struct Gate;

impl Middleware for Gate {
    fn name(&self) -> &str {
        "gate"
    }
    fn before_publish<'a>(&'a self, s: &'a Signal) -> BoxFuture<'a, Verdict> {
        async move {
            match s.ty.as_str() {
                "blocked" => Verdict::Reject("blocked type".into()),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Verdict::Continue
                }
                "panics" => panic!("middleware bug"),
                _ => Verdict::Continue,
            }
        }
        .boxed()
    }
    fn before_dispatch<'a>(&'a self, s: &'a Signal, t: Target<'a>) -> BoxFuture<'a, Verdict> {
        let skip = s.subject.as_deref() == Some("skip-me") && t.pattern == "m.*";
        futures::future::ready(if skip { Verdict::Reject("skipped".into()) } else { Verdict::Continue }).boxed()
    }
}

#[tokio::test(start_paused = true)]
async fn middleware_rejects_skips_and_runs_out_of_time() {
    let bus = bus();
    bus.add_middleware(Arc::new(Gate));
    let (_a, mut ra) = channel(&bus, "m.*", 10);
    let (_b, mut rb) = channel(&bus, "m.**", 10);
    let e = bus.publish(sig("blocked", 0)).await.unwrap_err();
    assert_eq!(e, PublishError::Rejected { middleware: "gate".into(), reason: "blocked type".into() });
    let e = bus.publish(sig("slow", 0)).await.unwrap_err();
    assert!(matches!(e, PublishError::Rejected { ref reason, .. } if reason.contains("budget")), "{e}");
    let e = bus.publish(sig("panics", 0)).await.unwrap_err();
    assert!(matches!(e, PublishError::Rejected { ref reason, .. } if reason.contains("panicked")), "{e}");
    bus.publish(sig("m.x", 1).with_subject("skip-me")).await.unwrap();
    bus.publish(sig("m.x", 2)).await.unwrap();
    assert_eq!(n_of(&rb.recv().await.unwrap()), 1);
    assert_eq!(n_of(&rb.recv().await.unwrap()), 2);
    assert_eq!(n_of(&ra.recv().await.unwrap()), 2, "m.* skipped signal 1");
    let info = bus.subscriptions();
    assert_eq!(info[0].skipped, 1);
    bus.shutdown().await;
}

#[tokio::test]
async fn signals_published_by_a_handler_carry_their_cause_and_trace() {
    let bus = bus();
    let b2 = bus.clone();
    let _h = bus
        .subscribe(SubscriptionSpec::new(
            "order.placed",
            Dispatch::function(move |s: Arc<Signal>| {
                let bus = b2.clone();
                async move {
                    let child = Signal::new("inventory.reserve", serde_json::json!({"for": s.id}));
                    assert_eq!(child.source, "/test", "Signal::new takes the node's source in a handler");
                    bus.publish(child).await.map(|_| ()).map_err(|e| e.to_string())
                }
            }),
        ))
        .unwrap();
    let (_w, mut rw) = channel(&bus, "inventory.*", 10);
    let (_o, mut ro) = channel(&bus, "order.*", 10);
    let parent = sig("order.placed", 1);
    let parent_id = parent.id.clone();
    bus.publish(parent).await.unwrap();
    let child = rw.recv().await.unwrap();
    let parent = ro.recv().await.unwrap();
    assert_eq!(child.extension(CAUSATION_ID), Some(parent_id.as_str()));
    let back = bus.trace(&child.id, Direction::Backward).unwrap();
    assert_eq!(back.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [child.id.as_str(), parent_id.as_str()]);
    let fwd = bus.trace(&parent_id, Direction::Forward).unwrap();
    assert_eq!(
        fwd.iter().map(|s| (s.id.as_str(), s.depth)).collect::<Vec<_>>(),
        [(parent_id.as_str(), 0), (child.id.as_str(), 1)]
    );
    // Same trace, another span.
    let tp = |s: &Signal| TraceParent::parse(s.extension(TRACEPARENT).unwrap()).unwrap();
    assert_eq!(tp(&child).trace_id, tp(&parent).trace_id);
    assert_ne!(tp(&child).span_id, tp(&parent).span_id);
    bus.shutdown().await;
}

/// Reports every finished delivery.
struct Recorder(mpsc::UnboundedSender<(SubId, Outcome)>);

impl Middleware for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn after_dispatch<'a>(&'a self, _s: &'a Signal, t: Target<'a>, o: &'a Outcome) -> BoxFuture<'a, ()> {
        let _ = self.0.send((t.id, o.clone()));
        futures::future::ready(()).boxed()
    }
}

#[tokio::test]
async fn failing_and_panicking_handlers_are_dead_lettered() {
    let bus = bus();
    let (tx, mut done) = mpsc::unbounded_channel();
    bus.add_middleware(Arc::new(Recorder(tx)));
    let _f =
        bus.subscribe(SubscriptionSpec::new("f", Dispatch::function(|_s| async { Err("nope".to_string()) }))).unwrap();
    let _p = bus
        .subscribe(SubscriptionSpec::new(
            "p",
            Dispatch::function(|s: Arc<Signal>| async move {
                if n_of(&s) == 1 {
                    panic!("handler bug");
                }
                Ok(())
            }),
        ))
        .unwrap();
    bus.publish(sig("f", 0)).await.unwrap();
    bus.publish(sig("p", 1)).await.unwrap();
    bus.publish(sig("p", 2)).await.unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(done.recv().await.unwrap().1);
    }
    // The panicking worker survived: its next signal is delivered.
    assert!(outcomes.contains(&Outcome::Delivered { attempts: 1 }), "{outcomes:?}");
    let reasons: Vec<String> = bus.deadletters().into_iter().map(|d| d.reason).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.contains(&"nope".to_string()) && reasons.contains(&"handler panicked".to_string()), "{reasons:?}");
    bus.shutdown().await;
}

#[tokio::test]
async fn a_routes_table_subscribes_its_dispatch_targets_all_or_nothing() {
    use crate::router::table::{Format, Table};
    let bus = bus();
    let ok = r#"{"routes":[{"path":"user.**","target":[{"log":{}},{"webhook":{"url":"http://127.0.0.1:9/h"}}],"priority":5}]}"#;
    let ids = bus.subscribe_table(&Table::parse(ok, Format::Json).unwrap()).unwrap();
    assert_eq!(ids.len(), 2);
    let subs = bus.subscriptions();
    assert_eq!(subs[0].dispatch, serde_json::json!({"log": {}}));
    assert_eq!(subs[1].priority, 5);
    assert_eq!(subs[1].breaker.as_deref(), Some("closed"));
    for id in ids {
        bus.unsubscribe(id);
    }
    let named = r#"{"routes":[{"path":"a","target":{"log":{}}},{"path":"b","target":"audit"}]}"#;
    let e = bus.subscribe_table(&Table::parse(named, Format::Json).unwrap()).unwrap_err();
    assert!(matches!(e, RoutesError::Target { index: 1, .. }), "{e}");
    assert!(e.to_string().contains("audit"), "{e}");
    let bad = r#"{"routes":[{"path":"a","target":{"webhook":{"url":"https://x"}}}]}"#;
    assert!(bus.subscribe_table(&Table::parse(bad, Format::Json).unwrap()).is_err());
    assert!(bus.subscriptions().is_empty(), "nothing left behind");
    bus.shutdown().await;
}

#[tokio::test]
async fn a_handler_panicking_before_its_first_await_is_caught_and_the_worker_goes_on() {
    let bus = bus();
    let (tx, mut done) = mpsc::unbounded_channel();
    bus.add_middleware(Arc::new(Recorder(tx)));
    let handler: HandlerFn = Arc::new(|s: Arc<Signal>| {
        // Synchronous part of the handler, before any future exists.
        assert_ne!(n_of(&s), 1, "handler bug");
        futures::future::ready(Ok(())).boxed()
    });
    let _h = bus.subscribe(SubscriptionSpec::new("p", Dispatch::Function(handler))).unwrap();
    for n in 0..3 {
        bus.publish(sig("p", n)).await.unwrap();
    }
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(done.recv().await.unwrap().1);
    }
    assert_eq!(outcomes[1], Outcome::Failed { attempts: 1, reason: "handler panicked".into() });
    assert_eq!(outcomes[2], Outcome::Delivered { attempts: 1 });
    bus.shutdown().await;
}

struct SyncPanic;

impl Middleware for SyncPanic {
    fn name(&self) -> &str {
        "sync-panic"
    }
    fn before_publish<'a>(&'a self, s: &'a Signal) -> BoxFuture<'a, Verdict> {
        assert_ne!(s.ty, "boom", "middleware bug");
        futures::future::ready(Verdict::Continue).boxed()
    }
}

#[tokio::test]
async fn a_middleware_panicking_synchronously_rejects_the_signal() {
    let bus = bus();
    bus.add_middleware(Arc::new(SyncPanic));
    let e = bus.publish(sig("boom", 0)).await.unwrap_err();
    assert!(matches!(e, PublishError::Rejected { ref reason, .. } if reason.contains("panicked")), "{e}");
    assert!(bus.publish(sig("fine", 0)).await.is_ok());
    bus.shutdown().await;
}

#[tokio::test]
async fn unsubscribing_or_shutting_down_ends_a_stuck_handler() {
    let bus = bus();
    let (tx, mut done) = mpsc::unbounded_channel();
    bus.add_middleware(Arc::new(Recorder(tx)));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let stuck = move |_s: Arc<Signal>| {
        let started = started_tx.clone();
        async move {
            started.send(()).unwrap();
            futures::future::pending::<Result<(), String>>().await
        }
    };
    let a = bus.subscribe(SubscriptionSpec::new("a", Dispatch::function(stuck.clone()))).unwrap();
    let _b = bus.subscribe(SubscriptionSpec::new("b", Dispatch::function(stuck))).unwrap();
    bus.publish(sig("a", 0)).await.unwrap();
    started.recv().await.unwrap();
    drop(a);
    let (_, outcome) = done.recv().await.unwrap();
    assert!(matches!(outcome, Outcome::Failed { ref reason, .. } if reason.contains("unsubscribed")), "{outcome:?}");
    bus.publish(sig("b", 0)).await.unwrap();
    started.recv().await.unwrap();
    // Would hang if the stuck handler held its worker.
    bus.shutdown().await;
}

#[tokio::test]
async fn causation_is_set_inside_a_handler_even_on_a_copy_of_the_parent() {
    let bus = bus();
    let b2 = bus.clone();
    let _h = bus
        .subscribe(SubscriptionSpec::new(
            "step.one",
            Dispatch::function(move |s: Arc<Signal>| {
                let bus = b2.clone();
                async move {
                    // A copy of the parent with a new id and type keeps the parent's extensions.
                    let mut copy = Signal::clone(&s);
                    copy.id = crate::signal::new_id();
                    copy.ty = "step.two".into();
                    bus.publish(copy).await.map(|_| ()).map_err(|e| e.to_string())
                }
            }),
        ))
        .unwrap();
    let (_w, mut rw) = channel(&bus, "step.two", 10);
    let root = sig("root.cause", 0);
    bus.publish(root.clone()).await.unwrap();
    let one = sig("step.one", 1).caused_by(&root);
    let one_id = one.id.clone();
    bus.publish(one).await.unwrap();
    let two = rw.recv().await.unwrap();
    assert_eq!(two.causation_id(), Some(one_id.as_str()));
    let back: Vec<String> = bus.trace(&two.id, Direction::Backward).unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(back, [two.id.clone(), one_id, root.id.clone()]);
    bus.shutdown().await;
}

#[tokio::test]
async fn extensions_added_at_publish_are_validated_too() {
    let bus = bus();
    let (_a, mut ra) = channel(&bus, "x", 10);
    let mut s = sig("x", 0);
    for i in 0..crate::signal::EXTENSIONS_MAX {
        s.extensions.insert(format!("e{i}"), "v".into());
    }
    assert!(s.validate().is_ok());
    let e = bus.publish(s).await.unwrap_err();
    assert_eq!(e, PublishError::Invalid(SignalError::TooManyExtensions), "the trace would make it 65");
    let mut s = sig("x", 1);
    for i in 0..crate::signal::EXTENSIONS_MAX - 1 {
        s.extensions.insert(format!("e{i}"), "v".into());
    }
    bus.publish(s).await.unwrap();
    assert_eq!(ra.recv().await.unwrap().extensions.len(), crate::signal::EXTENSIONS_MAX);
    bus.shutdown().await;
}

#[tokio::test]
async fn queues_are_bounded_in_bytes_per_subscriber_and_per_node() {
    let big = |n: i64| Signal::new("big", serde_json::json!({"n": n, "pad": "x".repeat(10_000)}));
    let size = big(0).size_hint_bytes();
    let cfg =
        SignalsConfig { subscriber_queue_bytes_max: 3 * size, queued_bytes_max: 5 * size, ..SignalsConfig::default() };
    let bus = Bus::new(cfg, "/test", &Metrics::new());
    // Receivers never read: each worker holds one signal in `send`, the channel holds one.
    let (tx, _rx) = mpsc::channel(1);
    let rej = bus.subscribe(SubscriptionSpec::new("big", Dispatch::Channel(tx))).unwrap();
    let mut accepted = 0;
    for n in 0..20 {
        match bus.publish(big(n)).await {
            Ok(_) => accepted += 1,
            Err(PublishError::QueueFull { subscription, .. }) => {
                assert_eq!(subscription, rej.id());
                break;
            }
            Err(e) => panic!("{e}"),
        }
        tokio::task::yield_now().await;
    }
    // At most 2 out of the queue plus 3 queued (by bytes, while the length limit is 1024).
    assert!((3..=5).contains(&accepted), "accepted {accepted}");
    drop(rej);
    // The node-wide budget: a drop-oldest subscriber makes room from its own queue.
    let (tx, _rx2) = mpsc::channel(1);
    let d = bus.subscribe(SubscriptionSpec::new("big", Dispatch::Channel(tx)).overflow(Overflow::DropOldest)).unwrap();
    for n in 0..20 {
        bus.publish(big(n)).await.unwrap();
        tokio::task::yield_now().await;
    }
    let info = bus.subscription(d.id()).unwrap();
    assert!(info.queued <= 3, "{info:?}");
    assert!(info.dropped >= 15, "{info:?}");
    bus.shutdown().await;
}
