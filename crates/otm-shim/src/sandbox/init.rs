//! `otm sandbox-init`: process 1 of an agent sandbox.
//!
//! It starts the agent in a process group of its own, passes the termination signals the shim
//! sends it (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) on to that group, reaps every
//! orphan the agent leaves, and exits with the agent's status; the kernel then ends whatever is
//! left in the sandbox. It makes itself undumpable (no `/proc/1/mem` for the agent), raises
//! the agent's OOM score so that, inside the instance's memory limit, the agent goes first, and
//! applies the sandbox's Landlock rules ([`super::landlock`]) to itself before the agent starts,
//! so that the agent and everything it runs inherit them.
//!
//! Given `--cgroup-fd N` (the agent's cgroup's `cgroup.procs`, opened by the shim), it first
//! writes itself into that cgroup and closes the descriptor, so that the agent and everything it
//! starts are inside, where the shim freezes them ([`crate::freezer`]); it exits rather than
//! run the agent outside.
//!
//! Started ahead of its agent (`--wait-fd N`, a sandbox the shim makes while the instance waits
//! for its tenant), it first reads what to run from descriptor `N`: the program, its arguments
//! and its whole environment, as [`encode_launch`] writes them. The agent's secrets then never
//! pass through bubblewrap's environment, and the sandbox's namespaces and mounts are made
//! before the wake that needs them.

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

/// What process 1 runs: given on its command line, or read from a descriptor once it is known.
#[derive(Debug, PartialEq, Eq)]
pub enum Program {
    Given {
        program: OsString,
        args: Vec<OsString>,
    },
    /// Read the launch ([`encode_launch`]) from this descriptor, up to its end.
    Wait(i32),
}

/// The most a launch message may hold.
const MAX_LAUNCH: usize = 1 << 20;

/// Encodes what a waiting process 1 runs: the program, the number of arguments, the arguments,
/// then `KEY=VALUE` for each variable of the environment, each field ended by a NUL byte (no
/// program name, argument or variable can hold one).
pub fn encode_launch<'a>(
    program: &str,
    args: &[String],
    env: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut field = |f: &str| -> Result<(), String> {
        if f.contains('\0') {
            return Err(format!("a NUL byte in {f:?}"));
        }
        out.extend_from_slice(f.as_bytes());
        out.push(0);
        Ok(())
    };
    field(program)?;
    field(&args.len().to_string())?;
    for a in args {
        field(a)?;
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') {
            return Err(format!("an environment variable named {k:?}"));
        }
        field(&format!("{k}={v}"))?;
    }
    if out.len() > MAX_LAUNCH {
        return Err(format!("a launch of {} bytes", out.len()));
    }
    Ok(out)
}

/// A launch read back: program, arguments, environment.
type Launch = (OsString, Vec<OsString>, Vec<(OsString, OsString)>);

/// Decodes what [`encode_launch`] wrote.
pub fn decode_launch(bytes: &[u8]) -> Result<Launch, String> {
    use std::os::unix::ffi::OsStrExt;
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err("the launch does not end with a NUL byte".into());
    };
    let mut fields = body.split(|b| *b == 0);
    let os = |f: &[u8]| std::ffi::OsStr::from_bytes(f).to_os_string();
    let program = match fields.next() {
        Some(p) if !p.is_empty() => os(p),
        _ => return Err("the launch names no program".into()),
    };
    let argc: usize = fields
        .next()
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .ok_or("the launch has no argument count")?;
    let args: Vec<OsString> = fields.by_ref().take(argc).map(os).collect();
    if args.len() != argc {
        return Err(format!("the launch has {} of {argc} arguments", args.len()));
    }
    let mut env = Vec::new();
    for f in fields {
        match f.iter().position(|b| *b == b'=') {
            Some(i) if i > 0 => env.push((os(&f[..i]), os(&f[i + 1..]))),
            _ => return Err("the launch has an environment entry without a name".into()),
        }
    }
    Ok((program, args, env))
}

/// Reads a launch from `fd` (up to its end, at most [`MAX_LAUNCH`] bytes) and closes it; `None`
/// when the descriptor was closed with nothing written (a sandbox made ahead and not needed).
fn read_launch(fd: i32) -> Result<Option<Launch>, String> {
    use std::io::Read;
    // Opened again through /proc (the same pipe), and the inherited descriptor closed: the
    // agent inherits neither.
    let f = std::fs::File::open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot open the launch descriptor {fd}: {e}"))?;
    let _ = nix::unistd::close(fd);
    let mut buf = Vec::new();
    f.take(MAX_LAUNCH as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the launch from descriptor {fd}: {e}"))?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.len() > MAX_LAUNCH {
        return Err("the launch is too large".into());
    }
    decode_launch(&buf).map(Some)
}

/// Writes this process into the cgroup whose `cgroup.procs` is open as `fd` (opened again
/// through /proc, as the launch descriptor is), and closes the descriptor.
fn join_cgroup(fd: i32) -> Result<(), String> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot open the cgroup descriptor {fd}: {e}"));
    let _ = nix::unistd::close(fd);
    // "0": the writing process itself, whatever its pid is in any namespace.
    std::io::Write::write_all(&mut procs?, b"0")
        .map_err(|e| format!("cannot join the agent's cgroup: {e}"))
}

