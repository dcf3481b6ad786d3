//! Starting one worker process: its environment, its command line, and its binding to the
//! launcher's life.
//!
//! # Guarantees
//! - Each worker leads its own process group, so a stop signal reaches its children too.
//! - Each worker gets `PR_SET_PDEATHSIG(SIGKILL)`: if the launcher dies, even by SIGKILL, the
//!   kernel kills the worker. The launcher must spawn from a thread that lives as long as it does
//!   (the death signal follows the spawning *thread*): ferrun spawns from its main thread.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::process::Stdio;

use ferrun_collective::WorkerEnv;
use tokio::process::{Child, Command};

use crate::configuration::config::LaunchConfig;
use crate::configuration::entrypoint::LOCAL_RANK_MACRO;
use crate::configuration::gpu_env::pinned_device;
use crate::rendezvous::agent_store::Assignment;

/// What every worker of this node shares: its place in the job and the store to bootstrap through.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// This node's place in the job.
    pub assignment: Assignment,
    /// `MASTER_ADDR`: where the agent store is.
    pub master_addr: String,
    /// `MASTER_PORT`: the agent store's port.
    pub master_port: u16,
    /// Further variables for the workers (e.g. `GLOO_SOCKET_IFNAME`).
    pub extra_env: Vec<(String, String)>,
}

impl Bootstrap {
    /// A single-node job whose agent store listens on `master_port`.
    pub fn single_node(config: &LaunchConfig, master_port: u16) -> Self {
        Self {
            assignment: Assignment {
                group_rank: 0,
                group_world_size: 1,
                base_rank: 0,
                world_size: config.local_world_size,
            },
            master_addr: config.master_addr.clone(),
            master_port,
            extra_env: Vec::new(),
        }
    }
}

/// The contract for local rank `local_rank` in attempt `restart_count`.
pub fn worker_env(
    config: &LaunchConfig,
    boot: &Bootstrap,
    local_rank: u32,
    restart_count: u32,
    error_file: &Path,
) -> WorkerEnv {
    let a = &boot.assignment;
    WorkerEnv {
        rank: a.base_rank + local_rank,
        local_rank,
        world_size: a.world_size,
        local_world_size: config.local_world_size,
        group_rank: a.group_rank,
        group_world_size: a.group_world_size,
        role_name: config.role.clone(),
        role_rank: a.base_rank + local_rank,
        role_world_size: a.world_size,
        master_addr: boot.master_addr.clone(),
        master_port: boot.master_port,
        restart_count,
        max_restarts: config.max_restarts,
        run_id: config.run_id.clone(),
        // The agent hosts the store on MASTER_PORT; every worker connects to it as a client.
        use_agent_store: true,
        error_file: error_file.to_path_buf(),
        nccl_async_error_handling: config.nccl_async_error_handling.clone(),
        omp_num_threads: config.set_omp_num_threads.then_some(1),
    }
}

/// Which of the worker's streams the launcher reads (the others are inherited).
#[derive(Debug, Clone, Copy)]
pub struct Piped {
    /// stdout is piped to the launcher.
    pub stdout: bool,
    /// stderr is piped to the launcher.
    pub stderr: bool,
}

/// A worker's command line and the variables it gets on top of the launcher's environment.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program (the Python interpreter, or the `--no-python` program).
    pub program: OsString,
    /// Its arguments, `${local_rank}` expanded.
    pub args: Vec<OsString>,
    /// The variables set on top of the launcher's own.
    pub env: Vec<(OsString, OsString)>,
}

/// What local rank `env.local_rank` runs: [`spawn`] starts it, a warm start hands it over.
///
/// # Errors
/// The command is empty.
pub fn launch_of(
    config: &LaunchConfig,
    env: &WorkerEnv,
    extra_env: &[(String, String)],
) -> io::Result<Launch> {
    let local_rank = env.local_rank.to_string();
    // `${local_rank}` is expanded in arguments that are UTF-8; others pass through untouched.
    let mut args = config.command.iter().map(|a| match a.to_str() {
        Some(text) => OsString::from(text.replace(LOCAL_RANK_MACRO, &local_rank)),
        None => a.clone(),
    });
    let program = args
        .next()
        .ok_or_else(|| io::Error::other("empty worker command"))?;
    let mut vars: Vec<(OsString, OsString)> = extra_env
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    vars.extend(env.to_env().into_iter().map(|(k, v)| (k.into(), v.into())));
    vars.push((
        crate::supervision::descendants::MARK.into(),
        crate::supervision::descendants::mark_value().into(),
    ));
    if config.virtual_local_rank {
        vars.push(("LOCAL_RANK".into(), "0".into()));
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        vars.push((
            "CUDA_VISIBLE_DEVICES".into(),
            pinned_device(env.local_rank, visible.as_deref(), config.gpus).into(),
        ));
    }
    Ok(Launch {
        program,
        args: args.collect(),
        env: vars,
    })
}

/// Starts one worker.
///
/// # Errors
/// The program cannot be started (not found, not executable).
pub fn spawn(
    config: &LaunchConfig,
    env: &WorkerEnv,
    extra_env: &[(String, String)],
    piped: Piped,
) -> io::Result<Child> {
    let launch = launch_of(config, env, extra_env)?;
    let mut command = Command::new(&launch.program);
    command.args(&launch.args).envs(launch.env);
    let stdio = |pipe: bool| {
        if pipe {
            Stdio::piped()
        } else {
            Stdio::inherit()
        }
    };
    command
        .stdout(stdio(piped.stdout))
        .stderr(stdio(piped.stderr))
        .stdin(Stdio::inherit());
    command.process_group(0);
    bind_to_launcher(&mut command);
    command
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {:?}: {e}", launch.program)))
}

/// torchrun's `--virtual-local-rank`: the worker sees only its own GPU, as device 0.
/// Binds a child to the launcher's life (see the module docs).
#[allow(unsafe_code)]
pub(crate) fn bind_to_launcher(command: &mut Command) {
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != launcher {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
