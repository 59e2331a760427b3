//! The agent types of the demo's order flow, registered by every `cadre node`:
//!
//! - `inventory` (one per SKU): `order.placed` `{"order","sku","qty"}` reserves `qty` of its stock
//!   (it starts at [`STOCK_START`]) and emits `inventory.reserved` with the same data, or emits
//!   `inventory.rejected` when the stock is short; `inventory.get` answers its state.
//!   `inventory.release` `{"order","sku","qty"}` puts a reserved order's units back (once).
//! - `payment` (one per order): `inventory.reserved` captures the payment (once: a second copy
//!   changes nothing) and emits `payment.captured` `{"order","sku","qty"}`; `payment.refund`
//!   calls the SKU's `inventory` agent (an agent-to-agent call, wherever it lives) to release the
//!   units, then marks the payment refunded and emits `payment.refunded` (a second refund changes
//!   nothing); `payment.get` answers its state.
//!
//! With two cluster-wide routes (`order.placed` → `inventory` keyed by `/sku`,
//! `inventory.reserved` → `payment` keyed by `/order`) a placed order flows through both agents,
//! wherever they live, and a subscriber of `payment.captured` hears of it. Emitted signals go out
//! only after the agent's state is stored.

use cadre::signal::{Data, Signal};
use cadre::storage::Key;
use cadre::{Agent, AgentError, Ctx, Reply, Route};
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
    const ROUTES: &'static [(&'static str, Route<Self>)] = &[
        ("order.placed", Inventory::reserve),
        ("inventory.release", Inventory::release),
        ("inventory.get", Inventory::get),
    ];
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

    /// Puts a reserved order's units back; an order not reserved here (or released already)
    /// changes nothing.
    fn release(&mut self, _ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let order = order_of(&signal)?;
        if let Some(at) = self.orders.iter().position(|o| *o == order.order) {
            self.orders.remove(at);
            self.stock += order.qty;
        }
        Ok(self.stock.into())
    }

    fn get(&mut self, _ctx: &mut Ctx, _signal: Signal) -> Result<Reply, AgentError> {
        Ok(serde_json::json!({"stock": self.stock, "orders": self.orders}))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Payment {
    /// `"captured"` once paid, `"refunded"` once refunded.
    status: Option<String>,
    qty: i64,
    /// The SKU the order reserved (to release it on a refund).
    #[serde(default)]
    sku: String,
}

impl Agent for Payment {
    const TYPE: &'static str = "payment";

    // Not `ROUTES`: a refund awaits the inventory agent's reply.
    async fn handle(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        match signal.ty.as_str() {
            "inventory.reserved" => self.capture(ctx, signal),
            "payment.refund" => self.refund(ctx).await,
            "payment.get" => Ok(serde_json::json!({"status": self.status, "qty": self.qty, "sku": self.sku})),
            other => Err(AgentError::Failed(format!("a payment does not handle {other:?}"))),
        }
    }
}

impl Payment {
    fn capture(&mut self, ctx: &mut Ctx, signal: Signal) -> Result<Reply, AgentError> {
        let order = order_of(&signal)?;
        if self.status.is_none() {
            self.status = Some("captured".into());
            self.qty = order.qty;
            self.sku = order.sku.clone();
            emit(ctx, "payment.captured", &order)?;
        }
        Ok(serde_json::json!({"status": self.status}))
    }

    /// Releases the order's units at its inventory agent, then marks the payment refunded. The
    /// release goes out as a [`Ctx::signal`]: a refund retried after a failure reaches the
    /// inventory as a duplicate, so the units go back once.
    async fn refund(&mut self, ctx: &mut Ctx) -> Result<Reply, AgentError> {
        if self.status.as_deref() != Some("captured") {
            return Ok(serde_json::json!({"status": self.status}));
        }
        let order = Order { order: ctx.key().id.clone(), sku: self.sku.clone(), qty: self.qty };
        let data = serde_json::to_value(&order).map_err(|e| AgentError::Failed(e.to_string()))?;
        let release = ctx.signal("inventory.release", data);
        let stock = ctx
            .call(&Key::new(Inventory::TYPE, self.sku.clone()), release)
            .await
            .map_err(|e| AgentError::Failed(format!("the inventory of {} did not release the order: {e}", self.sku)))?;
        self.status = Some("refunded".into());
        emit(ctx, "payment.refunded", &order)?;
        Ok(serde_json::json!({"status": self.status, "stock": stock}))
    }
}
