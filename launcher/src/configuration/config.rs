//! From command-line flags to a checked launch configuration.
//!
//! Everything a user can get wrong is checked here, before any process starts, and reported as
//! a [`ConfigError`] that names the flag and what it accepts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::configuration::cli::{Args, Flavor};
use crate::configuration::elastic_conf::{elastic_spec, standalone_spec};
use crate::configuration::entrypoint::{build_command, warm_modules};
use crate::configuration::flags::{
    check_rdzv_conf, comma_separated, parse_endpoint, parse_nnodes, parse_rdzv_conf, parse_signals,
    seconds,
};
use crate::configuration::nproc::{self, Devices, NprocError};
use crate::rendezvous::agent_store::StaticSpec;
use crate::rendezvous::elastic::ElasticSpec;
use crate::reports::logs::{parse_ranks_filter, LogSpecError, StdSpec};

/// A launch configuration that cannot work, said in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--nnodes` is not `N` or `MIN:MAX` with `0 < MIN <= MAX <= 65536`.
    #[error("--nnodes {0:?} is not valid: use N or MIN:MAX with 0 < MIN <= MAX <= 65536 (e.g. 2 or 1:4)")]
    Nnodes(String),
    /// A multi-node launch ferrun cannot do yet.
    #[error("--nnodes {nnodes} with {what}")]
    MultiNode {
        /// `--nnodes` as given.
        nnodes: String,
        /// What was asked for.
        what: String,
    },
    /// `--node-rank` does not fit `--nnodes`.
    #[error(
        "--node-rank {node_rank} is out of range: with --nnodes {nnodes} it must be below {nnodes}"
    )]
    NodeRank {
        /// The rank given.
        node_rank: u32,
        /// The number of nodes.
        nnodes: u32,
    },
    /// `--nproc-per-node` cannot be resolved.
    #[error(transparent)]
    Nproc(#[from] NprocError),
    /// `--redirects`, `--tee` or `--local-ranks-filter` is malformed.
    #[error(transparent)]
    LogSpec(#[from] LogSpecError),
    /// `--rdzv-backend` is not a known backend.
    #[error("--rdzv-backend {0:?} is not known: use static, c10d, etcd or etcd-v2")]
    Backend(String),
    /// `--rdzv-endpoint` does not parse.
    #[error("--rdzv-endpoint {0:?} is not valid: use host, host:port or [ipv6]:port")]
    Endpoint(String),
    /// `--rdzv-conf` does not parse.
    #[error("--rdzv-conf {0:?} is not valid: use key1=value1,key2=value2 with non-empty keys and values")]
    RdzvConf(String),
    /// A `--rdzv-conf` key or value that cannot work.
    #[error("{0}")]
    RdzvValue(String),
    /// `--signals-to-handle` names something that is not a signal.
    #[error("--signals-to-handle: {0:?} is not a signal name: use names like SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")]
    Signal(String),
    /// `--signals-to-handle` names a signal that cannot be forwarded.
    #[error("--signals-to-handle: {0} cannot be forwarded (it cannot be caught, or the launcher needs it: SIGCHLD, faults, job control); use any of SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGXCPU, SIGXFSZ")]
    Unhandleable(String),
    /// A timeout is negative or not a number.
    #[error("{0} is not valid: use a number of seconds >= 0")]
    ShutdownTimeout(String),
    /// Two flags that exclude each other.
    #[error("{0}")]
    Conflict(&'static str),
    /// `--warm-start` cannot work with this command line.
    #[error("--warm-start: {0}")]
    WarmStart(String),
    /// The training script is not there.
    #[error("training script {path:?} does not exist (relative to {cwd}); check the path, or pass -m for a module")]
    ScriptMissing {
        /// The path given.
        path: String,
        /// The working directory it was looked up in.
        cwd: String,
    },
    /// A program (`--no-python`, or the Python interpreter) is not on `PATH`.
    #[error("{what} {name:?} was not found: {hint}")]
    ProgramMissing {
        /// What was looked for.
        what: &'static str,
        /// The name looked for.
        name: String,
        /// How to fix it.
        hint: &'static str,
    },
}

/// How worker output is routed (see [`crate::reports::logs`]).
#[derive(Debug, Clone)]
pub struct OutputConfig {
    /// Streams that go to log files only.
    pub redirects: StdSpec,
    /// Streams that go to log files and the console.
    pub tee: StdSpec,
    /// Local ranks whose console output is shown (`None`: all).
    pub ranks_filter: Option<BTreeSet<u32>>,
    /// Lines of stdout containing one of these are copied to `filtered_stdout.log`.
    pub stdout_filters: Vec<String>,
    /// Lines of stderr containing one of these are copied to `filtered_stderr.log`.
    pub stderr_filters: Vec<String>,
    /// Workers inherit the terminal (torchrun's default) instead of having their lines prefixed.
    pub raw: bool,
    /// `TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`, when set.
    pub prefix_template: Option<String>,
}

/// A checked launch: what to run, how many times, and where its output goes.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Workers on this node.
    pub local_world_size: u32,
    /// How `--nproc-per-node` was resolved, for the log.
    pub nproc_note: String,
    /// `--role`.
    pub role: String,
    /// The run id (a fresh uuid for standalone runs).
    pub run_id: String,
    /// `--max-restarts`.
    pub max_restarts: u32,
    /// Several nodes: the static rendezvous; `None` for a single node.
    pub nodes: Option<StaticSpec>,
    /// Several nodes: the elastic rendezvous (`--nnodes MIN:MAX`, c10d).
    pub elastic: Option<ElasticSpec>,
    /// `--local-addr`.
    pub local_addr: Option<String>,
    /// `MASTER_ADDR` for the workers.
    pub master_addr: String,
    /// `MASTER_PORT` for the workers (the agent store's port); `None`: a free port.
    pub master_port: Option<u16>,
    /// The worker command: program then arguments, `${local_rank}` still unexpanded.
    pub command: Vec<std::ffi::OsString>,
    /// `--warm-start`: the modules each pre-started interpreter imports (torch first).
    pub warm_start: Option<Vec<String>>,
    /// The script's name, for the failure report's title.
    pub script_name: String,
    /// Output routing.
    pub output: OutputConfig,
    /// `--log-dir`.
    pub log_dir: Option<PathBuf>,
    /// Signals forwarded to the workers.
    pub signals: Vec<Signal>,
    /// Grace between the stop signal and SIGKILL.
    pub shutdown_timeout: Duration,
    /// Exit with the root cause's code instead of 1.
    pub propagate_exit_code: bool,
    /// `--virtual-local-rank`.
    pub virtual_local_rank: bool,
    /// `OMP_NUM_THREADS` was unset and nproc > 1, so the launcher sets it to 1 (with a warning).
    pub set_omp_num_threads: bool,
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING`: inherited, or "1".
    pub nccl_async_error_handling: String,
    /// GPUs this node has (for pinning and the start-up report).
    pub gpus: u32,
    /// Where the GPU count came from.
    pub gpu_source: String,
}

/// What the configuration reads from the launcher's environment (a seam for tests).
pub trait Environment {
    /// A variable's value.
    fn var(&self, name: &str) -> Option<String>;
    /// Finds an executable on `PATH`.
    fn which(&self, program: &str) -> Option<PathBuf>;
    /// The working directory.
    fn cwd(&self) -> PathBuf;
    /// This machine's GPUs and CPUs.
    fn devices(&self) -> Devices;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn which(&self, program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| is_executable(p))
    }
    fn cwd(&self) -> PathBuf {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    }
    fn devices(&self) -> Devices {
        Devices::probe()
    }
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl LaunchConfig {
    /// Checks `args` and resolves every default.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn from_args(
        flavor: Flavor,
        args: &Args,
        env: &dyn Environment,
    ) -> Result<Self, ConfigError> {
        let (min_nodes, max_nodes) = parse_nnodes(&args.nnodes)?;
        let multi_node = |what: String| ConfigError::MultiNode {
            nnodes: args.nnodes.clone(),
            what,
        };
        if max_nodes > 1 && args.standalone {
            return Err(multi_node("--standalone (a single-node mode)".into()));
        }
        if args.node_rank >= max_nodes {
            return Err(ConfigError::NodeRank {
                node_rank: args.node_rank,
                nnodes: max_nodes,
            });
        }
        if !["static", "c10d", "etcd", "etcd-v2"].contains(&args.rdzv_backend.as_str()) {
            return Err(ConfigError::Backend(args.rdzv_backend.clone()));
        }
        let rdzv_conf = parse_rdzv_conf(&args.rdzv_conf)?;
        let devices = env.devices();
        let (local_world_size, nproc_note) =
            nproc::resolve(&args.nproc_per_node, || devices.clone())?;

        // torch 2.13 (run.py `run`): --standalone, and a single-node static launch given neither
        // an endpoint nor a master port, get a local store on a free port and a fresh run id.
        let standalone = args.standalone
            || (max_nodes == 1
                && args.rdzv_backend == "static"
                && args.rdzv_endpoint.is_empty()
                && args.master_port.is_none());
        let (master_addr, master_port, run_id) = if standalone {
            (
                "localhost".to_owned(),
                None,
                uuid::Uuid::new_v4().to_string(),
            )
        } else if args.rdzv_backend == "static" {
            let (addr, port) = if args.rdzv_endpoint.is_empty() {
                (args.master_addr.clone(), args.master_port.unwrap_or(29500))
            } else {
                let (host, port) = parse_endpoint(&args.rdzv_endpoint)?;
                (host, port.unwrap_or(29500))
            };
            (addr, Some(port), args.rdzv_id.clone())
        } else {
            if args.rdzv_backend == "c10d" {
                parse_endpoint(&args.rdzv_endpoint)?;
            }
            let addr = args
                .local_addr
                .clone()
                .unwrap_or_else(|| "localhost".to_owned());
            (addr, None, args.rdzv_id.clone())
        };

        // Every key and value is checked, on one node too, so a typo never passes silently.
        let conf = |key: &str| {
            rdzv_conf
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        check_rdzv_conf(&rdzv_conf)?;
        let join_timeout = match conf("join_timeout").or(conf("timeout")) {
            Some(v) => seconds("--rdzv-conf join_timeout", v)?,
            None => Duration::from_secs(600),
        };
        let exit_timeout = match conf("exit_barrier_timeout") {
            Some(v) => seconds("--rdzv-conf exit_barrier_timeout", v)?,
            None => Duration::from_secs(300),
        };
        let elastic = if args.standalone {
            Some(standalone_spec(&rdzv_conf, &run_id, local_world_size)?)
        } else {
            elastic_spec(
                args,
                &rdzv_conf,
                (min_nodes, max_nodes),
                local_world_size,
                env,
            )?
        };
        let nodes = if max_nodes > 1 && elastic.is_none() {
            Some(StaticSpec {
                nnodes: max_nodes,
                node_rank: args.node_rank,
                master_addr: master_addr.clone(),
                master_port: master_port.unwrap_or(29500),
                run_id: run_id.clone(),
                local_world_size,
                join_timeout,
                exit_timeout,
            })
        } else {
            None
        };
        let (command, script_name) = build_command(flavor, args, env)?;
        let warm_start = warm_modules(args)?;
        let output = OutputConfig {
            redirects: StdSpec::parse("--redirects", &args.redirects)?,
            tee: StdSpec::parse("--tee", &args.tee)?,
            ranks_filter: parse_ranks_filter(&args.local_ranks_filter)?,
            stdout_filters: comma_separated(&args.duplicate_stdout_filters),
            stderr_filters: comma_separated(&args.duplicate_stderr_filters),
            raw: args.raw_output,
            prefix_template: env.var("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        };
        let shutdown_timeout = match (
            args.shutdown_timeout,
            env.var("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"),
        ) {
            (Some(secs), _) => seconds("--shutdown-timeout", &secs.to_string())?,
            (None, Some(v)) => seconds("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", &v)?,
            (None, None) => Duration::from_secs(30),
        };
        Ok(Self {
            local_world_size,
            nproc_note,
            role: args.role.clone(),
            run_id,
            max_restarts: args.max_restarts,
            nodes,
            elastic,
            local_addr: args.local_addr.clone(),
            master_addr,
            master_port,
            command,
            warm_start,
            script_name,
            output,
            log_dir: args.log_dir.clone(),
            signals: parse_signals(&args.signals_to_handle)?,
            shutdown_timeout,
            propagate_exit_code: args.propagate_exit_code,
            virtual_local_rank: args.virtual_local_rank,
            set_omp_num_threads: env.var("OMP_NUM_THREADS").is_none() && local_world_size > 1,
            nccl_async_error_handling: env
                .var("TORCH_NCCL_ASYNC_ERROR_HANDLING")
                .unwrap_or_else(|| "1".to_owned()),
            gpus: devices.gpus,
            gpu_source: devices.gpu_source,
        })
    }
}

#[cfg(test)]
mod tests;
