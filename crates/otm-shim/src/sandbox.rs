//! The sandbox an instance and its agent run in, as bubblewrap arguments.
//!
//! An instance is two nested sandboxes:
//!
//! - the **instance sandbox** (started by the local runtime) holds `otm shim`: its own user,
//!   PID, IPC, UTS and network namespaces (only loopback), a minimal read-only system, the
//!   instance directory writable, and otm's egress proxy as Unix sockets in [`EGRESS_DIR`];
//! - the **agent sandbox** (started by the shim inside it) holds the agent: another user and PID
//!   namespace (the shim is not even visible), an unprivileged uid, no capabilities, a new
//!   session, no further user namespaces, the seccomp filter of [`seccomp`], and only the
//!   agent's `state/`, `tmp/` and `home/` writable. It shares the instance's network namespace,
//!   where the only listeners are the agent's own and the shim's egress forwarder.
//!
//! [`SystemView`] is what both show of the host: `/usr` and the library directories, a few
//! files of `/etc`, and the programs an agent needs, read-only; never the data directory.

pub mod seccomp;

use std::path::{Path, PathBuf};

/// Where the directory of the egress proxy's Unix sockets appears inside an instance sandbox.
pub const EGRESS_DIR: &str = "/run/otm";

/// Where the agent's cgroup directory appears inside an instance sandbox, when the instance
/// has one ([`crate::freezer`]); the agent's own sandbox never shows it.
pub const AGENT_CGROUP_DIR: &str = "/run/otm-cgroup";

/// The uid and gid every sandboxed process has inside its user namespace.
pub const SANDBOX_UID: u32 = 1000;

/// System directories shown read-only (or recreated as the same symlink).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// The files and directories of `/etc` an agent needs: name resolution, the dynamic linker,
/// time zones, TLS roots. Nothing with credentials (`passwd` and `group` are synthetic).
const ETC_FILES: &[&str] = &[
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/alternatives",
    "/etc/os-release",
    "/etc/mime.types",
    "/etc/protocols",
    "/etc/services",
];

/// What a sandbox shows of the host.
#[derive(Clone, Debug, Default)]
pub struct SystemView {
    /// Files or directories shown read-only at the same path (otm, agent programs and their
    /// installations).
    pub read_only: Vec<PathBuf>,
    /// A directory shown as the whole of `/etc` with one mount (one made by [`prepare_etc`], or
    /// inside an instance sandbox its `/etc`, already that directory). Without one, the files of
    /// `/etc` an agent needs are shown one by one, a mount each.
    pub etc: Option<PathBuf>,
    /// A synthetic `/etc/passwd` and `/etc/group` to show, when given (without `etc`).
    pub passwd: Option<(PathBuf, PathBuf)>,
    /// Size of the private `/tmp` in bytes.
    pub tmp_bytes: u64,
}

impl SystemView {
    /// Every host path this view shows, for the check that none of them holds the data
    /// directory.
    pub fn shown_paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = SYSTEM_DIRS
            .iter()
            .chain(ETC_FILES)
            .map(PathBuf::from)
            .collect();
        out.extend(self.read_only.iter().cloned());
        out
    }

    /// The bubblewrap arguments that build this view on an empty root.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        for dir in SYSTEM_DIRS {
            let p = Path::new(dir);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(p) {
                        push(&["--symlink", &target.display().to_string(), dir]);
                    }
                }
                Ok(m) if m.is_dir() => push(&["--ro-bind", dir, dir]),
                _ => {}
            }
        }
        if let Some(etc) = &self.etc {
            push(&["--ro-bind", &etc.display().to_string(), "/etc"]);
        } else {
            for f in ETC_FILES {
                push(&["--ro-bind-try", f, f]);
            }
            if let Some((passwd, group)) = &self.passwd {
                push(&["--ro-bind", &passwd.display().to_string(), "/etc/passwd"]);
                push(&["--ro-bind", &group.display().to_string(), "/etc/group"]);
            }
        }
        // The fresh /proc, /dev and /tmp first: binds of paths below /tmp (a data directory
        // there) are mounted on top of them, not hidden under them.
        push(&["--proc", "/proc", "--dev", "/dev"]);
        push(&[
            "--perms",
            "1777",
            "--size",
            &self.tmp_bytes.max(1 << 20).to_string(),
            "--tmpfs",
            "/tmp",
        ]);
        for p in &self.read_only {
            let s = p.display().to_string();
            push(&["--ro-bind", &s, &s]);
        }
        a
    }
}