/// Runs `program`, allowed to write only below `writable`, inside the cgroup of `cgroup_fd`
/// when given, and returns the exit code to exit with.
pub fn run(program: Program, writable: &[PathBuf], cgroup_fd: Option<i32>) -> i32 {
    if let Some(fd) = cgroup_fd
        && let Err(e) = join_cgroup(fd)
    {
        eprintln!("otm sandbox-init: {e}");
        return 126;
    }
    let (program, args, env) = match program {
        Program::Given { program, args } => (program, args, None),
        Program::Wait(fd) => match read_launch(fd) {
            Ok(Some((program, args, env))) => (program, args, Some(env)),
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("otm sandbox-init: {e}");
                return 126;
            }
        },
    };
    close_inherited();
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
    let mut command = std::process::Command::new(&program);
    command.args(&args).process_group(0);
    if let Some(env) = env {
        command.env_clear().envs(env);
    }
    let child = match command.spawn() {
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

/// Closes every descriptor above standard error: whatever the processes above left open (a
/// build tool's job server, a pipe of the shim) is not the agent's to have.
fn close_inherited() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(listing) => listing
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => return,
    };
    // The listing's own descriptor is among them and already closed; closing it again fails
    // harmlessly.
    for fd in fds {
        let _ = nix::unistd::close(fd);
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

/// The arguments of `otm-sandbox-init`.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// The directories the agent may write.
    pub writable: Vec<PathBuf>,
    /// The agent cgroup's `cgroup.procs`, open as this descriptor, to join first.
    pub cgroup_fd: Option<i32>,
    /// The agent, or the descriptor its launch will come from.
    pub program: Program,
}

/// Parses `[--cgroup-fd N] [--rw DIR]… (--wait-fd N | [--] PROGRAM [ARGS…])`, the arguments
/// of `otm-sandbox-init`.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Options, String> {
    let mut args = args.into_iter();
    let mut writable = Vec::new();
    let mut cgroup_fd = None;
    let descriptor = |flag: &str, n: Option<OsString>| {
        n.and_then(|n| n.to_str()?.parse::<i32>().ok())
            .filter(|n| *n > 2)
            .ok_or(format!("{flag} needs a descriptor number above 2"))
    };
    let program = loop {
        match args.next() {
            Some(a) if a == "--rw" => match args.next() {
                Some(dir) => writable.push(PathBuf::from(dir)),
                None => return Err("--rw needs a directory".into()),
            },
            Some(a) if a == "--cgroup-fd" => {
                cgroup_fd = Some(descriptor("--cgroup-fd", args.next())?);
            }
            Some(a) if a == "--wait-fd" => {
                let fd = descriptor("--wait-fd", args.next())?;
                if args.next().is_some() {
                    return Err("--wait-fd takes no program".into());
                }
                return Ok(Options {
                    writable,
                    cgroup_fd,
                    program: Program::Wait(fd),
                });
            }
            Some(a) if a == "--" => match args.next() {
                Some(p) => break p,
                None => return Err("no program after --".into()),
            },
            Some(a) => break a,
            None => return Err("no program given".into()),
        }
    };
    Ok(Options {
        writable,
        cgroup_fd,
        program: Program::Given {
            program,
            args: args.collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_name_the_writable_directories_then_the_agent() {
        let o = parse_args(os(&[
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
        assert_eq!(o.writable, vec![PathBuf::from("/s"), PathBuf::from("/t")]);
        assert_eq!(o.cgroup_fd, None);
        assert_eq!(
            o.program,
            Program::Given {
                program: "/bin/agent".into(),
                args: os(&["--rw", "x"])
            },
            "the agent's own arguments are its own"
        );
        let o = parse_args(os(&["/bin/agent"])).unwrap();
        assert!(o.writable.is_empty());
        assert!(matches!(o.program, Program::Given { program, .. } if program == "/bin/agent"));
        let o = parse_args(os(&["--cgroup-fd", "13", "--rw", "/s", "--wait-fd", "12"])).unwrap();
        assert_eq!(o.writable, vec![PathBuf::from("/s")]);
        assert_eq!((o.cgroup_fd, o.program), (Some(13), Program::Wait(12)));
        assert!(parse_args(os(&["--wait-fd", "1"])).is_err(), "not stdout");
        assert!(parse_args(os(&["--cgroup-fd", "2", "/bin/agent"])).is_err());
        assert!(parse_args(os(&["--wait-fd", "12", "/bin/agent"])).is_err());
        assert!(parse_args(os(&["--rw"])).is_err());
        assert!(parse_args(os(&["--"])).is_err());
        assert!(parse_args(os(&[])).is_err());
    }

    #[test]
    fn a_launch_comes_back_as_it_was_sent() {
        let env: std::collections::BTreeMap<String, String> = [
            ("A".to_owned(), "x=y".to_owned()),
            ("EMPTY".to_owned(), String::new()),
        ]
        .into();
        let args = vec![String::new(), "--flag".to_owned(), "two words".to_owned()];
        let bytes = encode_launch("/bin/agent", &args, &env).unwrap();
        let (program, got_args, got_env) = decode_launch(&bytes).unwrap();
        assert_eq!(program, "/bin/agent");
        assert_eq!(got_args, os(&["", "--flag", "two words"]));
        assert_eq!(
            got_env,
            vec![("A".into(), "x=y".into()), ("EMPTY".into(), "".into())]
        );
        let none: [(&String, &String); 0] = [];
        assert!(encode_launch("/bin/a\0b", &[], none).is_err());
        assert!(
            decode_launch(b"/bin/agent\x003\x00a\x00").is_err(),
            "arguments missing"
        );
        assert!(
            decode_launch(b"/bin/agent\x000\x00=x\x00").is_err(),
            "a nameless variable"
        );
        assert!(decode_launch(b"/bin/agent\x000").is_err(), "no end");
        assert!(decode_launch(b"").is_err());
    }
}
