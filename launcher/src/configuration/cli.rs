//! The command line: torchrun's flags, spelled as torchrun spells them.
//!
//! Every flag of `torch/distributed/run.py` is accepted with both `-` and `_` spellings, as
//! `--flag value` or `--flag=value`, and as an unambiguous prefix (argparse's rule). Each takes
//! its default from `PET_<NAME>` when not given (CLI beats env beats default). Everything after
//! the training script belongs to the script.
//!
//! `ferrun launch …` is the legacy `python -m torch.distributed.launch …`: the same flags plus
//! `--use-env`, and `--local-rank=<n>` appended to the script's arguments unless `--use-env`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::FalseyValueParser;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

/// How the launcher was invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `ferrun …`, the torchrun command line.
    Torchrun,
    /// `ferrun launch …`, the legacy `torch.distributed.launch` command line.
    LegacyLaunch,
}

/// torchrun's command line, plus ferrun's few additions (marked as such in their help).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ferrun",
    version,
    about = "Launch a distributed training job: a drop-in replacement for torchrun.",
    after_help = "Every option also reads PET_<OPTION> (e.g. PET_NPROC_PER_NODE) from the environment.\n\
                  `ferrun launch ...` behaves as the legacy `python -m torch.distributed.launch ...`.",
    infer_long_args = true,
    trailing_var_arg = true
)]
pub struct Args {
    /// Number of nodes, or the range of nodes in form <minimum_nodes>:<maximum_nodes>.
    #[arg(long, env = "PET_NNODES", default_value = "1:1")]
    pub nnodes: String,

