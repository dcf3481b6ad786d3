//! `--nnodes MIN:MAX` with `--rdzv-backend c10d` or `etcd`: the flags and `--rdzv-conf` keys
//! resolved into an [`ElasticSpec`], with torchrun's defaults (join 600 s, last call 30 s,
//! keep-alive 5 s × 3, endpoint port 29400; etcd's 2379).

use std::time::Duration;

use crate::configuration::cli::Args;
use crate::configuration::config::{ConfigError, Environment};
use crate::configuration::flags::{parse_endpoint, seconds};
use crate::rendezvous::elastic::{Backend, ElasticSpec};
use crate::rendezvous::etcd;
use crate::rendezvous::round::Settings;
use crate::rendezvous::service::{Tls, Token, TOKEN_ENV};

/// torchrun's c10d port.
const DEFAULT_PORT: u16 = 29400;

/// `--standalone`: torchrun's choice, ferrun's rendezvous service on a free loopback port
/// with one node (`--nnodes 1:1`), `run_id` the job's fresh id. Nothing but this agent can
/// reach it, so it has no token; the agent store stays on loopback.
///
/// # Errors
/// A `--rdzv-conf` value that cannot work.
pub(crate) fn standalone_spec(
    conf: &[(String, String)],
    run_id: &str,
    local_world_size: u32,
) -> Result<ElasticSpec, ConfigError> {
    let (settings, keep_alive) = round_settings(conf, 1, 1)?;
    Ok(ElasticSpec {
        backend: Backend::Service,
        settings,
        host: "127.0.0.1".into(),
        port: 0,
        run_id: run_id.to_owned(),
        local_world_size,
        keep_alive,
        is_host: Some(true),
        token: None,
        tls: None,
        local_addr: Some("localhost".into()),
        exit_timeout: seconds_or(conf, "exit_barrier_timeout", 300)?,
    })
}

/// The elastic rendezvous `args` ask for, or `None` for a static or single-node job.
///
/// # Errors
/// A backend that cannot do it, a missing endpoint, or a `--rdzv-conf` value that cannot work.
pub(crate) fn elastic_spec(
    args: &Args,
    conf: &[(String, String)],
    (min_nodes, max_nodes): (u32, u32),
    local_world_size: u32,
    env: &dyn Environment,
) -> Result<Option<ElasticSpec>, ConfigError> {
    let multi_node = |what: &str| ConfigError::MultiNode {
        nnodes: args.nnodes.clone(),
        what: what.to_owned(),
    };
    match args.rdzv_backend.as_str() {
        _ if max_nodes <= 1 => return Ok(None),
        "static" if min_nodes != max_nodes => {
            return Err(multi_node(
                "--rdzv-backend static: an elastic range needs --rdzv-backend c10d",
            ));
        }
        "static" => return Ok(None),
        "c10d" | "etcd" | "etcd-v2" => {}
        other => {
            return Err(ConfigError::RdzvValue(format!(
                "--rdzv-backend {other}: ferrun's elastic backends are c10d (its rendezvous service) and etcd (etcd v3; etcd-v2 is taken as the same)"
            )));
        }
    }
    if args.standalone {
        return Err(multi_node("--standalone (a single-node mode)"));
    }
    if args.rdzv_endpoint.is_empty() {
        return Err(ConfigError::RdzvValue(format!(
            "--nnodes {} with --rdzv-backend {} needs --rdzv-endpoint host:port, the same on every node: {}",
            args.nnodes,
            args.rdzv_backend,
            if args.rdzv_backend == "c10d" {
                "the address of the node (or `ferrun rendezvous serve`) that hosts the rendezvous"
            } else {
                "etcd's client address (host:port, or several, comma-separated)"
            }
        )));
    }
    let (backend, host, port) = backend(args, conf)?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-:@".contains(c);
    if args.rdzv_id.is_empty() || args.rdzv_id.len() > 128 || !args.rdzv_id.chars().all(plain) {
        return Err(ConfigError::RdzvValue(format!(
            "--rdzv-id {:?}: use 1 to 128 letters, digits or . _ - : @ (the job's name, the same on every node)",
            args.rdzv_id
        )));
    }
    let (settings, keep_alive) = round_settings(conf, min_nodes, max_nodes)?;
    Ok(Some(ElasticSpec {
        backend,
        settings,
        host,
        port,
        run_id: args.rdzv_id.clone(),
        local_world_size,
        keep_alive,
        is_host: value(conf, "is_host")
            .map(|v| ["1", "true", "True", "yes", "y", "t"].contains(&v)),
        token: token(conf, env)?,
        tls: tls(conf)?,
        local_addr: args.local_addr.clone(),
        exit_timeout: seconds_or(conf, "exit_barrier_timeout", 300)?,
    }))
}

