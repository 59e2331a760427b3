use super::*;
use crate::signal::journal::Direction;
use crate::signal::CAUSATION_ID;

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
