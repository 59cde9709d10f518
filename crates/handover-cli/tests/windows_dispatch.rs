//! `handover run --workers N` and `handover dispatch` on Windows, run under
//! Wine by scripts/windows-test.sh: real TCP clients against
//! examples/dispatch_worker.rs, whose answers say which worker (slot and
//! pid) served them. Connections are spread over the workers, a hung
//! worker killed mid-load loses no connection and is restarted, the stop
//! event drains the dispatcher (in-flight connections finish, the backlog
//! is left to whoever else holds the socket), routes by HTTP Host and TLS
//! SNI reach their pool, and a reload switches to new workers while the old ones
//! drain. The Linux suite is tests/dispatch.rs.

#![cfg(windows)]

mod windows_common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const HANDOVER: &str = env!("CARGO_BIN_EXE_handover");
const WAIT: Duration = Duration::from_secs(30);

use windows_common::{example, exited_within, terminate};

fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    windows_common::wait_until(what, WAIT, f)
}

/// A directory of this test's own, emptied first.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handover-wdisp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How many handles process `pid` has open.
fn handle_count(pid: u32) -> u32 {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{
        GetProcessHandleCount, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    let mut count = 0u32;
    // SAFETY: opens, asks and closes a process handle of our own; `count`
    // is live for the call.
    let ok = unsafe {
        let h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        assert!(!h.is_null(), "process {pid} cannot be opened");
        let ok = GetProcessHandleCount(h, &mut count);
        CloseHandle(h);
        ok
    };
    assert_ne!(ok, 0, "GetProcessHandleCount");
    count
}

/// Who served a request, from dispatch_worker's answer `pool P worker W
/// pid N generation G listener L peeked K`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    pool: String,
    worker: u32,
    pid: u32,
    generation: u64,
}

fn parse_answer(text: &str) -> Result<Answer, String> {
    let body = text
        .strip_prefix("HTTP/1.1 200 OK\r\n")
        .and_then(|rest| rest.split("\r\n\r\n").nth(1))
        .ok_or_else(|| format!("not a 200: {text:?}"))?;
    let words: Vec<&str> = body.split_whitespace().collect();
    let field = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .copied()
            .ok_or_else(|| format!("no {key} in {body:?}"))
    };
    let number = |key: &str| -> Result<u64, String> {
        field(key)?
            .parse()
            .map_err(|_| format!("bad {key} in {body:?}"))
    };
    Ok(Answer {
        pool: field("pool")?.to_owned(),
        worker: number("worker")? as u32,
        pid: number("pid")? as u32,
        generation: number("generation")?,
    })
}

/// One HTTP/1.0 GET on a new connection, with this Host.
fn try_get(addr: &str, host: &str) -> Result<Answer, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e} (got {out:?})"))?;
    parse_answer(&out)
}