/// The backend, and the host and port the agent routes to (the first etcd endpoint).
fn backend(args: &Args, conf: &[(String, String)]) -> Result<(Backend, String, u16), ConfigError> {
    if args.rdzv_backend == "c10d" {
        let (host, port) = parse_endpoint(&args.rdzv_endpoint)?;
        return Ok((Backend::Service, host, port.unwrap_or(DEFAULT_PORT)));
    }
    let ca_given = value(conf, "tls_ca")
        .or_else(|| value(conf, "cacert"))
        .is_some();
    let tls = ca_given
        || value(conf, "protocol") == Some("https")
        || args.rdzv_endpoint.contains("https://");
    let mut endpoints = Vec::new();
    for one in args.rdzv_endpoint.split(',').map(str::trim) {
        let bare = one.strip_prefix("https://").unwrap_or(one);
        if tls && bare.starts_with("http://") {
            return Err(ConfigError::RdzvValue(format!(
                "--rdzv-endpoint {one}: plain http, but TLS was asked for (https://, protocol=https or a CA); give every etcd endpoint as https://"
            )));
        }
        let (host, port) = parse_endpoint(bare.strip_prefix("http://").unwrap_or(bare))?;
        endpoints.push((host, port.unwrap_or(etcd::DEFAULT_PORT)));
    }
    if tls && !ca_given {
        return Err(ConfigError::RdzvValue(
            "etcd over https needs the CA that signed etcd's certificate: give --rdzv-conf cacert=PATH (and cert=, key= when etcd checks clients)".into(),
        ));
    }
    let prefix = value(conf, "etcd_prefix").unwrap_or(etcd::DEFAULT_PREFIX);
    if !prefix.starts_with('/') || prefix.len() > 256 || prefix.chars().any(char::is_whitespace) {
        return Err(ConfigError::RdzvValue(format!(
            "--rdzv-conf etcd_prefix={prefix:?}: give a key prefix that starts with / (at most 256 bytes, no spaces)"
        )));
    }
    let (host, port) = endpoints[0].clone();
    let backend = Backend::Etcd {
        urls: etcd::urls(&endpoints, tls),
        prefix: prefix.to_owned(),
    };
    Ok((backend, host, port))
}

fn value<'a>(conf: &'a [(String, String)], key: &str) -> Option<&'a str> {
    conf.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn seconds_or(conf: &[(String, String)], key: &str, default: u64) -> Result<Duration, ConfigError> {
    match value(conf, key) {
        Some(v) => seconds(&format!("--rdzv-conf {key}"), v),
        None => Ok(Duration::from_secs(default)),
    }
}

/// The round's parameters from `--rdzv-conf` (torchrun's keys and defaults), and the
/// heartbeat interval.
///
/// # Errors
/// A value that cannot work.
pub fn round_settings(
    conf: &[(String, String)],
    min_nodes: u32,
    max_nodes: u32,
) -> Result<(Settings, Duration), ConfigError> {
    let keep_alive = seconds_or(conf, "keep_alive_interval", 5)?;
    if keep_alive.is_zero() {
        return Err(ConfigError::RdzvValue(
            "--rdzv-conf keep_alive_interval=0: heartbeats need an interval above 0".into(),
        ));
    }
    let attempts = match value(conf, "keep_alive_max_attempt") {
        Some(v) => v.parse::<u32>().ok().filter(|&n| n >= 1).ok_or_else(|| {
            ConfigError::RdzvValue(format!(
                "--rdzv-conf keep_alive_max_attempt={v}: expected a whole number, 1 or more"
            ))
        })?,
        None => 3,
    };
    let join_timeout = match value(conf, "join_timeout").or(value(conf, "timeout")) {
        Some(v) => seconds("--rdzv-conf join_timeout", v)?,
        None => Duration::from_secs(600),
    };
    let settings = Settings {
        min_nodes,
        max_nodes,
        join_timeout,
        last_call_timeout: seconds_or(conf, "last_call_timeout", 30)?,
        heartbeat_timeout: keep_alive.saturating_mul(attempts),
    };
    Ok((settings, keep_alive))
}

