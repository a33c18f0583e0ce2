//! Running podman the way containers run on hosts like the CI machines: runc where the host has
//! it (crun refuses cgroup v1 and hybrid layouts), and a `containers.conf` that keeps the
//! process limits podman runs with (its default of 1048576 open files fails where the hard limit
//! is lower and cannot be raised). Used by the image tests and by
//! [`ContainerRunner`](crate::kube_fake::ContainerRunner).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// Where Debian installs runc.
pub const RUNC: &str = "/usr/sbin/runc";

/// How to run podman. Cheap to clone; the `containers.conf` it wrote (if any) lives as long as
/// the last clone.
#[derive(Clone, Debug)]
pub struct Podman {
    runtime: Option<PathBuf>,
    conf: Option<PathBuf>,
    _dir: Option<Arc<tempfile::TempDir>>,
}

impl Podman {
    /// runc if [`RUNC`] exists, and, unless `CONTAINERS_CONF` is set, a `containers.conf` with
    /// `default_ulimits = []` in a temporary directory of its own.
    pub fn new() -> std::io::Result<Podman> {
        let runtime = Path::new(RUNC).exists().then(|| PathBuf::from(RUNC));
        if std::env::var_os("CONTAINERS_CONF").is_some() {
            return Ok(Podman {
                runtime,
                conf: None,
                _dir: None,
            });
        }
        let dir = tempfile::Builder::new().prefix("otm-podman-").tempdir()?;
        let conf = dir.path().join("containers.conf");
        std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n")?;
        Ok(Podman {
            runtime,
            conf: Some(conf),
            _dir: Some(Arc::new(dir)),
        })
    }

    /// Whether `podman` can be run at all.
    pub fn available() -> bool {
        Command::new("podman")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The `containers.conf` this wrote, for other tools that run podman (`scripts/build-images`
    /// takes it as `CONTAINERS_CONF`).
    pub fn conf(&self) -> Option<&Path> {
        self.conf.as_deref()
    }

    /// A `podman` command with the runtime and configuration set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.configure(&mut cmd);
        cmd
    }

    /// The same as a Tokio command.
    pub fn tokio_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("podman");
        self.configure(cmd.as_std_mut());
        cmd
    }

    fn configure(&self, cmd: &mut Command) {
        if let Some(runtime) = &self.runtime {
            cmd.arg("--runtime").arg(runtime);
        }
        if let Some(conf) = &self.conf {
            cmd.env("CONTAINERS_CONF", conf);
        }
    }

    /// Runs podman with `args`; panics with its output unless it succeeds, else returns its
    /// standard output, trimmed.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("podman runs");
        check(&format!("podman {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Whether a container of that name exists.
    pub fn exists(&self, container: &str) -> bool {
        self.command()
            .args(["container", "exists", container])
            .status()
            .expect("podman runs")
            .success()
    }
}

/// Panics with a command's output unless it succeeded.
pub fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "`{what}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
