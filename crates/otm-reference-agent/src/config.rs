//! The reference agent's configuration: the `OTM_*` environment variables `otm shim` sets.
//!
//! The bot token and the webhook secret are never shown: not in [`Config`]'s `Debug`, not in a
//! [`ConfigError`], not in a log line.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Address of the webhook server, e.g. `127.0.0.1:41234`.
pub const ENV_LISTEN: &str = "OTM_AGENT_LISTEN";
/// The state directory (writable; created when missing).
pub const ENV_STATE_DIR: &str = "OTM_AGENT_STATE_DIR";
/// Bot API root URL without `/bot<token>`, e.g. `http://127.0.0.1:8082`.
pub const ENV_BOT_API_ROOT: &str = "OTM_BOT_API_ROOT";
/// The bot token used in `{root}/bot{token}/{method}` URLs (a surrogate token under otm).
pub const ENV_BOT_TOKEN: &str = "OTM_BOT_TOKEN";
/// The required value of `X-Telegram-Bot-Api-Secret-Token` on incoming webhooks.
pub const ENV_WEBHOOK_SECRET: &str = "OTM_WEBHOOK_SECRET";
/// Turns probe mode on when `1`.
pub const ENV_PROBES: &str = "OTM_AGENT_PROBES";
/// Who may write to the agent: Telegram user ids joined by commas, or `*`; empty for nobody.
/// Unset: anyone (the reference agent has no tools).
pub const ENV_ALLOWED_USERS: &str = "OTM_AGENT_ALLOWED_USERS";

/// Whose messages the agent answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    Anyone,
    /// These Telegram user ids (`from.id`); empty: nobody.
    Users(Vec<i64>),
}

impl Allowed {
    /// Reads [`ENV_ALLOWED_USERS`]'s value.
    pub fn parse(value: Option<&str>) -> Result<Allowed, ConfigError> {
        let Some(v) = value else {
            return Ok(Allowed::Anyone);
        };
        let mut users = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "*" {
                return Ok(Allowed::Anyone);
            }
            users.push(part.parse().map_err(|_| ConfigError::Invalid {
                name: ENV_ALLOWED_USERS,
                reason: format!("`{part}` is not a Telegram user id or `*`"),
            })?);
        }
        Ok(Allowed::Users(users))
    }

    pub fn allows(&self, user: i64) -> bool {
        match self {
            Allowed::Anyone => true,
            Allowed::Users(ids) => ids.contains(&user),
        }
    }
}

/// Every variable the agent reads, in the order they are reported.
pub const REQUIRED_ENV: [&str; 5] = [
    ENV_LISTEN,
    ENV_STATE_DIR,
    ENV_BOT_API_ROOT,
    ENV_BOT_TOKEN,
    ENV_WEBHOOK_SECRET,
];

/// Everything the agent needs to run.
#[derive(Clone)]
pub struct Config {
    /// Where the webhook server listens; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The state directory; created when missing.
    pub state_dir: PathBuf,
    /// Bot API root, `http(s)://host[:port][/path]`, without a trailing slash.
    pub bot_api_root: String,
    /// The bot token (secret).
    pub bot_token: String,
    /// The webhook secret (secret).
    pub webhook_secret: String,
    /// Probe mode (`OTM_AGENT_PROBES=1`): a message `/sh <command>` runs the command with
    /// `sh -c` and answers its exit status and output, the way an agent's shell tool would.
    /// For testing sandboxes only: whoever writes to the bot gets a shell.
    pub probes: bool,
    /// Whose messages are answered ([`ENV_ALLOWED_USERS`]).
    pub allowed: Allowed,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("bot_api_root", &self.bot_api_root)
            .field("bot_token", &"<redacted>")
            .field("webhook_secret", &"<redacted>")
            .finish()
    }
}

