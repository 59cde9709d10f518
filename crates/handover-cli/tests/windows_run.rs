//! `handover run` on Windows, run under Wine by scripts/windows-test.sh: a
//! server written against the `listenfd` crate (examples/listenfd_server.rs,
//! systemfd's Windows protocol) serves through the socket handover bound,
//! mistakes are reported before anything starts, and reloads, rollback and
//! the fd store work as on Linux.

#![cfg(windows)]

mod windows_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const HANDOVER: &str = env!("CARGO_BIN_EXE_handover");
const WAIT: Duration = Duration::from_secs(30);

use windows_common::{example, exited_within, terminate};

fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    windows_common::wait_until(what, WAIT, f)
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
    let _ = terminate(pid);
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
    assert!(exited_within(pid, WAIT), "the program outlived handover");
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
    assert!(body.starts_with("generation 1 pid "), "{body}");
    let pid: u32 = body["generation 1 pid ".len()..].trim().parse().unwrap();
    assert_ne!(pid, handover.id());
    let _ = terminate(pid);
    handover.wait().unwrap();
}

// --- reloads, rollback and the fd store ------------------------------------

/// A control pipe name of this test's own.
fn control_name(test: &str) -> String {
    format!("handover-test-{test}-{}", std::process::id())
}

/// `handover reload` or `handover status --json` against `ctl`.
fn handover_cmd(args: &[&str], ctl: &str) -> std::process::Output {
    Command::new(HANDOVER)
        .args(args)
        .args(["--control", ctl])
        .output()
        .unwrap()
}

fn status(ctl: &str) -> serde_json::Value {
    let out = handover_cmd(&["status", "--json"], ctl);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One GET on a new connection: the generation that answered, or what
/// went wrong.
fn try_get(addr: &str) -> Result<u64, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e} (got {out:?})"))?;
    let body = out
        .strip_prefix("HTTP/1.1 200 OK\r\n")
        .and_then(|rest| rest.split("\r\n\r\n").nth(1))
        .ok_or_else(|| format!("not a 200: {out:?}"))?;
    body.strip_prefix("generation ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("unexpected body {body:?}"))
}

/// Ends handover (and, through its job, every generation).
fn end(mut handover: Child) {
    let _ = handover.kill();
    let _ = handover.wait();
}

