//! Hosts for multi-host runs on one machine: network namespaces joined by a veth pair, each
//! with an address of its own. They share this machine's hostname (which maps to 127.0.0.1),
//! the case that breaks Gloo without GLOO_SOCKET_IFNAME.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Two namespaced hosts on one /24; removed on drop.
#[derive(Debug)]
pub struct Hosts {
    /// Namespace names.
    pub names: [String; 2],
    /// Their addresses.
    pub addrs: [String; 2],
    /// Their interface names.
    pub ifnames: [String; 2],
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

impl Hosts {
    /// Creates the two hosts.
    ///
    /// # Errors
    /// When not root, or when `ip` fails (its message).
    pub fn create() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("multi-host runs create network namespaces and veth links, which needs root; run them as root (CI does)".into());
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 1000) * 10 + n;
        let subnet = format!("10.{}.{}", 100 + (id / 250) % 100, id % 250);
        let hosts = Self {
            names: [format!("fr{id}a"), format!("fr{id}b")],
            addrs: [format!("{subnet}.1"), format!("{subnet}.2")],
            ifnames: [format!("fv{id}a"), format!("fv{id}b")],
        };
        // From here on, `drop` removes whatever was made.
        for name in &hosts.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            ip(&["netns", "add", name])?;
        }
        let [a, b] = &hosts.ifnames;
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

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
