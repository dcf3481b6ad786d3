//! Where the agent store listens: no wider than the job needs.
//!
//! The store has no authentication (like torch's TCPStore), so it listens only where the
//! workers and agents reach it: on loopback when the master address is this host's loopback
//! (every single-node job, `--standalone` included), else on the master address itself, which
//! is an address of node 0. Only when that address is not this host's (a name that resolves
//! to a load balancer or a service IP) does it fall back to every interface, saying so.
//!
//! An elastic job with a rendezvous token also says whom the store serves ([`admit_round`]):
//! the hosts of the round, each admitted by the rendezvous because it held the token. torch's
//! store clients cannot carry a token themselves, so the source address stands for it.
//!
//! # Trust
//! The round's addresses come from the rendezvous (token holders); a name that does not
//! resolve within [`RESOLVE_BOUND`] is left out, and said.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ferrun_collective::store::{Admission, StoreError, StoreServer};

/// How long resolving a round's host names may take.
pub const RESOLVE_BOUND: Duration = Duration::from_secs(10);

/// Hosts the store for a job whose workers reach it at `master_addr:port`.
///
/// # Errors
/// [`StoreError`] when the port is taken or cannot be bound.
pub fn bind_store(master_addr: &str, port: u16) -> Result<StoreServer, StoreError> {
    let resolved: Vec<IpAddr> = (master_addr, port)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default();
    if master_addr == "localhost"
        || (!resolved.is_empty() && resolved.iter().all(IpAddr::is_loopback))
    {
        let ip = if resolved.iter().any(IpAddr::is_ipv4) || resolved.is_empty() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            resolved[0]
        };
        return StoreServer::bind(SocketAddr::new(ip, port));
    }
    for ip in &resolved {
        match StoreServer::bind(SocketAddr::new(*ip, port)) {
            Err(StoreError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrNotAvailable => {}
            other => return other,
        }
    }
    tracing::warn!(
        "the master address {master_addr} ({resolved:?}) is not an address of this host: the \
         store listens on every interface of port {port}"
    );
    StoreServer::bind_any(port)
}

/// Serves, from now on, only loopback and the round's `hosts` (addresses or names). A name
/// that does not resolve in time is left out, with a warning: its workers will be refused.
pub async fn admit_round(store: &StoreServer, hosts: &[String]) {
    let mut ips = Vec::with_capacity(hosts.len());
    let mut names = Vec::new();
    for host in hosts {
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(host.as_str()),
        }
    }
    let mut lookups = tokio::task::JoinSet::new();
    for name in names {
        let name = name.to_owned();
        lookups.spawn(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<_>>());
            (found, name)
        });
    }
    let mut unresolved = Vec::new();
    let deadline = tokio::time::Instant::now() + RESOLVE_BOUND;
    loop {
        match tokio::time::timeout_at(deadline, lookups.join_next()).await {
            Ok(Some(Ok((Ok(found), _)))) => ips.extend(found),
            Ok(Some(Ok((Err(_), name)))) => unresolved.push(name),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                unresolved.push(format!("{} more (still resolving)", lookups.len()));
                lookups.abort_all();
                break;
            }
        }
    }
    if !unresolved.is_empty() {
        tracing::warn!(
            "the store refuses the workers of {} node(s) whose address did not resolve within {RESOLVE_BOUND:?}: {}",
            unresolved.len(),
            unresolved.join(", ")
        );
    }
    store.admit(Admission::hosts(ips));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_jobs_listen_on_loopback_only() {
        for addr in ["localhost", "127.0.0.1"] {
            let store = bind_store(addr, 0).expect("bind");
            assert!(
                store.local_addr().ip().is_loopback(),
                "{addr}: {}",
                store.local_addr()
            );
        }
    }

    #[test]
    fn an_address_of_another_host_falls_back_to_every_interface() {
        // TEST-NET-1 (RFC 5737) is never an address of this host.
        let store = bind_store("192.0.2.1", 0).expect("bind");
        assert!(
            store.local_addr().ip().is_unspecified(),
            "{}",
            store.local_addr()
        );
    }
}
