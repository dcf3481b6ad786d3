//! The store benchmark's clients: processes of their own (a job's workers are processes, and
//! thousands of clients in one process measure that process's scheduler more than the
//! server), each holding a share of the connections on a single-threaded runtime.
//!
//! A client process connects its share, says `connected <seconds>`, waits for `go` on stdin,
//! runs its rounds and answers `done <start ns> <end ns> <count>` (CLOCK_MONOTONIC, which every
//! process on the host shares) followed by `count` latencies as little-endian u64 nanoseconds.
//!
//! # Trust
//! The parent checks what a client process says: the count must be the one it asked for, the
//! times must be ordered; anything else is an error naming the process.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ferrun_collective::store::StoreClient;

/// The value every `set` writes and every `get` must read back.
const VALUE: &[u8] = b"0123456789abcdef";

/// Options of the hidden `store-clients` subcommand (one client process).
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// The store's port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// Connections this process holds.
    #[arg(long)]
    clients: usize,
    /// The first client's number (keys are `k/<client>/<round>`, distinct across processes).
    #[arg(long)]
    first: usize,
    /// Rounds per client: set, get, add and wait.
    #[arg(long)]
    rounds: usize,
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, so the parent can
/// take the earliest start and the latest end across client processes.
fn monotonic_ns() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(t.tv_sec())? * 1_000_000_000 + u64::try_from(t.tv_nsec())?)
}

/// The `store-clients` subcommand: one client process.
pub(crate) fn serve(o: &Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let connected = runtime.block_on(connect(o.port, o.clients))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "connected {}", started.elapsed().as_secs_f64())?;
    stdout.flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    ensure!(go.trim() == "go", "expected `go` on stdin, got {go:?}");
    let start = monotonic_ns()?;
    let latencies = runtime.block_on(rounds(connected, o.first, o.rounds))?;
    let end = monotonic_ns()?;
    writeln!(stdout, "done {start} {end} {}", latencies.len())?;
    let mut bytes = Vec::with_capacity(latencies.len() * 8);
    for l in &latencies {
        bytes.extend_from_slice(&l.to_le_bytes());
    }
    stdout.write_all(&bytes)?;
    stdout.flush()?;
    Ok(())
}

async fn connect(port: u16, clients: usize) -> anyhow::Result<Vec<StoreClient>> {
    // All at once, as a job's workers connect; a slow server greeting is waited for.
    let connecting: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(StoreClient::connect(
                "127.0.0.1",
                port,
                Duration::from_secs(900),
            ))
        })
        .collect();
    let mut connected = Vec::with_capacity(clients);
    for c in connecting {
        let mut client = c.await??;
        client.set_timeout(Duration::from_secs(60));
        connected.push(client);
    }
    Ok(connected)
}

