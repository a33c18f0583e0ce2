//! The model route on the egress listener: model credentials stay out of instances, as bot tokens
//! do.
//!
//! An agent's model base URL is `{egress-url}/model/{surrogate}`, with the same surrogate token
//! its instance uses for the Bot API. A call to `{egress-url}/model/{surrogate}/{path}` is checked
//! like a Bot API call (an unknown surrogate, or one of a stopped instance, gets 401), then
//! against an allowlist of routes on its decoded path ([`crate::proxy_path`]; dot segments and
//! encoded slashes are refused):
//!
//! | method | path | |
//! |---|---|---|
//! | `POST` | `chat/completions` | what OpenClaw's `openai-completions` provider calls |
//! | `POST` | `responses` | the Responses API |
//! | `GET` | `models`, `models/{id}` | the model list |
//!
//! Anything else is answered 404 here and never goes upstream. An allowed call is sent to
//! `{model-base-url}/{route}` (built from the checked segments) with
//! `Authorization: Bearer <key>` in place of whatever the agent sent: the tenant's own
//! `model_api_key` when it has one, else the server's. When the server has a `model_id`, a
//! request's `model` must be that id (or absent, and is then set to it): another model is
//! refused with 400, so a tenant cannot spend the operator's key on a dearer model.
//!
//! Budgets ([`crate::model_budget`]): requests per minute and tokens per UTC day, per tenant,
//! answered 429 when over. Tokens are read from the `usage` of answers; a streamed chat
//! completion is asked for its usage (`stream_options.include_usage`), and the stream's usage
//! chunk is counted as it passes. Responses, server-sent event streams included, are passed back
//! as they arrive. Every refusal is counted in `otm_egress_refused_total{proxy="model",reason}`.

use crate::app::App;
use crate::model_budget::{SseUsage, usage_tokens};
use crate::surrogate::{Refusal, read_body, tenant_by_surrogate};
use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use otm_core::{Tenant, TenantId};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request body forwarded: long conversations stay well below this.
const MAX_BODY: usize = crate::surrogate::MAX_BODY;
/// How long one model call may take, stream included.
pub const TIMEOUT: Duration = Duration::from_secs(600);
/// Largest non-streamed answer whose `usage` is read (the answer itself is passed on whole).
const MAX_METERED: usize = 8 << 20;
/// Request headers passed upstream; everything else (authorization, cookies, hop-by-hop) is not.
const FORWARDED: &[&str] = &[
    "content-type",
    "accept",
    "openai-beta",
    "x-stainless-lang",
    "user-agent",
];

pub use crate::proxy_path::model_base_url as instance_base_url;

/// An error in the shape OpenAI-compatible clients parse.
fn model_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": code, "code": code}})),
    )
        .into_response()
}

/// An allowed model route.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    ChatCompletions,
    Responses,
    Models,
    Model(String),
}

impl Route {
    /// The upstream path, from checked segments.
    fn path(&self) -> String {
        match self {
            Route::ChatCompletions => "chat/completions".into(),
            Route::Responses => "responses".into(),
            Route::Models => "models".into(),
            Route::Model(id) => format!("models/{id}"),
        }
    }
}

/// A model id as a path segment: letters, digits, `.`, `_`, `-`, `:`, `@`; no dot segment.
fn is_model_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@'))
}

/// The route of a call, on its decoded tail; the error is the refusal's metric label.
fn route(method: &Method, tail: &str) -> Result<Route, &'static str> {
    let segs = crate::proxy_path::segments(&format!("/{tail}")).map_err(|e| e.label())?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method, segs.as_slice()) {
        (&Method::POST, ["chat", "completions"]) => Ok(Route::ChatCompletions),
        (&Method::POST, ["responses"]) => Ok(Route::Responses),
        (&Method::GET, ["models"]) => Ok(Route::Models),
        (&Method::GET, ["models", id]) if is_model_id(id) => Ok(Route::Model((*id).to_owned())),
        _ => Err("route_not_allowed"),
    }
}

/// Counts and logs one refused call.
fn refused(app: &App, tenant: Option<&TenantId>, what: &str, reason: &str) {
    app.metrics().egress_refused("model", reason);
    let what: String = what.chars().filter(|c| !c.is_control()).take(120).collect();
    match tenant {
        Some(t) => tracing::warn!(tenant = %t, call = %what, reason, "model call refused"),
        None => tracing::info!(call = %what, reason, "model call refused"),
    }
}

