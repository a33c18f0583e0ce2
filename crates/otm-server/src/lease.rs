//! [`HeldLease`]: a coordinator lease renewed in the background while its work runs.
//!
//! Every wait and deadline here is on tokio's clock, so renewal and giving up run under
//! `tokio::time::pause()` in tests.

use otm_core::{Backoff, Coordinator, Lease, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a lease held by another owner is asked for again while waiting for it.
const ACQUIRE_POLL: Backoff = Backoff::fixed(Duration::from_millis(25)).with_jitter(0.5);
use tokio_util::sync::CancellationToken;

/// A lease kept alive by a background task (renewed every third of its TTL). `lost()` fires when
/// another owner has it, or when renewals kept failing until the lease may have lapsed (TTL minus
/// a margin): the work it guards must stop, because another replica may take over. Writes that
/// work makes carry [`HeldLease::fence`], so the registry refuses them once a newer holder wrote.
#[derive(Debug)]
pub struct HeldLease {
    lease: Lease,
    coordinator: Arc<dyn Coordinator>,
    lost: CancellationToken,
    stop: CancellationToken,
}

impl HeldLease {
    /// Tries once to take `key`.
    pub async fn try_acquire(
        coordinator: &Arc<dyn Coordinator>,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<HeldLease>> {
        let Some(lease) = coordinator.acquire(key, ttl).await? else {
            return Ok(None);
        };
        Ok(Some(Self::keep(coordinator.clone(), lease, ttl)))
    }

    /// Takes `key`, waiting while another owner holds it, for at most `wait`.
    pub async fn acquire(
        coordinator: &Arc<dyn Coordinator>,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<HeldLease> {
        let deadline = Instant::now() + wait;
        let mut tries = 0;
        loop {
            if let Some(l) = Self::try_acquire(coordinator, key, ttl).await? {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(otm_core::Error::unavailable(
                    "coordinator",
                    format!("lock {key} stayed taken"),
                ));
            }
            tries += 1;
            tokio::time::sleep(ACQUIRE_POLL.delay(tries)).await;
        }
    }

    fn keep(coordinator: Arc<dyn Coordinator>, lease: Lease, ttl: Duration) -> HeldLease {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let (c, l, lo, st) = (
            coordinator.clone(),
            lease.clone(),
            lost.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            // Renewed every third of the TTL; after a failed renewal, retried after about a tenth
            // ([`renewal_retry`]). The lease is given up once it may have lapsed by now: a
            // renewal error past TTL minus a margin means another replica may hold it, so the
            // guarded work must stop.
            let give_up_after = ttl.saturating_sub(renewal_margin(ttl));
            let retry = renewal_retry(ttl);
            let mut renewed = Instant::now();
            let mut failures = 0;
            let mut wait = ttl / 3;
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // One renewal may take at most what is left before giving up.
                let left = give_up_after.saturating_sub(renewed.elapsed());
                let outcome = match tokio::time::timeout(left, c.renew(&l, ttl)).await {
                    Ok(r) => r,
                    Err(_) => Err(otm_core::Error::unavailable(
                        "coordinator",
                        "lease renewal timed out",
                    )),
                };
                match outcome {
                    Ok(true) => {
                        renewed = Instant::now();
                        failures = 0;
                        wait = ttl / 3;
                    }
                    Ok(false) => {
                        tracing::warn!(key = %l.key, "lease lost to another owner");
                        lo.cancel();
                        return;
                    }
                    Err(e) if renewed.elapsed() >= give_up_after => {
                        tracing::warn!(key = %l.key, error = %e, "lease renewal kept failing; giving the lease up");
                        lo.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(key = %l.key, error = %e, "lease renewal failed; retrying");
                        failures += 1;
                        wait = retry.delay(failures);
                    }
                }
            }
        });
        HeldLease {
            lease,
            coordinator,
            lost,
            stop,
        }
    }

    /// The fencing number of this acquisition.
    pub fn fence(&self) -> u64 {
        self.lease.fence
    }

    /// Fires when the lease could not be renewed.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Stops renewing and releases the lease.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.coordinator.release(&self.lease).await;
    }
}

/// TTL of the wake lock and dispatcher leases (renewed while held): `--lease-ttl-s`.
pub fn ttl(settings: &crate::config::Settings) -> Duration {
    Duration::from_secs(settings.lease_ttl_s)
}

/// Pauses between failed renewals: about a tenth of the TTL (at least 50 ms), jittered so that
/// replicas that lost the coordinator together do not come back together.
fn renewal_retry(ttl: Duration) -> Backoff {
    Backoff::fixed((ttl / 10).max(Duration::from_millis(50))).with_jitter(0.25)
}

/// How long before its TTL a lease that could not be renewed is given up: a quarter of the TTL,
/// at least 200 ms and at most 5 s (clock drift between replicas and the coordinator).
fn renewal_margin(ttl: Duration) -> Duration {
    (ttl / 4)
        .clamp(Duration::from_millis(200), Duration::from_secs(5))
        .min(ttl / 2)
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        // Without an explicit release the lease lapses after its TTL.
        self.stop.cancel();
    }
}
