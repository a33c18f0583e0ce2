//! `otm`: one binary for the server, the instance shim, and the operator CLI.

mod cli;
mod demo;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use otm_core::Secret;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Run single-user AI agents (OpenClaw, or the built-in reference agent) as a multi-tenant
/// service: every tenant gets its own sandboxed instance that wakes on a Telegram message,
/// sleeps when idle and keeps its state across sleeps.
#[derive(Parser, Debug)]
#[command(name = "otm", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane: webhook ingress, inboxes, orchestrator, Bot API proxy, admin API.
    ///
    /// The admin token comes from OTM_ADMIN_TOKEN, else the file OTM_ADMIN_TOKEN_FILE names,
    /// else <data-dir>/admin.token (generated on first start, mode 0600).
    Server(Box<ServerArgs>),
    /// Run inside an instance: supervise one agent (started by the runtime, not by hand).
    Shim(ShimArgs),
    /// Internal: the first process of a local instance (joins its cgroups, drops privileges,
    /// executes the sandbox).
    #[command(hide = true)]
    SandboxExec(SandboxExecArgs),
    /// Internal: process 1 of an agent sandbox (passes signals on, reaps orphans).
    #[command(hide = true)]
    SandboxInit(SandboxInitArgs),
    /// Prepare the registry's storage: apply migrations (SQLite, PostgreSQL) or create the tables
    /// (DynamoDB). Servers migrate SQL registries at start too; DynamoDB tables need this once.
    Migrate(MigrateArgs),
    /// An offline tour: a server with a stand-in Telegram, three tenants on the reference agent,
    /// a conversation, a sleep and a wake with memory intact, and wake latencies by phase.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Cli(cli::Command),
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// TOML file with the same settings as the flags below (flags and OTM_* variables win).
    #[arg(long, env = "OTM_CONFIG")]
    config: Option<PathBuf>,
    /// Public listener: Telegram webhooks (POST /tg/{tenant}) and GET /healthz [default: 127.0.0.1:8080].
    #[arg(long, env = "OTM_LISTEN")]
    listen: Option<String>,
    /// Admin listener: the /v1/ API and /metrics [default: 127.0.0.1:8081].
    #[arg(long, env = "OTM_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Egress listener: the Bot API proxy agents call [default: 127.0.0.1:8082].
    #[arg(long, env = "OTM_EGRESS_LISTEN")]
    egress_listen: Option<String>,
    /// The Bot API proxy's URL as agents see it [default: http://<egress listener>].
    #[arg(long, env = "OTM_EGRESS_URL")]
    egress_url: Option<String>,
    /// The Telegram Bot API root [default: https://api.telegram.org].
    #[arg(long, env = "OTM_TELEGRAM_API")]
    telegram_api: Option<String>,
    /// This server's public URL; when set, creating a tenant with a bot token registers its
    /// webhook at {public-url}/tg/{id}, and deleting the tenant removes it.
    #[arg(long, env = "OTM_PUBLIC_URL")]
    public_url: Option<String>,
    /// Registry URL [default: sqlite://<data-dir>/otm.db].
    #[arg(long, env = "OTM_REGISTRY")]
    registry: Option<String>,
    /// Coordinator URL [default: memory].
    #[arg(long, env = "OTM_COORDINATOR")]
    coordinator: Option<String>,
    /// State store URL for snapshots [default: file://<data-dir>/state].
    #[arg(long, env = "OTM_STATE")]
    state: Option<String>,
    /// Instance sandbox: auto or bubblewrap (bubblewrap; the server refuses to start without
    /// it), or none (development only: instances are not isolated, and every start says so)
    /// [default: auto].
    #[arg(long, env = "OTM_SANDBOX")]
    sandbox: Option<String>,
    /// First uid of the range instances run as when otm runs as root; 65,536 uids from there
    /// must belong to nobody else [default: 1500000000].
    #[arg(long, env = "OTM_SANDBOX_UID_BASE")]
    sandbox_uid_base: Option<u32>,
    /// Accept tenants on the `probe` profile: the reference agent answering `/sh <command>` with
    /// the command's output, run inside the sandbox. For testing sandboxes only.
    #[arg(long, env = "OTM_ALLOW_PROBE_PROFILE")]
    allow_probe_profile: bool,
    /// Failed deliveries of one update before it moves to the dead-letter list [default: 10].
    #[arg(long, env = "OTM_MAX_DELIVERY_ATTEMPTS")]
    max_delivery_attempts: Option<u32>,
    /// What this process runs: all; router (webhooks, inboxes, dispatch, Bot API proxy); or
    /// orchestrator (admin API, wakes, stops, reaper, warm pool, reconciler) [default: all].
    #[arg(long, env = "OTM_ROLE", value_parser = ["all", "router", "orchestrator"])]
    role: Option<String>,
    /// Orchestrator URLs a router calls (their admin listeners), comma-separated.
    #[arg(long, env = "OTM_ORCHESTRATOR_URL")]
    orchestrator_url: Option<String>,
    /// Lifetime of wake locks and dispatcher leases, renewed while held, in seconds [default: 15].
    #[arg(long, env = "OTM_LEASE_TTL_S")]
    lease_ttl_s: Option<u64>,
    /// How long a delivered update's id is remembered to drop Telegram's redeliveries, in
    /// seconds; its text is dropped at delivery, the id after this [default: 86400].
    #[arg(long, env = "OTM_DEDUPE_WINDOW_S")]
    dedupe_window_s: Option<u64>,
    /// Where scripts/install-openclaw put Node 24 and OpenClaw, for tenants on the openclaw
    /// profile [default: <data-dir>/openclaw, then openclaw on PATH].
    #[arg(long, env = "OTM_OPENCLAW_PREFIX")]
    openclaw_prefix: Option<PathBuf>,
    /// JSON5 template of the OpenClaw gateway config [default: built in; see docs/openclaw.md].
    #[arg(long, env = "OTM_OPENCLAW_CONFIG_TEMPLATE")]
    openclaw_config_template: Option<PathBuf>,
    /// The model provider's OpenAI-compatible base URL, e.g. https://api.openai.com/v1. Agents
    /// reach it through the egress listener, which adds the key from OTM_MODEL_API_KEY (an
    /// environment variable only, or model_api_key in the TOML file).
    #[arg(long, env = "OTM_MODEL_BASE_URL")]
    model_base_url: Option<String>,
    /// The model id at that provider.
    #[arg(long, env = "OTM_MODEL_ID")]
    model_id: Option<String>,
    /// Model requests a minute each tenant may make through the model proxy, unless the tenant
    /// has its own budget [default: no limit].
    #[arg(long, env = "OTM_MODEL_REQUESTS_PER_MINUTE")]
    model_requests_per_minute: Option<u32>,
    /// Model tokens a UTC day each tenant may use, as the provider reports them, unless the
    /// tenant has its own budget [default: no limit].
    #[arg(long, env = "OTM_MODEL_TOKENS_PER_DAY")]
    model_tokens_per_day: Option<u64>,
    /// Messages a second each bot may send through the Bot API proxy; more wait their turn
    /// (0: no limit) [default: 30, Telegram's limit].
    #[arg(long, env = "OTM_BOT_MESSAGES_PER_SECOND")]
    bot_messages_per_second: Option<u32>,
    /// Least milliseconds between two messages of a bot to one chat (0: no limit)
    /// [default: 1000, Telegram's one a second].
    #[arg(long, env = "OTM_BOT_CHAT_INTERVAL_MS")]
    bot_chat_interval_ms: Option<u64>,
    /// Messages a minute a bot may send to one group chat (0: no limit) [default: 20].
    #[arg(long, env = "OTM_BOT_GROUP_MESSAGES_PER_MINUTE")]
    bot_group_messages_per_minute: Option<u32>,
    /// The key file that encrypts bot tokens and webhook secrets at rest and signs shim tokens
    /// and cached endpoints (`otm secrets keygen` writes one; every replica needs the same)
    /// [default: <data-dir>/secret.key, generated on first start, mode 0600].
    #[arg(long, env = "OTM_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
}

