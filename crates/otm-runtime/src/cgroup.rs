//! Per-instance control groups: limits, limit events, freezing and killing a whole instance.
//!
//! Every instance gets `otm/<instance-id>` under each controller otm uses. On a cgroup v2 host
//! that is one directory in the unified hierarchy (`memory.max`, `pids.max`, `cpu.max`,
//! `cgroup.kill`); on a v1 or hybrid host one directory under each of the `memory`, `pids`, `cpu`
//! and `freezer` hierarchies. The instance's first process (`otm sandbox-exec`) writes itself into
//! the `cgroup.procs` files before it starts anything, so everything the instance ever runs is
//! inside, and the runtime controls it through the cgroup, never through a pid read from a file.

use otm_core::{InstanceId, ResourceLimits};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers otm uses, as mounted on this host.
#[derive(Clone, Debug)]
pub enum Layout {
    /// The unified hierarchy at this path, with otm's parent directory below it.
    V2 { root: PathBuf },
    /// v1 hierarchies (some may be missing).
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        freezer: Option<PathBuf>,
    },
}

impl Layout {
    /// Finds the controllers from `/proc/self/mountinfo`. `None` when neither a usable v2
    /// hierarchy (with memory and pids) nor v1 memory, pids and freezer hierarchies are mounted.
    pub fn detect() -> Option<Layout> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mut v2 = None;
        let (mut memory, mut pids, mut cpu, mut freezer) = (None, None, None, None);
        for line in info.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).map(PathBuf::from);
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or("");
            let options = r.nth(1).unwrap_or("");
            match (fstype, mount_point) {
                ("cgroup2", Some(p)) => {
                    let controllers =
                        std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
                    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                    if has("memory") && has("pids") && v2.is_none() {
                        v2 = Some(p);
                    }
                }
                ("cgroup", Some(p)) => {
                    let has = |c: &str| options.split(',').any(|x| x == c);
                    if has("memory") {
                        memory = Some(p.clone());
                    }
                    if has("pids") {
                        pids = Some(p.clone());
                    }
                    if has("cpu") {
                        cpu = Some(p.clone());
                    }
                    if has("freezer") {
                        freezer = Some(p);
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = v2 {
            return Some(Layout::V2 { root });
        }
        (memory.is_some() && pids.is_some() && freezer.is_some()).then_some(Layout::V1 {
            memory,
            pids,
            cpu,
            freezer,
        })
    }

    /// `v2` or `v1`, for status pages.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "cgroup v2",
            Layout::V1 { .. } => "cgroup v1",
        }
    }

    /// The cgroup of one instance (not created yet).
    pub fn instance(&self, id: &InstanceId) -> InstanceCgroup {
        let rel = Path::new("otm").join(id.as_str());
        match self {
            Layout::V2 { root } => InstanceCgroup {
                v2: Some(root.join(&rel)),
                ..Default::default()
            },
            Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
            } => InstanceCgroup {
                v2: None,
                memory: memory.as_ref().map(|p| p.join(&rel)),
                pids: pids.as_ref().map(|p| p.join(&rel)),
                cpu: cpu.as_ref().map(|p| p.join(&rel)),
                freezer: freezer.as_ref().map(|p| p.join(&rel)),
            },
        }
    }

    /// Creates otm's parent directories (and on v2 enables the controllers below them).
    pub fn prepare(&self) -> std::io::Result<()> {
        match self {
            Layout::V2 { root } => {
                let parent = root.join("otm");
                std::fs::create_dir_all(&parent)?;
                for dir in [root.as_path(), parent.as_path()] {
                    // Enabling may fail for controllers the parent does not delegate; memory and
                    // pids are required, cpu is best effort.
                    for c in ["+memory", "+pids", "+cpu"] {
                        let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
                    }
                }
                let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control"))?;
                if !(enabled.contains("memory") && enabled.contains("pids")) {
                    return Err(std::io::Error::other(format!(
                        "cannot enable the memory and pids controllers in {}",
                        parent.display()
                    )));
                }
                Ok(())
            }
            Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
            } => {
                for p in [memory, pids, cpu, freezer].into_iter().flatten() {
                    std::fs::create_dir_all(p.join("otm"))?;
                }
                Ok(())
            }
        }
    }
}

/// A limit an instance ran into.
pub use otm_core::LimitKind;

/// The cgroup directories of one instance.
#[derive(Clone, Debug, Default)]
pub struct InstanceCgroup {
    v2: Option<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    freezer: Option<PathBuf>,
}

