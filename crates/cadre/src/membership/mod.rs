//! Who is in the cluster: SWIM membership (foca), driven sans-IO.
//!
//! [`Core`] wraps a foca instance and a member view. It does no IO: callers feed it packets,
//! timer events and the current time, and it returns [`Output`]s (packets to send, timers to
//! arm, member events). [`task`] is the driver that connects it to the transport and the clock;
//! the simulation drives the very same code under turmoil.
//!
//! Member identity is [`NodeMeta`]: name, transport and HTTP addresses, incarnation and start time,
//! disseminated with every membership update. A member is one name and one transport address
//! ([`MemberKey`]); when two identities share either, the one with the higher
//! `(incarnation, started_ms)` wins, so a node that restarts with the same name (on the same or
//! another address) replaces its previous incarnation. A node
//! declared `down` (a partition, a long pause) learns it from its peers and rejoins with
//! `incarnation + 1`.
//!
//! States: `alive`, `suspect` and `down` come from SWIM. `left` is `down` after a graceful leave:
//! a leaving node tells every alive member directly (a [`crate::wire::Msg::Leave`]) before foca
//! gossips it down; members that miss the notice report `down`. `down` and `left` members stay in
//! the view for `member_retention_ms`.
//!
//! Caveat: two live nodes configured with the same name displace each other; names must be unique.

pub mod task;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::MembershipConfig;

/// A member's identity and metadata, gossiped with membership.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    pub addr: SocketAddr,
    pub http: Option<SocketAddr>,
    /// Grows on every restart (when a data dir keeps the counter) and on every rejoin.
    pub incarnation: u64,
    /// Wall-clock start time, milliseconds since the Unix epoch.
    pub started_ms: u64,
}

/// The slot a member occupies in foca: one node per name, and one node per transport address.
/// Two identities are the same member when their names match or their addresses match; the
/// newer one then replaces the older. (Seed stand-ins have no name and match by address.)
#[derive(Clone, Debug)]
pub struct MemberKey {
    pub name: String,
    pub addr: SocketAddr,
}

impl PartialEq for MemberKey {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr || (!self.name.is_empty() && self.name == other.name)
    }
}

impl foca::Identity for NodeMeta {
    type Addr = MemberKey;

    fn renew(&self) -> Option<Self> {
        Some(NodeMeta { incarnation: self.incarnation + 1, ..self.clone() })
    }

    fn addr(&self) -> MemberKey {
        MemberKey { name: self.name.clone(), addr: self.addr }
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, self.started_ms, &self.name) > (adversary.incarnation, adversary.started_ms, &adversary.name)
    }
}

impl NodeMeta {
    /// Stand-in identity for a seed whose metadata we do not know yet. Foca accepts an announce
    /// addressed to any identity with the receiver's address.
    fn seed(addr: SocketAddr) -> Self {
        NodeMeta { name: String::new(), addr, http: None, incarnation: 0, started_ms: 0 }
    }
}

/// A member's state, as one node sees it (SWIM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answers probes.
    Alive,
    /// Missed a probe; declared down unless it refutes the suspicion in time.
    Suspect,
    /// Declared down (failed, or cut off).
    Down,
    /// Left the cluster gracefully.
    Left,
}

impl MemberState {
    /// Every state.
    pub const ALL: [MemberState; 4] = [MemberState::Alive, MemberState::Suspect, MemberState::Down, MemberState::Left];
    /// The lower-case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
        }
    }
    /// Alive or suspect: still counted as part of the cluster.
    pub fn is_active(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// One entry of the member view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub meta: NodeMeta,
    pub state: MemberState,
    /// When the member entered its current state (local monotonic clock).
    pub since: Instant,
}

/// A change of a member's state or incarnation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEvent {
    pub meta: NodeMeta,
    /// `None` when the member is new to this node.
    pub from: Option<MemberState>,
    pub to: MemberState,
}

