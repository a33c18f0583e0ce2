//! Server settings: one struct that is at once the `otm server` flags (each with its `OTM_*`
//! variable) and the TOML file's keys, its defaults written once in its `#[arg]` attributes, and
//! validation before anything binds.
//!
//! Precedence: a flag or variable wins over the TOML file, which wins over the default.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use otm_core::Secret;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything in one process.
    All,
    /// Webhooks, inboxes, dispatch, the Bot API proxy.
    Router,
    /// The admin API, wakes, stops, the reaper, the warm pool, the reconciler.
    Orchestrator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Router => "router",
            Role::Orchestrator => "orchestrator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How instances are isolated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sandbox {
    /// Bubblewrap; the server refuses to start without it.
    Auto,
    /// Bubblewrap; the server refuses to start without it.
    Bubblewrap,
    /// Development only: instances are not isolated, and every start says so.
    None,
}

impl Sandbox {
    pub fn as_str(self) -> &'static str {
        match self {
            Sandbox::Auto => "auto",
            Sandbox::Bubblewrap => "bubblewrap",
            Sandbox::None => "none",
        }
    }
}

/// Where instances run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Sandboxed processes on this machine.
    Local,
    /// Pods in a Kubernetes namespace (Kata Containers by default).
    Kube,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Local => "local",
            RuntimeKind::Kube => "kube",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything `otm server` can be told: each field is a flag, an `OTM_*` variable and a key of
