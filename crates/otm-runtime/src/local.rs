//! The `local` runtime: every instance is `otm shim` in its own directory, inside a bubblewrap
//! sandbox when `bwrap` is installed (system read-only, only its own directory writable, its own
//! PID namespace, no view of the data directory or other instances), otherwise a plain child
//! process with a warning logged at start.
//!
//! Instances are started in their own process group and outlive the server: a restarted server
//! finds them again from `runtime.json` in each instance directory.

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use otm_core::{Error, InstanceId, InstanceSpec, Result, Runtime, RuntimeEvent, RuntimeInstance, TenantId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const BACKEND: &str = "local runtime";

/// Whether to sandbox instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// bubblewrap if `bwrap` is found, otherwise none (with a warning).
    #[default]
    Auto,
    /// bubblewrap, or fail.
    Bubblewrap,
    /// Plain child processes.
    None,
}

/// Settings of the local runtime.
#[derive(Clone, Debug)]
pub struct LocalRuntimeConfig {
    /// otm's data directory; instances live in `<data_dir>/instances/<id>`, and the sandbox hides
    /// the rest of it.
    pub data_dir: PathBuf,
    /// The `otm` binary that runs `otm shim`.
    pub otm_binary: PathBuf,
    pub sandbox: SandboxMode,
    /// Extra directories the sandbox shows read-only (agent installations).
    pub read_only: Vec<PathBuf>,
}

/// What the runtime writes into each instance directory to find it again after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: InstanceId,
    pid: u32,
    address: String,
    tenant: Option<TenantId>,
    created_at_ms: i64,
    /// True when started inside bubblewrap (pids in the instance are the namespace's own).
    #[serde(default)]
    sandboxed: bool,
}

