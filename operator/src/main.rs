//! `ferrun-operator`: the PyTorchJob CRD, a job's rendered objects, and local runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ferrun_operator::controller::lease::LeaseLock;
use ferrun_operator::controller::plan::PlanOptions;
use ferrun_operator::controller::{self, http, Context, Metrics};
use ferrun_operator::crd::PyTorchJob;
use ferrun_operator::lifecycle::Verdict;
use ferrun_operator::local::{self, LocalOptions};
use ferrun_operator::names;
use ferrun_operator::render::{self, MasterWait, RenderOptions};
use ferrun_operator::trainjob::{self, crd::TrainJob, crd::TrainingRuntime};
use k8s_openapi::jiff::Timestamp;
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
    /// Prints the pods and services a job becomes (YAML): a PyTorchJob's as the operator
    /// creates them, a TrainJob's as Kubeflow Trainer v2 (through JobSet) would.
    Render {
        /// The PyTorchJob or TrainJob (YAML or JSON).
        job: PathBuf,
        /// A TrainJob's (Cluster)TrainingRuntime(s), when not the built-in torch-distributed.
        #[arg(long)]
        runtime: Vec<PathBuf>,
        /// How workers wait for the master (PyTorchJobs): auto, nslookup or none.
        #[arg(long, default_value = "auto")]
        master_wait: MasterWait,
    },
    /// Runs the controller in a cluster (in-cluster service account, or ~/.kube/config).
    Run(RunOptions),
    /// Runs a job on this machine, each replica as a local process; exits 0 when it succeeds,
    /// 1 when it fails.
    Local {
        /// The PyTorchJob or TrainJob (YAML or JSON).
        job: PathBuf,
        /// Fail the job after this many seconds (besides its activeDeadlineSeconds).
        #[arg(long)]
        timeout: Option<u64>,
        /// A TrainJob's (Cluster)TrainingRuntime(s), when not the built-in torch-distributed.
        #[arg(long)]
        runtime: Vec<PathBuf>,
        /// A TrainJob's master port instead of Trainer's 29500 (0: a free one).
        #[arg(long)]
        master_port: Option<u16>,
    },
}

