//! The `local` runtime: every instance is `otm shim` in a bubblewrap sandbox of its own on this
//! machine, with its agent in a second sandbox inside it (see [`otm_shim::sandbox`]).
//!
//! Layout under the data directory:
//!
//! | path | owner | what |
//! |---|---|---|
//! | `runtime/<id>/` | otm, 0700, never shown to any instance | `record.json` (what the runtime knows of the instance), `shim.sock` (the shim's control socket, created here and handed to the shim as its standard input), `shim.log` |
//! | `instances/<id>/` | the instance's uid, 0700 | the shim's files (`shim.token`, `agent.log`, rendered agent configs) |
//! | `instances/<id>/{state,tmp,home}/` | the instance's uid | the only directories the agent sees writable |
//!
//! Nothing an instance can write is read back as a record: the runtime trusts only
//! `runtime/<id>/`, and checks even that (the id's shape, the directory matching the id, size,
//! regular file). Processes are controlled through the instance's cgroup (frozen and killed as a
//! whole; the agent alone, in a cgroup of its own below, is frozen by its shim), or, where otm
//! cannot create cgroups, through the sandbox's process 1 whose start time the record holds.
//! When otm runs as root every instance gets a uid of its own from `uid_base`.
//!
//! Instances outlive the server: a restarted server finds them again from `runtime/`.

use crate::cgroup::{InstanceCgroup, Layout};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use otm_core::{
    Error, InstanceId, InstanceSpec, LimitKind, ResourceLimits, Result, Runtime, RuntimeEvent,
    RuntimeInstance, TenantId,
};
use otm_shim::sandbox::{self, SystemView};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const BACKEND: &str = "local runtime";

/// Size of each instance's private `/tmp` (memory-backed, counted in its memory limit).
const TMP_BYTES: u64 = 256 << 20;
/// Open files per process in an instance.
const NOFILE: u64 = 4096;
/// Largest record file read back.
const MAX_RECORD: u64 = 64 << 10;
/// How old an empty instance cgroup must be before a starting runtime removes it as left over
/// (see [`Layout::remove_leftovers`]).
const LEFTOVER_CGROUP_AGE: Duration = Duration::from_secs(60);

/// Whether to sandbox instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// bubblewrap; refuses to start without it.
    #[default]
    Auto,
    /// bubblewrap, or fail (the same as `Auto`, named for configurations that say so).
    Bubblewrap,
    /// Plain child processes: for development only, and said so at every start.
    None,
}

/// Settings of the local runtime.
#[derive(Clone, Debug)]
pub struct LocalRuntimeConfig {
    /// otm's data directory; instances live in `<data_dir>/instances/<id>`, and no instance sees
    /// the rest of it.
    pub data_dir: PathBuf,
    /// The `otm` binary that runs `otm shim`.
    pub otm_binary: PathBuf,
    pub sandbox: SandboxMode,
    /// Extra paths the sandboxes show read-only (agent installations).
    pub read_only: Vec<PathBuf>,
    /// The directory of otm's egress sockets (one per server), which every instance sandbox
    /// shows read-only.
    pub egress_dir: Option<PathBuf>,
    /// First uid of the range instances run as when otm runs as root.
    pub uid_base: u32,
    /// Whether otm, as root on a host whose hierarchies lack it, turns the kernel's
    /// `favordynmods` on ([`crate::cgroup::favor_dynamic_moves`]): 10 to 20 ms less per cold
    /// start, for a kernel-wide change.
    pub favor_dynmods: bool,
}

/// The default first uid of instances (65,536 are used from there).
pub const DEFAULT_UID_BASE: u32 = 1_500_000_000;

/// What the runtime keeps of each instance in `runtime/<id>/record.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: InstanceId,
    address: String,
    tenant: Option<TenantId>,
    created_at_ms: i64,
    sandboxed: bool,
    /// The uid the instance runs as on the host.
    uid: u32,
    /// True when the instance has cgroups (then they, not pids, are how it is controlled).
    cgroup: bool,
    /// Process 1 of the instance's sandbox (or the shim without one), and its start time in
    /// clock ticks since boot, so a reused pid is never mistaken for it.
    pid: u32,
    pid_start: u64,
}

