//! The `local` runtime passes the runtime conformance suite, sandboxed and not.

use otm_runtime::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
use std::path::PathBuf;
use std::sync::Arc;

async fn run(sandbox: SandboxMode) {
    let dir = tempfile::Builder::new().prefix("otm").tempdir_in("/tmp").unwrap();
    let rt = LocalRuntime::new(LocalRuntimeConfig {
        data_dir: dir.path().join("d"),
        otm_binary: PathBuf::from(env!("CARGO_BIN_EXE_otm")),
        sandbox,
        read_only: vec![],
    })
    .unwrap();
    let probe = rt.clone();
    otm_runtime::conformance::runtime_suite(Arc::new(rt), move |id| {
        let raw = std::fs::read(probe.instance_dir(id).join("runtime.json")).unwrap();
        let pid = serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["pid"].as_i64().unwrap();
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runtime_in_bubblewrap() {
    assert!(otm_runtime::local::which("bwrap").is_some(), "install bubblewrap: apt-get install bubblewrap");
    run(SandboxMode::Bubblewrap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runtime_without_a_sandbox() {
    run(SandboxMode::None).await;
}
