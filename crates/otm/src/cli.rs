//! The operator CLI: every verb is one call to the admin API.

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use otm_core::FleetSettings;
use otm_core::admin_api::{
    AuditPage, CreateToken, DropAnswer, ErrorBody, InboxAnswer, InstanceView, LimitsBody, NewToken,
    PatchTenant, PutConfig, RetryAnswer, RotateAnswer, RotateRequest, SnapshotList, StatusView,
    StopView, TenantView, TokenView, WakeView,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Exit codes a script can rely on.
pub mod exit {
    /// The call failed: connection, server error.
    pub const FAILED: u8 = 1;
    /// Bad usage or a request the server refused as invalid.
    pub const USAGE: u8 = 2;
    /// The tenant (or other object) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// Conflict: it exists already, or is not in a state that allows this.
    pub const CONFLICT: u8 = 4;
    /// Missing, wrong or revoked admin token, or a read-only token asked to change something.
    pub const UNAUTHORIZED: u8 = 5;
}

const EXIT_CODES: &str = "Exit codes: 0 success, 1 failure (unreachable server, server error), 2 invalid request, \
3 not found, 4 conflict (exists already, wrong state), 5 missing, wrong or revoked admin token, or a read-only token asked to change something.";

/// How to reach the admin API and how to print answers.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Admin API URL.
    #[arg(
        long,
        env = "OTM_ADMIN_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    admin_url: String,
    /// Admin token; read from --admin-token-file, else <data-dir>/admin.token, when unset.
    #[arg(long, env = "OTM_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    /// A file holding the admin token (kept out of the environment and shell history).
    #[arg(long, env = "OTM_ADMIN_TOKEN_FILE", value_name = "FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// Data directory: where the server keeps its state and admin.token [default: ./otm-data].
    #[arg(long = "data-dir", env = "OTM_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, list, inspect, change, delete, export, wake and stop tenants.
    #[command(after_help = EXIT_CODES)]
    Tenant {
        #[command(subcommand)]
        command: Box<TenantCommand>,
    },
    /// Read or change fleet settings.
    #[command(after_help = EXIT_CODES)]
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show a tenant's agent output.
    #[command(after_help = EXIT_CODES)]
    Logs {
        tenant: String,
        /// Keep printing what the agent writes.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines from the end to start with.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// Show a tenant's pending and dead-lettered updates (`otm inbox TENANT`), or retry or drop
    /// its dead letters.
    #[command(
        after_help = EXIT_CODES,
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Inbox {
        /// The tenant whose inbox to show.
        #[arg(required = true)]
        tenant: Option<String>,
        #[command(subcommand)]
        command: Option<InboxCommand>,
    },
    /// List a tenant's snapshots.
    #[command(after_help = EXIT_CODES)]
    Snapshots { tenant: String },
    /// List live instances.
    #[command(after_help = EXIT_CODES)]
    Instances,
    /// Show the server's status.
    #[command(after_help = EXIT_CODES)]
    Status,
    /// Secrets at rest: rotate the key that encrypts tenants' secrets, or make a key file.
    #[command(after_help = EXIT_CODES)]
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Named admin tokens: create (read-only or full), list, revoke.
    #[command(after_help = EXIT_CODES)]
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Show the audit trail of admin writes (and failed sign-ins), newest first.
    #[command(after_help = EXIT_CODES)]
    Audit {
        /// Entries to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show entries older than this id (the `next_before` of a previous page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Print this binary's version, and the server's when it can be reached.
    Version,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a named admin token and print it, once: only its SHA-256 is kept.
    Create {
        name: String,
        /// May read everything and change nothing (403 on every write).
        #[arg(long)]
        read_only: bool,
    },
    /// List the named admin tokens (not the tokens themselves).
    List,
    /// Revoke a named token: refused at once by every replica.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum InboxCommand {
    /// Put dead letters back at the head of the inbox, in order, and deliver them now (after
    /// fixing what made them fail).
    #[command(after_help = EXIT_CODES)]
    Retry(DeadLetterArgs),
    /// Drop dead letters for good (their update ids still count as seen, so Telegram cannot
    /// bring them back).
    #[command(after_help = EXIT_CODES)]
    Drop(DeadLetterArgs),
}

#[derive(Args, Debug)]
pub struct DeadLetterArgs {
    tenant: String,
    /// The dead letter's sequence number (the SEQ column of `otm inbox TENANT`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    seq: Option<i64>,
    /// Every dead letter of the tenant.
    #[arg(long)]
    all: bool,
}

impl DeadLetterArgs {
    /// The path segment the API takes: the seq, or `dead` for all.
    fn segment(&self) -> String {
        match self.seq {
            Some(seq) if !self.all => seq.to_string(),
            _ => "dead".to_owned(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Re-encrypt every tenant's bot token and webhook secret under a new key: the server adds
    /// a key to its key file, re-encrypts, then drops the older keys (kept readable until every
    /// secret is re-encrypted). Works against a running server.
    Rotate {
        /// Do not add a key: re-encrypt under the newest key the key file already lists (for a
        /// key file its operator manages, e.g. a mounted secret: add the new key line there and
        /// restart first).
        #[arg(long)]
        no_new_key: bool,
        /// Keep the older keys in the key file afterwards.
        #[arg(long)]
        keep_old_keys: bool,
    },
    /// Write a new key file (one signing key, one encryption key) to FILE, mode 0600, or print
    /// it; needs no server. For fleets: give every replica the same file (OTM_SECRET_KEY_FILE).
    Keygen {
        /// Where to write it; refuses to replace an existing file. Printed when left out.
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant; with a bot token and a server --public-url, its webhook is registered.
    Create {
        /// Tenant id: a DNS label (a-z, 0-9, '-').
        id: String,
        /// The Telegram bot token from BotFather; `-` reads it from stdin. Left out, it is
        /// read from --bot-token-file, or from stdin when stdin is not a terminal, so it need
        /// not sit in shell history or `ps`.
        bot_token: Option<String>,
        /// A file holding the bot token (`-`: stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "bot_token")]
        bot_token_file: Option<PathBuf>,
        /// Seconds without messages before the tenant sleeps.
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Seconds without messages before the tenant's agent is frozen in place (0: never;
        /// `default`: 60).
        #[arg(long, value_name = "SECONDS")]
        freeze_after: Option<String>,
        /// Agent profile.
        #[arg(long)]
        profile: Option<String>,
        /// Send a short "starting up" message on cold wakes.
        #[arg(long)]
        cold_start_notice: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// List tenants.
    List,
    /// Show one tenant.
    Get { id: String },
    /// Change a tenant's settings.
    Update {
        id: String,
        /// A new bot token (prefer --bot-token-file: a command line shows in `ps`).
        #[arg(long)]
        bot_token: Option<String>,
        /// A file holding the new bot token (`-`: stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "bot_token")]
        bot_token_file: Option<PathBuf>,
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Seconds without messages before the agent is frozen (0: never; `default`: 60).
        #[arg(long, value_name = "SECONDS")]
        freeze_after: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        cold_start_notice: Option<bool>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Delete a tenant: stops its instance, removes its webhook, its inbox and its snapshots.
    Delete {
        id: String,
        /// Keep its snapshots in the state store under a tombstone (tombstones/<id>-<ms>),
        /// out of reach of a tenant created again under the same id.
        #[arg(long)]
        keep_state: bool,
    },
    /// Write a tenant's latest state as a tar (a running tenant is snapshotted first), for
    /// handing a user their data.
    Export {
        id: String,
        /// Where to write it [default: <id>.tar]; `-` for stdout.
        #[arg(long, short = 'f', value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// Wake a tenant now and wait until its agent is ready.
    Wake { id: String },
    /// Stop a tenant's instance (final snapshot first).
    Stop { id: String },
}

/// A tenant's resource limits; each "default" (or left out) is the fleet's.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// Memory limit of its instances: 512Mi, 2GiB, … ("default": the fleet's).
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit: 500m, 0.5, 2 (cores).
    #[arg(long)]
    cpu: Option<String>,
    /// Most processes and threads.
    #[arg(long)]
    pids: Option<String>,
    /// Disk limit of its state, home and temporary directories: 1Gi, 500M, ….
    #[arg(long)]
    disk: Option<String>,
    /// Egress policy: none (only the Bot API and model proxies) or proxy (an HTTP CONNECT
    /// proxy to the --egress-allow hosts, public addresses only).
    #[arg(long, value_parser = ["none", "proxy"])]
    egress: Option<String>,
    /// Host names the egress proxy may reach, comma-separated (example.com, *.example.com).
    #[arg(long, value_delimiter = ',')]
    egress_allow: Option<Vec<String>>,
    /// Telegram user ids who may write to the agent (its owner): repeat the flag or separate
    /// by commas; `*` lets anyone who finds the bot in; `--allow ''` allows nobody again.
    /// An OpenClaw agent answers nobody until someone is allowed.
    #[arg(long = "allow", value_name = "USER_ID", value_delimiter = ',')]
    allow: Option<Vec<String>>,
}

/// A tenant's model budgets and its own model key.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model requests a minute through otm's model proxy (0: no limit; "default": the
    /// server's --model-requests-per-minute).
    #[arg(long, value_name = "N")]
    model_requests_per_minute: Option<String>,
    /// Model tokens a UTC day, as the provider reports them (0: no limit; "default": the
    /// server's --model-tokens-per-day).
    #[arg(long, value_name = "N")]
    model_tokens_per_day: Option<String>,
    /// A file holding this tenant's own key at the model provider (`-`: stdin), used in place
    /// of the server's; never shown again.
    #[arg(long, value_name = "FILE")]
    model_api_key_file: Option<PathBuf>,
    /// Drop the tenant's own model key: the server's is used again.
    #[arg(long, conflicts_with = "model_api_key_file")]
    no_model_api_key: bool,
}

impl ModelArgs {
    /// Adds the flags that were given to a create or update body.
    fn put(self, body: &mut PatchTenant) -> anyhow::Result<()> {
        // A number, or a word the server knows (`default`).
        let count = |v: String| match v.trim().parse::<u64>() {
            Ok(n) => json!(n),
            Err(_) => json!(v),
        };
        if let Some(v) = self.model_requests_per_minute {
            body.model_requests_per_minute = Some(count(v));
        }
        if let Some(v) = self.model_tokens_per_day {
            body.model_tokens_per_day = Some(count(v));
        }
        if let Some(file) = self.model_api_key_file {
            body.model_api_key = Some(read_secret_file(&file, "model API key")?);
        }
        if self.no_model_api_key {
            body.model_api_key = Some(String::new());
        }
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Show fleet settings.
    Get,
    /// Change one fleet setting: warm-pool-target N, max-running N (0: no limit),
    /// max-concurrent-wakes N, frozen-memory-max SIZE (0: no limit), default-memory SIZE,
    /// default-cpu CPU, default-pids N, default-disk SIZE.
    Set {
        /// Setting name: warm-pool-target, max-running, max-concurrent-wakes,
        /// frozen-memory-max, default-memory, default-cpu, default-pids, default-disk.
        key: String,
        value: String,
    },
}

/// A failed call, with the exit code it maps to.
#[derive(Debug)]
struct CallError {
    code: u8,
    message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CallError {}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(g: &Global) -> anyhow::Result<Self> {
        let token = match (&g.admin_token, &g.admin_token_file) {
            (Some(t), _) if !t.is_empty() => t.clone(),
            (_, Some(file)) => read_secret_file(file, "admin token")?,
            _ => {
                let path = g
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("./otm-data"))
                    .join("admin.token");
                std::fs::read_to_string(&path)
                    .map(|s| s.trim().to_owned())
                    .with_context(|| format!("no admin token: set OTM_ADMIN_TOKEN or --admin-token, or run on the server's machine (cannot read {})", path.display()))?
            }
        };
        let http = reqwest::Client::builder().no_proxy().build()?;
        Ok(Api {
            base: g.admin_url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// A GET whose answer is streamed by the caller; an error answer becomes a [`CallError`].
    async fn get_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .get(format!("{}/v1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| CallError {
                code: exit::FAILED,
                message: format!(
                    "cannot reach the admin API at {}: {}",
                    self.base,
                    e.without_url()
                ),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = ErrorBody::parse(text.as_bytes())
            .map(|b| b.error.message)
            .unwrap_or_else(|| format!("{status}: {text}"));
        let code = match status.as_u16() {
            400 | 422 => exit::USAGE,
            401 | 403 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            409 => exit::CONFLICT,
            _ => exit::FAILED,
        };
        Err(CallError { code, message }.into())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| CallError {
            code: exit::FAILED,
            message: format!(
                "cannot reach the admin API at {}: {}",
                self.base,
                e.without_url()
            ),
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .map_err(|e| anyhow!("the server answered with invalid JSON: {e}"));
        }
        let message = ErrorBody::parse(text.as_bytes())
            .map(|b| b.error.message)
            .unwrap_or_else(|| format!("{status}: {text}"));
        let code = match status.as_u16() {
            400 | 422 => exit::USAGE,
            401 | 403 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            409 => exit::CONFLICT,
            _ => exit::FAILED,
        };
        Err(CallError { code, message }.into())
    }

    /// A call whose answer must be a `T`: an answer of another shape is an error that says so,
    /// never a table of blanks.
    /// Sends `body` (one of the request types of [`otm_core::admin_api`]) and reads the answer
    /// as `T`.
    async fn send_as<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_value(body)?;
        self.call_as(method, path, Some(body)).await
    }

    async fn call_as<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let what = format!("{method} /v1{path}");
        let v = self.call(method, path, body).await?;
        serde_json::from_value(v).map_err(|e| {
            CallError {
                code: exit::FAILED,
                message: format!(
                    "the server's answer to {what} is not what this otm expects ({e}); are the CLI and the server the same version?"
                ),
            }
            .into()
        })
    }
}

/// Reads a secret from a file (`-`: stdin), surrounding whitespace removed; an empty one is an
/// error.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .with_context(|| format!("cannot read the {what} from stdin"))?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the {what} from {}", path.display()))?
    };
    let t = text.trim();
    if t.is_empty() {
        let from = if path == Path::new("-") {
            "stdin".to_owned()
        } else {
            path.display().to_string()
        };
        return Err(CallError {
            code: exit::USAGE,
            message: format!("the {what} in {from} is empty"),
        }
        .into());
    }
    Ok(t.to_owned())
}

/// Reads a bot token piped to `otm tenant create` (empty when stdin was closed with nothing);
/// gives up after a while rather than hang on a stdin that never closes.
fn read_stdin_token() -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let r = std::io::stdin().read_to_string(&mut s).map(|_| s);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => Ok(r.context("cannot read the bot token from stdin")?.trim().to_owned()),
        Err(_) => Err(CallError {
            code: exit::USAGE,
            message: "waited 10 s for a bot token on stdin: give it as an argument, with --bot-token-file, or close stdin (< /dev/null) to create the tenant without one".into(),
        }
        .into()),
    }
}

/// Writes a streamed answer to `path` (`-`: stdout) as it arrives; a file is written beside its
/// place and renamed there when complete, so an interrupted export leaves no partial tar.
async fn write_stream(resp: reqwest::Response, path: &Path) -> anyhow::Result<u64> {
    let mut stream = resp.bytes_stream();
    let mut written = 0u64;
    if path == Path::new("-") {
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| anyhow!("the export ended early: {}", e.without_url()))?;
            stdout.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        stdout.flush()?;
        return Ok(written);
    }
    let partial = path.with_extension("tar.partial");
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?,
    );
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| anyhow!("the export ended early: {}", e.without_url()))?;
            out.write_all(&chunk)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            written += chunk.len() as u64;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
    Ok(written)
}

/// Runs one CLI command; returns the exit code.
pub async fn run(cmd: Command, global: Global) -> anyhow::Result<u8> {
    match run_inner(cmd, global).await {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast_ref::<CallError>() {
            Some(c) => {
                let _ = writeln!(std::io::stderr(), "otm: {}", c.message);
                Ok(c.code)
            }
            None => Err(e),
        },
    }
}

/// `update 5` or `updates 5, 7, 9`.
fn seq_list(seqs: &[i64]) -> String {
    let list = seqs
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if seqs.len() == 1 {
        format!("update {list}")
    } else {
        format!("updates {list}")
    }
}

async fn run_inner(cmd: Command, global: Global) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        Command::Tenant { command } => {
            let api = Api::new(&global)?;
            let out = global.output;
            match *command {
                TenantCommand::Create {
                    id,
                    bot_token,
                    bot_token_file,
                    idle_timeout,
                    freeze_after,
                    profile,
                    cold_start_notice,
                    limits,
                    model,
                } => {
                    let mut body = PatchTenant::default();
                    put_limits(&mut body, limits);
                    model.put(&mut body)?;
                    let bot_token = match (bot_token, bot_token_file) {
                        (Some(t), _) if t == "-" => {
                            Some(read_secret_file(Path::new("-"), "bot token")?)
                        }
                        (Some(t), _) => Some(t),
                        (None, Some(file)) => Some(read_secret_file(&file, "bot token")?),
                        (None, None) if !std::io::stdin().is_terminal() => {
                            Some(read_stdin_token()?).filter(|t| !t.is_empty())
                        }
                        (None, None) => None,
                    };
                    body.bot_token = bot_token;
                    body.idle_timeout_s = idle_timeout;
                    body.freeze_after_s = freeze_after.map(Value::String);
                    body.profile = profile;
                    body.cold_start_notice = cold_start_notice.then_some(true);
                    let t: TenantView = api
                        .send_as(Method::POST, "/tenants", &body.into_create(id))
                        .await?;
                    print_tenants(out, &[t], false);
                }
                TenantCommand::List => {
                    let list: Vec<TenantView> = api.call_as(Method::GET, "/tenants", None).await?;
                    print_tenants(out, &list, true);
                }
                TenantCommand::Get { id } => {
                    let t: TenantView = api
                        .call_as(Method::GET, &format!("/tenants/{id}"), None)
                        .await?;
                    print_object(out, &t);
                }
                TenantCommand::Update {
                    id,
                    bot_token,
                    bot_token_file,
                    idle_timeout,
                    freeze_after,
                    profile,
                    cold_start_notice,
                    limits,
                    model,
                } => {
                    let mut body = PatchTenant::default();
                    put_limits(&mut body, limits);
                    model.put(&mut body)?;
                    let bot_token = match (bot_token, bot_token_file) {
                        (_, Some(file)) => Some(read_secret_file(&file, "bot token")?),
                        (t, None) => t,
                    };
                    body.bot_token = bot_token;
                    body.idle_timeout_s = idle_timeout;
                    body.freeze_after_s = freeze_after.map(Value::String);
                    body.profile = profile;
                    body.cold_start_notice = cold_start_notice;
                    if body.is_empty() {
                        return Err(CallError { code: exit::USAGE, message: "nothing to update: give at least one of --bot-token, --idle-timeout, --freeze-after, --profile, --cold-start-notice, --memory, --cpu, --pids, --disk, --egress, --egress-allow, --allow, --model-requests-per-minute, --model-tokens-per-day, --model-api-key-file, --no-model-api-key".into() }.into());
                    }
                    let t: TenantView = api
                        .send_as(Method::PATCH, &format!("/tenants/{id}"), &body)
                        .await?;
                    print_object(out, &t);
                }
                TenantCommand::Delete { id, keep_state } => {
                    let path = if keep_state {
                        format!("/tenants/{id}?keep_state=true")
                    } else {
                        format!("/tenants/{id}")
                    };
                    with_progress(
                        &format!("deleting {id}"),
                        api.call(Method::DELETE, &path, None),
                    )
                    .await?;
                    let state = if keep_state {
                        "snapshots kept under a tombstone"
                    } else {
                        "snapshots deleted"
                    };
                    match out {
                        Output::Json => {
                            println!("{}", json!({"deleted": id, "snapshots_kept": keep_state}))
                        }
                        Output::Table => println!("tenant {id} deleted ({state})"),
                    }
                }
                TenantCommand::Export { id, file } => {
                    let file = file.unwrap_or_else(|| PathBuf::from(format!("{id}.tar")));
                    let (bytes, snapshot) = with_progress(&format!("exporting {id}"), async {
                        let resp = api.get_stream(&format!("/tenants/{id}/export")).await?;
                        let snapshot = resp
                            .headers()
                            .get("x-otm-snapshot")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let bytes = write_stream(resp, &file).await?;
                        Ok((bytes, snapshot))
                    })
                    .await?;
                    let to = file.display().to_string();
                    match out {
                        Output::Json => println!(
                            "{}",
                            json!({"tenant": id, "snapshot": snapshot, "bytes": bytes, "file": to})
                        ),
                        Output::Table if to == "-" => {}
                        Output::Table => println!(
                            "wrote {to}: {bytes} bytes, the state of {id} from snapshot {snapshot}"
                        ),
                    }
                }
                TenantCommand::Wake { id } => {
                    let r: WakeView = with_progress(
                        &format!("waking {id}"),
                        api.call_as(Method::POST, &format!("/tenants/{id}/wake"), None),
                    )
                    .await?;
                    match out {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                        Output::Table => {
                            let phases = r
                                .phases_ms
                                .iter()
                                .map(|(k, v)| format!("{k} {v} ms"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            println!(
                                "tenant {id} awake on {} ({}, {} ms{})",
                                r.instance,
                                r.path,
                                r.total_ms,
                                if phases.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {phases}")
                                }
                            );
                        }
                    }
                }
                TenantCommand::Stop { id } => {
                    let r: StopView = with_progress(
                        &format!("stopping {id}"),
                        api.call_as(Method::POST, &format!("/tenants/{id}/stop"), None),
                    )
                    .await?;
                    match out {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                        Output::Table => {
                            if r.stopped {
                                println!("tenant {id} stopped");
                            } else {
                                println!("tenant {id} was not running");
                            }
                        }
                    }
                }
            }
        }
        Command::Config { command } => {
            let api = Api::new(&global)?;
            let cfg: FleetSettings = match command {
                ConfigCommand::Get => api.call_as(Method::GET, "/config", None).await?,
                ConfigCommand::Set { key, value } => {
                    let field = key.replace('-', "_");
                    let body = match field.as_str() {
                        "warm_pool_target" | "max_running" | "max_concurrent_wakes" => {
                            let n: u32 = value.parse().map_err(|_| CallError {
                                code: exit::USAGE,
                                message: format!("`{value}` is not a whole number"),
                            })?;
                            let mut body = PutConfig::default();
                            *match field.as_str() {
                                "warm_pool_target" => &mut body.warm_pool_target,
                                "max_running" => &mut body.max_running,
                                _ => &mut body.max_concurrent_wakes,
                            } = Some(n);
                            body
                        }
                        "frozen_memory_max" => PutConfig {
                            frozen_memory_max: Some(Value::String(value)),
                            ..PutConfig::default()
                        },
                        "default_memory" | "default_cpu" | "default_pids" | "default_disk" => {
                            let mut limits = LimitsBody::default();
                            *match field.as_str() {
                                "default_memory" => &mut limits.memory,
                                "default_cpu" => &mut limits.cpu,
                                "default_pids" => &mut limits.pids,
                                _ => &mut limits.disk,
                            } = Some(Value::String(value));
                            PutConfig {
                                default_limits: Some(limits),
                                ..PutConfig::default()
                            }
                        }
                        _ => {
                            return Err(CallError {
                                code: exit::USAGE,
                                message: format!(
                                    "unknown setting `{key}`; settable: warm-pool-target, max-running, max-concurrent-wakes, \
                                     frozen-memory-max, default-memory, default-cpu, default-pids, default-disk"
                                ),
                            }
                            .into());
                        }
                    };
                    api.send_as(Method::PUT, "/config", &body).await?
                }
            };
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&cfg)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = to_value(&cfg)
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| vec![k.replace('_', "-"), str_of(v)])
                                .collect()
                        })
                        .unwrap_or_default();
                    print_table(&["SETTING", "VALUE"], &rows);
                }
            }
        }
        Command::Logs {
            tenant,
            follow,
            tail,
        } => {
            let api = Api::new(&global)?;
            let url = format!(
                "{}/v1/tenants/{tenant}/logs?tail={tail}&follow={follow}",
                api.base
            );
            let resp = api
                .http
                .get(url)
                .bearer_auth(&api.token)
                .send()
                .await
                .map_err(|e| CallError {
                    code: exit::FAILED,
                    message: format!(
                        "cannot reach the admin API at {}: {}",
                        api.base,
                        e.without_url()
                    ),
                })?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                let message = ErrorBody::parse(&body)
                    .map_or_else(|| "request failed".to_owned(), |b| b.error.message);
                let code = match status {
                    404 => exit::NOT_FOUND,
                    409 => exit::CONFLICT,
                    401 => exit::UNAUTHORIZED,
                    _ => exit::FAILED,
                };
                return Err(CallError { code, message }.into());
            }
            let mut stream = resp.bytes_stream();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| anyhow!("log stream ended: {}", e.without_url()))?;
                stdout.write_all(&chunk)?;
                stdout.flush()?;
            }
        }
        Command::Inbox {
            command: Some(InboxCommand::Retry(args)),
            ..
        } => {
            let api = Api::new(&global)?;
            let path = format!("/tenants/{}/inbox/{}/retry", args.tenant, args.segment());
            let v: RetryAnswer = api.call_as(Method::POST, &path, None).await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table if v.retried.is_empty() => {
                    println!("{}: no dead letters to retry", v.tenant)
                }
                Output::Table => println!(
                    "{}: retried {} (back at the head of the inbox, delivering now)",
                    v.tenant,
                    seq_list(&v.retried)
                ),
            }
        }
        Command::Inbox {
            command: Some(InboxCommand::Drop(args)),
            ..
        } => {
            let api = Api::new(&global)?;
            let path = format!("/tenants/{}/inbox/{}", args.tenant, args.segment());
            let v: DropAnswer = api.call_as(Method::DELETE, &path, None).await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table if v.dropped.is_empty() => {
                    println!("{}: no dead letters to drop", v.tenant)
                }
                Output::Table => println!("{}: dropped {}", v.tenant, seq_list(&v.dropped)),
            }
        }
        Command::Inbox {
            tenant,
            command: None,
        } => {
            let tenant = tenant.unwrap_or_default();
            let api = Api::new(&global)?;
            // Every page, however long the inbox.
            let mut v: InboxAnswer = api
                .call_as(Method::GET, &format!("/tenants/{tenant}/inbox"), None)
                .await?;
            while let Some(after) = v.next_after {
                let page: InboxAnswer = api
                    .call_as(
                        Method::GET,
                        &format!("/tenants/{tenant}/inbox?after={after}"),
                        None,
                    )
                    .await?;
                v.pending.extend(page.pending);
                v.dead.extend(page.dead);
                v.next_after = page.next_after;
            }
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => {
                    let mut rows = Vec::new();
                    for (list, state) in [(&v.pending, "pending"), (&v.dead, "dead")] {
                        for i in list {
                            rows.push(vec![
                                i.seq.to_string(),
                                i.update_id.to_string(),
                                state.to_owned(),
                                i.attempts.to_string(),
                                age(i.accepted_at_ms),
                                or_dash(i.last_error.as_ref()),
                            ]);
                        }
                    }
                    print_table(
                        &["SEQ", "UPDATE", "STATE", "ATTEMPTS", "AGE", "LAST ERROR"],
                        &rows,
                    );
                }
            }
        }
        Command::Snapshots { tenant } => {
            let api = Api::new(&global)?;
            let v: SnapshotList = api
                .call_as(Method::GET, &format!("/tenants/{tenant}/snapshots"), None)
                .await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = v
                        .snapshots
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.to_string(),
                                if s.head { "*".into() } else { String::new() },
                                s.reason.clone(),
                                human_bytes(s.size),
                                age(s.created_at_ms),
                                s.sha256.chars().take(12).collect(),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "HEAD", "REASON", "SIZE", "AGE", "SHA256"], &rows);
                }
            }
        }
        Command::Instances => {
            let api = Api::new(&global)?;
            let v: Vec<InstanceView> = api.call_as(Method::GET, "/instances", None).await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = v
                        .iter()
                        .map(|i| {
                            vec![
                                i.id.clone(),
                                or_dash(i.tenant.as_ref()),
                                i.state.clone(),
                                age(i.created_at_ms),
                            ]
                        })
                        .collect();
                    print_table(&["INSTANCE", "TENANT", "STATE", "AGE"], &rows);
                }
            }
        }
        Command::Secrets {
            command:
                SecretsCommand::Rotate {
                    no_new_key,
                    keep_old_keys,
                },
        } => {
            let api = Api::new(&global)?;
            let body = RotateRequest {
                new_key: !no_new_key,
                retire_old_keys: !keep_old_keys,
            };
            let v: RotateAnswer = api.send_as(Method::POST, "/secrets/rotate", &body).await?;
            print_object(global.output, &v);
            if !v.failed.is_empty() {
                return Err(CallError {
                    code: exit::FAILED,
                    message:
                        "some tenants' secrets could not be re-encrypted (listed under `failed`); \
                              the older keys were kept"
                            .into(),
                }
                .into());
            }
        }
        Command::Secrets {
            command: SecretsCommand::Keygen { file },
        } => {
            let text = otm_store::secrets::generate_key_file();
            match file {
                None => print!("{text}"),
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    f.write_all(text.as_bytes())
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote a new secret key file to {}", path.display());
                }
            }
        }
        Command::Status => {
            let api = Api::new(&global)?;
            let v: StatusView = api.call_as(Method::GET, "/status", None).await?;
            print_object(global.output, &v);
        }
        Command::Token { command } => {
            let api = Api::new(&global)?;
            match command {
                TokenCommand::Create { name, read_only } => {
                    let t: NewToken = api
                        .send_as(Method::POST, "/tokens", &CreateToken { name, read_only })
                        .await?;
                    match global.output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&t)?),
                        Output::Table => {
                            let kind = if t.read_only { "read-only" } else { "full" };
                            eprintln!(
                                "created the {kind} admin token `{}`; it is shown only now:",
                                t.name
                            );
                            println!("{}", t.token);
                        }
                    }
                }
                TokenCommand::List => {
                    let list: Vec<TokenView> = api.call_as(Method::GET, "/tokens", None).await?;
                    match global.output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                        Output::Table => {
                            let rows: Vec<Vec<String>> = list
                                .iter()
                                .map(|t| {
                                    vec![
                                        t.name.clone(),
                                        if t.read_only { "read-only" } else { "full" }.to_owned(),
                                        age(t.created_at_ms),
                                    ]
                                })
                                .collect();
                            print_table(&["NAME", "ACCESS", "AGE"], &rows);
                        }
                    }
                }
                TokenCommand::Revoke { name } => {
                    api.call(Method::DELETE, &format!("/tokens/{name}"), None)
                        .await?;
                    match global.output {
                        Output::Json => println!("{}", json!({"revoked": name})),
                        Output::Table => println!("admin token {name} revoked"),
                    }
                }
            }
        }
        Command::Audit { limit, before } => {
            let api = Api::new(&global)?;
            let mut path = format!("/audit?limit={limit}");
            if let Some(b) = before {
                path.push_str(&format!("&before={b}"));
            }
            let page: AuditPage = api.call_as(Method::GET, &path, None).await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = page
                        .entries
                        .iter()
                        .map(|e| {
                            vec![
                                e.id.to_string(),
                                age(e.at_ms),
                                e.who.clone(),
                                e.method.clone(),
                                e.route.clone(),
                                or_dash(e.tenant.as_ref()),
                                e.status.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &["ID", "AGE", "WHO", "METHOD", "ROUTE", "TENANT", "STATUS"],
                        &rows,
                    );
                }
            }
        }
        Command::Version => {
            let client = env!("CARGO_PKG_VERSION");
            let server = match Api::new(&global) {
                Ok(api) => api
                    .call_as::<StatusView>(reqwest::Method::GET, "/status", None)
                    .await
                    .ok()
                    .map(|v| v.version),
                Err(_) => None,
            };
            match global.output {
                Output::Json => println!("{}", json!({"client": client, "server": server})),
                Output::Table => {
                    println!("otm {client}");
                    if let Some(s) = server {
                        println!("server {s}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs a call; if it takes longer than a second, shows a progress line on stderr.
async fn with_progress<T>(
    what: &str,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut fut = std::pin::pin!(fut);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut shown = false;
    let result = loop {
        tokio::select! {
            r = &mut fut => break r,
            _ = tick.tick() => {
                shown = true;
                let _ = write!(std::io::stderr(), "\r{what}… {} s", started.elapsed().as_secs());
                let _ = std::io::stderr().flush();
            }
        }
    };
    if shown {
        let _ = writeln!(
            std::io::stderr(),
            "\r{what}… done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    result
}

fn str_of(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value as a table shows it; `-` when there is none.
fn or_dash(v: Option<&impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// An answer as JSON output shows it (keys in order, as the server's own answer reads).
fn to_value(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn age(ms: i64) -> String {
    let secs = ((otm_core::time::now_ms() - ms).max(0) / 1000) as u64;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / 1048576.0),
        n => format!("{:.1} GiB", n as f64 / 1073741824.0),
    }
}

fn print_tenants(out: Output, list: &[TenantView], as_list: bool) {
    if out == Output::Json {
        let v = if !as_list && list.len() == 1 {
            to_value(&list[0])
        } else {
            to_value(&list)
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.status.as_str().to_owned(),
                t.profile.clone(),
                format!("{}s", t.idle_timeout_s),
                or_dash(t.instance.as_ref()),
                t.inbox_pending.to_string(),
                age(t.last_active_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATUS",
            "PROFILE",
            "IDLE TIMEOUT",
            "INSTANCE",
            "PENDING",
            "LAST ACTIVE",
        ],
        &rows,
    );
}

/// Adds the resource-limit flags that were given to a create or update body.
fn put_limits(body: &mut PatchTenant, l: LimitArgs) {
    body.memory = l.memory.map(Value::String);
    body.cpu = l.cpu.map(Value::String);
    body.pids = l.pids.map(Value::String);
    body.disk = l.disk.map(Value::String);
    body.egress = l.egress;
    body.egress_allow = l.egress_allow;
    body.allowed_users = l.allow.map(|users| {
        users
            .into_iter()
            .filter(|u| !u.trim().is_empty())
            .map(Value::String)
            .collect()
    });
}

fn print_object(out: Output, v: &impl Serialize) {
    let v = &to_value(v);
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => {
            let rows: Vec<Vec<String>> = v
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            let shown = match v {
                                Value::Object(_) | Value::Array(_) => v.to_string(),
                                _ => str_of(v),
                            };
                            vec![k.clone(), shown]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["FIELD", "VALUE"], &rows);
        }
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}