/// The namespace and privilege arguments both sandboxes share: every namespace but the
/// network one (the caller decides), the fixed unprivileged uid, no capabilities, a new
/// session (no terminal to push keystrokes into).
pub fn isolation_args() -> Vec<String> {
    let uid = SANDBOX_UID.to_string();
    [
        "--unshare-user",
        "--uid",
        &uid,
        "--gid",
        &uid,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "otm",
        "--cap-drop",
        "ALL",
        "--new-session",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The synthetic `/etc/passwd` and `/etc/group` of a sandbox: root, the sandbox user, nobody.
pub fn passwd_files() -> (String, String) {
    let u = SANDBOX_UID;
    (
        format!(
            "root:x:0:0:root:/root:/bin/sh\notm:x:{u}:{u}:otm agent:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        ),
        format!("root:x:0:\notm:x:{u}:\nnogroup:x:65534:\n"),
    )
}

/// Builds, below `root`, a directory to show as a sandbox's whole `/etc`: copies of the files
/// of `/etc` an agent needs (what every local user may read of them: nothing that is not
/// world-readable, so no `/etc/ssl/private`), symbolic links kept as links, and the synthetic
/// `passwd` and `group` of [`passwd_files`]. One mount then shows it all, instead of a mount per
/// file on every sandbox start.
///
/// The directory is named after a hash of its contents and never changed once made: a server
/// that finds the host's `/etc` changed makes a new one, and running instances keep theirs.
/// Several servers sharing a data directory make the same one.
pub fn prepare_etc(root: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut entries: Vec<(PathBuf, EtcEntry)> = Vec::new();
    for f in ETC_FILES {
        collect_etc(
            Path::new(f),
            Path::new(f.trim_start_matches("/etc/")),
            true,
            &mut entries,
        );
    }
    let (passwd, group) = passwd_files();
    entries.retain(|(rel, _)| rel != Path::new("passwd") && rel != Path::new("group"));
    entries.push(("passwd".into(), EtcEntry::File(passwd.into_bytes(), 0o644)));
    entries.push(("group".into(), EtcEntry::File(group.into_bytes(), 0o644)));
    let mut hasher = std::hash::DefaultHasher::new();
    entries.hash(&mut hasher);
    let dir = root.join(format!("etc-{:016x}", hasher.finish()));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    let tmp = root.join(format!(
        ".etc-{}-{}",
        std::process::id(),
        otm_core::id::random_hex(4)
    ));
    let build = || -> std::io::Result<()> {
        std::fs::DirBuilder::new().mode(0o755).create(&tmp)?;
        for (rel, entry) in &entries {
            let at = tmp.join(rel);
            match entry {
                EtcEntry::Dir(mode) => {
                    std::fs::DirBuilder::new().mode(*mode).create(&at)?;
                    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(*mode))?;
                }
                EtcEntry::File(data, mode) => {
                    std::fs::write(&at, data)?;
                    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(*mode))?;
                }
                EtcEntry::Link(target) => std::os::unix::fs::symlink(target, &at)?,
            }
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
    };
    let built = build().and_then(|()| std::fs::rename(&tmp, &dir));
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // Made meanwhile by another server sharing the data directory?
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    built.map(|()| dir)
}

/// One entry of a prepared `/etc`.
#[derive(Hash)]
enum EtcEntry {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(PathBuf),
}

/// Adds `host` (at `rel` in the prepared `/etc`) and, for a directory, what is below it: what
/// every user may read, links as links. A link at the top whose target lies outside the
/// system directories every sandbox shows (`/etc/resolv.conf` into `/run`) is copied as the
/// file it points to.
fn collect_etc(host: &Path, rel: &Path, top: bool, out: &mut Vec<(PathBuf, EtcEntry)>) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(host) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let Ok(target) = std::fs::read_link(host) else {
            return;
        };
        let shown = target.is_relative()
            || SYSTEM_DIRS.iter().any(|d| target.starts_with(d))
            || target.starts_with("/etc");
        if shown || !top {
            out.push((rel.to_path_buf(), EtcEntry::Link(target)));
            return;
        }
        if let Ok(meta) = std::fs::metadata(host)
            && meta.is_file()
            && meta.permissions().mode() & 0o004 != 0
            && let Ok(data) = std::fs::read(host)
        {
            out.push((rel.to_path_buf(), EtcEntry::File(data, 0o644)));
        }
    } else if meta.is_dir() {
        if mode & 0o005 != 0o005 {
            return;
        }
        out.push((rel.to_path_buf(), EtcEntry::Dir(mode & 0o755)));
        let Ok(listing) = std::fs::read_dir(host) else {
            return;
        };
        let mut names: Vec<_> = listing.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            collect_etc(&host.join(&name), &rel.join(&name), false, out);
        }
    } else if meta.is_file()
        && mode & 0o004 != 0
        && let Ok(data) = std::fs::read(host)
    {
        out.push((rel.to_path_buf(), EtcEntry::File(data, mode & 0o755)));
    }
}

