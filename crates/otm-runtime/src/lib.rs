//! Instance runtimes: where `otm shim` runs.
//!
//! # Layout
//! - [`local`]: the `local` runtime: each instance a sandboxed process tree on this machine.

pub mod local;

pub use local::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
