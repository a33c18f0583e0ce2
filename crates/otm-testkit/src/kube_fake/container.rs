//! [`ContainerRunner`]: runs a pod's first container as a real podman container of its image,
//! on the host's network so that it can listen on the pod's own loopback address.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::pods::{PodLaunch, PodRunner, Workload};
use crate::podman::Podman;

/// The label every container the runner starts carries (its value: the runner's id), so that
/// what a killed test left behind can be found: `podman ps -a --filter label=otm-testkit.kube-fake`.
pub const LABEL: &str = "otm-testkit.kube-fake";
/// The labels naming a container's pod and its namespace, as the kubelet's CRI runtimes set them
/// (`podman ps --filter label=io.kubernetes.pod.name=NAME`).
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// Runs a pod's first container as a podman container of the pod's image, as a kubelet would:
///
/// - `--network host`: the container shares the host's network, so the workload can listen on
///   the pod's loopback address (`status.podIP`, `127.P.x.y`) and reach what the test serves on
///   `127.0.0.1`;
/// - the image through the map given with [`ContainerRunner::image`] (a pod's `otm-test:dev` →
///   the locally built `localhost/otm:<tag>`), else as written; never pulled (`--pull never`);
/// - `command` as the entrypoint and `args` as its arguments (the image's own when empty),
///   `workingDir` as `--workdir`;
/// - from the container's `securityContext` (else the pod's): `runAsUser`/`runAsGroup` as
///   `--user`, `readOnlyRootFilesystem` as `--read-only`, `capabilities` as `--cap-drop` and
///   `--cap-add`, and `--security-opt no-new-privileges` unless `allowPrivilegeEscalation` is
///   true;
/// - every `emptyDir` volume mount as a tmpfs of the volume's `sizeLimit` (mode 1777, owned by
///   the container's user); other kinds of volume are not mounted;
/// - `resources.limits` as `--memory` and `--cpus` unless turned off with
///   [`ContainerRunner::resource_limits`];
/// - `shareProcessNamespace` as `--init` (a process 1 that reaps orphans, as the pause process
///   does);
/// - the resolved environment: plain `value`s and `fieldRef`s in podman's arguments, anything
///   that may carry a Secret's value by name only (`--env NAME`, the value in podman's own
///   environment), so no secret is in a process's command line.
///
/// The container's output is the pod's log. Stopping: `podman kill --signal TERM`, then
/// `KILL` (the fake sends it after the grace period); the container's exit code is the pod's
/// terminated state. Containers are removed (`podman rm -f`) when they exit, and any left
/// when the runner and its workloads are dropped.
#[derive(Clone)]
pub struct ContainerRunner {
    podman: Podman,
    images: HashMap<String, String>,
    resource_limits: bool,
    live: Arc<Live>,
}

impl fmt::Debug for ContainerRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerRunner")
            .field("images", &self.images)
            .field("resource_limits", &self.resource_limits)
            .finish_non_exhaustive()
    }
}

impl ContainerRunner {
    pub fn new(podman: Podman) -> Self {
        let mut id = [0u8; 4];
        let _ = getrandom::fill(&mut id);
        ContainerRunner {
            live: Arc::new(Live {
                podman: podman.clone(),
                id: id.iter().map(|b| format!("{b:02x}")).collect(),
                names: Mutex::default(),
            }),
            podman,
            images: HashMap::new(),
            resource_limits: true,
        }
    }

    /// Runs pods whose image is `pod_image` (as written in the pod) with the local image
    /// `local` instead.
    pub fn image(mut self, pod_image: impl Into<String>, local: impl Into<String>) -> Self {
        self.images.insert(pod_image.into(), local.into());
        self
    }

    /// Whether `resources.limits` become `--memory` and `--cpus` (default: yes). Hosts where
    /// podman cannot set cgroup limits need this off.
    pub fn resource_limits(mut self, on: bool) -> Self {
        self.resource_limits = on;
        self
    }

