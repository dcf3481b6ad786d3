//! The elastic rendezvous at scale, on loopback: N simulated agents (in-process clients, each
//! with a connection of its own) join one round; the time until every one of them knows its
//! rank. Then a node goes silent (its heartbeats stop, its connection stays) or is killed (its
//! connection breaks): the time until every survivor has the new round.
//!
//! The ranks are checked: every round must hand out each of 0..N exactly once, with the world
//! the job has, or the benchmark exits non-zero.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ferrun_launcher::rendezvous::round::{NodeDesc, NodeId, Settings, Standing, View};
use ferrun_launcher::rendezvous::service::client::{ElasticClient, Views};
use ferrun_launcher::rendezvous::service::RendezvousService;

use crate::stats::summarize;

/// Options of `ferrun-bench rendezvous`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Agents joining one round, per measurement.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    agents: Vec<usize>,
    /// Rounds per agent count (each in a runtime of its own).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Heartbeat interval for the lost-node measurement, in milliseconds (× 3 = the timeout).
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
}

const RUN: &str = "bench";

fn settings(n: u32, heartbeat: Duration) -> Settings {
    Settings {
        min_nodes: n.min(2),
        max_nodes: n,
        join_timeout: Duration::from_secs(600),
        last_call_timeout: Duration::from_secs(600),
        heartbeat_timeout: heartbeat * 3,
    }
}

fn serve(n: u32, heartbeat: Duration) -> anyhow::Result<RendezvousService> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("a loopback port")?;
    Ok(RendezvousService::serve(
        listener,
        settings(n, heartbeat),
        None,
        None,
    )?)
}

fn node(i: usize) -> NodeDesc {
    NodeDesc {
        id: NodeId(format!("agent-{i:06}")),
        addr: "127.0.0.1".into(),
        store_port: 29_500,
        nproc: 1,
    }
}

fn client(service: &RendezvousService, i: usize) -> anyhow::Result<ElasticClient> {
    Ok(ElasticClient::new(
        &service.local_addr().to_string(),
        None,
        None,
        RUN,
        node(i),
    )?)
}

