//! The agent's own cgroup, which the shim freezes: where the instance has one, every agent
//! process is started inside it, and freezing it stops the whole agent at once without a signal
//! any of its processes could see or miss.
//!
//! The runtime makes the directory (`otm/<instance-id>/agent`, below the instance's cgroup),
//! gives the instance's uid the files the shim writes, and shows the shim only that directory
//! (the agent never sees it). On cgroup v1 it is a directory of the freezer hierarchy
//! (`freezer.state`); on v2 one of the unified hierarchy (`cgroup.freeze`, `cgroup.events`).
//! It enables no controller, so the instance's own limits still count the agent, and on v2 the
//! instance's cgroup, which holds the shim, may keep processes of its own beside it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a freeze may take before it is given up (a process in uninterruptible sleep, on a
/// v1 freezer, can keep it `FREEZING`).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's cgroup directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCgroup {
    dir: PathBuf,
    v2: bool,
}

impl AgentCgroup {
    /// The cgroup at `dir`, which must be a cgroup v1 freezer directory (`freezer.state`) or a
    /// cgroup v2 one (`cgroup.freeze`).
    pub fn open(dir: &Path) -> std::io::Result<AgentCgroup> {
        let v2 = if dir.join("cgroup.freeze").exists() {
            true
        } else if dir.join("freezer.state").exists() {
            false
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} is not a cgroup with a freezer (no freezer.state or cgroup.freeze)",
                    dir.display()
                ),
            ));
        };
        Ok(AgentCgroup {
            dir: dir.to_path_buf(),
            v2,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for writing (close-on-exec). Handed to the agent sandbox's
    /// process 1, which writes `0` to it (itself) before it starts anything and closes it: every
    /// agent process is then inside.
    pub fn procs_for_writing(&self) -> std::io::Result<File> {
        let path = self.dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })
    }

    /// Freezes every process in the cgroup and waits until the kernel reports them frozen; on
    /// timeout thaws them again and fails.
    pub fn freeze(&self, timeout: Duration) -> std::io::Result<()> {
        let (file, value) = self.control();
        std::fs::write(self.dir.join(file), value.0)?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_frozen()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.thaw();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the agent's processes were not frozen within {} ms",
                        timeout.as_millis()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Thaws the cgroup.
    pub fn thaw(&self) -> std::io::Result<()> {
        let (file, value) = self.control();
        std::fs::write(self.dir.join(file), value.1)
    }

    /// True when every process of the cgroup is frozen (and freezing was asked for).
    pub fn is_frozen(&self) -> std::io::Result<bool> {
        if self.v2 {
            let events = std::fs::read_to_string(self.dir.join("cgroup.events"))?;
            Ok(events.lines().any(|l| l.trim() == "frozen 1"))
        } else {
            let state = std::fs::read_to_string(self.dir.join("freezer.state"))?;
            Ok(state.trim() == "FROZEN")
        }
    }

    /// The pids (as the reader sees them) of the processes in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The file that freezes the cgroup, and what to write to it to freeze and to thaw.
    fn control(&self) -> (&'static str, (&'static str, &'static str)) {
        if self.v2 {
            ("cgroup.freeze", ("1", "0"))
        } else {
            ("freezer.state", ("FROZEN", "THAWED"))
        }
    }
}