    /// The `podman run` arguments for a launch (after `run`), and the variables to pass to
    /// podman's own environment.
    pub fn run_args(
        &self,
        launch: &PodLaunch,
        container_name: &str,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let pod = &launch.pod;
        let container = pod
            .pointer("/spec/containers/0")
            .cloned()
            .unwrap_or_default();
        let mut args: Vec<String> = vec![
            "--name".into(),
            container_name.into(),
            "--label".into(),
            format!("{LABEL}={}", self.live.id),
            "--label".into(),
            format!("{POD_NAME_LABEL}={}", launch.name),
            "--label".into(),
            format!("{POD_NAMESPACE_LABEL}={}", launch.namespace),
            "--pull".into(),
            "never".into(),
            "--network".into(),
            "host".into(),
            "--hostname".into(),
            launch.name.clone(),
        ];
        let security = |key: &str| -> Option<&Value> {
            container
                .pointer(&format!("/securityContext/{key}"))
                .filter(|v| !v.is_null())
                .or_else(|| {
                    pod.pointer(&format!("/spec/securityContext/{key}"))
                        .filter(|v| !v.is_null())
                })
        };
        let user = security("runAsUser").and_then(Value::as_i64);
        let group = security("runAsGroup").and_then(Value::as_i64);
        match (user, group) {
            (Some(u), Some(g)) => args.extend(["--user".into(), format!("{u}:{g}")]),
            (Some(u), None) => args.extend(["--user".into(), u.to_string()]),
            (None, _) => {}
        }
        if container
            .pointer("/securityContext/readOnlyRootFilesystem")
            .and_then(Value::as_bool)
            == Some(true)
        {
            args.push("--read-only".into());
        }
        let caps = |kind: &str| -> Vec<String> {
            container
                .pointer(&format!("/securityContext/capabilities/{kind}"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        for cap in caps("drop") {
            args.extend(["--cap-drop".into(), cap]);
        }
        for cap in caps("add") {
            args.extend(["--cap-add".into(), cap]);
        }
        if container
            .pointer("/securityContext/allowPrivilegeEscalation")
            .and_then(Value::as_bool)
            != Some(true)
        {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        if pod["spec"]["shareProcessNamespace"] == true {
            args.push("--init".into());
        }
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let (Some(name), Some(path)) = (mount["name"].as_str(), mount["mountPath"].as_str())
            else {
                continue;
            };
            let Some(empty_dir) = volumes
                .iter()
                .find(|v| v["name"] == name)
                .and_then(|v| v.get("emptyDir"))
            else {
                continue;
            };
            let mut options = vec!["rw".to_owned()];
            if let Some(size) = empty_dir["sizeLimit"].as_str().and_then(parse_bytes) {
                options.push(format!("size={size}"));
            }
            options.extend(["mode=1777".to_owned(), "U".to_owned()]);
            args.extend(["--tmpfs".into(), format!("{path}:{}", options.join(","))]);
        }
        if let Some(dir) = container["workingDir"].as_str() {
            args.extend(["--workdir".into(), dir.to_owned()]);
        }
        if self.resource_limits {
            let limits = &container["resources"]["limits"];
            if let Some(mem) = limits["memory"].as_str().and_then(parse_bytes) {
                args.extend(["--memory".into(), mem.to_string()]);
            }
            if let Some(cpus) = limits["cpu"].as_str().and_then(parse_cpu) {
                args.extend(["--cpus".into(), format!("{cpus}")]);
            }
        }
        let plain = plain_env_names(&container);
        let mut by_name = Vec::new();
        for (key, value) in &launch.env {
            if plain.contains(key.as_str()) {
                args.extend(["--env".into(), format!("{key}={value}")]);
            } else {
                args.extend(["--env".into(), key.clone()]);
                by_name.push((key.clone(), value.clone()));
            }
        }
        if let Some((first, rest)) = launch.command.split_first() {
            args.extend(["--entrypoint".into(), first.clone()]);
            args.push(self.local_image(&launch.image));
            args.extend(rest.iter().cloned());
        } else {
            args.push(self.local_image(&launch.image));
        }
        args.extend(launch.args.iter().cloned());
        (args, by_name)
    }

    fn local_image(&self, image: &str) -> String {
        self.images
            .get(image)
            .cloned()
            .unwrap_or_else(|| image.to_owned())
    }
}

/// The variables of a container whose values cannot hold a Secret's: a literal `value` with no
/// `$(...)` reference, or a `fieldRef`.
fn plain_env_names(container: &Value) -> BTreeSet<&str> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["value"].as_str().is_some_and(|v| !v.contains("$("))
                || e.pointer("/valueFrom/fieldRef").is_some()
        })
        .filter_map(|e| e["name"].as_str())
        .collect()
}