#[test]
fn reloads_under_load_fail_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let ctl = control_name("load");
    let (handover, addr) = start_under_handover(
        &["--ready", "notify", "--control", &ctl, "--no-systemfd"],
        &example("http_demo"),
    );
    wait_until("generation 1 to serve", || try_get(&addr).ok());
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(Mutex::new(std::collections::BTreeMap::<u64, u64>::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, failures, served, addr) =
                (stop.clone(), failures.clone(), served.clone(), addr.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match try_get(&addr) {
                        Ok(g) => *served.lock().unwrap().entry(g).or_default() += 1,
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    for n in 2..=4u64 {
        let out = handover_cmd(&["reload"], &ctl);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "reload {n}: {out:?}");
        assert!(text.contains(&format!("generation {n}")), "{text}");
        wait_until(&format!("generation {n} to answer"), || {
            served.lock().unwrap().contains_key(&n).then_some(())
        });
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let served = served.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!((1..=4).all(|g| served.contains_key(&g)), "{served:?}");
    let s = status(&ctl);
    assert_eq!(s["reloads"]["ok"], 3, "{s}");
    assert_eq!(s["reloads"]["failed"], 0, "{s}");
    // The old generations drained and exited on their stop events, well
    // before --stop-timeout (30 s) would have killed them.
    let gens = wait_until("the old generations to exit", || {
        let s = status(&ctl);
        let gens = s["generations"].as_array().unwrap().clone();
        (gens.len() == 1).then_some(gens)
    });
    assert_eq!(gens[0]["generation"], 4);
    end(handover);
}

#[test]
fn a_generation_never_ready_is_rolled_back() {
    let ctl = control_name("rollback");
    // No generation says READY=1 in time (http_demo --delay-ready 600):
    // the first serves anyway, replacing nothing; a reload's must be ready
    // to take over, so it is rolled back after --ready-timeout.
    let (handover, addr) = {
        let mut h = Command::new(HANDOVER)
            .args([
                "run",
                "--ready",
                "notify",
                "--ready-timeout",
                "2s",
                "--control",
                &ctl,
            ])
            .args(["-l", "127.0.0.1:0=http", "--"])
            .arg(example("http_demo"))
            .args(["--delay-ready", "600"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines(&mut h);
        let line = rx.recv_timeout(WAIT).unwrap();
        let addr = line
            .strip_prefix("handover: listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .to_owned();
        (h, addr)
    };
    assert_eq!(wait_until("generation 1", || try_get(&addr).ok()), 1);
    let out = handover_cmd(&["reload"], &ctl);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("reload failed") && err.contains("not ready"),
        "{err}"
    );
    assert_eq!(try_get(&addr), Ok(1), "the old generation keeps serving");
    let s = status(&ctl);
    assert_eq!(s["reloads"]["failed"], 1, "{s}");
    assert_eq!(s["last_reload"]["ok"], false, "{s}");
    end(handover);
}

/// What `fdstore_program` writes, line by line.
fn report_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_fd_store_passes_a_file_to_the_next_generation() {
    let ctl = control_name("fdstore");
    let dir = std::env::temp_dir().join(format!("handover-fdstore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.txt");
    let _ = std::fs::remove_file(&report);
    let mut h = Command::new(HANDOVER)
        .args(["run", "--ready", "notify", "--control", &ctl])
        .args(["-l", "127.0.0.1:0=http", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "fdstore_program",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("HANDOVER_TEST_REPORT", &report)
        .env("HANDOVER_TEST_DIR", &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _rx = lines(&mut h);
    wait_until("generation 1 to be ready", || {
        report_lines(&report)
            .iter()
            .any(|l| l == "generation 1: 1 listener, no state; stored")
            .then_some(())
    });
    let out = handover_cmd(&["reload"], &ctl);
    assert!(out.status.success(), "{out:?} {:?}", report_lines(&report));
    let lines = wait_until("generation 2 to take the stored file", || {
        let lines = report_lines(&report);
        lines
            .iter()
            .any(|l| l == "generation 1: stop asked")
            .then_some(lines)
    });
    assert!(
        lines.contains(
            &"generation 2: 1 listener, state \"written by generation 1\"; stored".to_owned()
        ),
        "{lines:?}"
    );
    let s = status(&ctl);
    let store = s["fdstore"].as_array().unwrap();
    assert_eq!(store.len(), 1, "{s}");
    assert_eq!(store[0]["name"], "state", "{s}");
    assert_eq!(store[0]["generation"], 2, "{s}");
    end(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The program of `the_fd_store_passes_a_file_to_the_next_generation`, run
/// by handover as this test executable: it takes its listener and the
/// stored "state" file, replaces the stored file with its own (removal and
/// store both acknowledged), says READY=1, and waits for its stop event.
#[test]
#[ignore = "a program for `handover run`, started by the test above"]
fn fdstore_program() {
    use handover::notify::{self, StoreReply};
    use handover::windows::StopEvent;
    use std::io::Seek;
    let (Some(report), Some(dir)) = (
        std::env::var_os("HANDOVER_TEST_REPORT"),
        std::env::var_os("HANDOVER_TEST_DIR"),
    ) else {
        panic!("run by the_fd_store_passes_a_file_to_the_next_generation only");
    };
    let say = |line: String| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&report)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    };
    let activation = handover::activation::take().unwrap();
    let stop = StopEvent::from_env()
        .unwrap()
        .expect("a stop event from handover run");
    let generation = std::env::var("HANDOVER_GENERATION").unwrap();
    let mut handles = activation.into_handles();
    let state = handles
        .iter()
        .position(|h| h.name() == Some("state"))
        .map(|at| handles.remove(at));
    let listeners = handles.iter().filter(|h| h.name() == Some("http")).count();
    let state = match state {
        None => "no state".to_owned(),
        Some(h) => {
            let mut f = h.into_file().unwrap();
            f.rewind().unwrap();
            let mut text = String::new();
            f.read_to_string(&mut text).unwrap();
            format!("state {text:?}")
        }
    };
    let timeout = Duration::from_secs(10);
    let removed = notify::remove_stored_acked("state", timeout).unwrap();
    assert_eq!(removed, StoreReply::Removed);
    let path = std::path::Path::new(&dir).join(format!("state-{generation}.txt"));
    std::fs::write(&path, format!("written by generation {generation}")).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let stored =
        notify::store_acked("state", &[handover::Handle::from(file)], false, timeout).unwrap();
    assert_eq!(stored, StoreReply::Stored);
    say(format!(
        "generation {generation}: {listeners} listener{}, {state}; stored",
        if listeners == 1 { "" } else { "s" }
    ));
    notify::notify("READY=1").unwrap();
    stop.wait();
    say(format!("generation {generation}: stop asked"));
}

#[test]
fn a_change_under_a_watched_directory_reloads() {
    let ctl = control_name("watch");
    let dir = std::env::temp_dir().join(format!("handover-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src").join("main.rs"), "fn main() {}\n").unwrap();
    let dir_arg = dir.to_str().unwrap();
    let (handover, addr) = start_under_handover(
        &["--ready", "notify", "--watch", dir_arg, "--control", &ctl],
        &example("http_demo"),
    );
    assert_eq!(wait_until("generation 1", || try_get(&addr).ok()), 1);
    // Nothing changed yet: no reload (a scan or two have passed).
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(status(&ctl)["reloads"]["ok"], 0);
    std::fs::write(
        dir.join("src").join("main.rs"),
        "fn main() { println!(\"changed\"); }\n",
    )
    .unwrap();
    let s = wait_until("the change to reload", || {
        let s = status(&ctl);
        (s["reloads"]["ok"] == 1).then_some(s)
    });
    assert_eq!(s["reloads"]["failed"], 0, "{s}");
    wait_until("generation 2 to answer", || {
        (try_get(&addr) == Ok(2)).then_some(())
    });
    end(handover);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--restart on-failure`: a generation that dies is started again on the
/// same socket; `handover status` counts the restart.
#[test]
fn a_crashed_generation_is_restarted_on_the_same_socket() {
    let ctl = control_name("restart");
    let (handover, addr) = start_under_handover(
        &[
            "--ready",
            "notify",
            "--restart",
            "on-failure",
            "--control",
            &ctl,
        ],
        &example("http_demo"),
    );
    assert_eq!(wait_until("generation 1", || try_get(&addr).ok()), 1);
    let first = status(&ctl)["generations"][0]["pid"].as_u64().unwrap() as u32;
    let _ = terminate(first);
    assert_eq!(
        wait_until("generation 2 to serve", || try_get(&addr)
            .ok()
            .filter(|&g| g == 2)),
        2
    );
    let s = status(&ctl);
    assert_eq!(s["restarts"], 1, "{s}");
    end(handover);
}