/// the TOML file (`--config`). Flags and variables override the file, which overrides the
/// defaults. Secrets have no flag (process lists show flags): they come from a variable or the
/// file.
#[derive(Clone, Debug, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Public listener: Telegram webhooks (POST /tg/{tenant}) and GET /healthz.
    #[arg(long, env = "OTM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Admin listener: the /v1/ API and /metrics.
    #[arg(long, env = "OTM_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    pub admin_listen: String,
    /// Serve the web console at / on the admin listener (on by default; off with --no-console or
    /// OTM_CONSOLE=false).
    #[arg(long, env = "OTM_CONSOLE", default_value_t = true, action = clap::ArgAction::Set,
        num_args = 0..=1, default_missing_value = "true", overrides_with = "no_console")]
    pub console: bool,
    /// Serve no web console on the admin listener (the same as --console=false).
    #[arg(long, overrides_with = "console")]
    #[serde(skip)]
    pub no_console: bool,
    /// Egress listener: the Bot API proxy agents call.
    #[arg(long, env = "OTM_EGRESS_LISTEN", default_value = "127.0.0.1:8082")]
    pub egress_listen: String,
    /// The Bot API proxy's URL as agents see it [default: http://<egress listener>].
    #[arg(long, env = "OTM_EGRESS_URL")]
    pub egress_url: Option<String>,
    /// Where the embedded registry, snapshots and instances live (the global --data-dir,
    /// OTM_DATA_DIR).
    #[arg(skip = PathBuf::from("./otm-data"))]
    pub data_dir: PathBuf,
    /// The Telegram Bot API root.
    #[arg(
        long,
        env = "OTM_TELEGRAM_API",
        default_value = "https://api.telegram.org"
    )]
    pub telegram_api: String,
    /// This server's public URL; when set, creating a tenant with a bot token registers its
    /// webhook at {public-url}/tg/{id}, and deleting the tenant removes it.
    #[arg(long, env = "OTM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Registry URL [default: sqlite://<data-dir>/otm.db].
    #[arg(long, env = "OTM_REGISTRY")]
    pub registry: Option<String>,
    /// Coordinator URL [default: memory].
    #[arg(long, env = "OTM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// State store URL for snapshots [default: file://<data-dir>/state].
    #[arg(long, env = "OTM_STATE")]
    pub state: Option<String>,
    /// Where instances run: `local` (sandboxed processes here) or `kube` (pods; in-cluster
    /// configuration or KUBECONFIG).
    #[arg(long, env = "OTM_RUNTIME", value_enum, default_value_t = RuntimeKind::Local)]
    pub runtime: RuntimeKind,
    /// The namespace of tenant pods [default: the service account's namespace in a pod, the
    /// kubeconfig context's namespace otherwise].
    #[arg(long, env = "OTM_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// `runtimeClassName` of tenant pods; empty for the cluster's default runtime.
    #[arg(long, env = "OTM_KUBE_RUNTIME_CLASS", default_value = "kata-qemu")]
    pub kube_runtime_class: String,
    /// The otm image tenant pods run (`otm shim` with the reference agent).
    #[arg(long, env = "OTM_KUBE_IMAGE", default_value = "otm:latest")]
    pub kube_image: String,
    /// The OpenClaw instance image (otm, Node and OpenClaw), for the `openclaw` profile and for
    /// warm pods [default: none; then every pod runs --kube-image].
    #[arg(long, env = "OTM_KUBE_OPENCLAW_IMAGE")]
    pub kube_openclaw_image: Option<String>,
    /// Where the OpenClaw instance image holds OpenClaw (its `bin/openclaw`).
    #[arg(
        long,
        env = "OTM_KUBE_OPENCLAW_PREFIX",
        default_value = "/opt/openclaw"
    )]
    pub kube_openclaw_prefix: String,
    /// Node selector of tenant pods, `key=value,key=value` (the Kata nodes' label).
    #[arg(long, env = "OTM_KUBE_NODE_SELECTOR", default_value = "")]
    pub kube_node_selector: String,
    /// Tolerations of tenant pods, a JSON array as a pod spec writes it (the Kata nodes' taint).
    #[arg(long, env = "OTM_KUBE_TOLERATIONS", default_value = "")]
    pub kube_tolerations: String,
    /// The shim's control port in tenant pods.
    #[arg(long, env = "OTM_KUBE_SHIM_PORT", default_value_t = 7070)]
    pub kube_shim_port: u16,
    /// The Lease orchestrators elect their leader with, in the tenant namespace.
    #[arg(long, env = "OTM_KUBE_LEASE_NAME", default_value = "otm-orchestrator")]
    pub kube_lease_name: String,
    /// Whether tenant pods name the `otm-tenant` and `otm-warm` PriorityClasses (the Helm chart
    /// creates them).
    #[arg(long, env = "OTM_KUBE_PRIORITY_CLASSES", default_value_t = true, action = clap::ArgAction::Set)]
    pub kube_priority_classes: bool,
    /// Instance sandbox (local runtime).
    #[arg(long, env = "OTM_SANDBOX", value_enum, default_value_t = Sandbox::Auto)]
    pub sandbox: Sandbox,
    /// First uid of the range instances run as when otm runs as root; 65,536 uids from there
    /// must belong to nobody else.
    #[arg(long, env = "OTM_SANDBOX_UID_BASE", default_value_t = otm_runtime::local::DEFAULT_UID_BASE)]
    pub sandbox_uid_base: u32,
    /// On a host whose cgroup hierarchies lack the kernel's `favordynmods`, otm (as root)
    /// mounts an empty cgroup hierarchy with it at /run/otm/cgroup-favordynmods: moving an
    /// instance into its cgroups then no longer waits 10 to 20 ms for the kernel, at the cost
    /// of slightly slower forks and exits host-wide. `umount` it to undo.
    #[arg(long, env = "OTM_CGROUP_FAVORDYNMODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cgroup_favordynmods: bool,
    /// Accept tenants on the `probe` profile: the reference agent answering `/sh <command>` with
    /// the command's output, run inside the sandbox. For testing sandboxes only.
    #[arg(long, env = "OTM_ALLOW_PROBE_PROFILE")]
    pub allow_probe_profile: bool,
    /// The `otm` binary instances run as `otm shim` [default: this executable].
    #[arg(long, env = "OTM_OTM_BINARY")]
    pub otm_binary: Option<PathBuf>,
    /// Failed deliveries of one update before it moves to the dead-letter list.
    #[arg(long, env = "OTM_MAX_DELIVERY_ATTEMPTS", default_value_t = 10)]
    pub max_delivery_attempts: u32,
    /// How long an agent may take to become ready, in seconds.
    #[arg(long, env = "OTM_WAKE_TIMEOUT_S", default_value_t = 120)]
    pub wake_timeout_s: u64,
    /// Seconds between snapshots of running tenants (0: no periodic snapshots).
    #[arg(long, env = "OTM_SNAPSHOT_INTERVAL_S", default_value_t = 300)]
    pub snapshot_interval_s: u64,
    /// Snapshots kept per tenant (the head always among them).
    #[arg(long, env = "OTM_SNAPSHOT_KEEP", default_value_t = 5)]
    pub snapshot_keep: usize,
    /// What this process runs.
    #[arg(long, env = "OTM_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// Orchestrator URLs a router calls (their admin listeners), comma-separated; tried in turn.
    #[arg(long, env = "OTM_ORCHESTRATOR_URL")]
    pub orchestrator_url: Option<String>,
    /// The token routers and orchestrators present to each other: OTM_SERVICE_TOKEN (or
    /// service_token in the TOML file), never a flag.
    #[arg(skip)]
    pub service_token: Option<Secret>,
    /// Lifetime of wake locks and dispatcher leases, renewed while held, in seconds. A replica
    /// that dies holding one blocks that tenant for at most this long.
    #[arg(long, env = "OTM_LEASE_TTL_S", default_value_t = 15)]
    pub lease_ttl_s: u64,
    /// How long a delivered update's id is remembered to drop Telegram's redeliveries, in
    /// seconds; its text is dropped at delivery, the id after this.
    #[arg(long, env = "OTM_DEDUPE_WINDOW_S", default_value_t = 86_400)]
    pub dedupe_window_s: u64,
    /// How long a stopping server (SIGTERM, Ctrl-C) lets its work finish, in seconds: listeners
    /// drain, dispatchers end their delivery and release their leases; what is still running
    /// after this is cut off.
    #[arg(long, env = "OTM_SHUTDOWN_GRACE_S", default_value_t = 10)]
    pub shutdown_grace_s: u64,
    /// Where scripts/install-openclaw put Node 24 and OpenClaw, for tenants on the openclaw
    /// profile [default: <data-dir>/openclaw, then openclaw on PATH].
    #[arg(long, env = "OTM_OPENCLAW_PREFIX")]
    pub openclaw_prefix: Option<PathBuf>,
    /// JSON5 template of the OpenClaw gateway config [default: built in; see docs/openclaw.md].
    #[arg(long, env = "OTM_OPENCLAW_CONFIG_TEMPLATE")]
    pub openclaw_config_template: Option<PathBuf>,
    /// NODE_OPTIONS of the OpenClaw gateways, e.g. V8 heap limits [default: built in; see
    /// docs/openclaw.md]; an empty value gives them none (but for the install's import resolver).
    #[arg(long, env = "OTM_OPENCLAW_NODE_OPTIONS")]
    pub openclaw_node_options: Option<String>,
    /// The model provider's OpenAI-compatible base URL, e.g. https://api.openai.com/v1. Agents
    /// reach it through the egress listener, which adds the key from OTM_MODEL_API_KEY (an
    /// environment variable only, or model_api_key in the TOML file).
    #[arg(long, env = "OTM_MODEL_BASE_URL")]
    pub model_base_url: Option<String>,
    /// The model id at that provider.
    #[arg(long, env = "OTM_MODEL_ID")]
    pub model_id: Option<String>,
    /// The provider's API key: added upstream by the egress listener, never given to instances.
    #[arg(skip)]
    pub model_api_key: Option<Secret>,
    /// Model requests a minute each tenant may make through the model proxy, unless the tenant
    /// has its own budget [default: no limit].
    #[arg(long, env = "OTM_MODEL_REQUESTS_PER_MINUTE")]
    pub model_requests_per_minute: Option<u32>,
    /// Model tokens a UTC day each tenant may use, as the provider reports them, unless the
    /// tenant has its own budget [default: no limit].
    #[arg(long, env = "OTM_MODEL_TOKENS_PER_DAY")]
    pub model_tokens_per_day: Option<u64>,
    /// Messages a second each bot may send through the Bot API proxy; more wait their turn
    /// (0: no limit; 30 is Telegram's limit).
    #[arg(long, env = "OTM_BOT_MESSAGES_PER_SECOND", default_value_t = 30)]
    pub bot_messages_per_second: u32,
    /// Least milliseconds between two messages of a bot to one chat (0: no limit; 1000 is
    /// Telegram's one a second).
    #[arg(long, env = "OTM_BOT_CHAT_INTERVAL_MS", default_value_t = 1000)]
    pub bot_chat_interval_ms: u64,
    /// Messages a minute a bot may send to one group chat (0: no limit).
    #[arg(long, env = "OTM_BOT_GROUP_MESSAGES_PER_MINUTE", default_value_t = 20)]
    pub bot_group_messages_per_minute: u32,
    /// The key file that encrypts bot tokens and webhook secrets at rest and signs shim tokens
    /// and cached endpoints (`otm secrets keygen` writes one; every replica needs the same)
    /// [default: <data-dir>/secret.key, generated on first start, mode 0600].
    #[arg(long, env = "OTM_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// The admin token (the global --admin-token, OTM_ADMIN_TOKEN); when unset, read from
    /// `admin_token_file`, else <data-dir>/admin.token (generated on first start, mode 0600).
    #[arg(skip)]
    pub admin_token: Option<Secret>,
    /// A file holding the admin token, such as a mounted secret (the global
    /// --admin-token-file, OTM_ADMIN_TOKEN_FILE).
    #[arg(skip)]
    pub admin_token_file: Option<PathBuf>,
}