/// The local runtime.
#[derive(Clone, Debug)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    instances: PathBuf,
    records: PathBuf,
    otm_binary: PathBuf,
    bwrap: Option<PathBuf>,
    read_only: Vec<PathBuf>,
    /// The directory every instance sandbox shows as its `/etc` ([`sandbox::prepare_etc`]).
    etc: Option<PathBuf>,
    egress_dir: Option<PathBuf>,
    cgroups: Option<Layout>,
    /// Why there are no cgroups, for status pages.
    cgroup_problem: Option<String>,
    /// Some(base) when instances get uids of their own (otm runs as root).
    uid_base: Option<u32>,
    /// The uid of every instance with a record here (read from the records at start), so that
    /// a new instance's uid is picked without reading them all again.
    uids: Mutex<HashMap<InstanceId, u32>>,
    /// Instances being deleted on purpose: their exit is not news.
    deleting: Mutex<HashSet<InstanceId>>,
    /// Instances watched by a task of ours, with their limits.
    watched: Mutex<HashMap<InstanceId, ResourceLimits>>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl LocalRuntime {
    /// Opens the runtime: checks the sandbox can be built, and starts watching instances left
    /// running by an earlier server.
    pub fn new(config: LocalRuntimeConfig) -> Result<Self> {
        let data_dir =
            std::path::absolute(&config.data_dir).map_err(|e| Error::generic(BACKEND, e))?;
        let bwrap = match config.sandbox {
            SandboxMode::None => {
                tracing::warn!(
                    "instances run WITHOUT a sandbox (--sandbox none): every agent can read the data directory, \
                     the admin token and every other tenant; for development only"
                );
                None
            }
            SandboxMode::Auto | SandboxMode::Bubblewrap => Some(sandbox::bwrap().ok_or_else(|| {
                Error::invalid(
                    "bubblewrap (`bwrap`) is not installed, and otm does not run instances without a sandbox: install \
                     it (Debian and Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or for \
                     development only start with --sandbox none",
                )
            })?),
        };
        let root = nix::unistd::geteuid().is_root();
        let otm_binary =
            std::path::absolute(&config.otm_binary).map_err(|e| Error::generic(BACKEND, e))?;

        if bwrap.is_some() {
            check_shown_paths(&data_dir, &otm_binary, &config.read_only)?;
        }

        let instances = data_dir.join("instances");
        let records = data_dir.join("runtime");
        // Instances that run as uids of their own must traverse the data directory to reach
        // their directories (0711: no listing, and every file in it is private); otherwise it
        // stays private.
        let shared = if root && bwrap.is_some() {
            0o711
        } else {
            0o700
        };
        for (dir, mode) in [(&data_dir, shared), (&instances, shared), (&records, 0o700)] {
            std::fs::create_dir_all(dir).map_err(|e| Error::generic(BACKEND, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::generic(BACKEND, e))?;
        }
        let etc = match &bwrap {
            Some(_) => Some(
                sandbox::prepare_etc(&data_dir.join("sandbox")).map_err(|e| {
                    Error::generic(
                        BACKEND,
                        std::io::Error::new(
                            e.kind(),
                            format!(
                                "cannot prepare the sandboxes' /etc in {}: {e}",
                                data_dir.join("sandbox").display()
                            ),
                        ),
                    )
                })?,
            ),
            None => None,
        };
        let uid_base = (root && bwrap.is_some()).then_some(config.uid_base);
        if uid_base.is_some() {
            // Instances run as uids of their own, and bubblewrap needs to reach their directories.
            if let Some(blocked) = data_dir.ancestors().skip(1).find(|a| {
                std::fs::metadata(a)
                    .map(|m| m.permissions().mode() & 0o001 == 0)
                    .unwrap_or(false)
            }) {
                return Err(Error::invalid(format!(
                    "{} (above the data directory) cannot be traversed by other users, and instances run as uids of \
                     their own: `chmod o+x {}`, or choose a --data-dir elsewhere",
                    blocked.display(),
                    blocked.display()
                )));
            }
        }

        let (cgroups, cgroup_problem) = match Layout::detect() {
            None => (
                None,
                Some("no cgroup hierarchy with memory and pids controllers is mounted".to_owned()),
            ),
            Some(layout) => match layout.prepare() {
                Ok(()) => {
                    if root && config.favor_dynmods {
                        favor_dynmods();
                    }
                    let removed = layout.remove_leftovers(LEFTOVER_CGROUP_AGE);
                    if !removed.is_empty() {
                        tracing::info!(
                            count = removed.len(),
                            "removed the empty cgroups of instances that no otm removed"
                        );
                    }
                    (Some(layout), None)
                }
                Err(e) => (None, Some(format!("cannot create otm's cgroups: {e}"))),
            },
        };
        if let Some(why) = &cgroup_problem {
            tracing::warn!(reason = %why, "instances run without memory, pids and CPU limits");
        }
        let (events, _) = broadcast::channel(1024);
        let rt = LocalRuntime {
            inner: Arc::new(Inner {
                instances,
                records,
                otm_binary,
                bwrap,
                read_only: config.read_only,
                etc,
                egress_dir: config.egress_dir,
                cgroups,
                cgroup_problem,
                uid_base,
                uids: Mutex::new(HashMap::new()),
                deleting: Mutex::new(HashSet::new()),
                watched: Mutex::new(HashMap::new()),
                events,
            }),
        };
        let records = rt.records();
        *rt.inner.uids.lock().unwrap() = records.iter().map(|r| (r.id.clone(), r.uid)).collect();
        for record in records {
            if rt.alive(&record) {
                tracing::info!(instance = %record.id, "found running instance");
                rt.watch(record.id.clone(), None, ResourceLimits::default());
            }
        }
        Ok(rt)
    }

    /// The directory of one instance.
    pub fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.inner.instances.join(id.as_str())
    }

    fn record_dir(&self, id: &InstanceId) -> PathBuf {
        self.inner.records.join(id.as_str())
    }

    fn cgroup(&self, id: &InstanceId) -> Option<InstanceCgroup> {
        self.inner.cgroups.as_ref().map(|l| l.instance(id))
    }

    fn limits_status(&self) -> String {
        match (&self.inner.cgroups, &self.inner.cgroup_problem) {
            (Some(l), _) => l.name().to_owned(),
            (None, Some(why)) => format!("none ({why})"),
            (None, None) => "none".to_owned(),
        }
    }

    fn records(&self) -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(&self.inner.records) else {
            return vec![];
        };
        dir.flatten()
            .filter_map(|e| self.read_record(e.file_name().to_str()?))
            .collect()
    }

    /// A record, checked: the directory name is an instance id, the file a small regular file
    /// whose id matches.
    fn read_record(&self, name: &str) -> Option<Record> {
        let id = InstanceId::parse(name).ok()?;
        let bytes = read_regular(&self.record_dir(&id).join("record.json"), MAX_RECORD).ok()?;
        let record: Record = serde_json::from_slice(&bytes).ok()?;
        (record.id == id).then_some(record)
    }

    fn alive(&self, r: &Record) -> bool {
        if r.cgroup
            && let Some(cg) = self.cgroup(&r.id)
        {
            return cg.populated();
        }
        process_start(r.pid).is_some_and(|s| s == r.pid_start)
    }

    /// Picks a uid no other instance uses, and holds it for `id` until [`Self::remove`].
    fn pick_uid(&self, base: u32, id: &InstanceId) -> u32 {
        let mut uids = self.inner.uids.lock().unwrap();
        let used: HashSet<u32> = uids.values().copied().collect();
        loop {
            let slot = u32::from_str_radix(&otm_core::id::random_hex(2), 16).unwrap_or(0);
            let uid = base.saturating_add(slot);
            if !used.contains(&uid) {
                uids.insert(id.clone(), uid);
                return uid;
            }
        }
    }

    /// The instance sandbox's bubblewrap arguments, up to and including `--`. The agent's
    /// cgroup, when given, is shown writable at [`sandbox::AGENT_CGROUP_DIR`].
    fn instance_sandbox_args(
        &self,
        dir: &Path,
        agent_cgroup: Option<&Path>,
        info_fd: i32,
    ) -> Vec<String> {
        let s = |p: &Path| p.display().to_string();
        let mut a = sandbox::isolation_args();
        a.extend([
            "--clearenv".into(),
            "--unshare-net".into(),
            "--info-fd".into(),
            info_fd.to_string(),
        ]);
        let view = self.view();
        a.extend(view.args());
        a.extend(["--bind".into(), s(dir), s(dir)]);
        if let Some(dir) = &self.inner.egress_dir {
            // The directory, not a socket file: a restarted server binds a new socket there.
            a.extend(["--ro-bind".into(), s(dir), sandbox::EGRESS_DIR.into()]);
        }
        if let Some(cg) = agent_cgroup {
            // That directory alone, for the shim; the agent's own sandbox does not show it.
            a.extend(["--bind".into(), s(cg), sandbox::AGENT_CGROUP_DIR.into()]);
        }
        a.extend([
            "--remount-ro".into(),
            "/".into(),
            "--chdir".into(),
            s(dir),
            "--setenv".into(),
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin".into(),
        ]);
        a.extend(["--setenv".into(), "TMPDIR".into(), s(&dir.join("tmp"))]);
        if let Ok(level) = std::env::var("RUST_LOG") {
            a.extend(["--setenv".into(), "RUST_LOG".into(), level]);
        }
        for (k, v) in otm_shim::cli::SHIM_ENV {
            a.extend(["--setenv".into(), (*k).into(), (*v).into()]);
        }
        a.push("--".into());
        a
    }

    /// What a sandbox shows: the system, otm, the reference agent beside it, and the configured
    /// installations.
    fn view(&self) -> SystemView {
        let mut read_only = vec![self.inner.otm_binary.clone()];
        for beside in [
            "otm-reference-agent",
            "otm-sandbox-init",
            otm_shim::cli::SMALL_BINARY,
        ] {
            if let Some(p) = self.inner.otm_binary.parent().map(|d| d.join(beside))
                && p.is_file()
            {
                read_only.push(p);
            }
        }
        read_only.extend(self.inner.read_only.iter().filter(|p| p.exists()).cloned());
        SystemView {
            read_only,
            etc: self.inner.etc.clone(),
            passwd: None,
            tmp_bytes: TMP_BYTES,
        }
    }

    fn watch(&self, id: InstanceId, child: Option<tokio::process::Child>, limits: ResourceLimits) {
        self.inner
            .watched
            .lock()
            .unwrap()
            .insert(id.clone(), limits);
        let rt = self.clone();
        let watched_id = id.clone();
        tokio::spawn(async move {
            let id = watched_id;
            let detail = match child {
                Some(mut child) => {
                    let status = child.wait().await;
                    format!(
                        "the instance exited: {}",
                        status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|e| e.to_string())
                    )
                }
                None => {
                    // An adopted instance is not our child: look at it.
                    while let Some(r) = rt.read_record(id.as_str()) {
                        if !rt.alive(&r) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    "the instance's processes exited".to_owned()
                }
            };
            rt.exited(&id, detail);
        });
        if let Some(cg) = self.cgroup(&id) {
            let rt = self.clone();
            tokio::spawn(async move { rt.watch_limits(id, cg).await });
        }
    }

    /// Polls the kernel's limit counters (every 500 ms) and the disk usage (every 2 s) until the
    /// instance is gone; an instance over a limit is killed and reported.
    async fn watch_limits(&self, id: InstanceId, cg: InstanceCgroup) {
        let dir = self.instance_dir(&id);
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tick += 1;
            let Some(limits) = self.inner.watched.lock().unwrap().get(&id).copied() else {
                return;
            };
            if self.inner.deleting.lock().unwrap().contains(&id) {
                return;
            }
            let cg2 = cg.clone();
            let mut hit = tokio::task::spawn_blocking(move || cg2.limit_hit())
                .await
                .ok()
                .flatten()
                .map(|k| (k, String::new()));
            if hit.is_none() && tick.is_multiple_of(4) {
                let d = dir.clone();
                let used = tokio::task::spawn_blocking(move || {
                    ["state", "tmp", "home"]
                        .iter()
                        .map(|s| disk_usage(&d.join(s), 500_000))
                        .sum::<u64>()
                })
                .await
                .unwrap_or(0);
                if used > limits.disk_bytes {
                    hit = Some((
                        LimitKind::Disk,
                        format!("{used} bytes on disk, limit {}", limits.disk_bytes),
                    ));
                }
            }
            let Some((limit, mut detail)) = hit else {
                continue;
            };
            if detail.is_empty() {
                detail = match limit {
                    LimitKind::Memory => format!(
                        "out of memory at its limit of {} bytes",
                        limits.memory_bytes
                    ),
                    LimitKind::Pids => format!("reached its limit of {} processes", limits.pids),
                    LimitKind::Disk => "over its disk limit".into(),
                };
            }
            tracing::warn!(instance = %id, limit = limit.as_str(), %detail, "instance over a limit; killing it");
            // Killed, but kept on disk: the orchestrator saves its state, then deletes it.
            self.inner.deleting.lock().unwrap().insert(id.clone());
            let cg2 = cg.clone();
            let _ = tokio::task::spawn_blocking(move || cg2.kill(Duration::from_secs(10))).await;
            self.inner.watched.lock().unwrap().remove(&id);
            let _ = self.inner.events.send(RuntimeEvent::LimitExceeded {
                id: id.clone(),
                limit,
                detail,
            });
            return;
        }
    }

    fn exited(&self, id: &InstanceId, detail: String) {
        let was_watched = self.inner.watched.lock().unwrap().remove(id).is_some();
        if !was_watched || self.inner.deleting.lock().unwrap().contains(id) {
            return;
        }
        tracing::warn!(instance = %id, %detail, "instance exited");
        let _ = self.inner.events.send(RuntimeEvent::Exited {
            id: id.clone(),
            detail,
        });
    }

    /// Kills every process of an instance: its cgroup, or its sandbox's process 1.
    async fn kill_all(&self, id: &InstanceId, record: Option<&Record>) {
        if let Some(cg) = self.cgroup(id).filter(|c| c.exists()) {
            let result =
                tokio::task::spawn_blocking(move || cg.kill(Duration::from_secs(10))).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(instance = %id, error = %e, "could not kill every process of the instance");
            }
        }
        if let Some(r) = record
            && process_start(r.pid).is_some_and(|s| s == r.pid_start)
        {
            // Process 1 of a PID namespace takes the namespace with it.
            let _ = kill(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_start(r.pid).is_some_and(|s| s == r.pid_start)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    async fn create_inner(&self, spec: &InstanceSpec) -> Result<RuntimeInstance> {
        let id = InstanceId::parse(spec.id.as_str())?;
        let dir = self.instance_dir(&id);
        let rdir = self.record_dir(&id);
        let socket = rdir.join("shim.sock");
        if socket.as_os_str().len() > 100 {
            return Err(Error::invalid(format!(
                "the data directory path is too long for a Unix socket ({}); use a shorter --data-dir",
                socket.display()
            )));
        }
        let g = |e: std::io::Error| Error::generic(BACKEND, e);
        let sandboxed = self.inner.bwrap.is_some();
        let uid = match self.inner.uid_base {
            Some(base) => self.pick_uid(base, &id),
            None => nix::unistd::geteuid().as_raw(),
        };
        std::fs::create_dir(&rdir).map_err(g)?;
        std::fs::set_permissions(&rdir, std::fs::Permissions::from_mode(0o700)).map_err(g)?;
        std::fs::create_dir(&dir).map_err(g)?;
        for sub in ["state", "tmp", "home"] {
            std::fs::create_dir(dir.join(sub)).map_err(g)?;
        }
        let token_file = if sandboxed {
            dir.join("shim.token")
        } else {
            rdir.join("shim.token")
        };
        write_private(&token_file, spec.shim_token.expose().as_bytes()).map_err(g)?;
        if self.inner.uid_base.is_some() {
            let owner = Some(nix::unistd::Uid::from_raw(uid));
            let group = Some(nix::unistd::Gid::from_raw(uid));
            for p in [
                dir.clone(),
                dir.join("state"),
                dir.join("tmp"),
                dir.join("home"),
                token_file.clone(),
            ] {
                nix::unistd::chown(&p, owner, group).map_err(|e| g(e.into()))?;
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(g)?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o400)).map_err(g)?;

        let cgroup = self.cgroup(&id);
        let mut agent_cgroup = None;
        if let Some(cg) = &cgroup {
            cg.create(&spec.limits).map_err(|e| {
                Error::unavailable(BACKEND, format!("cannot set the instance's limits: {e}"))
            })?;
            // The agent's own cgroup, which its shim freezes; only sandboxed agents run in one.
            if sandboxed {
                let owner = self.inner.uid_base.map(|_| (uid, uid));
                agent_cgroup = cg.create_agent(owner).map_err(|e| {
                    Error::unavailable(BACKEND, format!("cannot create the agent's cgroup: {e}"))
                })?;
            }
        }

        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(g)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(g)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(rdir.join("shim.log"))
            .map_err(g)?;

        const INFO_FD: i32 = 3;
        let (info_r, info_w) = nix::unistd::pipe().map_err(|e| g(e.into()))?;
        let s = |p: &Path| p.display().to_string();
        let mut argv: Vec<String> = vec!["sandbox-exec".into()];
        for f in cgroup.iter().flat_map(|c| c.procs_files()) {
            argv.extend(["--cgroup-procs".into(), s(&f)]);
        }
        if self.inner.uid_base.is_some() {
            argv.extend([
                "--uid".into(),
                uid.to_string(),
                "--gid".into(),
                uid.to_string(),
            ]);
        }
        argv.extend([
            "--nofile".into(),
            NOFILE.to_string(),
            "--fsize".into(),
            spec.limits.disk_bytes.to_string(),
        ]);
        if sandboxed {
            argv.extend(["--keep-fd".into(), INFO_FD.to_string()]);
        }
        argv.push("--".into());
        if let Some(bwrap) = &self.inner.bwrap {
            argv.push(s(bwrap));
            argv.extend(self.instance_sandbox_args(&dir, agent_cgroup.as_deref(), INFO_FD));
        }
        // `otm-shim` beside otm holds a fraction of the whole otm binary's memory for as long
        // as the instance is awake.
        match otm_shim::cli::small_binary(&self.inner.otm_binary) {
            Some(small) => argv.push(s(&small)),
            None => argv.extend([s(&self.inner.otm_binary), "shim".into()]),
        }
        argv.extend(["--instance".into(), id.to_string(), "--dir".into(), s(&dir)]);
        argv.extend([
            "--listen".into(),
            "stdin".into(),
            "--token-file".into(),
            s(&token_file),
        ]);
        if sandboxed {
            argv.push("--agent-sandbox".into());
            if self.inner.egress_dir.is_some() {
                argv.extend(["--egress".into(), sandbox::EGRESS_DIR.into()]);
            }
            for p in &self.view().read_only {
                argv.extend(["--show".into(), s(p)]);
            }
            if agent_cgroup.is_some() {
                argv.extend(["--agent-cgroup".into(), sandbox::AGENT_CGROUP_DIR.into()]);
            }
        }

        // `otm-sandbox-exec` beside otm starts faster than the whole otm binary.
        let small = self.inner.otm_binary.with_file_name("otm-sandbox-exec");
        let program = if small.is_file() {
            argv.remove(0);
            small
        } else {
            self.inner.otm_binary.clone()
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&argv)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(otm_shim::cli::SHIM_ENV.iter().copied())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
            .stdout(log.try_clone().map_err(g)?)
            .stderr(log)
            .kill_on_drop(false);
        if sandboxed {
            use command_fds::{CommandFdExt, FdMapping};
            cmd.fd_mappings(vec![FdMapping {
                parent_fd: info_w,
                child_fd: INFO_FD,
            }])
            .map_err(|e| Error::generic(BACKEND, e))?;
        } else {
            drop(info_w);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::unavailable(BACKEND, format!("cannot start the instance: {e}")))?;
        drop(cmd);

        let started = Instant::now();
        let pid = if sandboxed {
            let read = tokio::task::spawn_blocking(move || sandbox::read_child_pid(info_r));
            match tokio::time::timeout(Duration::from_secs(15), read).await {
                Ok(Ok(Ok(pid))) => pid,
                other => {
                    let _ = child.start_kill();
                    let why = match other {
                        Ok(Ok(Err(e))) => e.to_string(),
                        _ => "no answer within 15 s".into(),
                    };
                    return Err(Error::unavailable(
                        BACKEND,
                        format!(
                            "the sandbox did not start ({why}):\n{}",
                            tail(&rdir.join("shim.log"))
                        ),
                    ));
                }
            }
        } else {
            child.id().unwrap_or(0)
        };
        let record = Record {
            id: id.clone(),
            address: format!("unix:{}", socket.display()),
            tenant: spec.tenant.clone(),
            created_at_ms: otm_core::time::now_ms(),
            sandboxed,
            uid,
            cgroup: cgroup.is_some(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::generic(BACKEND, e))?;
        otm_shim::archive::write_durably(&rdir.join("record.json"), &bytes).map_err(g)?;

        // Ready when the shim answers on its socket.
        let shim = otm_shim::ShimClient::new(record.address.clone(), spec.shim_token.clone());
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), shim.status()).await {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::unavailable(
                    BACKEND,
                    format!(
                        "the shim exited at start ({status}):\n{}",
                        tail(&rdir.join("shim.log"))
                    ),
                ));
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err(Error::unavailable(
                    BACKEND,
                    "the shim did not answer within 15 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        self.watch(id.clone(), Some(child), spec.limits);
        Ok(RuntimeInstance {
            id,
            address: record.address,
            alive: true,
            tenant: spec.tenant.clone(),
            created_at_ms: Some(record.created_at_ms),
        })
    }

    async fn remove(&self, id: &InstanceId) -> Result<()> {
        let record = self.read_record(id.as_str());
        self.kill_all(id, record.as_ref()).await;
        let dirs = [self.instance_dir(id), self.record_dir(id)];
        let cgroup = self.cgroup(id);
        tokio::task::spawn_blocking(move || {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            for d in dirs {
                // std's remove_dir_all never follows a link an instance planted.
                match std::fs::remove_dir_all(&d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::generic(BACKEND, e))?
        .map_err(|e| Error::generic(BACKEND, e))?;
        self.inner.uids.lock().unwrap().remove(id);
        Ok(())
    }
}

#[async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolation(&self) -> String {
        if self.inner.bwrap.is_some() {
            "bubblewrap".into()
        } else {
            "none".into()
        }
    }

    fn limits(&self) -> String {
        self.limits_status()
    }

    #[tracing::instrument(name = "local_create", skip_all, fields(instance = %spec.id, tenant = spec.tenant.as_ref().map(tracing::field::display)))]
    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance> {
        let result = self.create_inner(spec).await;
        if result.is_err() {
            self.inner.deleting.lock().unwrap().insert(spec.id.clone());
            let _ = self.remove(&spec.id).await;
            self.inner.watched.lock().unwrap().remove(&spec.id);
            self.inner.deleting.lock().unwrap().remove(&spec.id);
        }
        result
    }

    async fn list(&self) -> Result<Vec<RuntimeInstance>> {
        // Records and cgroup files are read off the async workers.
        let rt = self.clone();
        let records = tokio::task::spawn_blocking(move || {
            rt.records()
                .into_iter()
                .map(|r| (rt.alive(&r), r))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::generic(BACKEND, e))?;
        let mut out: Vec<RuntimeInstance> = records
            .into_iter()
            .map(|(alive, r)| RuntimeInstance {
                alive,
                id: r.id,
                address: r.address,
                tenant: r.tenant,
                created_at_ms: Some(r.created_at_ms),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    #[tracing::instrument(name = "local_delete", skip_all, fields(instance = %id))]
    async fn delete(&self, id: &InstanceId) -> Result<()> {
        self.inner.deleting.lock().unwrap().insert(id.clone());
        let result = self.remove(id).await;
        self.inner.watched.lock().unwrap().remove(id);
        self.inner.deleting.lock().unwrap().remove(id);
        result
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        // A subscriber that fell behind skips the events it missed.
        tokio_stream::wrappers::BroadcastStream::new(self.inner.events.subscribe())
            .filter_map(|ev| std::future::ready(ev.ok()))
            .boxed()
    }

    async fn set_limits(&self, id: &InstanceId, limits: &ResourceLimits) -> Result<()> {
        if let Some(l) = self.inner.watched.lock().unwrap().get_mut(id) {
            *l = *limits;
        }
        let Some(cg) = self.cgroup(id) else {
            return Ok(());
        };
        let limits = *limits;
        tokio::task::spawn_blocking(move || cg.set_limits(&limits))
            .await
            .map_err(|e| Error::generic(BACKEND, e))?
            .map_err(|e| {
                Error::unavailable(BACKEND, format!("cannot change the instance's limits: {e}"))
            })
    }

    async fn salvage_state(
        &self,
        id: &InstanceId,
        skip: &[String],
        max_bytes: u64,
        into: &Path,
    ) -> Result<bool> {
        let id = InstanceId::parse(id.as_str())?;
        // Nothing may write while the state is read.
        let record = self.read_record(id.as_str());
        self.kill_all(&id, record.as_ref()).await;
        let state = self.instance_dir(&id).join("state");
        let skip = skip.to_vec();
        let into = into.to_path_buf();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if !state.is_dir() {
                return Ok(false);
            }
            let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
            let caps = otm_shim::archive::Caps {
                max_bytes,
                ..Default::default()
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&into)?;
            let mut out = std::io::BufWriter::with_capacity(otm_shim::pipe::CHUNK, file);
            otm_shim::archive::pack(&state, &skip, &caps, &mut out)?;
            out.flush()?;
            Ok(true)
        })
        .await
        .map_err(|e| Error::generic(BACKEND, e))?
        .map_err(|e: std::io::Error| {
            Error::unavailable(
                BACKEND,
                format!("cannot pack the state directory from outside: {e}"),
            )
        })
    }
}

/// Turns the kernel's favordynmods on ([`crate::cgroup::favor_dynamic_moves`]), saying what it
/// did; a failure only costs each instance start some milliseconds.
fn favor_dynmods() {
    use crate::cgroup::{FAVORDYNMODS_MOUNT, FavorDynmods, favor_dynamic_moves};
    match favor_dynamic_moves(Path::new(FAVORDYNMODS_MOUNT)) {
        Ok(FavorDynmods::Mounted(at)) => tracing::info!(
            at = %at.display(),
            "mounted a cgroup hierarchy with favordynmods: moving an instance into its cgroups no longer waits for the kernel"
        ),
        Ok(FavorDynmods::AlreadyOn(at)) => {
            tracing::debug!(at = %at.display(), "favordynmods is on")
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot turn the kernel's favordynmods on: each instance start waits 10 to 20 ms more"
        ),
    }
}

/// Every path shown to instances, and the `otm` binary's own directory (agents are installed
/// beside otm), must lie outside the data directory: `/opt/otm/{otm,data}` is refused.
pub fn check_shown_paths(data_dir: &Path, otm_binary: &Path, read_only: &[PathBuf]) -> Result<()> {
    let data_dir = std::path::absolute(data_dir).map_err(|e| Error::generic(BACKEND, e))?;
    let mut shown = SystemView {
        read_only: read_only.to_vec(),
        ..Default::default()
    }
    .shown_paths();
    if let Some(dir) = std::path::absolute(otm_binary)
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        shown.push(dir.to_path_buf());
    }
    match sandbox::shows_data_dir(&shown, &data_dir) {
        None => Ok(()),
        Some(p) => Err(Error::invalid(format!(
            "{} is shown read-only to every instance and contains the data directory {}: give a --data-dir \
             outside it (or install otm and the agents, --openclaw-prefix, elsewhere)",
            p.display(),
            data_dir.display()
        ))),
    }
}

/// A process's start time (clock ticks since boot), `None` when it does not exist or is a
/// zombie.
pub fn process_start(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    // Field 22 of the whole line; the 20th after the command name.
    fields.get(19)?.parse().ok()
}

/// True while a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    process_start(pid).is_some()
}

/// Reads a small regular file without following a link, blocking on a FIFO, or reading more
/// than `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(buf)
}

/// Bytes on disk under `dir` (not following links), counting at most `max_entries` entries;
/// past that, `u64::MAX`.
fn disk_usage(dir: &Path, max_entries: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > max_entries {
                return u64::MAX;
            }
            let Ok(m) = e.metadata() else { continue };
            total = total.saturating_add(m.blocks() * 512);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn tail(path: &Path) -> String {
    let text = read_regular(path, 1 << 20)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Finds a program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instances get uids no other instance holds, without reading the records each time.
    #[test]
    fn picked_uids_are_distinct_and_freed() {
        if !nix::unistd::geteuid().is_root() || sandbox::bwrap().is_none() {
            eprintln!("skipped: uids of their own need root and bubblewrap");
            return;
        }
        let dir = std::env::temp_dir().join(format!("otm-test-uids-{}", InstanceId::random()));
        let rt = LocalRuntime::new(LocalRuntimeConfig {
            data_dir: dir.clone(),
            otm_binary: std::env::current_exe().unwrap(),
            sandbox: SandboxMode::Bubblewrap,
            read_only: vec![],
            egress_dir: None,
            uid_base: DEFAULT_UID_BASE,
            favor_dynmods: false,
        })
        .unwrap();
        let ids: Vec<InstanceId> = (0..2000).map(|_| InstanceId::random()).collect();
        let uids: HashSet<u32> = ids
            .iter()
            .map(|id| rt.pick_uid(DEFAULT_UID_BASE, id))
            .collect();
        assert_eq!(uids.len(), ids.len(), "a uid was given twice");
        assert!(
            uids.iter()
                .all(|u| (DEFAULT_UID_BASE..DEFAULT_UID_BASE + 65_536).contains(u))
        );
        let held = rt.inner.uids.lock().unwrap().len();
        assert_eq!(held, ids.len());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(rt.remove(&ids[0]))
            .unwrap();
        assert_eq!(rt.inner.uids.lock().unwrap().len(), ids.len() - 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
