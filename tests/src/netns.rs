//! Hosts for multi-host runs on one machine: network namespaces joined by a veth pair, each
//! with an address of its own. They share this machine's hostname (which maps to 127.0.0.1),
//! the case that breaks Gloo without GLOO_SOCKET_IFNAME.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaced hosts on one /24; removed on drop.
#[derive(Debug)]
pub struct Hosts {
    /// Namespace names.
    pub names: Vec<String>,
    /// Their addresses.
    pub addrs: Vec<String>,
    /// Their interface names.
    pub ifnames: Vec<String>,
    /// The namespace of the bridge that joins more than two hosts.
    switch: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A number no other set of hosts of this machine uses now, and its /24.
fn fresh_id() -> (u32, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let id = (std::process::id() % 1000) * 10 + n;
    (id, format!("10.{}.{}", 100 + (id / 250) % 100, id % 250))
}

impl Hosts {
    /// Creates the two hosts.
    ///
    /// # Errors
    /// When not root, or when `ip` fails (its message).
    pub fn create() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("multi-host runs create network namespaces and veth links, which needs root; run them as root (CI does)".into());
        }
        let (id, subnet) = fresh_id();
        let hosts = Self {
            names: vec![format!("fr{id}a"), format!("fr{id}b")],
            addrs: vec![format!("{subnet}.1"), format!("{subnet}.2")],
            ifnames: vec![format!("fv{id}a"), format!("fv{id}b")],
            switch: None,
        };
        // From here on, `drop` removes whatever was made.
        for name in &hosts.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            ip(&["netns", "add", name])?;
        }
        let (a, b) = (&hosts.ifnames[0], &hosts.ifnames[1]);
        ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
        for i in 0..2 {
            let (ns, dev) = (hosts.names[i].as_str(), hosts.ifnames[i].as_str());
            ip(&["link", "set", dev, "netns", ns])?;
            let addr = format!("{}/24", hosts.addrs[i]);
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// `n` hosts (2..=9) joined by a bridge, as on one switch.
    ///
    /// # Errors
    /// When not root, or when `ip` fails (its message).
    pub fn bridged(n: usize) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("multi-host runs create network namespaces, veth links and a bridge, which needs root; run them as root (CI does)".into());
        }
        let (id, subnet) = fresh_id();
        let letters = "abcdefghi";
        let n = n.clamp(2, letters.len());
        let mut hosts = Self {
            names: Vec::new(),
            addrs: Vec::new(),
            ifnames: Vec::new(),
            switch: Some(format!("fr{id}s")),
        };
        let switch = hosts.switch.clone().unwrap_or_default();
        let _ = Command::new("ip").args(["netns", "del", &switch]).output();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, c) in letters.chars().take(n).enumerate() {
            let (ns, dev, port) = (
                format!("fr{id}{c}"),
                format!("fv{id}{c}"),
                format!("fp{id}{c}"),
            );
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns])?;
            hosts.names.push(ns.clone());
            hosts.ifnames.push(dev.clone());
            hosts.addrs.push(format!("{subnet}.{}", i + 1));
            ip(&["link", "add", &dev, "type", "veth", "peer", "name", &port])?;
            ip(&["link", "set", &dev, "netns", &ns])?;
            ip(&["link", "set", &port, "netns", &switch])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            let addr = format!("{}/24", hosts.addrs[i]);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &dev])?;
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Takes host `i`'s link down: its packets stop, and nobody gets a reset.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut(&self, i: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.names[i],
            "link",
            "set",
            &self.ifnames[i],
            "down",
        ])
    }

    /// `command` run on host `i`.
    pub fn on(&self, i: usize, command: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.names[i]])
            .arg(command.get_program())
            .args(command.get_args());
        for (k, v) in command.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }
}

impl Hosts {
    /// SIGKILLs every process still running on the hosts (a hung peer's workers included).
    pub fn kill_processes(&self) {
        for name in &self.names {
            let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
                continue;
            };
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Processes are left running: a test may still read a lost host's agent after its
        // hosts are gone (callers that must not leave any call `kill_processes`).
        for name in self.names.iter().chain(&self.switch) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
