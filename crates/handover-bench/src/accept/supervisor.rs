//! Starting, watching and stopping the supervisors under test: one
//! `handover run --inetd` or `systemd-socket-activate --inetd` process per
//! run, always stopped (and reaped) when the run ends, failed or not.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

use super::Subject;

/// How long a supervisor gets to start listening, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// One running supervisor. Dropping it stops it: SIGTERM, then SIGKILL if
/// it has not exited within [`STOP_TIMEOUT`], and it is reaped either way.
pub struct Supervisor {
    child: Child,
    subject: Subject,
    /// Where its stderr goes; shown when something fails, removed on drop.
    log: PathBuf,
    /// The address it accepts connections on.
    pub addr: SocketAddr,
}

/// The environment both supervisors run in: the bench's own environment
/// (cargo's variables among it) would otherwise reach handover's programs
/// and not systemd-socket-activate's, which passes only `-E` variables on.
fn clean_env(cmd: &mut Command) {
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C");
}

fn log_path(subject: Subject) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "handover-bench-accept-{}-{}-{}.log",
        std::process::id(),
        subject.name(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Spawns `cmd` with stderr to a fresh log file, stdin closed, and
/// SIGTERM as its parent-death signal (so that a killed bench leaves no
/// supervisor behind).
fn spawn(mut cmd: Command, subject: Subject, stdout: Stdio) -> Result<(Child, PathBuf)> {
    let log = log_path(subject);
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(file);
    // SAFETY: the closure makes one system call (prctl) and touches no
    // memory of the parent: async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => Ok((child, log)),
        Err(e) => {
            let _ = std::fs::remove_file(&log);
            Err(e).with_context(|| format!("starting {:?}", cmd.get_program()))
        }
    }
}

impl Supervisor {
    /// `handover run --inetd -l 127.0.0.1:0 -- PROGRAM...`; the port is read
    /// from its `handover: listening on ADDR` line.
    pub fn handover(bin: &Path, program: &[OsString]) -> Result<Supervisor> {
        let mut cmd = Command::new(bin);
        clean_env(&mut cmd);
        cmd.args(["run", "--inetd", "-l", "127.0.0.1:0", "--"])
            .args(program);
        let (mut child, log) = spawn(cmd, Subject::Handover, Stdio::piped())?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let first = crate::restart::server::first_line(stdout, START_TIMEOUT)?;
        let mut sup = Supervisor {
            child,
            subject: Subject::Handover,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = match first {
            Ok(Ok(line)) if line.is_empty() => {
                // End of stream: it exited (or closed stdout) first.
                sup.check_alive()?;
                return Err(sup.failure("it closed stdout without a listening line".to_owned()));
            }
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(sup.failure(format!("reading its stdout: {e}"))),
            Err(_) => {
                return Err(sup.failure(format!(
                    "it printed no listening line within {START_TIMEOUT:?}"
                )))
            }
        };
        let addr = line
            .trim()
            .strip_prefix("handover: listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok());
        match addr {
            Some(addr) => sup.addr = addr,
            None => return Err(sup.failure(format!("unexpected first line {line:?}"))),
        }
        Ok(sup)
    }

    /// `systemd-socket-activate --inetd -a -l 127.0.0.1:PORT PROGRAM...` on a
    /// port that was free a moment ago; it is retried on another port if
    /// the supervisor exits at once (the port was taken meanwhile).
    /// `log_level` goes into SYSTEMD_LOG_LEVEL: `notice` keeps it from
    /// logging three lines per connection, which handover does not do.
    pub fn socket_activate(
        bin: &Path,
        log_level: &str,
        program: &[OsString],
    ) -> Result<Supervisor> {
        let mut last_err = None;
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut cmd = Command::new(bin);
            clean_env(&mut cmd);
            cmd.env("SYSTEMD_LOG_LEVEL", log_level)
                .args(["--inetd", "--accept", "--listen"])
                .arg(addr.to_string())
                .args(program);
            let (child, log) = spawn(cmd, Subject::SocketActivate, Stdio::null())?;
            let mut sup = Supervisor {
                child,
                subject: Subject::SocketActivate,
                log,
                addr,
            };
            // It binds before it does anything else; give a failing one a
            // moment to exit before the first connection is tried.
            thread::sleep(Duration::from_millis(20));
            match sup.check_alive() {
                Ok(()) => return Ok(sup),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("three attempts"))
    }

    /// An error if the supervisor has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(format!("it exited ({status})"))),
            Err(e) => Err(self.failure(format!("waiting for it: {e}"))),
        }
    }

    /// The supervisor's resident set, in KiB (VmRSS), where /proc has it.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// CPU time the supervisor and every program it has reaped so far
    /// have used (utime + stime + cutime + cstime of /proc/PID/stat), in
    /// seconds; the kernel keeps it to the nanosecond but shows it in clock
    /// ticks (10 ms).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after "(comm)": state is the first, utime the twelfth.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let mut ticks = 0u64;
        for f in fields.get(11..15)? {
            ticks += f.parse::<u64>().ok()?;
        }
        Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the supervisor, with the end of its stderr.
    pub fn failure(&mut self, what: String) -> anyhow::Error {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        if tail.is_empty() {
            anyhow::anyhow!("{} (pid {}): {what}", self.subject.name(), self.child.id())
        } else {
            anyhow::anyhow!(
                "{} (pid {}): {what}; its stderr ends:\n  {tail}",
                self.subject.name(),
                self.child.id()
            )
        }
    }

    /// Stops the supervisor; an error if it had already exited, or had to
    /// be killed.
    pub fn stop(mut self) -> Result<()> {
        self.check_alive()?;
        let exited = self.terminate();
        if !exited {
            bail!(
                "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed",
                self.subject.name()
            );
        }
        Ok(())
    }

    /// SIGTERM, wait, SIGKILL if need be, and reap. True if it exited by
    /// itself (or had already).
    fn terminate(&mut self) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        let pid = Pid::from_raw(self.child.id() as i32).expect("a child's pid is positive");
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => thread::sleep(Duration::from_millis(2)),
                _ => return true,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The `handover` binary: `--handover PATH`, or `handover` next to this
/// program's own executable (target/release/ for a release build).
pub fn find_handover(explicit: Option<&Path>) -> Result<PathBuf> {
    const BUILD: &str = "cargo build --release -p handover-cli";
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("handover"),
    };
    if !path.is_file() {
        bail!(
            "the handover binary is not at {}: build it first with `{BUILD}` \
             (the bench looks next to its own executable, so run the bench with \
             --release too), or give its path with --handover PATH",
            path.display()
        );
    }
    if explicit.is_none() {
        warn_if_stale(&path, BUILD);
    }
    Ok(path)
}

/// Warns if a source file of the library or the CLI is newer than the
/// binary: the figures would be an older handover's.
fn warn_if_stale(bin: &Path, build: &str) {
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = None;
    for dir in ["handover/src", "handover-cli/src"] {
        newest_mtime(&crates.join(dir), &mut newest);
    }
    if let Some((when, file)) = newest {
        if when > built {
            eprintln!(
                "warning: {} is newer than {}; rebuild it with `{build}` to measure the current code",
                file.display(),
                bin.display()
            );
        }
    }
}

fn newest_mtime(dir: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            newest_mtime(&path, newest);
        } else if let Ok(t) = meta.modified() {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                *newest = Some((t, path));
            }
        }
    }
}
