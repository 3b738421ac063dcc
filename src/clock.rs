//! One wall clock and one retry schedule for the whole crate (issue 11, item 4: these were written
//! four and three times, and copies drift).
//!
//! - [`now_ms`]: Unix milliseconds, the unit of every stored time (queue rows, index ages, cursors).
//! - [`exponential`] and [`jittered`]: the retry schedule of the follower, the Zendesk client and
//!   the sync worker: `base · 2^exponent`, capped; callers that retry in bursts (many jobs, many
//!   requests) add ±50 % jitter so a burst of failures does not come back as one burst.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970, `i64::MAX` past year 292 M.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `base · 2^exponent`, never above `cap` (the exponent is clamped so the product cannot overflow).
pub(crate) fn exponential(base: Duration, exponent: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << exponent.min(20)).min(cap)
}

/// `d` times a random factor in `[0.5, 1.5)`.
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_then_caps() {
        let s = Duration::from_secs(1);
        let cap = Duration::from_secs(10);
        let got: Vec<u64> = (0..6).map(|n| exponential(s, n, cap).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10]);
        assert_eq!(exponential(s, u32::MAX, cap), cap);
    }

    #[test]
    fn jitter_stays_within_half_either_way() {
        let d = Duration::from_millis(1000);
        for _ in 0..1000 {
            let j = jittered(d);
            assert!(j >= Duration::from_millis(500) && j < Duration::from_millis(1500));
        }
    }

    #[test]
    fn now_is_after_2026() {
        assert!(now_ms() > 1_767_225_600_000);
    }
}
