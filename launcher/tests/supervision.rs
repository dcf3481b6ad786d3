//! Supervision with real processes: restarts, exit codes, failure reports, signals, and no
//! worker outliving the launcher.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{ferrun, kill_all, run, stdout_lines, survivors_after, text, wait_for_lines, worker};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_failed_worker_is_restarted_once_and_the_run_succeeds() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        &worker("fail_once.py"),
    ]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for rank in [0, 1] {
        assert!(
            stdout.contains(&format!("[default{rank}]:rank {rank} attempt 1")),
            "{stdout}"
        );
    }
    assert!(
        stderr.contains("rank 1 (node 0, host ")
            && stderr.contains("local_rank 1, pid ")
            && stderr.contains("exited with code 1; restarting it (1/1 restarts)"),
        "{stderr}"
    );
    // The summary table shows the restart for every rank.
    let rows: Vec<_> = stderr.lines().filter(|l| l.contains(" ok ")).collect();
    assert_eq!(rows.len(), 2, "{stderr}");
    assert!(
        rows.iter().all(|r| r.trim_end().ends_with(" 1")),
        "{rows:?}"
    );
}

#[test]
fn without_restarts_the_failure_exits_1_and_names_the_root_cause() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        &worker("fail_once.py"),
        "--code",
        "3",
    ]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("fail_once.py FAILED"), "{stderr}");
    let root = stderr
        .split("Root Cause (first observed failure):")
        .nth(1)
        .expect("root cause section");
    assert!(root.contains("rank      : 1 (local_rank: 1)"), "{root}");
    assert!(root.contains("exitcode  : 3"), "{root}");
}

#[test]
fn propagate_exit_code_exits_with_the_root_cause_code() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--propagate-exit-code",
        &worker("fail_once.py"),
        "--code",
        "3",
    ]);
    let out = run(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out).1);
}

#[test]
fn restarts_run_out_when_the_worker_always_fails() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        &worker("fail_once.py"),
        "--always",
    ]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("rank 1 attempt 2") && !stdout.contains("attempt 3"),
        "{stdout}"
    );
    assert!(stderr.contains("Root Cause"), "{stderr}");
}

#[test]
fn the_report_carries_the_traceback_from_the_error_file() {
    let mut cmd = ferrun();
    cmd.args(["--nproc-per-node", "2", &worker("raise_error.py")]);
    let out = run(cmd, Duration::from_secs(50));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let root = stderr
        .split("Root Cause (first observed failure):")
        .nth(1)
        .expect("root cause");
    assert!(root.contains("rank      : 1 (local_rank: 1)"), "{root}");
    assert!(
        root.contains("error_file: /") && root.contains("/attempt_0/1/error.json"),
        "{root}"
    );
    assert!(
        root.contains("in load_batch") && root.contains("ValueError: corrupt shard for rank 1"),
        "{root}"
    );
}

#[test]
fn a_sigkilled_worker_is_reported_with_its_signal_and_a_hint() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--shutdown-timeout",
        "5",
        &worker("hold.py"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    let ready = wait_for_lines(&lines, "ready", 2, LIMIT);
    let pids: Vec<i32> = ready
        .iter()
        .map(|l| l.rsplit(' ').next().expect("pid").parse().expect("int"))
        .collect();
    let victim = ready
        .iter()
        .position(|l| l.contains("ready 1 "))
        .expect("rank 1");
    kill(Pid::from_raw(pids[victim]), Signal::SIGKILL).expect("kill rank 1");
    let out = support::run_child(child, LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let root = stderr.split("Root Cause").nth(1).expect("root cause");
    assert!(
        root.contains("-9 (SIGKILL)") && root.contains("out-of-memory killer"),
        "{root}"
    );
    assert!(
        stderr.contains("stopped (SIGTERM)"),
        "rank 0 was stopped by the launcher:\n{stderr}"
    );
    kill_all(&pids);
}

#[test]
fn no_worker_survives_a_sigkilled_launcher() {
    let mut cmd = ferrun();
    cmd.args(["--nproc-per-node", "4", &worker("hold.py")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    let pids: Vec<i32> = wait_for_lines(&lines, "ready", 4, LIMIT)
        .iter()
        .map(|l| l.rsplit(' ').next().expect("pid").parse().expect("int"))
        .collect();
    child.kill().expect("SIGKILL the launcher");
    child.wait().expect("reap the launcher");
    let survivors = survivors_after(&pids, Duration::from_secs(1));
    kill_all(&survivors);
    assert!(
        survivors.is_empty(),
        "workers {survivors:?} outlived the launcher by a second"
    );
}

#[test]
fn sigterm_is_forwarded_then_sigkill_follows_the_grace_period() {
    let grace = Duration::from_millis(1500);
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--shutdown-timeout",
        "1.5",
        "--propagate-exit-code",
        &worker("hold.py"),
        "--trap-term",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    let pids: Vec<i32> = wait_for_lines(&lines, "ready", 2, LIMIT)
        .iter()
        .map(|l| l.rsplit(' ').next().expect("pid").parse().expect("int"))
        .collect();
    let sent = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM the launcher");
    // Both workers see the forwarded SIGTERM (and ignore it)...
    wait_for_lines(&lines, "got SIGTERM", 2, LIMIT);
    let out = support::run_child(child, LIMIT);
    let elapsed = sent.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // ...so only the SIGKILL after the grace period ends them.
    assert!(
        elapsed >= grace,
        "launcher exited after {elapsed:?}, before the {grace:?} grace period"
    );
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("stopped (SIGKILL)"), "{stderr}");
    assert!(survivors_after(&pids, Duration::from_secs(1)).is_empty());
}

#[test]
fn sigint_reaches_workers_that_do_not_trap_it() {
    let mut cmd = ferrun();
    cmd.args(["--nproc-per-node", "2", &worker("hold.py")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    wait_for_lines(&lines, "ready", 2, LIMIT);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT the launcher");
    let out = support::run_child(child, LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "torchrun's exit code for a signal: {stderr}"
    );
    assert!(
        stderr.contains("received SIGINT") && stderr.contains("stopped by SIGINT"),
        "{stderr}"
    );
}

#[test]
fn a_console_that_stops_reading_does_not_stall_failure_handling() {
    // Rank 0 floods stdout (far past a pipe's buffer) and then idles; rank 1 fails. Nobody reads
    // the launcher's stdout, yet it must notice rank 1, stop rank 0 and exit.
    // Rank 1 fails only once rank 0's flood is through (a FIFO orders them, no timing).
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("flooded");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let script = r#"if [ "$RANK" = 0 ]; then head -c 4000000 /dev/zero | tr '\0' 'x' | fold -w 100; echo done > "$FLOODED"; exec sleep 60; else read x < "$FLOODED"; exit 3; fi"#;
    let mut cmd = ferrun();
    cmd.env("FLOODED", &fifo);
    cmd.args([
        "--nproc-per-node",
        "2",
        "--shutdown-timeout",
        "1",
        "--no-python",
        "sh",
        "-c",
        script,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let _unread_stdout = child.stdout.take();
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = tx.send(text);
    });
    let Ok(stderr) = rx.recv_timeout(LIMIT) else {
        let _ = child.kill();
        panic!("the launcher stalled on a console that is not read");
    };
    let status = child.wait().expect("status");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exitcode  : 3"), "{stderr}");
}
