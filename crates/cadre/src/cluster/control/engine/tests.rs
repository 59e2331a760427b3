//! Golden scripts for the controller engine: each file in `testscripts/` builds a metadata table
//! and a Raft group, feeds the leader's engine grants and ticks, and applies what a tick decides
//! to the table and the group as the runner would once committed (unless told it failed), so a
//! script follows a small cluster tick by tick. `UPDATE_GOLDENFILES=1 cargo test -p cadre --lib
//! control::engine` rewrites the expected output.
//!
//! ## Commands
//! The table: `member` and `shard`, as in [`crate::cluster::script`]; `table` prints it.
//!
//! The leader (node `a` unless `group me=`), times in ms since the script began:
//! - `limits [copies=shared|N] [moves=N] [voters=N]`: the limits (defaults: 4 shards, lease
//!   3000 ms + 500 ms drift, hand-off timeout 10 s, rebalance every 5 s, 1 move per tick, 2
//!   copies, 3 voters, voters replaced after 8 s down, members removed after 20 s gone).
//! - `group voters=A/B [learners=C] [joint=A/B/C] [behind=C] [term=T] [me=A]`: the Raft group by
//!   member names (Raft ids from the table); `behind` learners are not caught up; `me` leads
//!   (a new engine).
//! - `grant NAME... now=T [raft=ID]`: leases granted, their renewals received at T.
//! - `renew NAME [addr=A] [raft=ID] [draining=true]`: the admission a renewal needs (applied).
//! - `tick now=T [fail=true]`: one tick; its commands, applied unless `fail`.
//! - `live now=T`: the members the leader counts as live. `state`: the engine's memory.
//!
//! A node's side:
//! - `lease NAME sent=T`: NAME's renewal sent at T was granted (a lease of 3000 ms).
//! - `serve NAME key=K now=T [write=true] [opening=true]`: whether NAME serves key K.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use super::*;
use crate::cluster::script::{self, Args, Res};

const LEASE_MS: u64 = 3000;

struct Runner {
    ctl: Controller<Duration>,
    st: MetaState,
    group: Group,
    lim: Limits,
    /// Leases nodes hold, by name.
    held: BTreeMap<String, Held<Duration>>,
}

fn ms(t: Duration) -> u128 {
    t.as_millis()
}

fn at(a: &mut Args, key: &str) -> Res<Duration> {
    Ok(Duration::from_millis(a.num(key)?))
}

impl Runner {
    fn new() -> Runner {
        let lim = Limits {
            shard_count: 4,
            lease_hold: Duration::from_millis(LEASE_MS + 500),
            handoff_timeout: Duration::from_secs(10),
            rebalance_interval: Duration::from_secs(5),
            moves_per_tick_max: 1,
            copies: plan::Copies::Replicated { factor: 2 },
            voters_max: 3,
            voter_down_replace: Duration::from_secs(8),
            member_gone_remove: Duration::from_secs(20),
        };
        let group = Group { term: 1, me: 1, ..Group::default() };
        Runner { ctl: Controller::new("a".into()), st: MetaState::default(), group, lim, held: BTreeMap::new() }
    }

    fn raft_id(&self, name: &str) -> Res<NodeId> {
        Ok(self.st.members.get(name).ok_or_else(|| format!("no member {name}"))?.raft_id)
    }

    fn ids(&self, names: &[&str]) -> Res<BTreeSet<NodeId>> {
        names.iter().map(|n| self.raft_id(n)).collect()
    }

    fn name(&self, id: NodeId) -> String {
        self.group.names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
    }

    fn names(&self, ids: &BTreeSet<NodeId>) -> String {
        ids.iter().map(|id| self.name(*id)).collect::<Vec<_>>().join("/")
    }

    fn limits(&mut self, mut a: Args) -> Res<String> {
        if let Some(c) = a.take("copies") {
            self.lim.copies =
                if c == "shared" { plan::Copies::Shared } else { plan::Copies::Replicated { factor: c.parse()? } };
        }
        if let Some(m) = a.take("moves") {
            self.lim.moves_per_tick_max = m.parse()?;
        }
        if let Some(v) = a.take("voters") {
            self.lim.voters_max = v.parse()?;
        }
        a.done()?;
        Ok(String::new())
    }

