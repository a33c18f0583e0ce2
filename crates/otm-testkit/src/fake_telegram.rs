//! A stand-in Telegram Bot API server for tests, benchmarks and the offline demo.
//!
//! [`FakeTelegram::start`] serves `/bot{token}/{method}` and `/file/bot{token}/{path}` on
//! `127.0.0.1:0`. Parameters come from the query string and from a JSON or
//! `application/x-www-form-urlencoded` body, as the real API accepts them. Only registered tokens
//! ([`FakeTelegram::add_bot`]) are accepted; others get Telegram's 401 answer.
//!
//! Every accepted call is recorded ([`FakeTelegram::calls`]). `sendMessage` also appends to the
//! bot's sent messages, which a test can wait for without polling
//! ([`FakeTelegram::wait_for_messages`]). `sendMessage` can be made to fail
//! ([`FakeTelegram::fail_next_send`]), to answer 429 ([`FakeTelegram::limit_next_send`]) or to take time ([`FakeTelegram::set_send_delay`]).
//! The server stops when the value is dropped or [`FakeTelegram::shutdown`] is awaited.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use crate::updates::unix_now;

/// The bytes every file download (`GET /file/bot{token}/{path}`) answers with.
pub const FILE_BYTES: &[u8] = b"otm fake telegram file\n";

/// One accepted Bot API call, in arrival order.
#[derive(Clone, Debug)]
pub struct Call {
    /// The bot token from the URL.
    pub token: String,
    /// The method name as written in the URL (e.g. `sendMessage`). File downloads are recorded
    /// as `file` with the path in `params.file_path`.
    pub method: String,
    /// Query and body parameters merged into one JSON object (body wins). Form and query values
    /// are strings, as they arrive.
    pub params: Value,
    /// When the call arrived.
    pub at: Instant,
}

/// A message a bot sent successfully with `sendMessage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentMessage {
    pub chat_id: i64,
    pub text: String,
}

/// A bot's webhook as last set with `setWebhook`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookInfo {
    pub url: String,
    pub secret_token: Option<String>,
}

/// An in-process fake of the Telegram Bot API. See the [module docs](self).
pub struct FakeTelegram {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeTelegram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTelegram")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// State shared between the handle and the server.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<FakeState>,
    /// Woken whenever a message is recorded as sent.
    sent: Notify,
}

#[derive(Debug, Default)]
struct FakeState {
    bots: HashMap<String, Bot>,
    calls: Vec<Call>,
    fail_next_send: usize,
    send_delay: Duration,
    /// The next `sendMessage` calls are answered 429 with this `retry_after`: how many, and
    /// the seconds.
    limit_next_send: Option<(usize, u64)>,
}

