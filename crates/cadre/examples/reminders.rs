//! Reminders: an agent asks to be woken later; the reminder is stored with its state, so it fires
//! even if the agent was passivated (or its node restarted) meanwhile.
//! `cargo run --example reminders`
use std::sync::LazyLock;
use std::time::Duration;

use cadre::prelude::*;
use serde::{Deserialize, Serialize};

/// Lets `main` await the ticks (an application would act on them in the handler).
static TICKS: LazyLock<tokio::sync::broadcast::Sender<u64>> = LazyLock::new(|| tokio::sync::broadcast::channel(16).0);

#[derive(Default, Serialize, Deserialize)]
struct Invoice {
    reminders_sent: u64,
}

impl Agent for Invoice {
    const TYPE: &'static str = "invoice";

    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        match signal.ty.as_str() {
            // Every second (the shortest period), a payment reminder; stopped after three.
            "invoice.issued" => {
                ctx.remind(
                    "dunning",
                    Reminder::every(Duration::from_secs(1)),
                    Signal::new("invoice.overdue", Reply::Null),
                )?;
                Ok("issued".into())
            }
            "invoice.overdue" => {
                self.reminders_sent += 1;
                let tick: u64 = signal.extension("cadretick").and_then(|t| t.parse().ok()).unwrap_or(0);
                if self.reminders_sent == 3 {
                    ctx.cancel_reminder("dunning");
                }
                let _ = TICKS.send(tick);
                Ok(Reply::Null)
            }
            _ => Ok(self.reminders_sent.into()),
        }
    }
}

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ticks = TICKS.subscribe();
    let node = Node::builder("n1").secret("reminders-example-secret").agent::<Invoice>().start().await?;
    let invoice = node.agent::<Invoice>("inv-7");
    invoice.call(Signal::new("invoice.issued", Reply::Null)).await?;
    println!("reminders: {:?}", invoice.reminders().await?.iter().map(|r| &r.name).collect::<Vec<_>>());
    // Passivated: the next tick activates it again.
    invoice.stop().await?;
    for _ in 0..3 {
        let tick = tokio::time::timeout(Duration::from_secs(10), ticks.recv()).await??;
        println!("tick {tick}: overdue reminder sent");
    }
    let sent: u64 = invoice.ask("invoice.count", ()).await?;
    println!("{sent} reminders sent; left: {}", invoice.reminders().await?.len());
    assert_eq!(sent, 3);
    node.shutdown().await;
    Ok(())
}
