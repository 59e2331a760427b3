//! Golden scripts for the replication engine: each file in `testscripts/` builds a metadata
//! table and feeds the engine one input at a time; the expected output is in the file
//! (`UPDATE_GOLDENFILES=1 cargo test -p cadre --lib replica::engine` rewrites it).
//!
//! ## Commands
//! The table:
//! - `member NAME...`: members at addresses `127.0.0.1:7001`, `:7002`, ... (`noaddr=NAME` gives
//!   one no usable address).
//! - `shard N owner=NAME|none epoch=E [replicas=A/B] [out=C] [gen.C=G]`: shard N's entry (the table
//!   grows to hold it). A replica keeps its generation while its in-sync flag is unchanged and
//!   gets a new one when it changes (as the metadata does), unless `gen.NAME` says.
//!
//! The engine (`shard`, `epoch`, `to`, `node` as arguments):
//! - `table`: a new table; prints the jobs started. `done open|catch-up`: a job ended.
//! - `opened`: an opening finished. `write key=K`: the targets of a write (kept for `answer`).
//!   `answer failed=A/B`: the last write's answers. `close node=N`, `unreported`.
//! - `open go|local|reported|fenced [node=N] [ok=false]`: an input of the shard's opening.
//! - `attempt`, `page keys= bytes= through=K|end`, `broken`, `require`, `pending`, `settle`,
//!   `drop`: a catch-up attempt's steps. `outcome generation=G`: whether the table shows its mark.
//! - `enter turn=write|page`, `leave ticket=T`: turns on the shard's gate.
//! - `state`: the engine's state.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;

use goldenscript::{Command, Context};

use super::*;
use crate::meta::{MemberRecord, MetaState, Replica, ShardEntry, ShardState};

struct Runner {
    engine: Engine,
    st: MetaState,
    /// The last write's targets, per shard.
    last: BTreeMap<u32, Vec<Target>>,
}

impl Runner {
    fn new() -> Runner {
        Runner { engine: Engine::new("a".into()), st: MetaState::default(), last: BTreeMap::new() }
    }
}

type Res<T> = Result<T, Box<dyn Error>>;

/// Arguments by key, every one required to be used.
struct Args<'a> {
    keys: BTreeMap<&'a str, &'a str>,
    pos: Vec<&'a str>,
}

impl<'a> Args<'a> {
    fn of(c: &'a Command) -> Args<'a> {
        let mut args = c.consume_args();
        let mut keys = BTreeMap::new();
        while let Some((k, v)) = args.next_key() {
            keys.insert(k, v);
        }
        let mut pos = Vec::new();
        while let Some(p) = args.next_pos() {
            pos.push(p);
        }
        Args { keys, pos }
    }

    fn take(&mut self, key: &str) -> Option<&'a str> {
        self.keys.remove(key)
    }

    fn need(&mut self, key: &str) -> Res<&'a str> {
        self.take(key).ok_or_else(|| format!("missing {key}=").into())
    }

    fn num<T: std::str::FromStr>(&mut self, key: &str) -> Res<T>
    where
        T::Err: Error + 'static,
    {
        Ok(self.need(key)?.parse()?)
    }

    fn list(&mut self, key: &str) -> Vec<&'a str> {
        self.take(key).map(|v| v.split('/').filter(|s| !s.is_empty()).collect()).unwrap_or_default()
    }

    fn done(self) -> Res<()> {
        match self.keys.keys().next() {
            Some(k) => Err(format!("unexpected argument {k}=").into()),
            None => Ok(()),
        }
    }
}

fn key(id: &str) -> Key {
    Key::new("counter", id)
}

fn show_jobs(jobs: &[Job]) -> String {
    let lines: Vec<String> = jobs.iter().map(|j| format!("start {}\n", describe_job(j))).collect();
    if lines.is_empty() {
        "no job started\n".into()
    } else {
        lines.concat()
    }
}

fn show_open(cmds: &[OpenCmd]) -> String {
    let line = |c: &OpenCmd| match c {
        OpenCmd::FenceLocal => "fence the local store\n".to_string(),
        OpenCmd::Report { node } => format!("mark {node} out of sync\n"),
        OpenCmd::FenceReplica { node, addr } => format!("fence {node} at {addr}\n"),
        OpenCmd::Retry { after_ms } => format!("retry after {after_ms} ms\n"),
        OpenCmd::Done { opened: true } => "done: opened\n".to_string(),
        OpenCmd::Done { opened: false } => "done: not opened\n".to_string(),
    };
    if cmds.is_empty() {
        return "nothing to do\n".into();
    }
    cmds.iter().map(line).collect()
}

