//! `handover adopt` against real processes.
//!
//! The issue's proof: nginx (Debian's nginx-light), started by hand with a
//! private configuration (`daemon off; master_process on;`), serves on
//! 127.0.0.1:PORT while four clients make one connection per request.
//! `handover adopt --pid <nginx master> --listeners -- http_demo` takes
//! its listening socket and becomes http_demo serving on it; once
//! http_demo answers, nginx is stopped gracefully (SIGQUIT). Not one
//! request may fail, and the answers must switch from nginx to http_demo.
//!
//! nginx is $HANDOVER_NGINX, else `nginx` in /usr/sbin or on PATH. Without
//! it the test says loudly that it is skipped, unless
//! $HANDOVER_REQUIRE_THIRD_PARTY is set (as in CI): then it fails.
//!
//! Also: `--hold NAME` into a running `handover hold` (every kind of
//! listener, a socket open twice taken once, a connected socket left), and
//! the errors (no such pid, no listeners, a closed descriptor, a refused
//! ptrace check, a missing program).
#![cfg(target_os = "linux")]

mod common;
mod holder_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    example, handover, run_with_timeout, try_http_get, wait_for, Running, TempDir, TIMEOUT,
};
use holder_common::{Holder, NOBODY};

/// nginx: $HANDOVER_NGINX, else /usr/sbin/nginx, else on PATH; `None`
/// (said loudly) when missing, unless third-party programs are required.
fn find_nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HANDOVER_NGINX") {
        return Some(PathBuf::from(p));
    }
    let found = std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("HANDOVER_REQUIRE_THIRD_PARTY").is_none(),
            "nginx is required (HANDOVER_REQUIRE_THIRD_PARTY is set): apt-get install nginx-light"
        );
        eprintln!(
            "\n\n*** SKIPPED: nginx not found (apt-get install nginx-light, or set \
             HANDOVER_NGINX); the adopt-under-load test did not run ***\n\n"
        );
    }
    found
}

/// nginx run by hand in a directory of its own, stopped (SIGTERM, then
/// SIGKILL) if still running when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    fn start(bin: &Path) -> Nginx {
        let dir = TempDir::new("nginx");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 2;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body;\n\
               server {{\n\
                 listen {addr};\n\
                 location / {{ return 200 \"nginx\\n\"; }}\n\
               }}\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut nginx = Nginx { child, addr, dir };
        wait_for("nginx to serve", TIMEOUT, || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.log());
            }
            try_get(addr).ok().filter(|body| body == "nginx\n")
        });
        nginx
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // The master stops its workers on SIGTERM; SIGKILL would leave
        // them running.
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET on a new connection: the body of a 200, or what went wrong.
fn try_get(addr: SocketAddr) -> Result<String, String> {
    let out = try_http_get(addr)?;
    let Some((head, body)) = out.split_once("\r\n\r\n") else {
        return Err(format!("no response head: {out:?}"));
    };
    if !head.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("not a 200: {out:?}"));
    }
    Ok(body.to_owned())
}

/// Clients making one connection per request until stopped, counting
/// answers by server.
struct Load {
    stop: Arc<AtomicBool>,
    nginx: Arc<AtomicU64>,
    demo: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let nginx = Arc::new(AtomicU64::new(0));
        let demo = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, nginx, demo, failures) =
                    (stop.clone(), nginx.clone(), demo.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match try_get(addr) {
                            Ok(body) if body == "nginx\n" => {
                                nginx.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(body) if body.starts_with("generation ") => {
                                demo.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(body) => failures.lock().unwrap().push(format!("body {body:?}")),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            nginx,
            demo,
            failures,
            threads,
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.nginx.load(Ordering::SeqCst),
            self.demo.load(Ordering::SeqCst),
        )
    }

    /// Stops the clients; the failures.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.failures.lock().unwrap())
    }
}