/// What the driver must do after a step of the core.
#[derive(Debug)]
pub enum Output {
    /// Send a SWIM packet on the control lane.
    Send {
        to: SocketAddr,
        packet: Bytes,
    },
    /// Tell a member directly that we are leaving.
    SendLeave {
        to: SocketAddr,
        incarnation: u64,
    },
    /// Deliver `timer` back to the core after `after`.
    Schedule {
        after: Duration,
        timer: Timer<NodeMeta>,
    },
    /// Our identity changed (rejoin after being declared down); persist the incarnation.
    Renewed(NodeMeta),
    Event(MemberEvent),
}

type FocaInstance = Foca<NodeMeta, PostcardCodec, StdRng, NoCustomBroadcast>;

/// The sans-IO membership state machine.
pub struct Core {
    foca: FocaInstance,
    rt: AccumulatingRuntime<NodeMeta>,
    cfg: MembershipConfig,
    seeds: Vec<SocketAddr>,
    view: BTreeMap<String, Member>,
    /// `(addr, incarnation)` of members that announced a graceful leave.
    left: BTreeSet<(SocketAddr, u64)>,
    /// `(name, incarnation)` of `down`/`left` members removed after the retention time, so that
    /// foca's lingering record of them does not bring them back.
    expired: BTreeSet<(String, u64)>,
    /// True while foca knows at least one other active member.
    connected: bool,
    /// True once this node has been part of a cluster (or forms one alone).
    joined: bool,
    leaving: bool,
    /// Members known to foca but left out of the view at the last update because the view held
    /// `members_max` members.
    pub members_over_limit: u64,
    /// Packets that foca refused (malformed, too big, from ourselves).
    pub bad_packets: u64,
}

fn foca_config(cfg: &MembershipConfig) -> foca::Config {
    let mut c = foca::Config::new_lan(NonZeroU32::new(64).expect("nonzero"));
    c.probe_period = Duration::from_millis(cfg.probe_period_ms);
    c.probe_rtt = Duration::from_millis(cfg.probe_rtt_ms);
    c.num_indirect_probes = NonZeroUsize::new(cfg.indirect_probes).expect("validated");
    c.suspect_to_down_after = Duration::from_millis(cfg.suspect_to_down_ms);
    c.remove_down_after = Some(Duration::from_millis(cfg.member_retention_ms));
    c.max_packet_size = NonZeroUsize::new(cfg.packet_len_max_bytes).expect("validated");
    c.max_transmissions = NonZeroU8::new(10).expect("nonzero");
    c.notify_down_members = true;
    let every = |ms: u64, n: usize| {
        Some(foca::PeriodicParams {
            frequency: Duration::from_millis(ms),
            num_members: NonZeroUsize::new(n).expect("validated"),
        })
    };
    c.periodic_announce = every(cfg.announce_interval_ms, 1);
    c.periodic_announce_to_down_members = every(cfg.announce_interval_ms, 2);
    c.periodic_gossip = every(cfg.gossip_interval_ms, cfg.gossip_fanout);
    c
}

impl Core {
    pub fn new(me: NodeMeta, cfg: MembershipConfig, seeds: Vec<SocketAddr>, rng_seed: u64, now: Instant) -> Self {
        let seeds: Vec<_> = seeds.into_iter().filter(|s| *s != me.addr).collect();
        let joined = seeds.is_empty();
        let foca = Foca::new(me.clone(), foca_config(&cfg), StdRng::seed_from_u64(rng_seed), PostcardCodec);
        let mut view = BTreeMap::new();
        view.insert(me.name.clone(), Member { meta: me, state: MemberState::Alive, since: now });
        Core {
            foca,
            rt: AccumulatingRuntime::new(),
            cfg,
            seeds,
            view,
            left: BTreeSet::new(),
            expired: BTreeSet::new(),
            connected: false,
            joined,
            leaving: false,
            members_over_limit: 0,
            bad_packets: 0,
        }
    }

    pub fn me(&self) -> &NodeMeta {
        self.foca.identity()
    }

    /// Joined a cluster (or formed one alone, when started without seeds).
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// All members in the view, this node included, sorted by name.
    pub fn members(&self) -> Vec<Member> {
        let mut v: Vec<Member> = self.view.values().cloned().collect();
        v.sort_by(|a, b| (&a.meta.name, a.meta.addr).cmp(&(&b.meta.name, b.meta.addr)));
        v
    }

