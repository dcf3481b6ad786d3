//! Worker output, line by line: to the console with a rank prefix, to log files, or both.
//!
//! torchrun tees by polling each log file every 0.1 s; ferrun reads the worker's pipe as data
//! arrives, so lines appear live and whole (one `write` per line: ranks never interleave within
//! a line). A line longer than [`MAX_LINE`] is passed on in pieces rather than held back.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest run of bytes held back while waiting for a newline.
pub const MAX_LINE: usize = 64 * 1024;

/// Which console stream a worker stream is copied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// The launcher's stdout.
    Stdout,
    /// The launcher's stderr.
    Stderr,
}

/// Lines containing one of `patterns` are also copied to a shared file.
#[derive(Debug, Clone)]
pub struct Duplicate {
    /// Substrings that select a line.
    pub patterns: Arc<Vec<String>>,
    /// The shared `filtered_std{out,err}.log` of the attempt.
    pub file: Arc<Mutex<File>>,
}

/// Where one worker stream's lines go.
#[derive(Debug)]
pub struct Sink {
    /// Console copy, with the prefix to put before each line.
    pub console: Option<(Console, String)>,
    /// The worker's own log file (`stdout.log`/`stderr.log`), unprefixed.
    pub file: Option<File>,
    /// Filtered copy shared by all ranks, prefixed.
    pub duplicate: Option<Duplicate>,
    /// Prefix for the duplicate file's lines.
    pub prefix: String,
}

impl Sink {
    fn line(&mut self, line: &[u8]) {
        let with_newline = |out: &mut Vec<u8>| {
            if !line.ends_with(b"\n") {
                out.push(b'\n');
            }
        };
        let mut prefixed = Vec::with_capacity(self.prefix.len() + line.len() + 1);
        prefixed.extend_from_slice(self.prefix.as_bytes());
        prefixed.extend_from_slice(line);
        with_newline(&mut prefixed);
        if let Some((console, prefix)) = &self.console {
            let mut buf = Vec::with_capacity(prefix.len() + line.len() + 1);
            buf.extend_from_slice(prefix.as_bytes());
            buf.extend_from_slice(line);
            with_newline(&mut buf);
            console_writer().send(Message::Line(*console, buf));
        }
        if let Some(file) = &mut self.file {
            let _ = file.write_all(line);
        }
        if let Some(dup) = &self.duplicate {
            let text = String::from_utf8_lossy(line);
            if dup.patterns.iter().any(|p| text.contains(p.as_str())) {
                if let Ok(mut file) = dup.file.lock() {
                    let _ = file.write_all(&prefixed);
                }
            }
        }
    }
}

enum Message {
    Line(Console, Vec<u8>),
    Flushed(std::sync::mpsc::Sender<()>),
}

/// The console is written by a thread of its own: a terminal or pipe that stops reading then
/// stalls only that thread, never the launcher's reaction to exits and signals.
struct ConsoleWriter(std::sync::mpsc::Sender<Message>);

impl ConsoleWriter {
    fn send(&self, message: Message) {
        let _ = self.0.send(message);
    }
}

fn console_writer() -> &'static ConsoleWriter {
    static WRITER: std::sync::OnceLock<ConsoleWriter> = std::sync::OnceLock::new();
    WRITER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Message>();
        let spawned = std::thread::Builder::new()
            .name("ferrun-console".into())
            .spawn(move || {
                for message in rx {
                    // Output is best effort: a closed console must not take the training job down.
                    let _ = match message {
                        Message::Line(Console::Stdout, buf) => {
                            std::io::stdout().lock().write_all(&buf)
                        }
                        Message::Line(Console::Stderr, buf) => {
                            std::io::stderr().lock().write_all(&buf)
                        }
                        Message::Flushed(done) => done.send(()).map_err(std::io::Error::other),
                    };
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the console writer thread: {e}; worker output is lost");
        }
        ConsoleWriter(tx)
    })
}

/// Waits (at most `bound`) until every line handed to the console so far is written, so that
/// the launcher's own summary comes after the workers' output.
pub fn flush_console(bound: std::time::Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    console_writer().send(Message::Flushed(tx));
    let _ = rx.recv_timeout(bound);
}

/// Copies `reader` into `sink` line by line until end of file.
pub async fn forward(mut reader: impl AsyncRead + Unpin, mut sink: Sink) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(pos) = pending[start..].iter().position(|&b| b == b'\n') {
            sink.line(&pending[start..=start + pos]);
            start += pos + 1;
        }
        pending.drain(..start);
        if pending.len() >= MAX_LINE {
            sink.line(&pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        sink.line(&pending);
    }
}

/// The console prefix of a worker: torchrun's `[<role><local_rank>]:`, or
/// `TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE` with `${role_name}`, `${rank}`, `${local_rank}`.
pub fn prefix(template: Option<&str>, role: &str, rank: u32, local_rank: u32) -> String {
    match template {
        None => format!("[{role}{local_rank}]:"),
        Some(t) => {
            let mut out = t.to_owned();
            for (name, value) in [
                ("role_name", role.to_owned()),
                ("local_rank", local_rank.to_string()),
                ("rank", rank.to_string()),
            ] {
                out = out
                    .replace(&format!("${{{name}}}"), &value)
                    .replace(&format!("${name}"), &value);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_like_torchrun() {
        assert_eq!(prefix(None, "default", 5, 1), "[default1]:");
        assert_eq!(
            prefix(
                Some("[${role_name}|r${rank}|l$local_rank] "),
                "trainer",
                5,
                1
            ),
            "[trainer|r5|l1] "
        );
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_the_tail_and_long_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout.log");
        let dup_path = dir.path().join("filtered.log");
        let sink = Sink {
            console: None,
            file: Some(File::create(&path).expect("create")),
            duplicate: Some(Duplicate {
                patterns: Arc::new(vec!["loss".into()]),
                file: Arc::new(Mutex::new(File::create(&dup_path).expect("create"))),
            }),
            prefix: "[default0]:".into(),
        };
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("step 1 loss 2.0\nhello\n{long}\nno newline loss");
        forward(input.as_bytes(), sink).await;
        assert_eq!(std::fs::read_to_string(&path).expect("read"), input);
        assert_eq!(
            std::fs::read_to_string(&dup_path).expect("read"),
            "[default0]:step 1 loss 2.0\n[default0]:no newline loss\n"
        );
    }
}
