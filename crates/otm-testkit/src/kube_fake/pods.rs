//! How the fake runs the pods it is given: the [`PodRunner`] trait, the default
//! [`ProcessRunner`] that starts a pod's first container as a local process, and the per-pod
//! driver that plays the scheduler and the kubelet (status transitions, readiness probes,
//! graceful termination).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::Inner;
use super::store::{PODS, SECRETS, meta_str};
use super::util::{base64_decode, expand_vars, now_rfc3339};

/// The node every scheduled pod is bound to.
pub const NODE_NAME: &str = "otm-fake-node";

/// How often readiness probes are tried (faster than any real `periodSeconds`, so tests wait
/// less; `initialDelaySeconds` is ignored for the same reason).
const PROBE_PERIOD: Duration = Duration::from_millis(150);

/// Everything a [`PodRunner`] needs to start a pod's first container.
#[derive(Clone, Debug)]
pub struct PodLaunch {
    pub namespace: String,
    pub name: String,
    /// The pod's own loopback address, also in `status.podIP`.
    pub pod_ip: Ipv4Addr,
    /// The pod as stored when it was started.
    pub pod: Value,
    /// The first container's `image`.
    pub image: String,
    /// The first container's `command`, with `$(VAR)` references expanded (may be empty: the
    /// image's entrypoint).
    pub command: Vec<String>,
    /// The first container's `args`, expanded likewise.
    pub args: Vec<String>,
    /// The container's environment, resolved: `value`s expanded, `valueFrom.secretKeyRef` from
    /// the stored Secret, `valueFrom.fieldRef` from the pod, `envFrom[].secretRef` included.
    pub env: Vec<(String, String)>,
    /// A fresh directory for this pod, for use as the working directory.
    pub workdir: PathBuf,
    /// Where the pod's output should go; `GET .../pods/{name}/log` serves this file.
    pub log_path: PathBuf,
    /// The first container's `volumeMounts` of `emptyDir` volumes: the mount path and a fresh
    /// local directory standing in for it (under `workdir`).
    pub volumes: Vec<(String, PathBuf)>,
}

/// A pod's running workload, as a [`PodRunner`] started it.
pub trait Workload: Send + Sync + fmt::Debug {
    /// Asks it to stop, as SIGTERM does.
    fn terminate(&self);
    /// Stops it at once, as SIGKILL does.
    fn kill(&self);
    /// Resolves with its exit code once it has stopped (128 + the signal number when a signal
    /// ended it, as the kubelet reports). May be called more than once.
    fn exited(&self) -> Pin<Box<dyn Future<Output = i32> + Send + 'static>>;
    /// Runs `command` in the workload's environment, as a `preStop` exec hook does, and
    /// resolves with its exit code. The default: this runner cannot.
    fn exec(
        &self,
        command: &[String],
    ) -> Pin<Box<dyn Future<Output = Result<i32, String>> + Send + 'static>> {
        let _ = command;
        Box::pin(async { Err("this runner cannot run commands in a workload".to_owned()) })
    }
}

/// Starts pods' workloads. The fake calls [`PodRunner::start`] once a pod is scheduled and its
/// environment can be resolved; an error marks the pod Failed with a `StartError`.
pub trait PodRunner: Send + Sync + fmt::Debug {
    fn start(&self, launch: &PodLaunch) -> Result<Box<dyn Workload>, String>;
}

/// The default runner: runs the pod's first container as a local process.
///
/// The program is found from, in order: the command's first word in the binary map, its file
/// name in the map, the image in the map (as written, without its tag, and its last path
/// segment without its tag); if none is mapped, the command's first word is run as written
/// (looked up in `PATH`). A mapped image with an empty `command` runs the mapped binary with
/// `args`. The process gets only the container's environment plus `PATH`, `HOME` and
/// `OTM_FAKE_POD_ROOT` (the pod's fresh directory, also its working directory), `HOSTNAME` (the
/// pod's name) and what [`ProcessRunner::env`] adds; stdout and stderr go to the pod's log.
/// Volumes are not mounted; [`ProcessRunner::rewrite_mount_paths`] points paths under
/// `emptyDir` mounts at local directories instead.
#[derive(Clone, Debug, Default)]
pub struct ProcessRunner {
    binaries: HashMap<String, PathBuf>,
    env: Vec<(String, String)>,
    rewrite_mounts: bool,
}

