//! Local processes of a local run: a replica's container command as a process (its
//! environment, service names pointing at this machine, its own process group), its output
//! prefixed by pod, its exit as an event; and the signals local mode awaits itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;

use super::{Event, LocalError};

/// Turns SIGINT, SIGTERM and SIGHUP into events of the main loop: blocked in this thread (and
/// so in every thread started after), awaited by one of their own. Children start with an
/// empty signal mask, so they still get signals.
pub(crate) fn forward_signals(events: mpsc::Sender<Event>) {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            let _ = events.send(Event::Signal(signal as i32));
        }
    });
}

/// A pod's training container as a local process.
pub(crate) struct Proc {
    /// The pod's name (prefixes its output).
    pub(crate) name: String,
    command: Command,
    /// The running process (its own process group).
    pub(crate) pid: Option<u32>,
    /// Bumped per start, so that a late exit of an old process is not taken for the new one.
    pub(crate) generation: u32,
}

impl Proc {
    /// The process `container` of `pod` runs: its command and args, its environment (values,
    /// and fields of the pod's own metadata) with the names in `hosts` pointing at this machine.
    /// `hosts` lists longer names first (`a-0.a` before `a-0`).
    pub(crate) fn new(
        pod: &Pod,
        container: &Container,
        hosts: &[String],
    ) -> Result<Self, LocalError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let fail = |why: String| LocalError::Container {
            pod: name.clone(),
            why,
        };
        let mut argv = container.command.clone().unwrap_or_default();
        if argv.is_empty() {
            return Err(fail(format!("container {:?} has no command: local mode runs the container's command, not its image's entrypoint; give `command:`", container.name)));
        }
        argv.extend(container.args.clone().unwrap_or_default());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for var in container.env.clone().unwrap_or_default() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from)) => from
                    .field_ref
                    .as_ref()
                    .and_then(|f| field(&pod.metadata, &f.field_path))
                    .ok_or_else(|| fail(format!("variable {} comes from a valueFrom that local mode cannot resolve (only fields of the pod's metadata): give it a value", var.name)))?,
                (None, None) => String::new(),
            };
            let value = hosts
                .iter()
                .fold(value, |value, host| replace_host(&value, host));
            cmd.env(var.name, value);
        }
        if let Some(dir) = &container.working_dir {
            cmd.current_dir(dir);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        unblock_signals(&mut cmd);
        Ok(Self {
            name,
            command: cmd,
            pid: None,
            generation: 0,
        })
    }
}

/// A field of the pod's metadata as a `fieldRef` names it: `metadata.name`,
/// `metadata.namespace`, `metadata.annotations['k']`, `metadata.labels['k']`.
fn field(meta: &ObjectMeta, path: &str) -> Option<String> {
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
        _ => {
            if let Some(key) = keyed("metadata.annotations") {
                meta.annotations.as_ref()?.get(&key).cloned()
            } else {
                meta.labels
                    .as_ref()?
                    .get(&keyed("metadata.labels")?)
                    .cloned()
            }
        }
    }
}

/// Starts the process with no signal blocked: local mode blocks SIGINT/SIGTERM/SIGHUP to await
/// them itself (`forward_signals`), and a blocked mask is inherited across exec.
#[allow(unsafe_code)]
fn unblock_signals(cmd: &mut Command) {
    // SAFETY: between fork and exec the closure only calls pthread_sigmask, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)
        });
    }
}

/// `value` with the host `name` (a whole host name, not part of a longer one) as 127.0.0.1.
fn replace_host(value: &str, name: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find(name) {
        let after = &rest[at + name.len()..];
        let whole = !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            && !rest[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-');
        out.push_str(&rest[..at]);
        out.push_str(if whole { "127.0.0.1" } else { name });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Starts (or restarts) process `i`; its exit arrives on `exits`.
pub(crate) fn start(
    replica: &mut Proc,
    i: usize,
    exits: &mpsc::Sender<Event>,
) -> Result<(), LocalError> {
    let mut child = replica
        .command
        .spawn()
        .map_err(|source| LocalError::Spawn {
            pod: replica.name.clone(),
            program: replica.command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    replica.generation += 1;
    let prefix = format!("[{}]", replica.name);
    let streams: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut readers = Vec::new();
    for stream in streams {
        let prefix = prefix.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{prefix}: {line}");
            }
        }));
    }
    let (generation, exits) = (replica.generation, exits.clone());
    replica.pid = Some(child.id());
    std::thread::spawn(move || {
        let code = match child.wait() {
            Ok(s) => s.code().or(s.signal().map(|n| 128 + n)).unwrap_or(1),
            Err(_) => 1,
        };
        // The output first, so that it precedes the status it leads to.
        for r in readers {
            let _ = r.join();
        }
        let _ = exits.send(Event::Exited(i, generation, code));
    });
    Ok(())
}

/// Stops every process still running: SIGTERM to its group, a grace as the kubelet gives,
/// then SIGKILL for what is left. `procs[i]` is the process whose exits arrive as index `i`.
pub(crate) fn stop_all(procs: &mut [&mut Proc], exited: &mpsc::Receiver<Event>) {
    for pid in procs.iter().filter_map(|p| p.pid) {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let until = Instant::now() + STOP_GRACE;
    while procs.iter().any(|p| p.pid.is_some()) {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(event) = exited.recv_timeout(left) else {
            break;
        };
        let Event::Exited(i, generation, _) = event else {
            continue;
        };
        if let Some(p) = procs.get_mut(i).filter(|p| p.generation == generation) {
            p.pid = None;
        }
    }
    for pid in procs.iter_mut().filter_map(|p| p.pid.take()) {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// How long a stopped pod may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::replace_host;

    #[test]
    fn only_whole_host_names_are_replaced() {
        assert_eq!(
            replace_host("j-worker-1:23456", "j-worker-1"),
            "127.0.0.1:23456"
        );
        assert_eq!(
            replace_host("j-worker-10:23456", "j-worker-1"),
            "j-worker-10:23456"
        );
        assert_eq!(replace_host("xj-worker-1", "j-worker-1"), "xj-worker-1");
        assert_eq!(
            replace_host("a=j-worker-1,b=j-worker-1", "j-worker-1"),
            "a=127.0.0.1,b=127.0.0.1"
        );
    }
}
