//! Record versions: snowflake-style `milliseconds << 12 | sequence`.
//!
//! A version orders the writes to one record. The Redis transition script
//! derives it from the server clock (see [`crate::cache`]); the DB fallback
//! uses [`VersionClock`]. Both take `max(clock, previous + 1)`, so a record's
//! versions only grow even when clocks step back.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds of the Unix time at which versions start (2024-01-01 UTC);
/// keeps `ms << 12` well inside the 2^53 that Lua's doubles hold exactly.
pub const EPOCH_MS: i64 = 1_704_067_200_000;

/// Bits of the per-millisecond sequence.
pub const SEQ_BITS: u32 = 12;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The Unix millisecond at which `version` was minted.
pub fn version_ms(version: i64) -> i64 {
    (version >> SEQ_BITS) + EPOCH_MS
}

/// A process-wide monotonic version source for writes that bypass Redis.
#[derive(Debug, Default)]
pub struct VersionClock {
    last: AtomicI64,
}

impl VersionClock {
    /// A version newer than `previous` and than every version this clock gave.
    pub fn next_after(&self, previous: i64) -> i64 {
        let clock = (now_ms() - EPOCH_MS) << SEQ_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let v = clock.max(last + 1).max(previous + 1);
            match self.last.compare_exchange_weak(last, v, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return v,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_past_previous_and_map_back_to_time() {
        let clock = VersionClock::default();
        let a = clock.next_after(0);
        let b = clock.next_after(0);
        assert!(b > a);
        let far = a + (1 << 30);
        assert_eq!(clock.next_after(far), far + 1);
        let ms = version_ms(a);
        assert!((now_ms() - ms).abs() < 5_000, "version {a} maps to {ms}");
    }
}
