//! `handover run` on Windows, run under Wine by scripts/windows-test.sh: a
//! server written against the `listenfd` crate (examples/listenfd_server.rs,
//! systemfd's Windows protocol) serves through the socket handover bound,
//! and mistakes are reported before anything starts.

#![cfg(windows)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const HANDOVER: &str = env!("CARGO_BIN_EXE_handover");
const WAIT: Duration = Duration::from_secs(30);

/// An example of this package, built by `cargo test` next to the tests
/// (target/.../debug/examples).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(format!("{name}.exe"));
    assert!(
        path.is_file(),
        "{} is missing: run the whole `cargo test`, which builds the examples",
        path.display()
    );
    path
}

/// Ends a process by pid (the server handover started; Windows does not
/// end children with their parent).
fn terminate(pid: u32) {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{OpenProcess, TerminateProcess, PROCESS_TERMINATE};
    // SAFETY: opens, terminates and closes a process handle of our own.
    unsafe {
        let h = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if !h.is_null() {
            TerminateProcess(h, 9);
            CloseHandle(h);
        }
    }
}

/// The lines handover prints on stdout, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn get(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// Starts `handover run ARGS -l 127.0.0.1:0=http -- SERVER`; returns
/// handover and the address it listens on.
fn start_under_handover(args: &[&str], server: &std::path::Path) -> (Child, String) {
    let mut handover = Command::new(HANDOVER)
        .arg("run")
        .args(args)
        .args(["-l", "127.0.0.1:0=http", "--"])
        .arg(server)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut handover);
    let line = rx
        .recv_timeout(WAIT)
        .expect("handover says where it listens");
    // handover: listening on 127.0.0.1:PORT (http) as socket 0
    let addr = line
        .strip_prefix("handover: listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned();
    (handover, addr)
}

/// Starts `handover run` with the listenfd server; returns handover, the
/// address and the server's pid (from its first answer).
fn start_listenfd_server() -> (Child, String, u32) {
    let (handover, addr) = start_under_handover(&[], &example("listenfd_server"));
    let first = get(&addr);
    assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
    let body = first.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.starts_with("hello from pid "), "{body}");
    assert!(
        body.trim_end().ends_with(&addr),
        "served on our socket: {body}"
    );
    let pid: u32 = body["hello from pid ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(pid, handover.id(), "the program serves, not handover");
    (handover, addr, pid)
}

#[test]
fn a_listenfd_server_serves_through_handover_run() {
    let (mut handover, addr, pid) = start_listenfd_server();
    // A second request: the same process, the same socket.
    assert!(get(&addr).contains(&format!("hello from pid {pid} ")));
    // When the program ends, handover exits as it did.
    terminate(pid);
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = handover.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "handover did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(9));
}

#[test]
fn mistakes_are_reported_before_anything_starts() {
    let run = |args: &[&str]| {
        let out = Command::new(HANDOVER).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["run", "-l", "127.0.0.1:0", "--", "no-such-program-handover"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no-such-program-handover"), "{err}");
    let (code, err) = run(&["run", "-l", "not-an-address", "--", "cmd"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("listen spec"), "{err}");
    let (code, err) = run(&["run", "--", "cmd"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nothing to hand over"), "{err}");
    // A port in use is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["run", "-l", &spec, "--", "cmd"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&spec), "{err}");
}

/// Windows does not end children with their parent; handover puts the
/// program in a job that does, so a killed handover leaves no orphan
/// holding the port.
#[test]
fn killing_handover_ends_the_program() {
    let (mut handover, _addr, pid) = start_listenfd_server();
    handover.kill().unwrap();
    handover.wait().unwrap();
    assert!(wait_for_exit(pid, WAIT), "the program outlived handover");
}

/// Whether process `pid` has exited (or is gone) within `timeout`.
fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, WAIT_OBJECT_0};
    use windows_sys::Win32::System::Threading::{
        OpenProcess, WaitForSingleObject, PROCESS_SYNCHRONIZE,
    };
    // SAFETY: opens, waits on and closes a process handle of our own.
    unsafe {
        let h = OpenProcess(PROCESS_SYNCHRONIZE, 0, pid);
        if h.is_null() {
            return true;
        }
        let r = WaitForSingleObject(h, timeout.as_millis() as u32);
        CloseHandle(h);
        r == WAIT_OBJECT_0
    }
}

/// The same program source as on Linux: examples/http_demo.rs takes its
/// socket with `handover::activation::take()`, here through the pipe
/// bootstrap (systemfd's protocol turned off, so nothing else could serve it).
#[test]
fn an_activation_program_takes_its_socket_through_the_bootstrap() {
    let (mut handover, addr) = start_under_handover(&["--no-systemfd"], &example("http_demo"));
    let answer = get(&addr);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.starts_with("generation 0 pid "), "{body}");
    let pid: u32 = body["generation 0 pid ".len()..].trim().parse().unwrap();
    assert_ne!(pid, handover.id());
    terminate(pid);
    handover.wait().unwrap();
}
