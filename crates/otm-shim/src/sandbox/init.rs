//! `otm sandbox-init`: process 1 of an agent sandbox.
//!
//! It starts the agent in a process group of its own, passes the termination signals the shim
//! sends it (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) on to that group, reaps every
//! orphan the agent leaves, and exits with the agent's status; the kernel then ends whatever is
//! left in the sandbox. It makes itself undumpable (no `/proc/1/mem` for the agent), raises
//! the agent's OOM score so that, inside the instance's memory limit, the agent goes first, and
//! applies the sandbox's Landlock rules ([`super::landlock`]) to itself before the agent starts,
//! so that the agent and everything it runs inherit them.

use super::landlock::Enforcement;
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Runs `program` with `args`, allowed to write only below `writable`, and returns the exit code
/// to exit with.
pub fn run(program: &OsString, args: &[OsString], writable: &[PathBuf]) -> i32 {
    let _ = std::fs::write("/proc/self/oom_score_adj", "500");
    let _ = nix::sys::prctl::set_dumpable(false);
    match super::landlock::restrict(writable) {
        Ok(Enforcement::Full) => {}
        Ok(Enforcement::Partial) => {
            eprintln!(
                "otm sandbox-init: this kernel's Landlock enforces only part of the file rules"
            )
        }
        Ok(Enforcement::None) => {
            eprintln!("otm sandbox-init: this kernel has no Landlock; the sandbox runs without it")
        }
        Err(e) => {
            eprintln!("otm sandbox-init: cannot apply the sandbox's file rules: {e}");
            return 126;
        }
    }
    // Started before the signals are blocked: a child inherits the signal mask.
    let child = match std::process::Command::new(program)
        .args(args)
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "otm sandbox-init: cannot start {}: {e}",
                program.to_string_lossy()
            );
            return 127;
        }
    };
    let agent = Pid::from_raw(child.id() as i32);
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(*s);
    }
    set.add(Signal::SIGCHLD);
    // Blocked here and taken with sigwait (process 1 of a namespace gets no signal it has no
    // handler for, unless it waits for it).
    if let Err(e) = set.thread_block() {
        eprintln!("otm sandbox-init: cannot block signals: {e}");
        return 126;
    }
    if let Some(code) = reap(agent) {
        return code;
    }
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let _ = killpg(agent, sig);
            continue;
        }
        if let Some(code) = reap(agent) {
            return code;
        }
    }
}

/// Reaps every exited child; the agent's exit code once it is among them.
fn reap(agent: Pid) -> Option<i32> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => return Some(code),
            Ok(WaitStatus::Signaled(pid, s, _)) if pid == agent => return Some(128 + s as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Parses `[--rw DIR]… [--] PROGRAM [ARGS…]`, the arguments of `otm-sandbox-init`: the
/// directories the agent may write, then the agent.
pub fn parse_args(
    args: impl IntoIterator<Item = OsString>,
) -> Result<(Vec<PathBuf>, OsString, Vec<OsString>), String> {
    let mut args = args.into_iter();
    let mut writable = Vec::new();
    let program = loop {
        match args.next() {
            Some(a) if a == "--rw" => match args.next() {
                Some(dir) => writable.push(PathBuf::from(dir)),
                None => return Err("--rw needs a directory".into()),
            },
            Some(a) if a == "--" => match args.next() {
                Some(p) => break p,
                None => return Err("no program after --".into()),
            },
            Some(a) => break a,
            None => return Err("no program given".into()),
        }
    };
    Ok((writable, program, args.collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_name_the_writable_directories_then_the_agent() {
        let (rw, program, args) = parse_args(os(&[
            "--rw",
            "/s",
            "--rw",
            "/t",
            "--",
            "/bin/agent",
            "--rw",
            "x",
        ]))
        .unwrap();
        assert_eq!(rw, vec![PathBuf::from("/s"), PathBuf::from("/t")]);
        assert_eq!(program, "/bin/agent");
        assert_eq!(
            args,
            os(&["--rw", "x"]),
            "the agent's own arguments are its own"
        );
        let (rw, program, _) = parse_args(os(&["/bin/agent"])).unwrap();
        assert!(rw.is_empty());
        assert_eq!(program, "/bin/agent");
        assert!(parse_args(os(&["--rw"])).is_err());
        assert!(parse_args(os(&["--"])).is_err());
        assert!(parse_args(os(&[])).is_err());
    }
}
