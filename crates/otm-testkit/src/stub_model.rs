//! A stub OpenAI-compatible model server for tests: `POST /v1/chat/completions`, streaming (SSE)
//! and not, on `127.0.0.1:0`.
//!
//! Its answer proves what the agent remembered: it counts the earlier user turns in the
//! conversation it was sent and says so, e.g. `earlier user turns: 2 | you said: hello`. An agent
//! that lost its conversation state across a sleep answers with a smaller count.
//!
//! OpenClaw's requests look like this: a long system prompt, then the conversation (user and
//! assistant messages, oldest first), then the current user message, then one more user message
//! of internal context (`<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>`). Each user message starts with a
//! metadata block (`Conversation info: … ```json … ``` `) before the user's own text. The stub
//! leaves internal-context messages out, takes the last remaining user message as the current
//! one and counts the user messages before it.
//!
//! Every request that arrives, on any route, is recorded as `METHOD /path`
//! ([`StubModel::arrivals`]). Every chat completion request is recorded with the `Authorization`
//! header it carried
//! ([`StubModel::requests`]), so a test can check which key reached the provider. With
//! [`StubModel::require_key`] any other key is refused with 401, as a real provider would.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// The marker OpenClaw puts at the start of its internal-context user message.
const INTERNAL_CONTEXT: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";

/// One chat completion request the stub answered (or refused).
#[derive(Clone, Debug)]
pub struct ModelRequest {
    /// The `Authorization` header as sent, e.g. `Bearer sk-…`.
    pub authorization: Option<String>,
    /// The `model` field.
    pub model: String,
    /// Whether an SSE stream was asked for.
    pub stream: bool,
    /// The user's text of the current turn, metadata removed.
    pub user_text: String,
    /// User turns before the current one.
    pub earlier_user_turns: usize,
    /// The reply sent; empty when the request was refused.
    pub reply: String,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<StubState>,
    seen: Notify,
}