/// Answers a call under `/model/`.
#[tracing::instrument(name = "model", skip_all, fields(tenant = tracing::field::Empty, instance = tracing::field::Empty))]
pub async fn proxy(app: Arc<App>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/model/").unwrap_or_default();
    let (raw_surrogate, raw_tail) = rest.split_once('/').unwrap_or((rest, ""));
    let what = format!("{} {raw_tail}", req.method());
    let surrogate = match crate::proxy_path::segments(&format!("/{raw_surrogate}")).as_deref() {
        Ok([s]) => s.clone(),
        _ => {
            refused(&app, None, &what, "not_found");
            return model_error(StatusCode::NOT_FOUND, "not_found", "no such route");
        }
    };
    let tenant = match tenant_by_surrogate(&app, &surrogate).await {
        Ok(t) => t,
        Err(Refusal::Unauthorized) => {
            app.metrics().egress("model_refused");
            refused(&app, None, &what, "unauthorized");
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
    tracing::Span::current().record("tenant", tracing::field::display(&tenant.id));
    let route = match route(req.method(), raw_tail) {
        Ok(r) => r,
        Err(reason) => {
            refused(&app, Some(&tenant.id), &what, reason);
            return model_error(
                StatusCode::NOT_FOUND,
                "route_not_allowed",
                "this model route is not allowed through otm (allowed: POST chat/completions, POST responses, GET models)",
            );
        }
    };
    let Some(base) = app.settings().model_base_url.clone() else {
        app.metrics().egress("model_unconfigured");
        refused(&app, Some(&tenant.id), &what, "not_configured");
        return model_error(
            StatusCode::NOT_FOUND,
            "not_configured",
            "no model is configured on this otm server",
        );
    };
    let Some(slot) = app.egress_slot(&tenant.id) else {
        refused(&app, Some(&tenant.id), &what, "too_many_in_flight");
        return over_budget(
            "too_many_requests",
            "too many model calls under way for this tenant",
            Duration::from_secs(1),
        );
    };
    if let Err(over) = app.model_budgets().admit(
        &tenant.id,
        app.model_budget(&tenant),
        Instant::now(),
        app.clock().now_ms(),
    ) {
        refused(&app, Some(&tenant.id), &what, over.label());
        let message = match over {
            crate::model_budget::Over::RequestsPerMinute { .. } => {
                "this tenant's model requests per minute are used up"
            }
            crate::model_budget::Over::TokensPerDay { .. } => {
                "this tenant's model tokens for today are used up"
            }
        };
        return over_budget("rate_limit_exceeded", message, over.retry_after());
    }
    forward(&app, &tenant, &base, route, req, &what, slot).await
}

fn over_budget(code: &str, message: &str, retry_after: Duration) -> Response {
    let mut r = model_error(StatusCode::TOO_MANY_REQUESTS, code, message);
    let secs = retry_after.as_secs().max(1);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert("retry-after", v);
    }
    r
}

/// The body to send upstream: the configured model enforced, and a streamed chat completion
/// asked for its usage.
fn prepare_body(
    route: &Route,
    body: &[u8],
    model_id: Option<&str>,
) -> Result<Vec<u8>, (&'static str, String)> {
    let mut v: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err((
                "invalid_body",
                "the request body must be a JSON object".into(),
            ));
        }
    };
    if let Some(id) = model_id {
        match v.get("model") {
            None | Some(Value::Null) => v["model"] = json!(id),
            Some(Value::String(m)) if m == id => {}
            Some(other) => {
                let shown: String = other.to_string().chars().take(100).collect();
                return Err((
                    "model_not_allowed",
                    format!("model {shown} is not allowed here; use \"{id}\""),
                ));
            }
        }
    }
    if *route == Route::ChatCompletions && v.get("stream") == Some(&Value::Bool(true)) {
        match v.get_mut("stream_options") {
            Some(Value::Object(o)) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None | Some(Value::Null) => v["stream_options"] = json!({"include_usage": true}),
            Some(_) => {}
        }
    }
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

async fn forward(
    app: &Arc<App>,
    tenant: &Tenant,
    base: &str,
    route: Route,
    req: Request,
    what: &str,
    slot: crate::app::EgressCall,
) -> Response {
    let path = route.path();
    let url = crate::forward::url(base, path.split('/'), req.uri().query());
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let (body, _buffered) = match read_body(app, &headers, body, MAX_BODY).await {
        Ok(b) => b,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            refused(app, Some(&tenant.id), what, "body_too_large");
            return model_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body too large",
            );
        }
        Err(StatusCode::SERVICE_UNAVAILABLE) => {
            refused(app, Some(&tenant.id), what, "buffer_full");
            return model_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again later",
            );
        }
        Err(status) => {
            refused(app, Some(&tenant.id), what, "body_timeout");
            return model_error(
                status,
                "request_timeout",
                "the request body came too slowly",
            );
        }
    };
    let body = if method == Method::POST {
        match prepare_body(&route, &body, app.settings().model_id.as_deref()) {
            Ok(b) => bytes::Bytes::from(b),
            Err((reason, message)) => {
                refused(app, Some(&tenant.id), what, reason);
                return model_error(StatusCode::BAD_REQUEST, reason, &message);
            }
        }
    } else {
        bytes::Bytes::new()
    };
    let key = tenant
        .limits
        .model_api_key
        .as_ref()
        .or(app.settings().model_api_key.as_ref());
    let upstream = crate::forward::Upstream {
        method,
        url,
        headers: &headers,
        pass: FORWARDED,
        bearer: key.map(|k| k.expose()),
        body,
        timeout: TIMEOUT,
    };
    match upstream.send(app.http()).await {
        Ok(resp) => {
            app.metrics().egress("model_forwarded");
            let status = resp.status();
            let response_headers = resp.headers().clone();
            let streamed = response_headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("text/event-stream"));
            let mut meter = Meter {
                app: app.clone(),
                tenant: tenant.id.clone(),
                sse: streamed.then(SseUsage::default),
                json: Vec::new(),
                overflow: false,
            };
            // The call stays under way (its tenant busy) until the answer's last byte passed.
            let body = crate::forward::stream(resp, move |chunk| {
                let _busy = &slot;
                meter.feed(chunk)
            });
            crate::forward::respond(
                status,
                &response_headers,
                &["content-type", "cache-control", "x-request-id"],
                body,
            )
        }
        Err(e) => {
            app.metrics().egress("model_upstream_error");
            tracing::warn!(tenant = %tenant.id, error = %e, "model call failed");
            model_error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the model provider could not be reached",
            )
        }
    }
}

