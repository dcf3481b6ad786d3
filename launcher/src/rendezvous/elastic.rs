//! The elastic rendezvous from one agent's side: its parameters, whether this agent hosts the
//! service, the address it tells the other nodes, and its node id.
//!
//! # Hosting
//! As torchrun's c10d backend does, the agent on the host that owns the endpoint's address
//! serves the rendezvous: it tries to bind the endpoint; success means it is the host. A
//! port in use means another agent of this host serves it already; an address that is not
//! this host's means another host does. `--rdzv-conf is_host=true|false` overrides the guess.
//! The job then depends on that agent's host staying up; `ferrun rendezvous serve` runs the
//! service on a host of its own.
//!
//! # Trust
//! The endpoint and the addresses come from the command line; the token from the command line
//! or [`TOKEN_ENV`](crate::rendezvous::service::TOKEN_ENV).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use crate::rendezvous::netif::{self, NetifError};
use crate::rendezvous::round::{NodeId, Settings};
use crate::rendezvous::service::{RendezvousService, ServiceError, Tls, Token};

/// Which backend keeps the rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// ferrun's rendezvous service (`c10d`), served by the endpoint's agent or by
    /// `ferrun rendezvous serve`.
    Service,
    /// etcd v3 (`etcd`, `etcd-v2`).
    Etcd {
        /// etcd's client URLs.
        urls: Vec<String>,
        /// The key prefix runs live under.
        prefix: String,
    },
}

/// Parameters of an elastic (`--nnodes MIN:MAX`) rendezvous.
#[derive(Debug, Clone)]
pub struct ElasticSpec {
    /// Who keeps the rounds.
    pub backend: Backend,
    /// MIN, MAX and the timeouts.
    pub settings: Settings,
    /// The endpoint's host.
    pub host: String,
    /// The endpoint's port (29400 by default, as torchrun's).
    pub port: u16,
    /// `--rdzv-id`.
    pub run_id: String,
    /// Workers on this node.
    pub local_world_size: u32,
    /// Time between heartbeats (`keep_alive_interval`).
    pub keep_alive: Duration,
    /// `is_host` from `--rdzv-conf`, when given.
    pub is_host: Option<bool>,
    /// The job's token.
    pub token: Option<Token>,
    /// TLS, when the job's `--rdzv-conf` names certificates.
    pub tls: Option<Tls>,
    /// `--local-addr`.
    pub local_addr: Option<String>,
    /// Bound on the exit barrier.
    pub exit_timeout: Duration,
}

/// Why an agent could not take its part in the elastic rendezvous.
#[derive(Debug, thiserror::Error)]
pub enum ElasticError {
    /// `is_host=true` but the endpoint cannot be bound here.
    #[error("--rdzv-conf is_host=true but this host cannot listen on {endpoint}: {source}")]
    CannotHost {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: std::io::Error,
    },
    /// The service could not start.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// No address to tell the other nodes.
    #[error(
        "cannot tell which address the other nodes reach this host at: {0}; give --local-addr"
    )]
    Address(#[from] NetifError),
}

impl ElasticSpec {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Serves the rendezvous when this agent is its host (see the module docs).
    ///
    /// # Errors
    /// `is_host=true` and the endpoint cannot be bound, or the service cannot start.
    pub fn host_if_ours(&self) -> Result<Option<RendezvousService>, ElasticError> {
        if self.backend != Backend::Service {
            return Ok(None);
        }
        let listener = match self.is_host {
            Some(false) => return Ok(None),
            Some(true) => Some(self.bind_endpoint(true)?),
            None => self.bind_endpoint(false).ok(),
        };
        let Some(listener) = listener else {
            return Ok(None);
        };
        let service = RendezvousService::serve(
            listener,
            self.settings,
            self.token.clone(),
            self.tls.as_ref(),
        )?;
        tracing::info!("hosting the rendezvous on {}", service.local_addr());
        Ok(Some(service))
    }

    fn bind_endpoint(&self, forced: bool) -> Result<TcpListener, ElasticError> {
        let cannot = |source| ElasticError::CannotHost {
            endpoint: self.endpoint(),
            source,
        };
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(cannot)?
            .collect();
        let mut last = std::io::Error::from(ErrorKind::AddrNotAvailable);
        for addr in &addrs {
            match TcpListener::bind(addr) {
                Ok(listener) => return Ok(listener),
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    tracing::debug!(
                        "{addr} is in use: another agent of this host serves the rendezvous"
                    );
                    return Err(cannot(e));
                }
                Err(e) => last = e,
            }
        }
        if forced {
            // The endpoint names this host in a way it cannot bind (a service IP, a load
            // balancer): serve on every interface of the port.
            return TcpListener::bind(("0.0.0.0", self.port)).map_err(cannot);
        }
        Err(cannot(last))
    }

    /// The address the other nodes reach this one at: `--local-addr`, else the source
    /// address of this host's route to the endpoint.
    ///
    /// # Errors
    /// The endpoint does not resolve or there is no route to it.
    pub fn advertised_addr(&self) -> Result<String, ElasticError> {
        if let Some(addr) = &self.local_addr {
            return Ok(addr.clone());
        }
        let endpoint = netif::resolve(&self.host, self.port)?;
        Ok(netif::source_address(endpoint)?.to_string())
    }
}

/// A node id unique to this agent process: host name, pid and a random part.
pub fn node_id() -> NodeId {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(64)
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    NodeId(format!(
        "{}_{}_{}",
        if host.is_empty() { "node" } else { &host },
        std::process::id(),
        &random[..8]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, port: u16, is_host: Option<bool>) -> ElasticSpec {
        ElasticSpec {
            backend: Backend::Service,
            settings: Settings {
                min_nodes: 1,
                max_nodes: 2,
                join_timeout: Duration::from_secs(5),
                last_call_timeout: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(5),
            },
            host: host.into(),
            port,
            run_id: "r".into(),
            local_world_size: 1,
            keep_alive: Duration::from_secs(1),
            is_host,
            token: None,
            tls: None,
            local_addr: None,
            exit_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn the_first_agent_of_the_endpoints_host_serves_and_the_next_one_does_not() {
        let first = spec("127.0.0.1", 0, None)
            .host_if_ours()
            .expect("ok")
            .expect("hosts");
        let port = first.local_addr().port();
        let second = spec("127.0.0.1", port, None).host_if_ours().expect("ok");
        assert!(second.is_none(), "the port is in use: someone else hosts");
        assert!(spec("127.0.0.1", port, Some(false))
            .host_if_ours()
            .expect("ok")
            .is_none());
        let err = spec("127.0.0.1", port, Some(true))
            .host_if_ours()
            .expect_err("in use");
        assert!(err.to_string().contains("is_host=true"), "{err}");
        // An address of no interface here (TEST-NET-1) is another host's.
        assert!(spec("192.0.2.1", 29400, None)
            .host_if_ours()
            .expect("ok")
            .is_none());
    }

    #[test]
    fn node_ids_are_unique_and_of_the_plain_alphabet() {
        let (a, b) = (node_id(), node_id());
        assert_ne!(a, b);
        assert!(
            a.0.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{a}"
        );
        assert_eq!(spec("::1", 29400, None).endpoint(), "[::1]:29400");
    }
}
