//! The errors that keep the reference agent from starting or stop it.
//!
//! Failures while handling one update are not here: they become the webhook's HTTP answer (and
//! a log line) and the agent keeps running.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;

/// Why the agent cannot start or keep running. Messages never contain a secret value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file or directory cannot be read or written.
    #[error("state file {path}: {source}; check that OTM_AGENT_STATE_DIR is a writable directory")]
    StateIo { path: PathBuf, source: io::Error },
    /// The state file exists but is not valid state.
    #[error(
        "state file {path} is not valid reference-agent state: {source}; \
         restore it from a snapshot or move it away to start with empty state"
    )]
    StateCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The webhook address cannot be bound.
    #[error("cannot listen on {addr} (OTM_AGENT_LISTEN): {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// The HTTP client for the Bot API cannot be built.
    #[error("cannot build the Bot API HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The webhook server failed.
    #[error("webhook server failed: {0}")]
    Serve(#[source] io::Error),
}
