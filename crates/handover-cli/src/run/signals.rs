//! Signals as readable events: the supervisor blocks the signals it cares
//! about and reads them from a signalfd in its poll loop, so no handler
//! ever runs at an awkward moment. Children start with an empty mask
//! (handover::Command resets it).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

/// Signals that are passed on to the program.
pub const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
];

pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks the forwarded signals and SIGCHLD, and opens a signalfd.
    pub fn install() -> Result<Signals> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before
        // use; signalfd returns a new descriptor that we then own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED.iter().chain(&[libc::SIGCHLD, libc::SIGPIPE]) {
                libc::sigaddset(&mut set, *sig);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                anyhow::bail!("blocking signals failed");
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("signalfd");
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The next pending signal, if any.
    pub fn next(&self) -> Result<Option<i32>> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match rustix::io::read(&self.fd, &mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first field, a u32 in native byte order.
                Ok(Some(
                    u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32,
                ))
            }
            Ok(_) => Ok(None),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(e).context("reading the signalfd"),
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The exit code that reports `status` to our own parent as faithfully as
/// an exit code can; for a signal, it first tries to die of the same signal.
pub fn exit_like(status: std::process::ExitStatus) -> ! {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    if let Some(sig) = status.signal() {
        // SAFETY: resetting a disposition, unblocking and raising a signal
        // at ourselves; if it does not end us, we exit below.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(1)
}

/// A signal's name, for logs.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGCHLD => "SIGCHLD".into(),
        libc::SIGKILL => "SIGKILL".into(),
        other => format!("signal {other}"),
    }
}

/// A signal by name (`TERM`, `SIGTERM`, case-insensitive) or number.
pub fn parse(text: &str) -> anyhow::Result<i32> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match name {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        "KILL" => libc::SIGKILL,
        n => match n.parse::<i32>() {
            Ok(v) if (1..=64).contains(&v) => v,
            _ => anyhow::bail!("not a signal name or number (TERM, INT, QUIT, USR1, …)"),
        },
    };
    Ok(sig)
}