/// A Kubernetes quantity of bytes (`1073741824`, `64Mi`, `1G`), rounded down.
fn parse_bytes(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((q, 1));
    let n: f64 = number.parse().ok()?;
    (n >= 0.0).then_some((n * factor as f64) as u64)
}

/// A Kubernetes CPU quantity (`500m`, `1`, `2.5`) in CPUs.
fn parse_cpu(q: &str) -> Option<f64> {
    match q.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().ok().map(|m| m / 1000.0),
        None => q.parse().ok(),
    }
    .filter(|c| *c > 0.0)
}

impl PodRunner for ContainerRunner {
    fn start(&self, launch: &PodLaunch) -> Result<Box<dyn Workload>, String> {
        let uid = launch.pod["metadata"]["uid"].as_str().unwrap_or_default();
        let name = format!(
            "otm-fake-{}-{}-{}",
            launch.namespace,
            launch.name,
            &uid[..8.min(uid.len())]
        );
        let (args, by_name) = self.run_args(launch, &name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log_path)
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open the pod log: {e}"))?;
        let mut cmd = self.podman.tokio_command();
        cmd.arg("run")
            .args(&args)
            .envs(by_name)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run podman (is it installed?): {e}"))?;
        self.live.insert(&name);

        let (signals, mut signal_rx) = mpsc::unbounded_channel::<&'static str>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let live = self.live.clone();
        let container = name.clone();
        tokio::spawn(async move {
            // `podman run` in the foreground ends with the container's exit code (128 + the
            // signal when a signal ended it); 125 and up are podman's own failures.
            let code = loop {
                tokio::select! {
                    status = child.wait() => {
                        break status.ok().and_then(|s| s.code()).unwrap_or(137);
                    }
                    Some(signal) = signal_rx.recv() => {
                        signal_container(&live.podman, &container, signal, &mut child).await;
                    }
                }
            };
            // Removed before the exit is told: as a kubelet's, a pod that is gone from the API
            // has no container left.
            live.remove(&container).await;
            let _ = exit_tx.send(Some(code));
        });
        Ok(Box::new(ContainerWorkload {
            signals,
            exit: exit_rx,
            _live: self.live.clone(),
        }))
    }
}