impl ProcessRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps an image name (`otm`, `otm:dev`, `registry/otm:1.0`) or a command word (`otm`,
    /// `/usr/local/bin/otm`) to a local binary.
    pub fn binary(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(name.into(), path.into());
        self
    }

    /// Adds a variable to every pod process's environment (before the container's own).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Rewrites arguments and environment values that start with the mount path of an
    /// `emptyDir` volume (`/state/x`, `--dir=/state`) to the local directory standing in for
    /// it, so a pod spec that writes to its volumes works unchanged as a local process.
    pub fn rewrite_mount_paths(mut self) -> Self {
        self.rewrite_mounts = true;
        self
    }

    fn lookup(&self, word: &str) -> Option<&PathBuf> {
        self.binaries.get(word).or_else(|| {
            Path::new(word)
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| self.binaries.get(n))
        })
    }

    fn lookup_image(&self, image: &str) -> Option<&PathBuf> {
        let untagged = image
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(image, |(i, _)| i);
        let untagged = untagged.split('@').next().unwrap_or(untagged);
        let last = untagged.rsplit('/').next().unwrap_or(untagged);
        [image, untagged, last]
            .into_iter()
            .find_map(|k| self.binaries.get(k))
    }

    /// The program and arguments to run for a launch.
    pub fn resolve(&self, launch: &PodLaunch) -> Result<(PathBuf, Vec<String>), String> {
        if let Some((first, rest)) = launch.command.split_first() {
            let program = self
                .lookup(first)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(first));
            let mut args = rest.to_vec();
            args.extend(launch.args.iter().cloned());
            return Ok((program, args));
        }
        if let Some(program) = self.lookup_image(&launch.image) {
            return Ok((program.clone(), launch.args.clone()));
        }
        if let Some((first, rest)) = launch.args.split_first()
            && let Some(program) = self.lookup(first)
        {
            return Ok((program.clone(), rest.to_vec()));
        }
        Err(format!(
            "the container has no command and its image {:?} is not in the fake's binary map; map it with ProcessRunner::binary",
            launch.image
        ))
    }
}

impl PodRunner for ProcessRunner {
    fn start(&self, launch: &PodLaunch) -> Result<Box<dyn Workload>, String> {
        let (program, mut args) = self.resolve(launch)?;
        let mut env = launch.env.clone();
        let hook_vars = env.clone();
        if self.rewrite_mounts {
            for a in &mut args {
                *a = rewrite_mounts(a, &launch.volumes);
            }
            for (_, v) in &mut env {
                *v = rewrite_mounts(v, &launch.volumes);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log_path)
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &launch.workdir)
            .env("HOSTNAME", &launch.name)
            .envs(self.env.iter().cloned())
            .env("OTM_FAKE_POD_ROOT", &launch.workdir)
            .envs(env.iter().cloned())
            .current_dir(&launch.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<nix::sys::signal::Signal>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw);
        tokio::spawn(async move {
            use nix::sys::signal::{Signal, kill, killpg};
            let code = loop {
                tokio::select! {
                    status = child.wait() => {
                        break match status {
                            Ok(s) => {
                                use std::os::unix::process::ExitStatusExt;
                                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9))
                            }
                            Err(_) => 128 + 9,
                        };
                    }
                    Some(sig) = signal_rx.recv() => {
                        // The child has not been reaped yet (its `wait` has not returned), so
                        // its id still names it. As in a container, SIGTERM goes to the main
                        // process only and SIGKILL to all of its processes.
                        if let Some(pid) = pgid {
                            let _ = if sig == Signal::SIGKILL { killpg(pid, sig) } else { kill(pid, sig) };
                        }
                    }
                }
            };
            // A container's processes end with its main process. The group outlives the
            // leader while any member lives, so its id still names it here.
            if let Some(pid) = pgid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            let _ = exit_tx.send(Some(code));
        });
        let mut hook_env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            ),
            ("HOME".into(), launch.workdir.display().to_string()),
            ("HOSTNAME".into(), launch.name.clone()),
            (
                "OTM_FAKE_POD_ROOT".into(),
                launch.workdir.display().to_string(),
            ),
        ];
        hook_env.extend(self.env.iter().cloned());
        hook_env.extend(hook_vars);
        Ok(Box::new(ProcessWorkload {
            signals,
            exit: exit_rx,
            runner: self.clone(),
            env: hook_env,
            workdir: launch.workdir.clone(),
        }))
    }
}

