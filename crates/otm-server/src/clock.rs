//! [`Clock`]: wall time as the server sees it.
//!
//! Waits, intervals, timeouts and elapsed times are tokio's (`tokio::time`), so they follow
//! `tokio::time::pause()` and `advance()`. Wall time (the timestamps written to the registry,
//! and the idle and age decisions made against them) comes from the [`Clock`] in the
//! context: the system's clock in a server, tokio's in tests, where it stands still until the
//! test advances it.

use tokio::time::Instant;

/// Where wall time comes from.
#[derive(Clone, Debug)]
pub struct Clock {
    /// `None`: the system clock. `Some`: the wall time at an instant of tokio's clock; later
    /// readings add what tokio's clock moved since.
    origin: Option<(i64, Instant)>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock { origin: None }
    }

    /// Wall time that starts at the system's time now and then moves with tokio's clock only:
    /// under `tokio::time::pause()` it moves when the test advances time (or the runtime does,
    /// when it has nothing else to do).
    pub fn tokio() -> Clock {
        Clock {
            origin: Some((otm_core::time::now_ms(), Instant::now())),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self.origin {
            None => otm_core::time::now_ms(),
            Some((ms, at)) => {
                let moved = Instant::now().saturating_duration_since(at);
                ms.saturating_add(i64::try_from(moved.as_millis()).unwrap_or(i64::MAX))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_with_tokio_time() {
        let clock = Clock::tokio();
        let start = clock.now_ms();
        assert_eq!(clock.now_ms(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms(), start + 90_000);
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let before = otm_core::time::now_ms();
        let now = Clock::system().now_ms();
        assert!(now >= before && now <= otm_core::time::now_ms());
    }
}
