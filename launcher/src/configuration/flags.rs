//! Parsers for flag values: `--nnodes`, endpoints, `--rdzv-conf`, signal lists, seconds and
//! torchrun's comma-separated lists. Each error names the flag and what it accepts.

use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::configuration::config::ConfigError;

/// Parses `--nnodes`: `N` or `MIN:MAX`.
///
/// # Errors
/// [`ConfigError::Nnodes`] unless `0 < MIN <= MAX`.
pub fn parse_nnodes(value: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::Nnodes(value.to_owned());
    let int = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
    let (min, max) = match value.split(':').collect::<Vec<_>>().as_slice() {
        [n] => (int(n)?, int(n)?),
        [min, max] => (int(min)?, int(max)?),
        _ => return Err(bad()),
    };
    if min == 0 || min > max || max > crate::rendezvous::round::MAX_NODES {
        return Err(bad());
    }
    Ok((min, max))
}

/// Parses `host[:port]`, `[v6]` or `[v6]:port` (torch's `parse_rendezvous_endpoint`).
pub(crate) fn parse_endpoint(value: &str) -> Result<(String, Option<u16>), ConfigError> {
    let bad = || ConfigError::Endpoint(value.to_owned());
    let value_t = value.trim();
    if value_t.is_empty() {
        return Ok(("localhost".to_owned(), None));
    }
    let (host, port) = if let Some(rest) = value_t.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match value_t.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(bad()),
            None => (value_t, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '%'));
    if !host_ok {
        return Err(bad());
    }
    let port = match port {
        None => None,
        Some(p) if (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| bad())?)
        }
        Some(_) => return Err(bad()),
    };
    Ok((host.to_owned(), port))
}

pub(crate) fn parse_rdzv_conf(value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                Ok((k.trim().to_owned(), v.trim().to_owned()))
            }
            _ => Err(ConfigError::RdzvConf(value.to_owned())),
        })
        .collect()
}

/// The `--rdzv-conf` keys torchrun's backends read, and ferrun's own.
const RDZV_KEYS: [&str; 21] = [
    "token",
    "etcd_prefix",
    "protocol",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "cert",
    "key",
    "cacert",
    "join_timeout",
    "timeout",
    "last_call_timeout",
    "close_timeout",
    "read_timeout",
    "heartbeat",
    "keep_alive_interval",
    "keep_alive_max_attempt",
    "exit_barrier_timeout",
    "is_host",
    "use_libuv",
    "store_type",
];

/// Checks every `--rdzv-conf` key and value: known keys, numbers where numbers go, booleans
/// where booleans go.
pub(crate) fn check_rdzv_conf(conf: &[(String, String)]) -> Result<(), ConfigError> {
    for (key, value) in conf {
        let bad = |what: &str| ConfigError::RdzvValue(format!("--rdzv-conf {key}={value}: {what}"));
        match key.as_str() {
            "is_host" | "use_libuv" => {
                if !["0", "1", "true", "false", "True", "False", "yes", "no"]
                    .contains(&value.as_str())
                {
                    return Err(bad("expected a boolean (true/false, 1/0)"));
                }
            }
            "protocol" if value != "http" && value != "https" => {
                return Err(bad("expected http or https"));
            }
            "store_type" | "token" | "tls_cert" | "tls_key" | "tls_ca" | "cert" | "key"
            | "cacert" | "etcd_prefix" | "protocol" => {}
            k if RDZV_KEYS.contains(&k) => {
                if !value
                    .parse::<f64>()
                    .is_ok_and(|v| v.is_finite() && v >= 0.0)
                {
                    return Err(bad("expected a number of seconds (or attempts), 0 or more"));
                }
            }
            _ => {
                return Err(bad(&format!(
                    "unknown key; known keys are {}",
                    RDZV_KEYS.join(", ")
                )))
            }
        }
    }
    Ok(())
}

/// Signals the launcher can catch and pass on without losing its own footing: not SIGKILL or
/// SIGSTOP (no process can catch them), not SIGCHLD (how the launcher learns of exits), not the
/// faults (SIGSEGV, SIGBUS, …) nor job control (SIGTSTP, SIGCONT, …).
pub(crate) const FORWARDABLE: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
];

pub(crate) fn parse_signals(value: &str) -> Result<Vec<Signal>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| match Signal::from_str(name) {
            Ok(sig) if FORWARDABLE.contains(&sig) => Ok(sig),
            Ok(_) => Err(ConfigError::Unhandleable(name.to_owned())),
            Err(_) => Err(ConfigError::Signal(name.to_owned())),
        })
        .collect()
}

pub(crate) fn seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::ShutdownTimeout(format!("{flag} {value:?}"));
    let secs: f64 = value.trim().parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Splits on `,`, with `,,` standing for a literal comma (torchrun's `comma_separated_list`).
pub(crate) fn comma_separated(value: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items.into_iter().filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_filters_parse_like_torch() {
        assert_eq!(
            parse_endpoint("node1:29400").expect("ok"),
            ("node1".into(), Some(29400))
        );
        assert_eq!(
            parse_endpoint("[fe80::1%eth0]").expect("ok"),
            ("fe80::1%eth0".into(), None)
        );
        assert!(parse_endpoint("a b:1").is_err());
        assert_eq!(comma_separated("apple,or,,ange,"), ["apple", "or,ange"]);
        assert_eq!(parse_nnodes("2").expect("ok"), (2, 2));
        assert_eq!(parse_nnodes("1:4").expect("ok"), (1, 4));
    }
}
