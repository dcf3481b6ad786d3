//! What a closed pipe, a hostile store client, a short descriptor limit or a SIGKILL must not
//! do to the launcher: crash it, spin it, or leave processes behind.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    alive, ferrun, kill_all, run, run_child, stdout_lines, survivors_after, text, wait_for_lines,
};

/// A job of one `sh` worker that prints its store port, then waits for stdin to close.
fn waiting_job(cmd: &mut Command) {
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        "1",
        "--no-python",
        "sh",
        "-c",
        "echo port=$MASTER_PORT; read x; exit 0",
    ]);
}

/// `ferrun` running [`waiting_job`] under `prlimit` with `limit`.
fn under_prlimit(limit: &str) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(limit).arg(env!("CARGO_BIN_EXE_ferrun"));
    for (k, v) in ferrun().get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    waiting_job(&mut cmd);
    cmd
}

/// A fresh connection's handshake and PING with `nonce`, as any TCPStore client: the echo.
fn ping(port: u16, nonce: u32) -> std::io::Result<u32> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&0x3C85_F7CEu32.to_le_bytes());
    bytes.push(13);
    bytes.extend_from_slice(&nonce.to_le_bytes());
    s.write_all(&bytes)?;
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo)?;
    Ok(u32::from_le_bytes(echo))
}

fn port_of(lines: &std::sync::mpsc::Receiver<String>) -> u16 {
    let line = wait_for_lines(lines, "port=", 1, Duration::from_secs(30)).remove(0);
    line.rsplit('=')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("port")
}

#[test]
fn a_closed_stderr_or_stdout_never_crashes_a_successful_launch() {
    // As `ferrun … 2>&1 | head -1`: the reader goes away after one line.
    let mut child = ferrun()
        .args([
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            "sh",
            "-c",
            "echo a; echo b; echo c",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("ferrun");
    drop(child.stdout.take());
    drop(child.stderr.take());
    let out = run_child(child, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(0),
        "the job succeeded: {:?}",
        out.status
    );
}

#[test]
fn log_lines_in_pipes_carry_no_colour() {
    let out = run(
        {
            let mut cmd = ferrun();
            cmd.args([
                "--standalone",
                "--nproc-per-node",
                "1",
                "--no-python",
                "true",
            ]);
            cmd
        },
        Duration::from_secs(30),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}') && !stdout.contains('\u{1b}'),
        "{stderr:?}"
    );
}

#[test]
fn the_store_of_a_single_node_job_listens_on_loopback_only() {
    let mut child = ferrun();
    waiting_job(&mut child);
    let mut child = child
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .expect("ferrun");
    let lines = stdout_lines(&mut child);
    let port = port_of(&lines);
    let listening = std::fs::read_to_string("/proc/net/tcp").expect("tcp")
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let hex = format!(":{port:04X} ");
    let ours: Vec<&str> = listening
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(hex.trim_end()))
                && l.split_whitespace().nth(3) == Some("0A")
        })
        .collect();
    drop(child.stdin.take());
    let out = run_child(child, Duration::from_secs(30));
    assert!(out.status.success());
    assert_eq!(ours.len(), 1, "{ours:?}");
    // 0100007F:port is 127.0.0.1.
    assert!(
        ours[0]
            .split_whitespace()
            .nth(1)
            .is_some_and(|a| a.starts_with("0100007F:")),
        "{ours:?}"
    );
}

/// The launcher's address-space use, from /proc.
fn vm_size_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .expect("VmSize in /proc/<pid>/status")
}

#[test]
fn store_clients_declaring_huge_values_under_an_address_space_limit_kill_nothing() {
    let mut cmd = under_prlimit("--as=1500000000");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .expect("ferrun under prlimit");
    let lines = stdout_lines(&mut child);
    let port = port_of(&lines);
    // 100 connections, each a handshake and a SET declaring a 256 MiB value, then silence.
    let mut hostile = Vec::new();
    for _ in 0..100 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&0x3C85_F7CEu32.to_le_bytes());
        bytes.push(1);
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(b'k');
        bytes.extend_from_slice(&(256u64 << 20).to_le_bytes());
        s.write_all(&bytes).expect("declare");
        hostile.push(s);
    }
    // The store still answers (a PING through a fresh connection), and the launcher lives.
    assert_eq!(ping(port, 42).expect("the store answers"), 42);
    let vm = vm_size_kb(child.id());
    drop(hostile);
    drop(child.stdin.take());
    let out = run_child(child, Duration::from_secs(30));
    let (_, stderr) = text(&out);
    assert!(
        out.status.success(),
        "the worker and the launcher survived: {stderr}"
    );
    assert!(vm < 1_500_000, "address space {vm} kB");
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(") ").expect("stat").1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

#[test]
fn out_of_file_descriptors_the_store_waits_instead_of_spinning() {
    let mut cmd = under_prlimit("--nofile=64:64");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .expect("ferrun under prlimit");
    let lines = stdout_lines(&mut child);
    let port = port_of(&lines);
    let pid = child.id();
    // 100 clients against 64 descriptors: the launcher runs out.
    let clients: Vec<_> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let before = cpu_seconds(pid);
    let started = Instant::now();
    // Let the accept loop face the shortage for a while (a spinning one burns a core).
    let mut probe = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut sink = [0u8; 1];
    let _ = probe.read(&mut sink);
    let spent = cpu_seconds(pid) - before;
    let window = started.elapsed().as_secs_f64();
    // Once clients go, new ones are served.
    drop(clients);
    assert_eq!(
        ping(port, 7).expect("served again once descriptors free up"),
        7
    );
    drop(child.stdin.take());
    let out = run_child(child, Duration::from_secs(30));
    let (_, stderr) = text(&out);
    let accept_lines = stderr.lines().filter(|l| l.contains("accept")).count();
    assert!(out.status.success(), "{stderr}");
    assert!(
        spent < 0.5 * window,
        "the accept loop used {spent:.2} s of CPU in {window:.2} s"
    );
    assert!(
        accept_lines <= 4,
        "{accept_lines} lines about accepting: {stderr}"
    );
}

#[test]
fn a_sigkilled_launcher_leaves_no_grandchild_behind() {
    // The worker starts a child in its own group and one in a session of its own (setsid).
    let mut child = ferrun()
        .args([
            "--standalone",
            "--nproc-per-node",
            "1",
            "--no-python",
            "sh",
            "-c",
            "sleep 1000 & echo bg=$!; setsid sleep 1001 & echo sid=$!; echo ready; wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("ferrun");
    let lines = stdout_lines(&mut child);
    let mut pids = Vec::new();
    for key in ["bg=", "sid="] {
        let line = wait_for_lines(&lines, key, 1, Duration::from_secs(30)).remove(0);
        pids.push(
            line.rsplit('=')
                .next()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .expect("pid"),
        );
    }
    wait_for_lines(&lines, "ready", 1, Duration::from_secs(30));
    assert!(pids.iter().all(|&p| alive(p)));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the launcher");
    let _ = child.wait();
    let left = survivors_after(&pids, Duration::from_secs(20));
    kill_all(&left);
    assert!(
        left.is_empty(),
        "left running after the launcher was killed: {left:?}"
    );
}

#[test]
fn arguments_that_are_not_utf8_pass_through_untouched() {
    use std::os::unix::ffi::OsStrExt;
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let mut cmd = ferrun();
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        "1",
        "--no-python",
        "sh",
        "-c",
        "printf '%s' \"$1\" | od -An -tx1",
        "sh",
    ])
    .arg(odd);
    let out = run(cmd, Duration::from_secs(30));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("63 61 66 e9"), "{stdout}");
}
