//! The membership driver: owns a [`Core`], feeds it packets from the transport and timer events
//! from the clock, carries out its [`Output`]s, and publishes the view and member events.
//!
//! Inbound packets wait in a bounded inbox (`inbox_len_max`); when it is full new packets are
//! dropped and counted (SWIM tolerates loss). Timers live in a heap inside the task, so the
//! number of pending timers is what foca asked for (it grows with the member count). Timers are
//! polled before the inbox so a flood of packets cannot starve probes and suspicion timeouts.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use foca::Timer;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Core, Member, MemberEvent, MemberState, NodeMeta, Output};
use crate::config::MembershipConfig;
use crate::metrics::{label, GaugeFamily, Metrics};
use crate::net::Transport;
use crate::wire::{Lane, Msg};

/// Input from the transport.
#[derive(Debug)]
pub enum Input {
    Packet(Bytes),
    Leave { from: SocketAddr, incarnation: u64 },
}

/// A snapshot of the member view.
#[derive(Clone, Debug)]
pub struct View {
    pub me: NodeMeta,
    pub joined: bool,
    pub members: Vec<Member>,
}

impl View {
    pub fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }
    /// Names of members in `state`, sorted.
    pub fn names(&self, state: MemberState) -> Vec<String> {
        let mut v: Vec<String> =
            self.members.iter().filter(|m| m.state == state).map(|m| m.meta.name.clone()).collect();
        v.sort();
        v
    }
    pub fn state_of(&self, name: &str) -> Option<MemberState> {
        self.members.iter().find(|m| m.meta.name == name).map(|m| m.state)
    }
}

impl Membership {
    /// The address of the live (alive or suspect) member named `name`, as gossip has it now: a
    /// process restarted elsewhere is found at its new address.
    pub fn addr_of(&self, name: &str) -> Option<std::net::SocketAddr> {
        let view = self.view.borrow();
        view.members.iter().find(|m| m.meta.name == name && m.state.is_active()).map(|m| m.meta.addr)
    }
}

enum Cmd {
    Leave(oneshot::Sender<()>),
}

/// Handle to the membership task.
#[derive(Clone)]
pub struct Membership {
    inbox: mpsc::Sender<Input>,
    cmds: mpsc::Sender<Cmd>,
    view: watch::Receiver<View>,
    events: broadcast::Sender<MemberEvent>,
    inbox_dropped: Counter,
}

