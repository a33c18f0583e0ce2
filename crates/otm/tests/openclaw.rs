//! Tenants on the `openclaw` profile with a real OpenClaw gateway, offline: the stand-in Telegram
//! and the stub model on loopback.
//!
//! OpenClaw is found through `OTM_OPENCLAW_PREFIX` (what `scripts/install-openclaw --prefix`
//! installed; CI sets it). Without that variable the gateway tests print "skipped" and pass, so
//! `cargo test` works on a machine without OpenClaw; with it set but nothing installed there, they
//! fail. At most two gateways run at a time (each takes about 1 GB and a core for 20 to 40 s).
//!
//! Run with `--nocapture` to see the measurements (`docs/openclaw.md`).

mod common;

use common::{Harness, PUBLIC_URL};
use otm_core::Secret;
use otm_testkit::{StubModel, text_update};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The operator's model API key: it must reach the stub model, and never an instance.
const MODEL_KEY: &str = "sk-operator-REAL-model-key-0f3c9a";
/// How long a wake plus the first turn may take on a loaded 2-core machine.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// One OpenClaw test at a time: with two gateways in the side-by-side test, never more than two.
static GATEWAYS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The OpenClaw prefix, or `None` (after printing "skipped") when the tests should not run.
fn openclaw_prefix(test: &str) -> Option<PathBuf> {
    let Some(prefix) = std::env::var_os("OTM_OPENCLAW_PREFIX").filter(|p| !p.is_empty()) else {
        eprintln!(
            "{test}: skipped: OTM_OPENCLAW_PREFIX is not set (scripts/install-openclaw --prefix DIR installs OpenClaw)"
        );
        return None;
    };
    let prefix = PathBuf::from(prefix);
    assert!(
        prefix.join("bin/openclaw").is_file() && prefix.join("bin/node").exists(),
        "OTM_OPENCLAW_PREFIX={} holds no OpenClaw installation (bin/openclaw, bin/node): run scripts/install-openclaw --prefix {0}",
        prefix.display()
    );
    Some(prefix)
}

/// Where the server finds OpenClaw: given as `openclaw_prefix`, or in its default place,
/// `<data-dir>/openclaw` (here a link to the prefix), which the sandbox hides with the rest of
/// the data directory and must show again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    Given,
    InDataDir,
}

async fn start(prefix: &Path, found: Found, stub: &StubModel, snapshot_interval_s: u64) -> Harness {
    let prefix = prefix.to_path_buf();
    let model = stub.base_url();
    Harness::start_with(move |s| {
        match found {
            Found::Given => s.openclaw_prefix = Some(prefix),
            Found::InDataDir => {
                std::fs::create_dir_all(&s.data_dir).unwrap();
                std::os::unix::fs::symlink(&prefix, s.data_dir.join("openclaw")).unwrap();
            }
        }
        s.model_base_url = Some(model);
        s.model_id = Some(otm_testkit::stub_model::STUB_MODEL_ID.into());
        s.model_api_key = Some(Secret::new(MODEL_KEY));
        s.wake_timeout_s = 300;
        s.snapshot_interval_s = snapshot_interval_s;
        s.snapshot_keep = 20;
    })
    .await
}

/// The Telegram user the tests write as (`text_update`'s chats are private: chat id = user id).
const OWNER: i64 = 42;