impl Runner {
    fn member(&mut self, mut a: Args) -> Res<String> {
        let noaddr = a.list("noaddr");
        for name in a.pos.iter().chain(&noaddr) {
            let n = self.st.members.len() as u64;
            let addr = if noaddr.contains(name) { "nowhere".to_string() } else { format!("127.0.0.1:{}", 7001 + n) };
            self.st
                .members
                .insert(name.to_string(), MemberRecord { addr, admitted: n, draining: false, raft_id: n + 1 });
        }
        a.pos.clear();
        a.done()?;
        Ok(String::new())
    }

    fn shard(&mut self, mut a: Args) -> Res<String> {
        let n: u32 = a.pos.first().ok_or("shard needs its number")?.parse()?;
        let owner = a.need("owner")?;
        let epoch = a.num("epoch")?;
        let (in_sync, out) = (a.list("replicas"), a.list("out"));
        if self.st.shards.len() <= n as usize {
            let none = ShardEntry { owner: None, epoch: 0, state: ShardState::Unassigned, replicas: Vec::new() };
            self.st.shards.resize(n as usize + 1, none);
            self.st.shard_count = n + 1;
        }
        let old = self.st.shards[n as usize].clone();
        let mut replicas = Vec::new();
        for (node, flag) in in_sync.iter().map(|r| (r, true)).chain(out.iter().map(|r| (r, false))) {
            let kept = old.replica(node).filter(|r| r.in_sync == flag).map(|r| r.generation);
            let generation = match a.take(&format!("gen.{node}")) {
                Some(g) => g.parse()?,
                None => kept.unwrap_or_else(|| {
                    self.st.generations += 1;
                    self.st.generations
                }),
            };
            replicas.push(Replica { node: node.to_string(), in_sync: flag, generation });
        }
        let owner = (owner != "none").then(|| owner.to_string());
        let state = if owner.is_some() { ShardState::Active } else { ShardState::Unassigned };
        self.st.shards[n as usize] = ShardEntry { owner, epoch, state, replicas };
        a.pos.clear();
        a.done()?;
        Ok(String::new())
    }

    fn fence(a: &mut Args) -> Res<Fence> {
        Ok(Fence { shard: a.num("shard")?, epoch: a.num("epoch")? })
    }

