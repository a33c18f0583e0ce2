//! Per-instance control groups: limits, limit events, freezing and killing a whole instance.
//!
//! Every instance gets `otm/<instance-id>` under each controller otm uses. On a cgroup v2 host
//! that is one directory in the unified hierarchy (`memory.max`, `pids.max`, `cpu.max`,
//! `cgroup.kill`); on a v1 or hybrid host one directory under each of the `memory`, `pids`, `cpu`
//! and `freezer` hierarchies. The instance's first process (`otm sandbox-exec`) writes itself into
//! the `cgroup.procs` files before it starts anything, so everything the instance ever runs is
//! inside, and the runtime controls it through the cgroup, never through a pid read from a file.
//!
//! Below it, `otm/<instance-id>/agent` (in the freezer hierarchy on v1) holds the agent alone,
//! so that the shim can freeze the agent without freezing itself ([`otm_shim::freezer`]). It
//! enables no controller: the instance's limits count the agent as before, and on v2 the
//! instance's cgroup may keep the shim's processes beside it (the rule against processes in an
//! inner cgroup applies only to cgroups that hand controllers down). The instance's uid owns
//! the files the shim writes: the agent cgroup's `cgroup.procs` and `freezer.state` (v2:
//! `cgroup.freeze`), and on v2 also the instance cgroup's `cgroup.procs`, which the kernel
//! requires of whoever moves a process between the two. The shim sees only the agent
//! directory, the agent not even that.

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
        for (mount_point, fstype, options) in mounts(&info) {
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

    /// otm's parent directories, one per hierarchy.
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2 { root } => vec![root.join("otm")],
            Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
            } => [memory, pids, cpu, freezer]
                .into_iter()
                .flatten()
                .map(|p| p.join("otm"))
                .collect(),
        }
    }

    /// Removes the instance cgroups that hold no process and were made more than `min_age`
    /// ago: those of instances whose otm was killed before it could remove them. A younger
    /// empty one may belong to an instance that another otm on this host is starting (its first
    /// process joins just after the directories are made), so it stays. Returns what was removed.
    pub fn remove_leftovers(&self, min_age: Duration) -> Vec<PathBuf> {
        remove_leftovers_in(&self.parents(), min_age)
    }
}

fn remove_leftovers_in(parents: &[PathBuf], min_age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for parent in parents {
        let Ok(listing) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in listing.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < min_age);
            if young {
                continue;
            }
            let dir = entry.path();
            let busy = tree(&dir).iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .map(|p| !p.trim().is_empty())
                    .unwrap_or(true)
            });
            if busy {
                continue;
            }
            remove_tree(&dir);
            if !dir.exists() {
                removed.push(dir);
            }
        }
    }
    removed
}

/// The mounts of a `/proc/self/mountinfo` text: (mount point, file system type, super options).
fn mounts(info: &str) -> impl Iterator<Item = (Option<PathBuf>, &str, &str)> {
    info.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4).map(PathBuf::from);
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let options = r.nth(1).unwrap_or("");
        Some((mount_point, fstype, options))
    })
}

/// Where otm mounts the cgroup hierarchy that turns the kernel's `favordynmods` on.
pub const FAVORDYNMODS_MOUNT: &str = "/run/otm/cgroup-favordynmods";

/// What [`favor_dynamic_moves`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FavorDynmods {
    /// A hierarchy mounted with `favordynmods` was there already (otm's own from an earlier
    /// start, or the host's).
    AlreadyOn(PathBuf),
    /// otm mounted its own at this path.
    Mounted(PathBuf),
}

/// Makes moving a process into a cgroup cheap: without the kernel's `favordynmods`, the first
/// move after a quiet moment waits for an RCU grace period (the lock every fork, exit and move
/// shares leaves its fast mode); 10 to 20 ms on a small VM, once per instance start. With it,
/// a move takes microseconds, and every fork and exit on the host takes the lock's slower
/// path, a few atomic operations more. A cgroup v1 host cannot remount its hierarchies with
/// the option, so otm mounts an empty named hierarchy (`name=otm-favordynmods`, no controller,
/// no process) at `at` that holds the kernel-wide lock in that mode for as long as it is
/// mounted; `umount` turns it off again. On a cgroup v2 host, `mount -o
/// remount,favordynmods` of the unified hierarchy does the same (otm leaves the host's
/// mounts alone). Needs root and a kernel of 6.0 or later.
pub fn favor_dynamic_moves(at: &Path) -> std::io::Result<FavorDynmods> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(found) = mounts(&info).find_map(|(mount_point, fstype, options)| {
        ((fstype == "cgroup" || fstype == "cgroup2")
            && options.split(',').any(|o| o == "favordynmods"))
        .then(|| mount_point.unwrap_or_else(|| PathBuf::from("?")))
    }) {
        return Ok(FavorDynmods::AlreadyOn(found));
    }
    std::fs::create_dir_all(at)?;
    use nix::mount::{MsFlags, mount};
    mount(
        Some("otm"),
        at,
        Some("cgroup"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("none,name=otm-favordynmods,favordynmods"),
    )
    .map_err(|e| {
        std::io::Error::other(format!(
            "mounting a cgroup hierarchy with favordynmods at {}: {e}",
            at.display()
        ))
    })?;
    Ok(FavorDynmods::Mounted(at.to_owned()))
}