    fn set_group(&mut self, mut a: Args) -> Res<String> {
        let (voters, learners) = (a.list("voters"), a.list("learners"));
        let (joint, behind) = (a.take("joint"), a.list("behind"));
        if let Some(t) = a.take("term") {
            self.group.term = t.parse()?;
        }
        if let Some(me) = a.take("me") {
            self.group.me = self.raft_id(me)?;
            self.ctl = Controller::new(me.into());
        }
        self.group.voters = self.ids(&voters)?;
        self.group.learners = self.ids(&learners)?;
        self.group.names =
            voters.iter().chain(&learners).map(|n| Ok((self.raft_id(n)?, n.to_string()))).collect::<Res<_>>()?;
        self.group.joint = match joint {
            Some(j) => Some(self.ids(&j.split('/').collect::<Vec<_>>())?),
            None => None,
        };
        let behind = self.ids(&behind)?;
        self.group.caught_up = self.group.learners.difference(&behind).copied().collect();
        a.done()?;
        Ok(String::new())
    }

    fn show_cmd(&self, c: &Cmd) -> String {
        match c {
            Cmd::Assign { shard, owner, expected_epoch } => {
                format!("assign shard {shard} to {owner} (epoch {expected_epoch})")
            }
            Cmd::BeginMove { shard, to, expected_epoch } => {
                format!("move shard {shard} to {to} (epoch {expected_epoch})")
            }
            Cmd::AbortMove { shard, expected_epoch } => {
                format!("abort the move of shard {shard} (epoch {expected_epoch})")
            }
            Cmd::Promote { shard, to, expected_epoch } => {
                format!("promote {to} for shard {shard} (epoch {expected_epoch})")
            }
            Cmd::AddReplica { shard, node, .. } => format!("add replica {node} to shard {shard}"),
            Cmd::DropReplica { shard, node, .. } => format!("drop replica {node} of shard {shard}"),
            other => format!("{other:?}"),
        }
    }

    /// Applies a command as the metadata would once committed; refusals are printed.
    fn apply(&mut self, c: &Cmd, out: &mut String) -> Res<()> {
        match self.st.apply(c) {
            Ok(crate::meta::CmdReply::Batch(outcomes)) => {
                for e in outcomes.into_iter().filter_map(Result::err) {
                    writeln!(out, "  refused: {e}")?;
                }
            }
            Ok(_) => {}
            Err(e) => writeln!(out, "  refused: {e}")?,
        }
        Ok(())
    }

    fn tick(&mut self, mut a: Args) -> Res<String> {
        let now = at(&mut a, "now")?;
        let fail = a.flag("fail")?;
        a.done()?;
        let cmds = self.ctl.tick(now, &self.st, &self.group, &self.lim);
        let mut out = String::new();
        if cmds.is_empty() {
            out.push_str("nothing to do\n");
        }
        for cmd in cmds {
            match &cmd {
                Command::Init { shard_count } => writeln!(out, "init {shard_count} shards")?,
                Command::Place(cmds) => {
                    for c in cmds {
                        writeln!(out, "{}", self.show_cmd(c))?;
                    }
                }
                Command::FinishJoint(to) => writeln!(out, "finish the joint change: voters {}", self.names(to))?,
                Command::ReplaceVoter { old, new, voters } => {
                    let (old, new) = (self.name(*old), self.name(*new));
                    writeln!(out, "replace voter {old} with {new}: voters {}", self.names(voters))?
                }
                Command::AddVoters(voters) => writeln!(out, "add voters: {}", self.names(voters))?,
                Command::Remove { name, learners } => {
                    writeln!(out, "remove {name} (learners {})", self.names(learners))?
                }
            }
            if fail {
                writeln!(out, "  failed")?;
                continue;
            }
            self.commit(cmd, &mut out)?;
        }
        Ok(out)
    }

