//! A worker for the multi-process tests: joins the job's communicator (bootstrapped through the
//! agent store that `ferrun` hosts) and checks each collective against a plain reference.
//! Prints `rank R of N: collectives ok over <transport>` and exits 0, or names what went wrong
//! and exits 1. With `--die-rank R`, rank R SIGKILLs itself after the first all_reduce while the
//! others keep all-reducing: they must fail with an error naming it, not hang.

use std::process::ExitCode;
use std::time::Duration;

use ferrun_collective::comm::{Communicator, Options};
use ferrun_collective::reduce::ReduceOp;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("collective-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let comm = Communicator::from_env(
        "e2e",
        Options {
            deadline: Duration::from_secs(30),
            ..Options::default()
        },
    )?;
    let (r, n) = (comm.rank(), comm.size());
    let args: Vec<String> = std::env::args().collect();
    let die_rank: Option<usize> = args
        .iter()
        .position(|a| a == "--die-rank")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    if let Some(victim) = die_rank {
        let mut big = vec![1f32; 1 << 20];
        comm.all_reduce(&mut big, ReduceOp::Sum)?;
        if r == victim {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL)?;
        }
        for _ in 0..100 {
            comm.all_reduce(&mut big, ReduceOp::Sum)?;
        }
        return Err("all_reduce kept succeeding with a dead peer".into());
    }
    let value = |rank: usize, i: usize| ((rank * 31 + i) % 17) as f32;
    for count in [0usize, 1, 1001, 1 << 20] {
        let mut buf: Vec<f32> = (0..count).map(|i| value(r, i)).collect();
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        let wrong = (0..count).find(|&i| buf[i] != (0..n).map(|s| value(s, i)).sum::<f32>());
        if let Some(i) = wrong {
            return Err(
                format!("all_reduce of {count} elements: element {i} is {}", buf[i]).into(),
            );
        }
    }
    let mut b = vec![r as i64; 9];
    comm.broadcast(&mut b, n - 1)?;
    if b != vec![(n - 1) as i64; 9] {
        return Err(format!("broadcast gave {b:?}").into());
    }
    let mut gathered = vec![0u8; n];
    comm.all_gather(&[r as u8], &mut gathered)?;
    if gathered != (0..n).map(|s| s as u8).collect::<Vec<_>>() {
        return Err(format!("all_gather gave {gathered:?}").into());
    }
    comm.barrier()?;
    println!(
        "rank {r} of {n}: collectives ok over {}",
        comm.transport().kind()
    );
    Ok(())
}
