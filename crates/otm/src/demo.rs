//! `otm demo`: an offline tour of otm on this machine.

use clap::Args;

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the temporary data directory instead of removing it at the end.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the tour.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("the demo is being written")
}