/// A missing or invalid configuration. Messages never contain a secret value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Required variables are unset or empty.
    #[error(
        "missing required environment variable(s): {}; `otm shim` sets them when it starts the agent",
        names.join(", ")
    )]
    Missing { names: Vec<&'static str> },
    /// A variable is set but unusable.
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable name to its value), so it can be
    /// checked without touching the process environment. All missing variables are reported at
    /// once; empty values count as missing.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut missing = Vec::new();
        let mut take = |name: &'static str| {
            let value = lookup(name).filter(|v| !v.trim().is_empty());
            if value.is_none() {
                missing.push(name);
            }
            value.unwrap_or_default()
        };
        let listen = take(ENV_LISTEN);
        let state_dir = take(ENV_STATE_DIR);
        let root = take(ENV_BOT_API_ROOT);
        let bot_token = take(ENV_BOT_TOKEN);
        let webhook_secret = take(ENV_WEBHOOK_SECRET);
        let probes = lookup(ENV_PROBES).is_some_and(|v| v.trim() == "1");
        let allowed = Allowed::parse(lookup(ENV_ALLOWED_USERS).as_deref());
        if !missing.is_empty() {
            return Err(ConfigError::Missing { names: missing });
        }

        let listen = listen
            .trim()
            .parse::<SocketAddr>()
            .map_err(|_| ConfigError::Invalid {
                name: ENV_LISTEN,
                reason: format!(
                    "expected an IP address and port like 127.0.0.1:41234, got {listen:?}"
                ),
            })?;
        let bot_api_root = parse_root(root.trim())?;
        if bot_token.contains(['/', '?', '#']) || bot_token.chars().any(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                name: ENV_BOT_TOKEN,
                reason: "a bot token contains no '/', '?', '#' or whitespace".into(),
            });
        }
        Ok(Config {
            listen,
            state_dir: PathBuf::from(state_dir),
            bot_api_root,
            bot_token,
            webhook_secret,
            probes,
            allowed: allowed?,
        })
    }
}

fn parse_root(root: &str) -> Result<String, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: ENV_BOT_API_ROOT,
        reason,
    };
    let url = reqwest::Url::parse(root)
        .map_err(|e| invalid(format!("expected a URL like http://127.0.0.1:8082: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "expected an http or https URL, got scheme {:?}",
            url.scheme()
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("the API root takes no query or fragment".into()));
    }
    if url.path().contains("/bot") {
        return Err(invalid(
            "give the API root without /bot<token>; the agent adds it".into(),
        ));
    }
    Ok(root.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn full() -> Vec<(&'static str, &'static str)> {
        vec![
            (ENV_LISTEN, "127.0.0.1:41234"),
            (ENV_STATE_DIR, "/var/lib/agent"),
            (ENV_BOT_API_ROOT, "http://127.0.0.1:8082/"),
            (ENV_BOT_TOKEN, "123:surrogate-token-value"),
            (ENV_WEBHOOK_SECRET, "webhook-secret-value"),
        ]
    }

    #[test]
    fn reads_every_variable() {
        let config = Config::from_lookup(env(&full())).unwrap();
        assert_eq!(config.listen, "127.0.0.1:41234".parse().unwrap());
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/agent"));
        assert_eq!(config.bot_api_root, "http://127.0.0.1:8082");
        assert_eq!(config.bot_token, "123:surrogate-token-value");
        assert_eq!(config.webhook_secret, "webhook-secret-value");
    }

    #[test]
    fn reports_all_missing_variables_at_once() {
        let mut pairs = full();
        pairs.retain(|(k, _)| *k != ENV_BOT_TOKEN && *k != ENV_LISTEN);
        pairs.push((ENV_WEBHOOK_SECRET, ""));
        let err = Config::from_lookup(env(&pairs)).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("OTM_AGENT_LISTEN, OTM_BOT_TOKEN, OTM_WEBHOOK_SECRET"),
            "{message}"
        );
    }

    #[test]
    fn rejects_a_bad_listen_address() {
        let mut pairs = full();
        pairs[0] = (ENV_LISTEN, "localhost");
        let err = Config::from_lookup(env(&pairs)).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    name: ENV_LISTEN,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_a_root_that_is_no_http_url_or_has_the_token() {
        for root in [
            "127.0.0.1:8082",
            "ftp://x",
            "http://x/bot123:abc",
            "http://x/?a=b",
        ] {
            let mut pairs = full();
            pairs[2] = (ENV_BOT_API_ROOT, root);
            let err = Config::from_lookup(env(&pairs)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        name: ENV_BOT_API_ROOT,
                        ..
                    }
                ),
                "{root}"
            );
        }
    }

    #[test]
    fn secrets_appear_in_no_debug_output_or_error() {
        let config = Config::from_lookup(env(&full())).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("surrogate-token-value"), "{debug}");
        assert!(!debug.contains("webhook-secret-value"), "{debug}");

        let mut pairs = full();
        pairs[3] = (ENV_BOT_TOKEN, "123:has/slash-secret");
        let err = Config::from_lookup(env(&pairs)).unwrap_err().to_string();
        assert!(err.contains(ENV_BOT_TOKEN), "{err}");
        assert!(!err.contains("has/slash-secret"), "{err}");
    }
}
