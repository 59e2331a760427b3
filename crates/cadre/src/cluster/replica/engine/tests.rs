//! Golden scripts for the replication engine: each file in `testscripts/` builds a metadata
//! table and feeds the engine one input at a time; the expected output is in the file
//! (`UPDATE_GOLDENFILES=1 cargo test -p cadre --lib replica::engine` rewrites it).
//!
//! ## Commands
//! The table: `member` and `shard`, as in [`crate::cluster::script`].
//!
//! The engine (`shard`, `epoch`, `to`, `node` as arguments):
//! - `table`: a new table; prints the jobs started. `done open|catch-up`: a job ended.
//! - `opened`: an opening finished. `write key=K`: the targets of a write (kept for `answer`).
//!   `answer failed=A/B`: the last write's answers. `close node=N`, `unreported`.
//! - `open go|local|reported|fenced [node=N] [ok=false]`: an input of the shard's opening.
//! - `sync go|sent|failed|paced|turn|marked|settled`: an input of a catch-up job (`sent keys= bytes=
//!   through=K|end now=µs`, `marked outcome=committed|refused|unknown`, `settled [ok=false]`);
//!   prints what the job asks for next. The engine paces catch-ups at 1,000,000 bytes/s.
//! - `attempt`, `page keys= bytes= through=K|end`, `broken`, `require`, `pending`, `settle`,
//!   `drop`: a catch-up attempt's steps. `outcome generation=G`: whether the table shows its mark.
//! - `enter turn=write|page`, `leave ticket=T`: turns on the shard's gate.
//! - `state`: the engine's state.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::*;
use crate::cluster::script::{self, Args, Res};
use crate::meta::MetaState;

struct Runner {
    engine: Engine,
    st: MetaState,
    /// The last write's targets, per shard.
    last: BTreeMap<u32, Vec<Target>>,
}

impl Runner {
    fn new() -> Runner {
        Runner { engine: Engine::new("a".into()).paced(1_000_000), st: MetaState::default(), last: BTreeMap::new() }
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

fn show_sync(cmd: &SyncCmd) -> String {
    match cmd {
        SyncCmd::Page { after: None } => "send the first page\n".into(),
        SyncCmd::Page { after: Some(k) } => format!("send the page after {}/{}\n", k.ty, k.id),
        SyncCmd::Pace { wait_us } => format!("pace: wait {wait_us} µs\n"),
        SyncCmd::TakeTurn => "take the page turn\n".into(),
        SyncCmd::Mark { generation } => format!("ask for the in-sync mark of generation {generation}\n"),
        SyncCmd::Settle => "settle: mark out of sync\n".into(),
        SyncCmd::Retry { after_ms } => format!("retry after {after_ms} ms\n"),
        SyncCmd::Done { caught_up } => format!("done: {}\n", if *caught_up { "caught up" } else { "no longer wanted" }),
    }
}

impl Runner {
    fn fence(a: &mut Args) -> Res<Fence> {
        Ok(Fence { shard: a.num("shard")?, epoch: a.num("epoch")? })
    }
}

impl script::Script for Runner {
    fn table(&mut self) -> &mut MetaState {
        &mut self.st
    }

    fn line(&mut self, name: &str, mut a: Args) -> Res<String> {
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
            "sync" => {
                let f = Self::fence(&mut a)?;
                let to = a.need("to")?;
                let input = match a.pos.first().copied() {
                    Some("go") => SyncInput::Go,
                    Some("sent") => {
                        let (keys, bytes, now_us) = (a.num("keys")?, a.num("bytes")?, a.num("now")?);
                        let through = match a.need("through")? {
                            "end" => None,
                            k => Some(key(k)),
                        };
                        SyncInput::PageSent { keys, bytes, through, now_us }
                    }
                    Some("failed") => SyncInput::PageFailed,
                    Some("paced") => SyncInput::Paced,
                    Some("turn") => SyncInput::Turn,
                    Some("marked") => SyncInput::Marked(match a.need("outcome")? {
                        "committed" => MarkOutcome::Committed,
                        "refused" => MarkOutcome::Refused,
                        "unknown" => MarkOutcome::Unknown,
                        other => return Err(format!("outcome=committed|refused|unknown, not {other}").into()),
                    }),
                    Some("settled") => {
                        SyncInput::Settled { ok: a.take("ok").map(str::parse).transpose()?.unwrap_or(true) }
                    }
                    other => return Err(format!("sync go|sent|failed|paced|turn|marked|settled, not {other:?}").into()),
                };
                a.pos.clear();
                show_sync(&e.catch_up_step(&self.st, f.shard, f.epoch, to, input))
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

const SCRIPTS: &str = "src/cluster/replica/engine/testscripts";

script::scripts!(
    Runner::new(),
    SCRIPTS,
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
    sync_job_catches_up,
    sync_job_paced,
    sync_job_page_failed,
    sync_job_broken_by_a_write,
    sync_job_mark_refused,
    sync_job_mark_unknown_settled,
    sync_job_no_longer_wanted,
);
