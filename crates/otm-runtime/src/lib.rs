//! Instance runtimes: where `otm shim` runs.
//!
//! # Layout
//! - [`local`]: the `local` runtime: each instance a sandboxed process tree on this machine.
//! - [`conformance`]: the suite every runtime must pass.

pub mod conformance;
pub mod local;

pub use local::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