/// Counts the tokens of one answer as it passes; records them when the answer is done (or the
/// client went away).
struct Meter {
    app: Arc<App>,
    tenant: TenantId,
    sse: Option<SseUsage>,
    json: Vec<u8>,
    overflow: bool,
}

impl Meter {
    fn feed(&mut self, chunk: &[u8]) {
        match &mut self.sse {
            Some(sse) => sse.feed(chunk),
            None if !self.overflow => {
                if self.json.len() + chunk.len() > MAX_METERED {
                    self.overflow = true;
                    self.json = Vec::new();
                } else {
                    self.json.extend_from_slice(chunk);
                }
            }
            None => {}
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let tokens = match &mut self.sse {
            Some(sse) => {
                // A last line without its newline.
                sse.feed(b"\n");
                sse.tokens
            }
            None => serde_json::from_slice::<Value>(&self.json)
                .ok()
                .and_then(|v| usage_tokens(&v))
                .unwrap_or(0),
        };
        if tokens > 0 {
            self.app.metrics().model_tokens.inc_by(tokens);
            self.app.model_budgets().record_tokens(
                &self.tenant,
                tokens,
                Instant::now(),
                self.app.clock().now_ms(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_base_url_keeps_one_slash() {
        assert_eq!(
            super::instance_base_url("http://127.0.0.1:8082/", "1:abc"),
            "http://127.0.0.1:8082/model/1:abc"
        );
    }

    #[test]
    fn only_allowlisted_routes_pass() {
        assert_eq!(
            route(&Method::POST, "chat/completions"),
            Ok(Route::ChatCompletions)
        );
        assert_eq!(route(&Method::POST, "responses"), Ok(Route::Responses));
        assert_eq!(route(&Method::GET, "models"), Ok(Route::Models));
        assert_eq!(
            route(&Method::GET, "models/gpt-4.1-mini"),
            Ok(Route::Model("gpt-4.1-mini".into()))
        );
        for (m, tail) in [
            (Method::GET, "..%2F..%2Fadmin%2Fsecrets"),
            (Method::GET, "../../admin/secrets"),
            (Method::POST, "chat/completions/"),
            (Method::POST, "chat/./completions"),
            (Method::POST, "x/../chat/completions"),
            (Method::POST, "chat%2Fcompletions"),
            (Method::GET, "files"),
            (Method::GET, "v1/files"),
            (Method::DELETE, "files/x"),
            (Method::GET, "chat/completions"),
            (Method::DELETE, "models/x"),
            (Method::GET, "models/%2e%2e"),
            (Method::POST, "embeddings"),
            (Method::GET, ""),
        ] {
            assert!(route(&m, tail).is_err(), "{m} {tail}");
        }
    }

    #[test]
    fn the_configured_model_is_enforced() {
        let r = Route::ChatCompletions;
        let ok = prepare_body(&r, br#"{"model":"m-1","messages":[]}"#, Some("m-1")).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&ok).unwrap()["model"],
            "m-1"
        );
        let filled = prepare_body(&r, br#"{"messages":[]}"#, Some("m-1")).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&filled).unwrap()["model"],
            "m-1"
        );
        let (reason, _) =
            prepare_body(&r, br#"{"model":"gpt-big","messages":[]}"#, Some("m-1")).unwrap_err();
        assert_eq!(reason, "model_not_allowed");
        assert_eq!(
            prepare_body(&r, b"[1]", None).unwrap_err().0,
            "invalid_body"
        );
        let streamed = prepare_body(&r, br#"{"model":"m-1","stream":true}"#, Some("m-1")).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&streamed).unwrap()["stream_options"]["include_usage"],
            true
        );
    }
}
