//! The agent store under load: N concurrent clients doing set/get/add/wait on loopback, against
//! ferrun's server and torch 2.13's TCPStore server (libuv backend), each in a process of its
//! own, driven by the same clients (ferrun's, spread over a few processes of their own) in the
//! same invocation.

mod clients;
mod peer;

pub(crate) use clients::{serve as serve_clients, Options as ClientOptions};

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use ferrun_collective::store::{StoreClient, StoreServer};

use peer::Peer;

/// Options of `ferrun-bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Concurrent clients, comma separated.
    #[arg(long, default_value = "64,256,1024,4096", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Rounds per client; a round is set, get, add and wait (4 operations). Default: enough
    /// for about 100,000 operations a run, and at least 25 rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Runs of each server, interleaved (which goes first alternates); medians and ranges shown.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Processes the clients are spread over (a job's workers are processes, each with a few
    /// connections; one process holding thousands would measure its own scheduler).
    #[arg(long, default_value_t = 8)]
    client_processes: usize,
    /// The torch 2.13 virtualenv (its python hosts torch's server).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// Load only ferrun's server: for tuning, with no ratio printed.
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

/// One run against one server.
struct Load {
    /// Seconds until every client was connected (handshake and ping answered).
    connect_s: f64,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// The server's CPU time per operation.
    server_cpu_us: f64,
    /// The client processes' CPU time per operation.
    client_cpu_us: f64,
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    let python = o.venv.join("bin/python");
    ensure!(
        o.ferrun_only || python.is_file(),
        "{} not found: run scripts/setup-python.sh",
        python.display()
    );
    ensure!(o.repeats > 0, "--repeats must be at least 1");
    ensure!(
        o.clients.iter().all(|&n| n > 0),
        "--clients: every count must be at least 1"
    );
    // 4,096 clients and two servers: far past the usual soft limit of 1,024 descriptors (the
    // client processes inherit the raised limit).
    ferrun_collective::store::server::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "store benchmark: set/get/add/wait rounds, loopback, this machine; clients spread over up to \
         {} processes; {} interleaved runs of each server (medians, range in brackets)",
        o.client_processes, o.repeats
    );
    let mut said_hosts = false;
    let mut rows = Vec::new();
    for &n in &o.clients {
        let rounds = o
            .rounds
            .unwrap_or_else(|| 25.max(100_000usize.div_ceil(4 * n)));
        let (mut theirs, mut mine) = (Vec::new(), Vec::new());
        for repeat in 0..o.repeats {
            eprintln!(
                "{n} clients, {rounds} rounds: run {}/{}",
                repeat + 1,
                o.repeats
            );
            let torch = if o.ferrun_only {
                None
            } else {
                let (torch, local_names) = Peer::torch(&python)?;
                if !said_hosts && !local_names {
                    eprintln!(
                        "note: torch's server resolves each client's address; without root and \
                         unshare it uses this machine's resolver (see bench/README.md)"
                    );
                }
                said_hosts = true;
                Some(torch)
            };
            let ours = Peer::ferrun()?;
            // Who goes first alternates, so that a machine warming or cooling weighs on both.
            let torch_first = repeat % 2 == 0;
            let measure = |peer: &Peer| load(&runtime, peer, n, rounds, o.client_processes);
            if let (Some(torch), true) = (&torch, torch_first) {
                theirs.push(measure(torch)?);
            }
            mine.push(measure(&ours)?);
            if let (Some(torch), false) = (&torch, torch_first) {
                theirs.push(measure(torch)?);
            }
        }
        rows.push(Row {
            clients: n,
            rounds,
            torch: theirs,
            ferrun: mine,
        });
    }
    print_table(&rows);
    Ok(())
}

/// One client count's runs against both servers.
struct Row {
    clients: usize,
    rounds: usize,
    /// Empty with `--ferrun-only`.
    torch: Vec<Load>,
    ferrun: Vec<Load>,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>7} {:>6}  {:<7} {:>24} {:>8} {:>22} {:>8} {:>17} {:>10}",
        "clients",
        "rounds",
        "server",
        "ops/s",
        "ops ×",
        "p99 µs",
        "p50 µs",
        "CPU µs/op s + c",
        "connect s"
    );
    for Row {
        clients: n,
        rounds,
        torch: theirs,
        ferrun: mine,
    } in rows
    {
        let torch_ops = Spread::of(theirs.iter().map(|l| l.ops_per_s));
        for (name, runs) in [("torch", theirs), ("ferrun", mine)] {
            if runs.is_empty() {
                continue;
            }
            let ops = Spread::of(runs.iter().map(|l| l.ops_per_s));
            let ratio = if name == "ferrun" && !theirs.is_empty() {
                format!("{:.2}", ops.median / torch_ops.median)
            } else {
                String::new()
            };
            let median = |f: fn(&Load) -> f64| Spread::of(runs.iter().map(f)).median;
            println!(
                "{n:>7} {rounds:>6}  {name:<7} {:>24} {ratio:>8} {:>22} {:>8.0} {:>17} {:>10.2}",
                ops.show(0),
                Spread::of(runs.iter().map(|l| l.p99_us)).show(0),
                median(|l| l.p50_us),
                format!(
                    "{:.1} + {:.1}",
                    median(|l| l.server_cpu_us),
                    median(|l| l.client_cpu_us)
                ),
                median(|l| l.connect_s),
            );
        }
    }
    println!(
        "ops × = ferrun / torch median ops/s (goal ≥ 1.2 at every client count, with a lower \
         p99); CPU µs/op = CPU time per operation of the server (s) and of the client processes (c)"
    );
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

/// Loads `peer` with `clients` clients for `rounds` rounds, then checks the shared counter.
fn load(
    runtime: &tokio::runtime::Runtime,
    peer: &Peer,
    clients: usize,
    rounds: usize,
    processes: usize,
) -> anyhow::Result<Load> {
    let cpu_before = peer::cpu_seconds(peer.pid());
    let measured = clients::run(peer.port, clients, processes, rounds)?;
    let server_cpu = peer::cpu_seconds(peer.pid()) - cpu_before;
    let total = runtime.block_on(async {
        let mut check =
            StoreClient::connect("127.0.0.1", peer.port, Duration::from_secs(60)).await?;
        check.add("counter", 0).await
    })?;
    ensure!(
        total == (clients * rounds) as i64,
        "the counter reached {total}, not {}: a wrong result",
        clients * rounds
    );
    let all = &measured.latencies;
    ensure!(!all.is_empty(), "no operation was measured");
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1e3;
    let ops = all.len() as f64;
    Ok(Load {
        connect_s: measured.connect_s,
        ops_per_s: ops / measured.elapsed.as_secs_f64().max(1e-9),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        server_cpu_us: server_cpu * 1e6 / ops,
        client_cpu_us: measured.cpu_s * 1e6 / ops,
    })
}