impl ServerArgs {
    fn settings(&self, data_dir: Option<PathBuf>) -> anyhow::Result<otm_server::Settings> {
        let mut s = match &self.config {
            Some(path) => otm_server::Settings::from_toml_file(path)?,
            None => otm_server::Settings::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { s.$field = v.clone().into(); } )* };
        }
        set!(listen, admin_listen, egress_listen, telegram_api, sandbox);
        if let Some(d) = data_dir {
            s.data_dir = d;
        }
        macro_rules! set_opt {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { s.$field = Some(v.clone()); } )* };
        }
        set_opt!(
            egress_url,
            public_url,
            registry,
            coordinator,
            state,
            openclaw_prefix,
            openclaw_config_template,
            secret_key_file
        );
        set_opt!(
            model_base_url,
            model_id,
            model_requests_per_minute,
            model_tokens_per_day
        );
        if let Some(n) = self.max_delivery_attempts {
            s.max_delivery_attempts = n;
        }
        if let Some(n) = self.sandbox_uid_base {
            s.sandbox_uid_base = n;
        }
        if self.allow_probe_profile {
            s.allow_probe_profile = true;
        }
        if let Some(r) = &self.role {
            s.role = r.clone();
        }
        if let Some(u) = &self.orchestrator_url {
            s.orchestrator_url = Some(u.clone());
        }
        if let Some(t) = self.lease_ttl_s {
            s.lease_ttl_s = t;
        }
        if let Some(w) = self.dedupe_window_s {
            s.dedupe_window_s = w;
        }
        if let Some(n) = self.bot_messages_per_second {
            s.bot_messages_per_second = n;
        }
        if let Some(n) = self.bot_chat_interval_ms {
            s.bot_chat_interval_ms = n;
        }
        if let Some(n) = self.bot_group_messages_per_minute {
            s.bot_group_messages_per_minute = n;
        }
        // The service token comes from the environment only, never from a flag (process lists).
        if let Some(t) = std::env::var("OTM_SERVICE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            s.service_token = Some(Secret::new(t));
        }
        // So does the model API key.
        if let Some(k) = std::env::var("OTM_MODEL_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            s.model_api_key = Some(Secret::new(k));
        }
        Ok(s)
    }
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// Registry URL: sqlite://…, postgres://…, dynamodb://<table-prefix>?region=…&endpoint=….
    #[arg(long, env = "OTM_REGISTRY")]
    registry: String,
}

