//! The server under test: `handover run --ready notify -l ADDR=http
//! --control PATH -- handover demo-http`, started, reloaded (over its
//! control socket, docs/protocol.md §16), and stopped. Dropping a
//! [`Server`] stops it (SIGTERM, SIGKILL if need be, reaped) and removes its
//! control socket and log, on every path.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

/// How long `handover run` gets to print its listening line, its program
/// to become ready, and either to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(10);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload may take before the bench gives up on it.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    child: Child,
    /// Its stderr (handover's log and the demo server's); shown when
    /// something fails, removed on drop.
    log: PathBuf,
    control: PathBuf,
    pub addr: SocketAddr,
}

fn unique_path(what: &str, ext: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "handover-bench-restart-{}-{what}-{}.{ext}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Server {
    /// Starts `handover run` listening on `listen` (`127.0.0.1:0` or a fixed
    /// port) and waits until its first generation is ready; returns it and
    /// that generation's pid.
    pub fn start(bin: &Path, listen: &str, tag: &str) -> Result<(Server, u32)> {
        let demo = [bin.as_os_str(), "demo-http".as_ref()];
        Server::start_with(bin, listen, tag, &[], &demo)
    }

    /// [`Server::start`] with more options for `handover run` (`run_args`,
    /// before `-l`) and another program (`program`, its argv).
    pub fn start_with(
        bin: &Path,
        listen: &str,
        tag: &str,
        run_args: &[&std::ffi::OsStr],
        program: &[&std::ffi::OsStr],
    ) -> Result<(Server, u32)> {
        let log = unique_path(tag, "log");
        let control = unique_path(tag, "ctl");
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        // A clean environment: the bench's own (cargo's variables among
        // it) would otherwise reach the server.
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C")
            .args(["run", "--ready", "notify", "--stop-timeout", "10s"])
            .args(run_args)
            .arg("-l")
            .arg(format!("{listen}=http"))
            .arg("--control")
            .arg(&control)
            .arg("--")
            .args(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file);
        // SAFETY: the closure makes one system call (prctl) and touches no
        // memory of the parent: async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                // A bench that is killed leaves no server behind.
                rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&log);
                return Err(e).with_context(|| format!("starting {}", bin.display()));
            }
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut server = Server {
            child,
            log,
            control,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        server.addr = server.read_listening_line(stdout)?;
        let pid = server.wait_ready()?;
        Ok((server, pid))
    }

    /// `handover: listening on 127.0.0.1:PORT (http) as fd 3`, read on a
    /// thread so that a server that never prints it cannot hang the bench;
    /// the thread then drains stdout until the server exits.
    fn read_listening_line(&mut self, stdout: std::process::ChildStdout) -> Result<SocketAddr> {
        let line = match first_line(stdout, START_TIMEOUT)? {
            Ok(Ok(line)) if line.is_empty() => {
                self.check_alive()?;
                return Err(self.failure("it closed stdout without a listening line"));
            }
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(self.failure(&format!("reading its stdout: {e}"))),
            Err(_) => {
                return Err(self.failure(&format!(
                    "it printed no listening line within {START_TIMEOUT:?}"
                )))
            }
        };
        line.trim()
            .strip_prefix("handover: listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| self.failure(&format!("unexpected first line {line:?}")))
    }

    /// Asks `status` until a generation is ready; its pid.
    fn wait_ready(&mut self) -> Result<u32> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok(status) = self.ask("status", Duration::from_secs(5)) {
                let ready = status["generations"].as_array().and_then(|gs| {
                    gs.iter()
                        .find(|g| g["ready"] == serde_json::Value::Bool(true))
                        .and_then(|g| g["pid"].as_u64())
                });
                if let Some(pid) = ready {
                    return Ok(pid as u32);
                }
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("not ready within {START_TIMEOUT:?}")));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// One request over the control socket, answered with a JSON object.
    fn ask(&self, request: &str, timeout: Duration) -> Result<serde_json::Value> {
        let ch = handover::Channel::connect_timeout(&self.control, Duration::from_secs(5))
            .with_context(|| format!("connecting to {}", self.control.display()))?;
        ch.send_timeout(request.as_bytes(), &[], Duration::from_secs(5))
            .context("sending the request")?;
        let answer = ch
            .recv_timeout(timeout)
            .context("waiting for the answer")?
            .ok_or_else(|| anyhow!("the control connection closed without an answer"))?;
        serde_json::from_slice(&answer.bytes).context("the answer is not JSON")
    }

    /// `reload`, as `handover reload` asks it: answered once the new
    /// generation is ready and the old one has been told to stop. The new
    /// generation's pid.
    pub fn reload(&mut self) -> Result<u32> {
        let answer = match self.ask("reload", RELOAD_TIMEOUT) {
            Ok(a) => a,
            Err(e) => return Err(self.failure(&format!("reload: {e:#}"))),
        };
        if answer["ok"] != serde_json::Value::Bool(true) {
            return Err(self.failure(&format!("the reload failed: {answer}")));
        }
        answer["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| self.failure(&format!("no pid in the reload's answer {answer}")))
    }

    /// An error if `handover run` has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(&format!("it exited ({status})"))),
            Err(e) => Err(self.failure(&format!("waiting for it: {e}"))),
        }
    }

    /// An error naming the server, with the end of its log.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        anyhow!(
            "handover run (pid {}): {what}; its log ends:\n  {tail}",
            self.child.id()
        )
    }

    /// The naive stop: SIGTERM to `handover run` (which passes it on to its
    /// program, waits for it to drain and exit, then exits itself, closing
    /// the listening socket), and waits for it. An error if it had to be
    /// killed or exited with a failure.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.check_alive()?;
        match self.terminate() {
            Some(status) if status.success() => Ok(status),
            Some(status) => Err(self.failure(&format!("it exited with {status} after SIGTERM"))),
            None => Err(self.failure(&format!(
                "it did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed"
            ))),
        }
    }

    /// SIGTERM, wait, SIGKILL if need be, and reap. The exit status if it
    /// exited by itself (or had already).
    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32).expect("a child's pid is positive");
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => thread::sleep(Duration::from_micros(200)),
                Ok(Some(status)) => return Some(status),
                Err(_) => return None,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

