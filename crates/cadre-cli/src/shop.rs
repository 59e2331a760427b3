//! The agent types of the demo's order flow, registered by every `cadre node`:
//!
//! - `inventory` (one per SKU): `order.placed` `{"order","sku","qty"}` reserves `qty` of its stock
//!   (it starts at [`STOCK_START`]) and emits `inventory.reserved` with the same data, or emits
//!   `inventory.rejected` when the stock is short; `inventory.get` answers its state.
//! - `payment` (one per order): `inventory.reserved` captures the payment (once: a second copy
//!   changes nothing) and emits `payment.captured` `{"order","sku","qty"}`; `payment.get` answers
//!   its state.
//!
//! With two cluster-wide routes (`order.placed` → `inventory` keyed by `/sku`,
//! `inventory.reserved` → `payment` keyed by `/order`) a placed order flows through both agents,
//! wherever they live, and a subscriber of `payment.captured` hears of it. Emitted signals go out
//! only after the agent's state is stored.

use cadre::agent::{Agent, AgentError, Ctx, Reply, Route};
use cadre::signal::{Data, Signal};
use serde::{Deserialize, Serialize};

/// Units of stock a new SKU starts with.
pub const STOCK_START: i64 = 10;
/// Orders an inventory agent remembers (the oldest forgotten first).
const ORDERS_KEPT_MAX: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order: String,
    sku: String,
    qty: i64,
}

fn order_of(signal: &Signal) -> Result<Order, AgentError> {
    match &signal.data {
        Some(Data::Json(v)) => serde_json::from_value(v.clone())
            .map_err(|e| AgentError::Failed(format!("{} needs {{order, sku, qty}}: {e}", signal.ty))),
        _ => Err(AgentError::Failed(format!("{} needs JSON data", signal.ty))),
    }
}

fn emit(ctx: &mut Ctx, ty: &str, order: &Order) -> Result<(), AgentError> {
    let data = serde_json::to_value(order).map_err(|e| AgentError::Failed(e.to_string()))?;
    ctx.emit(Signal::new(ty, data).with_subject(order.order.clone()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Inventory {
    stock: i64,
    /// Orders reserved, newest last: a copy of one already reserved changes nothing.
    orders: Vec<String>,
}

impl Default for Inventory {
    fn default() -> Self {
        Inventory { stock: STOCK_START, orders: Vec::new() }
    }
}

impl Agent for Inventory {
    const TYPE: &'static str = "inventory";
    const ROUTES: &'static [(&'static str, Route<Self>)] =
        &[("order.placed", Inventory::reserve), ("inventory.get", Inventory::get)];
}

impl Inventory {
    fn reserve(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let order = order_of(&signal)?;
        if self.orders.contains(&order.order) {
            return Ok(self.stock.into());
        }
        if order.qty <= 0 || order.qty > self.stock {
            emit(ctx, "inventory.rejected", &order)?;
            return Ok(self.stock.into());
        }
        self.stock -= order.qty;
        self.orders.push(order.order.clone());
        if self.orders.len() > ORDERS_KEPT_MAX {
            self.orders.remove(0);
        }
        emit(ctx, "inventory.reserved", &order)?;
        Ok(self.stock.into())
    }

    fn get(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        Ok(serde_json::json!({"stock": self.stock, "orders": self.orders}))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Payment {
    /// `"captured"` once paid.
    status: Option<String>,
    qty: i64,
}

impl Agent for Payment {
    const TYPE: &'static str = "payment";
    const ROUTES: &'static [(&'static str, Route<Self>)] =
        &[("inventory.reserved", Payment::capture), ("payment.get", Payment::get)];
}

impl Payment {
    fn capture(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let order = order_of(&signal)?;
        if self.status.is_none() {
            self.status = Some("captured".into());
            self.qty = order.qty;
            emit(ctx, "payment.captured", &order)?;
        }
        Ok(serde_json::json!({"status": self.status}))
    }

    fn get(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        Ok(serde_json::json!({"status": self.status, "qty": self.qty}))
    }
}