    /// Number of workers per node: an integer, cpu, gpu or auto.
    #[arg(
        long = "nproc-per-node",
        alias = "nproc_per_node",
        env = "PET_NPROC_PER_NODE",
        default_value = "1"
    )]
    pub nproc_per_node: String,

    /// Rendezvous backend: static, c10d, etcd or etcd-v2.
    #[arg(
        long = "rdzv-backend",
        alias = "rdzv_backend",
        env = "PET_RDZV_BACKEND",
        default_value = "static"
    )]
    pub rdzv_backend: String,

    /// Rendezvous backend endpoint, usually in form <host>:<port>.
    #[arg(
        long = "rdzv-endpoint",
        alias = "rdzv_endpoint",
        env = "PET_RDZV_ENDPOINT",
        default_value = ""
    )]
    pub rdzv_endpoint: String,

    /// User-defined group id (the run id).
    #[arg(
        long = "rdzv-id",
        alias = "rdzv_id",
        env = "PET_RDZV_ID",
        default_value = "none"
    )]
    pub rdzv_id: String,

    /// Additional rendezvous configuration (<key1>=<value1>,<key2>=<value2>,...).
    #[arg(
        long = "rdzv-conf",
        alias = "rdzv_conf",
        env = "PET_RDZV_CONF",
        default_value = ""
    )]
    pub rdzv_conf: String,

    /// Single-node job on a free port with a fresh run id; ignores the rdzv flags.
    #[arg(long, env = "PET_STANDALONE", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub standalone: bool,

    /// Maximum number of worker group restarts before failing.
    #[arg(
        long = "max-restarts",
        alias = "max_restarts",
        env = "PET_MAX_RESTARTS",
        default_value_t = 0
    )]
    pub max_restarts: u32,

    /// Accepted for compatibility: ferrun reacts to worker exits as they happen, it does not poll.
    #[arg(
        long = "monitor-interval",
        alias = "monitor_interval",
        env = "PET_MONITOR_INTERVAL",
        default_value_t = 0.1
    )]
    pub monitor_interval: f64,

    /// Accepted for compatibility (only matters for function entrypoints).
    #[arg(long = "start-method", alias = "start_method", env = "PET_START_METHOD", default_value = "spawn",
          value_parser = ["spawn", "fork", "forkserver"])]
    pub start_method: String,

    /// Accepted for compatibility: name of a torchelastic event handler.
    #[arg(
        long = "event-log-handler",
        alias = "event_log_handler",
        env = "PET_EVENT_LOG_HANDLER",
        default_value = "null"
    )]
    pub event_log_handler: String,

    /// User-defined role for the workers.
    #[arg(long, env = "PET_ROLE", default_value = "default")]
    pub role: String,

    /// Run the training script as a Python module (python -m).
    #[arg(short = 'm', long, env = "PET_MODULE", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub module: bool,

    /// Run the training script directly instead of through Python.
    #[arg(long = "no-python", alias = "no_python", env = "PET_NO_PYTHON", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub no_python: bool,

    /// Run the training script with runpy.run_path in the same interpreter.
    #[arg(long = "run-path", alias = "run_path", env = "PET_RUN_PATH", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub run_path: bool,

    /// Base directory for log files (a fresh temporary directory when not given).
    #[arg(long = "log-dir", alias = "log_dir", env = "PET_LOG_DIR")]
    pub log_dir: Option<PathBuf>,

    /// Redirect std streams into log files: 0 none, 1 stdout, 2 stderr, 3 both; or per rank, e.g. 0:1,1:2.
    #[arg(short = 'r', long, env = "PET_REDIRECTS", default_value = "0")]
    pub redirects: String,

    /// Tee std streams into log files and the console (same syntax as --redirects).
    #[arg(short = 't', long, env = "PET_TEE", default_value = "0")]
    pub tee: String,

    /// Only show the console output of these local ranks, e.g. 0,2 (log files keep everything).
    #[arg(
        long = "local-ranks-filter",
        alias = "local_ranks_filter",
        env = "PET_LOCAL_RANKS_FILTER",
        default_value = ""
    )]
    pub local_ranks_filter: String,

    /// Rank of this node (static rendezvous).
    #[arg(
        long = "node-rank",
        alias = "node_rank",
        env = "PET_NODE_RANK",
        default_value_t = 0
    )]
    pub node_rank: u32,

    /// Address of the master node (static rendezvous); IPv6 as [::1].
    #[arg(
        long = "master-addr",
        alias = "master_addr",
        env = "PET_MASTER_ADDR",
        default_value = "127.0.0.1"
    )]
    pub master_addr: String,

    /// Port of the master node (static rendezvous; 29500 when given no port on several nodes).
    #[arg(long = "master-port", alias = "master_port", env = "PET_MASTER_PORT")]
    pub master_port: Option<u16>,

    /// Address this node advertises to the others.
    #[arg(long = "local-addr", alias = "local_addr", env = "PET_LOCAL_ADDR")]
    pub local_addr: Option<String>,

    /// Accepted for compatibility; ferrun writes torchrun's default log layout.
    #[arg(long = "logs-specs", alias = "logs_specs")]
    pub logs_specs: Option<String>,

    /// Accepted for compatibility; ferrun does not bind workers to NUMA nodes yet.
    #[arg(long = "numa-binding", alias = "numa_binding")]
    pub numa_binding: Option<String>,

    /// Signals forwarded to the workers, comma separated.
    #[arg(
        long = "signals-to-handle",
        alias = "signals_to_handle",
        env = "PET_SIGNALS_TO_HANDLE",
        default_value = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    )]
    pub signals_to_handle: String,

    /// Seconds a stopping worker gets between the stop signal and SIGKILL
    /// (default: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30).
    #[arg(
        long = "shutdown-timeout",
        alias = "shutdown_timeout",
        env = "PET_SHUTDOWN_TIMEOUT",
        allow_negative_numbers = true
    )]
    pub shutdown_timeout: Option<f64>,

    /// Copy console lines containing any of these comma-separated strings to
    /// attempt_<n>/filtered_stdout.log (",," escapes a comma).
    #[arg(
        long = "duplicate-stdout-filters",
        alias = "duplicate_stdout_filters",
        env = "PET_DUPLICATE_STDOUT_FILTERS",
        default_value = ""
    )]
    pub duplicate_stdout_filters: String,

    /// As --duplicate-stdout-filters, for stderr (attempt_<n>/filtered_stderr.log).
    #[arg(
        long = "duplicate-stderr-filters",
        alias = "duplicate_stderr_filters",
        env = "PET_DUPLICATE_STDERR_FILTERS",
        default_value = ""
    )]
    pub duplicate_stderr_filters: String,

    /// Give every worker LOCAL_RANK=0 and only its own GPU in CUDA_VISIBLE_DEVICES (ranks
    /// beyond the GPUs share them round-robin). [ferrun] Also spelled --pin-gpus.
    #[arg(long = "virtual-local-rank", alias = "virtual_local_rank", visible_alias = "pin-gpus", env = "PET_VIRTUAL_LOCAL_RANK",
          action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub virtual_local_rank: bool,

    /// [ferrun] Exit with the root-cause worker's exit code (128+N for signal N) instead of 1.
    #[arg(long = "propagate-exit-code", alias = "propagate_exit_code", env = "PET_PROPAGATE_EXIT_CODE",
          action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub propagate_exit_code: bool,

    /// [ferrun] Keep one pre-started Python per local worker with torch imported, so a restart
    /// skips `import torch` (costs one idle interpreter, ~0.3 GB of its own, per local worker).
    #[arg(long = "warm-start", alias = "warm_start", env = "PET_WARM_START", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub warm_start: bool,

    /// [ferrun] Modules the --warm-start interpreters import besides torch (comma-separated).
    #[arg(
        long = "warm-start-import",
        alias = "warm_start_import",
        env = "PET_WARM_START_IMPORT",
        default_value = ""
    )]
    pub warm_start_import: String,

    /// [ferrun] Let workers write straight to this terminal (torchrun's default) instead of prefixing each line.
    #[arg(long = "raw-output", alias = "raw_output", env = "PET_RAW_OUTPUT", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    pub raw_output: bool,

    /// (ferrun launch only) Read LOCAL_RANK from the environment instead of passing --local-rank.
    #[arg(long = "use-env", alias = "use_env", env = "PET_USE_ENV", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new(), hide = true)]
    pub use_env: bool,

    /// The training script (or module with -m, or program with --no-python), then its arguments.
    /// Arguments pass through as they are, UTF-8 or not.
    #[arg(value_name = "TRAINING_SCRIPT [ARGS]", required = true, num_args = 1.., trailing_var_arg = true, value_parser = clap::value_parser!(OsString))]
    pub script_and_args: Vec<OsString>,
}