/// The first of `shown` that contains `data_dir` (or is it), if any. Instances must never see
/// the data directory; a layout like `/opt/otm/{otm,data}` would show it through the binary's
/// directory.
pub fn shows_data_dir<'a>(shown: &'a [PathBuf], data_dir: &Path) -> Option<&'a PathBuf> {
    let data = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    shown.iter().find(|p| {
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        data.starts_with(&p)
    })
}

/// Finds `bwrap` on `PATH`.
pub fn bwrap() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("bwrap"))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_directory_that_holds_the_data_dir_is_found() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let shown = vec![PathBuf::from("/usr"), root.path().to_path_buf()];
        assert_eq!(
            shows_data_dir(&shown, &data),
            Some(&root.path().to_path_buf())
        );
        let inside = vec![data.join("openclaw"), PathBuf::from("/usr")];
        assert_eq!(
            shows_data_dir(&inside, &data),
            None,
            "a directory inside the data dir does not show the data dir"
        );
    }

    #[test]
    fn a_prepared_etc_holds_what_agents_need_and_nothing_private() {
        let root = tempfile::tempdir().unwrap();
        let etc = prepare_etc(root.path()).unwrap();
        assert_eq!(
            prepare_etc(root.path()).unwrap(),
            etc,
            "the same host /etc gives the same directory"
        );
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
        assert_eq!(
            passwd,
            passwd_files().0,
            "the synthetic passwd, not the host's"
        );
        assert!(!etc.join("shadow").exists());
        if Path::new("/etc/ssl/private").is_dir() {
            assert!(!etc.join("ssl/private").exists(), "private keys stay out");
        }
        if Path::new("/etc/ld.so.cache").is_file() {
            assert_eq!(
                std::fs::read(etc.join("ld.so.cache")).unwrap(),
                std::fs::read("/etc/ld.so.cache").unwrap()
            );
        }
        let view = SystemView {
            etc: Some(etc.clone()),
            tmp_bytes: 1 << 20,
            ..Default::default()
        };
        let args = view.args();
        let binds = args.iter().filter(|a| a.contains("bind")).count();
        assert!(
            args.windows(3).any(|w| w[0] == "--ro-bind"
                && w[1] == etc.display().to_string()
                && w[2] == "/etc")
        );
        assert!(
            !args.iter().any(|a| a == "/etc/ssl"),
            "one mount for /etc: {args:?}"
        );
        assert!(binds < 10, "{args:?}");
    }

    #[test]
    fn the_view_never_binds_the_whole_root() {
        let args = SystemView {
            tmp_bytes: 1 << 20,
            ..Default::default()
        }
        .args();
        for w in args.windows(3) {
            if w[0].ends_with("bind") || w[0].ends_with("bind-try") {
                assert_ne!(w[1], "/", "the host root is not shown");
            }
        }
        assert!(args.iter().any(|a| a == "/etc/ssl"));
        assert!(
            !args
                .iter()
                .any(|a| a == "/etc/shadow" || a == "/home" || a == "/root" || a == "/run")
        );
    }
}