/// A pod process started by [`ProcessRunner`]; dropping it kills the process.
#[derive(Debug)]
struct ProcessWorkload {
    signals: mpsc::UnboundedSender<nix::sys::signal::Signal>,
    exit: watch::Receiver<Option<i32>>,
    /// For exec hooks: how programs are found, the container's environment, its directory.
    runner: ProcessRunner,
    env: Vec<(String, String)>,
    workdir: PathBuf,
}

impl Workload for ProcessWorkload {
    fn terminate(&self) {
        let _ = self.signals.send(nix::sys::signal::Signal::SIGTERM);
    }

    fn kill(&self) {
        let _ = self.signals.send(nix::sys::signal::Signal::SIGKILL);
    }

    fn exited(&self) -> Pin<Box<dyn Future<Output = i32> + Send + 'static>> {
        let mut rx = self.exit.clone();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(code) => code.unwrap_or(137),
                Err(_) => 137,
            }
        })
    }

    fn exec(
        &self,
        command: &[String],
    ) -> Pin<Box<dyn Future<Output = Result<i32, String>> + Send + 'static>> {
        let Some((first, rest)) = command.split_first() else {
            return Box::pin(async { Err("an empty exec command".to_owned()) });
        };
        let program = self
            .runner
            .lookup(first)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(first));
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(rest)
            .env_clear()
            .envs(self.env.iter().cloned())
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        Box::pin(async move {
            let status = cmd
                .status()
                .await
                .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
            Ok(status.code().unwrap_or(137))
        })
    }
}

impl Drop for ProcessWorkload {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the next created pod will go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    Normal,
    Unschedulable,
    FailStart,
}

/// Orders to a pod's driver.
#[derive(Debug)]
pub(crate) enum PodCommand {
    /// A graceful deletion: SIGTERM now, SIGKILL after the grace, then remove the object.
    Terminate { grace: Duration },
    /// Kill the workload and mark the pod Failed with this terminated state.
    Fail { exit_code: i32, reason: String },
    /// The object is gone: stop the workload.
    Removed,
}

/// Sets a condition in a pod's `status.conditions`, keeping the others.
pub(crate) fn set_condition(pod: &mut Value, kind: &str, status: bool, reason: Option<&str>) {
    if !pod["status"].is_object() {
        pod["status"] = json!({});
    }
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    let status_str = if status { "True" } else { "False" };
    let conditions = pod["status"]["conditions"]
        .as_array_mut()
        .expect("just made an array");
    let now = now_rfc3339();
    let mut cond = json!({"type": kind, "status": status_str, "lastProbeTime": null, "lastTransitionTime": now});
    if let Some(r) = reason {
        cond["reason"] = json!(r);
    }
    match conditions.iter_mut().find(|c| c["type"] == kind) {
        Some(c) if c["status"] == status_str && c.get("reason") == cond.get("reason") => {}
        Some(c) => *c = cond,
        None => conditions.push(cond),
    }
}

fn first_container(pod: &Value) -> Value {
    pod.pointer("/spec/containers/0")
        .cloned()
        .unwrap_or(json!({}))
}

fn container_status(pod: &Value, ready: bool, state: Value) -> Value {
    let c = first_container(pod);
    let started = state.get("running").is_some();
    json!([{
        "name": c["name"].as_str().unwrap_or("main"),
        "image": c["image"].as_str().unwrap_or_default(),
        "imageID": "",
        "ready": ready,
        "started": started,
        "restartCount": 0,
        "state": state,
    }])
}

/// Marks a pod's (first) container terminated with `exit_code`, and the pod Succeeded or Failed.
pub(crate) fn mark_terminated(
    pod: &mut Value,
    exit_code: i32,
    reason: &str,
    message: Option<&str>,
) {
    let started = pod
        .pointer("/status/containerStatuses/0/state/running/startedAt")
        .cloned()
        .unwrap_or_else(|| json!(now_rfc3339()));
    let mut terminated = json!({
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": started,
        "finishedAt": now_rfc3339(),
    });
    if let Some(m) = message {
        terminated["message"] = json!(m);
    }
    pod["status"]["containerStatuses"] =
        container_status(pod, false, json!({"terminated": terminated}));
    pod["status"]["phase"] = json!(if exit_code == 0 && reason == "Completed" {
        "Succeeded"
    } else {
        "Failed"
    });
    let why = if exit_code == 0 {
        "PodCompleted"
    } else {
        "PodFailed"
    };
    set_condition(pod, "Ready", false, Some(why));
    set_condition(pod, "ContainersReady", false, Some(why));
}

