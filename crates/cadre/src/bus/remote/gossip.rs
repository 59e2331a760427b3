//! The interest map's exchange: each node pushes its own entry when its patterns change and to
//! members that become alive, pulls what is newer from a random alive member every
//! `interest_sync_interval_ms`, and forgets members gone for good together with their buffers.

use super::*;

/// Pushes and pulls interest entries; forgets members gone for good with their buffers.
pub(super) async fn gossip_loop(remote: Arc<Remote>, mut rng: rand::rngs::StdRng) {
    let mut events = remote.membership.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(remote.cfg.interest_sync_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = remote.cancel.cancelled() => return,
            _ = remote.own_changed.notified() => push_own(&remote, None).await,
            ev = events.recv() => match ev {
                Ok(ev) if ev.to == MemberState::Alive && ev.from != Some(MemberState::Alive) => {
                    push_own(&remote, Some(&ev.meta.name)).await;
                    pull(&remote, &ev.meta.name).await;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let alive = remote.membership.view().names(MemberState::Alive);
                let others: Vec<&String> = alive.iter().filter(|n| **n != remote.me).collect();
                let pick = others.choose(&mut rng).map(|n| n.to_string());
                if let Some(node) = pick {
                    pull(&remote, &node).await;
                }
                expire(&remote, &mut down_since);
            }
        }
    }
}

/// Sends the own entry to `to`, or to every alive member.
async fn push_own(remote: &Remote, to: Option<&str>) {
    let Some(entry) = remote.interest.read().unwrap_or_else(|e| e.into_inner()).entry(&remote.me) else { return };
    let payload = encode(&Req::Interest(entry));
    let names = match to {
        Some(n) => vec![n.to_string()],
        None => remote.membership.view().names(MemberState::Alive),
    };
    let asks = names.iter().filter(|n| **n != remote.me).map(|n| remote.ask(n, payload.clone()));
    join_all(asks).await;
}

/// Asks `node` for the entries newer than ours.
async fn pull(remote: &Remote, node: &str) {
    let payload = encode(&Req::Pull(remote.interest_digest()));
    if let Some(Reply::Entries(entries)) = remote.ask(node, payload).await {
        remote.merge(entries);
    }
}

/// Forgets members that left or have been down longer than `down_keep_ms`: their entries, and
/// their buffers (what was buffered is dropped and counted).
fn expire(remote: &Remote, down_since: &mut HashMap<String, Instant>) {
    let now = Instant::now();
    let view = remote.membership.view();
    let keep = Duration::from_millis(remote.cfg.down_keep_ms);
    let mut known: Vec<String> =
        remote.interest.read().unwrap_or_else(|e| e.into_inner()).nodes().map(String::from).collect();
    known.extend(remote.peers.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned());
    known.sort();
    known.dedup();
    for node in known.into_iter().filter(|n| *n != remote.me) {
        let state = view.state_of(&node);
        let gone = match state {
            Some(s) if s.is_active() => {
                down_since.remove(&node);
                false
            }
            Some(MemberState::Left) => true,
            _ => now.duration_since(*down_since.entry(node.clone()).or_insert(now)) >= keep,
        };
        if !gone {
            continue;
        }
        down_since.remove(&node);
        if remote.interest.write().unwrap_or_else(|e| e.into_inner()).forget(&node) {
            remote.changed();
        }
        let out = remote.peers.lock().unwrap_or_else(|e| e.into_inner()).remove(&node);
        if let Some(out) = out {
            out.cancel.cancel();
            let lost = out.lock().items.len();
            if lost > 0 {
                warn!(%node, lost, "member gone: signals buffered for it dropped");
                remote.metrics.dropped.get_or_create(&label("reason", "node_gone")).inc_by(lost as u64);
                remote.metrics.buffered.dec_by(lost as i64);
            }
        }
    }
}