impl Default for Settings {
    /// The defaults, as the `#[arg]` attributes above write them (no flag or variable read).
    fn default() -> Self {
        let command = Settings::augment_args(clap::Command::new("otm server"))
            .mut_args(|a| a.env(None::<&'static str>));
        let matches = command
            .try_get_matches_from(["otm server"])
            .expect("the defaults parse");
        Settings::from_arg_matches(&matches).expect("the defaults parse")
    }
}

/// The keys that are no flag of `otm server`'s own: the global options of `otm` the server
/// reads too (`--data-dir`, `--admin-token`, `--admin-token-file`), and the secrets only a
/// variable or the file may give.
const NOT_FLAGS: [&str; 5] = [
    "data_dir",
    "service_token",
    "model_api_key",
    "admin_token",
    "admin_token_file",
];

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
    /// The effective settings of `otm server`: the defaults, overridden by the TOML `file`,
    /// overridden by what `matches` (the parsed command line of `otm server`) took from a flag or
    /// an `OTM_*` variable, and by the secrets' variables (`OTM_SERVICE_TOKEN`,
    /// `OTM_MODEL_API_KEY`).
    pub fn resolve(matches: &ArgMatches, file: Option<&Path>) -> Result<Self, InvalidSetting> {
        let command_line = Settings::from_arg_matches(matches)
            .map_err(|e| invalid("command line", e.to_string()))?;
        let mut table = match file {
            Some(path) => read_toml(path)?,
            None => toml::Table::new(),
        };
        let given = toml::Table::try_from(&command_line)
            .map_err(|e| invalid("command line", e.to_string()))?;
        for arg in Settings::augment_args(clap::Command::new("otm server")).get_arguments() {
            let key = arg.get_id().as_str();
            if let (Some(ValueSource::CommandLine | ValueSource::EnvVariable), Some(value)) =
                (matches.value_source(key), given.get(key))
            {
                table.insert(key.to_owned(), value.clone());
            }
        }
        let mut s: Settings = table
            .try_into()
            .map_err(|e| invalid("command line", e.to_string()))?;
        if matches!(matches.try_get_one::<bool>("no_console"), Ok(Some(true))) {
            s.console = false;
        }
        // The global options of `otm` that are settings of the server too.
        if let Some(d) = global::<PathBuf>(matches, "data_dir") {
            s.data_dir = d;
        }
        if let Some(t) = global::<String>(matches, "admin_token").filter(|t| !t.is_empty()) {
            s.admin_token = Some(Secret::new(t));
        }
        if let Some(f) =
            global::<PathBuf>(matches, "admin_token_file").filter(|f| !f.as_os_str().is_empty())
        {
            s.admin_token_file = Some(f);
        }
        // Secrets come from the environment, never from a flag (process lists show flags).
        if let Some(t) = secret_var("OTM_SERVICE_TOKEN") {
            s.service_token = Some(t);
        }
        if let Some(k) = secret_var("OTM_MODEL_API_KEY") {
            s.model_api_key = Some(k);
        }
        Ok(s)
    }

    /// The settings as a TOML file would give them, secrets redacted, unset keys named in a
    /// comment at the end.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        let redacted = || Some(Secret::new("<redacted>"));
        if shown.service_token.is_some() {
            shown.service_token = redacted();
        }
        if shown.model_api_key.is_some() {
            shown.model_api_key = redacted();
        }
        if shown.admin_token.is_some() {
            shown.admin_token = redacted();
        }
        let text = toml::to_string(&shown).expect("settings are TOML");
        let set = toml::Table::try_from(&shown).expect("settings are TOML");
        let unset: Vec<String> = Settings::augment_args(clap::Command::new("otm server"))
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .chain(NOT_FLAGS.iter().map(|k| (*k).to_owned()))
            // `--no-console` is `console = false`, not a key of its own.
            .filter(|k| k != "no_console" && !set.contains_key(k))
            .collect();
        if unset.is_empty() {
            text
        } else {
            format!("{text}# not set: {}\n", unset.join(", "))
        }
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
        // The backends' URLs are parsed here, not opened: an unknown scheme or something that
        // is no URL is a bad configuration, found before anything is created.
        use otm_store::open::{CoordinatorBackend, RegistryBackend, StateStoreBackend};
        let backend = |name: &'static str, parsed: otm_core::Result<()>| {
            parsed.map_err(|e| match e {
                otm_core::Error::InvalidInput { message } => invalid(name, message),
                e => invalid(name, e.to_string()),
            })
        };
        if let Some(u) = &self.registry {
            backend("registry", RegistryBackend::parse(u).map(drop))?;
        }
        if let Some(u) = &self.coordinator {
            backend("coordinator", CoordinatorBackend::parse(u).map(drop))?;
        }
        if let Some(u) = &self.state {
            backend("state", StateStoreBackend::parse(u).map(drop))?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data-dir", "must not be empty"));
        }
        // Fail closed: no sandbox is never chosen for the operator.
        if self.sandbox != Sandbox::None
            && self.runtime == RuntimeKind::Local
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
        if self.sandbox != Sandbox::None
            && self.runtime == RuntimeKind::Local
            && self.runs_orchestrator()
        {
            let binary = self
                .otm_binary
                .clone()
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_default();
            let read_only =
                crate::openclaw_install::locate(self.openclaw_prefix.as_deref(), &self.data_dir)
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
        match self.role {
            Role::All => {}
            Role::Router => {
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
            Role::Orchestrator => {
                if self.service_token.is_none() {
                    return Err(invalid(
                        "service-token",
                        "the orchestrator role needs OTM_SERVICE_TOKEN, shared with the routers",
                    ));
                }
            }
        }
        // Replicas read each other's ciphertexts, shim tokens and cached endpoints: a key file
        // generated into one replica's data directory would lock the others out.
        if self.role != Role::All && self.secret_key_file.is_none() {
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
        if self.runtime == RuntimeKind::Kube {
            self.kube_config("default")?;
        }
        self.validate_openclaw()?;
        Ok(listeners)
    }
}

impl Settings {
    /// The `kube` runtime's settings, with `namespace` where none is set.
    pub fn kube_config(
        &self,
        namespace: &str,
    ) -> Result<otm_runtime::kube::KubeRuntimeConfig, InvalidSetting> {
        let node_selector = otm_runtime::kube::parse_selector(&self.kube_node_selector)
            .map_err(|m| invalid("kube-node-selector", m))?;
        let tolerations = otm_runtime::kube::parse_tolerations(&self.kube_tolerations)
            .map_err(|m| invalid("kube-tolerations", m))?;
        if self.kube_image.trim().is_empty() {
            return Err(invalid("kube-image", "must name the otm image"));
        }
        let namespace = self
            .kube_namespace
            .clone()
            .unwrap_or_else(|| namespace.to_owned());
        if !otm_core::id::is_dns_label(&namespace) {
            return Err(invalid(
                "kube-namespace",
                format!("`{namespace}` is not a namespace name"),
            ));
        }
        if self.kube_shim_port == 0 {
            return Err(invalid("kube-shim-port", "must not be 0"));
        }
        Ok(otm_runtime::kube::KubeRuntimeConfig {
            namespace,
            runtime_class: (!self.kube_runtime_class.trim().is_empty())
                .then(|| self.kube_runtime_class.trim().to_owned()),
            image: self.kube_image.clone(),
            openclaw_image: self.kube_openclaw_image.clone(),
            node_selector,
            tolerations,
            shim_port: self.kube_shim_port,
            priority_classes: self.kube_priority_classes,
            create_timeout: std::time::Duration::from_secs(self.wake_timeout_s.max(60)),
            lease_name: self.kube_lease_name.clone(),
            ..Default::default()
        })
    }

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
        self.role != Role::Orchestrator
    }

    /// Whether this process runs the orchestrator's part.
    pub fn runs_orchestrator(&self) -> bool {
        self.role != Role::Router
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

/// A TOML file of settings; unknown keys and values of the wrong type are refused, named with
/// their line.
fn read_toml(path: &Path) -> Result<toml::Table, InvalidSetting> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("config", format!("cannot read {}: {e}", path.display())))?;
    let file_error = |e: toml::de::Error| invalid("config", format!("{}: {e}", path.display()));
    toml::from_str::<Settings>(&text).map_err(file_error)?;
    text.parse().map_err(file_error)
}

/// A global option of `otm` given by a flag or a variable; `None` where the command has no
/// such option.
fn global<T: Clone + Send + Sync + 'static>(matches: &ArgMatches, id: &str) -> Option<T> {
    matches.try_get_one::<T>(id).ok().flatten().cloned()
}

