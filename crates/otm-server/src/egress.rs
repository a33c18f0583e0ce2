//! The Bot API proxy on the egress listener. Agents call `{root}/bot{surrogate}/{method}` with a
//! surrogate token only their instance knows; the proxy maps it to the tenant's real token and
//! forwards to Telegram.
//!
//! What goes upstream is decided on the decoded path ([`crate::proxy_path`]), and the upstream URL
//! is built from the checked segments:
//! - `bot{surrogate}/{method}`: one segment, ASCII letters only. `setWebhook`, `deleteWebhook`,
//!   `getWebhookInfo`, `logOut`, `close` and `getUpdates` (in any case) are answered here and
//!   never forwarded: otm owns the webhook, and the bot's session is not the agent's to end.
//! - `file/bot{surrogate}/{path}`: file downloads, each segment of letters, digits, `_`, `-` and
//!   `.`, no dot segment.
//! - everything else, a dot segment (plain or encoded), an encoded slash or a trailing slash
//!   included, is refused before the surrogate's tenant is known to Telegram.
//!
//! Messages are paced per bot as Telegram limits them ([`crate::bot_limits`]): a call over a
//! limit waits its turn; a 429 from Telegram holds the bot for its `retry_after`. Every refused
//! call is counted in `otm_egress_refused_total{proxy="bot",reason}` and logged with its tenant
//! and method, never with a token.

use crate::app::App;
use crate::surrogate::{MAX_BODY, Refusal, read_body, tenant_by_surrogate};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use otm_core::{Secret, Tenant};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one Bot API call may take upstream.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest error answer read back from Telegram (to find a `retry_after`).
const MAX_ERROR_BODY: usize = 64 << 10;

/// Methods answered by otm itself, lower-case.
const LOCAL: &[&str] = &[
    "setwebhook",
    "deletewebhook",
    "getwebhookinfo",
    "logout",
    "close",
    "getupdates",
];

pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(proxy).with_state(app)
}

fn telegram_error(status: StatusCode, description: &str) -> Response {
    (
        status,
        Json(json!({"ok": false, "error_code": status.as_u16(), "description": description})),
    )
        .into_response()
}

/// Telegram's own answer to a call over a limit.
fn too_many(retry_after: Duration) -> Response {
    let secs = retry_after.as_secs().max(1);
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "ok": false, "error_code": 429,
            "description": format!("Too Many Requests: retry after {secs}"),
            "parameters": {"retry_after": secs}
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert("retry-after", v);
    }
    r
}

/// `/bot<token>/<tail>` or `/file/bot<token>/<tail>`, on the raw path: the token segment and
/// the rest, both still encoded. The tail may be empty (it is refused later, with the tenant
/// known).
fn split(path: &str) -> Option<(bool, &str, &str)> {
    let (file, rest) = match path.strip_prefix("/file/bot") {
        Some(r) => (true, r),
        None => (false, path.strip_prefix("/bot")?),
    };
    let (token, tail) = rest.split_once('/')?;
    if token.is_empty() {
        return None;
    }
    Some((file, token, tail))
}

/// A decoded, checked Bot API call.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    Method(String),
    File(Vec<String>),
}

/// Checks the decoded tail of a call; the error is the refusal's metric label.
fn check_tail(file: bool, tail: &str) -> Result<Call, &'static str> {
    let segs = crate::proxy_path::segments(&format!("/{tail}")).map_err(|e| e.label())?;
    if file {
        if segs.iter().all(|s| crate::proxy_path::is_file_segment(s)) {
            Ok(Call::File(segs))
        } else {
            Err("file_path_not_allowed")
        }
    } else {
        match segs.as_slice() {
            [m] if crate::proxy_path::is_method_name(m) => Ok(Call::Method(m.clone())),
            _ => Err("method_not_allowed"),
        }
    }
}

/// What of an agent-written path may go into a log line: printable, short.
fn loggable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

/// Counts and logs one refused (or locally answered) call.
fn refused(app: &App, tenant: Option<&Tenant>, method: &str, reason: &str) {
    app.metrics().egress_refused("bot", reason);
    match tenant {
        Some(t) => {
            tracing::warn!(tenant = %t.id, method = %loggable(method), reason, "Bot API call refused")
        }
        None => tracing::info!(method = %loggable(method), reason, "Bot API call refused"),
    }
}

