//! Helpers for the holder's tests: a `handover hold` that is always
//! stopped, client commands (as root or as another uid), descriptor counts
//! of the daemon, and deadlines on every wait.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use handover::holder::Client;

/// The longest any single step may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The uid and gid of the unprivileged client.
pub const NOBODY: u32 = 65534;

/// The binary under test, copied where any uid may run it (the build
/// directory may sit under a home only root can enter).
pub fn handover_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("handover-holder-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("handover");
        std::fs::copy(env!("CARGO_BIN_EXE_handover"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    })
}

/// A directory of its own for each holder, any uid may enter it.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "handover-holder-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `handover ARGS` with a clean environment for activation variables.
pub fn handover<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(handover_bin());
    cmd.args(args);
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

/// A running `handover hold`, killed and reaped when dropped.
pub struct Holder {
    pub child: Option<Child>,
    pub path: PathBuf,
    pub dir: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Holder {
    /// Starts a holder on a fresh socket with `args`, and waits until it
    /// serves.
    pub fn start(args: &[&str]) -> Holder {
        let dir = scratch("hold");
        let path = dir.join("holder.sock");
        let mut cmd = handover(["hold", "--socket"]);
        cmd.arg(&path).args(args);
        Holder::spawn(cmd, path, dir)
    }

    /// Starts `cmd` (a `handover hold …`) that will serve on `path`.
    pub fn spawn(mut cmd: Command, path: PathBuf, dir: PathBuf) -> Holder {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting handover hold");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let holder = Holder {
            child: Some(child),
            path,
            dir,
            stderr,
        };
        holder.wait_for_log("holder ready");
        holder
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.path).expect("connecting to the holder")
    }

    /// `handover ARGS` pointed at this holder by HANDOVER_HOLDER.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = handover(args);
        cmd.env("HANDOVER_HOLDER", &self.path);
        cmd
    }

    /// Like `cmd`, run as uid/gid 65534.
    pub fn cmd_as_nobody<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.cmd(args);
        cmd.uid(NOBODY).gid(NOBODY).current_dir("/");
        cmd
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the daemon's log contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the holder never logged {text:?}; its log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many descriptors the daemon has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Waits (up to the timeout) for the daemon's descriptor count to come
    /// back to `expected` (closing is asynchronous), then asserts it.
    pub fn assert_fds(&self, expected: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.open_fds();
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the holder had {expected} descriptors open before and {now} after"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits for the daemon to exit by itself, with a deadline.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the holder did not exit; its log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to completion, with a deadline; kills it if it overruns.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {TIMEOUT:?}");
        }
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Retries `f` until it returns Some, with a deadline.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's descriptor limit to the hard limit.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    )
    .unwrap();
}
