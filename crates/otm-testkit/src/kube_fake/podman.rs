//! [`PodmanRunner`]: runs the fake's pods as containers of local images with podman, the more
//! faithful alternative to [`ProcessRunner`](super::ProcessRunner).

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;

use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::pods::{PodLaunch, PodRunner, Workload};
use super::store::meta_str;

/// Runs a pod's first container with `podman run` on the host network, so it can listen on
/// its pod IP (a loopback address) like a process can.
///
/// The container gets the pod's resolved environment (through an `--env-file` readable only by
/// its owner, so values do not show in process listings), `command` as its entrypoint and
/// `args` as its command, the `emptyDir` mounts as bind mounts of fresh local directories,
/// `--read-only` for `readOnlyRootFilesystem`, `--user` for `runAsUser`. SIGTERM goes to the
/// container's main process (podman's signal proxy), SIGKILL through `podman kill`; the exit
/// code is the container's. Images are local (`podman import` of a root filesystem needs no
/// registry); [`PodmanRunner::image`] maps a pod's image name to a local one.
#[derive(Clone, Debug)]
pub struct PodmanRunner {
    podman: PathBuf,
    runtime: Option<PathBuf>,
    containers_conf: Option<PathBuf>,
    images: HashMap<String, String>,
    extra_args: Vec<String>,
}

impl Default for PodmanRunner {
    fn default() -> Self {
        PodmanRunner {
            podman: PathBuf::from("podman"),
            runtime: None,
            containers_conf: None,
            images: HashMap::new(),
            extra_args: Vec::new(),
        }
    }
}

impl PodmanRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The podman binary (default `podman` from `PATH`).
    pub fn podman(mut self, path: impl Into<PathBuf>) -> Self {
        self.podman = path.into();
        self
    }

    /// The OCI runtime podman uses (`--runtime`, e.g. `/usr/sbin/runc`).
    pub fn runtime(mut self, path: impl Into<PathBuf>) -> Self {
        self.runtime = Some(path.into());
        self
    }

    /// A `containers.conf` for podman (`CONTAINERS_CONF`).
    pub fn containers_conf(mut self, path: impl Into<PathBuf>) -> Self {
        self.containers_conf = Some(path.into());
        self
    }

    /// Runs pods whose image is `pod_image` with the local image `local` instead.
    pub fn image(mut self, pod_image: impl Into<String>, local: impl Into<String>) -> Self {
        self.images.insert(pod_image.into(), local.into());
        self
    }

    /// Adds an argument to every `podman run` (before the image).
    pub fn run_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// A podman command with the runner's global options.
    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.podman);
        if let Some(conf) = &self.containers_conf {
            cmd.env("CONTAINERS_CONF", conf);
        }
        if let Some(runtime) = &self.runtime {
            cmd.arg("--runtime").arg(runtime);
        }
        cmd
    }

    /// Whether podman runs `command` in a container of `image` here; the error says why not.
    pub async fn check(&self, image: &str, command: &[&str]) -> Result<(), String> {
        let out = self
            .command()
            .args(["run", "--rm", "--network", "none", image])
            .args(command)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.podman.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    fn run_args(&self, launch: &PodLaunch, name: &str, env_file: &std::path::Path) -> Vec<String> {
        let container = launch
            .pod
            .pointer("/spec/containers/0")
            .cloned()
            .unwrap_or(Value::Null);
        let sc = |field: &str| {
            container
                .pointer(&format!("/securityContext/{field}"))
                .or_else(|| {
                    launch
                        .pod
                        .pointer(&format!("/spec/securityContext/{field}"))
                })
                .cloned()
        };
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--name".into(),
            name.into(),
            "--network".into(),
            "host".into(),
            "--hostname".into(),
            launch.name.clone(),
            "--env-file".into(),
            env_file.display().to_string(),
        ];
        if sc("readOnlyRootFilesystem").and_then(|v| v.as_bool()) == Some(true) {
            args.push("--read-only".into());
        }
        if let Some(uid) = sc("runAsUser").and_then(|v| v.as_u64()) {
            let gid = sc("runAsGroup").and_then(|v| v.as_u64()).unwrap_or(uid);
            args.push("--user".into());
            args.push(format!("{uid}:{gid}"));
        }
        for (mount, dir) in &launch.volumes {
            args.push("--volume".into());
            args.push(format!("{}:{mount}", dir.display()));
        }
        args.extend(self.extra_args.iter().cloned());
        if !launch.command.is_empty() {
            args.push("--entrypoint".into());
            args.push(serde_json::to_string(&launch.command).unwrap_or_default());
        }
        let image = self
            .images
            .get(&launch.image)
            .cloned()
            .unwrap_or_else(|| launch.image.clone());
        args.push(image);
        args.extend(launch.args.iter().cloned());
        args
    }
}

impl PodRunner for PodmanRunner {
    fn start(&self, launch: &PodLaunch) -> Result<Box<dyn Workload>, String> {
        let uid = meta_str(&launch.pod, "uid");
        let name = format!(
            "otm-fake-{}-{}-{}",
            launch.namespace,
            launch.name,
            &uid[..8.min(uid.len())]
        );
        let env_file = launch.workdir.with_file_name("podman.env");
        let mut file = {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(&env_file)
                .map_err(|e| format!("cannot write the container's env file: {e}"))?
        };
        for (k, v) in &launch.env {
            if v.contains('\n') {
                return Err(format!(
                    "env {k} has a newline, which podman's --env-file cannot carry"
                ));
            }
            writeln!(file, "{k}={v}")
                .map_err(|e| format!("cannot write the container's env file: {e}"))?;
        }
        drop(file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log_path)
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let mut run = self.command();
        run.args(self.run_args(launch, &name, &env_file))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let mut child = run
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.podman.display()))?;
        let client = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw);
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<nix::sys::signal::Signal>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let runner = self.clone();
        let container = name.clone();
        tokio::spawn(async move {
            use nix::sys::signal::Signal;
            let code = loop {
                tokio::select! {
                    status = child.wait() => break status.ok().and_then(|s| s.code()).unwrap_or(137),
                    Some(sig) = signal_rx.recv() => {
                        if sig == Signal::SIGKILL {
                            let _ = runner.command().args(["kill", "--signal", "KILL", &container]).output().await;
                        } else if let Some(pid) = client {
                            // podman's signal proxy passes it on to the container.
                            let _ = nix::sys::signal::kill(pid, sig);
                        }
                    }
                }
            };
            let _ = runner
                .command()
                .args(["rm", "--force", "--ignore", &container])
                .output()
                .await;
            let _ = exit_tx.send(Some(code));
        });
        Ok(Box::new(PodmanWorkload {
            signals,
            exit: exit_rx,
            runner: self.clone(),
            container: name,
        }))
    }
}

/// A container started by [`PodmanRunner`]; dropping it kills the container.
#[derive(Debug)]
struct PodmanWorkload {
    signals: mpsc::UnboundedSender<nix::sys::signal::Signal>,
    exit: watch::Receiver<Option<i32>>,
    runner: PodmanRunner,
    container: String,
}

impl Workload for PodmanWorkload {
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
        let mut cmd = self.runner.command();
        cmd.arg("exec")
            .arg(&self.container)
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        Box::pin(async move {
            let status = cmd
                .status()
                .await
                .map_err(|e| format!("cannot run podman exec: {e}"))?;
            Ok(status.code().unwrap_or(137))
        })
    }
}

impl Drop for PodmanWorkload {
    fn drop(&mut self) {
        self.kill();
    }
}