/// `podman kill --signal SIGNAL`, retried while the container is still being created (a
/// signal can come before `podman run` has made it).
async fn signal_container(
    podman: &Podman,
    container: &str,
    signal: &str,
    child: &mut tokio::process::Child,
) {
    for _ in 0..100 {
        let killed = podman
            .tokio_command()
            .args(["kill", "--signal", signal, container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if killed || !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The containers a runner has started and not yet removed.
struct Live {
    podman: Podman,
    id: String,
    names: Mutex<BTreeSet<String>>,
}

impl Live {
    fn insert(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
    }

    async fn remove(&self, name: &str) {
        let _ = self
            .podman
            .tokio_command()
            .args(["rm", "-f", "-t", "0", "--ignore", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

impl Drop for Live {
    /// Removes what is left, e.g. when a test ends with its pods still running.
    fn drop(&mut self) {
        let names = std::mem::take(self.names.get_mut().unwrap_or_else(|e| e.into_inner()));
        if names.is_empty() {
            return;
        }
        let _ = self
            .podman
            .command()
            .args(["rm", "-f", "-t", "0", "--ignore"])
            .args(&names)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A pod's container started by [`ContainerRunner`]; dropping it kills the container.
struct ContainerWorkload {
    signals: mpsc::UnboundedSender<&'static str>,
    exit: watch::Receiver<Option<i32>>,
    _live: Arc<Live>,
}

impl fmt::Debug for ContainerWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerWorkload")
            .field("exit", &*self.exit.borrow())
            .finish_non_exhaustive()
    }
}

impl Workload for ContainerWorkload {
    fn terminate(&self) {
        let _ = self.signals.send("TERM");
    }

    fn kill(&self) {
        let _ = self.signals.send("KILL");
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
}

impl Drop for ContainerWorkload {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("1073741824"), Some(1 << 30));
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_cpu("500m"), Some(0.5));
        assert_eq!(parse_cpu("2"), Some(2.0));
        assert_eq!(parse_cpu("0"), None);
    }

    #[test]
    fn a_pod_becomes_podman_run_arguments_and_secrets_stay_out_of_them() {
        let pod = json!({
            "metadata": {"name": "p", "uid": "0123456789"},
            "spec": {
                "shareProcessNamespace": true,
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                "containers": [{
                    "image": "otm-test:dev",
                    "workingDir": "/var/lib/otm",
                    "env": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "TMPDIR", "value": "/tmp"},
                    ],
                    "securityContext": {
                        "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"limits": {"cpu": "1000m", "memory": "2Gi"}},
                    "volumeMounts": [
                        {"name": "instance", "mountPath": "/var/lib/otm/instance"},
                        {"name": "conf", "mountPath": "/etc/conf"},
                    ],
                }],
                "volumes": [
                    {"name": "instance", "emptyDir": {"sizeLimit": "64Mi"}},
                    {"name": "conf", "configMap": {"name": "c"}},
                ],
            },
        });
        let launch = PodLaunch {
            namespace: "ns".into(),
            name: "p".into(),
            pod_ip: "127.1.0.2".parse().unwrap(),
            pod,
            image: "otm-test:dev".into(),
            command: vec![],
            args: vec![
                "shim".into(),
                "--listen".into(),
                "tcp:127.1.0.2:7070".into(),
            ],
            env: vec![
                ("TOKEN".into(), "very-secret".into()),
                ("POD_IP".into(), "127.1.0.2".into()),
                ("TMPDIR".into(), "/tmp".into()),
            ],
            workdir: "/nonexistent".into(),
            log_path: "/nonexistent/log".into(),
            volumes: vec![],
        };
        let runner =
            ContainerRunner::new(Podman::new().unwrap()).image("otm-test:dev", "localhost/otm:t");
        let (args, by_name) = runner.run_args(&launch, "c");
        let line = args.join(" ");
        assert!(!line.contains("very-secret"), "{line}");
        assert_eq!(
            by_name,
            vec![("TOKEN".to_owned(), "very-secret".to_owned())]
        );
        for expected in [
            "--network host",
            "--user 65532:65532",
            "--read-only",
            "--cap-drop ALL",
            "--security-opt no-new-privileges",
            "--init",
            "--tmpfs /var/lib/otm/instance:rw,size=67108864,mode=1777,U",
            "--workdir /var/lib/otm",
            "--memory 2147483648",
            "--cpus 1",
            "--env TOKEN --env POD_IP=127.1.0.2 --env TMPDIR=/tmp",
            "localhost/otm:t shim --listen tcp:127.1.0.2:7070",
        ] {
            assert!(line.contains(expected), "{expected:?} in {line}");
        }
        assert!(
            !line.contains("/etc/conf"),
            "only emptyDirs are mounted: {line}"
        );
        assert!(line.ends_with("tcp:127.1.0.2:7070"));
    }
}
