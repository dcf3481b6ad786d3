//! The keeper: a small process forked at start that outlives a launcher killed by SIGKILL and
//! then kills what the launcher left running.
//!
//! `PR_SET_PDEATHSIG` takes the workers down with the launcher, but not their children: a
//! worker's `sleep 1000 &` or data-loader processes would be orphaned to init and run on.
//! The keeper waits on a pipe from the launcher; when the pipe closes without the launcher
//! having said goodbye (it was killed), the keeper SIGKILLs every process carrying the
//! launcher's mark ([`crate::supervision::descendants`]) — in its process groups or not — and exits.
//!
//! # Why not a cgroup or a subreaper
//! A cgroup of the launcher's own (`cgroup.kill`) would catch even processes that drop the
//! mark, but needs a writable cgroup v2 hierarchy, which containers often lack (this machine
//! has cgroup v1). A subreaper must be an ancestor of the workers and outlive the launcher:
//! that would make the launcher itself not the workers' parent. The mark works everywhere.
//!
//! # Caveats
//! A process that clears its environment escapes. On success the launcher says goodbye and
//! the keeper kills nothing (as torchrun, leftovers of a finished job are the job's).

use std::os::fd::{AsRawFd, OwnedFd};

/// The launcher's end of the pipe to its keeper.
#[derive(Debug)]
pub struct Keeper {
    pipe: Option<OwnedFd>,
}

impl Keeper {
    /// Forks the keeper for the mark `value`. Must run before any thread is started.
    ///
    /// # Errors
    /// When the pipe or the fork fails.
    #[allow(unsafe_code)]
    pub fn start(value: &str) -> nix::Result<Self> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: called before any other thread exists, so the child may run any code.
        match unsafe { nix::unistd::fork()? } {
            nix::unistd::ForkResult::Parent { .. } => {
                drop(read);
                Ok(Self { pipe: Some(write) })
            }
            nix::unistd::ForkResult::Child => {
                drop(write);
                keep(&read, value)
            }
        }
    }

    /// Tells the keeper the launcher ends normally: it exits without killing anything.
    pub fn disarm(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            let _ = nix::unistd::write(&pipe, b"d");
        }
    }
}

/// The keeper's life: detached from the terminal and the launcher's output, it waits for the
/// pipe, then acts.
#[allow(unsafe_code)]
fn keep(pipe: &OwnedFd, value: &str) -> ! {
    let _ = nix::unistd::setsid();
    if let Ok(null) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: plain dup2 onto the standard descriptors, which nothing else here uses.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let mut byte = [0u8; 1];
    let said = loop {
        match nix::unistd::read(pipe, &mut byte) {
            Err(nix::errno::Errno::EINTR) => {}
            Ok(n) => break n == 1 && byte[0] == b'd',
            Err(_) => break false,
        }
    };
    if !said {
        // The launcher is gone without a word: the workers die by PDEATHSIG; kill what they
        // started, twice, in case some forked while the first sweep ran.
        for _ in 0..2 {
            crate::supervision::descendants::kill_all(value);
        }
    }
    std::process::exit(0)
}
