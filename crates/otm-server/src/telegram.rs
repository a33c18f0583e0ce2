//! A small client for the real Telegram Bot API: webhook registration and cold-start notices.
//! Every error is stripped of the request URL, which carries the bot token.

use otm_core::Secret;
use serde_json::{Value, json};
use std::time::Duration;

/// The Bot API at one root URL.
#[derive(Clone, Debug)]
pub struct Telegram {
    root: String,
    http: reqwest::Client,
}

/// A Bot API call that failed; never contains the token.
#[derive(Debug, thiserror::Error)]
#[error("Telegram {method} failed: {message}")]
pub struct TelegramError {
    pub method: String,
    pub message: String,
}

impl Telegram {
    pub fn new(root: &str, http: reqwest::Client) -> Self {
        Telegram {
            root: root.trim_end_matches('/').to_owned(),
            http,
        }
    }

    /// The root URL.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Calls one method with JSON parameters and returns `result`.
    pub async fn call(
        &self,
        token: &Secret,
        method: &str,
        params: Value,
    ) -> Result<Value, TelegramError> {
        let err = |message: String| TelegramError {
            method: method.to_owned(),
            message,
        };
        let url = format!("{}/bot{}/{method}", self.root, token.expose());
        let resp = self
            .http
            .post(url)
            .json(&params)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| err(e.without_url().to_string()))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| err(format!("{status}: {}", e.without_url())))?;
        if body["ok"].as_bool() == Some(true) {
            Ok(body["result"].clone())
        } else {
            let description = body["description"].as_str().unwrap_or("no description");
            Err(err(format!("{status}: {description}")))
        }
    }

    /// Points the bot's webhook at `url` with `secret`.
    pub async fn set_webhook(
        &self,
        token: &Secret,
        url: &str,
        secret: &Secret,
    ) -> Result<(), TelegramError> {
        self.call(
            token,
            "setWebhook",
            json!({"url": url, "secret_token": secret.expose(), "allowed_updates": []}),
        )
        .await
        .map(drop)
    }

    /// Removes the bot's webhook.
    pub async fn delete_webhook(&self, token: &Secret) -> Result<(), TelegramError> {
        self.call(token, "deleteWebhook", json!({})).await.map(drop)
    }

    /// Sends a plain text message.
    pub async fn send_message(
        &self,
        token: &Secret,
        chat_id: i64,
        text: &str,
    ) -> Result<(), TelegramError> {
        self.call(
            token,
            "sendMessage",
            json!({"chat_id": chat_id, "text": text}),
        )
        .await
        .map(drop)
    }
}