impl Membership {
    /// Hands a packet from the transport to the task; drops it (counted) when the inbox is full.
    pub fn deliver(&self, input: Input) {
        if self.inbox.try_send(input).is_err() {
            self.inbox_dropped.inc();
        }
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view (for awaiting a condition).
    pub fn watch(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Member events from now on. A subscriber more than `events_len_max` events behind gets
    /// `RecvError::Lagged(n)` and continues with newer events.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    /// Waits until `pred` holds for the view (or the task ends).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))] // For tests and benchmarks.
    pub async fn wait_for(&self, mut pred: impl FnMut(&View) -> bool) -> Option<View> {
        let mut rx = self.view.clone();
        rx.wait_for(|v| pred(v)).await.ok().map(|v| v.clone())
    }

    /// Leaves the cluster gracefully; returns once the leave messages are queued.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Called when our identity is renewed, to persist the new incarnation.
pub type OnRenew = Box<dyn Fn(&NodeMeta) + Send + Sync>;

/// Starts the membership task; it runs until `cancel` fires or a leave completes.
pub fn spawn(
    core: Core,
    cfg: &MembershipConfig,
    transport: Transport,
    metrics: &Metrics,
    on_renew: OnRenew,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Membership {
    let (inbox_tx, inbox_rx) = mpsc::channel(cfg.inbox_len_max);
    let (cmd_tx, cmd_rx) = mpsc::channel(4);
    let view = View { me: core.me().clone(), joined: core.is_joined(), members: core.members() };
    let (view_tx, view_rx) = watch::channel(view);
    let (events_tx, _) = broadcast::channel(cfg.events_len_max);
    let inbox_dropped = metrics
        .counters("membership_inbox_dropped", "Membership packets dropped because the inbox was full")
        .get_or_create_owned(&vec![]);
    let gauges = metrics.gauges("members", "Members in the view, by state");
    let bad_packets = metrics
        .counters("membership_bad_packets", "Membership packets refused as malformed")
        .get_or_create_owned(&vec![]);
    let driver = Driver {
        core,
        transport,
        timers: BinaryHeap::new(),
        timer_seq: 0,
        view_tx,
        events_tx: events_tx.clone(),
        gauges,
        bad_packets,
        over_limit: metrics
            .gauges("membership_members_over_limit", "Members left out of the view because members_max was reached")
            .get_or_create_owned(&vec![]),
        on_renew,
        tick: Duration::from_millis(cfg.join_retry_interval_ms),
    };
    tracker.spawn(driver.run(inbox_rx, cmd_rx, cancel));
    Membership { inbox: inbox_tx, cmds: cmd_tx, view: view_rx, events: events_tx, inbox_dropped }
}

struct Pending {
    at: Instant,
    seq: u64,
    timer: Timer<NodeMeta>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Driver {
    core: Core,
    transport: Transport,
    timers: BinaryHeap<Reverse<Pending>>,
    timer_seq: u64,
    view_tx: watch::Sender<View>,
    events_tx: broadcast::Sender<MemberEvent>,
    gauges: GaugeFamily,
    bad_packets: Counter,
    over_limit: prometheus_client::metrics::gauge::Gauge,
    on_renew: OnRenew,
    tick: Duration,
}

impl Driver {
    async fn run(mut self, mut inbox: mpsc::Receiver<Input>, mut cmds: mpsc::Receiver<Cmd>, cancel: CancellationToken) {
        let outs = self.core.start(Instant::now());
        self.apply(outs);
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|t| t.0.at);
            let sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                cmd = cmds.recv() => {
                    let Some(Cmd::Leave(done)) = cmd else { return };
                    info!(name = %self.core.me().name, "leaving the cluster");
                    let outs = self.core.leave(Instant::now());
                    self.apply(outs);
                    let _ = done.send(());
                    return;
                }
                _ = sleep => {
                    let now = Instant::now();
                    while self.timers.peek().is_some_and(|t| t.0.at <= now) {
                        let Reverse(p) = self.timers.pop().expect("peeked");
                        let outs = self.core.handle_timer(now, p.timer);
                        self.apply(outs);
                    }
                }
                _ = tick.tick() => {
                    let outs = self.core.tick(Instant::now());
                    self.apply(outs);
                }
                input = inbox.recv() => {
                    let Some(input) = input else { return };
                    let now = Instant::now();
                    let outs = match input {
                        Input::Packet(p) => self.core.handle_packet(now, &p),
                        Input::Leave { from, incarnation } => self.core.handle_leave(now, from, incarnation),
                    };
                    self.apply(outs);
                }
            }
        }
    }

    fn apply(&mut self, outs: Vec<Output>) {
        let mut changed = false;
        // Events go out after the view is published, so a subscriber that sees an event finds
        // the view already showing it.
        let mut events = Vec::new();
        for o in outs {
            match o {
                Output::Send { to, packet } => {
                    // A full queue or an unknown peer is counted by the transport; SWIM copes.
                    let _ = self.transport.try_send(to, Lane::Control, Msg::Membership(packet));
                }
                Output::SendLeave { to, incarnation } => {
                    let _ = self.transport.try_send(to, Lane::Control, Msg::Leave { incarnation });
                }
                Output::Schedule { after, timer } => {
                    self.timer_seq += 1;
                    let p = Pending { at: Instant::now() + after, seq: self.timer_seq, timer };
                    self.timers.push(Reverse(p));
                }
                Output::Renewed(meta) => {
                    (self.on_renew)(&meta);
                    changed = true;
                }
                Output::Event(e) => {
                    info!(member = %e.meta.name, addr = %e.meta.addr, incarnation = e.meta.incarnation,
                        from = e.from.map(|s| s.as_str()).unwrap_or("new"), to = e.to.as_str(), "member");
                    events.push(e);
                    changed = true;
                }
            }
        }
        let joined = self.core.is_joined();
        if changed || joined != self.view_tx.borrow().joined || self.core.me() != &self.view_tx.borrow().me {
            self.publish();
        }
        for e in events {
            // No subscribers is fine.
            let _ = self.events_tx.send(e);
        }
        sync_counter(&self.bad_packets, self.core.bad_packets);
        self.over_limit.set(self.core.members_over_limit as i64);
    }

    fn publish(&mut self) {
        let view = View { me: self.core.me().clone(), joined: self.core.is_joined(), members: self.core.members() };
        for s in MemberState::ALL {
            self.gauges.get_or_create(&label("state", s.as_str())).set(view.count(s) as i64);
        }
        self.view_tx.send_replace(view);
    }
}

/// Raises a counter to the core's running total.
fn sync_counter(c: &Counter, total: u64) {
    let cur = c.get();
    if total > cur {
        c.inc_by(total - cur);
    }
}