    /// Starts joining: announces to every seed.
    pub fn start(&mut self, now: Instant) -> Vec<Output> {
        self.announce_to_seeds();
        self.drain(now)
    }

    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) -> Vec<Output> {
        if let Err(e) = self.foca.handle_data(packet, &mut self.rt) {
            self.bad_packets += 1;
            debug!(error = %e, "membership packet refused");
        }
        self.drain(now)
    }

    pub fn handle_timer(&mut self, now: Instant, timer: Timer<NodeMeta>) -> Vec<Output> {
        if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
            debug!(error = %e, "membership timer failed");
        }
        self.drain(now)
    }

    /// A member told us it is leaving.
    pub fn handle_leave(&mut self, now: Instant, from: SocketAddr, incarnation: u64) -> Vec<Output> {
        const LEFT_NOTICES_MAX: usize = 4096;
        if self.left.len() >= LEFT_NOTICES_MAX {
            self.left.clear();
        }
        self.left.insert((from, incarnation));
        self.drain(now)
    }

    /// Housekeeping, called every `join_retry_interval_ms`: retries joining while alone, announces
    /// to seeds not in the view (two groups that formed apart, e.g. nodes started before their
    /// seed was listening, merge this way), and drops `down`/`left` members older than the
    /// retention time.
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        if self.connected && !self.leaving {
            let active: std::collections::HashSet<SocketAddr> =
                self.view.values().filter(|m| m.state.is_active()).map(|m| m.meta.addr).collect();
            for seed in self.seeds.clone() {
                if !active.contains(&seed) {
                    let _ = self.foca.announce(NodeMeta::seed(seed), &mut self.rt);
                }
            }
        }
        if !self.connected && !self.leaving {
            self.announce_to_seeds();
            let down: Vec<NodeMeta> = self
                .view
                .values()
                .filter(|m| m.meta.name != self.me().name && !m.state.is_active())
                .map(|m| m.meta.clone())
                .collect();
            for m in down {
                let _ = self.foca.announce(m, &mut self.rt);
            }
        }
        let retention = Duration::from_millis(self.cfg.member_retention_ms);
        let me = self.me().name.clone();
        if self.expired.len() >= self.cfg.members_max {
            self.expired.clear();
        }
        let expired = &mut self.expired;
        self.view.retain(|name, m| {
            let keep = *name == me || m.state.is_active() || now.duration_since(m.since) < retention;
            if !keep {
                expired.insert((name.clone(), m.meta.incarnation));
            }
            keep
        });
        self.drain(now)
    }

    /// Graceful leave: notifies alive members directly, then gossips our departure.
    pub fn leave(&mut self, now: Instant) -> Vec<Output> {
        self.leaving = true;
        let me = self.me().clone();
        let mut out: Vec<Output> = self
            .foca
            .iter_members()
            .map(|m| Output::SendLeave { to: m.id().addr, incarnation: me.incarnation })
            .collect();
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            debug!(error = %e, "leave failed");
        }
        out.extend(self.drain(now));
        if let Some(m) = self.view.get_mut(&me.name) {
            m.state = MemberState::Left;
            m.since = now;
        }
        out
    }

    fn announce_to_seeds(&mut self) {
        for seed in self.seeds.clone() {
            let _ = self.foca.announce(NodeMeta::seed(seed), &mut self.rt);
        }
    }

    /// Collects what foca asked for and reconciles the view.
    fn drain(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::Active => {
                    self.connected = true;
                    if !self.joined {
                        info!(name = %self.me().name, "joined the cluster");
                    }
                    self.joined = true;
                }
                OwnedNotification::Idle => self.connected = false,
                OwnedNotification::Rename(old, new) if old.name != new.name => {
                    // Another node took over this address: the old name is gone.
                    if let Some(m) = self.view.get_mut(&old.name) {
                        if m.meta.addr == old.addr && m.state.is_active() {
                            let from = Some(m.state);
                            m.state = MemberState::Down;
                            m.since = now;
                            out.push(Output::Event(MemberEvent { meta: m.meta.clone(), from, to: MemberState::Down }));
                        }
                    }
                }
                OwnedNotification::Rejoin(id) => {
                    info!(name = %id.name, incarnation = id.incarnation, "declared down by peers; rejoined");
                    if let Some(m) = self.view.get_mut(&id.name) {
                        m.meta = id.clone();
                    }
                    out.push(Output::Renewed(id));
                }
                _ => {}
            }
        }
        while let Some((to, packet)) = self.rt.to_send() {
            out.push(Output::Send { to: to.addr, packet });
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            out.push(Output::Schedule { after, timer });
        }
        self.reconcile(now, &mut out);
        out
    }

    fn reconcile(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.members_over_limit = 0;
        let me = self.me().name.clone();
        for m in self.foca.iter_membership_state() {
            let meta = m.id();
            if meta.name == me || meta.name.is_empty() {
                continue;
            }
            let state = match m.state() {
                foca::State::Alive => MemberState::Alive,
                foca::State::Suspect => MemberState::Suspect,
                foca::State::Down if self.left.contains(&(meta.addr, meta.incarnation)) => MemberState::Left,
                foca::State::Down => MemberState::Down,
            };
            if !state.is_active() && self.expired.contains(&(meta.name.clone(), meta.incarnation)) {
                continue;
            }
            match self.view.get_mut(&meta.name) {
                Some(cur) if cur.state == state && cur.meta == *meta => {}
                Some(cur) => {
                    let from = Some(cur.state);
                    if cur.state != state {
                        cur.since = now;
                    }
                    cur.state = state;
                    cur.meta = meta.clone();
                    out.push(Output::Event(MemberEvent { meta: meta.clone(), from, to: state }));
                }
                None => {
                    if self.view.len() >= self.cfg.members_max {
                        self.members_over_limit += 1;
                        continue;
                    }
                    self.view.insert(meta.name.clone(), Member { meta: meta.clone(), state, since: now });
                    out.push(Output::Event(MemberEvent { meta: meta.clone(), from: None, to: state }));
                }
            }
        }
        if let Some(m) = self.view.get_mut(&me) {
            let ident = self.foca.identity();
            if m.meta != *ident {
                m.meta = ident.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(i: u16) -> NodeMeta {
        NodeMeta {
            name: format!("n{i}"),
            addr: SocketAddr::from(([10, 0, 0, i as u8], 7000)),
            http: None,
            incarnation: 1,
            started_ms: 0,
        }
    }

    /// Delivers packets between cores in memory until nothing is left to send, firing timers
    /// in deadline order; a tiny deterministic network for golden checks.
    struct Net {
        cores: Vec<Core>,
        now: Instant,
        timers: Vec<(Instant, usize, Timer<NodeMeta>)>,
        events: Vec<(usize, MemberEvent)>,
    }

    impl Net {
        fn new(n: u16) -> Self {
            let now = Instant::now();
            let seed = meta(1).addr;
            let cores =
                (1..=n).map(|i| Core::new(meta(i), MembershipConfig::default(), vec![seed], i as u64, now)).collect();
            Net { cores, now, timers: Vec::new(), events: Vec::new() }
        }

        /// Index of the core at `addr`; `None` for a node that is gone.
        fn idx(&self, addr: SocketAddr) -> Option<usize> {
            self.cores.iter().position(|c| c.me().addr == addr)
        }

        fn apply(&mut self, from: usize, outs: Vec<Output>) {
            let mut queue = vec![(from, outs)];
            while let Some((from, outs)) = queue.pop() {
                for o in outs {
                    match o {
                        Output::Send { to, packet } => {
                            let Some(to) = self.idx(to) else { continue };
                            let more = self.cores[to].handle_packet(self.now, &packet);
                            queue.push((to, more));
                        }
                        Output::SendLeave { to, incarnation } => {
                            let Some(to) = self.idx(to) else { continue };
                            let addr = self.cores[from].me().addr;
                            let more = self.cores[to].handle_leave(self.now, addr, incarnation);
                            queue.push((to, more));
                        }
                        Output::Schedule { after, timer } => self.timers.push((self.now + after, from, timer)),
                        Output::Event(e) => self.events.push((from, e)),
                        Output::Renewed(_) => {}
                    }
                }
            }
        }

        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            loop {
                self.timers.sort_by_key(|t| t.0);
                if self.timers.first().is_none_or(|t| t.0 > end) {
                    break;
                }
                let (at, i, timer) = self.timers.remove(0);
                self.now = at;
                let outs = self.cores[i].handle_timer(self.now, timer);
                self.apply(i, outs);
            }
            self.now = end;
        }

        fn states(&self, i: usize) -> Vec<(String, MemberState)> {
            self.cores[i].members().into_iter().map(|m| (m.meta.name, m.state)).collect()
        }
    }

    #[test]
    fn three_nodes_join_through_a_seed_and_see_a_leave() {
        let mut net = Net::new(3);
        for i in 0..3 {
            let outs = net.cores[i].start(net.now);
            net.apply(i, outs);
        }
        net.run_for(Duration::from_secs(2));
        let all_alive: Vec<_> = ["n1", "n2", "n3"].iter().map(|n| (n.to_string(), MemberState::Alive)).collect();
        for i in 0..3 {
            assert_eq!(net.states(i), all_alive, "view of n{}", i + 1);
            assert!(net.cores[i].is_joined());
        }
        let outs = net.cores[2].leave(net.now);
        net.apply(2, outs);
        net.run_for(Duration::from_secs(2));
        for i in 0..2 {
            assert_eq!(net.states(i)[2], ("n3".to_string(), MemberState::Left), "view of n{}", i + 1);
        }
        assert!(net.events.iter().any(|(i, e)| *i == 0 && e.meta.name == "n3" && e.to == MemberState::Left));
    }

    #[test]
    fn identity_conflicts_prefer_newer_incarnations() {
        use foca::Identity;
        let old = meta(1);
        let newer = NodeMeta { incarnation: 2, ..old.clone() };
        assert!(newer.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&newer));
        assert_eq!(old.renew().unwrap().incarnation, 2);
        // Same name on another address, or another name on the same address: same member slot.
        let moved = NodeMeta { addr: meta(2).addr, ..old.clone() };
        assert!(moved.addr() == old.addr());
        let replaced = NodeMeta { name: "other".into(), ..old.clone() };
        assert!(replaced.addr() == old.addr());
        assert!(meta(2).addr() != old.addr());
        assert!(NodeMeta::seed(old.addr).addr() == old.addr());
    }

    #[test]
    fn down_members_are_listed_until_the_retention_time() {
        let mut net = Net::new(2);
        for i in 0..2 {
            let outs = net.cores[i].start(net.now);
            net.apply(i, outs);
        }
        net.run_for(Duration::from_secs(1));
        assert_eq!(net.states(0).len(), 2);
        // n2 goes silent: drop its timers and stop delivering to it.
        net.timers.retain(|t| t.1 != 1);
        net.cores.truncate(1);
        let retention = Duration::from_millis(MembershipConfig::default().member_retention_ms);
        // Packets to n2 now go nowhere; run the lone node's timers.
        net.run_for(Duration::from_secs(5));
        assert_eq!(net.states(0)[1], ("n2".to_string(), MemberState::Down));
        let outs = net.cores[0].tick(net.now + retention - Duration::from_secs(10));
        net.apply(0, outs);
        assert_eq!(net.states(0).len(), 2, "still listed before the retention time");
        let outs = net.cores[0].tick(net.now + retention + Duration::from_secs(10));
        net.apply(0, outs);
        assert_eq!(net.states(0).len(), 1, "removed after the retention time");
    }

    #[test]
    fn a_node_without_seeds_is_a_cluster_of_one() {
        let now = Instant::now();
        let core = Core::new(meta(1), MembershipConfig::default(), vec![], 1, now);
        assert!(core.is_joined());
        assert_eq!(core.members().len(), 1);
    }

    #[test]
    fn garbage_packets_are_counted_not_fatal() {
        let now = Instant::now();
        let mut core = Core::new(meta(1), MembershipConfig::default(), vec![], 1, now);
        core.handle_packet(now, &[0xff; 40]);
        core.handle_packet(now, &[]);
        assert_eq!(core.bad_packets, 2);
    }
}