#[test]
fn nginx_under_load_is_replaced_by_an_adopting_server_without_a_failed_request() {
    let Some(bin) = find_nginx() else { return };
    let mut nginx = Nginx::start(&bin);
    let addr = nginx.addr;
    let load = Load::start(addr, 4);
    wait_for("requests served by nginx", TIMEOUT, || {
        (load.counts().0 >= 50).then_some(())
    });

    let demo = example("http_demo");
    let mut adopt = handover(["adopt", "--pid", &nginx.pid().to_string(), "--listeners"]);
    adopt.arg("--").arg(&demo);
    let h = Running::spawn(&mut adopt);
    let line = h.next_line(TIMEOUT);
    assert_eq!(
        line,
        format!(
            "handover: adopted fd {} of process {}: tcp {addr} as adopted",
            line.split(' ').nth(3).unwrap(),
            nginx.pid()
        ),
        "{}",
        h.report()
    );
    // http_demo took adopt's place (exec): same pid.
    let serving = format!("http_demo: generation 0 pid {} serving on {addr}", h.pid());
    wait_for("http_demo to say it serves", TIMEOUT, || {
        h.stderr().contains(&serving).then_some(())
    });

    // Both serve from the one socket until nginx is told to stop.
    let before = load.counts().1;
    wait_for("requests served by http_demo", TIMEOUT, || {
        (load.counts().1 >= before + 50).then_some(())
    });
    nginx.signal(libc::SIGQUIT);
    let status = wait_for("nginx to stop after SIGQUIT", TIMEOUT, || {
        nginx.child.try_wait().unwrap()
    });
    assert!(status.success(), "nginx: {status}\n{}", nginx.log());
    let (nginx_served, demo_before) = load.counts();
    std::thread::sleep(Duration::from_millis(700));
    let (nginx_after, demo_after) = load.counts();
    let failures = load.finish();

    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}\n{}",
        failures.len(),
        nginx_after + demo_after + failures.len() as u64,
        &failures[..failures.len().min(5)],
        h.report()
    );
    assert!(nginx_served >= 50, "nginx served {nginx_served}");
    assert_eq!(nginx_after, nginx_served, "nginx answered after it stopped");
    assert!(
        demo_after > demo_before + 20,
        "http_demo served {demo_before} by nginx's exit and {demo_after} at the end"
    );
    assert!(try_get(addr).unwrap().starts_with("generation 0 pid "));
    eprintln!(
        "adopted from nginx under load: nginx served {nginx_served}, http_demo {demo_after}, \
         0 failed"
    );
    drop(h);
}

/// A Python process with a TCP listener (and a duplicate of it), a bound
/// UDP socket, a listening Unix socket and a TCP connection (both ends); it
/// prints their descriptor numbers and addresses, then waits for end of
/// input.
const SOCKETS: &str = r#"
import os, socket, sys
path = sys.argv[1]
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); x.bind(path); x.listen(16)
c = socket.create_connection(t.getsockname())
a, _ = t.accept()
dup = os.dup(t.fileno())
print("ready", t.fileno(), u.fileno(), x.fileno(), c.fileno(), dup, t.getsockname()[1], u.getsockname()[1], flush=True)
sys.stdin.read()
"#;

struct Python {
    child: Child,
    /// tcp, udp, unix, connected, duplicate, tcp port, udp port
    n: Vec<u32>,
}

