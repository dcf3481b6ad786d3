//! What the user reads at the end: the failure report (torchrun's `ChildFailedError` layout,
//! with signal names and hints) and a per-rank summary table.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::reports::error_file::ErrorReport;
pub use crate::reports::exit::signal_name;
use crate::reports::exit::Exit;

/// One failed worker.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Global rank.
    pub rank: u32,
    /// Rank within the node.
    pub local_rank: u32,
    /// Process id.
    pub pid: u32,
    /// How it ended.
    pub exit: Exit,
    /// When it ended (wall clock).
    pub when: SystemTime,
    /// Its error file, when it wrote one.
    pub error_file: Option<PathBuf>,
    /// What the error file says.
    pub error: Option<ErrorReport>,
    /// Order in which the launcher saw the exit (breaks ties between equal timestamps).
    pub seen: usize,
}

impl Failure {
    /// The exit code a shell would show: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        self.exit.shell_code()
    }

    /// The time that orders failures: the error file's timestamp (when the exception was
    /// recorded), else the exit.
    fn order_key(&self) -> (i64, usize) {
        let exit_secs = self
            .when
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let recorded = self
            .error
            .as_ref()
            .and_then(|e| e.timestamp)
            .unwrap_or(exit_secs);
        (recorded.min(exit_secs), self.seen)
    }
}

/// The root cause: the first failure by timestamp, then by the order the launcher saw exits.
pub fn root_cause(failures: &[Failure]) -> Option<&Failure> {
    failures.iter().min_by_key(|f| f.order_key())
}

fn exit_text(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => c.to_string(),
        Exit::Signal(s) => format!("{} ({})", -s, signal_name(s)),
    }
}

fn hint(exit: Exit) -> Option<&'static str> {
    match exit {
        Exit::Signal(9) => Some("SIGKILL from outside the job: often the kernel's out-of-memory killer (see `dmesg`, or the container's memory limit)"),
        Exit::Signal(11) => Some("segmentation fault: a crash in native code (an extension, a driver, or a library version mismatch)"),
        Exit::Signal(6) => Some("aborted: a native assertion or an uncaught C++ exception; the worker's stderr has the message"),
        Exit::Signal(7) => Some("bus error: often /dev/shm too small for the data loaders (raise the container's shm size)"),
        Exit::Code(137) => Some("exit 137 is 128+9: the process or its shell was SIGKILLed, often by the out-of-memory killer"),
        _ => None,
    }
}

/// The failure report, in torchrun's layout (a 60-column frame, `Root Cause` last).
pub fn failure_report(script: &str, host: &str, failures: &[Failure]) -> String {
    let Some(root) = root_cause(failures) else {
        return String::new();
    };
    let rule = |c: char| c.to_string().repeat(60);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}\n{script} FAILED\n{}\nFailures:",
        rule('='),
        rule('-')
    );
    let others: Vec<_> = failures.iter().filter(|f| f.seen != root.seen).collect();
    if others.is_empty() {
        let _ = writeln!(out, "  <NO_OTHER_FAILURES>");
    }
    for (i, f) in others.iter().enumerate() {
        entry(&mut out, i + 1, host, f);
    }
    let _ = writeln!(out, "{}\nRoot Cause (first observed failure):", rule('-'));
    entry(&mut out, 0, host, root);
    let _ = writeln!(out, "{}", rule('='));
    out
}

fn entry(out: &mut String, index: usize, host: &str, f: &Failure) {
    let time = chrono::DateTime::<chrono::Local>::from(f.when).format("%Y-%m-%d_%H:%M:%S");
    let _ = writeln!(out, "[{index}]:");
    let _ = writeln!(out, "  time      : {time}");
    let _ = writeln!(out, "  host      : {host}");
    let _ = writeln!(
        out,
        "  rank      : {} (local_rank: {})",
        f.rank, f.local_rank
    );
    let _ = writeln!(out, "  exitcode  : {} (pid: {})", exit_text(f.exit), f.pid);
    if let Some(h) = hint(f.exit) {
        let _ = writeln!(out, "  hint      : {h}");
    }
    let file = f
        .error_file
        .as_ref()
        .map_or_else(|| "<N/A>".to_owned(), |p| p.display().to_string());
    let _ = writeln!(out, "  error_file: {file}");
    let traceback = match (&f.error, f.exit) {
        (Some(e), _) => e.traceback.clone().unwrap_or_else(|| e.message.clone()),
        (None, Exit::Signal(s)) => format!("Signal {s} ({}) received by PID {}", signal_name(s), f.pid),
        (None, Exit::Code(_)) => {
            "no error file (see the worker's stderr above; a Python worker whose main is decorated with torch.distributed.elastic.multiprocessing.errors.record gets its traceback here)".to_owned()
        }
    };
    let mut lines = traceback.trim_end().lines();
    let _ = writeln!(out, "  traceback : {}", lines.next().unwrap_or(""));
    for line in lines {
        let _ = writeln!(out, "    {line}");
    }
}

