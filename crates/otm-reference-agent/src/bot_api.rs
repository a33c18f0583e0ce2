//! The agent's one Bot API call, `sendMessage`, against `{root}/bot{token}/sendMessage`.
//!
//! The token is part of every URL, so no URL is ever logged or put into an error: transport
//! errors are stripped of theirs.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::error::Error;

/// How long one `sendMessage` may take; below the shim's delivery timeout.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// A Bot API client for one bot.
pub(crate) struct BotApi {
    http: reqwest::Client,
    /// `{root}/bot{token}/sendMessage`. Secret: contains the token.
    send_message_url: String,
}

impl fmt::Debug for BotApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BotApi").finish_non_exhaustive()
    }
}

/// Why `sendMessage` failed. Carries no URL and no token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The request or its answer did not get through; the text is the error chain.
    #[error("Bot API unreachable: {0}")]
    Transport(String),
    #[error("Bot API refused sendMessage: HTTP {status}: {description}")]
    Refused { status: u16, description: String },
    #[error("Bot API answered HTTP {status} with a body that is not a Bot API answer")]
    Malformed { status: u16 },
}

/// A transport error with its causes (`error sending request: ...: Connection refused`), and
/// without the URL, which holds the token.
fn transport(e: reqwest::Error) -> SendError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    SendError::Transport(text)
}

#[derive(Deserialize)]
struct ApiAnswer {
    ok: bool,
    #[serde(default)]
    description: Option<String>,
}

impl BotApi {
    pub(crate) fn new(root: &str, token: &str) -> Result<BotApi, Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            // The API root is otm's local Bot API proxy: never route it through an HTTP proxy
            // from the environment.
            .no_proxy();
        if root.starts_with("http://") {
            // Plain HTTP needs no certificate: loading the system's CA store would take a few
            // milliseconds of every start.
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let http = builder
            .build()
            .map_err(|e| Error::HttpClient(e.without_url()))?;
        let root = root.trim_end_matches('/');
        Ok(BotApi {
            http,
            send_message_url: format!("{root}/bot{token}/sendMessage"),
        })
    }

    /// Sends `text` to `chat_id`; succeeds only on a 2xx answer with `"ok": true`.
    pub(crate) async fn send_message(&self, chat_id: i64, text: &str) -> Result<(), SendError> {
        let response = self
            .http
            .post(&self.send_message_url)
            .json(&json!({ "chat_id": chat_id, "text": text }))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        let answer: ApiAnswer =
            serde_json::from_slice(&body).map_err(|_| SendError::Malformed {
                status: status.as_u16(),
            })?;
        if status.is_success() && answer.ok {
            Ok(())
        } else {
            Err(SendError::Refused {
                status: status.as_u16(),
                description: answer
                    .description
                    .unwrap_or_else(|| "no description".into()),
            })
        }
    }
}
