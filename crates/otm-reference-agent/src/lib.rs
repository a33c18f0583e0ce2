//! The reference agent: a tiny single-user Telegram bot that otm runs inside an instance for
//! demos and tests.
//!
//! It answers every text message with `#<n>: <text>`, where `n` counts the text messages that
//! chat has sent so far. The count lives in its state directory, so a right number after a sleep
//! and wake shows that the state survived. Each update is answered exactly once as far as
//! numbering goes: a redelivered update never gets a second number and a crash never loses one
//! (see [`state`]).
//!
//! `otm shim` starts it with its configuration in `OTM_*` environment variables ([`config`]);
//! the `otm-reference-agent` binary only calls [`main_from_env`].
//!
//! # Layout
//! - [`config`]: the environment variables and their validation.
//! - [`state`]: the durable state file (per-chat counts, seen update ids, pending replies).
//! - `bot_api`: the one Bot API call it makes, `sendMessage`.
//! - [`server`]: the webhook and health endpoints and the per-update logic.
//! - [`error`]: the errors that stop it.

mod bot_api;
pub mod config;
pub mod error;
pub mod server;
pub mod state;

use std::process::ExitCode;

pub use config::{Config, ConfigError};
pub use error::Error;
pub use server::ReferenceAgent;
pub use state::STATE_FILE_NAME;

/// Runs the agent as a process: reads the configuration from the environment, logs to stderr
/// (filter from `RUST_LOG`, default `info`), serves until SIGTERM or SIGINT.
///
/// Exit codes: 0 after a graceful stop, 1 when the agent could not start or failed while
/// running, 2 when the configuration is missing or invalid.
pub fn main_from_env() -> ExitCode {
    init_tracing();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("otm-reference-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("otm-reference-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let agent = ReferenceAgent::bind(config).await?;
        agent.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "reference agent stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Ignore the error: a subscriber may already be set when embedded.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Under `otm shim` stderr is captured into the instance's logs: no colour codes there.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Resolves on SIGTERM (how the shim stops the agent) or SIGINT. The handlers are installed
/// when this is called, not when it is first polled, so a stop during startup is not lost.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())
        .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGTERM"))
        .ok();
    let mut interrupt = signal(SignalKind::interrupt())
        .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGINT"))
        .ok();
    async move {
        let terminated = async {
            match terminate.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let interrupted = async {
            match interrupt.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = terminated => tracing::info!("SIGTERM received; stopping"),
            _ = interrupted => tracing::info!("SIGINT received; stopping"),
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received; stopping");
        } else {
            std::future::pending::<()>().await;
        }
    }
}
