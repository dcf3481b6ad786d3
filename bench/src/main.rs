//! `ferrun-bench`: benchmarks that put ferrun beside its peers in one invocation.
//!
//! `ferrun-bench launcher` times torchrun and ferrun on the same jobs, interleaved, and prints
//! min/median and the ratios. Collective benchmarks join as further subcommands.

mod launcher;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferrun-bench",
    about = "Benchmarks that put ferrun beside torchrun, Gloo and OpenMPI in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Launcher cost: a no-op job start to exit, and worker failure to restarted group running.
    Launcher(launcher::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Launcher(options) => launcher::run(&options),
    }
}
