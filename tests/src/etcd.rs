//! A real etcd (Debian's `etcd-server`) for the etcd rendezvous tests: one member with its
//! data in a temporary directory, on loopback or on a namespaced host; stopped on drop, and
//! restartable on the same data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long etcd may take to say it serves.
const READY_BOUND: Duration = Duration::from_secs(30);

/// A running etcd.
pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    host: String,
    client_port: u16,
    peer_port: u16,
    netns: Option<String>,
    tls: Option<EtcdTls>,
}

/// PEM files for an etcd that serves its clients over TLS and checks their certificates.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// Its certificate (for the host it listens on).
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
    /// The CA its clients' certificates must be signed by.
    pub client_ca: std::path::PathBuf,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd at {}", self.endpoint())
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl Etcd {
    /// etcd on loopback, on free ports.
    ///
    /// # Errors
    /// etcd is not installed, or did not come up (its last words).
    pub fn start() -> Result<Self, String> {
        let (client, peer) = (free_port()?, free_port()?);
        Self::start_with("127.0.0.1", client, peer, None)
    }

    /// etcd on loopback over TLS (`https://`), admitting only clients with a certificate of
    /// `tls.client_ca`.
    ///
    /// # Errors
    /// etcd is not installed, or did not come up (its last words).
    pub fn start_tls(tls: EtcdTls) -> Result<Self, String> {
        let data = tempfile::tempdir().map_err(|e| format!("no data dir: {e}"))?;
        let mut etcd = Self {
            child: None,
            data,
            host: "127.0.0.1".into(),
            client_port: free_port()?,
            peer_port: free_port()?,
            netns: None,
            tls: Some(tls),
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// etcd on `host`'s address with these ports, in network namespace `netns` when given (a
    /// namespaced host's).
    ///
    /// # Errors
    /// etcd is not installed, or did not come up (its last words).
    pub fn start_with(
        host: &str,
        client_port: u16,
        peer_port: u16,
        netns: Option<&str>,
    ) -> Result<Self, String> {
        let data = tempfile::tempdir().map_err(|e| format!("no data dir: {e}"))?;
        let mut etcd = Self {
            child: None,
            data,
            host: host.to_owned(),
            client_port,
            peer_port,
            netns: netns.map(str::to_owned),
            tls: None,
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// `host:port` of its clients.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client_port)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{}", self.host, self.client_port);
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, "etcd"]);
                cmd
            }
            None => Command::new("etcd"),
        };
        cmd.args(["--name", "ferrun-test"])
            .arg("--data-dir")
            .arg(self.data.path())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("ferrun-test={peer}")]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            format!("cannot start etcd (install Debian's etcd-server; scripts/test.sh does): {e}")
        })?;
        let stderr = child.stderr.take().ok_or("etcd's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // After the wait, nobody listens; keep draining so etcd never blocks.
                let _ = tx.send((line.contains("ready to serve client requests"), line));
            }
        });
        self.child = Some(child);
        let mut last = Vec::new();
        loop {
            match rx.recv_timeout(READY_BOUND) {
                Ok((true, _)) => return Ok(()),
                Ok((false, line)) => {
                    last.push(line);
                    if last.len() > 20 {
                        last.remove(0);
                    }
                }
                Err(_) => {
                    self.stop();
                    return Err(format!(
                        "etcd did not say it serves within {READY_BOUND:?}:\n{}",
                        last.join("\n")
                    ));
                }
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same data and ports.
    ///
    /// # Errors
    /// It did not come back.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
