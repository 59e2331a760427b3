//! The route of one agent request as a state machine: where to send it next, and what each
//! answer means. [`Route::target`] names the node to try from this node's placement of the key
//! (or from a newer owner a refusal named); [`Route::on_answer`] turns the outcome into the next
//! step: done, try again at once (a newer owner is known, or the table moved the shard under an
//! ask in flight), or wait for the table to change. The runner in `mod.rs` does the asking and the
//! waiting; this owns the redirect count, the hint and the backoff, and has no clock.
//!
//! Caveats: a hint is followed only when it names a newer epoch than the one the request was
//! last sent at, so two nodes that each think the other owns a shard cannot bounce a request
//! between them; every redirect counts against `redirects_max`, and waits double from
//! [`RETRY_WAIT_MIN_MS`] up to eight times that, until the caller's deadline.

use crate::agent::{CallError, Unavailable};
use crate::cluster::{Placement, RETRY_WAIT_MIN_MS};
use crate::storage::Key;

/// Longest wait for a table change between two attempts.
const RETRY_WAIT_MAX_MS: u64 = RETRY_WAIT_MIN_MS * 8;

/// Where the request goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// This node owns the shard: its host serves the request.
    Local,
    /// One ask to `owner`. `routed` is the placement the ask is sent by (the owner named in
    /// it), from which the runner watches for the table moving the shard away.
    Remote { owner: String, routed: Option<Placement> },
}

/// How an attempt ended.
#[derive(Debug)]
pub(crate) enum Answer<T> {
    Served(T),
    Failed(CallError),
    /// The table gave the shard to another owner while the ask was in flight: its outcome is
    /// unknown, and the same request goes to the new owner (the record of handled signals
    /// answers a signal once: see `crate::agent::handled`).
    OwnerChanged,
}

impl<T> From<Result<T, CallError>> for Answer<T> {
    fn from(r: Result<T, CallError>) -> Self {
        match r {
            Ok(t) => Answer::Served(t),
            Err(e) => Answer::Failed(e),
        }
    }
}

/// What to do after an answer.
#[derive(Debug)]
pub(crate) enum Next<T> {
    Done(Result<T, CallError>),
    /// Try again now: [`Route::target`] names where.
    Again,
    /// Wait for the table to change, at most `wait_ms`, then try again; fail with `then` if
    /// the request's deadline passes first.
    Wait {
        wait_ms: u64,
        then: CallError,
    },
}

/// One request's route, from its first attempt to its answer.
#[derive(Debug, Clone)]
pub(crate) struct Route<'a> {
    me: &'a str,
    redirects_max: u32,
    redirects: u32,
    /// A newer owner and epoch than the table showed, named by a refusal.
    hint: Option<(String, u64)>,
    /// The epoch the last attempt was sent at.
    epoch: u64,
    wait_ms: u64,
}

impl<'a> Route<'a> {
    pub(crate) fn new(me: &'a str, redirects_max: u32) -> Route<'a> {
        Route { me, redirects_max, redirects: 0, hint: None, epoch: 0, wait_ms: RETRY_WAIT_MIN_MS }
    }

    /// Where to send the request, given this node's placement of the key now. An error is the
    /// attempt's answer: give it to [`Route::on_answer`].
    pub(crate) fn target(&mut self, placement: Result<Placement, CallError>) -> Result<Target, CallError> {
        let (owner, epoch) = match (&placement, self.hint.take()) {
            (Ok(p), Some((o, e))) if e > p.epoch => (Some(o), e),
            (Ok(p), _) => (p.owner.clone(), p.epoch),
            (Err(_), Some((o, e))) => (Some(o), e),
            (Err(_), None) => (None, 0),
        };
        self.epoch = epoch;
        match (owner, placement) {
            (None, Err(e)) => Err(e),
            (None, Ok(p)) => Err(CallError::Unavailable(Unavailable::NoOwner { shard: p.shard })),
            (Some(o), _) if o == self.me => Ok(Target::Local),
            (Some(o), p) => {
                let routed = p.ok().map(|p| Placement { owner: Some(o.clone()), epoch, ..p });
                Ok(Target::Remote { owner: o, routed })
            }
        }
    }

    /// What an attempt's answer means for the request of `key`.
    pub(crate) fn on_answer<T>(&mut self, key: &Key, answer: Answer<T>) -> Next<T> {
        let e = match answer {
            Answer::Served(t) => return Next::Done(Ok(t)),
            Answer::OwnerChanged => {
                if !self.redirect() {
                    return Next::Done(Err(CallError::Unavailable(Unavailable::OwnerChanges {
                        key: format!("{key:?}"),
                    })));
                }
                return Next::Again;
            }
            // A newer owner named by the refusal: go there at once (a bounded number of times).
            Answer::Failed(CallError::NotOwner { owner: Some(o), epoch }) if epoch > self.epoch => {
                if !self.redirect() {
                    return Next::Done(Err(CallError::Unavailable(Unavailable::Redirects { key: format!("{key:?}") })));
                }
                self.hint = Some((o, epoch));
                return Next::Again;
            }
            // No owner serves the shard right now: wait for the table to change.
            Answer::Failed(e @ (CallError::NotOwner { .. } | CallError::Unavailable(_))) => e,
            Answer::Failed(e) => return Next::Done(Err(e)),
        };
        let then = match e {
            CallError::NotOwner { .. } => {
                CallError::Unavailable(Unavailable::NoServingOwner { key: format!("{key:?}") })
            }
            e => e,
        };
        let wait_ms = self.wait_ms;
        self.wait_ms = (self.wait_ms * 2).min(RETRY_WAIT_MAX_MS);
        Next::Wait { wait_ms, then }
    }

    /// Counts a redirect; `false` once there were more than `redirects_max`.
    fn redirect(&mut self) -> bool {
        self.redirects += 1;
        self.redirects <= self.redirects_max
    }

    /// The route's state, one line (for the scripts).
    #[cfg(test)]
    fn describe(&self) -> String {
        let hint = match &self.hint {
            Some((o, e)) => format!("{o}@{e}"),
            None => "none".into(),
        };
        format!(
            "redirects {}/{}, hint {hint}, last sent at epoch {}, next wait {} ms\n",
            self.redirects, self.redirects_max, self.epoch, self.wait_ms
        )
    }
}

#[cfg(test)]
mod tests;