/// The local runtime.
#[derive(Clone, Debug)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    data_dir: PathBuf,
    otm_binary: PathBuf,
    bwrap: Option<PathBuf>,
    read_only: Vec<PathBuf>,
    /// Instances being deleted on purpose: their exit is not news.
    deleting: Mutex<HashSet<InstanceId>>,
    /// Instances watched by a task of ours.
    watched: Mutex<HashMap<InstanceId, u32>>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl LocalRuntime {
    /// Opens the runtime; starts watching instances left running by an earlier server.
    pub fn new(config: LocalRuntimeConfig) -> Result<Self> {
        let data_dir = absolute(&config.data_dir)?;
        let root = data_dir.join("instances");
        std::fs::create_dir_all(&root).map_err(|e| Error::generic(BACKEND, e))?;
        let bwrap = match config.sandbox {
            SandboxMode::None => None,
            SandboxMode::Auto | SandboxMode::Bubblewrap => {
                let found = which("bwrap");
                match (&found, config.sandbox) {
                    (None, SandboxMode::Bubblewrap) => {
                        return Err(Error::invalid("sandbox `bubblewrap` was asked for, but `bwrap` is not installed"));
                    }
                    (None, _) => tracing::warn!(
                        "bubblewrap (`bwrap`) is not installed: instances run as plain processes without a sandbox"
                    ),
                    _ => {}
                }
                found
            }
        };
        let (events, _) = broadcast::channel(1024);
        let rt = LocalRuntime {
            inner: Arc::new(Inner {
                root,
                data_dir,
                otm_binary: config.otm_binary,
                bwrap,
                read_only: config.read_only,
                deleting: Mutex::new(HashSet::new()),
                watched: Mutex::new(HashMap::new()),
                events,
            }),
        };
        for record in rt.records() {
            if process_alive(record.pid) {
                tracing::info!(instance = %record.id, pid = record.pid, "found running instance");
                rt.watch_pid(record.id.clone(), record.pid);
            }
        }
        Ok(rt)
    }

    /// The directory of one instance.
    pub fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.inner.root.join(id.as_str())
    }

    fn records(&self) -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(&self.inner.root) else { return vec![] };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("runtime.json")).ok())
            .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
            .collect()
    }

    fn command(&self, dir: &Path, socket: &Path, spec: &InstanceSpec) -> tokio::process::Command {
        let shim_args = [
            "shim".to_owned(),
            "--instance".to_owned(),
            spec.id.to_string(),
            "--dir".to_owned(),
            dir.display().to_string(),
            "--listen".to_owned(),
            format!("unix:{}", socket.display()),
            "--token-file".to_owned(),
            dir.join("shim.token").display().to_string(),
        ];
        let mut cmd = match &self.inner.bwrap {
            None => {
                let mut c = tokio::process::Command::new(&self.inner.otm_binary);
                c.args(shim_args);
                c
            }
            Some(bwrap) => {
                let mut c = tokio::process::Command::new(bwrap);
                let s = |p: &Path| p.display().to_string();
                c.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
                for hidden in ["/home", "/root"] {
                    if Path::new(hidden).is_dir() {
                        c.args(["--tmpfs", hidden]);
                    }
                }
                let mut shown: Vec<PathBuf> = self.inner.read_only.clone();
                if let Some(bin_dir) = self.inner.otm_binary.parent() {
                    shown.push(bin_dir.to_path_buf());
                }
                // Mounts apply in order: the data directory is hidden first, so a read-only
                // directory inside it (an agent installed under it) is shown on top, and the
                // instance's own directory comes last, writable.
                c.args(["--tmpfs", &s(&self.inner.data_dir)]);
                for p in shown.iter().filter(|p| p.exists()) {
                    c.args(["--ro-bind", &s(p), &s(p)]);
                }
                c.args(["--bind", &s(dir), &s(dir)]);
                // No --die-with-parent: instances outlive a server restart and are adopted.
                c.args(["--unshare-pid", "--unshare-ipc", "--unshare-uts"]);
                c.args(["--chdir", &s(dir), "--setenv", "TMPDIR", &s(&dir.join("tmp")), "--"]);
                c.arg(&self.inner.otm_binary).args(shim_args);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        cmd
    }

    fn watch_pid(&self, id: InstanceId, pid: u32) {
        self.inner.watched.lock().unwrap().insert(id.clone(), pid);
        let rt = self.clone();
        tokio::spawn(async move {
            // An adopted process is not our child: poll it.
            while process_alive(pid) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            rt.exited(&id, "the instance's process exited".to_owned());
        });
    }

    fn exited(&self, id: &InstanceId, detail: String) {
        self.inner.watched.lock().unwrap().remove(id);
        if self.inner.deleting.lock().unwrap().contains(id) {
            return;
        }
        tracing::warn!(instance = %id, %detail, "instance exited");
        let _ = self.inner.events.send(RuntimeEvent::Exited { id: id.clone(), detail });
    }
}

#[async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolation(&self) -> String {
        if self.inner.bwrap.is_some() { "bubblewrap".into() } else { "none".into() }
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance> {
        let dir = self.instance_dir(&spec.id);
        let socket = dir.join("shim.sock");
        if socket.as_os_str().len() > 100 {
            return Err(Error::invalid(format!(
                "the data directory path is too long for a Unix socket ({}); use a shorter --data-dir",
                socket.display()
            )));
        }
        std::fs::create_dir_all(dir.join("state")).map_err(|e| Error::generic(BACKEND, e))?;
        write_private(&dir.join("shim.token"), spec.shim_token.expose().as_bytes()).map_err(|e| Error::generic(BACKEND, e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("shim.log"))
            .map_err(|e| Error::generic(BACKEND, e))?;
        let log2 = log.try_clone().map_err(|e| Error::generic(BACKEND, e))?;
        let mut cmd = self.command(&dir, &socket, spec);
        cmd.stdout(log).stderr(log2);
        let mut child = cmd.spawn().map_err(|e| Error::unavailable(BACKEND, format!("cannot start the shim: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let address = format!("unix:{}", socket.display());
        let record = Record {
            id: spec.id.clone(),
            pid,
            address: address.clone(),
            tenant: spec.tenant.clone(),
            created_at_ms: otm_core::time::now_ms(),
            sandboxed: self.inner.bwrap.is_some(),
        };
        std::fs::write(dir.join("runtime.json"), serde_json::to_vec(&record).expect("record"))
            .map_err(|e| Error::generic(BACKEND, e))?;

        // Ready when the socket accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                return Err(Error::unavailable(BACKEND, format!("the shim exited at start ({status}):\n{tail}")));
            }
            if Instant::now() > deadline {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                return Err(Error::unavailable(BACKEND, "the shim did not listen within 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }

        self.inner.watched.lock().unwrap().insert(spec.id.clone(), pid);
        let rt = self.clone();
        let id = spec.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            rt.exited(&id, format!("the shim exited: {}", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
        });
        Ok(RuntimeInstance {
            id: spec.id.clone(),
            address,
            alive: true,
            tenant: spec.tenant.clone(),
            created_at_ms: Some(record.created_at_ms),
        })
    }

    async fn list(&self) -> Result<Vec<RuntimeInstance>> {
        let mut out: Vec<RuntimeInstance> = self
            .records()
            .into_iter()
            .map(|r| RuntimeInstance {
                alive: process_alive(r.pid),
                id: r.id,
                address: r.address,
                tenant: r.tenant,
                created_at_ms: Some(r.created_at_ms),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let dir = self.instance_dir(id);
        let record: Option<Record> = std::fs::read(dir.join("runtime.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        self.inner.deleting.lock().unwrap().insert(id.clone());
        if let Some(r) = &record {
            // Without a PID namespace the agent, in a process group of its own, outlives the
            // shim: the shim records its pid. Inside bubblewrap that pid is the namespace's own,
            // and the namespace dies with the sandbox.
            let agent = std::fs::read_to_string(dir.join("agent.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok());
            if let (false, Some(agent)) = (r.sandboxed, agent) {
                let _ = killpg(Pid::from_raw(agent), Signal::SIGKILL);
            }
            let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(r.pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(|e| Error::generic(BACKEND, e))?;
        self.inner.deleting.lock().unwrap().remove(id);
        result.map_err(|e| Error::generic(BACKEND, e))
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let rx = self.inner.events.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

/// True while a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(data)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::generic(BACKEND, e))
}

/// Finds a program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}