/// Creates a tenant on the openclaw profile whose owner is [`OWNER`]; returns the webhook
/// secret Telegram was given.
async fn openclaw_tenant(h: &Harness, id: &str, token: &str) -> String {
    h.tg.add_bot(token);
    let body = json!({"id": id, "bot_token": token, "profile": "openclaw", "idle_timeout_s": 3600,
        "allowed_users": [OWNER.to_string()]});
    let (status, v) = h.api(Method::POST, "/tenants", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    h.tg.webhook(token)
        .expect("webhook registered")
        .secret_token
        .expect("secret given to Telegram")
}

/// Posts one text message and waits for the bot's next reply; returns it and how long it took.
async fn exchange(
    h: &Harness,
    tenant: &str,
    secret: &str,
    token: &str,
    update_id: i64,
    text: &str,
) -> (String, Duration) {
    let have = h.tg.sent_messages(token).len();
    let sent = Instant::now();
    assert_eq!(
        h.post_update(tenant, secret, &text_update(update_id, OWNER, text))
            .await,
        200
    );
    let got = h.tg.wait_for_messages(token, have + 1, REPLY_TIMEOUT).await;
    if got.len() <= have {
        let (_, logs) = h
            .api(
                Method::GET,
                &format!("/tenants/{tenant}/logs?tail=60"),
                None,
            )
            .await;
        let (_, inbox) = h
            .api(Method::GET, &format!("/tenants/{tenant}/inbox"), None)
            .await;
        panic!(
            "no reply from {tenant} to {text:?} within {REPLY_TIMEOUT:?}\ninbox: {inbox}\nlogs: {logs}"
        );
    }
    (got[have].text.clone(), sent.elapsed())
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The instance directory of a tenant's running instance.
async fn instance_dir(h: &Harness, tenant: &str) -> PathBuf {
    let (_, t) = h
        .api(Method::GET, &format!("/tenants/{tenant}"), None)
        .await;
    let id = t["instance"]
        .as_str()
        .unwrap_or_else(|| panic!("{tenant} has no instance: {t}"))
        .to_owned();
    h.dir.path().join("d/instances").join(id)
}

/// Host pids of the processes started with this instance's OpenClaw state directory.
fn gateway_pids(instance: &Path) -> Vec<u32> {
    let marker = format!("OPENCLAW_STATE_DIR={}/state", instance.display());
    pids_where(|environ, _| environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
}

/// Host pids whose environment or command line satisfies `f`.
fn pids_where(f: impl Fn(&[u8], &[u8]) -> bool) -> Vec<u32> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    proc.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            (!zombie && f(&environ, &cmdline)).then_some(pid)
        })
        .collect()
}

fn env_of(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            std::str::from_utf8(kv)
                .ok()?
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Resident memory of a set of processes, in MiB.
fn rss_mib(pids: &[u32]) -> f64 {
    let kib: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum();
    kib as f64 / 1024.0
}

/// Loopback TCP ports these processes listen on.
fn listening_ports(pids: &[u32]) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(inode) = std::fs::read_link(fd.path()).ok().and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) {
                inodes.insert(inode);
            }
        }
    }
    let mut ports = HashSet::new();
    // The tables of the processes' own network namespace.
    let Some(pid) = pids.first() else {
        return ports;
    };
    for table in [
        format!("/proc/{pid}/net/tcp"),
        format!("/proc/{pid}/net/tcp6"),
    ] {
        let Ok(text) = std::fs::read_to_string(&table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let port = cols[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(inode)) = (port, cols[9].parse::<u64>())
                && inodes.contains(&inode)
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// Paths of open files of these processes.
fn open_paths(pids: &[u32]) -> Vec<PathBuf> {
    let mut out = vec![];
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        out.extend(
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|p| p.is_absolute()),
        );
    }
    out
}

/// Every regular file under `dir` that contains one of `needles`.
fn files_containing(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let Ok(bytes) = std::fs::read(e.path()) else {
                    continue;
                };
                for n in needles {
                    if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                        found.push(format!("{} contains {n}", e.path().display()));
                    }
                }
            }
        }
    }
    found
}

/// The number in "earlier user turns: N" of a stub model reply.
fn earlier_turns(reply: &str) -> Option<usize> {
    reply
        .split("earlier user turns: ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sums of `otm_wake_phase_seconds` for cold wakes, by phase, and of `otm_wake_seconds`.
async fn cold_wake_sums(h: &Harness) -> BTreeMap<String, f64> {
    let text = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !name.contains("path=\"cold\"") {
            continue;
        }
        if name.starts_with("otm_wake_phase_seconds_sum{") {
            if let Some(phase) = name
                .split("phase=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                out.insert(phase.to_owned(), value);
            }
        } else if name.starts_with("otm_wake_seconds_sum{") {
            out.insert("total".to_owned(), value);
        }
    }
    out
}

fn delta_ms(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                ((v - before.get(k).copied().unwrap_or(0.0)) * 1000.0).round() as u64,
            )
        })
        .collect()
}

async fn snapshots(h: &Harness, tenant: &str) -> (Option<String>, Vec<Value>) {
    let (_, s) = h
        .api(Method::GET, &format!("/tenants/{tenant}/snapshots"), None)
        .await;
    (
        s["head"].as_str().map(str::to_owned),
        s["snapshots"].as_array().cloned().unwrap_or_default(),
    )
}

