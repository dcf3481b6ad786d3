//! Warm starts (`--warm-start`): one pre-started Python interpreter per local worker that
//! has imported torch (and `--warm-start-import` modules) already, so a restart costs a
//! message instead of `import torch` (≈ 1.7 s a process here).
//!
//! # How
//! Each interpreter (`warm_zygote.py`, run with `python -u -c`) imports the modules, then
//! blocks on a private socket pair. To start a worker the agent sends it the worker's argv,
//! its full environment and working directory, and the worker's stdout and stderr (as file
//! descriptors, `SCM_RIGHTS`); the interpreter points its streams there, takes the
//! environment and runs the script as `python -u` would. It *becomes* that worker, with the
//! pid, process group and death signal a cold worker has, and is never reused: each attempt
//! gets fresh interpreters, started in the background while the previous attempt runs — each
//! behind a gate that opens once its predecessor has finished importing, so a launch never
//! imports torch twice per rank at once. No
//! process forks after `import torch`, so nothing initialized at import (CUDA included) is
//! shared between workers.
//!
//! # Costs and limits
//! One idle interpreter per local worker, all the time: its memory (with torch on CPU,
//! 0.5 GB resident each, 0.28 GB of it its own) and the CPU of importing while the workers run. Pre-imported modules see
//! the environment the interpreter started with — the launcher's, plus the variables that
//! do not change across attempts (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `OMP_NUM_THREADS`) — not
//! the attempt's `RANK`, `WORLD_SIZE` or `MASTER_*`; code that reads those at import time
//! must not be pre-imported. The imports' objects are frozen out of Python's cyclic
//! collector (`gc.freeze()`): the worker's collections and its teardown skip them.
//!
//! # Trust
//! The interpreters are the agent's children on a socket pair nobody else holds; the agent
//! believes nothing they say but their exit status.

use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::process::{Child, Command};

use crate::configuration::config::LaunchConfig;
use crate::supervision::worker::{self, Bootstrap, Launch, Piped};

/// The interpreter's program.
const ZYGOTE: &str = include_str!("warm_zygote.py");
/// Largest hand-over message: it must fit the socket's buffer, so sending never blocks.
const MAX_MESSAGE: usize = 128 * 1024;
/// The fd the interpreter reads its control socket on.
const CONTROL_FD: i32 = 3;
/// The fd of its gate, when it has one.
const GATE_FD: i32 = 4;
/// Variables of a worker that are the same in every attempt: the interpreter starts with them.
const STEADY: [&str; 6] = [
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_ASYNC_ERROR_HANDLING",
];

/// One pre-started interpreter.
#[derive(Debug)]
pub struct Zygote {
    child: Child,
    control: UnixStream,
}

/// The interpreters of this node, one per local rank.
#[derive(Debug)]
pub struct WarmPool {
    slots: Vec<Option<Zygote>>,
    /// Per rank, the read end of the gate the last activated interpreter closes.
    gates: Vec<Option<OwnedFd>>,
    modules: String,
}

impl WarmPool {
    /// The pool `config` asks for (`None` without `--warm-start`), its interpreters started.
    pub fn start(config: &LaunchConfig) -> Option<Self> {
        let modules = config.warm_start.as_ref()?.join(",");
        let mut pool = Self {
            slots: (0..config.local_world_size).map(|_| None).collect(),
            gates: (0..config.local_world_size).map(|_| None).collect(),
            modules,
        };
        pool.refill(config);
        Some(pool)
    }

    /// Starts an interpreter in every empty slot (a failure is logged: that rank starts cold).
    pub fn refill(&mut self, config: &LaunchConfig) {
        for (local_rank, (slot, gate)) in (0..).zip(self.slots.iter_mut().zip(&mut self.gates)) {
            if slot.is_some() {
                continue;
            }
            match Zygote::spawn(config, local_rank, &self.modules, gate.take()) {
                Ok(zygote) => *slot = Some(zygote),
                Err(e) => tracing::warn!(
                    "warm start: cannot pre-start an interpreter for local rank {local_rank}: {e}; it will start cold"
                ),
            }
        }
    }

