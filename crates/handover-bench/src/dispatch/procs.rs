//! Starting and stopping the self-accepting workers and the proxy (this
//! program in `--serve` mode, see `serve.rs`). Dropping a [`Proc`] stops
//! it: SIGTERM, SIGKILL if it has not exited within a second, reaped.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

use crate::restart::server::first_line;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Proc {
    child: Child,
    pub port: u16,
}

impl Proc {
    /// Starts `exe dispatch --serve MODE ARGS...` and waits for its
    /// `listening on PORT` line.
    pub fn start(exe: &Path, args: &[OsString]) -> Result<Proc> {
        let mut cmd = Command::new(exe);
        cmd.arg("dispatch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: one system call (prctl), no memory of the parent touched:
        // async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                // A bench that is killed leaves nothing behind.
                rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut proc = Proc { child, port: 0 };
        let line = match first_line(stdout, START_TIMEOUT)? {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(anyhow!(e).context("reading a server's stdout")),
            Err(_) => {
                return Err(anyhow!(
                    "a server ({:?}) printed nothing within {START_TIMEOUT:?}",
                    args
                ))
            }
        };
        proc.port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("a server ({args:?}) said {line:?}, not `listening on PORT`"))?;
        Ok(proc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if it has exited (it never does by itself).
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(anyhow!(
                "a server (pid {}) exited: {status}",
                self.child.id()
            )),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = Pid::from_raw(self.child.id() as i32).expect("a child's pid is positive");
            let _ = kill_process(pid, Signal::TERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
