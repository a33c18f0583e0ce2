//! `otm-sandbox-init -- PROGRAM [ARGS…]`: process 1 of an agent sandbox, as a small binary of
//! its own so that every agent start does not load the whole `otm` (`otm sandbox-init` does the
//! same). It starts the agent, passes termination signals on to it, reaps orphans, and exits
//! with the agent's status.

fn main() -> std::process::ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    let Some(program) = args.first().cloned() else {
        eprintln!("usage: otm-sandbox-init -- PROGRAM [ARGS…]");
        return std::process::ExitCode::from(2);
    };
    let code = otm_shim::sandbox::init::run(&program, &args[1..]);
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}
