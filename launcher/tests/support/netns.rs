//! Test hosts: network namespaces joined by a veth pair, each with an address of its own.
//! They share this machine's hostname (which maps to 127.0.0.1), the case that breaks Gloo
//! without GLOO_SOCKET_IFNAME.

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

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    /// Creates the two hosts. Needs root (CI runs as root).
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "multi-host tests create network namespaces and veth links, which needs root; run them as root (CI does)"
        );
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 1000) * 10 + n;
        let subnet = format!("10.{}.{}", 100 + (id / 250) % 100, id % 250);
        let names = [format!("fr{id}a"), format!("fr{id}b")];
        let ifnames = [format!("fv{id}a"), format!("fv{id}b")];
        let addrs = [format!("{subnet}.1"), format!("{subnet}.2")];
        for name in &names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            ip(&["netns", "add", name]);
        }
        ip(&[
            "link",
            "add",
            &ifnames[0],
            "type",
            "veth",
            "peer",
            "name",
            &ifnames[1],
        ]);
        for i in 0..2 {
            ip(&["link", "set", &ifnames[i], "netns", &names[i]]);
            ip(&[
                "-n",
                &names[i],
                "addr",
                "add",
                &format!("{}/24", addrs[i]),
                "dev",
                &ifnames[i],
            ]);
            ip(&["-n", &names[i], "link", "set", &ifnames[i], "up"]);
            ip(&["-n", &names[i], "link", "set", "lo", "up"]);
        }
        Self {
            names,
            addrs,
            ifnames,
        }
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