/// One answer read from a kept-alive connection (by its Content-Length).
fn read_answer(s: &mut TcpStream) -> Result<Answer, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    parse_answer(&format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// `handover run` with its stderr collected (its own logs and its
/// workers', who inherit it).
struct Running {
    child: Child,
    addr: String,
    ctl: String,
    err: Arc<Mutex<String>>,
}

impl Running {
    fn start(test: &str, run_args: &[&str], worker_args: &[&str]) -> Running {
        let ctl = format!("handover-test-wdisp-{test}-{}", std::process::id());
        let mut child = Command::new(HANDOVER)
            .arg("run")
            .args(["--control", &ctl])
            .args(run_args)
            .args(["-l", "127.0.0.1:0=http", "--"])
            .arg(example("dispatch_worker"))
            .args(worker_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&err);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = sink.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(WAIT)
            .expect("handover says where it listens");
        let addr = line
            .strip_prefix("handover: listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .to_owned();
        Running {
            child,
            addr,
            ctl,
            err,
        }
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until `what` appears `n` times in stderr; all of it.
    fn wait_log(&self, what: &str, n: usize) -> String {
        wait_until(&format!("{n} x {what:?} in handover's log"), || {
            let e = self.stderr();
            (e.matches(what).count() >= n).then_some(e)
        })
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(HANDOVER)
            .args(["status", "--json", "--control", &self.ctl])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The pid of generation `g`'s dispatcher.
    fn dispatcher_pid(&self, g: u64) -> u32 {
        let s = self.status();
        s["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["generation"] == g)
            .and_then(|x| x["pid"].as_u64())
            .unwrap_or_else(|| panic!("no generation {g} in {s}")) as u32
    }

    /// Ends handover (and, through the kill-on-close jobs, its dispatcher
    /// and their workers).
    fn end(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clients that send GETs on new connections, without pause, until
/// stopped: every answer, every failure, and when each waiting request
/// started.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Per client, since when its request in flight waits (None: idle).
    waiting: Arc<Mutex<Vec<Option<Instant>>>>,
}

impl Load {
    fn start(addr: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let waiting = Arc::new(Mutex::new(vec![None; clients]));
        let threads = (0..clients)
            .map(|i| {
                let (stop, answers, failures, waiting, addr) = (
                    stop.clone(),
                    answers.clone(),
                    failures.clone(),
                    waiting.clone(),
                    addr.to_owned(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        waiting.lock().unwrap()[i] = Some(Instant::now());
                        let got = try_get(&addr, "t");
                        waiting.lock().unwrap()[i] = None;
                        match got {
                            Ok(a) => answers.lock().unwrap().push(a),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answers,
            failures,
            threads,
            waiting,
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    fn waiting_longer_than(&self, d: Duration) -> usize {
        let w = self.waiting.lock().unwrap();
        w.iter().flatten().filter(|t| t.elapsed() > d).count()
    }

    /// Stops the clients; every answer. Any failure fails the test.
    fn finish(self, h: &Running) -> Vec<Answer> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} requests failed: {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            h.stderr()
        );
        self.answers.lock().unwrap().clone()
    }
}

/// Answers per (worker slot, pid).
fn spread(answers: &[Answer]) -> BTreeMap<(u32, u32), usize> {
    let mut by = BTreeMap::new();
    for a in answers {
        *by.entry((a.worker, a.pid)).or_default() += 1;
    }
    by
}

#[test]
fn two_workers_serve_hundreds_of_connections_and_the_dispatcher_keeps_no_handles() {
    let h = Running::start("spread", &["--workers", "2"], &[]);
    h.wait_log("every worker is ready", 1);
    let dispatcher = h.dispatcher_pid(1);
    // Warm: the first connections of each worker, then the baseline.
    for _ in 0..20 {
        try_get(&h.addr, "t").unwrap();
    }
    let before = handle_count(dispatcher);

    // 200 connections from 8 clients at once.
    let answers: Vec<Answer> = {
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (results, addr) = (results.clone(), h.addr.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let r = try_get(&addr, "t");
                        results.lock().unwrap().push(r);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let results = std::mem::take(&mut *results.lock().unwrap());
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} of 200 failed: {:?}\n{}",
            failed.len(),
            &failed[..failed.len().min(5)],
            h.stderr()
        );
        results.into_iter().map(Result::unwrap).collect()
    };
    assert_eq!(answers.len(), 200);
    let by = spread(&answers);
    assert_eq!(
        by.keys().map(|(w, _)| *w).collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1]),
        "both workers serve: {by:?}"
    );
    assert!(
        by.values().all(|&n| n >= 20),
        "least-busy spreads the load: {by:?}"
    );
    assert!(answers
        .iter()
        .all(|a| a.pool == "default" && a.generation == 1 && a.pid != dispatcher));

    // Each connection's copy in the dispatcher closes once its worker took
    // it: the count comes back to the baseline.
    let after = wait_until("the dispatcher's handles to return to the baseline", || {
        let n = handle_count(dispatcher);
        (n <= before + 2).then_some(n)
    });
    assert!(after <= before + 2, "{before} -> {after}");
    assert!(!h.stderr().contains("worker lost"), "{}", h.stderr());
    h.end();
}

#[test]
fn a_hung_worker_killed_mid_load_loses_no_connection_and_is_restarted() {
    let dir = temp_dir("hung");
    let mark = dir.join("stalled");
    // Worker 0, the first time only, stops taking connections after 3 but
    // keeps its channel: what round-robin sends it waits, unacknowledged.
    let h = Running::start(
        "hung",
        &["--workers", "2", "--dispatch", "round-robin"],
        &[
            "--stall-after",
            "3",
            "--only-worker",
            "0",
            "--once",
            mark.to_str().unwrap(),
        ],
    );
    h.wait_log("every worker is ready", 1);
    let load = Load::start(&h.addr, 8);
    let hung: u32 = h
        .wait_log("stalling after", 1)
        .lines()
        .find_map(|l| l.strip_prefix("dispatch_worker: pid "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the stalled worker's pid");
    // Clients stuck on connections the hung worker holds unacknowledged
    // (the others are answered in milliseconds).
    wait_until("clients waiting on the hung worker", || {
        (load.waiting_longer_than(Duration::from_secs(1)) >= 1).then_some(())
    });
    let served_before_kill = load.answers().len();
    assert!(terminate(hung), "the hung worker {hung} cannot be opened");

    let err = h.wait_log("handing the connections it had not taken", 1);
    let handed = err
        .lines()
        .find(|l| l.contains("handing the connections it had not taken"))
        .unwrap();
    let count: usize = handed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("count="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {handed:?}"));
    assert!(
        count >= 1 && handed.contains("worker=0"),
        "the hung worker held no connection: {handed}"
    );
    // Worker 0 is started again and serves.
    let new_pid = wait_until("the restarted worker 0 to serve", || {
        load.answers()
            .iter()
            .find(|a| a.worker == 0 && a.pid != hung)
            .map(|a| a.pid)
    });
    let before = load.answers().len();
    wait_until("more requests served", || {
        (load.answers().len() > before + 100).then_some(())
    });
    assert!(load.waiting_longer_than(Duration::from_secs(5)) == 0);
    let answers = load.finish(&h);
    assert!(answers.len() > served_before_kill);
    assert!(
        answers.iter().any(|a| a.pid == hung),
        "the hung worker served its first connections"
    );
    assert!(exited_within(hung, Duration::ZERO));
    assert!(!exited_within(new_pid, Duration::ZERO));
    let err = h.stderr();
    assert!(err.contains("worker died; restarting"), "{err}");
    assert_eq!(
        err.matches("worker lost").count() + err.matches("closed its channel").count(),
        1,
        "one worker went, once: {err}"
    );
    h.end();
}

/// `handover dispatch` started by this test, as `handover run` would: the
/// listener as its activation socket, a stop event, stderr to a file.
fn start_dispatch(
    listener: &TcpListener,
    stop: &handover::windows::StopEvent,
    log: &Path,
    worker_args: &[&str],
) -> handover::Child {
    use handover::windows::CommandExt;
    let worker = example("dispatch_worker");
    let copy = listener.try_clone().unwrap();
    let err = std::fs::File::create(log).unwrap();
    let mut cmd = handover::Command::new(HANDOVER);
    cmd.args(["dispatch", "--workers", "2", "--"])
        .arg(&worker)
        .args(worker_args)
        .activation(handover::Handle::from(copy).with_name("http"))
        .unwrap()
        .stop_event(stop)
        .unwrap()
        .stderr(handover::Handle::from(err))
        .end_with_parent(true);
    cmd.spawn().unwrap()
}

#[test]
fn the_stop_event_drains_in_flight_connections_and_leaves_the_backlog() {
    let dir = temp_dir("drain");
    let log = dir.join("dispatch.log");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = handover::windows::StopEvent::new().unwrap();
    let mut dispatcher = start_dispatch(&listener, &stop, &log, &[]);
    let report = || std::fs::read_to_string(&log).unwrap_or_default();

    // Both workers' pids, from their answers.
    let mut pids = BTreeSet::new();
    let mut tries = 0;
    while pids.len() < 2 {
        tries += 1;
        assert!(
            tries < 200,
            "one worker never answers: {pids:?}\n{}",
            report()
        );
        if let Ok(a) = try_get(&addr, "t") {
            pids.insert(a.pid);
        }
    }
    // A kept-alive connection, in flight at its worker.
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.set_read_timeout(Some(WAIT)).unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let first = read_answer(&mut kept).unwrap();

    stop.set().unwrap();
    wait_until("the dispatcher to drain", || {
        report().contains("draining (stop event)").then_some(())
    });
    // After the drain began: left in the backlog, for whoever holds the
    // socket next (here, this test).
    let mut late = TcpStream::connect(&addr).unwrap();
    late.write_all(b"late").unwrap();
    // The dispatcher waits for the worker that serves the kept connection.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        dispatcher.try_wait().unwrap().is_none(),
        "the dispatcher exited with a connection in flight\n{}",
        report()
    );
    // Which is still served, by the same worker.
    kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let second = read_answer(&mut kept).unwrap();
    assert_eq!(second.pid, first.pid);
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(kept);

    // Then the workers finish and the dispatcher exits cleanly.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = dispatcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the dispatcher did not exit\n{}",
            report()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", report());
    for pid in &pids {
        assert!(
            exited_within(*pid, WAIT),
            "worker {pid} outlived its dispatcher"
        );
    }
    let log = report();
    assert!(log.contains("every worker has exited"), "{log}");
    assert!(!log.contains("worker lost"), "{log}");
    // The late connection waited in the backlog, untouched.
    listener.set_nonblocking(true).unwrap();
    let (mut got, _) = wait_until("the late connection in the backlog", || {
        listener.accept().ok()
    });
    got.set_nonblocking(false).unwrap();
    got.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = [0u8; 4];
    got.read_exact(&mut bytes).unwrap();
    assert_eq!(&bytes, b"late");
}

#[test]
fn dispatch_without_sockets_and_a_bad_worker_count_are_refused_clearly() {
    let out = Command::new(HANDOVER)
        .args(["dispatch", "--workers", "2", "--"])
        .arg(example("dispatch_worker"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no sockets to accept on"), "{err}");
    let out = Command::new(HANDOVER)
        .args(["run", "--workers", "0", "-l", "127.0.0.1:0", "--"])
        .arg(example("dispatch_worker"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--workers must be 1 to 1024"), "{err}");
}

const ROUTES: &str = r#"
[[pool]]
name = "api"
workers = 1

[[pool]]
name = "tls"
workers = 1

[[route]]
host = "api.example.com"
pool = "api"

[[route]]
sni = "tls.example.com"
pool = "tls"
"#;

/// A TLS 1.2-framed ClientHello naming `host` in its SNI extension.
fn client_hello(host: &str) -> Vec<u8> {
    let be16 = |n: usize| (n as u16).to_be_bytes();
    let mut name = vec![0u8]; // host_name
    name.extend(be16(host.len()));
    name.extend(host.as_bytes());
    let mut sni = be16(name.len()).to_vec();
    sni.extend(name);
    let mut ext = vec![0, 0]; // server_name
    ext.extend(be16(sni.len()));
    ext.extend(sni);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // one cipher suite
    body.extend([1, 0]); // compression: null
    body.extend(be16(ext.len()));
    body.extend(ext);
    let mut hs = vec![1, 0];
    hs.extend(be16(body.len()));
    hs.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(be16(hs.len()));
    record.extend(hs);
    record
}

#[test]
fn host_and_sni_routes_send_clients_to_their_pool() {
    let dir = temp_dir("routes");
    let routes = dir.join("routes.toml");
    std::fs::write(&routes, ROUTES).unwrap();
    let h = Running::start(
        "routes",
        &["--workers", "2", "--routes", routes.to_str().unwrap()],
        &[],
    );
    h.wait_log("every worker is ready", 1);
    for _ in 0..20 {
        let api = try_get(&h.addr, "api.example.com").unwrap();
        assert_eq!(api.pool, "api", "{api:?}");
        let other = try_get(&h.addr, "www.example.com").unwrap();
        assert_eq!(other.pool, "default", "{other:?}");
    }
    // A head in two parts, the Host in the second: peeked again until the
    // route is known.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"Host: api.example.com\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(parse_answer(&out).unwrap().pool, "api", "{out}");
    // By TLS SNI: the worker answers a ClientHello with its plain label,
    // having read the peeked bytes from the socket first (not consumed).
    let hello = client_hello("tls.example.com");
    let mut s = TcpStream::connect(&h.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&hello).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("pool tls worker 0 "), "{out}");
    assert!(
        out.trim_end().ends_with(&format!("peeked {}", hello.len())),
        "{out}"
    );
    h.end();
}

#[test]
fn a_reload_switches_to_new_workers_and_the_old_ones_drain() {
    let h = Running::start("reload", &["--workers", "2"], &[]);
    h.wait_log("every worker is ready", 1);
    let load = Load::start(&h.addr, 4);
    wait_until("generation 1 serves", || {
        load.answers()
            .iter()
            .any(|a| a.generation == 1)
            .then_some(())
    });
    let old = h.dispatcher_pid(1);
    let out = Command::new(HANDOVER)
        .args(["reload", "--control", &h.ctl])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", h.stderr());
    wait_until("generation 2 serves", || {
        load.answers()
            .iter()
            .any(|a| a.generation == 2)
            .then_some(())
    });
    // The old dispatcher drains and exits with its workers, well before
    // --stop-timeout (30 s).
    assert!(exited_within(old, WAIT), "{}", h.stderr());
    let before = load.answers().len();
    wait_until("more requests served", || {
        (load.answers().len() > before + 50).then_some(())
    });
    let answers = load.finish(&h);
    let old_pids: BTreeSet<u32> = answers
        .iter()
        .filter(|a| a.generation == 1)
        .map(|a| a.pid)
        .collect();
    assert!(old_pids.iter().all(|&p| exited_within(p, WAIT)));
    let s = h.status();
    assert_eq!(s["reloads"]["ok"], 1, "{s}");
    assert_eq!(s["generations"].as_array().unwrap().len(), 1, "{s}");
    h.end();
}
