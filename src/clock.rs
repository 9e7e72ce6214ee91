//! The wall clock in milliseconds since the Unix epoch: entries' stored-at and last-hit times,
//! TTLs, and "recently" checks (origin reachable, shared store down) all use this one reading.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}
