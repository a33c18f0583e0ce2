//! `otm-reference-agent`: the reference agent as a process, as `otm shim` starts it. Everything
//! lives in the `otm-reference-agent` crate.

fn main() -> std::process::ExitCode {
    otm_reference_agent::main_from_env()
}
