//! Golden scripts for the hand-off engine of node `a`: each file in `testscripts/` changes the
//! table, feeds the engine the outcome of each step, and asks what node `a`'s gate and read rule
//! say meanwhile (`UPDATE_GOLDENFILES=1 cargo test -p cadre --lib handoff::engine` rewrites the
//! expected output).
//!
//! ## Commands
//! - `member`, `shard`: the table, as in [`crate::cluster::script`].
//! - `table`: node `a` sees the table as it is now; what it asks for.
//! - `passivated|reported|resume shard=S epoch=E [ok=false]`: a step's outcome; the next step.
//! - `serve NAME key=K [write=true]`: the gate's decision on NAME (lease valid, shards open).
//! - `read NAME key=K [age=MS] [owner-only=true]`: whether NAME's copy may answer a read (its
//!   lease renewed `age` ago, 100 ms by default; replicas answer within 1000 ms).
//! - `state`: the engine's state.

use std::time::Duration;

use super::*;
use crate::cluster::control::engine::serves;
use crate::cluster::read::{read_rule, Answering};
use crate::cluster::script::{self, Args, Res};
use crate::storage::Key;

struct Runner {
    engine: Handoffs,
    st: MetaState,
}

fn show(cmd: &HandoffCmd) -> String {
    match cmd {
        HandoffCmd::Passivate(shards) => {
            let shards: Vec<String> = shards.iter().map(u32::to_string).collect();
            format!("passivate the agents of shards [{}]\n", shards.join(" "))
        }
        HandoffCmd::Start { shard, epoch, to } => {
            format!("hand shard {shard}@{epoch} over to {to}: passivate its agents\n")
        }
        HandoffCmd::Report { shard, epoch } => format!("report shard {shard}@{epoch} handed over\n"),
        HandoffCmd::Retry { shard, epoch, after_ms } => format!("retry shard {shard}@{epoch} after {after_ms} ms\n"),
        HandoffCmd::Done { shard, epoch, reported } => {
            let why = if *reported { "reported" } else { "no longer moving from here" };
            format!("done with shard {shard}@{epoch}: {why}\n")
        }
    }
}

impl script::Script for Runner {
    fn table(&mut self) -> &mut MetaState {
        &mut self.st
    }

    fn line(&mut self, name: &str, mut a: Args) -> Res<String> {
        let out = match name {
            "table" => {
                let cmds = self.engine.on_table(&self.st);
                if cmds.is_empty() {
                    "nothing to do\n".to_string()
                } else {
                    cmds.iter().map(show).collect()
                }
            }
            "passivated" | "reported" | "resume" => {
                let (shard, epoch) = (a.num("shard")?, a.num("epoch")?);
                let ok = a.take("ok").map(str::parse).transpose()?.unwrap_or(true);
                let input = match name {
                    "passivated" => HandoffInput::Passivated,
                    "reported" => HandoffInput::Reported { ok },
                    _ => HandoffInput::Resume,
                };
                show(&self.engine.step(&self.st, shard, epoch, input))
            }
            "serve" => {
                let who = a.pos.pop().ok_or("serve NAME")?;
                let key = Key::new("counter", a.need("key")?);
                match serves(&self.st, who, &key, a.flag("write")?, true, |_, _| true) {
                    Ok(f) => format!("{who} serves shard {} at epoch {}\n", f.shard, f.epoch),
                    Err(e) => format!("{who} refuses: {e}\n"),
                }
            }
            "read" => {
                let who = a.pos.pop().ok_or("read NAME")?;
                let key = Key::new("counter", a.need("key")?);
                let age = a.take("age").map(str::parse).transpose()?.unwrap_or(100);
                let owner_only = a.flag("owner-only")?;
                let node = Answering { me: who, renewed_ago: Some(Duration::from_millis(age)), open: &|_, _| true };
                match read_rule(&self.st, &node, &key, 1000, owner_only) {
                    Ok((role, epoch)) => format!("{who} answers as {} at epoch {epoch}\n", role.as_str()),
                    Err((reason, e)) => format!("{who} may not answer ({reason}): {e}\n"),
                }
            }
            "state" => self.engine.describe(),
            other => return Err(format!("unknown command {other}").into()),
        };
        a.pos.clear();
        a.done()?;
        Ok(out)
    }
}

const SCRIPTS: &str = "src/cluster/handoff/engine/testscripts";

script::scripts!(
    Runner { engine: Handoffs::new("a".into()), st: MetaState::default() },
    SCRIPTS,
    handoff_completes,
    handoff_report_retried,
    handoff_aborted,
    handoff_owner_cut_off,
    shards_given_up,
);
