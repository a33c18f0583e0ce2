//! The Bot API proxy on the egress listener. Agents call `{root}/bot{surrogate}/{method}` with a
//! surrogate token only their instance knows; the proxy maps it to the tenant's real token and
//! forwards to Telegram. Webhook methods are answered here: otm owns the webhook.

use crate::app::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::TryStreamExt;
use otm_core::{Secret, Tenant};
use serde_json::json;
use std::sync::Arc;

/// Largest request body forwarded (file uploads included).
const MAX_BODY: usize = 50 << 20;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/model/{surrogate}/{*rest}",
            axum::routing::any(crate::model_proxy::proxy),
        )
        .fallback(proxy)
        .with_state(app)
}

/// Why a surrogate was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Unknown, revoked, or its instance belongs to no tenant.
    Unauthorized,
    /// The registry could not be asked.
    Unavailable,
}

/// The tenant whose running instance holds this surrogate token.
pub(crate) async fn tenant_by_surrogate(app: &App, surrogate: &str) -> Result<Tenant, Refusal> {
    let digest = otm_core::secret::digest(surrogate);
    let instance = match app.registry.instance_by_surrogate(&digest).await {
        Ok(Some(i)) => i,
        Ok(None) => return Err(Refusal::Unauthorized),
        Err(e) => {
            tracing::error!(error = %e, "registry unavailable");
            return Err(Refusal::Unavailable);
        }
    };
    let tenant = match instance.tenant.as_ref() {
        Some(t) => app.registry.get_tenant(t).await.ok().flatten(),
        None => None,
    };
    tenant.ok_or(Refusal::Unauthorized)
}

fn telegram_error(status: StatusCode, description: &str) -> Response {
    (
        status,
        Json(json!({"ok": false, "error_code": status.as_u16(), "description": description})),
    )
        .into_response()
}

/// `/bot<token>/<method>` or `/file/bot<token>/<path>`.
fn split(path: &str) -> Option<(bool, &str, &str)> {
    let (file, rest) = match path.strip_prefix("/file/bot") {
        Some(r) => (true, r),
        None => (false, path.strip_prefix("/bot")?),
    };
    let (token, tail) = rest.split_once('/')?;
    if token.is_empty() || tail.is_empty() {
        return None;
    }
    Some((file, token, tail))
}

async fn proxy(State(app): State<Arc<App>>, req: Request) -> Response {
    if req.method() == axum::http::Method::CONNECT {
        return crate::connect::handle(app, req).await;
    }
    let path = req.uri().path().to_owned();
    let Some((file, surrogate, tail)) = split(&path) else {
        app.metrics.egress("not_found");
        return telegram_error(StatusCode::NOT_FOUND, "Not Found");
    };
    let tenant = match tenant_by_surrogate(&app, surrogate).await {
        Ok(t) => t,
        Err(Refusal::Unauthorized) => {
            app.metrics.egress("refused");
            return telegram_error(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        Err(Refusal::Unavailable) => {
            return telegram_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
        }
    };
    let method = tail.to_owned();
    if !file {
        match method.to_ascii_lowercase().as_str() {
            "setwebhook" | "deletewebhook" => {
                app.metrics.egress("local");
                return Json(
                    json!({"ok": true, "result": true, "description": "Webhook is managed by otm"}),
                )
                .into_response();
            }
            "getwebhookinfo" => {
                app.metrics.egress("local");
                let pending = app.registry.inbox_depth(&tenant.id).await.unwrap_or(0);
                let url = app.webhook_url(&tenant.id).unwrap_or_default();
                return Json(json!({"ok": true, "result": {
                    "url": url, "has_custom_certificate": false, "pending_update_count": pending
                }}))
                .into_response();
            }
            _ => {}
        }
    }
    let Some(real) = tenant.bot_token.clone() else {
        app.metrics.egress("no_token");
        return telegram_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: the tenant has no bot token",
        );
    };
    forward(&app, &tenant, &real, file, &method, req).await
}

async fn forward(
    app: &Arc<App>,
    tenant: &Tenant,
    real: &Secret,
    file: bool,
    tail: &str,
    req: Request,
) -> Response {
    let root = app.telegram.root();
    let mut url = if file {
        format!("{root}/file/bot{}/{tail}", real.expose())
    } else {
        format!("{root}/bot{}/{tail}", real.expose())
    };
    if let Some(q) = req.uri().query() {
        url.push('?');
        url.push_str(q);
    }
    let method = req.method().clone();
    let content_type = req.headers().get("content-type").cloned();
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return telegram_error(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large"),
    };
    let mut out = app
        .http
        .request(method, url)
        .body(body)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(ct) = content_type {
        out = out.header("content-type", ct);
    }
    match out.send().await {
        Ok(resp) => {
            app.metrics.egress("forwarded");
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
            let stream = resp.bytes_stream().map_err(std::io::Error::other);
            let mut response = Response::new(Body::from_stream(stream));
            *response.status_mut() = status;
            if let Some(ct) = ct {
                response.headers_mut().insert("content-type", ct);
            }
            response
        }
        Err(e) => {
            app.metrics.egress("upstream_error");
            // The URL carries the real token: never let it into a message.
            tracing::warn!(tenant = %tenant.id, error = %e.without_url(), "Bot API call failed");
            telegram_error(
                StatusCode::BAD_GATEWAY,
                "Bad Gateway: the Bot API could not be reached",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_bot_paths() {
        assert_eq!(
            split("/bot1:abc/sendMessage"),
            Some((false, "1:abc", "sendMessage"))
        );
        assert_eq!(
            split("/file/bot1:abc/photos/a.jpg"),
            Some((true, "1:abc", "photos/a.jpg"))
        );
        assert_eq!(split("/bot/sendMessage"), None);
        assert_eq!(split("/bot1:abc/"), None);
        assert_eq!(split("/other"), None);
    }
}
