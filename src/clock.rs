//! Wall-clock time in Unix milliseconds, the unit of every timestamp in kvs.
//!
//! Only the I/O edges read the clock; the cluster rules take `now` as an argument so
//! their tests can set it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
