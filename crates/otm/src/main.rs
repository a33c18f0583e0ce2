//! `otm`: one binary for the server, the instance shim, and the operator CLI.

mod cli;
mod demo;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use otm_core::Secret;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

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
    Shim(otm_shim::cli::ShimArgs),
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
    /// Print a shell completion script for otm: `otm completions bash > /etc/bash_completion.d/otm`,
    /// `otm completions zsh > "${fpath[1]}/_otm"`, `otm completions fish > ~/.config/fish/completions/otm.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages of otm and its subcommands, generated from this CLI's definition:
    /// into DIR (otm.1, otm-server.1, otm-tenant-create.1, ...), or otm(1) alone to stdout.
    Man {
        /// Where to write every page (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// An offline tour: a server with a stand-in Telegram, three tenants on the reference agent,
    /// a conversation, a sleep and a wake with memory intact, and wake latencies by phase.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Cli(cli::Command),
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// TOML file with the same settings as the flags below, by their names with `_` for `-`
    /// (flags and OTM_* variables win over it).
    #[arg(long, env = "OTM_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective settings as TOML, secrets redacted, and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: otm_server::Settings,
}

/// The exit code of a bad configuration (sysexits' EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Args, Debug)]
struct MigrateArgs {
    /// Registry URL: sqlite://…, postgres://…, dynamodb://<table-prefix>?region=…&endpoint=….
    #[arg(long, env = "OTM_REGISTRY")]
    registry: String,
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
    /// Join the cgroup whose `cgroup.procs` is open as this descriptor before anything else.
    #[arg(long, value_name = "FD")]
    cgroup_fd: Option<i32>,
    /// Read the agent, its arguments and its environment from this descriptor instead (a
    /// sandbox made ahead of its agent).
    #[arg(long, value_name = "FD", conflicts_with = "command")]
    wait_fd: Option<i32>,
    /// The agent and its arguments.
    #[arg(last = true, required_unless_present = "wait_fd")]
    command: Vec<std::ffi::OsString>,
}

fn main() -> std::process::ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // A flag `otm server` refuses is a bad configuration like any other.
            let code = if e.use_stderr() && for_server(std::env::args_os()) {
                EXIT_BAD_CONFIG
            } else {
                e.exit_code().clamp(0, 255) as u8
            };
            let _ = e.print();
            return std::process::ExitCode::from(code);
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // These run before any thread exists: the sandbox's two change credentials and wait for
    // signals, and the shim builds a runtime of its own.
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
            use otm_shim::sandbox::init::Program;
            let program = match a.wait_fd {
                Some(fd) => Program::Wait(fd),
                None => Program::Given {
                    program: a.command[0].clone(),
                    args: a.command[1..].to_vec(),
                },
            };
            let code = otm_shim::sandbox::init::run(program, &a.rw, a.cgroup_fd);
            return std::process::ExitCode::from(code.clamp(0, 255) as u8);
        }
        Command::Shim(a) => return shim(a),
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
            Command::Server(args) => {
                let server_matches = matches
                    .subcommand_matches("server")
                    .expect("the server command's matches");
                server(*args, server_matches).await
            }
            Command::Demo(args) => demo::run(args).await.map(|()| 0),
            Command::Completions { shell } => {
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "otm", &mut script);
                print_quietly(&script).map(|()| 0)
            }
            Command::Man { dir } => man_pages(dir).map(|()| 0),
            Command::Migrate(args) => {
                let registry = otm_store::open::migrate_registry(&args.registry).await?;
                let tenants = registry.list_tenants().await?.len();
                println!("registry ready ({tenants} tenants)");
                Ok(0)
            }
            Command::Cli(cmd) => cli::run(cmd, cli.global).await,
            Command::SandboxExec(_) | Command::SandboxInit(_) | Command::Shim(_) => {
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
            let bad_config = e
                .downcast_ref::<otm_server::config::InvalidSetting>()
                .is_some()
                || matches!(
                    e.downcast_ref::<otm_server::StartError>(),
                    Some(otm_server::StartError::Setting(_))
                );
            std::process::ExitCode::from(if bad_config { EXIT_BAD_CONFIG } else { 1 })
        }
    }
}

/// Whether a command line clap refused asks for `otm server`.
fn for_server(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .is_ok_and(|m| m.subcommand_name() == Some("server"))
}

async fn server(args: ServerArgs, matches: &clap::ArgMatches) -> anyhow::Result<u8> {
    let settings = otm_server::Settings::resolve(matches, args.config.as_deref())?;
    if args.print_config {
        settings.validate()?;
        print!("{}", settings.to_redacted_toml());
        return Ok(0);
    }
    // The admin token: OTM_ADMIN_TOKEN, else the file OTM_ADMIN_TOKEN_FILE names (a mounted
    // secret), else <data-dir>/admin.token (created on first start).
    let token = match (&settings.admin_token, &settings.admin_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(file)) => Some(Secret::new(cli::read_secret_file(
            file,
            "admin token (OTM_ADMIN_TOKEN_FILE)",
        )?)),
        (None, None) => None,
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
    let grace = Duration::from_secs(server.app.settings().shutdown_grace_s);
    server.shutdown(grace, false).await;
    Ok(0)
}

/// `otm shim`: becomes `otm-shim` when it is installed beside otm (a pod's command is `otm
/// shim` whatever its image holds), else runs the shim here.
fn shim(args: otm_shim::cli::ShimArgs) -> std::process::ExitCode {
    let otm = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "otm shim: finding the otm binary: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(small) = otm_shim::cli::small_binary(&otm) {
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(&small)
            .args(args.to_args())
            .exec();
        let _ = writeln!(
            std::io::stderr(),
            "otm shim: cannot run {}: {e}; serving here",
            small.display()
        );
    }
    otm_shim::cli::main("otm shim", args, otm)
}

/// otm(1) to stdout, or a page for otm and every visible subcommand into `dir`.
fn man_pages(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        return print_quietly(&page);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, &dir)
        .with_context(|| format!("writing into {}", dir.display()))?;
    let n = std::fs::read_dir(&dir)?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count();
    eprintln!("{n} manual pages in {}", dir.display());
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is no error.
fn print_quietly(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
