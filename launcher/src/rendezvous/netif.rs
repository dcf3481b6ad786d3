//! Which network interface reaches the master: the one Gloo and NCCL must use.
//!
//! Without `GLOO_SOCKET_IFNAME`, Gloo advertises whatever the hostname resolves to; on hosts
//! that share a hostname, or map it to 127.0.0.1, a multi-host run then dies with
//! "Connection refused" (pytorch/gloo#335). The kernel knows the answer: the source address
//! of a route to the master, and the interface that owns it.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Why no interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// The master's name does not resolve.
    #[error("cannot resolve the master address {0:?}: check --master-addr (or --rdzv-endpoint) and DNS on this host")]
    Resolve(String),
    /// No route to the master.
    #[error("no route from this host to the master at {addr}: {source}")]
    NoRoute {
        /// The master's address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No interface holds the address.
    #[error("no network interface of this host has the address {0}; check --local-addr")]
    NoInterface(IpAddr),
}

/// The first socket address `host:port` resolves to.
///
/// # Errors
/// [`NetifError::Resolve`] when it does not resolve.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, NetifError> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| NetifError::Resolve(host.to_owned()))
}

/// The local address the kernel would use to reach `master` (no packet is sent).
///
/// # Errors
/// [`NetifError::NoRoute`] when there is no route.
pub fn source_address(master: SocketAddr) -> Result<IpAddr, NetifError> {
    let any: SocketAddr = if master.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(|e| NetifError::NoRoute {
        addr: master,
        source: std::io::Error::other(e),
    })?;
    let socket = UdpSocket::bind(any).map_err(|source| NetifError::NoRoute {
        addr: master,
        source,
    })?;
    socket
        .connect(master)
        .map_err(|source| NetifError::NoRoute {
            addr: master,
            source,
        })?;
    Ok(socket
        .local_addr()
        .map_err(|source| NetifError::NoRoute {
            addr: master,
            source,
        })?
        .ip())
}

/// The name of the interface that holds `ip`.
///
/// # Errors
/// [`NetifError::NoInterface`] when none does.
pub fn interface_with(ip: IpAddr) -> Result<String, NetifError> {
    let interfaces = nix::ifaddrs::getifaddrs().map_err(|_| NetifError::NoInterface(ip))?;
    let pairs = interfaces.filter_map(|i| {
        let addr = i.address?;
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => return None,
        };
        Some((i.interface_name, ip))
    });
    pick(pairs, ip).ok_or(NetifError::NoInterface(ip))
}

fn pick(interfaces: impl IntoIterator<Item = (String, IpAddr)>, ip: IpAddr) -> Option<String> {
    interfaces
        .into_iter()
        .find(|(_, a)| *a == ip)
        .map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_reaches_loopback() {
        let master = resolve("127.0.0.1", 29500).expect("resolve");
        let ip = source_address(master).expect("route");
        assert!(ip.is_loopback());
        assert_eq!(interface_with(ip).expect("interface"), "lo");
    }

    #[test]
    fn picks_the_interface_holding_the_address() {
        let list = [
            ("lo".to_owned(), "127.0.0.1".parse().expect("ip")),
            ("veth0".to_owned(), "10.7.0.2".parse().expect("ip")),
        ];
        assert_eq!(
            pick(list.clone(), "10.7.0.2".parse().expect("ip")),
            Some("veth0".into())
        );
        assert_eq!(pick(list, "10.9.9.9".parse().expect("ip")), None);
        let err = resolve("no-such-host.invalid", 1).expect_err("unresolvable");
        assert!(err.to_string().contains("--master-addr"), "{err}");
    }
}
