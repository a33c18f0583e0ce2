//! The shim as a process: the command line that `otm shim` and the small `otm-shim` binary
//! share, and the process both run (logging, a one-thread runtime, SIGTERM).
//!
//! One instance holds one shim for as long as it is awake, so the shim keeps little of its own:
//! a current-thread runtime (its work is waiting on sockets and one agent; archives are packed
//! and unpacked on blocking threads that exit when idle), and `otm-shim`, a binary without the
//! server, the stores and the operator CLI, so that the pages it maps are few and shared by every
//! shim on the machine.

use crate::server::ShimConfig;
use clap::Args;
use otm_core::Secret;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The small shim binary, installed beside `otm`.
pub const SMALL_BINARY: &str = "otm-shim";

/// The environment a runtime gives the shim beside its own settings: one malloc arena, so that
/// memory freed on the blocking threads (archives) is reused by the runtime's thread instead of
/// being kept in arenas of their own; and a fixed mmap threshold, so that the large buffers of
/// packing and unpacking an archive (zstd's window, tar's blocks) are mapped on their own and
/// handed back when freed, instead of raising glibc's threshold and staying in the heap after
/// every snapshot (about 4.5 MiB kept after a 20 MB state, without it). Agents never inherit it:
/// the shim starts them with an environment of their own.
pub const SHIM_ENV: &[(&str, &str)] = &[
    ("MALLOC_ARENA_MAX", "1"),
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
];

/// The arguments of `otm shim` and `otm-shim`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ShimArgs {
    /// Instance id.
    #[arg(long)]
    pub instance: String,
    /// Instance directory (state/, agent.log, tmp/).
    #[arg(long)]
    pub dir: PathBuf,
    /// Control address: unix:/path, tcp:host:port, or stdin (a listening Unix socket as
    /// standard input).
    #[arg(long)]
    pub listen: String,
    /// File holding the instance token; read once and removed.
    #[arg(long, conflicts_with = "token_env")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the instance token (for pods).
    #[arg(long)]
    pub token_env: Option<String>,
    /// otm's egress proxy as a Unix socket; the shim forwards a loopback port to it.
    #[arg(long)]
    pub egress: Option<PathBuf>,
    /// Start the agent in a sandbox of its own (bubblewrap).
    #[arg(long)]
    pub agent_sandbox: bool,
    /// A path the agent sandbox shows read-only (repeatable).
    #[arg(long)]
    pub show: Vec<PathBuf>,
    /// The agent's cgroup directory (with `--agent-sandbox`): the agent runs inside it and is
    /// frozen through it; without one it is frozen by SIGSTOP.
    #[arg(long)]
    pub agent_cgroup: Option<PathBuf>,
    /// After SIGTERM, seconds a bound shim keeps serving so that the orchestrator can take the
    /// final snapshot (pods: less than terminationGracePeriodSeconds); 0 stops at once.
    #[arg(long, default_value_t = 0)]
    pub term_grace_s: u64,
}