#[derive(Args, Debug)]
struct ShimArgs {
    /// Instance id.
    #[arg(long)]
    instance: String,
    /// Instance directory (state/, agent.log, tmp/).
    #[arg(long)]
    dir: PathBuf,
    /// Control address: unix:/path or tcp:host:port.
    #[arg(long)]
    listen: String,
    /// File holding the instance token; read once and removed.
    #[arg(long, conflicts_with = "token_env")]
    token_file: Option<PathBuf>,
    /// Environment variable holding the instance token (for pods).
    #[arg(long)]
    token_env: Option<String>,
    /// otm's egress proxy as a Unix socket; the shim forwards a loopback port to it.
    #[arg(long)]
    egress: Option<PathBuf>,
    /// Start the agent in a sandbox of its own (bubblewrap).
    #[arg(long)]
    agent_sandbox: bool,
    /// A path the agent sandbox shows read-only (repeatable).
    #[arg(long)]
    show: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct SandboxExecArgs {
    /// A `cgroup.procs` file to join (repeatable).
    #[arg(long)]
    cgroup_procs: Vec<PathBuf>,
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    gid: Option<u32>,
    /// RLIMIT_NOFILE.
    #[arg(long, default_value_t = 4096)]
    nofile: u64,
    /// RLIMIT_FSIZE in bytes.
    #[arg(long)]
    fsize: Option<u64>,
    /// A descriptor to pass on (repeatable).
    #[arg(long)]
    keep_fd: Vec<i32>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args, Debug)]