    /// Starts `launch` as local rank `local_rank` in its pre-started interpreter (see
    /// [`Zygote::activate`]); `None` when there is no live one.
    pub fn activate(
        &mut self,
        local_rank: u32,
        launch: &Launch,
        cwd: &Path,
        piped: Piped,
    ) -> Option<io::Result<Child>> {
        let zygote = self.take(local_rank)?;
        let (gate, gate_w) = match pipe() {
            Ok(ends) => ends,
            Err(e) => return Some(Err(e)),
        };
        let started = zygote.activate(launch, cwd, piped, gate_w);
        if started.is_ok() {
            if let Some(slot) = self.gates.get_mut(local_rank as usize) {
                *slot = Some(gate);
            }
        }
        Some(started)
    }

    /// The interpreter for `local_rank`, if one is still alive.
    fn take(&mut self, local_rank: u32) -> Option<Zygote> {
        let mut zygote = self.slots.get_mut(local_rank as usize)?.take()?;
        match zygote.child.try_wait() {
            Ok(None) => Some(zygote),
            Ok(Some(status)) => {
                tracing::warn!(
                    "warm start: the pre-started interpreter of local rank {local_rank} exited ({status}; its imports failed? see above); starting it cold"
                );
                None
            }
            Err(_) => None,
        }
    }
}

impl Zygote {
    fn spawn(
        config: &LaunchConfig,
        local_rank: u32,
        modules: &str,
        gate: Option<OwnedFd>,
    ) -> io::Result<Self> {
        let python = config
            .command
            .first()
            .ok_or_else(|| io::Error::other("no python"))?;
        // The variables that stay the same across attempts, from a stand-in attempt.
        let boot = Bootstrap::single_node(config, 1);
        let env = worker::worker_env(config, &boot, local_rank, 0, Path::new(""));
        let steady = worker::launch_of(config, &env, &[])?
            .env
            .into_iter()
            .filter(|(k, _)| {
                STEADY.iter().any(|s| OsStr::new(s) == k)
                    || k == crate::supervision::descendants::MARK
            });
        let (ours, theirs) = UnixStream::pair()?;
        let mut command = Command::new(python);
        command.args(["-u", "-c", ZYGOTE, modules]);
        if gate.is_some() {
            command.arg("gate");
        }
        command
            .envs(steady)
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command.process_group(0);
        worker::bind_to_launcher(&mut command);
        fds_at(
            &mut command,
            theirs.as_raw_fd(),
            gate.as_ref().map(AsRawFd::as_raw_fd),
        );
        let child = command.spawn()?;
        drop((theirs, gate));
        Ok(Self {
            child,
            control: ours,
        })
    }

    /// Hands the interpreter its worker: `launch` run in `cwd`, its streams piped to the
    /// launcher where `piped` says; it closes `gate` once it has its message (its imports are
    /// done by then). The worker's child, like [`worker::spawn`]'s.
    ///
    /// # Errors
    /// The message does not fit or cannot be sent (the interpreter is killed then).
    fn activate(
        mut self,
        launch: &Launch,
        cwd: &Path,
        piped: Piped,
        gate: OwnedFd,
    ) -> io::Result<Child> {
        let (stdout, stdout_w) = stream(piped.stdout, io::stdout().as_fd())?;
        let (stderr, stderr_w) = stream(piped.stderr, io::stderr().as_fd())?;
        let message = message(launch, cwd);
        if message.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "the worker's environment and arguments take {} bytes; a warm start hands over at most {MAX_MESSAGE}",
                message.len()
            )));
        }
        self.control.set_nonblocking(true)?;
        let fds = [stdout_w.as_raw_fd(), stderr_w.as_raw_fd(), gate.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.control.as_raw_fd(),
            &[IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent != message.len() {
            return Err(io::Error::other(
                "the hand-over message did not fit the socket",
            ));
        }
        drop((stdout_w, stderr_w, gate));
        if let Some(read) = stdout {
            self.child.stdout = Some(tokio::process::ChildStdout::from_std(read.into())?);
        }
        if let Some(read) = stderr {
            self.child.stderr = Some(tokio::process::ChildStderr::from_std(read.into())?);
        }
        // From here the child is a worker: it must outlive this handle's drop.
        Ok(self.child)
    }
}

