//! `handover adopt` on Windows, run under Wine by scripts/windows-test.sh:
//! a process started without handover (this test binary, run again as a
//! "legacy" server) holds a TCP listener, a bound UDP socket, a connected
//! TCP pair and a file; `handover adopt --pid P --listeners -- PROGRAM`
//! finds the two listening sockets among all its handles, and PROGRAM
//! (this binary again, as "new") gets them by the activation protocol and
//! serves on the listener after the legacy process is gone. `--fd` takes a
//! handle by value; a process with no listening socket and a pid with no
//! process are refused before anything starts.
//!
//! Every wait is bounded and every process is killed when its test ends:
//! an orphaned Windows process makes `wine` wait forever.

#![cfg(windows)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::windows::io::AsRawSocket;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HANDOVER: &str = env!("CARGO_BIN_EXE_handover");
const WAIT: Duration = Duration::from_secs(30);
const ROLE: &str = "HANDOVER_TEST_ROLE";

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every stdout line of `child`, as it comes, until it ends (`None`).
fn lines(child: &mut Child) -> mpsc::Receiver<Option<String>> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(n) if n > 0 => {
                    if tx.send(Some(line.trim_end().to_owned())).is_err() {
                        // Nobody listens any more; keep draining so the
                        // writer never blocks on a full pipe.
                        let mut buf = [0u8; 512];
                        while matches!(out.read(&mut buf), Ok(n) if n > 0) {}
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    rx
}

/// The next line containing `marker`, from `marker` on (the test
/// harness's own `test child_entry ... ` may precede it on the line).
fn wait_for(rx: &mpsc::Receiver<Option<String>>, marker: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(line)) => {
                if let Some(at) = line.find(marker) {
                    return line[at..].to_owned();
                }
            }
            Ok(None) => panic!("the process ended before printing {marker:?}"),
            Err(_) => panic!("no {marker:?} within {WAIT:?}"),
        }
    }
}

/// Starts this test binary in `role`.
fn role_command(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    cmd
}

/// A legacy server: its pid, listener handle value, TCP and UDP ports.
struct Legacy {
    process: Process,
    pid: u32,
    listener: u32,
    tcp_port: u16,
    udp_port: u16,
}

fn start_legacy() -> Legacy {
    let mut child = role_command("legacy")
        .spawn()
        .expect("starting the legacy server");
    let rx = lines(&mut child);
    let pid = child.id();
    let process = Process(child);
    let ready = wait_for(&rx, "ready ");
    let n: Vec<u32> = ready[6..].split(' ').map(|n| n.parse().unwrap()).collect();
    Legacy {
        process,
        pid,
        listener: n[0],
        tcp_port: n[1] as u16,
        udp_port: n[2] as u16,
    }
}

/// `handover adopt ARGS -- <this binary as "new">`, its output read.
fn adopt(args: &[String]) -> (Process, mpsc::Receiver<Option<String>>) {
    let mut cmd = Command::new(HANDOVER);
    cmd.arg("adopt")
        .args(args)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, "new")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("starting handover adopt");
    let rx = lines(&mut child);
    (Process(child), rx)
}

/// Connects to the port and reads the whole answer.
fn answer(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the adopted port");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the answer");
    text
}

/// Waits (bounded) for the process to exit; its exit code.
fn exit_code(p: &mut Process) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn listeners_are_found_among_all_handles_and_served_by_the_new_program() {
    let mut legacy = start_legacy();
    let (mut adopter, rx) = adopt(&["--pid".into(), legacy.pid.to_string(), "--listeners".into()]);

    // Exactly the two listening sockets, in handle order, named in turn;
    // the connected pair and the file are not taken.
    let mut adopted = Vec::new();
    let mut got = Vec::new();
    loop {
        let line = wait_for(&rx, "");
        if line.starts_with("handover: adopted ") {
            adopted.push(line);
        } else if let Some(rest) = line.find("got ").map(|at| line[at..].to_owned()) {
            got.push(rest);
        } else if line.contains("new ready") {
            break;
        }
    }
    assert_eq!(adopted.len(), 2, "adopted: {adopted:?}");
    let tcp = format!("tcp 127.0.0.1:{}", legacy.tcp_port);
    let udp = format!("udp 127.0.0.1:{}", legacy.udp_port);
    assert!(
        adopted.iter().any(|l| l.contains(&format!(
            "handover: adopted fd {} of process {}: {tcp} as ",
            legacy.listener, legacy.pid
        ))),
        "{adopted:?}"
    );
    assert!(adopted.iter().any(|l| l.contains(&udp)), "{adopted:?}");
    assert!(adopted[0].ends_with(" as adopted"), "{adopted:?}");
    assert!(adopted[1].ends_with(" as adopted.1"), "{adopted:?}");
    got.sort();
    let mut expected = vec![
        format!(
            "got adopted {}",
            if adopted[0].contains("tcp ") {
                &tcp
            } else {
                &udp
            }
        ),
        format!(
            "got adopted.1 {}",
            if adopted[1].contains("tcp ") {
                &tcp
            } else {
                &udp
            }
        ),
    ];
    expected.sort();
    assert_eq!(got, expected);

    // The legacy process goes; the socket stays open in the new program,
    // which answers on it.
    let _ = legacy.process.0.kill();
    let _ = legacy.process.0.wait();
    assert_eq!(answer(legacy.tcp_port), "new\n");
    assert_eq!(
        exit_code(&mut adopter),
        0,
        "adopt exits with the program's code"
    );
}