/// A secret from the environment; an empty variable counts as unset.
fn secret_var(name: &str) -> Option<Secret> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new)
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
    fn the_charts_kube_settings_make_a_kube_config() {
        // OTM_KUBE_NODE_SELECTOR and OTM_KUBE_TOLERATIONS as the Helm chart's ConfigMap renders
        // them with the default values.
        let s = Settings {
            runtime: RuntimeKind::Kube,
            kube_node_selector: "otm.dev/kata=true".into(),
            kube_tolerations: r#"[{"effect":"NoSchedule","key":"otm.dev/kata","operator":"Equal","value":"true"}]"#.into(),
            kube_image: "registry.example/otm:0.1.0".into(),
            kube_openclaw_image: Some("registry.example/otm-openclaw:0.1.0".into()),
            ..Settings::default()
        };
        s.validate().unwrap();
        let k = s.kube_config("otm-tenants").unwrap();
        assert_eq!(k.namespace, "otm-tenants");
        assert_eq!(k.node_selector["otm.dev/kata"], "true");
        assert_eq!(k.tolerations.len(), 1);
        let t = &k.tolerations[0];
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref()
            ),
            (
                Some("otm.dev/kata"),
                Some("Equal"),
                Some("true"),
                Some("NoSchedule")
            )
        );
        assert_eq!(k.runtime_class.as_deref(), Some("kata-qemu"));
        assert_eq!(
            k.openclaw_image.as_deref(),
            Some("registry.example/otm-openclaw:0.1.0")
        );

        // A toleration written as kubectl taint syntax is refused, by name.
        let bad = Settings {
            kube_tolerations: "otm.dev/kata=true:NoSchedule".into(),
            ..s.clone()
        };
        assert_eq!(bad.validate().unwrap_err().name, "kube-tolerations");
        let bad = Settings {
            kube_node_selector: "otm.dev/kata".into(),
            ..s
        };
        assert_eq!(bad.validate().unwrap_err().name, "kube-node-selector");
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

    /// `otm server`'s own flags parsed from `args` (variables unset).
    fn matches(args: &[&str]) -> ArgMatches {
        Settings::augment_args(clap::Command::new("otm server"))
            .mut_args(|a| a.env(None::<&'static str>))
            .try_get_matches_from(std::iter::once("otm server").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("otm.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\nrole = \"orchestrator\"\nsandbox = \"none\"\nlease_ttl_s = 30\n",
        )
        .unwrap();
        let s = Settings::resolve(
            &matches(&["--listen", "127.0.0.1:3", "--role", "router"]),
            Some(&file),
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:3", "the flag wins");
        assert_eq!(s.role, Role::Router, "the flag wins");
        assert_eq!(
            s.admin_listen, "127.0.0.1:2",
            "the file wins over the default"
        );
        assert_eq!(s.sandbox, Sandbox::None);
        assert_eq!(s.lease_ttl_s, 30);
        assert_eq!(s.egress_listen, "127.0.0.1:8082", "the default");
        assert_eq!(s.dedupe_window_s, 86_400);
        assert_eq!(s.shutdown_grace_s, 10, "the default");
        let s = Settings::resolve(&matches(&["--shutdown-grace-s", "25"]), Some(&file)).unwrap();
        assert_eq!(s.shutdown_grace_s, 25);
        std::fs::write(&file, "shutdown_grace_s = 3\n").unwrap();
        let s = Settings::resolve(&matches(&[]), Some(&file)).unwrap();
        assert_eq!(s.shutdown_grace_s, 3);
        // Without a file, a default stays a default.
        let s = Settings::resolve(&matches(&[]), None).unwrap();
        assert_eq!(s.listen, Settings::default().listen);
        assert_eq!(s.role, Role::All);
        assert_eq!(s.sandbox, Sandbox::Auto);
    }

    #[test]
    fn bad_files_are_refused_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("otm.toml");
        for (text, needle) in [
            ("role = \"leader\"", "leader"),
            ("sandbox = \"docker\"", "docker"),
            ("lease_ttl_s = \"soon\"", "lease_ttl_s"),
            ("no_such_setting = 1", "no_such_setting"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Settings::resolve(&matches(&[]), Some(&file)).unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn printed_settings_hide_secrets_and_read_back() {
        let s = Settings {
            service_token: Some(Secret::new("svc-secret")),
            model_api_key: Some(Secret::new("sk-secret")),
            admin_token: Some(Secret::new("adm-secret")),
            role: Role::Orchestrator,
            ..Settings::default()
        };
        let text = s.to_redacted_toml();
        for secret in ["svc-secret", "sk-secret", "adm-secret"] {
            assert!(!text.contains(secret), "{secret} printed:\n{text}");
        }
        assert!(text.contains("model_api_key = \"<redacted>\""), "{text}");
        assert!(text.contains("role = \"orchestrator\""), "{text}");
        assert!(text.contains("# not set: egress_url"), "{text}");
        let back: Settings = toml::from_str(&text).unwrap();
        assert_eq!(back.role, Role::Orchestrator);
        assert_eq!(back.listen, s.listen);
        assert_eq!(back.sandbox_uid_base, s.sandbox_uid_base);
    }

    #[test]
    fn toml_rejects_unknown_keys() {
        assert!(toml::from_str::<Settings>("listen = \"127.0.0.1:1\"\nbogus = 1").is_err());
        let s: Settings = toml::from_str("listen = \"127.0.0.1:1\"").unwrap();
        assert_eq!(s.listen, "127.0.0.1:1");
        assert_eq!(s.admin_listen, "127.0.0.1:8081");
    }
}
