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
    #[arg(long, default_value = "64,256,1024", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Rounds per client; a round is set, get, add and wait (4 operations).
    #[arg(long, default_value_t = 25)]
    rounds: usize,
    /// The torch 2.13 virtualenv (its python hosts torch's server).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
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
        python.is_file(),
        "{} not found: run scripts/setup-python.sh",
        python.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "store benchmark: {} rounds of set/get/add/wait per client, loopback, this machine",
        o.rounds
    );
    println!(
        "{:>7}  {:<8} {:>12} {:>10} {:>10} {:>9}",
        "clients", "server", "ops/s", "p50 µs", "p99 µs", "ops ×"
    );
    for &n in &o.clients {
        let torch = Peer::start({
            let mut c = Command::new(&python);
            c.args(["-c", "import sys, torch.distributed as d\ns = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\nprint(s.port, flush=True)\nsys.stdin.read()"]);
            c
        })?;
        let ours = Peer::start({
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("store-server");
            c
        })?;
        let theirs = runtime.block_on(load(torch.port, n, o.rounds))?;
        let mine = runtime.block_on(load(ours.port, n, o.rounds))?;
        for (name, r) in [("torch", &theirs), ("ferrun", &mine)] {
            let ratio = if name == "ferrun" {
                format!("{:.2}", r.ops_per_s / theirs.ops_per_s)
            } else {
                String::new()
            };
            println!(
                "{n:>7}  {name:<8} {:>12.0} {:>10.1} {:>10.1} {ratio:>9}",
                r.ops_per_s, r.p50_us, r.p99_us
            );
        }
    }
    println!("ops × = ferrun ops/s / torch ops/s (goal ≥ 1.00 at every client count)");
    Ok(())
}

struct Load {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn load(port: u16, clients: usize, rounds: usize) -> anyhow::Result<Load> {
    let timeout = Duration::from_secs(60);
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        connected.push(StoreClient::connect("127.0.0.1", port, timeout).await?);
    }
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
                    c.get(&key).await?;
                    latencies.push(t.elapsed());
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
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok(Load {
        ops_per_s: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
