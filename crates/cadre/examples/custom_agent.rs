//! A custom agent type in an application: a shopping cart on one embedded node, called through a
//! typed handle. `cargo run --example custom_agent`
use cadre::prelude::*;
use serde::{Deserialize, Serialize};

/// The agent's state is the value: stored as JSON after every call that changes it.
#[derive(Default, Serialize, Deserialize)]
struct Cart {
    items: Vec<(String, u32)>,
}

#[derive(Deserialize)]
struct Add {
    sku: String,
    qty: u32,
}

fn data<T: serde::de::DeserializeOwned>(signal: &Signal) -> Result<T, AgentError> {
    match &signal.data {
        Some(cadre::signal::Data::Json(v)) => {
            serde_json::from_value(v.clone()).map_err(|e| AgentError::Failed(e.to_string()))
        }
        _ => Err(AgentError::Failed("JSON data expected".into())),
    }
}

impl Agent for Cart {
    const TYPE: &'static str = "cart";
    // Handlers that need not await: signal type -> function.
    const ROUTES: &'static [(&'static str, cadre::Route<Self>)] =
        &[("cart.add", Cart::add), ("cart.count", Cart::count)];
}

impl Cart {
    fn add(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let add: Add = data(&signal)?;
        if add.qty == 0 {
            return Err(AgentError::Failed("a quantity of 0".into()));
        }
        self.items.push((add.sku, add.qty));
        Ok(self.items.len().into())
    }

    fn count(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        Ok(self.items.iter().map(|(_, q)| q).sum::<u32>().into())
    }
}

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = Node::builder("shop-1").secret("custom-agent-example-secret").agent::<Cart>().start().await?;
    let cart = node.agent::<Cart>("alice");
    let lines: usize = cart.ask("cart.add", serde_json::json!({"sku": "tea", "qty": 2})).await?;
    println!("alice's cart has {lines} line(s)");
    cart.ask::<usize>("cart.add", serde_json::json!({"sku": "cups", "qty": 4})).await?;
    let units: u32 = cart.ask("cart.count", ()).await?;
    println!("{units} units in alice's cart");
    // A handler's refusal is a typed error; the state is rolled back.
    let refused = cart.ask::<usize>("cart.add", serde_json::json!({"sku": "x", "qty": 0})).await;
    println!("adding 0 units: {}", refused.unwrap_err());
    let state: Cart = cart.state().await?;
    println!("stored state: {:?}", state.items);
    assert_eq!(units, 6);
    node.shutdown().await;
    Ok(())
}
