//! Finding agents: which are active where, and which have a stored state.
//!
//! [`Cluster::list`] asks every live member for its active agents of a type after a cursor (an
//! id), each answering at most `limit`, smallest ids first, and merges the answers: an id among
//! the cluster's first `limit` after the cursor is among its own node's first `limit`, so a page
//! is exact for the members that answered. The next page starts after the last id of this one.
//!
//! [`Cluster::stored`] lists ids with a stored state: a shared store (Postgres) is scanned on
//! this node; the embedded store on every member (each holds the shards it owns or replicates),
//! merged and deduplicated.
//!
//! Caveats: a member that did not answer (down, or slower than the timeout) is named in
//! `unreachable`, and its agents are missing from the page. An agent whose shard is being handed
//! over may show on both nodes for a moment. Pages are not a snapshot: an agent activated or
//! stopped between two pages may be missed or seen.

use std::net::SocketAddr;
use std::time::Duration;

use super::protocol::{AgentOp, AgentReply, AgentReq};
use super::{Cluster, Inner};
use crate::agent::{AgentInfo, CallError, LIST_PAGE_MAX};

/// Agents a page holds unless asked otherwise.
pub const LIST_LIMIT_DEFAULT: usize = 100;

/// An active agent and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListedAgent {
    pub node: String,
    #[serde(flatten)]
    pub info: AgentInfo,
}

/// One page of [`Cluster::list`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentPage {
    pub agents: Vec<ListedAgent>,
    /// The cursor of the next page (`None`: this was the last).
    pub next: Option<String>,
    /// Members that did not answer: their agents are not in the page.
    pub unreachable: Vec<String>,
}

/// One page of [`Cluster::stored`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredPage {
    pub ids: Vec<String>,
    pub next: Option<String>,
    pub unreachable: Vec<String>,
}

impl Cluster {
    /// Active agents of type `ty` across the cluster, by id, after `after`; at most `limit`
    /// (≤ [`LIST_PAGE_MAX`]).
    pub async fn list(
        &self,
        ty: &str,
        after: Option<&str>,
        limit: usize,
        timeout: Duration,
    ) -> Result<AgentPage, CallError> {
        let limit = check(self, ty, limit)?;
        let answers = self.ask_members(ty, after, limit, false, timeout).await;
        let (mut agents, mut unreachable) = (Vec::new(), Vec::new());
        for (node, answer) in answers {
            match answer {
                Some(AgentReply::Active(infos)) => {
                    agents.extend(infos.into_iter().map(|info| ListedAgent { node: node.clone(), info }))
                }
                _ => unreachable.push(node),
            }
        }
        agents.sort_by(|a, b| (&a.info.id, &a.node).cmp(&(&b.info.id, &b.node)));
        agents.truncate(limit);
        let next = (agents.len() == limit).then(|| agents.last().map(|a| a.info.id.clone())).flatten();
        Ok(AgentPage { agents, next, unreachable })
    }

    /// Ids of type `ty` with a stored state, in order, after `after`; at most `limit`.
    pub async fn stored(
        &self,
        ty: &str,
        after: Option<&str>,
        limit: usize,
        timeout: Duration,
    ) -> Result<StoredPage, CallError> {
        let limit = check(self, ty, limit)?;
        let answers = if self.inner.host.storage_shared() {
            let ids = self.inner.host.stored(ty, after, limit).await?;
            vec![(self.inner.name.clone(), Some(AgentReply::Stored(ids)))]
        } else {
            self.ask_members(ty, after, limit, true, timeout).await
        };
        let (mut ids, mut unreachable) = (std::collections::BTreeSet::new(), Vec::new());
        for (node, answer) in answers {
            match answer {
                Some(AgentReply::Stored(found)) => ids.extend(found),
                _ => unreachable.push(node),
            }
        }
        let ids: Vec<String> = ids.into_iter().take(limit).collect();
        let next = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
        Ok(StoredPage { ids, next, unreachable })
    }

    /// Asks every member of the table (this node locally; others if membership sees them alive)
    /// for its page; `None` for those that did not answer.
    async fn ask_members(
        &self,
        ty: &str,
        after: Option<&str>,
        limit: usize,
        stored: bool,
        timeout: Duration,
    ) -> Vec<(String, Option<AgentReply>)> {
        let st = self.state();
        let view = self.inner.membership.view();
        let op = AgentOp::List { after: after.map(str::to_string), limit: limit as u32, stored };
        let req = AgentReq { op, ty: ty.to_string(), id: String::new(), epoch: 0 };
        let asks = st.members.iter().map(|(name, m)| {
            let me = self.clone();
            let req = req.clone();
            let name = name.clone();
            let alive = name == self.inner.name || view.state_of(&name).is_some_and(|s| s.is_active());
            let addr = m.addr.parse::<SocketAddr>().ok().filter(|_| alive);
            async move {
                if name == me.inner.name {
                    let AgentOp::List { after, limit, stored } = req.op else { unreachable!("a list request") };
                    return (name, Some(serve(&me.inner, &req.ty, after, limit, stored).await));
                }
                let Some(addr) = addr else { return (name, None) };
                match me.ask(addr, &req, timeout).await {
                    Ok(reply @ (AgentReply::Active(_) | AgentReply::Stored(_))) => (name, Some(reply)),
                    _ => (name, None),
                }
            }
        });
        futures::future::join_all(asks).await
    }
}

fn check(cluster: &Cluster, ty: &str, limit: usize) -> Result<usize, CallError> {
    if !cluster.inner.host.has_type(ty) {
        return Err(CallError::UnknownType(ty.to_string()));
    }
    if limit == 0 || limit > LIST_PAGE_MAX {
        return Err(CallError::InvalidKey(format!("a page holds 1 to {LIST_PAGE_MAX} agents, not {limit}")));
    }
    Ok(limit)
}

/// This node's answer to a list request.
pub(super) async fn serve(inner: &Inner, ty: &str, after: Option<String>, limit: u32, stored: bool) -> AgentReply {
    let limit = (limit as usize).min(LIST_PAGE_MAX);
    if stored {
        return match inner.host.stored(ty, after.as_deref(), limit).await {
            Ok(ids) => AgentReply::Stored(ids),
            Err(e) => AgentReply::Err(e),
        };
    }
    if !inner.host.has_type(ty) {
        return AgentReply::Err(CallError::UnknownType(ty.to_string()));
    }
    AgentReply::Active(inner.host.list(ty, after.as_deref(), limit))
}
