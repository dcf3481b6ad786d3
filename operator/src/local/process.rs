//! Local processes of a local run: a replica's container command as a process (its
//! environment, service names pointing at this machine, its own process group), its output
//! prefixed by pod, its exit as an event; and the signals local mode awaits itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use k8s_openapi::api::core::v1::Container;
use nix::sys::signal::{SigSet, Signal};

use super::{Event, LocalError, Replica};
use crate::crd::PyTorchJob;
use crate::lifecycle::Phase;
use crate::render;

/// Turns SIGINT, SIGTERM and SIGHUP into events of the main loop: blocked in this thread (and
/// so in every thread started after), awaited by one of their own. Children start with an
/// empty signal mask, so they still get signals.
pub(super) fn forward_signals(events: mpsc::Sender<Event>) {
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

/// The process a replica's training container runs: its command and args, its environment
/// with the pods' service names pointing at this machine.
pub(super) fn command(
    job: &PyTorchJob,
    pod: &str,
    container: &Container,
) -> Result<Command, LocalError> {
    let fail = |why: String| LocalError::Container {
        pod: pod.into(),
        why,
    };
    let mut argv = container.command.clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(fail(format!("container {:?} has no command: local mode runs the container's command, not its image's entrypoint; give `command:`", container.name)));
    }
    argv.extend(container.args.clone().unwrap_or_default());
    let services: Vec<String> = render::replicas(job)
        .into_iter()
        .map(|(rtype, i)| render::pod_name(job.job_name(), &rtype, i))
        .collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    for var in container.env.clone().unwrap_or_default() {
        let Some(mut value) = var.value else {
            return Err(fail(format!("variable {} comes from valueFrom, which local mode cannot resolve: give it a value", var.name)));
        };
        for name in &services {
            value = replace_host(&value, name);
        }
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
    Ok(cmd)
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

/// Starts (or restarts) replica `i`; its exit arrives on `exits`.
pub(super) fn start(
    replica: &mut Replica,
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
    replica.state.phase = Phase::Running;
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