impl ShimArgs {
    /// The command line that gives these arguments again: `otm shim` hands itself over to
    /// `otm-shim` with it.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: &std::ffi::OsStr| {
            a.push(name.into());
            a.push(value.to_owned());
        };
        flag("--instance", self.instance.as_ref());
        flag("--dir", self.dir.as_os_str());
        flag("--listen", self.listen.as_ref());
        if let Some(f) = &self.token_file {
            flag("--token-file", f.as_os_str());
        }
        if let Some(v) = &self.token_env {
            flag("--token-env", v.as_ref());
        }
        if let Some(e) = &self.egress {
            flag("--egress", e.as_os_str());
        }
        for p in &self.show {
            flag("--show", p.as_os_str());
        }
        if let Some(d) = &self.agent_cgroup {
            flag("--agent-cgroup", d.as_os_str());
        }
        flag("--term-grace-s", self.term_grace_s.to_string().as_ref());
        if self.agent_sandbox {
            a.push("--agent-sandbox".into());
        }
        a
    }

    /// The shim's configuration. Reads the token (and removes its file: the agent runs as the
    /// same user). `otm` runs `otm sandbox-init` when no `otm-sandbox-init` is installed beside
    /// it.
    pub fn config(self, otm: PathBuf) -> Result<ShimConfig, String> {
        let token = match (&self.token_file, &self.token_env) {
            (Some(path), _) => {
                let t = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                std::fs::remove_file(path)
                    .map_err(|e| format!("removing {}: {e}", path.display()))?;
                t
            }
            (None, Some(var)) => std::env::var(var).map_err(|e| format!("reading ${var}: {e}"))?,
            (None, None) => {
                return Err("give the instance token with --token-file or --token-env".into());
            }
        };
        let agent_sandbox = if self.agent_sandbox {
            let bwrap = crate::sandbox::bwrap()
                .ok_or("--agent-sandbox needs bubblewrap (bwrap) on PATH")?;
            let view = crate::sandbox::SystemView {
                read_only: self.show,
                // The instance sandbox's /etc is already the minimal one: shown whole, one mount.
                etc: Some("/etc".into()),
                passwd: None,
                tmp_bytes: 256 << 20,
            };
            // A cgroup that cannot be used leaves the freezing to signals, as without one.
            let cgroup = self.agent_cgroup.as_deref().and_then(|dir| {
                crate::freezer::AgentCgroup::open(dir)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "the agent's cgroup cannot be used; the agent is frozen by SIGSTOP")
                    })
                    .ok()
                    .map(std::sync::Arc::new)
            });
            Some(std::sync::Arc::new(crate::sandbox::AgentSandbox {
                bwrap,
                otm,
                view,
                cgroup,
            }))
        } else {
            None
        };
        Ok(ShimConfig {
            instance: self.instance,
            dir: self.dir,
            listen: self.listen,
            token: Secret::new(token.trim()),
            egress: self.egress,
            agent_sandbox,
            term_grace: Duration::from_secs(self.term_grace_s),
        })
    }
}

/// `otm-shim` beside `otm`, when it is installed there.
pub fn small_binary(otm: &Path) -> Option<PathBuf> {
    let small = otm.with_file_name(SMALL_BINARY);
    small.is_file().then_some(small)
}

/// Runs the shim to its end and returns the process's exit code: logs to stderr (filtered by
/// `RUST_LOG`, info by default), serves on a current-thread runtime, and stops on SIGTERM.
/// `name` prefixes a fatal error; `otm` as in [`ShimArgs::config`].
pub fn main(name: &str, args: ShimArgs, otm: PathBuf) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    let fail = |e: &dyn std::fmt::Display| {
        // A closed stderr must not turn an error into a panic.
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("{name}: {e}\n"));
        std::process::ExitCode::FAILURE
    };
    let config = match args.config(otm) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Archives are packed on blocking threads; an idle shim keeps none of them.
        .thread_keep_alive(Duration::from_secs(2))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(async move {
        // SIGTERM (an evicted pod, a stopping runtime) is watched here and handed to the shim.
        let terminated = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let on_term = terminated.clone();
        tokio::spawn(async move {
            term.recv().await;
            on_term.cancel();
        });
        crate::run_shim(config, CancellationToken::new(), terminated).await
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ShimArgs,
    }

    fn parse(args: &[OsString]) -> ShimArgs {
        let argv = std::iter::once(OsString::from(SMALL_BINARY)).chain(args.iter().cloned());
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn handed_over_arguments_parse_back_to_the_same() {
        // Every field set (a field added later must be set here, and `to_args` must give it).
        let full = ShimArgs {
            instance: "i-1".into(),
            dir: "/data/instances/i-1".into(),
            listen: "stdin".into(),
            token_file: Some("/data/runtime/i-1/token".into()),
            token_env: None,
            egress: Some("/run/otm".into()),
            agent_sandbox: true,
            show: vec!["/usr/bin/otm".into(), "/opt/openclaw".into()],
            agent_cgroup: Some("/run/otm-cgroup".into()),
            term_grace_s: 20,
        };
        assert_eq!(parse(&full.to_args()), full);
        let pod = ShimArgs {
            instance: "i-2".into(),
            dir: "instance".into(),
            listen: "tcp:10.0.0.5:7070".into(),
            token_file: None,
            token_env: Some("OTM_SHIM_TOKEN".into()),
            egress: None,
            agent_sandbox: false,
            show: vec![],
            agent_cgroup: None,
            term_grace_s: 0,
        };
        assert_eq!(parse(&pod.to_args()), pod);
    }

    #[test]
    fn a_shim_without_a_token_is_refused() {
        let args = parse(
            &["--instance", "i", "--dir", "/nowhere", "--listen", "stdin"].map(OsString::from),
        );
        let e = args.config("/usr/bin/otm".into()).unwrap_err();
        assert!(e.contains("--token-file or --token-env"), "{e}");
    }
}
