//! [`Backoff`]: the one retry policy. Every loop that tries again after a failure (deliveries,
//! lease renewals, waiting for a lease, failing over between orchestrators, salvaging state,
//! restarting a crashed agent) asks it how long to wait.

use std::time::Duration;

/// Exponential backoff with a cap and optional jitter: the `n`th retry (from 1) waits
/// `initial × 2^(n−1)`, at most `max`, less up to `jitter` of it at random (so replicas that
/// failed together do not retry together).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The wait before the first retry.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
    /// The share of each wait taken off at random, from 0 (none) to 1.
    pub jitter: f64,
}

impl Backoff {
    /// `initial`, doubling up to `max`, without jitter.
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: 0.0,
        }
    }

    /// The same policy with `share` (0 to 1) of each wait taken off at random.
    pub const fn with_jitter(self, share: f64) -> Backoff {
        Backoff {
            jitter: share,
            ..self
        }
    }

    /// A fixed wait: every retry waits `every` (a poll interval).
    pub const fn fixed(every: Duration) -> Backoff {
        Backoff::new(every, every)
    }

    /// The wait before retry `attempt` (1 for the first retry; 0 counts as 1), jitter
    /// included.
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self.ceiling(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || full.is_zero() {
            return full;
        }
        let mut buf = [0u8; 4];
        let unit = match getrandom::fill(&mut buf) {
            Ok(()) => f64::from(u32::from_le_bytes(buf)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        full.mul_f64(1.0 - jitter * unit)
    }

    /// The wait before retry `attempt` without jitter: the most [`Backoff::delay`] can answer.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        self.initial
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_initial_up_to_max() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(7), Duration::from_millis(5000));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_only_shortens_and_stays_within_its_share() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(0.5);
        let waits: Vec<Duration> = (0..200).map(|_| b.delay(3)).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w <= Duration::from_millis(400) && *w >= Duration::from_millis(200)),
            "{waits:?}"
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "the waits are spread");
    }

    #[test]
    fn fixed_waits_the_same_every_time() {
        let b = Backoff::fixed(Duration::from_millis(25));
        assert_eq!(b.delay(1), b.delay(9));
    }
}
