//! When to renew, and how long to wait after a failure.
//!
//! - With renewal information from the CA (ARI, RFC 9773): a uniformly random moment in the
//!   suggested window (at once when the window has started), re-asked when the CA's
//!   `Retry-After` says so.
//! - Without it: two thirds into the certificate's lifetime (day 60 of a 90-day
//!   certificate, like certbot and Caddy).
//! - After a failure: exponential backoff per certificate from 1 minute, doubled each time,
//!   with ±25 % jitter so instances and names spread out, capped at 24 hours, and never
//!   sooner than the CA's `Retry-After`.

use std::time::{Duration, SystemTime};

/// The first wait after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(60);
/// The longest wait after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(24 * 3600);
/// A CA's `Retry-After` is honoured up to this.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Two thirds into the lifetime `not_before..not_after`.
pub fn two_thirds(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life * 2 / 3
}

/// A uniformly random moment in the ARI window `start..end` (`start` for an empty window).
pub fn in_window(start: SystemTime, end: SystemTime) -> SystemTime {
    let width = end.duration_since(start).unwrap_or(Duration::ZERO);
    start + width.mul_f64(fastrand::f64())
}

/// How long to wait after `failures` failed attempts in a row (at least 1).
pub fn backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = BACKOFF_MIN.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let jittered = base.mul_f64(0.75 + 0.5 * fastrand::f64()).min(BACKOFF_MAX);
    match retry_after {
        Some(ra) => jittered.max(ra.min(RETRY_AFTER_MAX)),
        None => jittered,
    }
}

/// How long until `at` (zero when it has passed).
pub fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn without_ari_renewal_is_at_two_thirds_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + 1000 * DAY;
        assert_eq!(two_thirds(nb, nb + 90 * DAY), nb + 60 * DAY);
        assert_eq!(two_thirds(nb, nb + 6 * DAY), nb + 4 * DAY);
        // A certificate that ends before it starts is due at once.
        assert_eq!(two_thirds(nb, nb - DAY), nb);
    }

    #[test]
    fn the_ari_moment_is_inside_the_window() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let end = start + 2 * DAY;
        for _ in 0..1000 {
            let t = in_window(start, end);
            assert!(t >= start && t <= end);
        }
        assert_eq!(in_window(end, start), end);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_a_cap_and_honours_retry_after() {
        for _ in 0..200 {
            let first = backoff(1, None);
            assert!(
                first >= BACKOFF_MIN * 3 / 4 && first <= BACKOFF_MIN * 5 / 4,
                "{first:?}"
            );
            let third = backoff(3, None);
            assert!(
                third >= BACKOFF_MIN * 3 && third <= BACKOFF_MIN * 5,
                "{third:?}"
            );
            assert!(backoff(40, None) <= BACKOFF_MAX);
            assert!(backoff(40, None) >= BACKOFF_MAX * 3 / 4);
        }
        let ra = Duration::from_secs(3 * 3600);
        assert!(backoff(1, Some(ra)) >= ra);
        assert!(backoff(1, Some(Duration::from_secs(1))) >= BACKOFF_MIN * 3 / 4);
        assert!(backoff(1, Some(365 * DAY)) <= 7 * DAY);
        // Failure 0 (should not happen) is treated as the first.
        assert!(backoff(0, None) <= BACKOFF_MIN * 5 / 4);
    }
}
