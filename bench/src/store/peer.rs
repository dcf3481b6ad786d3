//! The servers under test, each a process of its own: ferrun's (this binary's hidden
//! `store-server`) and torch's TCPStore (libuv backend) in the venv's python.
//!
//! torch's server resolves every peer's address on its loop thread (a reverse lookup of
//! `::ffff:127.0.0.1`, which a stock `/etc/hosts` does not name). Where the resolver drops a
//! query — this machine's drops about one in 25 — that connection's greeting waits out the
//! resolver's 5 s timeout, and every other client with it. That is the resolver, not the store:
//! where it can (root and `unshare`), the bench runs torch's server in a mount namespace of its
//! own whose `/etc/hosts` also names the IPv6 loopback forms, so the lookup never leaves the host.
//!
//! # Trust
//! A server's first stdout line must be its port; anything else is an error quoting it.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// torch's server: a TCPStore master on a free port, printed, until stdin closes.
const TORCH_SERVER: &str = "import sys, torch.distributed as d\n\
s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n\
print(s.port, flush=True)\n\
sys.stdin.read()";

/// A server process; dropping it closes its stdin and waits for it to exit.
pub(super) struct Peer {
    child: Child,
    /// The port it listens on (loopback).
    pub(super) port: u16,
    /// Kept alive while the server may read it.
    _hosts: Option<tempfile::NamedTempFile>,
}

impl Peer {
    /// ferrun's server: this binary's `store-server`.
    pub(super) fn ferrun() -> anyhow::Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("store-server");
        Self::start(cmd, None)
    }

    /// torch's server in `python`; `local_names` says whether it got the hosts file of the
    /// module doc (false: it resolves peers as the machine does).
    pub(super) fn torch(python: &Path) -> anyhow::Result<(Self, bool)> {
        if let Some(hosts) = loopback_hosts_file()? {
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--mount",
                "sh",
                "-c",
                r#"mount --bind "$0" /etc/hosts && exec "$1" -c "$2""#,
            ])
            .arg(hosts.path())
            .arg(python)
            .arg(TORCH_SERVER);
            return Ok((Self::start(cmd, Some(hosts))?, true));
        }
        let mut cmd = Command::new(python);
        cmd.args(["-c", TORCH_SERVER]);
        Ok((Self::start(cmd, None)?, false))
    }

    fn start(mut cmd: Command, hosts: Option<tempfile::NamedTempFile>) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?)
            .take(64)
            .read_line(&mut line)?;
        let port = line
            .trim()
            .parse()
            .with_context(|| format!("a store server printed {line:?}, not its port"))?;
        Ok(Self {
            child,
            port,
            _hosts: hosts,
        })
    }

    /// The server's pid (to read its CPU time).
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// `/etc/hosts` plus the IPv6 loopback names, when this process may bind it over `/etc/hosts`
/// in a mount namespace (root, with `unshare` installed); `None` otherwise.
fn loopback_hosts_file() -> anyhow::Result<Option<tempfile::NamedTempFile>> {
    let root = nix::unistd::geteuid().is_root();
    let unshare = Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !unshare {
        return Ok(None);
    }
    let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    hosts.push_str("\n::1 localhost\n::ffff:127.0.0.1 localhost\n");
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), hosts)?;
    Ok(Some(file))
}

/// CPU seconds (user and system) process `pid` has used so far; 0 once it is gone.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // `rest` starts at field 3; utime and stime are fields 14 and 15.
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    };
    ticks.iter().sum::<f64>() / hz
}
