//! `otm-shim [OPTIONS]`: the supervisor inside every instance, as a small binary of its own so
//! that every awake instance does not hold the whole `otm` (`otm shim` takes the same arguments,
//! and becomes `otm-shim` when it is installed beside it). Everything lives in the `otm-shim`
//! crate ([`otm_shim::cli`]).

use clap::Parser;

/// Run inside an instance: supervise one agent (started by the runtime, not by hand).
#[derive(Parser, Debug)]
#[command(name = "otm-shim", version)]
struct Cli {
    #[command(flatten)]
    args: otm_shim::cli::ShimArgs,
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse().args;
    // `otm` beside this binary runs `otm sandbox-init` when `otm-sandbox-init` is missing.
    let otm = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("otm"),
        Err(e) => {
            eprintln!("otm-shim: finding its own binary: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    otm_shim::cli::main("otm-shim", args, otm)
}