#[derive(Debug)]
struct Bot {
    id: i64,
    webhook: Option<WebhookInfo>,
    sent: Vec<SentMessage>,
    next_message_id: i64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters to a test, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl FakeTelegram {
    /// Starts the server on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If no local port can be bound; use [`FakeTelegram::try_start`] to handle that.
    pub async fn start() -> FakeTelegram {
        match Self::try_start().await {
            Ok(fake) => fake,
            Err(e) => panic!("fake Telegram: cannot bind 127.0.0.1:0: {e}"),
        }
    }

    /// Starts the server on `127.0.0.1:0`, returning the bind error instead of panicking.
    pub async fn try_start() -> std::io::Result<FakeTelegram> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                // A dropped sender means the handle is gone: stop as well.
                let _ = stopped.await;
            });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "fake Telegram server failed");
            }
        });
        tracing::debug!(%addr, "fake Telegram listening");
        Ok(FakeTelegram {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The API root, e.g. `http://127.0.0.1:40123`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers a valid bot token. The bot id is the number before the `:`.
    ///
    /// Registering a token again keeps its recorded messages and webhook.
    ///
    /// # Panics
    /// If `token` is not shaped like `<digits>:<rest>`.
    pub fn add_bot(&self, token: &str) {
        let id = token
            .split_once(':')
            .filter(|(_, rest)| !rest.is_empty())
            .and_then(|(id, _)| id.parse::<i64>().ok())
            .unwrap_or_else(|| {
                panic!("fake Telegram: a bot token looks like `123456:secret`, got {token:?}")
            });
        self.shared
            .lock()
            .bots
            .entry(token.to_owned())
            .or_insert(Bot {
                id,
                webhook: None,
                sent: Vec::new(),
                next_message_id: 1,
            });
    }

    /// Every accepted call so far, oldest first. Calls with an unknown token are not recorded.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The messages `token` sent successfully, oldest first. Empty for an unknown token.
    pub fn sent_messages(&self, token: &str) -> Vec<SentMessage> {
        self.shared
            .lock()
            .bots
            .get(token)
            .map(|b| b.sent.clone())
            .unwrap_or_default()
    }

    /// How many messages `token` sent successfully, without copying them.
    pub fn sent_count(&self, token: &str) -> usize {
        self.shared
            .lock()
            .bots
            .get(token)
            .map_or(0, |b| b.sent.len())
    }

    /// The webhook `token` set last, if any.
    pub fn webhook(&self, token: &str) -> Option<WebhookInfo> {
        self.shared
            .lock()
            .bots
            .get(token)
            .and_then(|b| b.webhook.clone())
    }

    /// Waits until `token` has sent at least `n` messages or `timeout` passes, then returns all
    /// the messages it sent, oldest first. Fewer than `n` means the wait timed out.
    pub async fn wait_for_messages(
        &self,
        token: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<SentMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so a message sent in between still wakes us.
            let notified = self.shared.sent.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.sent_count(token) >= n {
                return self.sent_messages(token);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.sent_messages(token);
            }
        }
    }

    /// Makes the next `n` `sendMessage` calls (with a valid token) answer 500 without sending.
    pub fn fail_next_send(&self, n: usize) {
        self.shared.lock().fail_next_send = n;
    }

    /// Answers the next `sendMessage` with Telegram's 429 and `parameters.retry_after`
    /// (seconds); the message is not sent.
    pub fn limit_next_send(&self, retry_after_s: u64) {
        self.limit_next_sends(1, retry_after_s);
    }

    /// Answers the next `count` `sendMessage` calls with Telegram's 429 and `retry_after`.
    pub fn limit_next_sends(&self, count: usize, retry_after_s: u64) {
        self.shared.lock().limit_next_send = (count > 0).then_some((count, retry_after_s));
    }

    /// Makes every later `sendMessage` call wait `delay` before it is answered.
    pub fn set_send_delay(&self, delay: Duration) {
        self.shared.lock().send_delay = delay;
    }

    /// Stops the server and waits until it has stopped. In-flight calls are answered first.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Routes every request by hand: `/bot{token}/{method}` and `/file/bot{token}/{path}`.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/file/bot") {
        let Some((token, file_path)) = rest.split_once('/') else {
            return not_found();
        };
        return download(&shared, &method, &percent_decode(token), file_path);
    }
    let Some((token, api_method)) = path
        .strip_prefix("/bot")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(_, m)| !m.is_empty() && !m.contains('/'))
    else {
        return not_found();
    };
    if method != Method::GET && method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let token = percent_decode(token);
    let params = match params(uri.query(), &headers, &body) {
        Ok(params) => params,
        Err(description) => return error(StatusCode::BAD_REQUEST, &description),
    };
    call(&shared, token, api_method.to_owned(), params).await
}