/// The name of the agent's cgroup below the instance's.
pub const AGENT: &str = "agent";

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

    /// The directories of the instance (the agent's included) that exist.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .flat_map(|d| tree(d))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// The directory that freezes (v1: of the freezer hierarchy), if any.
    fn freezer_dir(&self) -> Option<&PathBuf> {
        self.v2.as_ref().or(self.freezer.as_ref())
    }

    /// The agent's cgroup directory (not created yet), when the instance has a freezer.
    pub fn agent_dir(&self) -> Option<PathBuf> {
        self.freezer_dir().map(|d| d.join(AGENT))
    }

    /// Creates the agent's cgroup (after [`InstanceCgroup::create`]) and gives `owner` (uid,
    /// gid) the files the shim writes. Returns its directory; `None` without a freezer.
    pub fn create_agent(&self, owner: Option<(u32, u32)>) -> std::io::Result<Option<PathBuf>> {
        let Some(dir) = self.agent_dir() else {
            return Ok(None);
        };
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        // The instance's uid (bubblewrap, showing the directory to the shim) must reach it:
        // `otm/`, `otm/<id>/` and the directory itself traversable (not listable) by all.
        for d in dir.ancestors().skip(1).take(2).chain([dir.as_path()]) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d)?.permissions().mode();
            if mode & 0o111 != 0o111 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o111))?;
            }
        }
        if let Some((uid, gid)) = owner {
            let mut files = vec![dir.join("cgroup.procs")];
            match &self.v2 {
                Some(instance) => {
                    files.push(dir.join("cgroup.freeze"));
                    files.push(instance.join("cgroup.procs"));
                }
                None => files.push(dir.join("freezer.state")),
            }
            for f in files {
                nix::unistd::chown(
                    &f,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(|e| {
                    std::io::Error::new(
                        std::io::Error::from(e).kind(),
                        format!("cannot give {} to uid {uid}: {e}", f.display()),
                    )
                })?;
            }
        }
        Ok(Some(dir))
    }

    /// The host pids of every process in the instance, the agent's cgroup included.
    pub fn procs(&self) -> Vec<i32> {
        let dir = self.freezer_dir().or(self.pids.as_ref());
        let Some(dir) = dir else { return vec![] };
        let mut out = Vec::new();
        for d in tree(dir) {
            out.extend(
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        out
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
    /// v2: `cgroup.kill`. v1: freeze, SIGKILL every member (none can fork meanwhile), thaw
    /// (a frozen agent cgroup too: a frozen process dies only once thawed).
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
                // Inner cgroups first: each keeps its own frozen state.
                for c in tree(d).into_iter().rev() {
                    let _ = std::fs::write(c.join("cgroup.freeze"), "0");
                }
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
                // An inner cgroup frozen on its own stays frozen when its parent thaws.
                for c in tree(f).into_iter().rev() {
                    let _ = std::fs::write(c.join("freezer.state"), "THAWED");
                }
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

    /// Removes the (empty) directories, inner ones (the agent's) first.
    pub fn remove(&self) {
        for d in self.dirs() {
            remove_tree(d);
        }
    }
}

/// Removes the (empty) cgroup `dir`, the cgroups below it first.
fn remove_tree(dir: &Path) {
    for d in tree(dir).into_iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// `dir` and every cgroup below it, parents before children.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(listing) = std::fs::read_dir(&out[i]) {
            let mut inner: Vec<PathBuf> = listing
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            inner.sort();
            out.extend(inner);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use otm_shim::freezer::AgentCgroup;

    /// A `sleep` moved into each of `procs` (the way `otm sandbox-exec` joins them).
    fn sleeper(procs: &[PathBuf]) -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        for f in procs {
            std::fs::write(f, child.id().to_string())
                .unwrap_or_else(|e| panic!("joining {}: {e}", f.display()));
        }
        child
    }

    fn state(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned()))
            .unwrap_or_default()
    }

    /// Freezes the agent's cgroup of `cg` with a process in it and one in the instance beside
    /// it; only the agent's is frozen, and kill and remove still leave nothing behind.
    fn freeze_kill_remove(cg: &InstanceCgroup) {
        let agent_dir = cg.create_agent(None).unwrap().expect("a freezer");
        let mut shim = sleeper(&cg.procs_files());
        let mut agent = sleeper(&[cg.procs_files(), vec![agent_dir.join("cgroup.procs")]].concat());
        let freezer = AgentCgroup::open(&agent_dir).unwrap();
        assert_eq!(freezer.procs(), vec![agent.id() as i32]);
        freezer.freeze(Duration::from_secs(5)).unwrap();
        assert!(freezer.is_frozen().unwrap());
        assert_ne!(state(agent.id()), "T", "frozen by the cgroup, not a signal");
        let mut procs = cg.procs();
        procs.sort();
        let mut expected = vec![shim.id() as i32, agent.id() as i32];
        expected.sort();
        assert_eq!(
            procs, expected,
            "the instance's processes include the agent's"
        );
        assert!(
            !matches!(state(shim.id()).as_str(), "D" | "T"),
            "the process beside the agent runs"
        );

        cg.kill(Duration::from_secs(10)).unwrap();
        assert!(shim.wait().is_ok() && agent.wait().is_ok());
        assert!(!cg.populated());
        cg.remove();
        assert_eq!(cg.leftovers(), Vec::<PathBuf>::new());
        for d in cg.dirs() {
            assert!(!d.exists(), "{} is left behind", d.display());
        }
    }

    /// Empty instance cgroups older than the given age are removed, inner ones first; one
    /// with a process, or younger, stays.
    #[test]
    fn leftover_cgroups_are_removed_and_live_ones_kept() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating cgroups needs root");
            return;
        }
        let Some(Layout::V1 {
            pids: Some(pids), ..
        }) = Layout::detect()
        else {
            eprintln!("skipped: no cgroup v1 pids hierarchy on this host");
            return;
        };
        // A parent of this test's own, so that no other test's cgroups are swept.
        let parent = pids.join(format!("otm-test-{}", InstanceId::random()));
        let (left, live) = (parent.join("left"), parent.join("live"));
        for d in [left.join(AGENT), live.join(AGENT)] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut child = sleeper(&[live.join(AGENT).join("cgroup.procs")]);
        let parents = [parent.clone()];

        assert_eq!(
            remove_leftovers_in(&parents, Duration::from_secs(3600)),
            Vec::<PathBuf>::new(),
            "young cgroups stay"
        );
        assert_eq!(
            remove_leftovers_in(&parents, Duration::ZERO),
            vec![left.clone()]
        );
        assert!(!left.exists());
        assert!(live.join(AGENT).is_dir(), "a cgroup with a process stays");

        child.kill().unwrap();
        child.wait().unwrap();
        // The kernel empties a cgroup once its last process is reaped.
        let deadline = Instant::now() + Duration::from_secs(10);
        while remove_leftovers_in(&parents, Duration::ZERO).is_empty() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!live.exists());
        std::fs::remove_dir(&parent).unwrap();
    }

    /// Mount points of cgroup hierarchies that have `favordynmods` on.
    fn favordynmods_mounts() -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - cgroup") && l.contains("favordynmods"))
            .map(|l| l.split_whitespace().nth(4).unwrap().to_owned())
            .collect()
    }

    /// The kernel's favordynmods is turned on by one mount, and a second call mounts nothing.
    #[test]
    fn favordynmods_is_turned_on_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a cgroup hierarchy needs root");
            return;
        }
        let at =
            std::env::temp_dir().join(format!("otm-test-favordynmods-{}", InstanceId::random()));
        let first = match favor_dynamic_moves(&at) {
            Ok(f) => f,
            Err(e) if e.to_string().contains("EINVAL") => {
                eprintln!("skipped: this kernel has no favordynmods ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mounts = favordynmods_mounts();
        assert!(
            !mounts.is_empty(),
            "no hierarchy with favordynmods after {first:?}"
        );
        if let FavorDynmods::Mounted(p) = &first {
            assert_eq!(p, &at);
            assert!(mounts.contains(&at.display().to_string()), "{mounts:?}");
        }
        let second = favor_dynamic_moves(&at).unwrap();
        assert!(matches!(second, FavorDynmods::AlreadyOn(_)), "{second:?}");
        assert_eq!(favordynmods_mounts().len(), mounts.len(), "mounted twice");
        if let FavorDynmods::Mounted(p) = first {
            nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
        let _ = std::fs::remove_dir(&at);
    }

    #[test]
    fn a_frozen_agent_cgroup_is_killed_and_removed_with_its_instance_v1() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating cgroups needs root");
            return;
        }
        let Some(
            layout @ Layout::V1 {
                freezer: Some(_), ..
            },
        ) = Layout::detect()
        else {
            eprintln!("skipped: no cgroup v1 freezer on this host");
            return;
        };
        layout.prepare().unwrap();
        let cg = layout.instance(&InstanceId::random());
        cg.create(&ResourceLimits::default()).unwrap();
        freeze_kill_remove(&cg);
    }

    #[test]
    fn a_frozen_agent_cgroup_is_killed_and_removed_with_its_instance_v2() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating cgroups needs root");
            return;
        }
        // Any cgroup v2 mount will do: the freezer needs no controller.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(root) = info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount_point))
        }) else {
            eprintln!("skipped: no cgroup v2 hierarchy on this host");
            return;
        };
        let cg = InstanceCgroup {
            v2: Some(root.join(format!("otm-test-{}", InstanceId::random()))),
            ..Default::default()
        };
        std::fs::create_dir(cg.v2.as_ref().unwrap()).unwrap();
        freeze_kill_remove(&cg);
    }
}