pub mod init;
pub mod landlock;

/// How the shim starts agents in a sandbox of their own.
#[derive(Clone, Debug)]
pub struct AgentSandbox {
    pub bwrap: PathBuf,
    /// The `otm` binary, shown read-only; it runs `otm sandbox-init` as the sandbox's process 1
    /// when `otm-sandbox-init` is not installed beside it.
    pub otm: PathBuf,
    pub view: SystemView,
    /// The agent's cgroup, where the instance has one: the sandbox's process 1 joins it before
    /// it starts anything, and the shim freezes it.
    pub cgroup: Option<std::sync::Arc<crate::freezer::AgentCgroup>>,
}

/// The sandbox's process 1 as a command: `otm-sandbox-init` beside `otm` (small, quick to
/// start), else `otm sandbox-init`.
pub fn init_command(otm: &Path) -> Vec<PathBuf> {
    let small = otm.with_file_name("otm-sandbox-init");
    if small.is_file() {
        vec![small]
    } else {
        vec![otm.to_path_buf(), PathBuf::from("sandbox-init")]
    }
}

/// A spawned agent sandbox.
#[derive(Debug)]
pub struct Spawned {
    pub child: tokio::process::Child,
    /// Process 1 of the sandbox (`otm sandbox-init`), as the shim sees it: signals for the
    /// agent go here.
    pub init_pid: u32,
}

/// What an agent sandbox's process 1 is told to run.
enum Start<'a> {
    /// The agent, named on process 1's command line; its environment is bubblewrap's.
    Now {
        program: &'a Path,
        args: &'a [String],
        env: &'a std::collections::BTreeMap<String, String>,
    },
    /// Nothing yet: process 1 waits for a launch on this pipe (read end).
    Later(std::os::fd::OwnedFd),
}

/// The descriptor a waiting process 1 reads its launch from.
const LAUNCH_FD: i32 = 12;
/// The descriptor process 1 finds its cgroup's `cgroup.procs` on.
const CGROUP_FD: i32 = 13;

impl AgentSandbox {
    /// Starts `program` in a new agent sandbox with `writable` directories (created if missing)
    /// and `read_only` extra paths shown, `env` as its whole environment, `workdir` as its
    /// working directory, output to `log`.
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn(
        &self,
        program: &Path,
        args: &[String],
        env: &std::collections::BTreeMap<String, String>,
        workdir: &Path,
        writable: &[PathBuf],
        read_only: &[PathBuf],
        log: std::fs::File,
    ) -> std::io::Result<Spawned> {
        let mut shown = read_only.to_vec();
        if !self.shows(program, read_only) {
            shown.push(program.to_path_buf());
        }
        let how = Start::Now { program, args, env };
        self.start(how, workdir, writable, &shown, log).await
    }