impl Python {
    fn start(dir: &TempDir) -> Python {
        let mut child = Command::new(common::python3())
            .arg("-c")
            .arg(SOCKETS)
            .arg(dir.join("py.sock"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let n = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("python said {line:?}"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        Python { child, n }
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn listeners_are_put_into_the_holder_as_name_name_1_name_2() {
    let dir = TempDir::new("adopt-hold");
    let py = Python::start(&dir);
    let holder = Holder::start(&[]);
    let pid = py.child.id();
    let out = run_with_timeout(
        &mut holder.cmd([
            "adopt",
            "--pid",
            &pid.to_string(),
            "--listeners",
            "--hold",
            "web",
        ]),
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (tcp, udp, unix) = (py.n[0], py.n[1], py.n[2]);
    let (tcp_port, udp_port) = (py.n[5], py.n[6]);
    // In descriptor order; the duplicate and the connected socket are left.
    let expected = format!(
        "handover: adopted fd {tcp} of process {pid}: tcp 127.0.0.1:{tcp_port} as web\n\
         handover: adopted fd {udp} of process {pid}: udp 127.0.0.1:{udp_port} as web.1\n\
         handover: adopted fd {unix} of process {pid}: unix {} as web.2\n",
        dir.join("py.sock").display()
    );
    assert_eq!(stdout, expected);

    let mut client = holder.client();
    let names: Vec<String> = client.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["web", "web.1", "web.2"]);
    let got = client.retrieve_many(&["web", "web.2"], true).unwrap();
    // The TCP listener from the holder accepts what is sent to Python's.
    let listener = got[0].1.try_clone().unwrap().into_tcp_listener().unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", tcp_port as u16)).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    s.write_all(b"from the holder's copy").unwrap();
    drop(s);
    let mut said = String::new();
    c.read_to_string(&mut said).unwrap();
    assert_eq!(said, "from the holder's copy");
    let unix = handover::unix::HandleExt::into_unix_listener(got[1].1.try_clone().unwrap());
    assert!(unix.is_ok(), "web.2 is not a Unix listener");

    // Again into a name that is taken: refused, unless --replace.
    let (pid, udp) = (pid.to_string(), udp.to_string());
    let udp_into_web_1 = |extra: &[&str]| {
        let mut cmd = holder.cmd(["adopt", "--pid", &pid, "--fd", &udp, "--hold", "web.1"]);
        run_with_timeout(cmd.args(extra), TIMEOUT)
    };
    let again = udp_into_web_1(&[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("web.1"),
        "{stderr}"
    );
    let again = udp_into_web_1(&["--replace"]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
}

/// `handover adopt ARGS` that must fail; its error line.
fn fails(args: &[&str], nobody: bool) -> String {
    let mut cmd = holder_common::handover(args);
    if nobody {
        cmd.uid(NOBODY).gid(NOBODY).current_dir("/");
    }
    let out = run_with_timeout(&mut cmd, TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

#[test]
fn errors_say_which_process_and_what_is_missing() {
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id().to_string();
    gone.wait().unwrap();
    let e = fails(
        &["adopt", "--pid", &gone_pid, "--listeners", "--", "true"],
        false,
    );
    assert_eq!(
        e,
        format!("handover: error: no process {gone_pid}: it does not exist or has exited\n")
    );

    let mut sleeper = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sleeper.id().to_string();
    let e = fails(
        &["adopt", "--pid", &pid, "--listeners", "--", "true"],
        false,
    );
    assert_eq!(
        e,
        format!(
            "handover: error: process {pid} has no listening sockets (0 of its descriptors are \
             sockets, none listening or bound)\n"
        )
    );
    let e = fails(&["adopt", "--pid", &pid, "--fd", "77", "--", "true"], false);
    assert_eq!(
        e,
        format!(
            "handover: error: taking fd 77 of process {pid}: process {pid} has no open handle 77\n"
        )
    );
    let e = fails(&["adopt", "--pid", &pid, "--fd", "0", "--", "true"], true);
    assert!(
        e.starts_with(&format!(
            "handover: error: taking fd 0 of process {pid}: ptrace \
             (PTRACE_MODE_ATTACH_REALCREDS) access to process {pid} denied: process {pid} runs \
             as uid 0"
        )),
        "{e}"
    );
    let e = fails(&["adopt", "--pid", &pid, "--listeners", "--", "true"], true);
    assert!(
        e.contains(&format!("cannot list the descriptors of process {pid}")),
        "{e}"
    );
    let e = fails(
        &[
            "adopt",
            "--pid",
            &pid,
            "--fd",
            "0",
            "--",
            "/nonexistent/program",
        ],
        false,
    );
    assert!(e.contains("/nonexistent/program"), "{e}");
    let e = fails(&["adopt", "--pid", &pid, "--fd", "0", "--hold", "x"], false);
    assert!(e.contains("no holder"), "{e}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