    fn engine(&mut self, name: &str, mut a: Args) -> Res<String> {
        let e = &mut self.engine;
        let out = match name {
            "table" => show_jobs(&e.on_table(&self.st)),
            "done" => {
                let fence = Self::fence(&mut a)?;
                let kind = match a.pos.first().copied() {
                    Some("open") => JobKind::Open,
                    Some("catch-up") => JobKind::CatchUp { to: a.need("to")?.into() },
                    other => return Err(format!("done open|catch-up, not {other:?}").into()),
                };
                a.pos.clear();
                show_jobs(&e.job_done(&Job { shard: fence.shard, epoch: fence.epoch, kind }, &self.st))
            }
            "opened" => {
                let f = Self::fence(&mut a)?;
                let opened = e.opened(&self.st, f.shard, f.epoch);
                format!("{}\n", if opened { "opened" } else { "not opened: not the owner at this epoch" })
            }
            "write" => {
                let f = Self::fence(&mut a)?;
                match e.targets(&self.st, f, &key(a.need("key")?)) {
                    Ok(targets) => {
                        let mut out = String::new();
                        for t in &targets {
                            let need = if t.in_sync { "required" } else { "forwarded" };
                            writeln!(out, "→ {} at {} ({need})", t.node, t.addr)?;
                        }
                        if targets.is_empty() {
                            out.push_str("no replica\n");
                        }
                        self.last.insert(f.shard, targets);
                        out
                    }
                    Err(err) => format!("refused: {err}\n"),
                }
            }
            "answer" => {
                let f = Self::fence(&mut a)?;
                let failed = a.list("failed");
                let targets = self.last.remove(&f.shard).ok_or("no write to answer")?;
                let answers = targets.into_iter().map(|t| {
                    let ok = !failed.contains(&t.node.as_str());
                    (t, ok)
                });
                let missed = e.answered(f, answers.collect());
                format!("missed: [{}]\n", missed.join(" "))
            }
            "close" => {
                let f = Self::fence(&mut a)?;
                e.close(f, a.need("node")?);
                String::new()
            }
            "unreported" => {
                let f = Self::fence(&mut a)?;
                format!("unreported: [{}]\n", e.unreported(f.shard, f.epoch).join(" "))
            }
            "open" => {
                let f = Self::fence(&mut a)?;
                let ok = a.take("ok").map(str::parse).transpose()?.unwrap_or(true);
                let input = match a.pos.first().copied() {
                    Some("go") => OpenInput::Go,
                    Some("local") => OpenInput::LocalFenced { ok },
                    Some("reported") => OpenInput::Reported { node: a.need("node")?.into(), ok },
                    Some("fenced") => OpenInput::ReplicaFenced { node: a.need("node")?.into(), ok },
                    other => return Err(format!("open go|local|reported|fenced, not {other:?}").into()),
                };
                a.pos.clear();
                show_open(&e.open_step(&self.st, f.shard, f.epoch, input))
            }
            "attempt" => {
                let f = Self::fence(&mut a)?;
                match e.begin_attempt(&self.st, f.shard, f.epoch, a.need("to")?) {
                    Ok(generation) => format!("attempt of generation {generation}\n"),
                    Err(err) => format!("refused: {err}\n"),
                }
            }
            "page" => {
                let (shard, to) = (a.num("shard")?, a.need("to")?);
                let (keys, bytes) = (a.num("keys")?, a.num("bytes")?);
                let through = match a.need("through")? {
                    "end" => None,
                    k => Some(key(k)),
                };
                match e.page_sent(shard, to, keys, bytes, through) {
                    Ok(()) => String::new(),
                    Err(err) => format!("refused: {err}\n"),
                }
            }
            "broken" => format!("broken: {}\n", e.broken(a.num("shard")?, a.need("to")?)),
            "require" => format!("required: {}\n", e.require(a.num("shard")?, a.need("to")?)),
            "pending" => format!("pending mark: {:?}\n", e.pending_mark(a.num("shard")?, a.need("to")?)),
            "settle" => {
                e.mark_settled(a.num("shard")?, a.need("to")?);
                String::new()
            }
            "drop" => {
                e.drop_progress(a.num("shard")?, a.need("to")?);
                String::new()
            }
            "outcome" => {
                let f = Self::fence(&mut a)?;
                let (to, generation) = (a.need("to")?, a.num("generation")?);
                format!("outcome known: {}\n", mark_outcome_known(&self.st, f.shard, f.epoch, to, generation))
            }
            "enter" => {
                let shard = a.num("shard")?;
                let turn = match a.need("turn")? {
                    "write" => Turn::Write,
                    "page" => Turn::Page,
                    other => return Err(format!("turn=write|page, not {other}").into()),
                };
                match e.enter(shard, turn) {
                    Entry::Go(t) => format!("goes: #{t}\n"),
                    Entry::Wait(t) => format!("waits: #{t}\n"),
                }
            }
            "leave" => {
                let going = e.leave(a.num("shard")?, a.num("ticket")?);
                let going: Vec<String> = going.iter().map(|t| format!("#{t}")).collect();
                format!("now going: [{}]\n", going.join(" "))
            }
            "state" => e.describe(),
            other => return Err(format!("unknown command {other}").into()),
        };
        a.done()?;
        Ok(out)
    }
}

impl goldenscript::Runner for Runner {
    type Command = Command;

    fn run(&mut self, c: &Command, _: &Context) -> Res<String> {
        let a = Args::of(c);
        match c.name.as_str() {
            "member" => self.member(a),
            "shard" => self.shard(a),
            name => self.engine(name, a),
        }
    }
}

const SCRIPTS: &str = "src/cluster/replica/engine/testscripts";

macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let path = format!("{SCRIPTS}/{}", stringify!($name));
                goldenscript::run(&mut Runner::new(), &path).expect("the script runs");
            }
        )*

        /// Every script in the folder is run by a test above.
        #[test]
        fn every_script_is_listed() {
            let listed = [$(stringify!($name)),*];
            for file in std::fs::read_dir(SCRIPTS).expect("the scripts folder") {
                let name = file.expect("an entry").file_name().into_string().expect("a name");
                assert!(listed.contains(&name.as_str()), "add {name} to scripts! in {}", file!());
            }
        }
    };
}

scripts!(
    open_on_assignment,
    open_after_move,
    write_targets,
    write_fenced,
    write_missed_replica,
    write_missed_forwarded,
    closed_shard_reopens,
    catch_up_pages,
    catch_up_write_ordering,
    catch_up_generation_changes,
    catch_up_replica_dropped,
    catch_up_mark_pending,
    catch_up_mark_settled,
    write_no_address,
    jobs_restart_after_done,
    gate_writes_together,
    gate_page_alone,
    gate_first_come,
    gate_waiter_gives_up,
    open_first_epoch,
    open_fences_local_first,
    open_reports_missed_first,
    open_unfenced_replica,
    open_retries,
    open_moved_away,
    open_late_answers,
);
