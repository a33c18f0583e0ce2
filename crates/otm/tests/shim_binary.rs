//! Which binary an instance's shim runs: the small `otm-shim` when it is installed beside `otm`,
//! else `otm shim`; either way the whole path (wake, delivery, reply) works through it.

mod common;

use common::Harness;
use otm_testkit::text_update;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A process of an instance: pid, the binary it runs (`/proc/<pid>/exe`), its command line.
type Process = (u32, PathBuf, Vec<String>);

/// The processes of the instances recorded under a data directory.
fn processes(data_dir: &Path) -> Vec<Process> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(data_dir.join("runtime"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(raw) = std::fs::read(d.path().join("record.json")) else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let mut todo = vec![record["pid"].as_u64().unwrap() as u32];
        while let Some(pid) = todo.pop() {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let argv: Vec<String> = std::fs::read(proc.join("cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if let Ok(exe) = std::fs::read_link(proc.join("exe")) {
                out.push((pid, exe, argv));
            }
            for task in std::fs::read_dir(proc.join("task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// The shims among them: the one process given its instance's id, bubblewrap aside.
fn shims(data_dir: &Path) -> Vec<Process> {
    processes(data_dir)
        .into_iter()
        .filter(|(_, exe, argv)| argv.iter().any(|a| a == "--instance") && !exe.ends_with("bwrap"))
        .collect()
}

/// A process's environment, `NAME=value` each.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Wakes a tenant with a message and waits for its answer.
async fn converse(h: &Harness) {
    let secret = h.tenant("alice", "1001:AAAalice").await;
    for i in 1..=2 {
        let update = text_update(100 + i, 500, &format!("hello {i}"));
        assert_eq!(h.post_update("alice", &secret, &update).await, 200);
        let got =
            h.tg.wait_for_messages("1001:AAAalice", i as usize, Duration::from_secs(60))
                .await;
        assert_eq!(got.len(), i as usize, "{got:?}");
        assert_eq!(got[i as usize - 1].text, format!("#{i}: hello {i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_runs_the_small_shim_beside_otm_and_answers_through_it() {
    let small = Path::new(env!("CARGO_BIN_EXE_otm")).with_file_name("otm-shim");
    assert!(
        small.is_file(),
        "cargo builds otm-shim beside otm for the tests"
    );
    let h = Harness::start().await;
    converse(&h).await;
    let shims = shims(&h.dir.path().join("d"));
    assert_eq!(shims.len(), 1, "one instance, one shim: {shims:?}");
    let (pid, exe, argv) = &shims[0];
    assert_eq!(
        exe,
        &small.canonicalize().unwrap(),
        "shim {pid} runs {argv:?}"
    );
    assert!(!argv.iter().any(|a| a == "shim"), "{argv:?}");
    // One malloc arena for the shim; the agent's environment is its own.
    let arena = "MALLOC_ARENA_MAX=1".to_owned();
    assert!(environ(*pid).contains(&arena), "{:?}", environ(*pid));
    let agent = processes(&h.dir.path().join("d"))
        .into_iter()
        .find(|(_, exe, _)| exe.ends_with("otm-reference-agent"))
        .expect("the agent runs");
    let env = environ(agent.0);
    assert!(!env.is_empty(), "the agent's environment is readable");
    assert!(!env.contains(&arena), "{env:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_small_shim_an_instance_runs_otm_shim() {
    // otm and the agent's binaries in a directory of their own, without otm-shim.
    let install = common::tempdir();
    let built = Path::new(env!("CARGO_BIN_EXE_otm")).parent().unwrap();
    for name in [
        "otm",
        "otm-reference-agent",
        "otm-sandbox-init",
        "otm-sandbox-exec",
    ] {
        let (from, to) = (built.join(name), install.path().join(name));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let otm = install.path().join("otm");
    let binary = otm.clone();
    let h = Harness::start_with(move |s| s.otm_binary = Some(binary)).await;
    converse(&h).await;
    let shims = shims(&h.dir.path().join("d"));
    assert_eq!(shims.len(), 1, "one instance, one shim: {shims:?}");
    let (pid, exe, argv) = &shims[0];
    assert_eq!(exe, &otm, "shim {pid} runs {argv:?}");
    assert_eq!(argv.get(1).map(String::as_str), Some("shim"), "{argv:?}");
    h.stop().await;
}
