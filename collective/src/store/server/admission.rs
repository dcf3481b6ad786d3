//! Which hosts may connect to the store (no I/O).
//!
//! torch's `TCPStore` clients cannot present a credential: the protocol's only handshake is a
//! magic number. So where the job has one (an elastic job's rendezvous token), the launcher
//! that serves the round's store admits the hosts the rendezvous admitted — the addresses of
//! the round's nodes, each of which presented the token — and this host's own loopback. Every
//! client, torch's or ferrun's, is then judged by the source address of its connection.
//!
//! # Trust
//! The addresses come from the launcher (the rendezvous' view of the round), the source
//! address from the kernel. The check is as strong as the network's source addresses: TCP's
//! handshake stops a blind spoofer, not one on the path between the hosts.

use std::collections::HashSet;
use std::net::IpAddr;

/// Who may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Admission {
    /// Anyone who reaches the port (torch's store; a job without a token).
    #[default]
    Anyone,
    /// Loopback, and these hosts.
    Hosts(HashSet<IpAddr>),
}

impl Admission {
    /// Only loopback and `hosts` (IPv4-mapped IPv6 addresses count as their IPv4 address).
    pub fn hosts(hosts: impl IntoIterator<Item = IpAddr>) -> Self {
        Self::Hosts(hosts.into_iter().map(|ip| ip.to_canonical()).collect())
    }

    /// Whether a connection from `ip` is served.
    pub fn admits(&self, ip: IpAddr) -> bool {
        match self {
            Self::Anyone => true,
            Self::Hosts(hosts) => {
                let ip = ip.to_canonical();
                ip.is_loopback() || hosts.contains(&ip)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn only_loopback_and_the_named_hosts_are_admitted_in_either_ip_family() {
        assert!(Admission::Anyone.admits(ip("203.0.113.9")));
        let some = Admission::hosts([ip("10.0.0.2"), ip("::ffff:10.0.0.3"), ip("fd00::4")]);
        for yes in [
            "10.0.0.2",
            "::ffff:10.0.0.2",
            "10.0.0.3",
            "fd00::4",
            "127.0.0.1",
            "::1",
        ] {
            assert!(some.admits(ip(yes)), "{yes} is admitted");
        }
        for no in ["10.0.0.5", "::ffff:10.0.0.5", "fd00::5", "0.0.0.0"] {
            assert!(!some.admits(ip(no)), "{no} is refused");
        }
        assert!(!Admission::hosts([]).admits(ip("10.0.0.2")));
    }
}
