//! What both egress proxies (the Bot API proxy and the model proxy) and the CONNECT proxy share
//! at their front door: which tenant a surrogate token belongs to, and request bodies read
//! within a size, a time and a shared memory budget.

use crate::app::App;
use axum::body::Body;
use axum::http::StatusCode;
use otm_core::{InstanceId, Tenant, TenantId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest request body forwarded (file uploads included); the egress listener caps every body
/// at this size.
pub const MAX_BODY: usize = 20 << 20;
/// How long a client may take to send its request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Why a surrogate was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Unknown, revoked, or its instance belongs to no tenant.
    Unauthorized,
    /// The registry could not be asked.
    Unavailable,
}

/// The tenant whose running instance holds this surrogate token. The instance is recorded as
/// `instance` on the current span (the egress, model and CONNECT calls' spans declare it).
/// Answers from [`Surrogates`] when it can: an agent's every Bot API and model call asks.
pub(crate) async fn tenant_by_surrogate(app: &App, surrogate: &str) -> Result<Tenant, Refusal> {
    let digest = otm_core::secret::digest(surrogate);
    let now = Instant::now();
    if let Some((tenant, instance)) = app.surrogates().get(&digest, now) {
        tracing::Span::current().record("instance", tracing::field::display(&instance));
        return Ok(tenant);
    }
    let instance = match app.registry().instance_by_surrogate(&digest).await {
        Ok(Some(i)) => {
            tracing::Span::current().record("instance", tracing::field::display(&i.id));
            i
        }
        Ok(None) => return Err(Refusal::Unauthorized),
        Err(e) => {
            tracing::error!(error = %e, "registry unavailable");
            return Err(Refusal::Unavailable);
        }
    };
    let tenant = match instance.tenant.as_ref() {
        Some(t) => app.registry().get_tenant(t).await.ok().flatten(),
        None => None,
    };
    let tenant = tenant.ok_or(Refusal::Unauthorized)?;
    app.surrogates().put(digest, &tenant, &instance.id, now);
    Ok(tenant)
}

/// How long a surrogate's tenant is trusted from memory without a notification.
pub const SURROGATE_TTL: Duration = Duration::from_secs(2);

/// Entries kept at most; past this, expired ones are dropped, then all of them.
const MAX_SURROGATES: usize = 100_000;

/// Surrogate tokens (by digest) this process has seen lately, with their instance and tenant.
///
/// A surrogate is revoked when its instance starts to stop and gone when the instance is
/// discarded; the orchestrator forgets the instance's entry at both in its own process. A
/// tenant's settings (bot token, model key and budgets) change through the admin API, which
/// forgets the tenant here and tells the other replicas ([`App::tenant_changed`]).
/// Notifications are best effort, and other replicas stop instances too, so entries also
/// expire after [`SURROGATE_TTL`]: a replica may honour a revoked surrogate, or a tenant's old
/// settings, for at most that long.
#[derive(Debug, Default)]
pub struct Surrogates {
    entries: Mutex<HashMap<String, (Tenant, InstanceId, Instant)>>,
}

impl Surrogates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Tenant, InstanceId, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant and instance of a surrogate digest, while trusted.
    pub fn get(&self, digest: &str, now: Instant) -> Option<(Tenant, InstanceId)> {
        let entries = self.lock();
        let (tenant, instance, at) = entries.get(digest)?;
        (now.saturating_duration_since(*at) < SURROGATE_TTL)
            .then(|| (tenant.clone(), instance.clone()))
    }

    /// Keeps what the registry answered for a digest at `now`.
    pub fn put(&self, digest: String, tenant: &Tenant, instance: &InstanceId, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= MAX_SURROGATES && !entries.contains_key(&digest) {
            entries.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < SURROGATE_TTL);
            if entries.len() >= MAX_SURROGATES {
                entries.clear();
            }
        }
        entries.insert(digest, (tenant.clone(), instance.clone(), now));
    }

    /// Forgets an instance's surrogate (revoked at a stop, or the instance gone).
    pub fn forget_instance(&self, instance: &InstanceId) {
        self.lock().retain(|_, (_, i, _)| i != instance);
    }

    /// Forgets a tenant's surrogates (its settings changed, or it was deleted).
    pub fn forget_tenant(&self, tenant: &TenantId) {
        self.lock().retain(|_, (t, _, _)| t.id != *tenant);
    }
}

/// Reads a request body of at most `limit` bytes within [`BODY_READ_TIMEOUT`], holding its size
/// of the egress listeners' shared buffer budget ([`App::egress_buffer`]) until the permit is
/// dropped: however many calls are under way, their bodies together stay within it.
pub(crate) async fn read_body(
    app: &App,
    headers: &axum::http::HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(bytes::Bytes, tokio::sync::OwnedSemaphorePermit), StatusCode> {
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let kib = declared.unwrap_or(limit as u64).div_ceil(1024).max(1) as u32;
    let permit = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        app.egress_buffer().clone().acquire_many_owned(kib),
    )
    .await
    .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?
    .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok((b, permit)),
        Ok(Err(_)) => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::REQUEST_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surrogates_answer_until_forgotten_or_expired() {
        let cache = Surrogates::default();
        let alice = Tenant::new(TenantId::parse("alice").unwrap(), "reference", None);
        let bob = Tenant::new(TenantId::parse("bob").unwrap(), "reference", None);
        let (i1, i2) = (InstanceId::new("i-1"), InstanceId::new("i-2"));
        let now = Instant::now();
        assert!(cache.get("d1", now).is_none(), "unknown: ask the registry");
        cache.put("d1".into(), &alice, &i1, now);
        cache.put("d2".into(), &bob, &i2, now);
        let (t, i) = cache.get("d1", now).unwrap();
        assert_eq!((t.id.as_str(), i.as_str()), ("alice", "i-1"));
        assert!(
            cache
                .get("d1", now + SURROGATE_TTL - Duration::from_millis(1))
                .is_some()
        );
        assert!(cache.get("d1", now + SURROGATE_TTL).is_none(), "expired");

        cache.forget_instance(&i1);
        assert!(cache.get("d1", now).is_none(), "revoked with its instance");
        assert!(cache.get("d2", now).is_some(), "others stay");
        cache.forget_tenant(&bob.id);
        assert!(cache.get("d2", now).is_none(), "the tenant changed");
    }
}