/// The worker's end of one stream (a new pipe when the launcher reads it, else the
/// launcher's own), and the launcher's read end.
fn stream(piped: bool, own: BorrowedFd<'_>) -> io::Result<(Option<OwnedFd>, OwnedFd)> {
    if piped {
        let (read, write) = pipe()?;
        Ok((Some(read), write))
    } else {
        Ok((None, own.try_clone_to_owned()?))
    }
}

/// A pipe whose ends do not leak into children (the write end travels by `SCM_RIGHTS`).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// `FRW1`, the body's length, then length-prefixed fields: the counts, argv (after the
/// interpreter's `-u`), the environment's names and values, the working directory.
fn message(launch: &Launch, cwd: &Path) -> Vec<u8> {
    let argv: Vec<&OsStr> = launch
        .args
        .iter()
        .map(OsString::as_os_str)
        .skip_while(|a| *a == "-u")
        .collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (k, v) in &launch.env {
        env.retain(|(have, _)| have != k);
        env.push((k.clone(), v.clone()));
    }
    let mut counts = Vec::with_capacity(8);
    counts.extend(u32_of(argv.len()).to_be_bytes());
    counts.extend(u32_of(env.len()).to_be_bytes());
    let mut fields: Vec<&[u8]> = vec![&counts];
    fields.extend(argv.iter().map(|a| a.as_bytes()));
    for (k, v) in &env {
        fields.push(k.as_bytes());
        fields.push(v.as_bytes());
    }
    fields.push(cwd.as_os_str().as_bytes());
    let mut body = Vec::new();
    for field in fields {
        body.extend(u32_of(field.len()).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut message = b"FRW1".to_vec();
    message.extend(u32_of(body.len()).to_be_bytes());
    message.extend(body);
    message
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Puts `control` at [`CONTROL_FD`] and `gate` at [`GATE_FD`] in the child, without
/// close-on-exec.
#[allow(unsafe_code)]
fn fds_at(command: &mut Command, control: i32, gate: Option<i32>) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (fcntl, dup2, close).
    unsafe {
        command.pre_exec(move || {
            // Out of the way first, so neither lands on the other's target.
            let moved = |fd: i32| {
                let high = libc::fcntl(fd, libc::F_DUPFD, 10);
                if high < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(high)
                }
            };
            let control = moved(control)?;
            let gate = gate.map(moved).transpose()?;
            for (fd, at) in [(Some(control), CONTROL_FD), (gate, GATE_FD)] {
                if let Some(fd) = fd {
                    if libc::dup2(fd, at) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_carries_argv_after_dash_u_the_overridden_env_and_the_cwd() {
        let launch = Launch {
            program: "python3".into(),
            args: vec!["-u".into(), "train.py".into(), "--lr".into()],
            env: vec![("RANK".into(), "3".into()), ("PATH".into(), "/x".into())],
        };
        let m = message(&launch, Path::new("/work"));
        assert_eq!(&m[..4], b"FRW1");
        let size = u32::from_be_bytes(m[4..8].try_into().expect("4 bytes")) as usize;
        assert_eq!(size, m.len() - 8);
        let mut fields = Vec::new();
        let mut at = 8;
        while at < m.len() {
            let n = u32::from_be_bytes(m[at..at + 4].try_into().expect("4 bytes")) as usize;
            fields.push(&m[at + 4..at + 4 + n]);
            at += 4 + n;
        }
        let argc = u32::from_be_bytes(fields[0][..4].try_into().expect("4")) as usize;
        let envc = u32::from_be_bytes(fields[0][4..].try_into().expect("4")) as usize;
        assert_eq!(&fields[1..=argc], [&b"train.py"[..], b"--lr"]);
        let env: Vec<(&[u8], &[u8])> = fields[1 + argc..1 + argc + 2 * envc]
            .chunks(2)
            .map(|kv| (kv[0], kv[1]))
            .collect();
        assert_eq!(env.iter().filter(|(k, _)| *k == b"PATH").count(), 1);
        assert!(env.contains(&(&b"PATH"[..], &b"/x"[..])));
        assert!(env.contains(&(&b"RANK"[..], &b"3"[..])));
        assert_eq!(fields[1 + argc + 2 * envc], b"/work");
        assert_eq!(fields.len(), 2 + argc + 2 * envc);
    }
}
