//! Wall-clock time, simulated inside turmoil so simulations replay exactly.
//!
//! Monotonic time everywhere else is `tokio::time::Instant`, which turmoil also controls.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    if turmoil::in_simulation() {
        if let Some(d) = turmoil::since_epoch() {
            return d.as_millis() as u64;
        }
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