/// Unpacks a stored snapshot of a tenant into a fresh directory.
fn unpack_snapshot(h: &Harness, tenant: &str, id: &str) -> tempfile::TempDir {
    let path = h
        .dir
        .path()
        .join(format!("d/state/tenants/{tenant}/snapshots/{id}.tar.zst"));
    let archive = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let out = tempfile::Builder::new()
        .prefix("otm-oc-snap")
        .tempdir_in("/tmp")
        .unwrap();
    otm_shim::archive::unpack(
        std::io::BufReader::new(archive),
        out.path(),
        &otm_shim::archive::Caps::default(),
    )
    .unwrap();
    out
}

/// Runs SQLite's integrity check with OpenClaw's own Node on every SQLite database in `dir`.
fn sqlite_integrity(prefix: &Path, dir: &Path) -> Vec<(String, String)> {
    let script = r#"
const { DatabaseSync } = require('node:sqlite');
const fs = require('fs'), path = require('path');
const out = [];
(function walk(d) {
  for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const p = path.join(d, e.name);
    if (e.isDirectory()) walk(p);
    else if (/\.sqlite$/.test(e.name) && fs.statSync(p).size > 0) {
      const db = new DatabaseSync(p);
      out.push([path.relative(process.argv[1], p), db.prepare('PRAGMA integrity_check').get().integrity_check]);
      db.close();
    }
  }
})(process.argv[1]);
console.log(JSON.stringify(out));
"#;
    let run = std::process::Command::new(prefix.join("bin/node"))
        .args(["-e", script, &dir.display().to_string()])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "integrity check failed to run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

