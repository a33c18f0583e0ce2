//! The public listener: Telegram webhooks (`POST /tg/{tenant}`) and `GET /healthz`.
//!
//! An update is answered 200 only after it is stored durably in the tenant's inbox. Unknown
//! tenants (404), a missing or wrong secret (401), oversized (413) or malformed (400) bodies store
//! nothing and wake nothing.

use crate::app::App;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use otm_core::{Appended, TenantId};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// Largest update accepted, as Telegram's own limit for webhooks.
pub const MAX_UPDATE_BYTES: usize = 1 << 20;

/// The header Telegram sends the webhook secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

pub fn router(app: Arc<App>) -> Router {
    let r = Router::new().route("/healthz", get(healthz));
    if app.settings().runs_router() {
        r.route("/tg/{tenant}", post(webhook)).with_state(app)
    } else {
        r.with_state(app)
    }
}

async fn healthz() -> &'static str {
    "ok"
}

fn unknown_tenant(app: &App) -> Response {
    reject(
        app,
        StatusCode::NOT_FOUND,
        "unknown_tenant",
        "unknown tenant",
    )
}

fn reject(app: &App, status: StatusCode, reason: &str, description: &str) -> Response {
    app.metrics().rejected(reason);
    (
        status,
        Json(json!({"ok": false, "error_code": status.as_u16(), "description": description})),
    )
        .into_response()
}

// At debug level: an enabled span costs every webhook a formatted record; the errors logged
// below name the tenant and update themselves.
#[tracing::instrument(name = "webhook", level = "debug", skip_all, fields(tenant = %tenant, update_id = tracing::field::Empty))]
async fn webhook(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let Ok(tenant) = TenantId::parse(&tenant) else {
        return unknown_tenant(&app);
    };
    let presented = req
        .headers()
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now = Instant::now();
    let known = match app.webhook_secrets().check(&tenant, presented, now) {
        Some(known) => known,
        None => match app.registry().get_tenant(&tenant).await {
            Ok(Some(t)) => {
                app.webhook_secrets().put(&tenant, &t.webhook_secret, now);
                t.webhook_secret.matches(presented)
            }
            Ok(None) => {
                return unknown_tenant(&app);
            }
            Err(e) => {
                tracing::error!(%tenant, error = %e, "registry unavailable");
                return reject(
                    &app,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later",
                );
            }
        },
    };
    if !known {
        return reject(
            &app,
            StatusCode::UNAUTHORIZED,
            "bad_secret",
            "missing or wrong secret token",
        );
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_UPDATE_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return reject(
                &app,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "update larger than 1 MiB",
            );
        }
    };
    let update_id = match update_id(&body) {
        Ok(id) => id,
        Err(description) => {
            return reject(&app, StatusCode::BAD_REQUEST, "malformed", description);
        }
    };
    tracing::Span::current().record("update_id", update_id);
    match app.registry().inbox_append(&tenant, update_id, &body).await {
        Ok(Appended::Stored { .. }) => {
            app.metrics().updates_accepted.inc();
            app.metrics()
                .accept_seconds
                .observe(started.elapsed().as_secs_f64());
            crate::dispatch::kick(&app, &tenant);
            if app.routed()
                || app
                    .settings()
                    .coordinator
                    .as_deref()
                    .is_some_and(|c| c != "memory")
            {
                // Another replica may hold this tenant's dispatcher lease.
                let _ = app
                    .coordinator()
                    .publish(otm_core::Notification::InboxHasWork {
                        tenant: tenant.clone(),
                    })
                    .await;
            }
        }
        Ok(Appended::Duplicate) => {
            app.metrics().updates_duplicate.inc();
        }
        Err(otm_core::Error::NotFound { .. }) => {
            return unknown_tenant(&app);
        }
        Err(e) => {
            tracing::error!(%tenant, update_id, error = %e, "could not store an update");
            // Not stored: Telegram retries on a non-2xx answer.
            return reject(
                &app,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again later",
            );
        }
    }
    ok()
}

/// The answer to an update stored (or already stored): `{"ok":true}`, built without
/// serializing anything.
fn ok() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        r#"{"ok":true}"#,
    )
        .into_response()
}

/// The update's `update_id`, read without building the update: the rest of the body is checked
/// to be JSON and kept as sent. A body that does not read that way is looked at again as a
/// whole, to say what is wrong with it.
fn update_id(body: &[u8]) -> Result<i64, &'static str> {
    #[derive(serde::Deserialize)]
    struct Head {
        update_id: i64,
    }
    if let Ok(head) = serde_json::from_slice::<Head>(body) {
        return Ok(head.update_id);
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => map
            .get("update_id")
            .and_then(|v| v.as_i64())
            .ok_or("update_id must be an integer"),
        _ => Err("the body must be a JSON object"),
    }
}

#[cfg(test)]
mod tests {
    use super::update_id;

    #[test]
    fn reads_the_update_id_and_says_what_is_wrong() {
        assert_eq!(
            update_id(br#"{"update_id":42,"message":{"text":"hi"}}"#),
            Ok(42)
        );
        assert_eq!(update_id(br#"{"message":{},"update_id":-7}"#), Ok(-7));
        assert_eq!(
            update_id(br#"{"update_id":"42"}"#),
            Err("update_id must be an integer")
        );
        assert_eq!(
            update_id(br#"{"message":{}}"#),
            Err("update_id must be an integer")
        );
        assert_eq!(
            update_id(br#"[1,2]"#),
            Err("the body must be a JSON object")
        );
        assert_eq!(
            update_id(br#"{"update_id":1,"message":"#),
            Err("the body must be a JSON object"),
            "a body cut short is refused, though its id came first"
        );
    }
}