    /// What the runner's command changes once it succeeds.
    fn commit(&mut self, cmd: Command, out: &mut String) -> Res<()> {
        let g = &mut self.group;
        match cmd {
            Command::Init { shard_count } => self.apply(&Cmd::Init { shard_count }, out)?,
            Command::Place(cmds) => self.apply(&Cmd::Batch(cmds), out)?,
            Command::FinishJoint(to) => {
                g.voters = to;
                g.joint = None;
            }
            Command::ReplaceVoter { old, voters, .. } => {
                g.learners.retain(|id| !voters.contains(id));
                g.names.remove(&old);
                g.voters = voters;
            }
            Command::AddVoters(voters) => {
                g.learners.retain(|id| !voters.contains(id));
                g.voters = voters;
            }
            Command::Remove { name, learners } => {
                for id in &learners {
                    g.learners.remove(id);
                    g.names.remove(id);
                }
                self.apply(&Cmd::Remove { name }, out)?;
            }
        }
        Ok(())
    }

    fn show_table(&self) -> String {
        let mut out = String::new();
        for (name, r) in &self.st.members {
            let draining = if r.draining { ", draining" } else { "" };
            let _ = writeln!(out, "member {name} (raft {}{draining})", r.raft_id);
        }
        for (n, e) in self.st.shards.iter().enumerate() {
            let owner = e.owner.as_deref().unwrap_or("none");
            let state = match &e.state {
                ShardState::Moving { to } => format!(" moving to {to}"),
                _ => String::new(),
            };
            let replicas: Vec<String> =
                e.replicas.iter().map(|r| format!("{}{}", r.node, if r.in_sync { "" } else { "(out)" })).collect();
            let _ =
                writeln!(out, "shard {n}: owner {owner} epoch {}{state} replicas [{}]", e.epoch, replicas.join(" "));
        }
        out
    }
}

impl script::Script for Runner {
    fn table(&mut self) -> &mut MetaState {
        &mut self.st
    }

    fn line(&mut self, name: &str, mut a: Args) -> Res<String> {
        let out = match name {
            "limits" => return self.limits(a),
            "group" => return self.set_group(a),
            "tick" => return self.tick(a),
            "grant" => {
                let now = at(&mut a, "now")?;
                let raft = a.take("raft").map(str::parse).transpose()?;
                for who in std::mem::take(&mut a.pos) {
                    let raft = match raft {
                        Some(r) => r,
                        None => self.raft_id(who)?,
                    };
                    self.ctl.granted(self.group.term, who.into(), raft, now);
                }
                String::new()
            }
            "renew" => {
                let who = a.pos.pop().ok_or("renew NAME")?;
                let known = self.st.members.get(who);
                let addr = a.take("addr").map(String::from).or_else(|| known.map(|r| r.addr.clone()));
                let raft = match a.take("raft") {
                    Some(r) => r.parse()?,
                    None => known.map_or(0, |r| r.raft_id),
                };
                let req = RenewReq {
                    name: who.into(),
                    addr: addr.ok_or("renew of a new member needs addr=")?,
                    raft_id: raft,
                    draining: a.flag("draining")?,
                };
                match super::admission(&self.st, &req) {
                    Some(cmd) => {
                        let mut out = format!("admit {who} at {} (raft {raft})\n", req.addr);
                        self.apply(&cmd, &mut out)?;
                        out
                    }
                    None => "no admission needed\n".into(),
                }
            }
            "live" => {
                let now = at(&mut a, "now")?;
                let live: Vec<&str> = self
                    .st
                    .members
                    .keys()
                    .filter(|n| self.ctl.live(n, now, self.lim.lease_hold))
                    .map(String::as_str)
                    .collect();
                format!("live: [{}]\n", live.join(" "))
            }
            "lease" => {
                let who = a.pos.pop().ok_or("lease NAME")?;
                let sent = at(&mut a, "sent")?;
                let until = sent + Duration::from_millis(LEASE_MS);
                let held = Held::extend(self.held.get(who).copied(), sent, until);
                self.held.insert(who.into(), held);
                format!("{who} holds a lease until {} ms (renewed at {} ms)\n", ms(held.until), ms(held.renewed))
            }
            "serve" => {
                let who = a.pos.pop().ok_or("serve NAME")?;
                let key = Key::new("counter", a.need("key")?);
                let now = at(&mut a, "now")?;
                let (write, opening) = (a.flag("write")?, a.flag("opening")?);
                let valid = Held::valid(self.held.get(who).copied(), now);
                match serves(&self.st, who, &key, write, valid, |_, _| !opening) {
                    Ok(f) => format!("serves shard {} at epoch {}\n", f.shard, f.epoch),
                    Err(e) => format!("refused: {e}\n"),
                }
            }
            "table" => self.show_table(),
            "state" => self.ctl.describe(ms),
            other => return Err(format!("unknown command {other}").into()),
        };
        a.pos.clear();
        a.done()?;
        Ok(out)
    }
}