/// One row of the summary table.
#[derive(Debug, Clone)]
pub struct SummaryRow {
    /// Global rank.
    pub rank: u32,
    /// Rank within the node.
    pub local_rank: u32,
    /// Process id in the last attempt.
    pub pid: u32,
    /// How it ended, in words.
    pub outcome: String,
    /// How long it ran in the last attempt.
    pub duration: Duration,
    /// Restarts of the group.
    pub restarts: u32,
}

/// The summary table printed when the launcher ends.
pub fn summary_table(rows: &[SummaryRow], total: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>8}  {:<22} {:>10} {:>8}",
        "rank", "local", "pid", "exit", "duration", "restarts"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>8}  {:<22} {:>9.2}s {:>8}",
            r.rank,
            r.local_rank,
            r.pid,
            r.outcome,
            r.duration.as_secs_f64(),
            r.restarts
        );
    }
    let _ = writeln!(out, "total wall time {:.2}s", total.as_secs_f64());
    out
}

/// A worker's outcome for the summary table, given whether the launcher stopped it.
pub fn outcome_text(exit: Option<Exit>, stopped_by_launcher: bool) -> String {
    match (exit, stopped_by_launcher) {
        (Some(Exit::Code(0)), _) => "ok".to_owned(),
        (Some(Exit::Signal(s)), true) => format!("stopped ({})", signal_name(s)),
        (Some(e), true) => format!("stopped (exit {})", exit_text(e)),
        (Some(Exit::Code(c)), false) => format!("failed (exit {c})"),
        (Some(Exit::Signal(s)), false) => format!("failed ({})", signal_name(s)),
        (None, _) => "running".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(
        rank: u32,
        exit: Exit,
        secs: u64,
        seen: usize,
        error: Option<ErrorReport>,
    ) -> Failure {
        Failure {
            rank,
            local_rank: rank,
            pid: 100 + rank,
            exit,
            when: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            error_file: error.as_ref().map(|_| PathBuf::from("/logs/error.json")),
            error,
            seen,
        }
    }

    #[test]
    fn root_cause_is_the_first_failure_by_time_then_by_arrival() {
        let recorded_early = ErrorReport {
            message: "E: first".into(),
            traceback: None,
            timestamp: Some(5),
        };
        let fs = [
            failure(0, Exit::Code(1), 10, 0, None),
            failure(1, Exit::Code(1), 10, 1, Some(recorded_early)),
        ];
        assert_eq!(root_cause(&fs).map(|f| f.rank), Some(1));
        let fs = [
            failure(2, Exit::Code(1), 10, 1, None),
            failure(3, Exit::Code(1), 10, 0, None),
        ];
        assert_eq!(root_cause(&fs).map(|f| f.rank), Some(3));
    }

    #[test]
    fn report_names_signal_hint_and_traceback() {
        let tb = ErrorReport {
            message: "ValueError: bad".into(),
            traceback: Some("Traceback (most recent call last):\n  x\nValueError: bad\n".into()),
            timestamp: Some(1),
        };
        let fs = [
            failure(1, Exit::Code(1), 1, 0, Some(tb)),
            failure(2, Exit::Signal(9), 2, 1, None),
        ];
        let report = failure_report("train.py", "node-a", &fs);
        assert!(report.contains("train.py FAILED"), "{report}");
        assert!(
            report.contains("exitcode  : -9 (SIGKILL) (pid: 102)"),
            "{report}"
        );
        assert!(report.contains("out-of-memory killer"), "{report}");
        let root = report.split("Root Cause").nth(1).expect("root section");
        assert!(
            root.contains("rank      : 1 (local_rank: 1)") && root.contains("ValueError: bad"),
            "{report}"
        );
    }

    #[test]
    fn summary_lists_every_rank() {
        let rows = [SummaryRow {
            rank: 0,
            local_rank: 0,
            pid: 7,
            outcome: outcome_text(Some(Exit::Code(0)), false),
            duration: Duration::from_millis(1500),
            restarts: 1,
        }];
        let table = summary_table(&rows, Duration::from_secs(2));
        assert!(table.contains("ok") && table.contains("1.50s"), "{table}");
        assert_eq!(
            outcome_text(Some(Exit::Signal(15)), true),
            "stopped (SIGTERM)"
        );
    }
}
