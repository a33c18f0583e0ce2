//! `otm-sandbox-init [--cgroup-fd N] [--rw DIR]… (--wait-fd N | -- PROGRAM [ARGS…])`: process 1 of an agent sandbox, as a small binary of
//! its own so that every agent start does not load the whole `otm` (`otm sandbox-init` does the
//! same). It applies the sandbox's Landlock rules (writes only below each `--rw DIR`), starts the
//! agent, passes termination signals on to it, reaps orphans, and exits with the agent's status.

fn main() -> std::process::ExitCode {
    match otm_shim::sandbox::init::parse_args(std::env::args_os().skip(1)) {
        Ok(o) => {
            let code = otm_shim::sandbox::init::run(o.program, &o.writable, o.cgroup_fd);
            std::process::ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!(
                "otm-sandbox-init: {e}\nusage: otm-sandbox-init [--cgroup-fd N] [--rw DIR]... (--wait-fd N | -- PROGRAM [ARGS...])"
            );
            std::process::ExitCode::from(2)
        }
    }
}