/// A child's first line on stdout ("" at end of stream), read on a thread
/// so that a child that never prints it cannot hang the bench; the thread
/// then drains stdout until the child exits. `Err` on the timeout.
pub fn first_line(
    stdout: std::process::ChildStdout,
    timeout: Duration,
) -> Result<std::result::Result<std::io::Result<String>, mpsc::RecvTimeoutError>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("child-stdout".to_owned())
        .spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(r.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        })?;
    Ok(rx.recv_timeout(timeout))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.log);
        // handover removes it on exit; this is for one that was killed.
        let _ = std::fs::remove_file(&self.control);
    }
}

/// A process (not necessarily our child) whose exit can be waited for:
/// its pidfd, readable once it has exited.
pub struct Watched(OwnedFd);

impl Watched {
    pub fn new(pid: u32) -> Result<Watched> {
        let pid = Pid::from_raw(pid as i32).ok_or_else(|| anyhow!("pid {pid} is not valid"))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .with_context(|| format!("pidfd_open({pid:?})"))?;
        Ok(Watched(fd))
    }

    /// Waits until the process has exited or `deadline` passed; whether it
    /// has exited.
    pub fn wait_until(&self, deadline: Instant) -> Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) if left.is_zero() => return Ok(false),
                Ok(0) => continue,
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => bail!("waiting on a pidfd: {e}"),
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that is free now, for a server that must come
/// back on the same port after a naive restart. It is picked below the
/// ephemeral range (ip_local_port_range), so that none of the clients'
/// own connections can be given it while the server is down.
pub fn free_port() -> Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let top = low.saturating_sub(1).max(2000);
    let first = top - (std::process::id() % 2000) as u16;
    for port in (1024..=first).rev().take(200) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found below {first}; give one with --port")
}
