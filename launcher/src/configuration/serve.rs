//! `ferrun rendezvous serve`: the rendezvous service on a host of its own, so that no training
//! node's loss takes the rendezvous with it.
//!
//! ```text
//! ferrun rendezvous serve --nnodes 2:8 [--host 0.0.0.0] [--port 29400] [--rdzv-conf k=v,…]
//! ```
//! Agents then use `--rdzv-backend c10d --rdzv-endpoint <this host>:<port>` and
//! `--rdzv-conf is_host=false`. The same `--nnodes` and `--rdzv-conf` timeouts must be given
//! to the agents; a node started with another `--nnodes` is refused, naming both.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::configuration::config::{ConfigError, Environment};
use crate::configuration::elastic_conf::{round_settings, tls, token};
use crate::configuration::flags::{check_rdzv_conf, parse_nnodes, parse_rdzv_conf};
use crate::rendezvous::round::Settings;
use crate::rendezvous::service::{Tls, Token};

/// `ferrun rendezvous serve`'s flags.
#[derive(Debug, Parser)]
#[command(
    name = "ferrun rendezvous serve",
    about = "Serve the elastic rendezvous for agents on other hosts"
)]
pub struct ServeArgs {
    /// MIN:MAX nodes, as the agents' `--nnodes`.
    #[arg(long)]
    pub nnodes: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (torchrun's c10d default).
    #[arg(long, default_value_t = 29400)]
    pub port: u16,
    /// Timeouts and the token, as the agents' `--rdzv-conf`.
    #[arg(long = "rdzv-conf", alias = "rdzv_conf", default_value = "")]
    pub rdzv_conf: String,
}

/// What the service runs with.
#[derive(Debug)]
pub struct ServeConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// MIN, MAX and the timeouts.
    pub settings: Settings,
    /// The job's token.
    pub token: Option<Token>,
    /// TLS (`tls_cert`, `tls_key`, `tls_ca`).
    pub tls: Option<Tls>,
    /// The agents' heartbeat interval (for the log).
    pub keep_alive: Duration,
}

impl ServeConfig {
    /// Checks `args`.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn from_args(args: &ServeArgs, env: &dyn Environment) -> Result<Self, ConfigError> {
        let (min, max) = parse_nnodes(&args.nnodes)?;
        let conf = parse_rdzv_conf(&args.rdzv_conf)?;
        check_rdzv_conf(&conf)?;
        let (settings, keep_alive) = round_settings(&conf, min, max)?;
        let host = args.host.trim_start_matches('[').trim_end_matches(']');
        let listen = format!("{host}:{}", args.port)
            .parse()
            .or_else(|_| format!("[{host}]:{}", args.port).parse())
            .map_err(|_| {
                ConfigError::RdzvValue(format!(
                    "--host {:?} is not an IP address to listen on",
                    args.host
                ))
            })?;
        Ok(Self {
            listen,
            settings,
            token: token(&conf, env)?,
            tls: tls(&conf)?,
            keep_alive,
        })
    }
}