/// TLS from `--rdzv-conf tls_ca=…` (and `tls_cert`, `tls_key` to serve); `None` without
/// `tls_ca`.
///
/// # Errors
/// A file that cannot be used, or a certificate without a CA to check it by.
pub fn tls(conf: &[(String, String)]) -> Result<Option<Tls>, ConfigError> {
    // torchrun's etcd backends name them cacert, cert and key.
    let path = |key: &'static str, torch: &'static str| {
        value(conf, key)
            .map(|v| (key, v))
            .or_else(|| value(conf, torch).map(|v| (torch, v)))
            .map(|(k, v)| (k, std::path::PathBuf::from(v)))
    };
    let (cert, key) = (path("tls_cert", "cert"), path("tls_key", "key"));
    match path("tls_ca", "cacert") {
        Some((ca_key, ca)) => Tls::load(cert, key, (ca_key, &ca))
            .map(Some)
            .map_err(ConfigError::RdzvValue),
        None if cert.is_some() || key.is_some() => Err(ConfigError::RdzvValue(
            "--rdzv-conf tls_cert/tls_key need tls_ca too: every node checks the host (or etcd) against that CA".into(),
        )),
        None => Ok(None),
    }
}

/// The job's token: `--rdzv-conf token=…`, else [`TOKEN_ENV`].
///
/// # Errors
/// A token too short or with characters a header cannot carry.
pub fn token(
    conf: &[(String, String)],
    env: &dyn Environment,
) -> Result<Option<Token>, ConfigError> {
    match value(conf, "token")
        .map(str::to_owned)
        .or_else(|| env.var(TOKEN_ENV))
    {
        Some(text) => Token::new(&text).map(Some).map_err(ConfigError::RdzvValue),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::configuration::cli::parse;
    use crate::configuration::config::{Environment, LaunchConfig};
    use crate::configuration::nproc::Devices;

    struct Env(PathBuf);

    impl Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            (name == super::TOKEN_ENV).then(|| "from-the-env-0123456789".to_owned())
        }
        fn which(&self, program: &str) -> Option<PathBuf> {
            Some(PathBuf::from("/usr/bin").join(program))
        }
        fn cwd(&self) -> PathBuf {
            self.0.clone()
        }
        fn devices(&self) -> Devices {
            Devices {
                gpus: 0,
                gpu_source: "none".into(),
                cpus: 2,
            }
        }
    }

    #[test]
    fn a_torchrun_elastic_command_line_gets_torchruns_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train.py"), "").expect("write");
        let line = [
            "ferrun",
            "--nnodes",
            "2:4",
            "--nproc-per-node",
            "3",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "node0:5000",
            "--rdzv-id",
            "job-7",
            "--rdzv-conf",
            "last_call_timeout=2,keep_alive_interval=1",
            "train.py",
        ];
        let (flavor, args) = parse(line).expect("parses");
        let config =
            LaunchConfig::from_args(flavor, &args, &Env(dir.path().into())).expect("valid");
        let spec = config.elastic.expect("elastic");
        assert!(config.nodes.is_none());
        assert_eq!((spec.settings.min_nodes, spec.settings.max_nodes), (2, 4));
        assert_eq!(spec.endpoint(), "node0:5000");
        assert_eq!(spec.settings.join_timeout.as_secs(), 600);
        assert_eq!(spec.settings.last_call_timeout.as_secs(), 2);
        assert_eq!(
            spec.settings.heartbeat_timeout.as_secs(),
            3,
            "1 s x 3 attempts"
        );
        assert_eq!((spec.run_id.as_str(), spec.local_world_size), ("job-7", 3));
        assert!(
            spec.token.is_some(),
            "the token comes from FERRUN_RDZV_TOKEN"
        );
    }

    fn spec_of(line: &[&str]) -> Result<super::ElasticSpec, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train.py"), "").expect("write");
        let (flavor, args) = parse(line.iter().copied()).map_err(|e| e.to_string())?;
        LaunchConfig::from_args(flavor, &args, &Env(dir.path().into()))
            .map_err(|e| e.to_string())
            .map(|c| c.elastic.expect("elastic"))
    }

    #[test]
    fn the_etcd_backends_take_several_endpoints_with_etcds_port_by_default() {
        for name in ["etcd", "etcd-v2"] {
            let line = [
                "ferrun",
                "--nnodes",
                "1:3",
                "--rdzv-backend",
                name,
                "--rdzv-endpoint",
                "http://etcd-a:2479, etcd-b",
                "--rdzv-id",
                "job",
                "--rdzv-conf",
                "etcd_prefix=/team/jobs",
                "train.py",
            ];
            let spec = spec_of(&line).expect("valid");
            assert_eq!(
                spec.backend,
                super::Backend::Etcd {
                    urls: vec!["http://etcd-a:2479".into(), "http://etcd-b:2379".into()],
                    prefix: "/team/jobs".into(),
                }
            );
            assert_eq!((spec.host.as_str(), spec.port), ("etcd-a", 2479));
            assert!(spec.host_if_ours().expect("no hosting").is_none());
        }
    }

    #[test]
    fn standalone_is_one_node_on_a_rendezvous_service_on_a_free_loopback_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train.py"), "").expect("write");
        let line = [
            "ferrun",
            "--standalone",
            "--rdzv-backend",
            "etcd",
            "--rdzv-endpoint",
            "etcd:2379",
            "--rdzv-id",
            "ignored",
            "train.py",
        ];
        let (flavor, args) = parse(line.iter().copied()).expect("parse");
        let config =
            LaunchConfig::from_args(flavor, &args, &Env(dir.path().into())).expect("valid");
        let spec = config.elastic.as_ref().expect("through the rendezvous");
        assert_eq!(spec.backend, super::Backend::Service);
        assert_eq!((spec.host.as_str(), spec.port), ("127.0.0.1", 0));
        assert_eq!((spec.settings.min_nodes, spec.settings.max_nodes), (1, 1));
        assert_eq!(spec.is_host, Some(true));
        assert_eq!(spec.run_id, config.run_id);
        assert_ne!(spec.run_id, "ignored", "a fresh id, as torchrun's");
    }

    #[test]
    fn etcd_over_tls_takes_torchruns_cacert_cert_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n").expect("write");
            path.display().to_string()
        };
        let conf = format!(
            "cacert={},cert={},key={}",
            pem("ca"),
            pem("cert"),
            pem("key")
        );
        for endpoint in ["https://etcd-a:2379,etcd-b", "etcd-a:2379,https://etcd-b"] {
            let line = etcd_line(endpoint, &conf);
            let spec = spec_of(&line).expect("valid");
            let super::Backend::Etcd { urls, .. } = &spec.backend else {
                panic!("{:?}", spec.backend)
            };
            assert_eq!(urls, &["https://etcd-a:2379", "https://etcd-b:2379"]);
            assert!(spec.tls.is_some());
        }
    }

    /// An etcd job's command line.
    fn etcd_line<'a>(endpoint: &'a str, conf: &'a str) -> [&'a str; 12] {
        [
            "ferrun",
            "--nnodes",
            "1:3",
            "--rdzv-backend",
            "etcd",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "job",
            "--rdzv-conf",
            conf,
            "train.py",
        ]
    }

    #[test]
    fn etcd_settings_that_cannot_work_are_named() {
        let line = etcd_line;
        let err = spec_of(&line("https://etcd:2379", "last_call_timeout=1")).expect_err("no CA");
        assert!(err.contains("cacert=PATH"), "{err}");
        let err = spec_of(&line("http://a:2379,b", "protocol=https")).expect_err("mixed");
        assert!(err.contains("plain http"), "{err}");
        let err = spec_of(&line("etcd:2379", "protocol=ftp")).expect_err("protocol");
        assert!(err.contains("http or https"), "{err}");
        let err = spec_of(&line("etcd:2379", "cacert=/nonexistent/ca.pem")).expect_err("no file");
        assert!(err.contains("cacert=/nonexistent/ca.pem"), "{err}");
        let err = spec_of(&line("etcd:2379", "etcd_prefix=relative")).expect_err("prefix");
        assert!(err.contains("starts with /"), "{err}");
        let mut other = line("etcd:2379", "last_call_timeout=1");
        other[4] = "zookeeper";
        let err = spec_of(&other).expect_err("unknown backend");
        assert!(err.contains("c10d") && err.contains("etcd"), "{err}");
    }
}
