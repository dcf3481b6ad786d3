//! Elastic agents for the end-to-end tests: the command line of one, and a running one whose
//! stdout lines are awaited with a bound.

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::{ferrun, kill_all, run_child, stdout_lines, text, worker};

/// Bound on every wait; the runs take a few seconds.
pub const LIMIT: Duration = Duration::from_secs(90);

/// `ferrun` as one agent of an elastic job at `endpoint` (`--rdzv-backend c10d`); fast
/// heartbeats (0.5 s × 2) and a 30 s join timeout unless `extra` gives its own `--rdzv-conf`.
pub fn agent(nnodes: &str, endpoint: &str, extra: &[&str], script_args: &[&str]) -> Command {
    agent_of("c10d", nnodes, endpoint, extra, script_args)
}

/// [`agent`] with another `--rdzv-backend`.
pub fn agent_of(
    backend: &str,
    nnodes: &str,
    endpoint: &str,
    extra: &[&str],
    script_args: &[&str],
) -> Command {
    let conf = if extra.contains(&"--rdzv-conf") {
        &[][..]
    } else {
        &[
            "--rdzv-conf",
            "last_call_timeout=1,keep_alive_interval=0.5,keep_alive_max_attempt=2,join_timeout=30",
        ][..]
    };
    let mut cmd = ferrun();
    cmd.args(["--nnodes", nnodes, "--nproc-per-node", "1"])
        .args([
            "--rdzv-backend",
            backend,
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "el",
        ])
        .args(conf)
        .args(extra)
        .arg(worker("elastic.py"))
        .args(script_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    cmd
}

/// A running `ferrun` agent whose stdout is read line by line.
pub struct Agent {
    child: Option<Child>,
    lines: Receiver<String>,
    /// The agent's pid.
    pub pid: i32,
}

impl Agent {
    /// `cmd` on namespaced host `i` of `hosts`, its output read.
    pub fn start_on(hosts: &ferrun_tests::netns::Hosts, i: usize, cmd: &Command) -> Self {
        let mut on = hosts.on(i, cmd);
        on.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        Self::start(on)
    }

    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn ferrun");
        let lines = stdout_lines(&mut child);
        let pid = i32::try_from(child.id()).expect("pid");
        Self {
            child: Some(child),
            lines,
            pid,
        }
    }

    /// The next stdout line with `needle`; if the agent ends first, fails with its stderr.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(e) => {
                    kill_all(&[self.pid]);
                    let out = self.child.take().map(|c| run_child(c, LIMIT));
                    let stderr = out.map(|o| text(&o).1).unwrap_or_default();
                    panic!("no line with {needle:?} ({e}) after {seen:?}; the agent's stderr:\n{stderr}");
                }
            }
        }
    }

    pub fn finish(mut self) -> Output {
        run_child(self.child.take().expect("running"), LIMIT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            kill_all(&[self.pid]);
        }
    }
}

pub fn succeeded(agent: Agent, what: &str) -> String {
    let out = agent.finish();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{what}: {stdout}\n{stderr}");
    stderr
}

/// Three running agents of `--nnodes 2:3` on `hosts` (their workers run `elastic.py
/// --exit-world 2`): each says it runs in a world of 3 (`check` reads that line), host 2 is
/// lost (`lose`), and hosts 0 and 1 finish in a new round of two, not counted as a restart.
/// Returns the lost host's agent.
pub fn lose_the_third(
    hosts: &ferrun_tests::netns::Hosts,
    mut agents: Vec<Agent>,
    check: impl Fn(&str),
    lose: impl FnOnce(&ferrun_tests::netns::Hosts, &Agent),
) -> Agent {
    for a in &mut agents {
        check(&a.wait_line("world 3"));
    }
    lose(hosts, &agents[2]);
    let lost = agents.pop().expect("three");
    for a in &mut agents {
        let line = a.wait_line("world 2");
        assert!(
            line.contains("restart 0"),
            "a lost node is not a counted restart: {line}"
        );
    }
    for a in agents {
        let stderr = succeeded(a, "a survivor");
        assert!(stderr.contains("lost node(s)"), "{stderr}");
    }
    lost
}
