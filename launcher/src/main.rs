//! The `ferrun` binary: parse, check, run, report.
//!
//! Exit codes: 0 success; 1 worker failure, launcher error or signal (as torchrun), or with
//! `--propagate-exit-code` the root-cause worker's code (128+N for signal N); 2 bad usage.

use std::process::ExitCode;

use anyhow::Context;
use ferrun_collective::store::server as store;
use ferrun_launcher::configuration::config::{LaunchConfig, ProcessEnvironment};
use ferrun_launcher::configuration::serve::{ServeArgs, ServeConfig};
use ferrun_launcher::configuration::{cli, gpu_env};
use ferrun_launcher::rendezvous::service::RendezvousService;
use ferrun_launcher::reports::{error_file, report};
use ferrun_launcher::supervision::agent::{self, Outcome};
use ferrun_launcher::supervision::descendants;
use ferrun_launcher::supervision::keeper::Keeper;

/// Exit code for a command line or configuration that cannot work (argparse's code).
const USAGE: u8 = 2;

/// Writes to stderr, ignoring a closed one: a reader that went away (`| head`) must never
/// stop the launcher from supervising or turn a success into a crash.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "rendezvous") {
        return serve_rendezvous(&argv);
    }
    let (flavor, args) = match cli::parse(argv) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    init_tracing();
    let config = match LaunchConfig::from_args(flavor, &args, &ProcessEnvironment) {
        Ok(config) => config,
        Err(e) => {
            say!("ferrun: error: {e}\n");
            return ExitCode::from(USAGE);
        }
    };
    // A store serves a connection per worker and agent.
    store::raise_fd_limit();
    // Before any thread: the keeper is forked.
    let mut keeper = match Keeper::start(descendants::mark_value()) {
        Ok(keeper) => Some(keeper),
        Err(e) => {
            tracing::warn!(
                "cannot start the keeper (what workers start may outlive a killed launcher): {e}"
            );
            None
        }
    };
    let code = match run(&config) {
        Ok(code) => code,
        Err(e) => {
            say!("ferrun: error: {e:#}\n");
            if e.downcast_ref::<agent::AgentError>()
                .is_some_and(|e| matches!(e, agent::AgentError::Logs(_)))
            {
                USAGE
            } else {
                1
            }
        }
    };
    if let Some(keeper) = keeper.as_mut() {
        keeper.disarm();
    }
    ExitCode::from(code)
}

/// `ferrun rendezvous serve …`: serves until SIGINT or SIGTERM.
fn serve_rendezvous(argv: &[std::ffi::OsString]) -> ExitCode {
    use clap::Parser as _;
    let rest = argv.iter().skip(2);
    let args = match argv.get(2).map(|a| a == "serve") {
        Some(true) => ServeArgs::try_parse_from(std::iter::once(&argv[0]).chain(rest.skip(1))),
        _ => {
            say!("ferrun: usage: ferrun rendezvous serve --nnodes MIN:MAX [--host H] [--port P] [--rdzv-conf k=v,...]\n");
            return ExitCode::from(USAGE);
        }
    };
    let args = match args {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_tracing();
    let config = match ServeConfig::from_args(&args, &ProcessEnvironment) {
        Ok(config) => config,
        Err(e) => {
            say!("ferrun: error: {e}\n");
            return ExitCode::from(USAGE);
        }
    };
    let has_token = config.token.is_some();
    let served = || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async {
            let listener = std::net::TcpListener::bind(config.listen)
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let service = RendezvousService::serve(
                listener,
                config.settings,
                config.token,
                config.tls.as_ref(),
            )?;
            say!(
                "serving the rendezvous for --nnodes {}:{} on {} (agents' heartbeats every {:?}, {} token)\n",
                config.settings.min_nodes,
                config.settings.max_nodes,
                service.local_addr(),
                config.keep_alive,
                if has_token { "with a" } else { "no" }
            );
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            drop(service);
            Ok(())
        })
    };
    match served() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("ferrun: error: {e:#}\n");
            ExitCode::from(1)
        }
    }
}

fn run(config: &LaunchConfig) -> anyhow::Result<u8> {
    if config.set_omp_num_threads {
        tracing::warn!(
            "\n*****************************************\n\
             Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your \
             system being overloaded, please further tune the variable for optimal performance in your application as needed.\n\
             *****************************************"
        );
    }
    tracing::info!(
        "starting {} worker(s) [nproc-per-node {}], run id {}",
        config.local_world_size,
        config.nproc_note,
        config.run_id
    );
    let setup = gpu_env::GpuSetup {
        gpus: config.gpus,
        gpu_source: &config.gpu_source,
        local_world_size: config.local_world_size,
        pinned: config.virtual_local_rank,
        async_error_handling: &config.nccl_async_error_handling,
    };
    let environment: Vec<(String, String)> = std::env::vars().collect();
    for line in gpu_env::report(&setup, &environment) {
        tracing::info!("{line}");
    }
    // Workers are spawned from this (the main) thread: PR_SET_PDEATHSIG follows the spawning thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = std::time::Instant::now();
    let result = runtime.block_on(agent::run(config));
    ferrun_launcher::reports::output::flush_console(std::time::Duration::from_secs(2));
    let result = result?;
    let host = nix::unistd::gethostname()
        .map_or_else(|_| "localhost".into(), |h| h.to_string_lossy().into_owned());
    say!("{}", report::summary_table(&result.rows, started.elapsed()));
    say!("logs: {}\n", result.log_dir.display());
    Ok(match result.outcome {
        Outcome::Succeeded => 0,
        Outcome::Failed(failures) => {
            say!(
                "{}",
                report::failure_report(&config.script_name, &host, &failures)
            );
            let root = report::root_cause(&failures).context("a failed run has a root cause")?;
            if let Ok(target) = std::env::var("TORCHELASTIC_ERROR_FILE") {
                let message = format!(
                    "{} failed: rank {} exited with {}",
                    config.script_name,
                    root.rank,
                    root.shell_code()
                );
                if let Err(e) = error_file::write_for_scheduler(
                    target.as_ref(),
                    root.error_file.as_deref(),
                    &message,
                    root.shell_code(),
                ) {
                    tracing::warn!("cannot write the launcher's error file {target}: {e}");
                }
            }
            if config.propagate_exit_code {
                u8::try_from(root.shell_code()).unwrap_or(1).max(1)
            } else {
                1
            }
        }
        Outcome::FailedElsewhere(summary) => {
            say!("ferrun: the job failed on another node: {summary}\nferrun: this node's workers were stopped; that node's report has the traceback\n");
            1
        }
        Outcome::Signaled(sig) => {
            say!("ferrun: stopped by {sig}\n");
            if config.propagate_exit_code {
                128 + sig as u8
            } else {
                1
            }
        }
    })
}

/// Stderr that swallows its errors: tracing reports a failed write with `eprintln!`, which
/// panics on a closed stderr.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // torchrun reads LOGLEVEL; RUST_LOG works too.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| {
            std::env::var("LOGLEVEL")
                .ok()
                .map(|l| l.to_lowercase().replace("warning", "warn"))
        })
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal, and never under NO_COLOR.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(|| QuietStderr)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::ChronoLocal::new(
            "%H:%M:%S%.3f".into(),
        ))
        .init();
}