#[test]
fn members_are_removed_only_when_gone_long_owning_nothing_and_no_voter() {
    let mut st = MetaState::default();
    st.apply(&Cmd::Init { shard_count: 2 }).unwrap();
    for n in ["a", "b", "c", "d", "e"] {
        st.apply(&Cmd::Admit { name: n.into(), addr: format!("{n}:1"), raft_id: 0 }).unwrap();
    }
    st.apply(&Cmd::Assign { shard: 0, owner: "a".into(), expected_epoch: 0 }).unwrap();
    st.apply(&Cmd::Assign { shard: 1, owner: "c".into(), expected_epoch: 0 }).unwrap();
    st.apply(&Cmd::BeginMove { shard: 0, to: "e".into(), expected_epoch: 1 }).unwrap();
    let live = vec!["a".to_string()];
    let voters: BTreeSet<String> = ["a", "b"].map(String::from).into();
    let (mut down, after) = (BTreeMap::new(), Duration::from_secs(10));
    let gone =
        |down: &mut BTreeMap<String, Duration>, at: Duration| gone_members(&st, &live, &voters, "a", down, at, after);
    // Seen down now: not yet gone.
    assert!(gone(&mut down, Duration::ZERO).is_empty());
    assert_eq!(down.len(), 4, "b, c, d and e are counted from now");
    // Long after: b is a voter, c owns shard 1, e is shard 0's move target; d goes.
    assert_eq!(gone(&mut down, after), ["d"]);
    // A member seen live again starts over.
    let live_d = vec!["a".to_string(), "d".to_string()];
    gone_members(&st, &live_d, &voters, "a", &mut down, after, after);
    assert!(!down.contains_key("d"));
    assert!(gone(&mut down, after + Duration::from_secs(1)).is_empty(), "d's wait started again");
}

#[test]
fn voter_counts_are_odd_and_bounded() {
    let wanted: Vec<usize> = (0..8).map(|live| voters_wanted(3, live)).collect();
    assert_eq!(wanted, [1, 1, 1, 3, 3, 3, 3, 3]);
    assert_eq!(voters_wanted(5, 4), 3);
    assert_eq!(voters_wanted(5, 9), 5);
    assert_eq!(voters_wanted(4, 9), 3, "an even maximum is rounded down");
}

const SCRIPTS: &str = "src/cluster/control/engine/testscripts";

crate::cluster::script::scripts!(
    Runner::new(),
    SCRIPTS,
    new_cluster_init,
    new_leader_holds,
    lease_lapses_mid_call,
    lease_extends_forward,
    owner_dies_promoted,
    move_target_dies,
    move_times_out,
    move_target_behind,
    rebalance_paced,
    draining_member,
    admission,
    voters_grow_odd,
    voter_replaced_after_down,
    drained_voter_replaced,
    joint_change_finished,
    member_gone_removed,
    term_change_forgets,
    failed_place_retried,
    whole_cluster_restart,
);