struct SandboxInitArgs {
    /// A directory the agent may write (Landlock); repeatable. Everything else is read-only.
    #[arg(long = "rw", value_name = "DIR")]
    rw: Vec<std::path::PathBuf>,
    /// The agent and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // These two run before any thread exists: they change credentials and wait for signals.
    match cli.command {
        Command::SandboxExec(a) => {
            let mut command = a.command.into_iter();
            let program = command.next().unwrap_or_default();
            let plan = otm_runtime::exec::ExecPlan {
                cgroup_procs: a.cgroup_procs,
                uid: a.uid,
                gid: a.gid,
                nofile: a.nofile,
                fsize: a.fsize,
                keep_fds: a.keep_fd,
                program,
                args: command.collect(),
            };
            let e = otm_runtime::exec::run(plan);
            let _ = writeln!(std::io::stderr(), "otm sandbox-exec: {e}");
            return std::process::ExitCode::from(126);
        }
        Command::SandboxInit(a) => {
            let code = otm_shim::sandbox::init::run(&a.command[0], &a.command[1..], &a.rw);
            return std::process::ExitCode::from(code.clamp(0, 255) as u8);
        }
        _ => {}
    }
    // The CLI and the demo print for people: only warnings unless RUST_LOG says otherwise.
    let default = if matches!(cli.command, Command::Cli(_) | Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(args) => server(*args, cli.global.data_dir).await.map(|()| 0),
            Command::Shim(args) => shim(args).await.map(|()| 0),
            Command::Demo(args) => demo::run(args).await.map(|()| 0),
            Command::Migrate(args) => {
                let registry = otm_store::open::migrate_registry(&args.registry).await?;
                let tenants = registry.list_tenants().await?.len();
                println!("registry ready ({tenants} tenants)");
                Ok(0)
            }
            Command::Cli(cmd) => cli::run(cmd, cli.global).await,
            Command::SandboxExec(_) | Command::SandboxInit(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            // A closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "otm: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn server(args: ServerArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = args.settings(data_dir)?;
    // The admin token: OTM_ADMIN_TOKEN, else the file OTM_ADMIN_TOKEN_FILE names (a mounted
    // secret), else <data-dir>/admin.token (created on first start).
    let token = match std::env::var("OTM_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        Some(t) => Some(Secret::new(t)),
        None => match std::env::var_os("OTM_ADMIN_TOKEN_FILE").filter(|f| !f.is_empty()) {
            Some(file) => Some(Secret::new(cli::read_secret_file(
                std::path::Path::new(&file),
                "admin token (OTM_ADMIN_TOKEN_FILE)",
            )?)),
            None => None,
        },
    };
    let server = otm_server::start(settings, token).await?;
    println!(
        "otm server: webhooks on http://{}/tg/<tenant>, admin API on http://{}/v1/, Bot API proxy on http://{}",
        server.public_addr, server.admin_addr, server.egress_addr
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; instances keep running and are adopted at the next start");
    server.shutdown(Duration::from_secs(10), false).await;
    Ok(())
}

async fn shim(args: ShimArgs) -> anyhow::Result<()> {
    let token = match (&args.token_file, &args.token_env) {
        (Some(path), _) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            // The agent runs as the same user: leave nothing for it to find.
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            t
        }
        (None, Some(var)) => std::env::var(var).with_context(|| format!("reading ${var}"))?,
        (None, None) => anyhow::bail!("give the instance token with --token-file or --token-env"),
    };
    let agent_sandbox = if args.agent_sandbox {
        let bwrap = otm_shim::sandbox::bwrap()
            .context("--agent-sandbox needs bubblewrap (bwrap) on PATH")?;
        let otm = std::env::current_exe().context("finding the otm binary")?;
        let view = otm_shim::sandbox::SystemView {
            read_only: args.show,
            // The instance sandbox's /etc is already the minimal one: shown whole, one mount.
            etc: Some("/etc".into()),
            passwd: None,
            tmp_bytes: 256 << 20,
        };
        Some(std::sync::Arc::new(otm_shim::sandbox::AgentSandbox {
            bwrap,
            otm,
            view,
        }))
    } else {
        None
    };
    let config = otm_shim::ShimConfig {
        instance: args.instance,
        dir: args.dir,
        listen: args.listen,
        token: Secret::new(token.trim()),
        egress: args.egress,
        agent_sandbox,
    };
    otm_shim::run_shim(config, CancellationToken::new()).await?;
    Ok(())
}
