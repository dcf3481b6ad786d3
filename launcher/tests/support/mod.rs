//! Shared helpers for the launcher's end-to-end tests: the real `ferrun` binary, the torch
//! virtualenv, bounded waits.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod elastic;
pub mod pki;

/// The virtualenv with torch 2.13.0 that `scripts/setup-python.sh` installs.
pub fn venv() -> PathBuf {
    ferrun_tests::venv()
}

/// PATH with the torch virtualenv first, so `python3` and `torchrun` are torch 2.13's.
pub fn venv_path() -> String {
    format!(
        "{}:{}",
        venv().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A worker script of `tests/workers`.
pub fn worker(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workers")
        .join(name)
        .display()
        .to_string()
}

/// `ferrun` with the venv on PATH and a quiet, deterministic environment.
pub fn ferrun() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrun"));
    cmd.env("PATH", venv_path())
        .env_remove("OMP_NUM_THREADS")
        .env("PYTHONWARNINGS", "ignore");
    for (key, _) in std::env::vars() {
        if key.starts_with("PET_") || key.starts_with("TORCHELASTIC_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `torchrun` from the venv, with the same environment as [`ferrun`].
pub fn torchrun() -> Command {
    let mut cmd = ferrun();
    let mut real = Command::new(venv().join("bin/torchrun"));
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => real.env(k, v),
            None => real.env_remove(k),
        };
    }
    cmd = real;
    cmd
}

/// Runs `cmd` to completion, killing it (and failing the test) past `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    run_child(cmd.spawn().expect("spawn"), limit)
}

/// Text of a process's stdout and stderr.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lines of a running child's stdout, delivered as they come.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `n` lines containing `needle`, each within what is left of `limit`.
pub fn wait_for_lines(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    n: usize,
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut found = Vec::new();
    while found.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => found.push(line),
            Ok(_) => {}
            Err(e) => panic!("waited {limit:?} for {n} lines with {needle:?}, got {found:?}: {e}"),
        }
    }
    found
}

/// Whether a process is alive (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive or `limit` passes; returns those still alive. The
/// processes are not our children, so this waits on pidfds, which become readable when a
/// process ends.
#[allow(unsafe_code)]
pub fn survivors_after(pids: &[i32], limit: Duration) -> Vec<i32> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let deadline = Instant::now() + limit;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (or -1), which the
    // OwnedFd then owns and closes.
    let mut fds: Vec<(i32, OwnedFd)> = pids
        .iter()
        .filter_map(|&pid| {
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
        })
        .collect();
    while !fds.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut polled: Vec<libc::pollfd> = fds
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polled` is a valid array of pollfd for its length during the call.
        let ready = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                left.as_millis() as i32,
            )
        };
        if ready < 0 {
            break;
        }
        let mut i = 0;
        fds.retain(|_| {
            let keep = polled[i].revents == 0;
            i += 1;
            keep
        });
    }
    // A zombie has ended too: it is only waiting to be reaped by its (new) parent.
    fds.into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| alive(pid))
        .collect()
}

/// Kills processes left behind by a failed test so they do not outlive it.
pub fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits for a spawned child (its stdout may already be taken), killing it past `limit`.
pub fn run_child(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("launcher {pid} did not finish within {limit:?}");
        }
    }
}

/// The `ENV {json}` records envdump.py printed, by rank. torchrun's workers share its terminal
/// unprefixed, so records can run into each other: each JSON value is read after its marker
/// rather than line by line.
pub fn env_records(stdout: &str) -> std::collections::BTreeMap<u32, serde_json::Value> {
    stdout
        .split("ENV ")
        .skip(1)
        .map(|record| {
            let v: serde_json::Value = serde_json::Deserializer::from_str(record)
                .into_iter()
                .next()
                .expect("a record")
                .expect("json");
            (
                v["env"]["RANK"]
                    .as_str()
                    .expect("RANK")
                    .parse()
                    .expect("int"),
                v,
            )
        })
        .collect()
}

/// A port free right now on loopback (the kernel's pick), for tests that must name one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
