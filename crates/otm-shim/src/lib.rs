//! `otm shim`: the supervisor that runs inside every instance, and its client.
//!
//! The shim listens on its control address (a Unix socket in the local runtime), accepts only
//! calls that carry the instance's own token, and supervises one agent process: it restores the
//! state directory, renders the agent's environment from its profile, starts the agent, waits until
//! it is ready, forwards updates to the agent's webhook, snapshots the state directory and stops
//! the agent gracefully. The agent's own ports are never exposed outside the instance.
//!
//! # Layout
//! - [`profile`]: agent profiles: how to run each kind of agent.
//! - [`agent`]: one supervised agent process.
//! - [`server`]: the control API served by `otm shim`.
//! - [`client`]: the orchestrator's side of that API.
//! - [`cli`]: the shim as a process: the command line of `otm shim` and `otm-shim`, its runtime.
//! - [`archive`]: tar + zstd archives of state directories, packed and unpacked as streams.
//! - [`pipe`]: byte streams between blocking archive code and async bodies.
//! - [`sandbox`]: the instance and agent sandboxes (bubblewrap arguments, seccomp filter, the
//!   sandbox's process 1).
//! - [`forward`]: the loopback forwarder to otm's egress proxy.
//! - [`loopback`]: plain HTTP to the agent's own ports (health checks, the webhook).
//! - [`freezer`]: the agent's cgroup, which freezes it where the instance has one.

pub mod agent;
pub mod archive;
pub mod cli;
pub mod client;
pub mod forward;
pub mod freezer;
pub mod loopback;
pub mod pipe;
pub mod profile;
pub mod sandbox;
pub mod server;

pub use client::ShimClient;
pub use profile::{AgentProfile, known_profiles};
pub use server::{ShimConfig, run as run_shim};
