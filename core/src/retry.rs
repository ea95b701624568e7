//! The one backoff of every retry loop: a delay that doubles from a base
//! up to a cap. Each caller names its own base and cap (a gRPC write
//! retries across a DB flip in tens of milliseconds, the operator requeues
//! a LikeTenant in seconds).

use std::time::Duration;

/// A doubling delay: `base` before the first retry, twice that before the
/// next, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    /// The delay before retry `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(1u32 << attempt.min(20)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let ms: Vec<u128> = (0..9).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(2), "no overflow");
    }
}
