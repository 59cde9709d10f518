//! `handover run`: bind sockets, start a program on them by the socket
//! activation protocol, and stay as its supervisor.
//!
//! Everything that can fail for a reason the user can fix (a bad spec, an
//! unknown user, a missing program, a port in use, a low port without
//! privileges) fails before the program starts, and whatever was bound by
//! then is closed again, socket files removed.
//!
//! The command line and the start are per platform (`unix.rs`,
//! `windows.rs`); the supervisor (`supervise/`), the control socket, the
//! fd store and the lifecycle options are shared.

#[cfg(unix)]
mod accept;
pub mod control;
mod fdstore;
mod lifecycle;
#[cfg(unix)]
pub(crate) mod signals;
mod supervise;
#[cfg(unix)]
mod unix;
#[cfg(unix)]
mod users;
#[cfg(unix)]
mod watch;
#[cfg(windows)]
mod watch_poll;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub use unix::{run, RunArgs};
#[cfg(windows)]
pub use windows::{run, RunArgs};

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use handover::Command;

/// What every start of the program shares.
pub struct Program {
    pub argv: Vec<OsString>,
    /// Where the program was found, once: not looked for again at every
    /// start (a program per connection in accept mode).
    #[cfg_attr(windows, allow(dead_code))]
    pub path: PathBuf,
    #[cfg(unix)]
    pub identity: Option<users::Identity>,
    /// Serve systemfd's protocol too (Windows).
    #[cfg(windows)]
    pub systemfd: bool,
}

impl Program {
    pub fn name(&self) -> String {
        self.argv[0].to_string_lossy().into_owned()
    }

    /// Where the program is now: looked for again at each reload, so that
    /// a new binary installed under the same name is picked up.
    pub fn resolve(&self) -> Result<PathBuf> {
        Command::new(&self.argv[0])
            .resolved_program()
            .with_context(|| format!("cannot run {:?}", self.name()))
    }

    /// A command for one start, with privileges dropped as asked.
    #[cfg(unix)]
    pub fn command(&self) -> Command {
        self.command_at(&self.path)
    }

    /// A command for one start of the program found at `path`.
    #[cfg(unix)]
    pub fn command_at(&self, path: &std::path::Path) -> Command {
        use handover::unix::CommandExt;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.program_path(path).args(&self.argv[1..]);
        // Signals for the program reach it through us; its own process
        // group lets us clean up whatever it leaves behind, and if we are
        // killed outright it is told.
        cmd.process_group(true)
            .parent_death_signal(Some(libc::SIGTERM));
        if let Some(id) = &self.identity {
            cmd.uid(id.uid).gid(id.gid).groups(&id.groups);
            if let Some(name) = &id.name {
                cmd.env("USER", name).env("LOGNAME", name);
            }
            if let Some(home) = &id.home {
                cmd.env("HOME", home);
            }
        }
        cmd
    }

    /// A command for one start of the program found at `path`: if handover
    /// is killed, the program goes too (a kill-on-close job), rather than
    /// keep the ports as an orphan.
    #[cfg(windows)]
    pub fn command_at(&self, path: &std::path::Path) -> Command {
        use handover::windows::CommandExt;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.program_path(path)
            .args(&self.argv[1..])
            .systemfd(self.systemfd)
            .end_with_parent(true);
        cmd
    }
}

/// `500ms`, `2s`, `1.5s`, `3m`, `1h`, or a plain number of seconds.
pub fn duration(text: &str) -> Result<std::time::Duration> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => t.split_at(at),
        None => (t, "s"),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("{text:?} is not a duration (500ms, 2s, 3m, 1h)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (ms, s, m, h)"),
    };
    if secs > 365.0 * 86_400.0 {
        bail!("{text:?} is too long (at most a year)");
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}