fn download(shared: &Shared, method: &Method, token: &str, file_path: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let mut state = shared.lock();
    if !state.bots.contains_key(token) {
        return unauthorized();
    }
    state.calls.push(Call {
        token: token.to_owned(),
        method: "file".to_owned(),
        params: json!({ "file_path": file_path }),
        at: Instant::now(),
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        FILE_BYTES,
    )
        .into_response()
}

/// Answers one Bot API method call.
async fn call(shared: &Shared, token: String, method: String, params: Value) -> Response {
    let bot_id = {
        let mut state = shared.lock();
        let Some(bot) = state.bots.get(&token) else {
            return unauthorized();
        };
        let bot_id = bot.id;
        state.calls.push(Call {
            token: token.clone(),
            method: method.clone(),
            params: params.clone(),
            at: Instant::now(),
        });
        bot_id
    };
    // Bot API method names are case-insensitive.
    match method.to_ascii_lowercase().as_str() {
        "getme" => ok(json!({
            "id": bot_id,
            "is_bot": true,
            "first_name": "Fake",
            "username": format!("fake_{bot_id}_bot"),
            "can_join_groups": true,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
        })),
        "sendmessage" => send_message(shared, &token, bot_id, &params).await,
        "setwebhook" => {
            let url = params
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let secret_token = params
                .get("secret_token")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let mut state = shared.lock();
            if let Some(bot) = state.bots.get_mut(&token) {
                // Telegram treats an empty url as "remove the webhook".
                bot.webhook = (!url.is_empty()).then_some(WebhookInfo { url, secret_token });
            }
            ok_described(json!(true), "Webhook was set")
        }
        "deletewebhook" => {
            if let Some(bot) = shared.lock().bots.get_mut(&token) {
                bot.webhook = None;
            }
            ok_described(json!(true), "Webhook was deleted")
        }
        "getwebhookinfo" => {
            let url = shared
                .lock()
                .bots
                .get(&token)
                .and_then(|b| b.webhook.as_ref())
                .map(|w| w.url.clone())
                .unwrap_or_default();
            ok(json!({ "url": url, "has_custom_certificate": false, "pending_update_count": 0 }))
        }
        // sendChatAction, setMyCommands, deleteMyCommands and everything else.
        _ => ok(json!(true)),
    }
}

async fn send_message(shared: &Shared, token: &str, bot_id: i64, params: &Value) -> Response {
    let chat_id = match params.get("chat_id") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let Some(chat_id) = chat_id else {
        return error(StatusCode::BAD_REQUEST, "Bad Request: chat not found");
    };
    let text = params
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if text.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "Bad Request: message text is empty",
        );
    }

    let delay = shared.lock().send_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let message_id = {
        let mut state = shared.lock();
        if let Some((count, retry_after)) = state.limit_next_send.take() {
            if count > 1 {
                state.limit_next_send = Some((count - 1, retry_after));
            }
            let body = json!({
                "ok": false, "error_code": 429,
                "description": format!("Too Many Requests: retry after {retry_after}"),
                "parameters": {"retry_after": retry_after},
            });
            return (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        }
        if state.fail_next_send > 0 {
            state.fail_next_send -= 1;
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error: injected by fake Telegram",
            );
        }
        let Some(bot) = state.bots.get_mut(token) else {
            return unauthorized();
        };
        let message_id = bot.next_message_id;
        bot.next_message_id += 1;
        bot.sent.push(SentMessage {
            chat_id,
            text: text.clone(),
        });
        message_id
    };
    shared.sent.notify_waiters();

    ok(json!({
        "message_id": message_id,
        "from": {
            "id": bot_id,
            "is_bot": true,
            "first_name": "Fake",
            "username": format!("fake_{bot_id}_bot"),
        },
        "chat": { "id": chat_id, "type": "private" },
        "date": unix_now(),
        "text": text,
    }))
}

/// Merges query parameters and a JSON or form body into one JSON object (body wins).
fn params(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<Value, String> {
    let mut params = Map::new();
    if let Some(query) = query {
        for (k, v) in parse_form(query.as_bytes()) {
            params.insert(k, Value::String(v));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let is_blank = body.iter().all(u8::is_ascii_whitespace);
    if content_type.starts_with("application/json")
        || (content_type.is_empty() && !is_blank && body.first() == Some(&b'{'))
    {
        if !is_blank {
            match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(map)) => params.extend(map),
                Ok(_) => return Err("Bad Request: parameters must be a JSON object".into()),
                Err(e) => return Err(format!("Bad Request: can't parse JSON: {e}")),
            }
        }
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        for (k, v) in parse_form(body) {
            params.insert(k, Value::String(v));
        }
    }
    // Other bodies (multipart uploads) are accepted without reading their parameters.
    Ok(Value::Object(params))
}

/// Parses `application/x-www-form-urlencoded` pairs.
fn parse_form(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &pair[..0]),
            };
            (decode_component(k, true), decode_component(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes in a path segment.
fn percent_decode(s: &str) -> String {
    decode_component(s.as_bytes(), false)
}

fn decode_component(input: &[u8], plus_is_space: bool) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => match (
                input.get(i + 1).and_then(hex),
                input.get(i + 2).and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn ok(result: Value) -> Response {
    axum::Json(json!({ "ok": true, "result": result })).into_response()
}

fn ok_described(result: Value, description: &str) -> Response {
    axum::Json(json!({ "ok": true, "result": result, "description": description })).into_response()
}

fn error(status: StatusCode, description: &str) -> Response {
    let body = json!({ "ok": false, "error_code": status.as_u16(), "description": description });
    (status, axum::Json(body)).into_response()
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, "Unauthorized")
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Not Found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_pairs_are_decoded() {
        assert_eq!(
            parse_form(b"chat_id=42&text=hello+there%21&empty=&flag"),
            vec![
                ("chat_id".into(), "42".into()),
                ("text".into(), "hello there!".into()),
                ("empty".into(), String::new()),
                ("flag".into(), String::new()),
            ]
        );
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("123%3Aabc"), "123:abc");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b"), "a+b");
    }

    #[test]
    fn json_body_overrides_query() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let params = params(Some("a=1&b=2"), &headers, br#"{"b": 3}"#).unwrap();
        assert_eq!(params, json!({ "a": "1", "b": 3 }));
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let err = params(None, &headers, b"{nope").unwrap_err();
        assert!(err.starts_with("Bad Request: can't parse JSON"), "{err}");
    }
}
