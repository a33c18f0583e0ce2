//! What both egress proxies (the Bot API proxy and the model proxy) and the CONNECT proxy share
//! at their front door: which tenant a surrogate token belongs to, and request bodies read
//! within a size, a time and a shared memory budget.

use crate::app::App;
use axum::body::Body;
use axum::http::StatusCode;
use otm_core::Tenant;
use std::time::Duration;

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
pub(crate) async fn tenant_by_surrogate(app: &App, surrogate: &str) -> Result<Tenant, Refusal> {
    let digest = otm_core::secret::digest(surrogate);
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
    tenant.ok_or(Refusal::Unauthorized)
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
