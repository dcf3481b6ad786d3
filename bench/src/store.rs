//! The agent store under load: N concurrent clients doing set/get/add/wait on loopback, against
//! ferrun's server and torch 2.13's TCPStore server (libuv backend), each in a process of its
//! own, driven by the same client (ferrun's) in the same invocation.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ferrun_collective::store::{StoreClient, StoreServer};

/// Options of `ferrun-bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Concurrent clients, comma separated.
    #[arg(long, default_value = "64,256,1024,4096", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Rounds per client; a round is set, get, add and wait (4 operations).
    #[arg(long, default_value_t = 25)]
    rounds: usize,
    /// Runs of each server, interleaved (which goes first alternates); medians and ranges shown.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// The torch 2.13 virtualenv (its python hosts torch's server).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// Load only ferrun's server (torch's takes minutes to greet thousands of clients): for
    /// tuning, with no ratio printed.
    #[arg(long)]
    ferrun_only: bool,
}

/// The hidden `store-server` subcommand: a ferrun store on a free port until stdin closes.
pub(crate) fn serve() -> anyhow::Result<()> {
    let server = StoreServer::bind("127.0.0.1:0".parse()?)?;
    println!("{}", server.local_addr().port());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

struct Peer {
    child: Child,
    port: u16,
}

impl Peer {
    fn start(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port = line
            .trim()
            .parse()
            .with_context(|| format!("server printed {line:?}"))?;
        Ok(Self { child, port })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    let python = o.venv.join("bin/python");
    ensure!(
        o.ferrun_only || python.is_file(),
        "{} not found: run scripts/setup-python.sh",
        python.display()
    );
    ensure!(o.repeats > 0, "--repeats must be at least 1");
    // 4,096 clients and two servers: far past the usual soft limit of 1,024 descriptors.
    ferrun_collective::store::server::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "store benchmark: {} rounds of set/get/add/wait per client, loopback, this machine; \
         {} interleaved runs of each server (medians, range in brackets)",
        o.rounds, o.repeats
    );
    println!(
        "{:>7}  {:<8} {:>24} {:>22} {:>8} {:>9} {:>10}",
        "clients", "server", "ops/s", "p99 µs", "p50 µs", "ops ×", "connect s"
    );
    for &n in &o.clients {
        let (mut theirs, mut mine) = (Vec::new(), Vec::new());
        for repeat in 0..o.repeats {
            eprintln!("{n} clients: run {}/{}", repeat + 1, o.repeats);
            let torch = if o.ferrun_only {
                None
            } else {
                Some(Peer::start({
                    let mut c = Command::new(&python);
                    c.args(["-c", "import sys, torch.distributed as d\ns = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\nprint(s.port, flush=True)\nsys.stdin.read()"]);
                    c
                })?)
            };
            let ours = Peer::start({
                let mut c = Command::new(std::env::current_exe()?);
                c.arg("store-server");
                c
            })?;
            // Who goes first alternates, so that a machine warming or cooling weighs on both.
            let torch_first = repeat % 2 == 0;
            if let (Some(torch), true) = (&torch, torch_first) {
                theirs.push(runtime.block_on(load(torch.port, n, o.rounds))?);
            }
            mine.push(runtime.block_on(load(ours.port, n, o.rounds))?);
            if let (Some(torch), false) = (&torch, torch_first) {
                theirs.push(runtime.block_on(load(torch.port, n, o.rounds))?);
            }
        }
        let torch_ops = Spread::of(theirs.iter().map(|l| l.ops_per_s));
        for (name, runs) in [("torch", &theirs), ("ferrun", &mine)] {
            if runs.is_empty() {
                continue;
            }
            let ops = Spread::of(runs.iter().map(|l| l.ops_per_s));
            let p99 = Spread::of(runs.iter().map(|l| l.p99_us));
            let p50 = Spread::of(runs.iter().map(|l| l.p50_us));
            let connect = Spread::of(runs.iter().map(|l| l.connect_s));
            let ratio = if name == "ferrun" && !theirs.is_empty() {
                format!("{:.2}", ops.median / torch_ops.median)
            } else {
                String::new()
            };
            println!(
                "{n:>7}  {name:<8} {:>24} {:>22} {:>8.0} {ratio:>9} {:>10.2}",
                ops.show(0),
                p99.show(0),
                p50.median,
                connect.median
            );
        }
    }
    println!(
        "ops × = ferrun / torch median ops/s (goal ≥ 1.2 at every client count, with a lower p99)"
    );
    Ok(())
}

/// Median and range of a few runs.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        let median = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn show(&self, digits: usize) -> String {
        format!(
            "{:.digits$} [{:.digits$}–{:.digits$}]",
            self.median, self.min, self.max
        )
    }
}

struct Load {
    /// Seconds until every client was connected (handshake and ping answered).
    connect_s: f64,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn load(port: u16, clients: usize, rounds: usize) -> anyhow::Result<Load> {
    let timeout = Duration::from_secs(60);
    // All clients connect at once, as a job's workers do.
    let connect_started = Instant::now();
    // torch's server greets concurrent clients slowly (about 0.1 s each here): wait for it.
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
        client.set_timeout(timeout);
        connected.push(client);
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let start = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(rounds * 4);
                for round in 0..rounds {
                    let key = format!("k/{i}/{round}");
                    let t = Instant::now();
                    c.set(&key, b"0123456789abcdef").await?;
                    latencies.push(t.elapsed());
                    let t = Instant::now();
                    let got = c.get(&key).await?;
                    latencies.push(t.elapsed());
                    ensure!(
                        got == b"0123456789abcdef",
                        "get {key} gave {got:?}: a wrong result"
                    );
                    let t = Instant::now();
                    c.add("counter", 1).await?;
                    latencies.push(t.elapsed());
                    let t = Instant::now();
                    c.wait(&[&key], timeout).await?;
                    latencies.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(clients * rounds * 4);
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    let mut check = StoreClient::connect("127.0.0.1", port, timeout).await?;
    let total = check.add("counter", 0).await?;
    ensure!(
        total == (clients * rounds) as i64,
        "the counter reached {total}, not {}: a wrong result",
        clients * rounds
    );
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok(Load {
        connect_s,
        ops_per_s: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
