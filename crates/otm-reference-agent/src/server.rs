//! The reference agent's HTTP server: `GET /healthz` and `POST /webhook`, and what happens to
//! one update.
//!
//! Updates are handled one at a time (otm delivers them in order, one at a time, anyway). For a
//! text message the webhook answers:
//! - 200 after the reply `#<n>: <text>` was sent, or when the update was answered before;
//! - 502 when `sendMessage` failed: the numbered reply stays pending in the state and is sent,
//!   with the same number, when the update is delivered again;
//! - 500 when the state cannot be written (nothing was counted or sent);
//! - 401 without the right `X-Telegram-Bot-Api-Secret-Token`, 400 for a body that is not an
//!   update.
//!
//! Other updates, and messages from users `OTM_AGENT_ALLOWED_USERS` does not list, are
//! acknowledged with 200 and otherwise ignored.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, oneshot};
use tracing::Instrument;

use crate::bot_api::BotApi;
use crate::config::Config;
use crate::error::Error;
use crate::state::{PendingReply, Seen, StateFile};

/// The header Telegram (and otm) put the webhook secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// Telegram updates are small; anything bigger is not one.
const BODY_LIMIT: usize = 1024 * 1024;

/// How long in-flight requests may take to finish after the stop signal; below the shim's stop
/// grace period, so the agent exits by itself rather than being killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A reference agent bound to its address with its state loaded, ready to [`run`].
///
/// [`run`]: ReferenceAgent::run
pub struct ReferenceAgent {
    listener: TcpListener,
    addr: SocketAddr,
    app: Arc<App>,
}

impl fmt::Debug for ReferenceAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReferenceAgent")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What the handlers share.
struct App {
    webhook_secret: String,
    probes: bool,
    allowed: crate::config::Allowed,
    bot: BotApi,
    /// Held for the whole handling of one update, so updates are processed one at a time.
    state: Mutex<StateFile>,
}

impl ReferenceAgent {
    /// Loads (or creates) the state and binds the webhook address. The agent is ready for
    /// requests as soon as [`ReferenceAgent::run`] is called.
    pub async fn bind(config: Config) -> Result<ReferenceAgent, Error> {
        let state = StateFile::open(&config.state_dir).await?;
        let pending = state.state().pending().len();
        if pending > 0 {
            tracing::info!(
                pending,
                "replies pending from before; sent when redelivered"
            );
        }
        let bot = BotApi::new(&config.bot_api_root, &config.bot_token)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let app = Arc::new(App {
            webhook_secret: config.webhook_secret,
            probes: config.probes,
            allowed: config.allowed,
            bot,
            state: Mutex::new(state),
        });
        Ok(ReferenceAgent {
            listener,
            addr,
            app,
        })
    }

    /// The address the webhook server listens on (useful when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish (for a few seconds
    /// at most) and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let ReferenceAgent {
            listener,
            addr,
            app,
        } = self;
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/webhook", post(webhook))
            .with_state(app)
            // Bound the body before it is buffered: an update is a few kilobytes.
            .layer(DefaultBodyLimit::max(BODY_LIMIT));

        let (stop, stopped) = oneshot::channel::<()>();
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future();
        tokio::pin!(server, shutdown);
        tracing::info!(%addr, "reference agent listening");

        tokio::select! {
            result = &mut server => return result.map_err(Error::Serve),
            () = &mut shutdown => {}
        }
        tracing::info!("stopping: finishing in-flight requests");
        let _ = stop.send(());
        match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
            Ok(result) => result.map_err(Error::Serve)?,
            Err(_) => tracing::warn!(
                timeout = ?DRAIN_TIMEOUT,
                "in-flight requests did not finish in time; stopping anyway"
            ),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn healthz() -> &'static str {
    "ok"
}

/// The parts of an update the agent reads.
#[derive(Deserialize)]
struct Update {
    update_id: i64,
    #[serde(default)]
    message: Option<serde_json::Value>,
}

impl Update {
    /// The sender (`message.from.id`) of a message.
    fn sender(&self) -> Option<i64> {
        self.message.as_ref()?.get("from")?.get("id")?.as_i64()
    }

