//! What an agent type is: the [`Agent`] trait (its state is the value, its handlers turn signals
//! into replies), the table of handlers the default [`Agent::handle`] dispatches on ([`Route`],
//! [`dispatch`]), when the state is stored ([`Persistence`]), and what a handler answers
//! ([`Reply`]).
//!
//! These are the names an agent type is written against; nothing here runs an agent (see the
//! host and the activation loop for that).

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{AgentError, Ctx};
use crate::signal::Signal;

/// What a handler answers.
pub type Reply = serde_json::Value;

/// An agent type. The value is the state.
pub trait Agent: Serialize + DeserializeOwned + Default + Send + 'static {
    /// The type name, as in keys and signals (`counter`).
    const TYPE: &'static str;
    /// When the state is stored.
    const PERSISTENCE: Persistence = Persistence::WriteThrough;

    /// Signal type → handler, for types whose handlers need not await. The default
    /// [`Agent::handle`] dispatches on it (exact type; another type fails the call with
    /// [`AgentError::Failed`]). A type that awaits in its handlers overrides `handle` instead.
    const ROUTES: &'static [(&'static str, Route<Self>)] = &[];

    /// Handles one signal; the reply goes to the caller. An `Err` fails the call and rolls the
    /// state back ([`AgentError`]). By default, dispatches on [`Agent::ROUTES`].
    fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> impl Future<Output = Result<Reply, AgentError>> + Send {
        let result = dispatch(Self::ROUTES, self, ctx, signal);
        std::future::ready(result)
    }

    /// Runs after the state is loaded (or defaulted), before the first signal, and again after
    /// every rollback or restart. Nothing by default.
    fn on_activate(&mut self, _ctx: &mut Ctx) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs before the activation stores its state and stops (idle, evicted, shard moved,
    /// shutdown). Nothing by default.
    fn on_passivate(&mut self, _ctx: &mut Ctx) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A handler of one signal type (see [`Agent::ROUTES`]).
pub type Route<A> = fn(&mut A, &mut Ctx, Signal) -> Result<Reply, AgentError>;

/// Runs the handler `routes` gives for the signal's type.
pub fn dispatch<A: Agent>(
    routes: &[(&'static str, Route<A>)],
    agent: &mut A,
    ctx: &mut Ctx,
    signal: Signal,
) -> Result<Reply, AgentError> {
    match routes.iter().find(|(ty, _)| *ty == signal.ty) {
        Some((_, handler)) => handler(agent, ctx, signal),
        None => Err(AgentError::Failed(format!("a {} does not handle {:?}", A::TYPE, signal.ty))),
    }
}

/// When an agent's state is stored ([`Agent::PERSISTENCE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Store after every handled signal that changed the state, before replying.
    WriteThrough,
    /// Store on passivation only (a crash loses what changed since activation).
    OnPassivate,
}
