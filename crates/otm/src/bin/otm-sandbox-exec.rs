//! `otm-sandbox-exec [OPTIONS] -- PROGRAM [ARGS…]`: the first process of every local instance,
//! as a small binary of its own so that a cold start does not load the whole `otm` once more
//! (`otm sandbox-exec` does the same). It joins the instance's cgroups, starts a new session,
//! sets resource limits, closes stray descriptors, drops to the instance's uid and executes the
//! instance.

fn main() -> std::process::ExitCode {
    match otm_runtime::exec::parse_args(std::env::args_os().skip(1)) {
        Ok(plan) => {
            let e = otm_runtime::exec::run(plan);
            eprintln!("otm-sandbox-exec: {e}");
            std::process::ExitCode::from(126)
        }
        Err(e) => {
            eprintln!(
                "otm-sandbox-exec: {e}\nusage: otm-sandbox-exec [--cgroup-procs FILE]... [--uid N] [--gid N] \
                 [--nofile N] [--fsize BYTES] [--keep-fd FD]... -- PROGRAM [ARGS...]"
            );
            std::process::ExitCode::from(2)
        }
    }
}
