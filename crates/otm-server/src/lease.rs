//! [`HeldLease`]: a coordinator lease renewed in the background while its work runs.

use otm_core::{Coordinator, Lease, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A lease kept alive by a background task (renewed every third of its TTL). `lost()` fires when
/// a renewal fails: the work it guards must stop, because another replica may take over.
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
            tokio::time::sleep(Duration::from_millis(25)).await;
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
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                match c.renew(&l, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(key = %l.key, "lease lost to another owner");
                        lo.cancel();
                        return;
                    }
                    Err(e) => {
                        // Keep trying until the TTL would have run out.
                        tracing::warn!(key = %l.key, error = %e, "lease renewal failed");
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

impl Drop for HeldLease {
    fn drop(&mut self) {
        // Without an explicit release the lease lapses after its TTL.
        self.stop.cancel();
    }
}