#[derive(Debug, Default)]
struct StubState {
    requests: Vec<ModelRequest>,
    /// Every request that arrived, any route: `METHOD /path`.
    arrived: Vec<String>,
    required_key: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, StubState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The stub model server. See the [module docs](self). Stops when dropped.
pub struct StubModel {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for StubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubModel")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The model id the stub lists under `GET /v1/models` (any id is answered).
pub const STUB_MODEL_ID: &str = "stub-1";

impl StubModel {
    /// Starts the server on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> StubModel {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("stub model: cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("stub model: local address");
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "stub model server failed");
            }
        });
        StubModel {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The OpenAI-style base URL, e.g. `http://127.0.0.1:40123/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Refuses (401) every request whose `Authorization` is not `Bearer <key>`.
    pub fn require_key(&self, key: &str) {
        self.shared.lock().required_key = Some(key.to_owned());
    }

    /// Every chat completion request so far, oldest first.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every request that arrived, on any route, as `METHOD /path` (the path as sent, query
    /// left out), oldest first: what a test checks to prove a call never reached the provider.
    pub fn arrivals(&self) -> Vec<String> {
        self.shared.lock().arrived.clone()
    }

    /// Waits until at least `n` requests were seen or `timeout` passes; returns them all.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: std::time::Duration,
    ) -> Vec<ModelRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.seen.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests();
            }
        }
    }

    /// Stops the server and waits until it has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StubModel {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The reply the stub gives to a conversation with `earlier` user turns before the current one.
pub fn reply_text(earlier: usize, user_text: &str) -> String {
    let said: String = user_text.chars().take(200).collect();
    format!("earlier user turns: {earlier} | you said: {said}")
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared
        .lock()
        .arrived
        .push(format!("{method} {}", uri.path()));
    let path = uri.path().trim_end_matches('/');
    match (method, path) {
        (Method::GET, "/v1/models") => axum::Json(json!({
            "object": "list",
            "data": [{"id": STUB_MODEL_ID, "object": "model", "created": 0, "owned_by": "otm-testkit"}]
        }))
        .into_response(),
        (Method::POST, "/v1/chat/completions") => completions(&shared, &headers, &body),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

fn completions(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the body must be a JSON object",
            );
        }
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(STUB_MODEL_ID)
        .to_owned();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (earlier, user_text) = conversation(&messages);
    let mut record = ModelRequest {
        authorization,
        model: model.clone(),
        stream,
        user_text,
        earlier_user_turns: earlier,
        reply: String::new(),
    };

    let refused = {
        let state = shared.lock();
        state
            .required_key
            .as_ref()
            .is_some_and(|k| record.authorization.as_deref() != Some(&format!("Bearer {k}")))
    };
    if refused {
        shared.lock().requests.push(record);
        shared.seen.notify_waiters();
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    let reply = reply_text(earlier, &record.user_text);
    record.reply = reply.clone();
    shared.lock().requests.push(record);
    shared.seen.notify_waiters();

    let created = crate::updates::unix_now();
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18});
    if !stream {
        return axum::Json(json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    // Server-sent events, as OpenAI streams them: a role chunk, content chunks, a finish chunk,
    // a usage chunk, then `[DONE]`.
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let words: Vec<&str> = reply.split_inclusive(' ').collect();
    for part in words.chunks(4) {
        events.push(chunk(json!({"content": part.concat()}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage}));
    let mut sse = String::new();
    for e in events {
        sse.push_str("data: ");
        sse.push_str(&e.to_string());
        sse.push_str("\n\n");
    }
    sse.push_str("data: [DONE]\n\n");
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        sse,
    )
        .into_response()
}

/// The number of user turns before the current one, and the current user text.
fn conversation(messages: &[Value]) -> (usize, String) {
    let user_texts: Vec<String> = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
        .filter(|t| !t.trim_start().starts_with(INTERNAL_CONTEXT))
        .collect();
    match user_texts.split_last() {
        Some((current, earlier)) => (earlier.len(), user_said(current)),
        None => (0, String::new()),
    }
}

/// The text of a message's content: a string, or the text parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The user's own words in an OpenClaw user message: after the metadata block that ends with a
/// ``` line, before the `Runtime:` line. Text without such a block is taken whole.
fn user_said(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let fences: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("```"))
        .map(|(i, _)| i)
        .collect();
    let body = if fences.len() >= 2 && text.contains("Conversation info") {
        &lines[fences[1] + 1..]
    } else {
        &lines[..]
    };
    body.iter()
        .take_while(|l| !l.starts_with("Runtime:"))
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": kind}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openclaw_user(text: &str) -> Value {
        json!({"role": "user", "content": format!(
            "[Sat 2026-11-28 12:44 UTC] Conversation info: x\n```json\n{{\"sender\":{{\"id\":\"42\"}}}}\n```\n\n{text}\n\nRuntime: agent=main | session=agent:main:main"
        )})
    }

    fn internal() -> Value {
        json!({"role": "user", "content": [{"type": "text", "text": format!("{INTERNAL_CONTEXT}\nConversation data")}]})
    }

    #[test]
    fn counts_earlier_user_turns_and_reads_the_users_words() {
        let first = vec![
            json!({"role": "system", "content": "You are…"}),
            openclaw_user("hello there"),
            internal(),
        ];
        assert_eq!(conversation(&first), (0, "hello there".to_owned()));
        let third = vec![
            json!({"role": "system", "content": "You are…"}),
            openclaw_user("one"),
            json!({"role": "assistant", "content": "r1"}),
            openclaw_user("two"),
            json!({"role": "assistant", "content": "r2"}),
            openclaw_user("three"),
            internal(),
        ];
        assert_eq!(conversation(&third), (2, "three".to_owned()));
        let plain = vec![json!({"role": "user", "content": "hi"})];
        assert_eq!(conversation(&plain), (0, "hi".to_owned()));
    }

    #[tokio::test]
    async fn streams_sse_and_checks_the_key() {
        let stub = StubModel::start().await;
        stub.require_key("sk-real");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let body = json!({"model": "stub-1", "stream": true, "messages": [openclaw_user("hey"), internal()]});
        let url = format!("{}/chat/completions", stub.base_url());
        let refused = http
            .post(&url)
            .bearer_auth("sk-wrong")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        let resp = http
            .post(&url)
            .bearer_auth("sk-real")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let content: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(content, "earlier user turns: 0 | you said: hey");
        let seen = stub.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-wrong"));
        assert!(seen[0].reply.is_empty());
        assert_eq!(seen[1].authorization.as_deref(), Some("Bearer sk-real"));

        let plain = json!({"model": "stub-1", "messages": [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]});
        let v: Value = http
            .post(&url)
            .bearer_auth("sk-real")
            .json(&plain)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "earlier user turns: 1 | you said: c"
        );
    }
}
