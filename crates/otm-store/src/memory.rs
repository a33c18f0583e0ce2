//! [`MemoryCoordinator`]: the in-process [`Coordinator`], for a single `otm server`.
//!
//! Everything lives in one mutex-guarded map set; no call waits on anything but that mutex, held
//! for a few map operations. Time is `tokio::time::Instant`, so tests can drive TTLs with
//! `tokio::time::pause()` and `advance()`; outside a paused runtime it is the monotonic clock.

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use otm_core::instance::Endpoint;
use otm_core::{Coordinator, Lease, Notification, Result, TenantId};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// Notifications a slow subscriber may fall behind by before it skips some.
const NOTIFY_CAPACITY: usize = 1024;
/// Entries in the endpoint cache before a set sweeps out the expired ones.
const SWEEP_AT: usize = 4096;

/// The in-process coordinator. Replicas cannot share it: use it with one `otm server`.
#[derive(Debug)]
pub struct MemoryCoordinator {
    state: Mutex<State>,
    notify: broadcast::Sender<Notification>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<TenantId, (Endpoint, Instant)>,
    /// Held locks; an entry past its expiry is free.
    locks: HashMap<String, Held>,
    /// The last fence handed out per key, kept after release and expiry so fences never repeat.
    fences: HashMap<String, u64>,
    /// Endpoint cache size after the last sweep.
    swept_len: usize,
}

#[derive(Debug)]
struct Held {
    owner: String,
    fence: u64,
    expires: Instant,
}

impl Held {
    fn is_held_by(&self, lease: &Lease, now: Instant) -> bool {
        self.owner == lease.owner && self.fence == lease.fence && self.expires > now
    }
}

impl Default for MemoryCoordinator {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCoordinator {
    /// An empty coordinator.
    pub fn new() -> Self {
        let (notify, _) = broadcast::channel(NOTIFY_CAPACITY);
        MemoryCoordinator {
            state: Mutex::new(State::default()),
            notify,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, but a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `now + ttl`, saturating far in the future instead of overflowing.
fn expiry(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[async_trait]
impl Coordinator for MemoryCoordinator {
    async fn endpoint(&self, tenant: &TenantId) -> Result<Option<Endpoint>> {
        let now = Instant::now();
        let mut state = self.state();
        match state.endpoints.get(tenant) {
            Some((endpoint, expires)) if *expires > now => Ok(Some(endpoint.clone())),
            Some(_) => {
                state.endpoints.remove(tenant);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn set_endpoint(
        &self,
        tenant: &TenantId,
        endpoint: &Endpoint,
        ttl: Duration,
    ) -> Result<()> {
        let now = Instant::now();
        let mut state = self.state();
        state
            .endpoints
            .insert(tenant.clone(), (endpoint.clone(), expiry(now, ttl)));
        // Entries nobody reads again would stay forever; sweep when the cache has doubled.
        if state.endpoints.len() >= SWEEP_AT.max(state.swept_len * 2) {
            state.endpoints.retain(|_, (_, expires)| *expires > now);
            state.swept_len = state.endpoints.len();
        }
        Ok(())
    }

    async fn clear_endpoint(&self, tenant: &TenantId) -> Result<()> {
        self.state().endpoints.remove(tenant);
        Ok(())
    }

    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>> {
        let now = Instant::now();
        let mut state = self.state();
        if state.locks.get(key).is_some_and(|h| h.expires > now) {
            return Ok(None);
        }
        // Never below the wall clock in milliseconds: fences stay larger than any handed out
        // before a restart of this process, which the registry still remembers.
        let fence = (state.fences.get(key).copied().unwrap_or(0) + 1)
            .max(otm_core::time::now_ms().max(0) as u64);
        state.fences.insert(key.to_owned(), fence);
        let owner = otm_core::id::random_hex(16);
        state.locks.insert(
            key.to_owned(),
            Held {
                owner: owner.clone(),
                fence,
                expires: expiry(now, ttl),
            },
        );
        Ok(Some(Lease {
            key: key.to_owned(),
            owner,
            fence,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state();
        match state.locks.get_mut(&lease.key) {
            Some(held) if held.is_held_by(lease, now) => {
                held.expires = expiry(now, ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state();
        match state.locks.get(&lease.key) {
            Some(held) if held.is_held_by(lease, now) => {
                state.locks.remove(&lease.key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn publish(&self, notification: Notification) -> Result<()> {
        // No subscriber is not an error: notifications are best effort.
        let _ = self.notify.send(notification);
        Ok(())
    }

    fn subscribe(&self) -> BoxStream<'static, Notification> {
        BroadcastStream::new(self.notify.subscribe())
            .filter_map(|n| async move {
                match n {
                    Ok(n) => Some(n),
                    // A slow subscriber lost some; sweepers make up for them.
                    Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "a notification subscriber fell behind");
                        None
                    }
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leases_follow_tokio_time() {
        let c = MemoryCoordinator::new();
        let a = c
            .acquire("k", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            c.acquire("k", Duration::from_secs(10))
                .await
                .unwrap()
                .is_none()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let b = c
            .acquire("k", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(b.fence > a.fence);
        assert!(!c.renew(&a, Duration::from_secs(10)).await.unwrap());
    }

    #[tokio::test]
    async fn a_lagging_subscriber_skips_and_goes_on() {
        let c = MemoryCoordinator::new();
        let mut s = c.subscribe();
        for _ in 0..NOTIFY_CAPACITY + 10 {
            c.publish(Notification::SettingsChanged).await.unwrap();
        }
        let t = TenantId::parse("late").unwrap();
        c.publish(Notification::InboxHasWork { tenant: t.clone() })
            .await
            .unwrap();
        let mut last = None;
        while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(50), s.next()).await {
            last = Some(n);
        }
        assert_eq!(last, Some(Notification::InboxHasWork { tenant: t }));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_endpoints_are_swept() {
        let c = MemoryCoordinator::new();
        let e = Endpoint {
            instance: otm_core::InstanceId::new("i-000000000001"),
            address: "unix:/x".into(),
            shim_token: otm_core::Secret::default(),
            signature: Some("0a1b2c".into()),
        };
        for i in 0..SWEEP_AT - 1 {
            let t = TenantId::parse(&format!("t{i}")).unwrap();
            c.set_endpoint(&t, &e, Duration::from_secs(1))
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let t = TenantId::parse("fresh").unwrap();
        c.set_endpoint(&t, &e, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(c.state().endpoints.len(), 1);
        assert_eq!(c.endpoint(&t).await.unwrap(), Some(e));
    }
}
