//! Agents that call agents: an order agent reserves stock by calling the SKU's stock agent and
//! awaiting its reply, wherever it lives. `cargo run --example agents_calling_agents`
use cadre::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Serialize, Deserialize)]
struct Stock {
    left: Option<i64>,
}

impl Agent for Stock {
    const TYPE: &'static str = "stock";
    const ROUTES: &'static [(&'static str, cadre::Route<Self>)] = &[("stock.take", Stock::take)];
}

impl Stock {
    fn take(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let want = match &signal.data {
            Some(cadre::signal::Data::Json(v)) => v.as_i64().unwrap_or(0),
            _ => 0,
        };
        let left = self.left.get_or_insert(10);
        if *left < want {
            return Err(AgentError::Failed(format!("only {left} left")));
        }
        *left -= want;
        Ok((*left).into())
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Order {
    status: String,
}

impl Agent for Order {
    const TYPE: &'static str = "order";

    // A handler that awaits overrides `handle`.
    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let Some(cadre::signal::Data::Json(d)) = &signal.data else { return Err(AgentError::Failed("data".into())) };
        let sku = d["sku"].as_str().unwrap_or_default().to_string();
        // `ctx.signal` makes an id that follows from the signal handled: a retried order reaches
        // the stock agent as a duplicate, not as a second reservation.
        let take = ctx.signal("stock.take", d["qty"].clone());
        self.status = match ctx.call(&Key::new("stock", sku), take).await {
            Ok(left) => format!("reserved ({left} left)"),
            Err(e) => format!("refused: {e}"),
        };
        Ok(self.status.clone().into())
    }
}

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node =
        Node::builder("n1").secret("agents-calling-example-secret").agent::<Stock>().agent::<Order>().start().await?;
    for (order, qty) in [("o1", 4), ("o2", 5), ("o3", 3)] {
        let status: String =
            node.agent::<Order>(order).ask("order.place", serde_json::json!({"sku": "tea", "qty": qty})).await?;
        println!("{order} ({qty} x tea): {status}");
    }
    let stock: Stock = node.agent::<Stock>("tea").state().await?;
    println!("tea left: {:?}", stock.left);
    assert_eq!(stock.left, Some(1));
    node.shutdown().await;
    Ok(())
}