pub(crate) fn mark_scheduled(pod: &mut Value, ip: Option<Ipv4Addr>) {
    pod["spec"]["nodeName"] = json!(NODE_NAME);
    pod["status"]["hostIP"] = json!("127.0.0.1");
    pod["status"]["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
    if let Some(ip) = ip {
        pod["status"]["podIP"] = json!(ip.to_string());
        pod["status"]["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if pod["status"].get("startTime").is_none() {
        pod["status"]["startTime"] = json!(now_rfc3339());
    }
    set_condition(pod, "PodScheduled", true, None);
    set_condition(pod, "Initialized", true, None);
    set_condition(pod, "Ready", false, Some("ContainersNotReady"));
    set_condition(pod, "ContainersReady", false, Some("ContainersNotReady"));
}

pub(crate) fn mark_running(pod: &mut Value, ready: bool) {
    pod["status"]["phase"] = json!("Running");
    let started = pod
        .pointer("/status/containerStatuses/0/state/running/startedAt")
        .cloned()
        .unwrap_or_else(|| json!(now_rfc3339()));
    pod["status"]["containerStatuses"] =
        container_status(pod, ready, json!({"running": {"startedAt": started}}));
    mark_ready(pod, ready);
}

pub(crate) fn mark_ready(pod: &mut Value, ready: bool) {
    let reason = if ready {
        None
    } else {
        Some("ContainersNotReady")
    };
    set_condition(pod, "Ready", ready, reason);
    set_condition(pod, "ContainersReady", ready, reason);
    if let Some(cs) = pod.pointer_mut("/status/containerStatuses/0") {
        cs["ready"] = json!(ready);
    }
}

/// Why a container's environment cannot be built yet (the kubelet retries).
struct ConfigError(String);

fn resolve_env(
    inner: &Inner,
    pod: &Value,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = meta_str(pod, "namespace").to_owned();
    let container = first_container(pod);
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut env = Vec::new();
    let secret = |name: &str| inner.get_object(SECRETS, &ns, name);
    let secret_value = |secret: &Value, key: &str| {
        secret
            .pointer(&format!(
                "/data/{}",
                key.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .and_then(base64_decode)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    for from in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(r) = from.get("secretRef") {
            let name = r["name"].as_str().unwrap_or_default();
            let optional = r["optional"].as_bool().unwrap_or(false);
            match secret(name) {
                Some(s) => {
                    let prefix = from["prefix"].as_str().unwrap_or_default();
                    for key in s["data"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        if let Some(v) = secret_value(&s, &key) {
                            vars.insert(format!("{prefix}{key}"), v.clone());
                            env.push((format!("{prefix}{key}"), v));
                        }
                    }
                }
                None if optional => {}
                None => return Err(ConfigError(format!("secret \"{name}\" not found"))),
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else {
            continue;
        };
        let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
            expand_vars(v, &vars)
        } else if let Some(r) = e.pointer("/valueFrom/secretKeyRef") {
            let sname = r["name"].as_str().unwrap_or_default();
            let key = r["key"].as_str().unwrap_or_default();
            let optional = r["optional"].as_bool().unwrap_or(false);
            match secret(sname).map(|s| secret_value(&s, key)) {
                Some(Some(v)) => v,
                Some(None) if optional => continue,
                None if optional => continue,
                Some(None) => {
                    return Err(ConfigError(format!(
                        "couldn't find key {key} in Secret {ns}/{sname}"
                    )));
                }
                None => return Err(ConfigError(format!("secret \"{sname}\" not found"))),
            }
        } else if let Some(path) = e
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            match path {
                "status.podIP" => ip.to_string(),
                "status.hostIP" => "127.0.0.1".to_owned(),
                "spec.nodeName" => NODE_NAME.to_owned(),
                "metadata.name" => meta_str(pod, "name").to_owned(),
                "metadata.namespace" => ns.clone(),
                "metadata.uid" => meta_str(pod, "uid").to_owned(),
                "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                other => {
                    let label = other
                        .strip_prefix("metadata.labels['")
                        .map(|l| ("labels", l))
                        .or_else(|| {
                            other
                                .strip_prefix("metadata.annotations['")
                                .map(|a| ("annotations", a))
                        });
                    match label
                        .and_then(|(field, rest)| rest.strip_suffix("']").map(|k| (field, k)))
                    {
                        Some((field, key)) => pod["metadata"][field][key]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        None => String::new(),
                    }
                }
            }
        } else {
            String::new()
        };
        vars.insert(name.to_owned(), value.clone());
        env.push((name.to_owned(), value));
    }
    Ok(env)
}

/// Fresh local directories for the container's `emptyDir` mounts.
fn empty_dirs(pod: &Value, container: &Value, workdir: &Path) -> Vec<(String, PathBuf)> {
    let empty: Vec<&str> = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("emptyDir").is_some())
        .filter_map(|v| v["name"].as_str())
        .collect();
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let name = m["name"].as_str()?;
            let path = m["mountPath"].as_str()?;
            if !empty.contains(&name) || name.contains('/') || name.starts_with('.') {
                return None;
            }
            let dir = workdir.join("volumes").join(name);
            std::fs::create_dir_all(&dir).ok()?;
            // An emptyDir is writable by whatever user the container runs as.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).ok()?;
            Some((path.to_owned(), dir))
        })
        .collect()
}

