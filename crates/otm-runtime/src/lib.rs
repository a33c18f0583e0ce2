//! Instance runtimes: where `otm shim` runs.
//!
//! # Layout
//! - [`local`]: the `local` runtime: each instance a sandboxed process tree on this machine.
//! - [`cgroup`]: per-instance cgroups (limits, limit events, kill).
//! - [`exec`]: `otm sandbox-exec`, the first process of every local instance.
//! - [`kube`]: the `kube` runtime: each instance a pod (feature `kube`).
//! - `conformance` (cargo feature `conformance`, for tests only): the suite every runtime must
//!   pass.

pub mod cgroup;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod exec;
#[cfg(feature = "kube")]
pub mod kube;
pub mod local;

pub use local::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
