//! The model route on the egress listener: model credentials stay out of instances, as bot tokens
//! do.
//!
//! An agent's model base URL is `{egress-url}/model/{surrogate}`, with the same surrogate token
//! its instance uses for the Bot API. A call to `{egress-url}/model/{surrogate}/{path}` is checked
//! like a Bot API call (an unknown surrogate, or one of a stopped instance, gets 401), then sent to
//! `{model-base-url}/{path}` with `Authorization: Bearer <model-api-key>` in place of whatever the
//! agent sent. Responses, server-sent event streams included, are passed back as they arrive.

use crate::app::App;
use crate::egress::{Refusal, tenant_by_surrogate};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body forwarded: long conversations with images stay well below this.
const MAX_BODY: usize = 32 << 20;
/// How long one model call may take, stream included.
const TIMEOUT: Duration = Duration::from_secs(600);
/// Request headers passed upstream; everything else (authorization, cookies, hop-by-hop) is not.
const FORWARDED: &[&str] = &[
    "content-type",
    "accept",
    "openai-beta",
    "x-stainless-lang",
    "user-agent",
];

/// The base URL an agent of this instance is given.
pub fn instance_base_url(egress_url: &str, surrogate: &str) -> String {
    format!("{}/model/{surrogate}", egress_url.trim_end_matches('/'))
}

/// An error in the shape OpenAI-compatible clients parse.
fn model_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": code, "code": code}})),
    )
        .into_response()
}

pub async fn proxy(
    State(app): State<Arc<App>>,
    Path((surrogate, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    let tenant = match tenant_by_surrogate(&app, &surrogate).await {
        Ok(t) => t,
        Err(Refusal::Unauthorized) => {
            app.metrics.egress("model_refused");
            return model_error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "unknown or revoked instance token",
            );
        }
        Err(Refusal::Unavailable) => {
            return model_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again later",
            );
        }
    };
    let Some(base) = app.settings.model_base_url.as_deref() else {
        app.metrics.egress("model_unconfigured");
        return model_error(
            StatusCode::NOT_FOUND,
            "not_configured",
            "no model is configured on this otm server",
        );
    };
    let mut url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        rest.trim_start_matches('/')
    );
    if let Some(q) = req.uri().query() {
        url.push('?');
        url.push_str(q);
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return model_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body too large",
            );
        }
    };
    let mut out = app.http.request(method, url).body(body).timeout(TIMEOUT);
    for name in FORWARDED {
        if let Some(v) = headers.get(*name) {
            out = out.header(*name, v.clone());
        }
    }
    if let Some(key) = &app.settings.model_api_key {
        out = out.bearer_auth(key.expose());
    }
    match out.send().await {
        Ok(resp) => {
            app.metrics.egress("model_forwarded");
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response_headers = Vec::new();
            for name in ["content-type", "cache-control", "x-request-id"] {
                if let Some(v) = resp
                    .headers()
                    .get(name)
                    .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
                {
                    response_headers.push((name, v));
                }
            }
            let stream = resp.bytes_stream().map_err(std::io::Error::other);
            let mut response = Response::new(Body::from_stream(stream));
            *response.status_mut() = status;
            for (name, v) in response_headers {
                response.headers_mut().insert(name, v);
            }
            response
        }
        Err(e) => {
            app.metrics.egress("model_upstream_error");
            tracing::warn!(tenant = %tenant.id, error = %e.without_url(), "model call failed");
            model_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the model provider could not be reached",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn instance_base_url_keeps_one_slash() {
        assert_eq!(
            super::instance_base_url("http://127.0.0.1:8082/", "1:abc"),
            "http://127.0.0.1:8082/model/1:abc"
        );
    }
}
