//! The `local` runtime passes the runtime conformance suite, sandboxed and not, and trusts
//! nothing an instance could have written.

mod common;

use otm_core::{InstanceId, InstanceSpec, Runtime, Secret};
use otm_runtime::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn runtime(data_dir: &Path, sandbox: SandboxMode) -> LocalRuntime {
    LocalRuntime::new(LocalRuntimeConfig {
        data_dir: data_dir.to_path_buf(),
        otm_binary: PathBuf::from(env!("CARGO_BIN_EXE_otm")),
        sandbox,
        read_only: vec![],
        egress_dir: None,
        uid_base: otm_runtime::local::DEFAULT_UID_BASE,
        favor_dynmods: true,
    })
    .unwrap()
}

/// Kills an instance the way a crash would: its first process, from the runtime's own record.
fn crash(data_dir: &Path, id: &InstanceId) {
    let raw = std::fs::read(
        data_dir
            .join("runtime")
            .join(id.as_str())
            .join("record.json"),
    )
    .unwrap();
    let pid = serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["pid"]
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

async fn run(sandbox: SandboxMode) {
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let rt = runtime(&data, sandbox);
    otm_runtime::conformance::runtime_suite(Arc::new(rt), move |id| crash(&data, id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runtime_in_bubblewrap() {
    assert!(
        otm_runtime::local::which("bwrap").is_some(),
        "install bubblewrap: apt-get install bubblewrap"
    );
    run(SandboxMode::Bubblewrap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runtime_without_a_sandbox() {
    run(SandboxMode::None).await;
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        id: InstanceId::random(),
        shim_token: Secret::random(),
        tenant: None,
        limits: Default::default(),
        profile: None,
    }
}

/// What an agent can write (its own directories) is never taken for a record, a socket or a
/// pid; a forged record in the runtime's own directory is refused by its shape; nothing outside
/// an instance is ever deleted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_sockets_and_pids_are_ignored() {
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let rt = runtime(&data, SandboxMode::Bubblewrap);
    let s = spec();
    let created = rt.create(&s).await.unwrap();
    let inst = rt.instance_dir(&s.id);

    // A canary outside the instance, and an unrelated process.
    let canary = dir.path().join("canary-dir");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("keep"), b"keep").unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();

    // Everything the old layout trusted, planted where the agent can write, in every shape.
    for d in [inst.clone(), inst.join("state")] {
        let forged = serde_json::json!({"id": "../../canary-dir", "pid": bystander.id(), "address": "unix:/run/postgresql/.s.PGSQL.5432"});
        let _ = std::fs::write(d.join("runtime.json"), forged.to_string());
        let _ = std::fs::write(d.join("agent.pid"), bystander.id().to_string());
        let _ = std::os::unix::fs::symlink("/etc/passwd", d.join("record.json"));
        let _ = std::os::unix::fs::symlink(&canary, d.join("shim.sock"));
        let _ = nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        );
    }
    // And a record in the runtime's own directory whose id does not match its directory.
    let bad = data.join("runtime/i-000000000bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("record.json"),
        serde_json::json!({"id": "../../canary-dir", "pid": bystander.id()}).to_string(),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &data.join("runtime/i-00000000f1f0"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .ok();

    let listed = tokio::time::timeout(Duration::from_secs(5), rt.list())
        .await
        .expect("list never blocks on a FIFO")
        .unwrap();
    assert_eq!(
        listed.len(),
        1,
        "only the real instance is listed: {listed:?}"
    );
    assert_eq!(
        listed[0].address, created.address,
        "the address is the runtime's, not a planted one"
    );
    let again = runtime(&data, SandboxMode::Bubblewrap);
    assert_eq!(
        again.list().await.unwrap().len(),
        1,
        "a restarted runtime adopts only the real instance"
    );
    again.delete(&s.id).await.unwrap();
    again
        .delete(&InstanceId::parse("i-000000000bad").unwrap())
        .await
        .unwrap();

    assert!(
        canary.join("keep").exists(),
        "the canary outside the instance survived"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the unrelated process was not killed"
    );
    assert!(!inst.exists(), "the instance is gone");
    assert!(
        std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("root"),
        "a link's target was not touched"
    );
    let _ = bystander.kill();
}

/// A server restart adopts running instances through the runtime's records, and deleting one
/// kills every process in it (its cgroup), whatever the agent started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_instances_are_killed_whole() {
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let s = spec();
    {
        let rt = runtime(&data, SandboxMode::Bubblewrap);
        rt.create(&s).await.unwrap();
    }
    let rt = runtime(&data, SandboxMode::Bubblewrap);
    let listed = rt.list().await.unwrap();
    assert!(
        listed.iter().any(|i| i.id == s.id && i.alive),
        "adopted: {listed:?}"
    );
    let pids = instance_pids(&s.id);
    assert!(
        !pids.is_empty(),
        "the instance's processes are found through its cgroup"
    );
    rt.delete(&s.id).await.unwrap();
    for p in pids {
        assert!(
            !otm_runtime::local::process_alive(p),
            "process {p} of the instance outlived its deletion"
        );
    }
}

/// Deleting an instance whose agent is frozen in its cgroup kills the frozen processes too
/// (they die only once thawed) and leaves none of the instance's cgroups behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_frozen_agent_is_deleted_whole() {
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let rt = runtime(&data, SandboxMode::Bubblewrap);
    let s = spec();
    rt.create(&s).await.unwrap();
    let Some(cgroup) = common::instance_cgroup(s.id.as_str()) else {
        eprintln!("skipped: instances have no cgroups here (not root, or no hierarchy)");
        rt.delete(&s.id).await.unwrap();
        return;
    };
    let agent_dir = cgroup.agent_dir().expect("a freezer");
    let freezer = otm_shim::freezer::AgentCgroup::open(&agent_dir).unwrap();
    // The agent sandbox the shim makes ahead of its agent waits in the agent's cgroup.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while freezer.procs().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing joined the agent's cgroup"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agent: Vec<u32> = freezer.procs().iter().map(|p| *p as u32).collect();
    freezer.freeze(Duration::from_secs(5)).unwrap();
    let pids = instance_pids(&s.id);
    assert!(pids.len() > agent.len(), "the shim runs beside the agent");
    rt.delete(&s.id).await.unwrap();
    for p in pids.iter().chain(&agent) {
        assert!(
            !otm_runtime::local::process_alive(*p),
            "process {p} of the instance outlived its deletion"
        );
    }
    assert_eq!(cgroup.leftovers(), Vec::<PathBuf>::new());
}

/// The processes in an instance's cgroup (v1 pids controller or v2).
fn instance_pids(id: &InstanceId) -> Vec<u32> {
    for base in ["/sys/fs/cgroup/pids/otm", "/sys/fs/cgroup/otm"] {
        if let Ok(text) =
            std::fs::read_to_string(Path::new(base).join(id.as_str()).join("cgroup.procs"))
        {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    vec![]
}

/// The data directory must not lie inside anything shown to instances.
#[test]
fn a_data_dir_inside_a_shown_directory_is_refused() {
    let dir = common::tempdir();
    let prefix = dir.path().join("opt-otm");
    let err = LocalRuntime::new(LocalRuntimeConfig {
        data_dir: prefix.join("data"),
        otm_binary: PathBuf::from(env!("CARGO_BIN_EXE_otm")),
        sandbox: SandboxMode::Bubblewrap,
        read_only: vec![prefix.clone()],
        egress_dir: None,
        uid_base: otm_runtime::local::DEFAULT_UID_BASE,
        favor_dynmods: true,
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("contains the data directory") && err.contains("--data-dir"),
        "{err}"
    );
}

/// `/opt/otm/{otm,data}`: the binary's directory, where agents are installed beside it, holds
/// the data directory. Refused, naming the flag.
#[test]
fn a_data_dir_beside_the_binary_is_refused() {
    let dir = common::tempdir();
    let prefix = dir.path().join("opt-otm");
    std::fs::create_dir_all(&prefix).unwrap();
    let binary = prefix.join("otm");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_otm"), &binary).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_otm"), &binary).unwrap();
    }
    let err = LocalRuntime::new(LocalRuntimeConfig {
        data_dir: prefix.join("data"),
        otm_binary: binary,
        sandbox: SandboxMode::Bubblewrap,
        read_only: vec![],
        egress_dir: None,
        uid_base: otm_runtime::local::DEFAULT_UID_BASE,
        favor_dynmods: true,
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("contains the data directory") && err.contains("--data-dir"),
        "{err}"
    );
    assert!(
        !prefix.join("data").exists(),
        "refused before creating anything"
    );
}