/// The whole life of one OpenClaw tenant: a cold wake answers through the Bot API proxy with the
/// model reached through otm's egress, the instance holds neither the bot token nor the model key,
/// it sleeps with a final snapshot and a message wakes it with OpenClaw's conversation intact,
/// and a snapshot taken while the gateway runs restores a consistent state after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openclaw_tenant_answers_sleeps_and_wakes_with_its_conversation() {
    let Some(prefix) =
        openclaw_prefix("an_openclaw_tenant_answers_sleeps_and_wakes_with_its_conversation")
    else {
        return;
    };
    let _one_at_a_time = GATEWAYS.lock().await;
    let stub = StubModel::start().await;
    stub.require_key(MODEL_KEY);
    let h = start(&prefix, Found::Given, &stub, 3).await;
    let token = "7101:REAL-bot-token-of-claw-7c1e";
    let secret = openclaw_tenant(&h, "claw", token).await;

    // A cold wake, explicitly, so its phases are reported; then the first turn.
    let (status, woken) = h.api(Method::POST, "/tenants/claw/wake", None).await;
    assert_eq!(status, 200, "{woken}");
    assert_eq!(woken["path"], "cold");
    let (reply, first_turn) = exchange(&h, "claw", &secret, token, 1, "hello claw").await;
    assert_eq!(earlier_turns(&reply), Some(0), "{reply}");
    assert!(reply.contains("you said: hello claw"), "{reply}");

    // What the instance holds: no real bot token, no model key, in any file or environment.
    let dir = instance_dir(&h, "claw").await;
    let gw = gateway_pids(&dir);
    assert!(
        !gw.is_empty(),
        "the gateway runs with its own state directory"
    );
    let rss = rss_mib(&gw);
    let leaks = files_containing(&dir, &[token, MODEL_KEY]);
    assert!(leaks.is_empty(), "{leaks:?}");
    let dir_s = dir.display().to_string();
    let in_instance = pids_where(|env, cmd| {
        [env, cmd]
            .iter()
            .any(|b| b.windows(dir_s.len()).any(|w| w == dir_s.as_bytes()))
    });
    assert!(
        in_instance.len() > gw.len(),
        "the shim and the gateway are found"
    );
    for pid in &in_instance {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        for secret_value in [token, MODEL_KEY] {
            for (what, b) in [("environment", &env), ("command line", &cmd)] {
                assert!(
                    !b.windows(secret_value.len())
                        .any(|w| w == secret_value.as_bytes()),
                    "pid {pid}'s {what} holds {secret_value}"
                );
            }
        }
    }
    let env = env_of(gw[0]);
    for var in [
        "HOME",
        "OPENCLAW_HOME",
        "OPENCLAW_STATE_DIR",
        "OPENCLAW_CONFIG_PATH",
        "TMPDIR",
    ] {
        assert!(
            env.get(var).is_some_and(|v| v.starts_with(&dir_s)),
            "{var}={:?} lies outside {dir_s}",
            env.get(var)
        );
    }
    // The key reached the provider on every call; the instance sent a placeholder.
    let seen = stub.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {MODEL_KEY}"))),
        "{seen:?}"
    );
    // otm's webhook stays registered: the gateway's setWebhook was answered by the proxy.
    assert_eq!(
        h.tg.webhook(token).unwrap().url,
        format!("{PUBLIC_URL}/tg/claw")
    );
    let methods: HashSet<String> =
        h.tg.calls()
            .into_iter()
            .filter(|c| c.token == token)
            .map(|c| c.method)
            .collect();
    assert!(
        methods.contains("sendMessage") && methods.contains("getMe"),
        "{methods:?}"
    );

    let (reply, warm_turn) = exchange(&h, "claw", &secret, token, 2, "second").await;
    assert_eq!(earlier_turns(&reply), Some(1), "{reply}");

    // Idle: stopped, with a final snapshot taken after the gateway exited.
    let stopping = Instant::now();
    let (status, _) = h
        .api(
            Method::PATCH,
            "/tenants/claw",
            Some(json!({"idle_timeout_s": 1})),
        )
        .await;
    assert_eq!(status, 200);
    wait_until(
        "the idle tenant to be stopped",
        Duration::from_secs(180),
        || async {
            let (_, t) = h.api(Method::GET, "/tenants/claw", None).await;
            t["status"] == "idle" && t["instance"].is_null()
        },
    )
    .await;
    let stop_time = stopping.elapsed();
    // Awake again, it should stay up while the test looks at it: the gateway acknowledges an
    // update once it is queued, before the turn, and an idle stop right after would put the
    // turn off until the next wake.
    let (status, _) = h
        .api(
            Method::PATCH,
            "/tenants/claw",
            Some(json!({"idle_timeout_s": 3600})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(gateway_pids(&dir).is_empty(), "the gateway is gone");
    let (head, list) = snapshots(&h, "claw").await;
    let final_snap = list.last().unwrap().clone();
    assert_eq!(final_snap["reason"], "final", "{list:?}");
    assert_eq!(head.as_deref(), final_snap["id"].as_str());
    let final_size = final_snap["size"].as_u64().unwrap();
    let unpacked = unpack_snapshot(&h, "claw", final_snap["id"].as_str().unwrap());
    assert!(
        unpacked.path().join("agents/main/agent").is_dir(),
        "OpenClaw's sessions are in the snapshot"
    );
    assert!(
        unpacked.path().join("workspace").is_dir(),
        "the workspace is in the snapshot"
    );
    assert!(!unpacked.path().join("tmp").exists() && !unpacked.path().join("cache").exists());
    assert!(files_containing(unpacked.path(), &[token, MODEL_KEY]).is_empty());

    // The next message wakes it from that snapshot: OpenClaw still knows the two earlier turns.
    let before = cold_wake_sums(&h).await;
    let (reply, wake_to_reply) = exchange(&h, "claw", &secret, token, 3, "third").await;
    let phases = delta_ms(&cold_wake_sums(&h).await, &before);
    assert_eq!(
        earlier_turns(&reply),
        Some(2),
        "OpenClaw's conversation survived sleep and wake: {reply}"
    );
    let dir2 = instance_dir(&h, "claw").await;
    assert_ne!(dir, dir2, "a new instance");
    let rss_after_turns = rss_mib(&gateway_pids(&dir2));

    // Snapshots taken while the gateway runs (every 3 s here) are consistent: crash the instance
    // and the next wake restores the newest one, SQLite intact, the third turn in it.
    let replied = otm_core::time::now_ms();
    let deadline = Instant::now() + Duration::from_secs(60);
    let running_snap = loop {
        let (_, list) = snapshots(&h, "claw").await;
        let newer = list
            .iter()
            .rev()
            .find(|s| {
                s["reason"] == "periodic"
                    && s["created_at_ms"].as_i64().unwrap_or(0) > replied + 2_000
            })
            .cloned();
        if let Some(s) = newer {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of the running gateway after the third turn: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let checked = sqlite_integrity(
        &prefix,
        unpack_snapshot(&h, "claw", running_snap["id"].as_str().unwrap()).path(),
    );
    assert!(
        !checked.is_empty(),
        "the snapshot holds OpenClaw's databases"
    );
    assert!(checked.iter().all(|(_, r)| r == "ok"), "{checked:?}");
    // How long the gateway was paused for each of those snapshots, from the shim's log.
    // The runtime's own directory of the instance (never shown to it).
    let records = dir2
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("runtime")
        .join(dir2.file_name().unwrap());
    let shim_log = std::fs::read_to_string(records.join("shim.log")).unwrap_or_default();
    let paused_ms: Vec<u64> = shim_log
        .lines()
        .filter_map(|l| {
            l.split("paused_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !paused_ms.is_empty(),
        "running snapshots paused the gateway: {shim_log}"
    );
    let runtime: Value =
        serde_json::from_slice(&std::fs::read(records.join("record.json")).unwrap()).unwrap();
    let shim_pid = runtime["pid"].as_i64().unwrap() as i32;
    let restoring = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        "the crash to be noticed",
        Duration::from_secs(30),
        || async {
            let (_, t) = h.api(Method::GET, "/tenants/claw", None).await;
            t["instance"].is_null()
        },
    )
    .await;
    let (reply, _) = exchange(&h, "claw", &secret, token, 4, "fourth").await;
    assert_eq!(
        earlier_turns(&reply),
        Some(3),
        "restored from the running snapshot: {reply}"
    );
    let crash_to_reply = restoring.elapsed();

    eprintln!(
        "openclaw measurement: first cold wake phases {} (total {} ms); first turn {first_turn:?}; warm turn {warm_turn:?}; \
         RSS {rss:.0} MiB after one turn, {rss_after_turns:.0} MiB after three; idle stop with final snapshot {stop_time:?}; \
         final snapshot {final_size} bytes; wake from snapshot to reply {wake_to_reply:?} with phases {phases:?}; \
         running snapshot {} bytes, gateway paused {paused_ms:?} ms; crash to restored reply {crash_to_reply:?}",
        woken["phases_ms"], woken["total_ms"], running_snap["size"]
    );
    h.stop().await;
}

/// Two OpenClaw tenants at the same time: separate gateways with their own ports, files and
/// conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_openclaw_tenants_run_side_by_side() {
    let Some(prefix) = openclaw_prefix("two_openclaw_tenants_run_side_by_side") else {
        return;
    };
    let _two_at_most = GATEWAYS.lock().await;
    let stub = StubModel::start().await;
    stub.require_key(MODEL_KEY);
    let h = start(&prefix, Found::InDataDir, &stub, 0).await;
    let tenants = [
        ("ann", "7201:REAL-token-of-ann"),
        ("bob", "7202:REAL-token-of-bob"),
    ];
    let mut secrets = vec![];
    for (id, token) in tenants {
        secrets.push(openclaw_tenant(&h, id, token).await);
    }

    // Both wake at once, and each answers its own first message.
    let started = Instant::now();
    let texts: Vec<String> = tenants
        .iter()
        .map(|(id, _)| format!("hi from {id}"))
        .collect();
    let firsts = futures::future::join_all(
        tenants
            .iter()
            .zip(&secrets)
            .zip(&texts)
            .map(|(((id, token), secret), text)| exchange(&h, id, secret, token, 1, text)),
    )
    .await;
    let both = started.elapsed();
    for ((id, _), (reply, _)) in tenants.iter().zip(&firsts) {
        assert_eq!(earlier_turns(reply), Some(0), "{reply}");
        assert!(reply.contains(&format!("hi from {id}")), "{reply}");
    }
    let dirs = [instance_dir(&h, "ann").await, instance_dir(&h, "bob").await];
    let pids = [gateway_pids(&dirs[0]), gateway_pids(&dirs[1])];
    assert!(!pids[0].is_empty() && !pids[1].is_empty());
    assert!(pids[0].iter().all(|p| !pids[1].contains(p)));

    // Ports: each gateway listens on the gateway and webhook ports rendered into its own config,
    // and the two sets are disjoint.
    let mut configured = vec![];
    for dir in &dirs {
        let config = std::fs::read_to_string(dir.join("config/openclaw.json5")).unwrap();
        let port_after = |key: &str| -> u16 {
            let at = config
                .find(key)
                .unwrap_or_else(|| panic!("{key} in {config}"));
            config[at + key.len()..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        configured.push([port_after("port:"), port_after("webhookPort:")]);
    }
    let listening = [listening_ports(&pids[0]), listening_ports(&pids[1])];
    // Each instance has a network namespace of its own (ports may then coincide, unreachable
    // from each other); without one, the ports must differ.
    let netns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let own_netns = netns(pids[0][0]) != netns(pids[1][0]);
    let sandboxed = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("bwrap").is_file());
    assert!(
        own_netns || !sandboxed,
        "with bubblewrap each gateway has its own network namespace"
    );
    for i in 0..2 {
        for port in configured[i] {
            assert!(
                listening[i].contains(&port),
                "gateway {i} listens on {port}: {:?}",
                listening[i]
            );
            assert!(
                own_netns || !listening[1 - i].contains(&port),
                "port {port} is not shared"
            );
        }
    }
    assert!(
        own_netns || listening[0].is_disjoint(&listening[1]),
        "{listening:?}"
    );

    // Files: each gateway's environment points into its own instance, its open files are never
    // in the other's, and with bubblewrap the other's directory does not even exist for it.
    for i in 0..2 {
        let own = dirs[i].display().to_string();
        let other = &dirs[1 - i];
        let env = env_of(pids[i][0]);
        for var in [
            "HOME",
            "OPENCLAW_HOME",
            "OPENCLAW_STATE_DIR",
            "OPENCLAW_CONFIG_PATH",
            "TMPDIR",
        ] {
            assert!(
                env[var].starts_with(&own),
                "{var}={} is not under {own}",
                env[var]
            );
        }
        let foreign: Vec<_> = open_paths(&pids[i])
            .into_iter()
            .filter(|p| p.starts_with(other))
            .collect();
        assert!(
            foreign.is_empty(),
            "gateway {i} has the other tenant's files open: {foreign:?}"
        );
        let bwrap = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("bwrap").is_file());
        if bwrap {
            let seen_from_inside =
                PathBuf::from(format!("/proc/{}/root{}", pids[i][0], other.display()));
            assert!(
                !seen_from_inside.exists(),
                "the other instance is hidden from gateway {i}"
            );
        }
    }
    let rss = [rss_mib(&pids[0]), rss_mib(&pids[1])];

    // The conversations stay apart: each tenant's second turn counts only its own first one.
    let seconds = futures::future::join_all(
        tenants
            .iter()
            .zip(&secrets)
            .map(|((id, token), secret)| exchange(&h, id, secret, token, 2, "again")),
    )
    .await;
    for (reply, _) in &seconds {
        assert_eq!(earlier_turns(reply), Some(1), "{reply}");
    }
    eprintln!(
        "openclaw measurement: two cold wakes side by side answered in {both:?} ({:?}, {:?}); RSS {:.0} and {:.0} MiB",
        firsts[0].1, firsts[1].1, rss[0], rss[1]
    );
    h.stop().await;
}

/// An OpenClaw tenant answers only the users it allows: a stranger's message reaches neither the
/// agent's answer nor the model, and the owner's is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_is_not_allowed_gets_no_answer_and_never_reaches_the_model() {
    let Some(prefix) = openclaw_prefix("a_user_who_is_not_allowed_gets_no_answer") else {
        return;
    };
    let _one = GATEWAYS.lock().await;
    let stub = StubModel::start().await;
    let h = start(&prefix, Found::Given, &stub, 0).await;
    let token = "7401:REAL-token-of-owned";
    let secret = openclaw_tenant(&h, "owned", token).await;
    let (status, t) = h.api(Method::GET, "/tenants/owned", None).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["dm_policy"], "allowlist", "{t}");
    assert_eq!(t["allowed_users"], json!([OWNER.to_string()]), "{t}");

    // A stranger who found the bot writes first; the inbox delivers in order, so by the time
    // the owner's answer arrives the gateway has had the stranger's message.
    let stranger = 777_000_111;
    let stranger_text = "stranger: run `cat /etc/passwd` for me";
    assert_eq!(
        h.post_update("owned", &secret, &text_update(1, stranger, stranger_text))
            .await,
        200
    );
    let (reply, _) = exchange(&h, "owned", &secret, token, 2, "owner: hello").await;
    assert!(reply.contains("owner: hello"), "{reply}");
    // Give a late answer to the stranger a moment to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = h.tg.sent_messages(token);
    assert!(
        sent.iter().all(|m| m.chat_id != stranger),
        "nothing is sent to a user who is not allowed: {sent:?}"
    );
    let asked: Vec<String> = stub.requests().into_iter().map(|r| r.user_text).collect();
    assert!(
        !asked.iter().any(|t| t.contains("stranger")),
        "a user who is not allowed never reaches the model: {asked:?}"
    );
    assert!(
        asked.iter().any(|t| t.contains("owner: hello")),
        "{asked:?}"
    );
    // Both updates were delivered (the gateway took the stranger's and dropped it): nothing
    // is left pending or dead-lettered.
    let (_, inbox) = h.api(Method::GET, "/tenants/owned/inbox", None).await;
    assert_eq!(inbox["pending"], json!([]), "{inbox}");
    h.stop().await;
}

/// The model route on the egress listener needs no OpenClaw: it swaps the instance's placeholder
/// key for the operator's, and refuses unknown and revoked surrogates as the Bot API proxy does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_route_adds_the_operators_key_and_refuses_foreign_surrogates() {
    let stub = StubModel::start().await;
    stub.require_key(MODEL_KEY);
    let model = stub.base_url();
    let h = Harness::start_with(move |s| {
        s.model_base_url = Some(model);
        s.model_id = Some("stub-1".into());
        s.model_api_key = Some(Secret::new(MODEL_KEY));
    })
    .await;
    let token = "7301:REAL-token-of-ref";
    let _secret = h.tenant("ref", token).await;
    let (status, woken) = h.api(Method::POST, "/tenants/ref/wake", None).await;
    assert_eq!(status, 200, "{woken}");
    // The reference agent's surrogate, as its instance knows it.
    let dir = instance_dir(&h, "ref").await;
    let marker = format!("OTM_AGENT_STATE_DIR={}/state", dir.display());
    let pid = pids_where(|env, _| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))[0];
    let surrogate = env_of(pid)["OTM_BOT_TOKEN"].clone();
    assert_ne!(surrogate, token);

    let egress = format!("http://{}", h.server().egress_addr);
    let body = json!({"model": "stub-1", "stream": true, "messages": [{"role": "user", "content": "ping"}]});
    let call = |s: String| {
        h.http
            .post(format!("{egress}/model/{s}/chat/completions"))
            .bearer_auth("whatever-the-instance-has")
            .json(&body)
            .send()
    };
    let resp = call(surrogate.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("earlier user turns: 0") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    assert_eq!(
        stub.requests().last().unwrap().authorization.as_deref(),
        Some(&*format!("Bearer {MODEL_KEY}"))
    );

    let unknown = call("7301:not-a-surrogate".into()).await.unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(h.api(Method::POST, "/tenants/ref/stop", None).await.0, 200);
    let revoked = call(surrogate).await.unwrap();
    assert_eq!(
        revoked.status(),
        401,
        "a stopped instance's surrogate is refused"
    );
    assert_eq!(
        stub.requests().len(),
        1,
        "refused calls never reach the provider"
    );
    h.stop().await;
}

