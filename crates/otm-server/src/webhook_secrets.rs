//! Tenants' webhook secrets, kept in memory so that accepting an update reads nothing but the
//! inbox: no registry read, no decryption of the sealed secrets, per webhook.
//!
//! A tenant's webhook secret is set when the tenant is created and never changes after; only a
//! delete (and a tenant created again under the same id) makes an entry wrong. The admin API
//! forgets the entry in its own process and publishes
//! [`otm_core::Notification::TenantChanged`], on which every other replica forgets it too
//! ([`crate::dispatch::run_notifications`]). Notifications are best effort, so entries also
//! expire after [`TTL`]: a replica that missed one accepts the old secret for at most that long
//! (and an update for a deleted tenant is refused by the inbox anyway). Unknown tenants are not
//! kept: a miss always asks the registry.

use otm_core::{Secret, TenantId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an entry is trusted without a notification.
pub const TTL: Duration = Duration::from_secs(10);

/// Entries kept at most; past this, expired ones are dropped, then all of them.
const MAX_ENTRIES: usize = 200_000;

#[derive(Debug, Default)]
pub struct WebhookSecrets {
    entries: Mutex<HashMap<TenantId, (Secret, Instant)>>,
}

impl WebhookSecrets {
    /// Whether `presented` is the tenant's secret; `None` when it is not known here (or no
    /// longer trusted): ask the registry, then [`WebhookSecrets::put`].
    pub fn check(&self, tenant: &TenantId, presented: &str, now: Instant) -> Option<bool> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (secret, at) = entries.get(tenant)?;
        if now.saturating_duration_since(*at) >= TTL {
            return None;
        }
        Some(secret.matches(presented))
    }

    /// Keeps the secret the registry has for `tenant`, read at `now`.
    pub fn put(&self, tenant: &TenantId, secret: &Secret, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(tenant) {
            entries.retain(|_, (_, at)| now.saturating_duration_since(*at) < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(tenant.clone(), (secret.clone(), now));
    }

    /// Forgets a tenant (deleted, or created again).
    pub fn forget(&self, tenant: &TenantId) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_answer_until_forgotten_or_expired() {
        let cache = WebhookSecrets::default();
        let t = TenantId::parse("alice").unwrap();
        let now = Instant::now();
        assert_eq!(cache.check(&t, "s3cret", now), None, "unknown: ask");
        cache.put(&t, &Secret::new("s3cret"), now);
        assert_eq!(cache.check(&t, "s3cret", now), Some(true));
        assert_eq!(cache.check(&t, "wrong", now), Some(false));
        assert_eq!(
            cache.check(&t, "s3cret", now + TTL - Duration::from_millis(1)),
            Some(true)
        );
        assert_eq!(cache.check(&t, "s3cret", now + TTL), None, "expired: ask");
        cache.put(&t, &Secret::new("s3cret"), now);
        cache.forget(&t);
        assert_eq!(cache.check(&t, "s3cret", now), None, "forgotten: ask");
    }
}