    /// `(chat id, text)` of a text message; `None` for every other kind of update.
    fn text_message(&self) -> Option<(i64, &str)> {
        let message = self.message.as_ref()?;
        let text = message.get("text")?.as_str()?;
        let chat_id = message.get("chat")?.get("id")?.as_i64()?;
        Some((chat_id, text))
    }
}

async fn webhook(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if !secret_matches(&headers, &app.webhook_secret) {
        tracing::warn!("webhook refused: missing or wrong secret token header");
        return (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
    }
    let update: Update = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            tracing::warn!(error = %e, "webhook refused: body is not a Telegram update");
            return (
                StatusCode::BAD_REQUEST,
                format!("not a Telegram update: {e}\n"),
            )
                .into_response();
        }
    };
    let span = tracing::info_span!("update", update_id = update.update_id);
    // Run to completion even if the caller hangs up: a send cut off after Telegram accepted it
    // but before the state file says so would be sent again on redelivery.
    let task = tokio::spawn(async move { handle_update(&app, &update).instrument(span).await });
    match task.await {
        Ok(response) => response,
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("update handler failed: {e}\n"),
        )
            .into_response(),
    }
}

fn secret_matches(headers: &HeaderMap, secret: &str) -> bool {
    headers
        .get(SECRET_HEADER)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(secret.as_bytes())))
}

async fn handle_update(app: &App, update: &Update) -> Response {
    let mut state = app.state.lock().await;
    let update_id = update.update_id;
    let reply = match state.state().lookup(update_id) {
        Seen::Done => {
            tracing::info!("already answered; acknowledging again");
            return ok();
        }
        Seen::Pending(reply) => {
            tracing::info!(
                chat_id = reply.chat_id,
                "reply still pending; sending it again"
            );
            reply
        }
        Seen::New => {
            let Some((chat_id, text)) = update.text_message() else {
                tracing::debug!("not a text message; ignored");
                return ok();
            };
            if !update.sender().is_some_and(|u| app.allowed.allows(u)) {
                // Acknowledged, so that it is not delivered again; neither counted nor answered.
                tracing::info!(
                    sender = update.sender(),
                    "message from a user who is not allowed; ignored"
                );
                return ok();
            }
            let probed;
            let text = match text.strip_prefix("/sh ") {
                Some(command) if app.probes => {
                    probed = probe(command).await;
                    probed.as_str()
                }
                _ => text,
            };
            let before = state.state().clone();
            let reply = state.state_mut().record(update_id, chat_id, text);
            if let Err(e) = state.save().await {
                // Forget the decision: nothing was sent, so a redelivery starts over.
                *state.state_mut() = before;
                tracing::error!(error = %e, "cannot record the update; not answering it");
                return (StatusCode::INTERNAL_SERVER_ERROR, "cannot write state\n").into_response();
            }
            tracing::info!(
                chat_id,
                count = state.state().count(chat_id),
                "new text message"
            );
            reply
        }
    };
    send(app, &mut state, update_id, &reply).await
}

/// Runs one probe command with `sh -c` (30 s at most) and describes what happened:
/// `exit=<code>` and the first 3,000 bytes of its output.
async fn probe(command: &str) -> String {
    let run = tokio::process::Command::new("sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(30), run).await {
        Err(_) => "exit=timeout".to_owned(),
        Ok(Err(e)) => format!("exit=spawn-failed {e}"),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let mut end = text.len().min(3000);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let code = out
                .status
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "signal".into());
            format!("exit={code}\n{}", &text[..end])
        }
    }
}

/// Sends a recorded reply and confirms it.
async fn send(app: &App, state: &mut StateFile, update_id: i64, reply: &PendingReply) -> Response {
    if let Err(e) = app.bot.send_message(reply.chat_id, &reply.text).await {
        tracing::warn!(error = %e, "sendMessage failed; the reply stays pending");
        return (
            StatusCode::BAD_GATEWAY,
            format!("sendMessage failed: {e}\n"),
        )
            .into_response();
    }
    state.state_mut().confirm(update_id);
    if let Err(e) = state.save().await {
        // The reply went out and memory knows it; the next successful write records it. Only a
        // crash before then could send this same reply once more.
        tracing::warn!(error = %e, "reply sent, but recording that failed");
    }
    tracing::info!(chat_id = reply.chat_id, "reply sent");
    ok()
}

fn ok() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}