// At debug level, as the webhook's: one span per call, and what is logged below names the
// tenant itself.
#[tracing::instrument(name = "egress", level = "debug", skip_all, fields(tenant = tracing::field::Empty, instance = tracing::field::Empty, call = tracing::field::Empty))]
async fn proxy(State(app): State<Arc<App>>, req: Request) -> Response {
    if req.method() == axum::http::Method::CONNECT {
        return crate::connect::handle(app, req).await;
    }
    let path = req.uri().path().to_owned();
    if path.starts_with("/model/") {
        return crate::model_proxy::proxy(app, req).await;
    }
    let Some((file, raw_token, raw_tail)) = split(&path) else {
        refused(&app, None, "-", "not_found");
        app.metrics().egress("not_found");
        return telegram_error(StatusCode::NOT_FOUND, "Not Found");
    };
    let surrogate = match crate::proxy_path::segments(&format!("/{raw_token}")).as_deref() {
        Ok([t]) => t.clone(),
        _ => {
            refused(&app, None, "-", "not_found");
            return telegram_error(StatusCode::NOT_FOUND, "Not Found");
        }
    };
    let tenant = match tenant_by_surrogate(&app, &surrogate).await {
        Ok(t) => t,
        Err(Refusal::Unauthorized) => {
            app.metrics().egress("refused");
            refused(&app, None, raw_tail, "unauthorized");
            return telegram_error(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        Err(Refusal::Unavailable) => {
            return telegram_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
        }
    };
    tracing::Span::current().record("tenant", tracing::field::display(&tenant.id));
    let call = match check_tail(file, raw_tail) {
        Ok(c) => c,
        Err(reason) => {
            refused(&app, Some(&tenant), raw_tail, reason);
            return telegram_error(StatusCode::NOT_FOUND, "Not Found");
        }
    };
    match &call {
        Call::Method(m) => tracing::Span::current().record("call", m.as_str()),
        Call::File(_) => tracing::Span::current().record("call", "file"),
    };
    let http_method = req.method().clone();
    let allowed = match call {
        Call::Method(_) => {
            http_method == axum::http::Method::GET || http_method == axum::http::Method::POST
        }
        Call::File(_) => {
            http_method == axum::http::Method::GET || http_method == axum::http::Method::HEAD
        }
    };
    if !allowed {
        refused(&app, Some(&tenant), raw_tail, "http_method_not_allowed");
        return telegram_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    if let Call::Method(m) = &call {
        let lower = m.to_ascii_lowercase();
        if LOCAL.contains(&lower.as_str()) {
            app.metrics().egress("local");
            refused(&app, Some(&tenant), m, "answered_locally");
            return answer_locally(&app, &tenant, &lower).await;
        }
    }
    let Some(real) = tenant.bot_token.clone() else {
        app.metrics().egress("no_token");
        refused(&app, Some(&tenant), raw_tail, "no_bot_token");
        return telegram_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: the tenant has no bot token",
        );
    };
    // One tenant cannot hold the whole listener: its calls under way are capped.
    let Some(_slot) = app.egress_slot(&tenant.id) else {
        refused(&app, Some(&tenant), raw_tail, "too_many_in_flight");
        return too_many(Duration::from_secs(1));
    };
    forward(&app, &tenant, &real, &call, req).await
}

/// The answers of the methods otm keeps to itself.
async fn answer_locally(app: &App, tenant: &Tenant, method: &str) -> Response {
    match method {
        "getwebhookinfo" => {
            let pending = app.registry().inbox_depth(&tenant.id).await.unwrap_or(0);
            let url = app.webhook_url(&tenant.id).unwrap_or_default();
            Json(json!({"ok": true, "result": {
                "url": url, "has_custom_certificate": false, "pending_update_count": pending
            }}))
            .into_response()
        }
        // What Telegram answers while a webhook is set.
        "getupdates" => telegram_error(
            StatusCode::CONFLICT,
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
        ),
        "logout" | "close" => Json(
            json!({"ok": true, "result": true, "description": "The bot's session is managed by otm"}),
        )
        .into_response(),
        // setWebhook, deleteWebhook.
        _ => Json(json!({"ok": true, "result": true, "description": "Webhook is managed by otm"}))
            .into_response(),
    }
}

async fn forward(
    app: &Arc<App>,
    tenant: &Tenant,
    real: &Secret,
    call: &Call,
    req: Request,
) -> Response {
    let root = app.telegram().root();
    let query = req.uri().query().map(str::to_owned);
    let token = format!("bot{}", real.expose());
    let (url, method_name) = match call {
        Call::Method(m) => (
            crate::forward::url(root, [token.as_str(), m.as_str()], query.as_deref()),
            m.as_str(),
        ),
        Call::File(segs) => (
            crate::forward::url(
                root,
                ["file", token.as_str()]
                    .into_iter()
                    .chain(segs.iter().map(String::as_str)),
                query.as_deref(),
            ),
            "file",
        ),
    };
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let content_type = parts.headers.get("content-type").cloned();
    let (body, _buffered) = match read_body(app, &parts.headers, body, MAX_BODY).await {
        Ok(b) => b,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            refused(app, Some(tenant), method_name, "body_too_large");
            return telegram_error(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
        }
        Err(StatusCode::SERVICE_UNAVAILABLE) => {
            refused(app, Some(tenant), method_name, "buffer_full");
            return telegram_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
        }
        Err(status) => {
            refused(app, Some(tenant), method_name, "body_timeout");
            return telegram_error(status, "Request Timeout");
        }
    };
    // Wait for this call's slot under the bot's rate limits.
    let message = matches!(call, Call::Method(m) if crate::bot_limits::is_message(m));
    let chat = if message {
        crate::bot_limits::chat_id(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            &body,
            query.as_deref(),
        )
    } else {
        None
    };
    let now = Instant::now();
    match app
        .bot_limiter()
        .admit(&tenant.id, message, chat.as_deref(), now)
    {
        crate::bot_limits::Admission::At(slot) => {
            if slot > now {
                tokio::time::sleep_until(slot.into()).await;
            }
            app.metrics()
                .bot_api_queued_seconds
                .observe(slot.saturating_duration_since(now).as_secs_f64());
        }
        crate::bot_limits::Admission::Refused { retry_after } => {
            refused(app, Some(tenant), method_name, "rate_limited");
            return too_many(retry_after);
        }
    }
    // Telegram's own 429 is queued too: the call goes out once more after the `retry_after`
    // it was given, when that wait is within the limiter's (a 429 means Telegram did nothing,
    // so sending again cannot repeat a message). A second 429 goes back to the agent.
    let mut retried = false;
    loop {
        let upstream = crate::forward::Upstream {
            method: method.clone(),
            url: url.clone(),
            headers: &parts.headers,
            pass: &["content-type"],
            bearer: None,
            body: body.clone(),
            timeout: UPSTREAM_TIMEOUT,
        };
        let resp = match upstream.send(app.http()).await {
            Ok(resp) => resp,
            Err(e) => {
                app.metrics().egress("upstream_error");
                // The URL carries the real token: the error has none.
                tracing::warn!(tenant = %tenant.id, method = method_name, error = %e, "Bot API call failed");
                return telegram_error(
                    StatusCode::BAD_GATEWAY,
                    "Bad Gateway: the Bot API could not be reached",
                );
            }
        };
        app.metrics().egress("forwarded");
        let status = resp.status();
        let headers = resp.headers().clone();
        if status != StatusCode::TOO_MANY_REQUESTS {
            let body = crate::forward::stream(resp, |_| {});
            return crate::forward::respond(status, &headers, &["content-type"], body);
        }
        // Telegram says how long this bot must wait: hold its later calls as long.
        let bytes = crate::forward::read_capped(resp, MAX_ERROR_BODY).await;
        let retry_after = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["parameters"]["retry_after"].as_u64())
            .unwrap_or(1);
        let now = Instant::now();
        app.bot_limiter()
            .blocked(&tenant.id, Duration::from_secs(retry_after.min(3600)), now);
        tracing::warn!(tenant = %tenant.id, method = method_name, retry_after, "Telegram asked the bot to slow down");
        if !retried
            && let crate::bot_limits::Admission::At(slot) =
                app.bot_limiter()
                    .admit(&tenant.id, message, chat.as_deref(), now)
        {
            retried = true;
            tokio::time::sleep_until(slot.into()).await;
            app.metrics()
                .bot_api_queued_seconds
                .observe(slot.saturating_duration_since(now).as_secs_f64());
            continue;
        }
        return crate::forward::respond(status, &headers, &["content-type"], Body::from(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::{Call, check_tail, split};

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
        assert_eq!(split("/bot1:abc/"), Some((false, "1:abc", "")));
        assert_eq!(split("/bot1:abc"), None);
        assert_eq!(split("/other"), None);
    }

    #[test]
    fn only_plain_method_names_and_file_paths_pass() {
        assert_eq!(
            check_tail(false, "sendMessage"),
            Ok(Call::Method("sendMessage".into()))
        );
        assert_eq!(
            check_tail(true, "photos/file_1.jpg"),
            Ok(Call::File(vec!["photos".into(), "file_1.jpg".into()]))
        );
        for (file, tail) in [
            (false, "x/../setWebhook"),
            (false, "x/%2e%2e/deleteWebhook"),
            (false, "x/%2E%2E/deleteWebhook"),
            (false, "setWebhook/"),
            (false, ""),
            (false, "x/setWebhook"),
            (false, "send%4Dessage%2F"),
            (false, "sendMessage.json"),
            (true, "../../x"),
            (true, "photos/%2e%2e/x"),
            (true, "photos/"),
            (true, "a%2Fb"),
        ] {
            assert!(check_tail(file, tail).is_err(), "{tail}");
        }
        // Percent-encoded letters are still the method they spell.
        assert_eq!(
            check_tail(false, "send%4Dessage"),
            Ok(Call::Method("sendMessage".into()))
        );
    }
}
