//! Server settings: defaults, the optional TOML file, and validation before anything binds.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything `otm server` can be told. Flags and `OTM_*` variables override the TOML file,
/// which overrides the defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Public listener: Telegram webhooks and `/healthz`.
    pub listen: String,
    /// Admin listener: `/v1/` and `/metrics`.
    pub admin_listen: String,
    /// Egress listener: the Bot API proxy agents call.
    pub egress_listen: String,
    /// The egress proxy's root URL as agents see it; derived from the egress listener when unset.
    pub egress_url: Option<String>,
    /// Where the embedded registry, snapshots and instances live.
    pub data_dir: PathBuf,
    /// The real Telegram Bot API root.
    pub telegram_api: String,
    /// This server's public URL; when set, tenants' webhooks are registered with Telegram.
    pub public_url: Option<String>,
    /// Registry URL; `sqlite://<data-dir>/otm.db` when unset.
    pub registry: Option<String>,
    /// Coordinator URL; `memory` when unset.
    pub coordinator: Option<String>,
    /// State store URL; `file://<data-dir>/state` when unset.
    pub state: Option<String>,
    /// `auto` (bubblewrap, refusing to start without it), `bubblewrap`, or `none` (development
    /// only: instances are not isolated).
    pub sandbox: String,
    /// First uid of the range instances run as when otm runs as root (65,536 from there).
    pub sandbox_uid_base: u32,
    /// Accept tenants on the `probe` profile (a shell for whoever writes to the bot; for
    /// testing sandboxes).
    pub allow_probe_profile: bool,
    /// The `otm` binary instances run as `otm shim`; this executable when unset.
    pub otm_binary: Option<PathBuf>,
    /// Failed deliveries of one update before it moves to the dead-letter list.
    pub max_delivery_attempts: u32,
    /// How long an agent may take to become ready, seconds.
    pub wake_timeout_s: u64,
    /// Seconds between snapshots of running tenants; 0 turns periodic snapshots off.
    pub snapshot_interval_s: u64,
    /// Snapshots kept per tenant (the head always among them).
    pub snapshot_keep: usize,
    /// `all` (everything in one process), `router` (webhooks, inboxes, dispatch, Bot API proxy) or
    /// `orchestrator` (admin API, wakes, stops, reaper, warm pool, reconciler).
    pub role: String,
    /// Orchestrator base URLs a router calls, comma-separated; tried in turn.
    pub orchestrator_url: Option<String>,
    /// The token routers and orchestrators present to each other.
    pub service_token: Option<otm_core::Secret>,
    /// Time-to-live of the wake lock and of dispatcher leases, renewed while held, seconds. A
    /// replica that dies holding one blocks that tenant for at most this long.
    pub lease_ttl_s: u64,
    /// How long a delivered update's id is kept for deduplication (Telegram redelivers for up
    /// to a day), seconds; its payload is dropped at delivery already.
    pub dedupe_window_s: u64,
    /// Where `scripts/install-openclaw` put Node 24 and OpenClaw (`bin/openclaw`) for tenants on
    /// the `openclaw` profile; when unset, `<data-dir>/openclaw`, then `openclaw` on `PATH`.
    pub openclaw_prefix: Option<PathBuf>,
    /// A JSON5 template of the OpenClaw gateway config; otm's built-in one when unset.
    pub openclaw_config_template: Option<PathBuf>,
    /// The model provider's OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`.
    /// Agents reach it through the egress listener, which adds the API key.
    pub model_base_url: Option<String>,
    /// The model id at that provider.
    pub model_id: Option<String>,
    /// The provider's API key: added upstream by the egress listener, never given to instances.
    pub model_api_key: Option<otm_core::Secret>,
    /// Model requests a minute each tenant may make, unless it has its own budget.
    pub model_requests_per_minute: Option<u32>,
    /// Model tokens a UTC day each tenant may use, unless it has its own budget.
    pub model_tokens_per_day: Option<u64>,
    /// Messages a second each bot may send through the Bot API proxy (0: no limit).
    pub bot_messages_per_second: u32,
    /// Least milliseconds between two messages of one bot to one chat (0: no limit).
    pub bot_chat_interval_ms: u64,
    /// Messages a minute one bot may send to one group chat (0: no limit).
    pub bot_group_messages_per_minute: u32,
    /// The key file that encrypts tenants' secrets at rest and signs shim tokens and cached
    /// endpoints; `<data-dir>/secret.key`, generated on first start, when unset. Every replica
    /// of a fleet needs the same file.
    pub secret_key_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:8081".into(),
            egress_listen: "127.0.0.1:8082".into(),
            egress_url: None,
            data_dir: PathBuf::from("./otm-data"),
            telegram_api: "https://api.telegram.org".into(),
            public_url: None,
            registry: None,
            coordinator: None,
            state: None,
            sandbox: "auto".into(),
            sandbox_uid_base: otm_runtime::local::DEFAULT_UID_BASE,
            allow_probe_profile: false,
            otm_binary: None,
            max_delivery_attempts: 10,
            wake_timeout_s: 120,
            snapshot_interval_s: 300,
            snapshot_keep: 5,
            role: "all".into(),
            orchestrator_url: None,
            service_token: None,
            lease_ttl_s: 15,
            dedupe_window_s: 86_400,
            openclaw_prefix: None,
            openclaw_config_template: None,
            model_base_url: None,
            model_id: None,
            model_api_key: None,
            model_requests_per_minute: None,
            model_tokens_per_day: None,
            bot_messages_per_second: 30,
            bot_chat_interval_ms: 1000,
            bot_group_messages_per_minute: 20,
            secret_key_file: None,
        }
    }
}

