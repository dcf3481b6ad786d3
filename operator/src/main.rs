//! `ferrun-operator`: the PyTorchJob CRD, a job's rendered objects, and local runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrun_operator::crd::PyTorchJob;
use ferrun_operator::lifecycle::Verdict;
use ferrun_operator::local::{self, LocalOptions};
use ferrun_operator::render::{self, MasterWait, RenderOptions};
use kube::CustomResourceExt;

#[derive(Debug, Parser)]
#[command(
    name = "ferrun-operator",
    about = "Kubeflow PyTorchJobs (kubeflow.org/v1), run by ferrun"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the PyTorchJob CustomResourceDefinition (YAML), to `kubectl apply -f -`.
    Crd,
    /// Prints the pods and services a job becomes (YAML), as the operator would create them.
    Render {
        /// The PyTorchJob (YAML or JSON).
        job: PathBuf,
        /// How workers wait for the master.
        #[arg(long, value_enum, default_value_t = MasterWait::Auto)]
        master_wait: MasterWait,
    },
    /// Runs a job on this machine, each replica as a local process; exits 0 when it succeeds,
    /// 1 when it fails.
    Local {
        /// The PyTorchJob (YAML or JSON).
        job: PathBuf,
        /// Fail the job after this many seconds (besides its activeDeadlineSeconds).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

fn read_job(path: &PathBuf) -> anyhow::Result<PyTorchJob> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    ferrun_operator::load_job(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrun-operator: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd => print!("{}", serde_yaml::to_string(&PyTorchJob::crd())?),
        Command::Render { job, master_wait } => {
            let job = read_job(&job)?;
            let options = RenderOptions {
                master_wait,
                ..RenderOptions::default()
            };
            for (rtype, index) in render::replicas(&job) {
                print!(
                    "---\n{}",
                    serde_yaml::to_string(&render::pod(&job, &rtype, index, &options))?
                );
                print!(
                    "---\n{}",
                    serde_yaml::to_string(&render::service(&job, &rtype, index))?
                );
            }
        }
        Command::Local { job, timeout } => {
            let job = read_job(&job)?;
            let options = LocalOptions {
                timeout: timeout.map(Duration::from_secs),
                render: RenderOptions::default(),
            };
            let outcome = local::run(&job, &options)?;
            return Ok(match outcome.verdict {
                Verdict::Succeeded => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