/// Replaces a leading mount path in `text` by its local directory.
fn rewrite_mounts(text: &str, volumes: &[(String, PathBuf)]) -> String {
    for (mount, dir) in volumes {
        let mount = mount.trim_end_matches('/');
        if let Some(rest) = text.strip_prefix(mount)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", dir.display());
        }
        // `--flag=/mount/path` forms.
        if let Some((flag, value)) = text.split_once('=')
            && let Some(rest) = value.strip_prefix(mount)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{flag}={}{rest}", dir.display());
        }
    }
    text.to_owned()
}

fn strings(v: &Value, vars: &HashMap<String, String>) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|s| expand_vars(s, vars))
        .collect()
}

/// Probes a container's readiness once: `httpGet` (2xx or 3xx), `tcpSocket` (a connection);
/// other probe kinds pass.
async fn probe(probe: &Value, container: &Value, ip: Ipv4Addr, limit: Duration) -> bool {
    let port_of = |p: &Value| -> Option<u16> {
        match p {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(s) => s.parse().ok().or_else(|| {
                container["ports"]
                    .as_array()?
                    .iter()
                    .find(|cp| cp["name"] == s.as_str())?
                    .get("containerPort")?
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
            }),
            _ => None,
        }
    };
    let host = |p: &Value| {
        p["host"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| ip.to_string())
    };
    let attempt = async {
        if let Some(h) = probe.get("httpGet") {
            let port = port_of(&h["port"])?;
            let host = host(h);
            let path = h["path"].as_str().unwrap_or("/");
            let mut stream = TcpStream::connect((host.as_str(), port)).await.ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(req.as_bytes()).await.ok()?;
            let mut head = [0u8; 16];
            let mut n = 0;
            while n < 12 {
                let r = stream.read(&mut head[n..]).await.ok()?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let line = std::str::from_utf8(&head[..n]).ok()?;
            let code: u16 = line.get(9..12)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(t) = probe.get("tcpSocket") {
            let port = port_of(&t["port"])?;
            Some(TcpStream::connect((host(t).as_str(), port)).await.is_ok())
        } else if let Some(g) = probe.get("grpc") {
            let port = port_of(&g["port"])?;
            Some(
                TcpStream::connect((ip.to_string().as_str(), port))
                    .await
                    .is_ok(),
            )
        } else {
            Some(true)
        }
    };
    timeout(limit, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The container's `lifecycle.preStop` hook as a future: `exec` through the workload,
/// `httpGet` on the pod IP. Its outcome does not matter, as with the kubelet.
fn pre_stop(
    container: &Value,
    ip: Ipv4Addr,
    workload: &dyn Workload,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    let hook = container.pointer("/lifecycle/preStop")?;
    if let Some(command) = hook.pointer("/exec/command").and_then(Value::as_array) {
        let command: Vec<String> = command
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        let run = workload.exec(&command);
        return Some(Box::pin(async move {
            let _ = run.await;
        }));
    }
    if let Some(get) = hook.get("httpGet") {
        let probe_spec = json!({"httpGet": get});
        let container = container.clone();
        return Some(Box::pin(async move {
            probe(&probe_spec, &container, ip, Duration::from_secs(86_400)).await;
        }));
    }
    None
}

/// Waits for orders after the workload is gone: a deletion now removes the pod at once.
async fn after_exit(
    inner: &Arc<Inner>,
    ns: &str,
    name: &str,
    uid: &str,
    cmds: &mut mpsc::UnboundedReceiver<PodCommand>,
) {
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            PodCommand::Terminate { .. } => {
                inner.remove_pod_if(ns, name, uid);
                return;
            }
            PodCommand::Fail { exit_code, reason } => {
                inner.update_pod(ns, name, uid, |p| {
                    mark_terminated(p, exit_code, &reason, None)
                });
            }
            PodCommand::Removed => return,
        }
    }
}

/// Plays scheduler and kubelet for one pod, from creation until its object is gone.
pub(crate) async fn drive_pod(
    inner: Arc<Inner>,
    runner: Arc<dyn PodRunner>,
    ns: String,
    name: String,
    uid: String,
    fate: Fate,
    mut cmds: mpsc::UnboundedReceiver<PodCommand>,
) {
    if fate == Fate::Unschedulable {
        inner.update_pod(&ns, &name, &uid, |p| {
            set_condition(p, "PodScheduled", false, Some("Unschedulable"));
            if let Some(c) = p["status"]["conditions"].as_array_mut().and_then(|c| c.iter_mut().find(|c| c["type"] == "PodScheduled")) {
                c["message"] = json!("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.");
            }
        });
        after_exit(&inner, &ns, &name, &uid, &mut cmds).await;
        return;
    }
    let ip = inner.allocate_ip();
    let Some(pod) = inner.update_pod(&ns, &name, &uid, |p| mark_scheduled(p, Some(ip))) else {
        return;
    };
    let container = first_container(&pod);
    let (workdir, log_path) = inner.pod_dirs(&ns, &name, &uid);

    // Build the environment, retrying while a referenced Secret is missing, as the kubelet does.
    let mut waiting_reported = false;
    let env = loop {
        let Some(pod) = inner.get_object(PODS, &ns, &name) else {
            return;
        };
        match resolve_env(&inner, &pod, ip) {
            Ok(env) => break env,
            Err(ConfigError(message)) => {
                if !waiting_reported {
                    waiting_reported = true;
                    inner.update_pod(&ns, &name, &uid, |p| {
                        let state = json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}});
                        p["status"]["containerStatuses"] = container_status(p, false, state);
                    });
                }
                tokio::select! {
                    _ = sleep(Duration::from_millis(200)) => {}
                    cmd = cmds.recv() => match cmd {
                        Some(PodCommand::Terminate { .. }) => { inner.remove_pod_if(&ns, &name, &uid); return; }
                        Some(PodCommand::Fail { exit_code, reason }) => {
                            inner.update_pod(&ns, &name, &uid, |p| mark_terminated(p, exit_code, &reason, None));
                            after_exit(&inner, &ns, &name, &uid, &mut cmds).await;
                            return;
                        }
                        Some(PodCommand::Removed) | None => return,
                    }
                }
            }
        }
    };
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let launch = PodLaunch {
        namespace: ns.clone(),
        name: name.clone(),
        pod_ip: ip,
        pod: pod.clone(),
        image: container["image"].as_str().unwrap_or_default().to_owned(),
        command: strings(&container["command"], &vars),
        args: strings(&container["args"], &vars),
        env,
        volumes: empty_dirs(&pod, &container, &workdir),
        workdir,
        log_path,
    };
    let started = if fate == Fate::FailStart {
        Err("the fake API server was told to fail this pod's start".to_owned())
    } else {
        runner.start(&launch)
    };
    let workload = match started {
        Ok(w) => w,
        Err(message) => {
            inner.update_pod(&ns, &name, &uid, |p| {
                mark_terminated(p, 128, "StartError", Some(&message))
            });
            after_exit(&inner, &ns, &name, &uid, &mut cmds).await;
            return;
        }
    };
    let readiness = container
        .get("readinessProbe")
        .filter(|p| p.is_object())
        .cloned();
    let mut ready = readiness.is_none();
    inner.update_pod(&ns, &name, &uid, |p| mark_running(p, ready));

    let mut exited = workload.exited();
    let mut kill_at: Option<Instant> = None;
    let mut forced: Option<(i32, String)> = None;
    let mut hook: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let code = loop {
        tokio::select! {
            code = &mut exited => break code,
            cmd = cmds.recv() => match cmd {
                Some(PodCommand::Terminate { grace }) => {
                    if kill_at.is_none() {
                        kill_at = Some(Instant::now() + grace);
                        // The preStop hook runs first, within the grace; then SIGTERM.
                        hook = pre_stop(&container, ip, workload.as_ref());
                        if hook.is_none() {
                            workload.terminate();
                        }
                    }
                }
                Some(PodCommand::Fail { exit_code, reason }) => {
                    forced = Some((exit_code, reason));
                    workload.kill();
                }
                Some(PodCommand::Removed) | None => {
                    workload.kill();
                    return;
                }
            },
            _ = async { if let Some(h) = hook.as_mut() { h.await } }, if hook.is_some() => {
                hook = None;
                workload.terminate();
            }
            _ = sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                hook = None;
                workload.kill();
                kill_at = None;
            }
            ok = async {
                sleep(PROBE_PERIOD).await;
                probe(readiness.as_ref().unwrap_or(&Value::Null), &container, ip, Duration::from_secs(1)).await
            }, if !ready => {
                if ok {
                    ready = true;
                    inner.update_pod(&ns, &name, &uid, |p| mark_ready(p, true));
                }
            }
        }
    };
    let deleting = inner
        .get_object(PODS, &ns, &name)
        .is_some_and(|p| p["metadata"].get("deletionTimestamp").is_some());
    let (exit_code, reason) = forced.unwrap_or_else(|| {
        (
            code,
            if code == 0 {
                "Completed".to_owned()
            } else {
                "Error".to_owned()
            },
        )
    });
    inner.update_pod(&ns, &name, &uid, |p| {
        mark_terminated(p, exit_code, &reason, None)
    });
    if deleting {
        inner.remove_pod_if(&ns, &name, &uid);
        return;
    }
    after_exit(&inner, &ns, &name, &uid, &mut cmds).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_rewritten_to_local_directories() {
        let volumes = vec![(
            "/var/lib/otm/state/".to_owned(),
            PathBuf::from("/pods/p/volumes/state"),
        )];
        assert_eq!(
            rewrite_mounts("/var/lib/otm/state/a", &volumes),
            "/pods/p/volumes/state/a"
        );
        assert_eq!(
            rewrite_mounts("--state=/var/lib/otm/state", &volumes),
            "--state=/pods/p/volumes/state"
        );
        assert_eq!(
            rewrite_mounts("/var/lib/otm/statefile", &volumes),
            "/var/lib/otm/statefile"
        );
        assert_eq!(
            rewrite_mounts("tcp:127.0.0.2:7070", &volumes),
            "tcp:127.0.0.2:7070"
        );
    }

    #[test]
    fn programs_come_from_the_binary_map() {
        let runner = ProcessRunner::new().binary("otm", "/bin/otm-built");
        let launch = |image: &str, command: &[&str], args: &[&str]| PodLaunch {
            namespace: "ns".into(),
            name: "p".into(),
            pod_ip: Ipv4Addr::new(127, 0, 0, 2),
            pod: Value::Null,
            image: image.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            workdir: PathBuf::from("/w"),
            log_path: PathBuf::from("/w/log"),
            volumes: Vec::new(),
        };
        let otm = PathBuf::from("/bin/otm-built");
        assert_eq!(
            runner
                .resolve(&launch("x", &["/usr/local/bin/otm", "shim"], &["--a"]))
                .unwrap(),
            (otm.clone(), vec!["shim".into(), "--a".into()])
        );
        assert_eq!(
            runner
                .resolve(&launch("registry.example:5000/otm:1.2", &[], &["shim"]))
                .unwrap(),
            (otm, vec!["shim".into()])
        );
        assert_eq!(
            runner
                .resolve(&launch("x", &["sleep", "1"], &[]))
                .unwrap()
                .0,
            PathBuf::from("sleep")
        );
        assert!(runner.resolve(&launch("unknown:1", &[], &["a"])).is_err());
    }
}
