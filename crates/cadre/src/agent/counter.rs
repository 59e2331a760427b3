//! The built-in `counter` agent: `counter.add` (data: an integer; reply: the new value) and
//! `counter.get` (reply: the value).

use serde::{Deserialize, Serialize};

use super::{Agent, AgentError, Ctx, Reply, Route};
use crate::signal::{Data, Signal};

/// The built-in `counter` agent type, registered on every node.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    /// The value (starts at 0).
    pub value: i64,
}

impl Agent for Counter {
    const TYPE: &'static str = "counter";
    const ROUTES: &'static [(&'static str, Route<Self>)] =
        &[("counter.add", Counter::add), ("counter.get", Counter::get)];
}

impl Counter {
    fn add(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let n = match &signal.data {
            Some(Data::Json(v)) => v.as_i64(),
            _ => None,
        }
        .ok_or_else(|| AgentError::Failed("counter.add needs an integer as data".into()))?;
        self.value =
            self.value.checked_add(n).ok_or_else(|| AgentError::Failed("the counter would overflow".into()))?;
        Ok(self.value.into())
    }

    fn get(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        Ok(self.value.into())
    }
}
