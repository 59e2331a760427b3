//! Golden scripts for the route of one request: each file in `testscripts/` sets up a table,
//! starts a request on a node, asks where it goes and feeds it answers
//! (`UPDATE_GOLDENFILES=1 cargo test -p cadre --lib routing::engine` rewrites the expected output).
//!
//! ## Commands
//! - `member`, `shard`: the table, as in [`crate::cluster::script`] (with one shard, every key is
//!   in shard 0; with no `shard` line there is no table yet).
//! - `request me=NAME [redirects=N]`: a new request for key `counter/k` on NAME (5 redirects at
//!   most by default).
//! - `target`: where it goes now, from the table; an error is the attempt's answer, and what it
//!   means follows.
//! - `answer served|owner-changed|timeout|unknown-type|transport|not-owner [owner=NAME epoch=E]`:
//!   how the attempt ended; what to do next.
//! - `state`: the route's state.

use std::time::Duration;

use super::*;
use crate::cluster::placement_in;
use crate::cluster::script::{self, Args, Res};
use crate::meta::MetaState;

struct Runner {
    st: MetaState,
    route: Option<Route<'static>>,
}

fn key() -> Key {
    Key::new("counter", "k")
}

fn show(next: Next<String>) -> String {
    match next {
        Next::Done(Ok(node)) => format!("done: served by {node}\n"),
        Next::Done(Err(e)) => format!("fail: {e}\n"),
        Next::Again => "again\n".into(),
        Next::Wait { wait_ms, then } => format!("wait up to {wait_ms} ms for the table; at the deadline: {then}\n"),
    }
}

impl Runner {
    fn route(&mut self) -> Res<&mut Route<'static>> {
        self.route.as_mut().ok_or_else(|| "no request: `request me=NAME` first".into())
    }

    fn target(&mut self) -> Res<String> {
        let placement = placement_in(&self.st, &key());
        let route = self.route()?;
        Ok(match route.target(placement) {
            Ok(Target::Local) => "local\n".into(),
            Ok(Target::Remote { owner, routed: Some(p) }) => {
                let moving = p.moving_to.map(|t| format!(", moving to {t}")).unwrap_or_default();
                format!("ask {owner}, routed by shard {}@{}{moving}\n", p.shard, p.epoch)
            }
            Ok(Target::Remote { owner, routed: None }) => format!("ask {owner}, routed by its hint\n"),
            Err(e) => format!("no target: {e}\n{}", show(route.on_answer(&key(), Answer::Failed(e.clone())))),
        })
    }

    fn answer(&mut self, a: &mut Args) -> Res<String> {
        let how = a.pos.pop().ok_or("answer HOW")?;
        let answer = match how {
            "served" => Answer::Served(a.need("by")?.to_string()),
            "owner-changed" => Answer::OwnerChanged,
            "timeout" => Answer::Failed(CallError::Timeout(Duration::from_millis(500))),
            "unknown-type" => Answer::Failed(CallError::UnknownType("counter".into())),
            "transport" => Answer::Failed(CallError::Unavailable(Unavailable::Transport("connection refused".into()))),
            "not-owner" => {
                let owner = a.take("owner").map(str::to_string);
                Answer::Failed(CallError::NotOwner { owner, epoch: a.num("epoch")? })
            }
            other => return Err(format!("unknown answer {other}").into()),
        };
        Ok(show(self.route()?.on_answer(&key(), answer)))
    }
}

impl script::Script for Runner {
    fn table(&mut self) -> &mut MetaState {
        &mut self.st
    }

    fn line(&mut self, name: &str, mut a: Args) -> Res<String> {
        let out = match name {
            "request" => {
                let me: &'static str = Box::leak(a.need("me")?.to_string().into_boxed_str());
                let redirects = a.take("redirects").map(str::parse).transpose()?.unwrap_or(5);
                self.route = Some(Route::new(me, redirects));
                String::new()
            }
            "target" => self.target()?,
            "answer" => self.answer(&mut a)?,
            "state" => self.route()?.describe(),
            other => return Err(format!("unknown command {other}").into()),
        };
        a.pos.clear();
        a.done()?;
        Ok(out)
    }
}

const SCRIPTS: &str = "src/cluster/routing/engine/testscripts";

script::scripts!(
    Runner { st: MetaState::default(), route: None },
    SCRIPTS,
    route_local_or_remote,
    route_follows_a_newer_owner,
    route_redirects_bounded,
    route_waits_for_an_owner,
    route_owner_changed_in_flight,
);