#[test]
fn a_handle_value_is_taken_with_fd() {
    let legacy = start_legacy();
    let (mut adopter, rx) = adopt(&[
        "--pid".into(),
        legacy.pid.to_string(),
        "--fd".into(),
        format!("{:#x}", legacy.listener),
        "--name".into(),
        "web".into(),
    ]);
    let line = wait_for(&rx, "handover: adopted ");
    let prefix = format!(
        "handover: adopted fd {} of process {}: ",
        legacy.listener, legacy.pid
    );
    assert!(
        line.starts_with(&prefix) && line.ends_with(" as web"),
        "{line}"
    );
    let got = wait_for(&rx, "got ");
    assert_eq!(got, format!("got web tcp 127.0.0.1:{}", legacy.tcp_port));
    wait_for(&rx, "new ready");
    // Both hold the listener now; the legacy one does not accept, so the
    // new program answers.
    assert_eq!(answer(legacy.tcp_port), "new\n");
    assert_eq!(exit_code(&mut adopter), 0);
}

#[test]
fn a_process_without_listeners_and_a_missing_process_are_refused() {
    // A process with a file and no socket at all.
    let mut idle = role_command("idle")
        .spawn()
        .expect("starting the idle process");
    let rx = lines(&mut idle);
    let idle_pid = idle.id();
    let idle = Process(idle);
    wait_for(&rx, "ready");
    let out = std::process::Command::new(HANDOVER)
        .args(["adopt", "--pid", &idle_pid.to_string(), "--listeners", "--"])
        .arg(std::env::current_exe().unwrap())
        .env(ROLE, "new")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("process {idle_pid} has no listening sockets")),
        "{stderr}"
    );
    assert!(
        !stdout.contains("got "),
        "the program must not start: {stdout}"
    );
    drop(idle);

    // A pid whose process has exited (and been waited for).
    let mut gone = std::process::Command::new(HANDOVER)
        .arg("--version")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let out = std::process::Command::new(HANDOVER)
        .args([
            "adopt",
            "--pid",
            &gone_pid.to_string(),
            "--listeners",
            "--",
            "cmd",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no process {gone_pid}")),
        "{stderr}"
    );
}

// --- the roles this binary is started in --------------------------------

/// Not a test of its own: the entry point of the processes above, chosen
/// by HANDOVER_TEST_ROLE (returns at once when it is unset).
#[test]
fn child_entry() {
    match std::env::var(ROLE).as_deref() {
        Ok("legacy") => legacy(),
        Ok("idle") => idle(),
        Ok("new") => new(),
        _ => {}
    }
}

/// Holds a listener, a bound UDP socket, a connected TCP pair and a file,
/// prints `ready LISTENER_HANDLE TCP_PORT UDP_PORT`, and waits for its
/// stdin to close (or to be killed). It never accepts.
fn legacy() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let file = tempfile_in_target();
    println!(
        "ready {} {} {}",
        listener.as_raw_socket(),
        listener.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port()
    );
    std::io::stdout().flush().unwrap();
    let mut buf = [0u8; 64];
    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    drop((listener, udp, client, accepted, file));
}

/// A file and nothing else; waits like `legacy`.
fn idle() {
    let file = tempfile_in_target();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut buf = [0u8; 64];
    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    drop(file);
}

fn tempfile_in_target() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("handover-adopt-{}", std::process::id()));
    std::fs::File::create(path).unwrap()
}

/// The adopted program: prints `got NAME KIND ADDRESS` for each activation
/// socket, then `new ready`, answers one connection on the TCP listener
/// with "new\n", and exits.
fn new() {
    // Not `activation::take`, which also clears the variables: this runs
    // on a test harness thread.
    let env = handover::activation::ActivationEnv::from_process();
    let mut activation = handover::activation::take_from(&env).expect("activation handles");
    let names = activation.names().to_vec();
    let mut tcp = None;
    for (i, name) in names.iter().enumerate() {
        let handle = activation.take(i).unwrap();
        match handle.kind() {
            handover::HandleKind::Socket(info) if info.listening => {
                let l = handle.into_tcp_listener().unwrap();
                println!("got {name} tcp {}", l.local_addr().unwrap());
                tcp = Some(l);
            }
            _ => {
                let u = handle.into_udp_socket().unwrap();
                println!("got {name} udp {}", u.local_addr().unwrap());
            }
        }
    }
    println!("new ready");
    std::io::stdout().flush().unwrap();
    let listener = tcp.expect("a TCP listener among the activation sockets");
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    let (mut conn, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection came");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.write_all(b"new\n").unwrap();
}
