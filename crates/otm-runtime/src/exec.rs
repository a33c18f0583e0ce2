//! `otm sandbox-exec`: the first process of every local instance.
//!
//! The runtime starts it as root (or otm's user); before anything of the instance runs it puts
//! itself into the instance's cgroups, starts a new session, sets the resource limits that
//! cgroups do not cover, closes every descriptor it was not meant to pass on, drops to the
//! instance's unprivileged uid, and then executes the instance (bubblewrap, or the shim itself
//! without a sandbox). Everything the instance ever starts inherits all of that.

use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// What to set up before executing the instance.
#[derive(Clone, Debug, Default)]
pub struct ExecPlan {
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The uid and gid to drop to.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE: the largest file any process of the instance may write.
    pub fsize: Option<u64>,
    /// Descriptors (besides 0, 1, 2) passed on to the instance.
    pub keep_fds: Vec<i32>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// Parses the arguments of `otm-sandbox-exec` (the same as `otm sandbox-exec`'s):
/// `[--cgroup-procs FILE]… [--uid N] [--gid N] [--nofile N] [--fsize BYTES] [--keep-fd FD]…
/// -- PROGRAM [ARGS…]`.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<ExecPlan, String> {
    let mut args = args.into_iter();
    let mut plan = ExecPlan {
        nofile: 4096,
        ..Default::default()
    };
    fn number<T: std::str::FromStr>(flag: &str, v: Option<OsString>) -> Result<T, String> {
        v.as_ref()
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    }
    loop {
        let Some(arg) = args.next() else {
            return Err("no program given after --".into());
        };
        match arg.to_str().unwrap_or("") {
            "--cgroup-procs" => plan.cgroup_procs.push(PathBuf::from(
                args.next().ok_or("--cgroup-procs needs a file")?,
            )),
            "--uid" => plan.uid = Some(number("--uid", args.next())?),
            "--gid" => plan.gid = Some(number("--gid", args.next())?),
            "--nofile" => plan.nofile = number("--nofile", args.next())?,
            "--fsize" => plan.fsize = Some(number("--fsize", args.next())?),
            "--keep-fd" => plan.keep_fds.push(number("--keep-fd", args.next())?),
            "--" => break,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    plan.program = args.next().ok_or("no program given after --")?;
    plan.args = args.collect();
    Ok(plan)
}

/// Sets everything up and executes the program; returns only on failure.
pub fn run(plan: ExecPlan) -> std::io::Error {
    match prepare(&plan) {
        Ok(()) => std::process::Command::new(&plan.program)
            .args(&plan.args)
            .exec(),
        Err(e) => e,
    }
}

fn prepare(plan: &ExecPlan) -> std::io::Result<()> {
    let ctx = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    for procs in &plan.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(ctx(format!("cannot join {}", procs.display())))?;
    }
    // A session of its own: no controlling terminal to inject keystrokes into, and signals to
    // the server's process group do not reach it.
    let _ = nix::unistd::setsid();
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    setrlimit(Resource::RLIMIT_NOFILE, plan.nofile, plan.nofile)
        .map_err(|e| ctx("cannot limit open files".into())(e.into()))?;
    if let Some(f) = plan.fsize {
        setrlimit(Resource::RLIMIT_FSIZE, f, f)
            .map_err(|e| ctx("cannot limit file sizes".into())(e.into()))?;
    }
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !plan.keep_fds.contains(&fd) {
            // Fails for the directory handle of the listing above, already closed.
            let _ = nix::unistd::close(fd);
        }
    }
    if let Some(gid) = plan.gid {
        let gid = Gid::from_raw(gid);
        nix::unistd::setgroups(&[gid])
            .map_err(|e| ctx("cannot drop supplementary groups".into())(e.into()))?;
        nix::unistd::setresgid(gid, gid, gid)?;
    }
    if let Some(uid) = plan.uid {
        let uid = Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid)
            .map_err(|e| ctx(format!("cannot become uid {uid}"))(e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_parse_as_the_full_binary_takes_them() {
        let plan = parse_args(os(&[
            "--cgroup-procs",
            "/a/cgroup.procs",
            "--cgroup-procs",
            "/b/cgroup.procs",
            "--uid",
            "1500000007",
            "--gid",
            "1500000007",
            "--nofile",
            "4096",
            "--fsize",
            "1073741824",
            "--keep-fd",
            "3",
            "--",
            "/usr/bin/bwrap",
            "--unshare-user",
            "--",
        ]))
        .unwrap();
        assert_eq!(plan.cgroup_procs.len(), 2);
        assert_eq!(
            (plan.uid, plan.gid),
            (Some(1_500_000_007), Some(1_500_000_007))
        );
        assert_eq!((plan.nofile, plan.fsize), (4096, Some(1 << 30)));
        assert_eq!(plan.keep_fds, vec![3]);
        assert_eq!(plan.program, "/usr/bin/bwrap");
        assert_eq!(plan.args, os(&["--unshare-user", "--"]));
        assert!(parse_args(os(&["--uid", "root", "--", "x"])).is_err());
        assert!(parse_args(os(&["--",])).is_err());
        assert!(parse_args(os(&["--bogus", "--", "x"])).is_err());
        assert!(
            parse_args(os(&["x"])).is_err(),
            "the program comes after --"
        );
    }
}