    /// Makes an agent sandbox ahead of its agent: bubblewrap, its namespaces and mounts, and
    /// process 1 waiting for what to run. [`Prestarted::launch`] then starts the agent in it
    /// without paying for any of that; a launch that needs more than it shows (a program or
    /// file outside `read_only` and the system view, other writable directories) does not fit
    /// and takes [`AgentSandbox::spawn`]. Dropped unused, the sandbox ends on its own.
    pub async fn prestart(
        self: &std::sync::Arc<Self>,
        workdir: &Path,
        writable: &[PathBuf],
        read_only: &[PathBuf],
        log: std::fs::File,
    ) -> std::io::Result<Prestarted> {
        let began = std::time::Instant::now();
        // Close-on-exec, both ends: the sandbox gets the read end as its launch descriptor only,
        // and no process but this one may hold the write end, or process 1 never sees its end.
        let (launch_r, launch_w) = pipe()?;
        let spawned = self
            .start(Start::Later(launch_r), workdir, writable, read_only, log)
            .await?;
        Ok(Prestarted {
            spawned,
            launch: launch_w,
            sandbox: self.clone(),
            workdir: workdir.to_path_buf(),
            writable: writable.to_vec(),
            read_only: read_only.to_vec(),
            took: began.elapsed(),
        })
    }

    /// Whether `path` is shown by this sandbox's view (the system directories, its read-only
    /// paths) or below one of `extra`.
    fn shows(&self, path: &Path, extra: &[PathBuf]) -> bool {
        SYSTEM_DIRS.iter().any(|d| path.starts_with(d))
            || self
                .view
                .read_only
                .iter()
                .chain(extra)
                .any(|r| path.starts_with(r))
    }

    async fn start(
        &self,
        how: Start<'_>,
        workdir: &Path,
        writable: &[PathBuf],
        read_only: &[PathBuf],
        log: std::fs::File,
    ) -> std::io::Result<Spawned> {
        use command_fds::{CommandFdExt, FdMapping};
        use std::io::Write;
        const SECCOMP_FD: i32 = 10;
        const INFO_FD: i32 = 11;

        let (seccomp_r, seccomp_w) = pipe()?;
        std::fs::File::from(seccomp_w).write_all(&seccomp::program())?;
        let (info_r, info_w) = pipe()?;

        let s = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = isolation_args();
        a.extend(["--disable-userns", "--die-with-parent", "--as-pid-1"].map(String::from));
        a.extend([
            "--seccomp".into(),
            SECCOMP_FD.to_string(),
            "--info-fd".into(),
            INFO_FD.to_string(),
        ]);
        let mut view = self.view.clone();
        let init = init_command(&self.otm);
        view.read_only.push(init[0].clone());
        view.read_only.extend(read_only.iter().cloned());
        view.read_only.sort();
        view.read_only.dedup();
        a.extend(view.args());
        for w in writable {
            std::fs::create_dir_all(w)?;
            a.extend(["--bind".into(), s(w), s(w)]);
        }
        a.extend([
            "--remount-ro".into(),
            "/".into(),
            "--chdir".into(),
            s(workdir),
        ]);
        a.push("--".into());
        a.extend(init.iter().map(|p| s(p)));
        let cgroup_procs = match &self.cgroup {
            Some(cg) => {
                a.extend(["--cgroup-fd".into(), CGROUP_FD.to_string()]);
                Some(std::os::fd::OwnedFd::from(cg.procs_for_writing()?))
            }
            None => None,
        };
        for w in writable {
            a.extend(["--rw".into(), s(w)]);
        }
        let mut fds = vec![
            FdMapping {
                parent_fd: seccomp_r,
                child_fd: SECCOMP_FD,
            },
            FdMapping {
                parent_fd: info_w,
                child_fd: INFO_FD,
            },
        ];
        if let Some(procs) = cgroup_procs {
            fds.push(FdMapping {
                parent_fd: procs,
                child_fd: CGROUP_FD,
            });
        }
        let env = match how {
            Start::Now { program, args, env } => {
                a.extend(["--".into(), s(program)]);
                a.extend(args.iter().cloned());
                env.clone()
            }
            Start::Later(launch_r) => {
                a.extend(["--wait-fd".into(), LAUNCH_FD.to_string()]);
                fds.push(FdMapping {
                    parent_fd: launch_r,
                    child_fd: LAUNCH_FD,
                });
                // The agent's environment comes with its launch; bubblewrap has none of it.
                let mut env = std::collections::BTreeMap::new();
                if let Ok(path) = std::env::var("PATH") {
                    env.insert("PATH".to_owned(), path);
                }
                env
            }
        };

        let mut cmd = tokio::process::Command::new(&self.bwrap);
        // The environment holds the instance's secrets (surrogate token, webhook secret): it goes
        // through bubblewrap's own environment (or the launch pipe), never its arguments, which
        // every user can read.
        cmd.args(&a)
            .env_clear()
            .envs(&env)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        cmd.fd_mappings(fds).map_err(std::io::Error::other)?;
        let child = cmd.spawn()?;
        // Our copies of the pipes' child ends must go, or the read below never ends.
        drop(cmd);
        let init_pid = tokio::task::spawn_blocking(move || read_child_pid(info_r))
            .await
            .map_err(std::io::Error::other)??;
        Ok(Spawned { child, init_pid })
    }
}

