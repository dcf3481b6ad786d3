//! How a process ended, and its name in words (`code 1`, `SIGKILL`).

use nix::sys::signal::Signal;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// Exited with code 0.
    pub fn is_success(self) -> bool {
        self == Self::Code(0)
    }

    /// The exit code a shell would show: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }

    /// `code 1`, `SIGKILL`: for one-line summaries.
    pub fn words(self) -> String {
        match self {
            Self::Code(c) => format!("code {c}"),
            Self::Signal(s) => signal_name(s),
        }
    }
}

impl From<std::process::ExitStatus> for Exit {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(sig)) => Self::Signal(sig),
            (None, None) => Self::Code(-1),
        }
    }
}

/// `SIGKILL` for 9; `signal 99` for a number with no name.
pub fn signal_name(signal: i32) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_a_shell_shows_them() {
        assert_eq!(Exit::Signal(9).shell_code(), 137);
        assert_eq!(Exit::Code(3).shell_code(), 3);
        assert_eq!(Exit::Signal(9).words(), "SIGKILL");
        assert_eq!(Exit::Code(1).words(), "code 1");
        assert_eq!(signal_name(99), "signal 99");
    }
}
