//! Wall-clock time, as reminders and signal times use it (simulated inside turmoil with
//! the `testing` feature, so simulations replay exactly).
//!
//! Monotonic time everywhere else is `tokio::time::Instant`, which turmoil also controls.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch.
pub fn wall_since_epoch() -> Duration {
    // Without `testing` there is no simulation (no `sim`, no `TurmoilNet`).
    #[cfg(feature = "testing")]
    if turmoil::in_simulation() {
        if let Some(d) = turmoil::since_epoch() {
            return d;
        }
    }
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    wall_since_epoch().as_millis() as u64
}