/// Freezes an OpenClaw tenant for `frozen_for`, then writes to it: the gateway, its session and
/// its Telegram webhook listener answer after the thaw, from the same instance, with the
/// conversation kept.
async fn frozen_openclaw_answers_after(test: &str, frozen_for: Duration) {
    let Some(prefix) = openclaw_prefix(test) else {
        return;
    };
    let _one_at_a_time = GATEWAYS.lock().await;
    let stub = StubModel::start().await;
    stub.require_key(MODEL_KEY);
    let h = start(&prefix, Found::Given, &stub, 0).await;
    let token = "7301:REAL-bot-token-of-frozen-claw";
    let secret = openclaw_tenant(&h, "icicle", token).await;
    let (reply, _) = exchange(&h, "icicle", &secret, token, 1, "before the freeze").await;
    assert_eq!(earlier_turns(&reply), Some(0), "{reply}");
    // Frozen soon only once the first turn is answered: a gateway on a loaded machine can spend
    // more than a few seconds on a turn without CPU or a call under way.
    let (status, t) = h
        .api(
            Method::PATCH,
            "/tenants/icicle",
            Some(json!({"freeze_after_s": 5, "idle_timeout_s": frozen_for.as_secs() + 3600})),
        )
        .await;
    assert_eq!(status, 200, "{t}");
    let dir = instance_dir(&h, "icicle").await;
    wait_until("the tenant to freeze", Duration::from_secs(60), || async {
        let (_, t) = h.api(Method::GET, "/tenants/icicle", None).await;
        t["status"] == "frozen"
    })
    .await;
    let gw: Vec<u32> = gateway_pids(&dir)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() != "bwrap")
        })
        .collect();
    assert!(!gw.is_empty(), "the gateway is found");
    // Frozen through the agent's cgroup where the instance has one, else stopped by SIGSTOP.
    let id = dir.file_name().unwrap().to_str().unwrap();
    match common::instance_cgroup(id).and_then(|c| c.agent_dir()) {
        Some(agent_dir) => {
            let freezer = otm_shim::freezer::AgentCgroup::open(&agent_dir).unwrap();
            assert!(
                freezer.is_frozen().unwrap(),
                "the gateway's cgroup is frozen"
            );
            let members = freezer.procs();
            for pid in &gw {
                assert!(
                    members.contains(&(*pid as i32)),
                    "gateway process {pid} is in the frozen cgroup: {members:?}"
                );
                assert_ne!(common::proc_state(*pid), "T", "not stopped by a signal");
            }
        }
        None => {
            for pid in &gw {
                let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                assert!(
                    st.lines()
                        .any(|l| l.starts_with("State:") && l.contains('T')),
                    "gateway process {pid} is stopped while frozen: {st}"
                );
            }
        }
    }
    // The turn after the thaw takes seconds, some of them waiting without CPU or a call under
    // way: back to the default, so that it is not frozen again half-way.
    let (status, t) = h
        .api(
            Method::PATCH,
            "/tenants/icicle",
            Some(json!({"freeze_after_s": "default"})),
        )
        .await;
    assert_eq!(status, 200, "{t}");
    eprintln!("{test}: frozen; waiting {} s", frozen_for.as_secs());
    tokio::time::sleep(frozen_for).await;
    let (_, t) = h.api(Method::GET, "/tenants/icicle", None).await;
    assert_eq!(t["status"], "frozen", "still frozen after the wait: {t}");
    let (reply, took) = exchange(&h, "icicle", &secret, token, 2, "after the freeze").await;
    eprintln!("{test}: answered {} ms after the thaw", took.as_millis());
    assert_eq!(
        earlier_turns(&reply),
        Some(1),
        "the session kept its turn: {reply}"
    );
    assert!(reply.contains("you said: after the freeze"), "{reply}");
    assert_eq!(instance_dir(&h, "icicle").await, dir, "no new instance");
    let m = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines().any(
            |l| l.starts_with("otm_wake_seconds_count{path=\"frozen\"} ") && !l.ends_with(" 0")
        ),
        "the wake was a thaw: {m}"
    );
    h.stop().await;
}

/// How long the frozen OpenClaw tests keep it frozen: `OTM_OPENCLAW_FREEZE_S`, else `default_s`.
fn freeze_seconds(default_s: u64) -> Duration {
    Duration::from_secs(
        std::env::var("OTM_OPENCLAW_FREEZE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_s),
    )
}

/// Frozen past the gateway's longest keep-alive interval that its log names (its health monitor,
/// every 300 s), so that timers due during the freeze fire after the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_openclaw_tenant_answers_after_a_few_minutes() {
    frozen_openclaw_answers_after(
        "a_frozen_openclaw_tenant_answers_after_a_few_minutes",
        freeze_seconds(330),
    )
    .await;
}

/// The issue's hour: run with `--ignored` (`OTM_OPENCLAW_FREEZE_S` changes the length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "freezes OpenClaw for an hour"]
async fn a_frozen_openclaw_tenant_answers_after_an_hour() {
    frozen_openclaw_answers_after(
        "a_frozen_openclaw_tenant_answers_after_an_hour",
        freeze_seconds(3600),
    )
    .await;
}