async fn rounds(
    clients: Vec<StoreClient>,
    first: usize,
    rounds: usize,
) -> anyhow::Result<Vec<u64>> {
    // The smoke test's check that a wrong result fails the run: one client writes a wrong value.
    let spoil = std::env::var_os("FERRUN_BENCH_SPOIL").is_some() && first == 0;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let value: &[u8] = if spoil && i == 0 { b"spoiled" } else { VALUE };
                let mut latencies = Vec::with_capacity(rounds * 4);
                let mut timed = |t: Instant| latencies.push(elapsed_ns(t));
                for round in 0..rounds {
                    let key = format!("k/{}/{round}", first + i);
                    let t = Instant::now();
                    c.set(&key, value).await?;
                    timed(t);
                    let t = Instant::now();
                    let got = c.get(&key).await?;
                    timed(t);
                    ensure!(got == VALUE, "get {key} gave {got:?}: a wrong result");
                    let t = Instant::now();
                    c.add("counter", 1).await?;
                    timed(t);
                    let t = Instant::now();
                    c.wait(&[&key], Duration::from_secs(60)).await?;
                    timed(t);
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len() * rounds * 4);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

fn elapsed_ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A running client process, seen from the parent.
struct Process {
    child: Child,
    out: BufReader<ChildStdout>,
    expected: usize,
}

/// What all client processes measured together in one run.
pub(super) struct Measured {
    /// Seconds until the slowest process had connected all its clients.
    pub(super) connect_s: f64,
    /// From the first process's start to the last one's end.
    pub(super) elapsed: Duration,
    /// Every operation's latency in nanoseconds, sorted.
    pub(super) latencies: Vec<u64>,
    /// CPU seconds the client processes used from `go` to done.
    pub(super) cpu_s: f64,
}

/// Spreads `clients` over `processes` client processes against the store on `port`, lets them
/// connect, starts their rounds together, and gathers what they measured.
pub(super) fn run(
    port: u16,
    clients: usize,
    processes: usize,
    rounds: usize,
) -> anyhow::Result<Measured> {
    let processes = processes.clamp(1, clients.max(1));
    let exe = std::env::current_exe()?;
    let mut spawned = Vec::with_capacity(processes);
    let mut first = 0;
    for p in 0..processes {
        // The remainder goes one each to the first processes.
        let share = clients / processes + usize::from(p < clients % processes);
        let mut child = Command::new(&exe)
            .arg("store-clients")
            .args(["--port", &port.to_string()])
            .args(["--clients", &share.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--rounds", &rounds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a client process")?;
        let out = BufReader::new(child.stdout.take().context("client stdout")?);
        spawned.push(Process {
            child,
            out,
            expected: share * rounds * 4,
        });
        first += share;
    }
    let mut connect_s = 0f64;
    for (p, proc) in spawned.iter_mut().enumerate() {
        let line = read_line(&mut proc.out, p)?;
        let secs = line
            .strip_prefix("connected ")
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("client process {p} said {line:?}, not `connected <s>`"))?;
        connect_s = connect_s.max(secs);
    }
    let cpu_before: f64 = spawned
        .iter()
        .map(|p| super::peer::cpu_seconds(p.child.id()))
        .sum();
    for proc in &mut spawned {
        let stdin = proc.child.stdin.as_mut().context("client stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
    }
    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut latencies = Vec::with_capacity(clients * rounds * 4);
    let mut cpu_after = 0.0;
    for (p, proc) in spawned.iter_mut().enumerate() {
        let line = read_line(&mut proc.out, p)?;
        let fields: Vec<&str> = line.split(' ').collect();
        let parsed = match fields.as_slice() {
            ["done", s, e, n] => s
                .parse::<u64>()
                .ok()
                .zip(e.parse::<u64>().ok())
                .zip(n.parse::<usize>().ok()),
            _ => None,
        };
        let Some(((s, e), n)) = parsed else {
            bail!("client process {p} said {line:?}, not `done <start> <end> <count>`");
        };
        ensure!(
            n == proc.expected && s <= e,
            "client process {p} reported {n} operations over {s}..{e} ns; {} were asked for",
            proc.expected
        );
        // Read before it is reaped: an exited child's stat keeps its times until then.
        cpu_after += super::peer::cpu_seconds(proc.child.id());
        let mut bytes = vec![0u8; n * 8];
        proc.out
            .read_exact(&mut bytes)
            .with_context(|| format!("client process {p}'s latencies"))?;
        latencies.extend(
            bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())),
        );
        start = start.min(s);
        end = end.max(e);
    }
    for (p, mut proc) in spawned.into_iter().enumerate() {
        drop(proc.child.stdin.take());
        let status = proc.child.wait()?;
        ensure!(status.success(), "client process {p} failed: {status}");
    }
    latencies.sort_unstable();
    Ok(Measured {
        connect_s,
        elapsed: Duration::from_nanos(end.saturating_sub(start)),
        latencies,
        cpu_s: cpu_after - cpu_before,
    })
}

fn read_line(out: &mut BufReader<ChildStdout>, p: usize) -> anyhow::Result<String> {
    let mut line = String::new();
    // A line is short; a process that writes more without a newline is broken.
    out.by_ref().take(256).read_line(&mut line)?;
    if line.is_empty() {
        bail!("client process {p} ended without a word (see its error above)");
    }
    Ok(line.trim_end().to_owned())
}
