//! Finding this launcher's workers and everything they started, by a mark in their
//! environment: every worker gets [`MARK`]`=<this launcher's id>`, and their children inherit
//! it — also those that left the worker's process group or session (`setsid`).
//!
//! # Trust
//! `/proc` is read as the kernel writes it; a process that removes the mark from its own
//! environment (or execs with an empty one) is not found.

use std::path::Path;

/// The environment variable that marks a launcher's workers and their descendants.
pub const MARK: &str = "FERRUN_AGENT_ID";

/// This launcher's mark: its pid and start time, so that no other launcher's workers (even
/// of a recycled pid) carry it. Computed once (the keeper, forked later, inherits it).
pub fn mark_value() -> &'static str {
    static VALUE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VALUE.get_or_init(compute_mark)
}

fn compute_mark() -> String {
    let pid = std::process::id();
    let started = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_field(&stat, 22).map(str::to_owned))
        .unwrap_or_default();
    format!("{pid}-{started}")
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/<pid>/stat` line.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(n.checked_sub(3)?)
}

/// Whether process `pid`'s environment carries `MARK=value`.
fn marked(pid: &Path, value: &str) -> bool {
    let Ok(environ) = std::fs::read(pid.join("environ")) else {
        return false;
    };
    let wanted = format!("{MARK}={value}");
    environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes())
}

/// Every running process (not a zombie) that carries the mark `value`, with its process group.
pub fn find(value: &str) -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat_field(&stat, 3)?;
            let pgid: i32 = stat_field(&stat, 5)?.parse().ok()?;
            (pid != me && state != "Z" && marked(&e.path(), value)).then_some((pid, pgid))
        })
        .collect()
}

/// SIGKILLs every process that carries the mark; how many.
pub fn kill_all(value: &str) -> usize {
    let found = find(value);
    for &(pid, _) in &found {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    found.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_an_awkward_command_name() {
        let stat = "42 (a) b (c) S 1 7 7 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 5), Some("7"));
    }

    #[test]
    fn a_marked_child_is_found_and_killed() {
        let value = format!("test-{}", std::process::id());
        // No shell: a shell's own `exec` would leave its environment unreadable for a moment
        // (seen on a loaded machine), and the child must be found once, then killed.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARK, &value)
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        // Until it has exec'd, the fresh child shows this process's environment (no mark):
        // bounded, it is a matter of microseconds.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !find(&value).iter().any(|&(p, _)| p == pid) {
            assert!(
                std::time::Instant::now() < until,
                "the marked child never showed its mark"
            );
            std::thread::yield_now();
        }
        assert_eq!(kill_all(&value), 1);
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        assert!(find(&value).is_empty());
    }
}