/// Agents per connection so that both ends of every connection fit this process's open-file
/// limit (each connection is two descriptors here, one on either side).
fn agents_per_connection(n: usize, fd_limit: u64) -> usize {
    let connections = usize::try_from(fd_limit.saturating_sub(512) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    n.div_ceil(connections).max(1)
}

/// Waits for a view that `done` accepts; errors past `bound`.
async fn until(
    views: &mut Views,
    bound: Duration,
    done: impl Fn(&View) -> bool,
) -> anyhow::Result<View> {
    let wait = views.wait_for(|v| v.as_ref().is_ok_and(&done));
    match tokio::time::timeout(bound, wait).await {
        Ok(Ok(v)) => Ok(v.clone().map_err(anyhow::Error::msg)?),
        Ok(Err(_)) => bail!("a watch ended early"),
        Err(_) => bail!("no such view within {bound:?}"),
    }
}

fn rank_of(view: &View) -> Option<(u32, u32)> {
    match &view.standing {
        Standing::Assigned(p) => Some((p.node_rank, p.nnodes)),
        _ => None,
    }
}

/// One round of `n` agents, `per_connection` to a connection: the time until every agent
/// knows its rank.
async fn join_round(n: usize, per_connection: usize) -> anyhow::Result<Duration> {
    let service = serve(u32::try_from(n)?, Duration::from_secs(60))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut tasks = Vec::with_capacity(n);
    let mut connection = None;
    for i in 0..n {
        if i % per_connection == 0 {
            connection = Some(client(&service, i)?);
        }
        let c = connection
            .as_ref()
            .context("a connection")?
            .for_node(node(i));
        tasks.push(tokio::spawn(async move {
            let limit = u32::try_from(n)?;
            c.join(limit.min(2), limit, deadline).await?;
            let (mut views, keep) = c
                .watch(Duration::from_secs(60), Duration::from_secs(600))
                .await?;
            let view = until(&mut views, Duration::from_secs(300), |v| {
                rank_of(v).is_some()
            })
            .await?;
            let at = started.elapsed();
            anyhow::Ok((rank_of(&view), at, keep))
        }));
    }
    let mut ranks = vec![false; n];
    let mut last = Duration::ZERO;
    // An agent that hangs up is lost to the round: every watch stays open until all are
    // placed, then goes (the tasks would otherwise hold the round's connections).
    let mut open = Vec::with_capacity(n);
    for task in tasks {
        let (placed, at, keep) = task.await??;
        open.push(keep);
        let Some((rank, nnodes)) = placed else {
            bail!("an agent was not placed")
        };
        ensure!(
            nnodes as usize == n,
            "an agent was placed in a world of {nnodes}, not {n}"
        );
        let seen = ranks
            .get_mut(rank as usize)
            .context("a rank out of range")?;
        ensure!(!*seen, "rank {rank} was handed out twice");
        *seen = true;
        last = last.max(at);
    }
    for task in open.into_iter().flatten() {
        task.abort();
    }
    Ok(last)
}

/// Eight agents; one goes silent (`kill`: its connection breaks too): the time until every
/// survivor has the new round.
async fn lose_one(heartbeat: Duration, kill: bool) -> anyhow::Result<Duration> {
    const N: usize = 8;
    let service = serve(u32::try_from(N)?, heartbeat)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut views = Vec::new();
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for i in 0..N {
        let c = client(&service, i)?;
        c.join(2, 8, deadline).await?;
        let (v, t) = c.watch(heartbeat, heartbeat * 3).await?;
        views.push(v);
        tasks.push(t);
        clients.push(c);
    }
    for v in &mut views {
        until(v, Duration::from_secs(60), |v| rank_of(v).is_some()).await?;
    }
    let [watch, beats] = tasks.pop().context("agents")?;
    let gone = Instant::now();
    beats.abort();
    if kill {
        watch.abort();
        drop(clients.pop());
        drop(views.pop());
    }
    for v in &mut views[..N - 1] {
        let view = until(v, Duration::from_secs(60), |v| {
            v.round == 1 && rank_of(v).is_some()
        })
        .await?;
        ensure!(
            rank_of(&view).map(|r| r.1) == Some(7),
            "the new round has {view:?}"
        );
    }
    let took = gone.elapsed();
    for task in tasks.into_iter().flatten() {
        task.abort();
    }
    Ok(took)
}

/// Runs one measurement in a runtime of its own: dropping it closes every connection and
/// task of the measurement, so none slows the next (they outlive their round otherwise).
fn measured<F: std::future::Future<Output = anyhow::Result<Duration>>>(
    measurement: impl FnOnce() -> F,
) -> anyhow::Result<Duration> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let took = runtime.block_on(measurement());
    runtime.shutdown_timeout(Duration::from_secs(10));
    took
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(o.rounds >= 1, "--rounds must be at least 1");
    let fd_limit = ferrun_collective::store::server::raise_fd_limit();
    let heartbeat = Duration::from_millis(o.heartbeat_ms);
    println!(
        "rendezvous benchmark: {} round(s) each, loopback; agents share connections only past the open-file limit ({fd_limit})",
        o.rounds
    );
    println!(
        "{:<52} {:>10} {:>10} {:>10} {:>8}",
        "measurement", "min", "median", "max", "goal"
    );
    for &n in &o.agents {
        let per_connection = agents_per_connection(n, fd_limit);
        let mut samples = Vec::new();
        for _ in 0..o.rounds {
            samples.push(measured(|| join_round(n, per_connection))?);
            eprint!(".");
        }
        let goal = if n <= 1000 { "≤ 1 s" } else { "≤ 5 s" };
        let shared = if per_connection > 1 {
            format!(" ({per_connection} a connection)")
        } else {
            String::new()
        };
        row(
            &format!("{n} agents join{shared}: all know their rank"),
            &samples,
            goal,
        );
    }
    let timeout = heartbeat * 3;
    for (kill, what) in [
        (false, "silent (heartbeats stop)"),
        (true, "killed (connection breaks)"),
    ] {
        let mut samples = Vec::new();
        for _ in 0..o.rounds {
            samples.push(measured(|| lose_one(heartbeat, kill))?);
            eprint!(".");
        }
        let goal = format!(
            "≤ {:.1} s",
            (timeout + Duration::from_secs(1)).as_secs_f64()
        );
        row(
            &format!("1 of 8 {what} → survivors' new round"),
            &samples,
            &goal,
        );
    }
    eprintln!();
    println!("heartbeat timeout {:.1} s; torch's c10d rendezvous never notices a lost node (pytorch#111646)", timeout.as_secs_f64());
    Ok(())
}

fn row(name: &str, samples: &[Duration], goal: &str) {
    let Some(s) = summarize(samples) else { return };
    let max = samples.iter().max().copied().unwrap_or_default();
    let secs = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "{name:<52} {:>10} {:>10} {:>10} {goal:>8}",
        secs(s.min),
        secs(s.median),
        secs(max)
    );
}

#[cfg(test)]
mod tests {
    use super::agents_per_connection;

    #[test]
    fn agents_share_connections_only_past_the_open_file_limit() {
        assert_eq!(agents_per_connection(1000, 20_000), 1);
        assert_eq!(agents_per_connection(10_000, 20_000), 2);
        assert_eq!(agents_per_connection(10, 0), 10);
    }
}