/// A setting that cannot work; the message names it and says what is expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{name}`: {message}")]
pub struct InvalidSetting {
    pub name: &'static str,
    pub message: String,
}

fn invalid(name: &'static str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        name,
        message: message.into(),
    }
}

/// Listener addresses after validation.
#[derive(Clone, Copy, Debug)]
pub struct Listeners {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub egress: SocketAddr,
}

impl Settings {
    /// Reads a TOML file of settings.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, InvalidSetting> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("config", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| invalid("config", format!("{}: {e}", path.display())))
    }

    /// Checks every setting; returns the listener addresses to bind.
    pub fn validate(&self) -> Result<Listeners, InvalidSetting> {
        let addr = |name: &'static str, v: &str| -> Result<SocketAddr, InvalidSetting> {
            v.parse()
                .map_err(|_| invalid(name, format!("`{v}` is not an address like 127.0.0.1:8080")))
        };
        let listeners = Listeners {
            public: addr("listen", &self.listen)?,
            admin: addr("admin-listen", &self.admin_listen)?,
            egress: addr("egress-listen", &self.egress_listen)?,
        };
        let distinct = [listeners.public, listeners.admin, listeners.egress];
        for (i, a) in distinct.iter().enumerate() {
            if a.port() != 0
                && distinct[..i]
                    .iter()
                    .any(|b| b.port() == a.port() && b.ip() == a.ip())
            {
                return Err(invalid(
                    "listen",
                    format!("{a} is used by two listeners; give each its own port"),
                ));
            }
        }
        check_url("telegram-api", &self.telegram_api)?;
        if let Some(u) = &self.public_url {
            check_url("public-url", u)?;
        }
        if let Some(u) = &self.egress_url {
            check_url("egress-url", u)?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data-dir", "must not be empty"));
        }
        if !matches!(self.sandbox.as_str(), "auto" | "bubblewrap" | "none") {
            return Err(invalid(
                "sandbox",
                format!("`{}` is not one of auto, bubblewrap, none", self.sandbox),
            ));
        }
        // Fail closed: no sandbox is never chosen for the operator.
        if self.sandbox != "none"
            && self.runs_orchestrator()
            && otm_shim::sandbox::bwrap().is_none()
        {
            return Err(invalid(
                "sandbox",
                "bubblewrap (`bwrap`) is not installed, and otm does not run instances without a sandbox: install it \
                 (Debian and Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or for development \
                 only start with --sandbox none",
            ));
        }
        // Nothing shown to instances may contain the data directory (checked again by the
        // runtime; here so that nothing is created first).
        if self.sandbox != "none" && self.runs_orchestrator() {
            let binary = self
                .otm_binary
                .clone()
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_default();
            let read_only = crate::openclaw::locate(self)
                .map(|i| i.read_only)
                .unwrap_or_default();
            if let Err(e) =
                otm_runtime::local::check_shown_paths(&self.data_dir, &binary, &read_only)
            {
                let message = e.to_string();
                return Err(invalid(
                    "data-dir",
                    message
                        .strip_prefix("invalid input: ")
                        .unwrap_or(&message)
                        .to_owned(),
                ));
            }
        }
        if self.max_delivery_attempts == 0 {
            return Err(invalid("max-delivery-attempts", "must be at least 1"));
        }
        match self.role.as_str() {
            "all" => {}
            "router" => {
                let urls = self.orchestrator_urls();
                if urls.is_empty() {
                    return Err(invalid(
                        "orchestrator-url",
                        "the router role needs the orchestrators' URLs",
                    ));
                }
                for u in &urls {
                    check_url("orchestrator-url", u)?;
                }
                if self.service_token.is_none() {
                    return Err(invalid(
                        "service-token",
                        "the router role needs OTM_SERVICE_TOKEN, shared with the orchestrators",
                    ));
                }
            }
            "orchestrator" => {
                if self.service_token.is_none() {
                    return Err(invalid(
                        "service-token",
                        "the orchestrator role needs OTM_SERVICE_TOKEN, shared with the routers",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "role",
                    format!("`{other}` is not one of all, router, orchestrator"),
                ));
            }
        }
        // Replicas read each other's ciphertexts, shim tokens and cached endpoints: a key file
        // generated into one replica's data directory would lock the others out.
        if self.role != "all" && self.secret_key_file.is_none() {
            return Err(invalid(
                "secret-key-file",
                format!(
                    "the {} role needs OTM_SECRET_KEY_FILE (--secret-key-file), the same file on every replica; \
                     make one with `otm secrets keygen FILE`",
                    self.role
                ),
            ));
        }
        if self.lease_ttl_s < 2 {
            return Err(invalid("lease-ttl-s", "must be at least 2"));
        }
        if self.dedupe_window_s == 0 {
            return Err(invalid(
                "dedupe-window-s",
                "must be at least 1 (Telegram redelivers for up to a day; 86400 is the default)",
            ));
        }
        if self.snapshot_keep == 0 {
            return Err(invalid("snapshot-keep", "must be at least 1"));
        }
        if self.wake_timeout_s == 0 {
            return Err(invalid("wake-timeout-s", "must be at least 1"));
        }
        self.validate_openclaw()?;
        Ok(listeners)
    }
}

