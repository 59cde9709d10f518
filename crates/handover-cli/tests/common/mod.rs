//! Helpers for running `handover` as a real process in tests: every wait
//! has a deadline, and a handover still running when its [`Running`] is
//! dropped (a failed assertion included) is stopped and reaped, so that no
//! test hangs and none leaves processes behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest any single step may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The binary under test.
pub const HANDOVER: &str = env!("CARGO_BIN_EXE_handover");

/// `handover` with `args`.
pub fn handover<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(HANDOVER);
    cmd.args(args);
    // Our own environment may carry a NOTIFY_SOCKET or LISTEN_* of the
    // test runner's supervisor: never pass those on by accident.
    for var in [
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HANDOVER_LOG", "info");
    cmd
}

/// One `handover: listening on ADDR (NAME) as fd N` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listening {
    pub addr: String,
    pub name: Option<String>,
    pub fd: Option<i32>,
}

impl Listening {
    pub fn parse(line: &str) -> Option<Listening> {
        let rest = line.strip_prefix("handover: listening on ")?;
        let (rest, fd) = match rest.rsplit_once(" as fd ") {
            Some((r, n)) => (r, Some(n.trim().parse().ok()?)),
            None => (rest, None),
        };
        let (addr, name) = match rest.split_once(" (") {
            Some((a, n)) => (a, Some(n.strip_suffix(')')?.to_owned())),
            None => (rest, None),
        };
        Some(Listening {
            addr: addr.to_owned(),
            name,
            fd,
        })
    }

    /// The address as a TCP socket address.
    pub fn tcp(&self) -> SocketAddr {
        self.addr
            .parse()
            .unwrap_or_else(|_| panic!("{:?} is not a TCP address", self.addr))
    }
}

/// A running `handover`, its stdout read line by line and its stderr
/// collected.
pub struct Running {
    pub child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Running {
    /// Starts `cmd` with stdin closed and stdout and stderr captured.
    pub fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let seen = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                seen.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so that the
                    // writers never block on a full pipe.
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let collected = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running {
            child,
            lines,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything handover wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Every stdout line so far (handover's and its program's).
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// What to show when an assertion fails.
    pub fn report(&self) -> String {
        format!(
            "handover stdout:\n{}\nhandover stderr:\n{}",
            self.stdout().join("\n"),
            self.stderr()
        )
    }

    /// The next stdout line not yet taken; fails after `timeout`.
    pub fn next_line(&self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no output line within {timeout:?}\n{}", self.report())
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Let the stderr reader catch up before reporting.
                std::thread::sleep(Duration::from_millis(100));
                panic!("handover's stdout closed\n{}", self.report())
            }
        }
    }

    /// The next stdout line, or None once stdout is closed (handover and
    /// its program are gone); fails after `timeout`.
    pub fn try_next_line(&self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => {
                panic!("no output line within {timeout:?}\n{}", self.report())
            }
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next stdout line for which `f` returns something, skipping
    /// others.
    pub fn line_matching<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no line with {what} within {TIMEOUT:?}\n{}", self.report());
            }
            let line = self.next_line(left);
            if let Some(v) = f(&line) {
                return v;
            }
        }
    }

    /// The first `n` "listening on" lines.
    pub fn listening(&self, n: usize) -> Vec<Listening> {
        (0..n)
            .map(|_| self.line_matching("\"listening on\"", Listening::parse))
            .collect()
    }

    /// The address of the one TCP socket that handover prints.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.listening(1)[0].tcp()
    }

    /// Sends `sig` to handover.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which we have not reaped.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Whether handover has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    /// Waits for handover to exit; fails (and kills it) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                // Let the readers take in the last output.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                self.stop();
                panic!(
                    "handover did not exit within {timeout:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks handover to stop (SIGTERM, which it passes on), and kills it
    /// if it has not exited two seconds later.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: as in `signal`.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Describes an exit status for assertion messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}

/// Runs `cmd` to completion with its output captured; kills it and fails
/// after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Polls `f` until it returns something; fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP connection with read and write deadlines.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Everything the peer sends until it closes.
pub fn read_all(mut s: TcpStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reading from {:?}: {e} (got {out:?})", s.peer_addr()));
    out
}

/// Sends `GET /` over an open connection and returns the whole response.
pub fn http_get_on(mut s: TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .expect("sending the request");
    read_all(s)
}

/// `GET /` on a fresh connection to `addr`.
pub fn http_get(addr: SocketAddr) -> String {
    http_get_on(connect(addr))
}

/// `GET /` on a fresh connection to `addr`, with 5 s to connect and 10 s
/// for each read and write: the whole response, or what went wrong.
pub fn try_http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e} (got {out:?})"))?;
    Ok(out)
}

/// A directory of its own under the system's temporary directory, mode
/// 0755 (so that an unprivileged user can use what is in it), removed
/// when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "handover-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the executable `src` into `dir`, world-executable: a program
/// that an unprivileged user can run wherever the build directory is.
pub fn public_copy(src: &Path, dir: &TempDir) -> PathBuf {
    let dst = dir.join(src.file_name().unwrap());
    std::fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dst.display()));
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A child that another test thread forked while the copy was open for
    // writing holds it until that child execs: until then executing the
    // copy fails with ETXTBSY. Wait until it can be executed.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Command::new(&dst)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(mut probe) => {
                let _ = probe.kill();
                let _ = probe.wait();
                return dst;
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("executing {}: {e}", dst.display()),
        }
    }
}

/// The path of an example of this package. `cargo test` builds the
/// examples next to the test executables (target/PROFILE/examples); when
/// only this test target was asked for (`cargo test --test run`) they are
/// not built, so it is built here, with the cargo that runs the tests.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, Result<(), String>)>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("current_exe");
    // target/PROFILE/deps/run-HASH
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/PROFILE/deps");
    let path = profile_dir.join("examples").join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|(n, _)| n == name) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "handover-cli", "--example", name])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => {}
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(300));
        let result = if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        built.push((name.to_owned(), result));
    }
    let built = &built.iter().find(|(n, _)| n == name).unwrap().1;
    if let Err(e) = built {
        if !path.exists() {
            panic!("building the examples failed:\n{e}");
        }
    }
    assert!(
        path.exists(),
        "example {name} is not at {} (cargo test builds examples there)",
        path.display()
    );
    path
}

/// The real python3 executable (not a version manager's shim script,
/// which would open descriptors of its own and may not be readable by
/// other users).
pub fn python3() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = run_with_timeout(
            Command::new("python3").args(["-c", "import sys; print(sys.executable)"]),
            TIMEOUT,
        );
        assert!(out.status.success(), "python3 is needed for these tests");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // pid (comm) STATE ...: comm may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The Uid line of /proc/PID/status: real, effective, saved, filesystem.
pub fn proc_ids(pid: i32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}
