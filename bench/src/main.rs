//! `ferrun-bench`: benchmarks that put ferrun beside its peers in one invocation.
//!
//! `ferrun-bench launcher` times torchrun and ferrun on the same jobs, interleaved, and prints
//! min/median and the ratios; `ferrun-bench store` loads ferrun's store server and torch's
//! TCPStore server with the same clients; `collective` and `compare` measure the collectives;
//! `zero` measures ZeRO's stages beside torch's sharding.

mod alloc;
mod collective;
mod collective_gpu;
mod compare;
mod gpu_check;
mod gpu_check_cuda;
mod launcher;
mod link;
mod lost_node;
mod peers;
mod plot;
mod rendezvous;
mod restart;
mod stats;
mod store;
mod torch;
mod trainer;
mod trainer_hosts;
mod zero;

/// Counts what this process allocates (`ferrun-bench zero` measures memory with it).
#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

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
    /// The agent store under load: ferrun's server beside torch's TCPStore server.
    Store(store::Options),
    /// A host cut off mid-training: torchrun beside ferrun, the survivors' new round.
    LostNode(lost_node::Options),
    /// torch workers restarted after a failure: torchrun, ferrun cold and ferrun --warm-start.
    Restart(restart::Options),
    /// The elastic rendezvous: 1,000 and 10,000 agents joining one round; a lost node.
    Rendezvous(rendezvous::Options),
    /// A collective across the ranks ferrun launched, nccl-tests style (run it under ferrun).
    Collective(collective::Options),
    /// A collective beside Gloo (and OpenMPI where installed) in one invocation, with ratios.
    Compare(compare::Options),
    /// Every collective in every dtype against expected values, on GPU (or CPU) buffers
    /// (run it under ferrun; bench/gpu-check.sh runs it on a GPU machine).
    GpuCheck(gpu_check::Options),
    /// One end of the raw TCP link test between `compare --two-hosts`'s hosts.
    #[command(hide = true)]
    Link(link::Options),
    /// torch.distributed on gloo and on ferrun (`import ferrun.torch`), through torch's API.
    Torch(torch::Options),
    /// ferrun-train's samples/s (DDP, overlap, ZeRO) beside torch DDP over Gloo under torchrun.
    Trainer(trainer::Options),
    /// ZeRO stages 0–3: per-rank memory and step time, beside the formulas and torch's sharding.
    Zero(zero::Options),
    /// One rank of `zero` (run under ferrun).
    #[command(hide = true)]
    ZeroWorker(zero::WorkerOptions),
    /// Hosts a ferrun store server until stdin closes (the bench runs it as a peer process).
    #[command(hide = true)]
    StoreServer,
    /// One process of `store`'s clients (the bench starts them).
    #[command(hide = true)]
    StoreClients(store::ClientOptions),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Launcher(options) => launcher::run(&options),
        Command::Rendezvous(options) => rendezvous::run(&options),
        Command::Restart(options) => restart::run(&options),
        Command::LostNode(options) => lost_node::run(&options),
        Command::Store(options) => store::run(&options),
        Command::Collective(options) => collective::run(&options),
        Command::Compare(options) => compare::run(&options),
        Command::GpuCheck(options) => gpu_check::run(&options),
        Command::Link(options) => link::run(&options),
        Command::StoreServer => store::serve(),
        Command::StoreClients(options) => store::serve_clients(&options),
        Command::Torch(options) => torch::run(&options),
        Command::Trainer(options) => trainer::run(&options),
        Command::Zero(options) => zero::run(&options),
        Command::ZeroWorker(options) => zero::worker(&options),
    }
}
