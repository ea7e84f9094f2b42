//! Wall-clock time in Unix milliseconds, read in one place.
//!
//! Message ids and timestamps are derived from it; codecs and the hot tier take `now` as an
//! argument instead of reading the clock themselves, so they stay deterministic under test.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock set before 1970 reads as 0 rather than
/// panicking: ids stay monotonic anyway because the hot tier never goes backwards.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