/// Flags of `ferrun-operator run` (the training-operator's where it has them).
#[derive(Debug, clap::Args)]
struct RunOptions {
    /// Watch only this namespace (default: all).
    #[arg(long)]
    namespace: Option<String>,
    /// Reconciles at once (the training-operator's --controller-threads, whose default is 1).
    #[arg(long, default_value_t = 4)]
    controller_threads: u16,
    /// Take a Lease before reconciling, so that only one of several replicas works.
    #[arg(long)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, default_value = "ferrun-operator")]
    lease_name: String,
    /// The Lease's namespace (default: $POD_NAMESPACE, else `default`).
    #[arg(long)]
    lease_namespace: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Gang scheduling: `volcano`, or the name of a scheduler-plugins (coscheduling) scheduler;
    /// empty for none.
    #[arg(long, default_value = "")]
    gang_scheduler_name: String,
    /// Seconds a pod may stay terminating before it is force-deleted (its node is likely gone).
    #[arg(long, default_value_t = 300)]
    terminating_grace: u64,
    /// How workers wait for the master: auto, nslookup or none.
    #[arg(long, default_value = "auto")]
    master_wait: MasterWait,
    /// Image of the nslookup init container (--master-wait nslookup, or torchrun containers).
    #[arg(long, default_value = "alpine:3.10")]
    pytorch_init_container_image: String,
    /// Its tries, two seconds apart.
    #[arg(long, default_value_t = 100)]
    pytorch_init_container_max_tries: u32,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// A job file: a PyTorchJob or a TrainJob with its runtime.
enum Job {
    PyTorch(Box<PyTorchJob>),
    Train(Box<(TrainJob, TrainingRuntime)>),
}

fn read_job(path: &Path, runtimes: &[PathBuf]) -> anyhow::Result<Job> {
    let text = read(path)?;
    let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    if ferrun_operator::kind_of(&text)
        .map_err(|e| at(&e))?
        .as_deref()
        != Some("TrainJob")
    {
        if !runtimes.is_empty() {
            anyhow::bail!(
                "{}: --runtime is for TrainJobs; this file is not one",
                path.display()
            );
        }
        let job = ferrun_operator::load_job(&text).map_err(|e| at(&e))?;
        return Ok(Job::PyTorch(Box::new(job)));
    }
    let job = trainjob::load_trainjob(&text).map_err(|e| at(&e))?;
    let mut given = Vec::new();
    for file in runtimes {
        let text = read(file)?;
        given.extend(
            trainjob::load_runtimes(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
        );
    }
    let runtime = trainjob::runtime::resolve(&job, &given).map_err(|e| at(&e))?;
    trainjob::validate(&job, &runtime).map_err(|e| at(&e))?;
    Ok(Job::Train(Box::new((job, runtime))))
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
        Command::Crd => emit(&serde_yaml::to_string(&PyTorchJob::crd())?)?,
        Command::Render {
            job,
            runtime,
            master_wait,
        } => match read_job(&job, &runtime)? {
            Job::PyTorch(job) => {
                let options = RenderOptions {
                    master_wait,
                    ..RenderOptions::default()
                };
                let mut out = String::new();
                for (rtype, index) in names::replicas(&job) {
                    let pod = render::pod(&job, &rtype, index, &options);
                    out += &format!("---\n{}", serde_yaml::to_string(&pod)?);
                    let service = render::service(&job, &rtype, index);
                    out += &format!("---\n{}", serde_yaml::to_string(&service)?);
                }
                emit(&out)?;
            }
            Job::Train(train) => {
                let (job, runtime) = *train;
                let mut out = String::new();
                for pod in trainjob::render::pods(&job, &runtime) {
                    out += &format!("---\n{}", serde_yaml::to_string(&pod.pod)?);
                }
                let service = trainjob::render::service(&job);
                out += &format!("---\n{}", serde_yaml::to_string(&service)?);
                emit(&out)?;
            }
        },
        Command::Run(options) => {
            tokio::runtime::Runtime::new()?.block_on(serve(options))?;
        }
        Command::Local {
            job,
            timeout,
            runtime,
            master_port,
        } => {
            let timeout = timeout.map(Duration::from_secs);
            return match read_job(&job, &runtime)? {
                Job::PyTorch(job) => {
                    let options = LocalOptions {
                        timeout,
                        render: RenderOptions::default(),
                        forward_signals: true,
                    };
                    let outcome = local::run(&job, &options)?;
                    Ok(match (outcome.verdict, outcome.interrupted) {
                        (_, Some(signal)) => ExitCode::from(128 + signal as u8),
                        (Verdict::Succeeded, _) => ExitCode::SUCCESS,
                        _ => ExitCode::from(1),
                    })
                }
                Job::Train(train) => {
                    let (job, runtime) = *train;
                    let options = trainjob::local::RunOptions {
                        timeout,
                        master_port: master_port.map(free_port).transpose()?,
                        forward_signals: true,
                    };
                    let outcome = trainjob::local::run(&job, &runtime, &options)?;
                    Ok(match outcome.interrupted {
                        Some(signal) => ExitCode::from(128 + signal as u8),
                        None if outcome.succeeded() => ExitCode::SUCCESS,
                        None => ExitCode::from(1),
                    })
                }
            };
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to standard output; a reader that stopped early (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `port`, or for 0 one free on this machine now.
fn free_port(port: u16) -> anyhow::Result<u16> {
    if port != 0 {
        return Ok(port);
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The controller, with its endpoints and, if asked, leader election.
async fn serve(o: RunOptions) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let client = kube::Client::try_default().await.context(
        "no Kubernetes configuration (an in-cluster service account, or ~/.kube/config)",
    )?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(!o.leader_elect));
    let listener = tokio::net::TcpListener::bind(o.metrics_addr)
        .await
        .with_context(|| format!("serve metrics on {}", o.metrics_addr))?;
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&ready),
    ));
    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
        .unwrap_or_else(|| "ferrun-operator".into());
    if o.leader_elect {
        let namespace = o
            .lease_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let lock = LeaseLock::new(
            kube::Api::namespaced(client.clone(), &namespace),
            &o.lease_name,
            &identity,
            Duration::from_secs(15),
        );
        tracing::info!(
            "waiting for lease {namespace}/{} as {identity}",
            o.lease_name
        );
        while !lock.try_acquire(Timestamp::now()).await? {
            tokio::time::sleep(lock.renew_every()).await;
        }
        tracing::info!("leading as {identity}");
        ready.store(true, Ordering::Relaxed);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lock.renew_every()).await;
                if !lock.try_acquire(Timestamp::now()).await.unwrap_or(false) {
                    // Another replica may lead now: stop at once rather than reconcile beside it.
                    tracing::error!("lost lease {}; exiting", o.lease_name);
                    std::process::exit(1);
                }
            }
        });
    }
    let options = PlanOptions {
        render: RenderOptions {
            gang: ferrun_operator::scheduling::Gang::from_flag(&o.gang_scheduler_name),
            master_wait: o.master_wait,
            init_image: o.pytorch_init_container_image,
            init_max_tries: o.pytorch_init_container_max_tries,
        },
        terminating_grace: Duration::from_secs(o.terminating_grace),
    };
    let ctx = Arc::new(Context::new(client, options, Some(identity), metrics));
    Ok(controller::run(ctx, o.namespace.as_deref(), o.controller_threads).await?)
}