impl InstanceCgroup {
    fn dirs(&self) -> Vec<&PathBuf> {
        [&self.v2, &self.memory, &self.pids, &self.cpu, &self.freezer]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Creates the directories and sets the limits.
    pub fn create(&self, limits: &ResourceLimits) -> std::io::Result<()> {
        for d in self.dirs() {
            std::fs::create_dir_all(d)?;
        }
        self.set_limits(limits)
    }

    /// Sets (or changes) the limits of a running instance.
    pub fn set_limits(&self, l: &ResourceLimits) -> std::io::Result<()> {
        let w = |dir: &Path, file: &str, value: String| -> std::io::Result<()> {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot set {} to {value}: {e}", dir.join(file).display()),
                )
            })
        };
        const PERIOD_US: u64 = 100_000;
        let quota = (l.cpu_millis as u64 * PERIOD_US / 1000).max(1000);
        if let Some(d) = &self.v2 {
            w(d, "memory.max", l.memory_bytes.to_string())?;
            let _ = w(d, "memory.swap.max", "0".into());
            w(d, "pids.max", l.pids.to_string())?;
            if d.join("cpu.max").exists() {
                w(d, "cpu.max", format!("{quota} {PERIOD_US}"))?;
                let weight = (l.cpu_request_millis as u64 * 100 / 1000).clamp(1, 10_000);
                let _ = w(d, "cpu.weight", weight.to_string());
            }
            return Ok(());
        }
        if let Some(d) = &self.memory {
            w(d, "memory.limit_in_bytes", l.memory_bytes.to_string())?;
            if d.join("memory.memsw.limit_in_bytes").exists() {
                let _ = w(d, "memory.memsw.limit_in_bytes", l.memory_bytes.to_string());
            }
        }
        if let Some(d) = &self.pids {
            w(d, "pids.max", l.pids.to_string())?;
        }
        if let Some(d) = &self.cpu {
            w(d, "cpu.cfs_period_us", PERIOD_US.to_string())?;
            w(d, "cpu.cfs_quota_us", quota.to_string())?;
            let shares = (l.cpu_request_millis as u64 * 1024 / 1000).max(2);
            let _ = w(d, "cpu.shares", shares.to_string());
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new process must write itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// True when the directories exist.
    pub fn exists(&self) -> bool {
        self.dirs().first().is_some_and(|d| d.is_dir())
    }

    /// The host pids of every process in the instance.
    pub fn procs(&self) -> Vec<i32> {
        let dir = self
            .v2
            .as_ref()
            .or(self.freezer.as_ref())
            .or(self.pids.as_ref());
        let Some(dir) = dir else { return vec![] };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// True while any process of the instance lives.
    pub fn populated(&self) -> bool {
        if let Some(d) = &self.v2 {
            return std::fs::read_to_string(d.join("cgroup.events"))
                .map(|e| e.lines().any(|l| l.trim() == "populated 1"))
                .unwrap_or(false);
        }
        !self.procs().is_empty()
    }

    /// The limit the instance ran into since it started, if any: the kernel's own counters of
    /// OOM kills and refused forks.
    pub fn limit_hit(&self) -> Option<LimitKind> {
        let counter = |dir: &Option<PathBuf>, file: &str, key: &str| -> u64 {
            dir.as_ref()
                .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
                .and_then(|text| {
                    text.lines().find_map(|l| {
                        l.strip_prefix(key)
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                })
                .unwrap_or(0)
        };
        let (oom, forks) = match &self.v2 {
            Some(_) => (
                counter(&self.v2, "memory.events", "oom_kill "),
                counter(&self.v2, "pids.events", "max "),
            ),
            None => (
                counter(&self.memory, "memory.oom_control", "oom_kill "),
                counter(&self.pids, "pids.events", "max "),
            ),
        };
        if oom > 0 {
            Some(LimitKind::Memory)
        } else if forks > 0 {
            Some(LimitKind::Pids)
        } else {
            None
        }
    }

    /// Kills every process of the instance and waits until none is left (up to `timeout`).
    /// v2: `cgroup.kill`. v1: freeze, SIGKILL every member (none can fork meanwhile), thaw.
    pub fn kill(&self, timeout: Duration) -> std::io::Result<()> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let deadline = Instant::now() + timeout;
        if let Some(d) = &self.v2 {
            if d.join("cgroup.kill").exists() {
                std::fs::write(d.join("cgroup.kill"), "1")?;
            } else {
                let _ = std::fs::write(d.join("cgroup.freeze"), "1");
                for p in self.procs() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                let _ = std::fs::write(d.join("cgroup.freeze"), "0");
            }
        } else {
            let freezer = self.freezer.as_ref();
            if let Some(f) = freezer {
                let _ = std::fs::write(f.join("freezer.state"), "FROZEN");
                while Instant::now() < deadline {
                    let state =
                        std::fs::read_to_string(f.join("freezer.state")).unwrap_or_default();
                    if state.trim() != "FREEZING" {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            for _ in 0..3 {
                for p in self.procs() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            if let Some(f) = freezer {
                let _ = std::fs::write(f.join("freezer.state"), "THAWED");
            }
        }
        while self.populated() {
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "processes still in the cgroup after {} s",
                    timeout.as_secs()
                )));
            }
            for p in self.procs() {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Removes the (empty) directories.
    pub fn remove(&self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
