//! The TCP link between the two hosts of `compare --two-hosts`, measured raw: both ends send
//! and receive at once, as an all-reduce's ring does, so its rate per direction bounds the
//! all-reduce's algbw over that link.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Options of the hidden `ferrun-bench link`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Listen on this address (one end) …
    #[arg(long, conflicts_with = "connect")]
    listen: Option<SocketAddr>,
    /// … or connect to it (the other end, which prints the rate).
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// Bytes each way.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: usize,
}

/// One end of the link test: sends `bytes` while receiving as many; the connecting end prints
/// GB/s per direction.
pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    let stream = match (o.listen, o.connect) {
        (Some(addr), _) => {
            let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
            // The caller starts the other end once it reads this line.
            println!("listening");
            std::io::stdout().flush()?;
            listener.accept()?.0
        }
        (None, Some(addr)) => TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect to {addr}"))?,
        (None, None) => anyhow::bail!("give --listen ADDR or --connect ADDR"),
    };
    let start = Instant::now();
    let mut sender = stream.try_clone()?;
    let bytes = o.bytes;
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![7u8; 4 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            sender.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let mut receiver = stream;
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0;
    while got < bytes {
        let n = receiver.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the other end closed the link after {got} bytes");
        got += n;
    }
    sending
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    if o.connect.is_some() {
        let rate = bytes as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("{rate:.3}");
    }
    Ok(())
}