impl Args {
    /// The training script (or module with -m, or program with --no-python).
    pub fn training_script(&self) -> String {
        self.script_and_args
            .first()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    }

    /// Everything after the training script: the script's own arguments.
    pub fn training_script_args(&self) -> &[OsString] {
        self.script_and_args.get(1..).unwrap_or_default()
    }
}

/// Boolean flags whose `PET_*` value must be an integer, as torchrun's `check_env` demands.
const BOOL_ENV_VARS: [&str; 8] = [
    "PET_STANDALONE",
    "PET_VIRTUAL_LOCAL_RANK",
    "PET_MODULE",
    "PET_NO_PYTHON",
    "PET_RUN_PATH",
    "PET_PROPAGATE_EXIT_CODE",
    "PET_RAW_OUTPUT",
    "PET_USE_ENV",
];

/// Parses a command line (`argv[0]` included).
///
/// # Errors
/// A clap error (unknown flag, bad value, missing script) ready for `Error::exit`, or a
/// `PET_*` boolean that is not an integer.
pub fn parse<I, T>(argv: I) -> Result<(Flavor, Args), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let flavor = if argv.get(1).is_some_and(|a| a == "launch") {
        argv.remove(1);
        Flavor::LegacyLaunch
    } else {
        Flavor::Torchrun
    };
    let mut command = Args::command();
    if flavor == Flavor::LegacyLaunch {
        command = command
            .name("ferrun launch")
            .about("The legacy `python -m torch.distributed.launch`: passes --local-rank=<n> to the script unless --use-env.")
            .mut_arg("use_env", |a| a.hide(false));
    }
    let matches = command.try_get_matches_from_mut(argv)?;
    let args = Args::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    if flavor == Flavor::Torchrun && args.use_env {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--use-env only applies to the legacy launcher: use `ferrun launch --use-env ...` (torchrun always passes LOCAL_RANK in the environment)",
        ));
    }
    for name in BOOL_ENV_VARS {
        if let Ok(value) = std::env::var(name) {
            if value.trim().parse::<i64>().is_err() {
                return Err(command.error(
                    clap::error::ErrorKind::ValueValidation,
                    format!("{name}={value:?} is not a boolean: use 1 (true) or 0 (false)"),
                ));
            }
        }
    }
    Ok((flavor, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(argv: &[&str]) -> (Flavor, Args) {
        match parse(argv) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{argv:?} rejected: {e}"),
        }
    }

    #[test]
    fn accepts_both_spellings_equals_and_prefixes() {
        let (_, a) = ok(&[
            "ferrun",
            "--nproc_per_node=3",
            "--max-restarts",
            "2",
            "train.py",
        ]);
        assert_eq!((a.nproc_per_node.as_str(), a.max_restarts), ("3", 2));
        let (_, a) = ok(&[
            "ferrun",
            "--nproc-per-node",
            "4",
            "--rdzv_id=abc",
            "train.py",
        ]);
        assert_eq!(
            (a.nproc_per_node.as_str(), a.rdzv_id.as_str()),
            ("4", "abc")
        );
        let (_, a) = ok(&["ferrun", "--nproc", "2", "--standa", "train.py"]);
        assert_eq!(a.nproc_per_node, "2");
        assert!(a.standalone);
    }

    #[test]
    fn everything_after_the_script_belongs_to_it() {
        let (_, a) = ok(&[
            "ferrun",
            "-m",
            "pkg.train",
            "--nproc-per-node",
            "9",
            "-x",
            "--lr=0.1",
        ]);
        assert!(a.module);
        assert_eq!(a.nproc_per_node, "1");
        assert_eq!(a.training_script(), "pkg.train");
        assert_eq!(
            a.training_script_args(),
            ["--nproc-per-node", "9", "-x", "--lr=0.1"]
        );
    }

    #[test]
    fn legacy_launch_takes_use_env() {
        let (flavor, a) = ok(&[
            "ferrun",
            "launch",
            "--use_env",
            "--nproc_per_node=2",
            "t.py",
            "a",
        ]);
        assert_eq!(flavor, Flavor::LegacyLaunch);
        assert!(a.use_env);
        let err = parse(["ferrun", "--use-env", "t.py"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ferrun launch --use-env"), "{err}");
    }

    #[test]
    fn unknown_flags_are_rejected_with_a_hint() {
        let err = parse(["ferrun", "--nproc-per-nod", "2", "--bogus", "t.py"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(err.to_string().contains("--bogus"), "{err}");
    }

    #[test]
    fn missing_script_is_an_error() {
        let err = parse(["ferrun", "--nproc-per-node", "2"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