impl Settings {
    /// The `openclaw` profile's settings: the model, the install prefix, the config template.
    fn validate_openclaw(&self) -> Result<(), InvalidSetting> {
        match (&self.model_base_url, &self.model_id) {
            (Some(u), Some(id)) => {
                check_url("model-base-url", u)?;
                if id.trim().is_empty() {
                    return Err(invalid("model-id", "must not be empty"));
                }
            }
            (Some(_), None) => return Err(invalid("model-id", "is needed with --model-base-url")),
            (None, Some(_)) => return Err(invalid("model-base-url", "is needed with --model-id")),
            (None, None) => {}
        }
        if !self.runs_orchestrator() {
            return Ok(());
        }
        if let Some(prefix) = &self.openclaw_prefix
            && !prefix.join("bin/openclaw").is_file()
        {
            return Err(invalid(
                "openclaw-prefix",
                format!(
                    "{} has no bin/openclaw; install it with scripts/install-openclaw --prefix {0}",
                    prefix.display()
                ),
            ));
        }
        if let Some(path) = &self.openclaw_config_template {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "openclaw-config-template",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            otm_shim::profile::openclaw::check_template(&text).map_err(|e| {
                invalid(
                    "openclaw-config-template",
                    format!("{}: {e}", path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// The orchestrator URLs, split and trimmed.
    pub fn orchestrator_urls(&self) -> Vec<String> {
        self.orchestrator_url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Whether this process runs the router's part.
    pub fn runs_router(&self) -> bool {
        self.role != "orchestrator"
    }

    /// Whether this process runs the orchestrator's part.
    pub fn runs_orchestrator(&self) -> bool {
        self.role != "router"
    }
}

fn check_url(name: &'static str, v: &str) -> Result<(), InvalidSetting> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err(invalid(
            name,
            format!("`{v}` is not an http:// or https:// URL"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let l = Settings::default().validate().unwrap();
        assert_eq!(l.public.port(), 8080);
        assert_eq!(l.admin.port(), 8081);
        assert_eq!(l.egress.port(), 8082);
    }

    #[test]
    fn bad_settings_name_themselves() {
        let s = Settings {
            listen: "nope".into(),
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().name, "listen");
        let s = Settings {
            telegram_api: "ftp://x".into(),
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().name, "telegram-api");
        let s = Settings {
            admin_listen: "127.0.0.1:8080".into(),
            ..Settings::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn model_and_openclaw_settings_are_checked() {
        let s = Settings {
            model_base_url: Some("http://127.0.0.1:9/v1".into()),
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().name, "model-id");
        let s = Settings {
            model_base_url: Some("nope".into()),
            model_id: Some("m".into()),
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().name, "model-base-url");
        let s = Settings {
            openclaw_prefix: Some("/nonexistent/otm-openclaw".into()),
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().name, "openclaw-prefix");
        let bad =
            std::env::temp_dir().join(format!("otm-bad-template-{}.json5", std::process::id()));
        std::fs::write(&bad, "{ gateway: { port: {{gateway_prot}} } }").unwrap();
        let s = Settings {
            openclaw_config_template: Some(bad.clone()),
            ..Settings::default()
        };
        let e = s.validate().unwrap_err();
        let _ = std::fs::remove_file(&bad);
        assert_eq!(e.name, "openclaw-config-template");
        assert!(e.message.contains("gateway_prot"), "{e}");
        let s: Settings = toml::from_str("model_base_url = \"https://api.example.test/v1\"\nmodel_id = \"m-1\"\nmodel_api_key = \"sk-1\"").unwrap();
        s.validate().unwrap();
        assert!(!format!("{s:?}").contains("sk-1"), "the key never prints");
    }

    #[test]
    fn toml_rejects_unknown_keys() {
        assert!(toml::from_str::<Settings>("listen = \"127.0.0.1:1\"\nbogus = 1").is_err());
        let s: Settings = toml::from_str("listen = \"127.0.0.1:1\"").unwrap();
        assert_eq!(s.listen, "127.0.0.1:1");
        assert_eq!(s.admin_listen, "127.0.0.1:8081");
    }
}