/// An agent sandbox made ahead of its agent ([`AgentSandbox::prestart`]).
#[derive(Debug)]
pub struct Prestarted {
    spawned: Spawned,
    /// The write end of the launch pipe; closed unused, process 1 exits.
    launch: std::os::fd::OwnedFd,
    sandbox: std::sync::Arc<AgentSandbox>,
    workdir: PathBuf,
    writable: Vec<PathBuf>,
    read_only: Vec<PathBuf>,
    /// How long making it took.
    pub took: std::time::Duration,
}

impl Prestarted {
    /// The sandbox's process 1, waiting.
    pub fn init_pid(&self) -> u32 {
        self.spawned.init_pid
    }

    /// Whether a launch of `program` in `workdir`, writing `writable` and reading the files
    /// `read_only`, fits this sandbox.
    pub fn fits(
        &self,
        program: &Path,
        workdir: &Path,
        writable: &[PathBuf],
        read_only: &[PathBuf],
    ) -> bool {
        self.workdir == workdir
            && self.writable == writable
            && self.sandbox.shows(program, &self.read_only)
            && read_only
                .iter()
                .all(|f| self.read_only.iter().any(|r| f.starts_with(r)))
    }

    /// Starts the agent in the waiting sandbox: `program` with `args` and `env` as its whole
    /// environment.
    pub fn launch(
        self,
        program: &Path,
        args: &[String],
        env: &std::collections::BTreeMap<String, String>,
    ) -> std::io::Result<Spawned> {
        use std::io::Write;
        let program = program
            .to_str()
            .ok_or_else(|| std::io::Error::other("a program path that is not UTF-8"))?;
        let message = init::encode_launch(program, args, env).map_err(std::io::Error::other)?;
        // The pipe holds 64 KiB; a larger launch is written while process 1 reads it.
        let mut pipe = std::fs::File::from(self.launch);
        pipe.write_all(&message)?;
        drop(pipe);
        Ok(self.spawned)
    }
}

/// A close-on-exec pipe: handed to a child only where mapped to a descriptor of its own.
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Reads `{"child-pid": N}` from bubblewrap's info pipe (`--info-fd`).
pub fn read_child_pid(fd: std::os::fd::OwnedFd) -> std::io::Result<u32> {
    // bubblewrap writes one small JSON object and may keep the pipe open: parse as soon as it
    // is whole rather than waiting for the end.
    use std::io::Read;
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = f.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
            return v["child-pid"].as_u64().map(|p| p as u32).ok_or_else(|| {
                std::io::Error::other(format!("bubblewrap reported no child pid: {v}"))
            });
        }
        if n == 0 || buf.len() > 64 << 10 {
            return Err(std::io::Error::other(format!(
                "bubblewrap did not report its sandbox: {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
    }
}
