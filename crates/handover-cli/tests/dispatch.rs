//! Connection dispatch (`handover run --workers N`, `handover dispatch`)
//! with real processes and sockets: thousands of connections through four
//! workers under both policies, a hung worker killed mid-load with nothing
//! lost, SNI and Host routing with curl and openssl s_client, reloads
//! under load, and the hostile or odd cases (bad routes files, crash
//! loops, no activation sockets, descriptor leaks). The workers are
//! examples/dispatch_worker, whose answers say who served. Every wait is
//! bounded; every process is stopped when its guard is dropped.
#![cfg(target_os = "linux")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Who served a request: dispatch_worker's answer, `pool P worker W pid N
/// generation G listener L peeked K`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    pool: String,
    worker: usize,
    pid: u32,
    generation: u64,
    peeked: usize,
}

impl Answer {
    fn parse(body: &str) -> Option<Answer> {
        let w: Vec<&str> = body.split_whitespace().collect();
        match w[..] {
            ["pool", pool, "worker", worker, "pid", pid, "generation", g, "listener", _, "peeked", k] => {
                Some(Answer {
                    pool: pool.to_owned(),
                    worker: worker.parse().ok()?,
                    pid: pid.parse().ok()?,
                    generation: g.parse().ok()?,
                    peeked: k.parse().ok()?,
                })
            }
            _ => None,
        }
    }

    /// From a whole HTTP response.
    fn from_response(response: &str) -> Result<Answer, String> {
        if !response.starts_with("HTTP/1.1 200 OK\r\n") {
            return Err(format!("not a 200: {response:?}"));
        }
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        Answer::parse(body).ok_or_else(|| format!("unexpected body {body:?}"))
    }
}

/// One request on a new connection, with `Host: host`.
fn try_get(addr: SocketAddr, host: &str) -> Result<Answer, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e} (got {out:?})"))?;
    Answer::from_response(&out)
}

/// Client threads, each making one connection per request until stopped
/// or, with a limit, until it made that many.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    failures: Arc<Mutex<Vec<String>>>,
    /// When each client's request in flight started.
    in_flight: Arc<Mutex<Vec<Option<Instant>>>>,
    /// Whether the clients stop by themselves, after so many requests.
    limited: bool,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, limit: Option<usize>, host: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(Mutex::new(vec![None; clients]));
        let threads = (0..clients)
            .map(|i| {
                let (stop, answers, failures, in_flight) = (
                    stop.clone(),
                    answers.clone(),
                    failures.clone(),
                    in_flight.clone(),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| n < l) {
                        in_flight.lock().unwrap()[i] = Some(Instant::now());
                        let got = try_get(addr, host);
                        in_flight.lock().unwrap()[i] = None;
                        match got {
                            Ok(a) => answers.lock().unwrap().push(a),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            answers,
            failures,
            in_flight,
            limited: limit.is_some(),
            threads,
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// How many requests have waited for their answer for at least `d`.
    fn waiting_longer_than(&self, d: Duration) -> usize {
        let in_flight = self.in_flight.lock().unwrap();
        in_flight
            .iter()
            .flatten()
            .filter(|t| t.elapsed() >= d)
            .count()
    }

    /// Stops the clients (each finishes its request in flight), or waits
    /// until they made their number of requests, and asserts none of their
    /// requests failed; returns every answer.
    fn finish(mut self, h: &Running) -> Vec<Answer> {
        if !self.limited {
            self.stop.store(true, Ordering::SeqCst);
        }
        for t in self.threads.drain(..) {
            t.join().expect("a client thread panicked");
        }
        let failures = self.failures.lock().unwrap();
        let answers = self.answers();
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, e.g. {:?}\n{}",
            failures.len(),
            failures.len() + answers.len(),
            &failures[..failures.len().min(5)],
            h.report()
        );
        answers
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `handover run --control CTL -l 127.0.0.1:0 RUN_ARGS… -- PROGRAM…`,
/// once its one listening address is printed.
fn start(ctl: &Path, run_args: &[&str], program: &[OsString]) -> (Running, SocketAddr) {
    let mut cmd = handover(["run", "--control"]);
    cmd.arg(ctl)
        .args(["-l", "127.0.0.1:0"])
        .args(run_args)
        .arg("--")
        .args(program);
    let h = Running::spawn(&mut cmd);
    let addr = h.tcp_addr();
    (h, addr)
}

/// examples/dispatch_worker with `args`.
fn worker(args: &[&str]) -> Vec<OsString> {
    let mut v = vec![example("dispatch_worker").into_os_string()];
    v.extend(args.iter().map(OsString::from));
    v
}

/// dispatch_worker through `sh -c SCRIPT WORKER ARGS…` (the worker is $0).
fn worker_via_sh(script: &str, args: &[&Path]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), script.into()];
    v.push(example("dispatch_worker").into_os_string());
    v.extend(args.iter().map(|p| p.as_os_str().to_owned()));
    v
}

/// Waits until handover's stderr holds `what` at least `n` times.
fn wait_log(h: &Running, what: &str, n: usize) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let err = h.stderr();
        if err.matches(what).count() >= n {
            return err;
        }
        if Instant::now() > deadline {
            panic!(
                "{what:?} not logged {n} times within {TIMEOUT:?}\n{}",
                h.report()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

/// The pid of generation `g`'s dispatcher, from handover's log.
fn dispatcher_pid(h: &Running, g: u64) -> i32 {
    let err = wait_log(h, &format!("started generation={g} "), 1);
    let line = err
        .lines()
        .find(|l| l.contains(&format!("started generation={g} ")))
        .unwrap();
    field(line, "pid").unwrap().parse().unwrap()
}

fn open_fds_of(pid: i32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    fds.sort();
    fds
}

fn thousands_of_connections(policy: &str) {
    let dir = TempDir::new("dispatch-many");
    let ctl = dir.join("ctl");
    let (mut h, addr) = start(
        &ctl,
        &["--workers", "4", "--dispatch", policy],
        &worker(&[]),
    );
    let answers = Load::start(addr, 4, Some(1000), "t").finish(&h);
    assert_eq!(answers.len(), 4000);
    let mut per_worker: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pids = BTreeSet::new();
    for a in &answers {
        assert_eq!(
            (a.pool.as_str(), a.generation, a.peeked),
            ("default", 1, 0),
            "{a:?}"
        );
        *per_worker.entry(a.worker).or_default() += 1;
        pids.insert(a.pid);
    }
    assert_eq!(
        per_worker.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "every worker served some: {per_worker:?}\n{}",
        h.report()
    );
    assert_eq!(pids.len(), 4, "{pids:?}");
    assert!(h.exited().is_none(), "{}", h.report());
    h.stop();
}

#[test]
fn four_workers_serve_four_thousand_connections_least_busy() {
    thousands_of_connections("least-busy");
}

#[test]
fn four_workers_serve_four_thousand_connections_round_robin() {
    thousands_of_connections("round-robin");
}

/// Worker 0, the first time only (the directory $1 is made then), stops
/// taking connections after 3: round-robin keeps handing it its share,
/// which it leaves unacknowledged.
const STALL_ONCE: &str = r#"if [ "$HANDOVER_WORKER" = 0 ] && mkdir "$1" 2>/dev/null; then exec "$0" --stall-after 3; fi; exec "$0""#;

/// The pid of the worker that said it stalls.
fn stalled_pid(h: &Running) -> i32 {
    wait_log(h, "stalling after", 1)
        .lines()
        .find_map(|l| l.strip_prefix("dispatch_worker: pid "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the stalled worker's pid")
}

#[test]
fn a_hung_worker_killed_mid_load_loses_no_connection_and_is_restarted() {
    let dir = TempDir::new("dispatch-hung");
    let ctl = dir.join("ctl");
    let mark = dir.join("stalled");
    let (mut h, addr) = start(
        &ctl,
        &["--workers", "4", "--dispatch", "round-robin"],
        &worker_via_sh(STALL_ONCE, &[&mark]),
    );
    let load = Load::start(addr, 8, None, "t");
    let hung = stalled_pid(&h);
    // Clients stuck on connections the hung worker holds unacknowledged
    // (the others are answered in milliseconds).
    wait_for("clients waiting on the hung worker", TIMEOUT, || {
        (load.waiting_longer_than(Duration::from_secs(1)) >= 1).then_some(())
    });
    // SAFETY: kill(2) on a worker process of this test's handover.
    assert_eq!(unsafe { libc::kill(hung, libc::SIGKILL) }, 0);

    let err = wait_log(&h, "worker lost", 1);
    let lost = err.lines().find(|l| l.contains("worker lost")).unwrap();
    assert!(lost.contains(&format!("pid={hung}")), "{lost}");
    // Once it is reaped, what it held unacknowledged goes to the others.
    let err = wait_log(&h, "handing the connections it had not taken", 1);
    let handed = err
        .lines()
        .find(|l| l.contains("handing the connections it had not taken"))
        .unwrap();
    let count: usize = field(handed, "count")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {handed:?}"));
    assert!(
        count >= 1 && handed.contains("worker=0"),
        "the hung worker held no connection: {handed}\n{}",
        h.report()
    );
    // Worker 0 is started again and serves.
    let new_pid = wait_for("the restarted worker 0 to serve", TIMEOUT, || {
        load.answers()
            .iter()
            .find(|a| a.worker == 0 && a.pid != hung as u32)
            .map(|a| a.pid)
    });
    let before = load.answers().len();
    wait_for("more requests served", TIMEOUT, || {
        (load.answers().len() > before + 100).then_some(())
    });
    let answers = load.finish(&h);
    assert!(
        answers.iter().any(|a| a.pid == hung as u32),
        "the hung worker served its first connections"
    );
    assert!(!process_alive(hung));
    assert!(process_alive(new_pid as i32));
    assert!(
        h.stderr().contains("worker died; restarting"),
        "{}",
        h.report()
    );
    h.stop();
}

/// Worker 0, the first time only, runs with `flag 2`: it breaks its state
/// page once it has taken 2 connections. It is dropped and restarted,
/// `says` is logged, and what it took is never handed to another worker.
fn a_lying_page(flag: &str, says: &str) {
    let dir = TempDir::new("dispatch-liar");
    let ctl = dir.join("ctl");
    let mark = dir.join("lied");
    let script = format!(
        r#"if [ "$HANDOVER_WORKER" = 0 ] && mkdir "$1" 2>/dev/null; then exec "$0" {flag} 2; fi; exec "$0""#
    );
    let (mut h, addr) = start(
        &ctl,
        &["--workers", "2", "--dispatch", "round-robin"],
        &worker_via_sh(&script, &[&mark]),
    );
    // Requests one after another: the liar's share goes to it until the
    // dispatcher reads the lie (its connection then may fail: it is
    // killed while serving).
    let mut liar = None;
    for _ in 0..20 {
        if let Ok(a) = try_get(addr, "t") {
            if a.worker == 0 {
                liar.get_or_insert(a.pid);
            }
        }
    }
    let liar = liar.expect("worker 0 served before it lied");
    let err = wait_log(&h, says, 1);
    let lost = err.lines().find(|l| l.contains("worker lost")).unwrap();
    assert!(lost.contains(&format!("pid={liar}")), "{lost}");
    wait_log(&h, "worker died; restarting", 1);
    // What it had taken is its own: never handed on, so never served by
    // two workers.
    assert!(
        !h.stderr()
            .contains("handing the connections it had not taken"),
        "{}",
        h.report()
    );
    // A new worker 0 serves; requests keep being answered.
    let new_pid = wait_for("a new worker 0 to serve", TIMEOUT, || {
        try_get(addr, "t")
            .ok()
            .filter(|a| a.worker == 0 && a.pid != liar)
            .map(|a| a.pid)
    });
    assert!(!process_alive(liar as i32));
    assert!(process_alive(new_pid as i32));
    for _ in 0..20 {
        try_get(addr, "t").unwrap_or_else(|e| panic!("{e}\n{}", h.report()));
    }
    h.stop();
}

#[test]
fn a_worker_whose_page_claims_a_connection_never_sent_is_dropped() {
    a_lying_page(
        "--corrupt-state-after",
        "its state page says it took connection 18446744073709551615",
    );
}

#[test]
fn a_worker_whose_page_counts_more_done_than_taken_is_dropped() {
    a_lying_page("--corrupt-done-after", "connections finished of");
}

#[test]
fn a_worker_that_closes_its_channel_gets_nothing_more_and_loses_nothing() {
    let dir = TempDir::new("dispatch-closer");
    let ctl = dir.join("ctl");
    let mark = dir.join("closed");
    // Worker 0, the first time only, closes its channel after 2
    // connections and lives on 10 s: what is sent to it meanwhile must go
    // to worker 1 at once, not when the process exits.
    let script = r#"if [ "$HANDOVER_WORKER" = 0 ] && mkdir "$1" 2>/dev/null; then exec "$0" --close-after 2; fi; exec "$0""#;
    let (mut h, addr) = start(
        &ctl,
        &["--workers", "2", "--dispatch", "round-robin"],
        &worker_via_sh(script, &[&mark]),
    );
    for i in 0..20 {
        let began = Instant::now();
        try_get(addr, "t").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", h.report()));
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "request {i} waited {:?} for a worker that closed its channel\n{}",
            began.elapsed(),
            h.report()
        );
    }
    wait_log(&h, "worker closed its channel", 1);
    assert!(!h.stderr().contains("worker lost"), "{}", h.report());
    h.stop();
}

/// One dispatch_worker `took connection` log line.
#[derive(Debug)]
struct Took {
    pool: String,
    peeked: usize,
    first_bytes_match: bool,
}

/// Runs `client` and returns the connection log line it caused (clients
/// run one at a time).
fn took_by(h: &Running, client: impl FnOnce()) -> Took {
    let count = || h.stderr().matches(" took connection ").count();
    let before = count();
    client();
    let err = wait_log(h, " took connection ", before + 1);
    let line = err
        .lines()
        .filter(|l| l.starts_with("dispatch_worker: pool "))
        .nth(before)
        .unwrap_or_else(|| panic!("a torn log line?\n{}", h.report()));
    let w: Vec<&str> = line.split_whitespace().collect();
    match w[..] {
        ["dispatch_worker:", "pool", pool, "took", "connection", _, "listener", _, "peeked", k, "first-bytes-match", m, "rcvlowat", r] =>
        {
            // Whatever the dispatcher did to wait for more bytes, the
            // worker gets the socket as accepted: SO_RCVLOWAT 1, so that
            // reads return what there is.
            assert_eq!(r, "1", "SO_RCVLOWAT left changed: {line}");
            Took {
                pool: pool.to_owned(),
                peeked: k.parse().unwrap(),
                first_bytes_match: m == "yes",
            }
        }
        _ => panic!("unexpected log line {line:?}"),
    }
}

/// Runs a client program to its end (it may fail: TLS clients get no
/// handshake), with its output for messages.
fn client(program: &str, args: &[String]) -> String {
    let out = run_with_timeout(Command::new(program).args(args), TIMEOUT);
    format!(
        "{program} {args:?}: {}\nstdout: {}\nstderr: {}",
        describe(out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const ROUTES: &str = r#"
peek_timeout = "300ms"
peek_limit = 4096

[[pool]]
name = "api"
workers = 1

[[route]]
sni = "api.example.com"
pool = "api"

[[route]]
host = "*.example.com"
pool = "api"
"#;

/// dispatch_worker with `args` under `handover run --workers N --routes`
/// (ROUTES), once every worker is ready. The directory goes last.
fn routed(workers: &str, args: &[&str]) -> (Running, SocketAddr, TempDir) {
    let dir = TempDir::new("dispatch-routes");
    let routes = dir.join("routes.toml");
    std::fs::write(&routes, ROUTES).unwrap();
    let (h, addr) = start(
        &dir.join("ctl"),
        &["--workers", workers, "--routes", routes.to_str().unwrap()],
        &worker(args),
    );
    wait_log(&h, "every worker is ready", 1);
    (h, addr, dir)
}

#[test]
fn sni_and_host_routes_send_real_clients_to_the_right_pool() {
    let (mut h, addr, _dir) = routed("1", &["--log-connections"]);
    let port = addr.port();
    let http = format!("http://127.0.0.1:{port}/");

    // HTTP, by Host: curl's answers say which pool served.
    let curl = |args: &[String], pool: &str| {
        let mut full = vec!["-sS".to_owned(), "--max-time".into(), "15".into()];
        full.extend_from_slice(args);
        let out = run_with_timeout(Command::new("curl").args(&full), TIMEOUT);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let a = Answer::parse(&body).unwrap_or_else(|| {
            panic!(
                "curl {full:?}: {} {body:?} {}\n{}",
                describe(out.status),
                String::from_utf8_lossy(&out.stderr),
                h.report()
            )
        });
        assert_eq!(a.pool, pool, "curl {full:?}: {body}\n{}", h.report());
        assert!(a.peeked > 0, "curl {full:?}: {body}");
    };
    let resolve = |name: &str| format!("{name}:{port}:127.0.0.1");
    for (args, pool) in [
        (
            vec!["-H".into(), "Host: api.example.com".into(), http.clone()],
            "api",
        ),
        (
            vec!["-H".into(), "Host: www.example.com".into(), http.clone()],
            "api",
        ),
        (
            vec![
                "--resolve".into(),
                resolve("api.example.com"),
                format!("http://api.example.com:{port}/"),
            ],
            "api",
        ),
        (vec![http.clone()], "default"),
        (
            vec!["-H".into(), "Host: example.org".into(), http.clone()],
            "default",
        ),
        (
            vec![
                "-H".into(),
                "Host: api.example.com.evil.test".into(),
                http.clone(),
            ],
            "default",
        ),
    ] {
        let took = took_by(&h, || curl(&args, pool));
        assert_eq!(took.pool, pool, "{args:?}");
        assert!(took.first_bytes_match, "{args:?}: {took:?}");
    }

    // TLS, by SNI: the worker does not speak TLS, so the clients fail the
    // handshake; the worker's log says where their ClientHello went, and
    // that it read the ClientHello from its first byte.
    let target = format!("127.0.0.1:{port}");
    for (name, pool) in [
        ("api.example.com", "api"),
        // The wildcard route is for Host, not SNI.
        ("www.example.com", "default"),
        ("elsewhere.test", "default"),
    ] {
        let mut said = String::new();
        let took = took_by(&h, || {
            said = client(
                "openssl",
                &[
                    "s_client".into(),
                    "-connect".into(),
                    target.clone(),
                    "-servername".into(),
                    name.into(),
                ],
            )
        });
        assert_eq!(
            took.pool, pool,
            "s_client -servername {name}: {took:?}\n{said}"
        );
        assert!(took.peeked > 0 && took.first_bytes_match, "{took:?}");

        let took = took_by(&h, || {
            said = client(
                "curl",
                &[
                    "-sS".into(),
                    "-k".into(),
                    "--max-time".into(),
                    "15".into(),
                    "--resolve".into(),
                    resolve(name),
                    format!("https://{name}:{port}/"),
                ],
            )
        });
        assert_eq!(took.pool, pool, "curl https://{name}: {took:?}\n{said}");
        assert!(took.peeked > 0 && took.first_bytes_match, "{took:?}");
    }

    // A client that says nothing goes to the default pool once the peek
    // times out, whatever it says afterwards.
    let mut silent = connect(addr);
    let took = took_by(&h, || {});
    assert_eq!(
        (took.pool.as_str(), took.peeked),
        ("default", 0),
        "{took:?}"
    );
    silent
        .write_all(b"GET / HTTP/1.0\r\nHost: api.example.com\r\n\r\n")
        .unwrap();
    let a = Answer::from_response(&read_all(silent)).unwrap();
    assert_eq!((a.pool.as_str(), a.peeked), ("default", 0));

    // A head longer than peek_limit before its Host: the default pool,
    // and the worker still reads it all from byte 0.
    let took = took_by(&h, || {
        let pad = "p".repeat(6000);
        let mut s = connect(addr);
        s.write_all(
            format!("GET / HTTP/1.0\r\nX-Pad: {pad}\r\nHost: api.example.com\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let a = Answer::from_response(&read_all(s)).unwrap();
        assert_eq!((a.pool.as_str(), a.peeked), ("default", 4096), "{a:?}");
    });
    assert!(took.first_bytes_match, "{took:?}");
    h.stop();
}

#[test]
fn reloads_under_load_fail_no_request_and_old_workers_exit() {
    let dir = TempDir::new("dispatch-reload");
    let ctl = dir.join("ctl");
    let (mut h, addr) = start(&ctl, &["--workers", "2"], &worker(&[]));
    wait_log(&h, "every worker is ready", 1);
    let load = Load::start(addr, 4, None, "t");
    let mut dispatchers = vec![dispatcher_pid(&h, 1)];
    let mut last = 1;
    for _ in 0..3 {
        let out = run_with_timeout(
            handover(["reload", "--control"]).arg(&ctl),
            Duration::from_secs(40),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "reload: {}\n{stdout}\n{}\n{}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr),
            h.report()
        );
        let (g, pid) = stdout
            .trim()
            .strip_prefix("reloaded: generation ")
            .and_then(|r| r.split_once(" is serving, pid "))
            .unwrap_or_else(|| panic!("unexpected reload output {stdout:?}"));
        let g: u64 = g.parse().unwrap();
        assert!(g > last, "generation {g} after {last}");
        last = g;
        dispatchers.push(pid.parse().unwrap());
        let seen = load.answers().len();
        wait_for(&format!("generation {g} to answer"), TIMEOUT, || {
            load.answers()[seen..]
                .iter()
                .any(|a| a.generation == g)
                .then_some(())
        });
    }
    let answers = load.finish(&h);
    let mut workers: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    for a in &answers {
        workers.entry(a.generation).or_default().insert(a.pid);
    }
    assert_eq!(workers.keys().last(), Some(&last), "{workers:?}");
    // Old dispatchers and their workers exit; the last ones serve on.
    for (g, pids) in &workers {
        for &pid in pids {
            if *g == last {
                assert!(process_alive(pid as i32), "generation {g} worker {pid}");
            } else {
                wait_for(
                    &format!("generation {g}'s worker {pid} to exit"),
                    TIMEOUT,
                    || (!process_alive(pid as i32)).then_some(()),
                );
            }
        }
    }
    let (current, old) = dispatchers.split_last().unwrap();
    for &pid in old {
        wait_for(&format!("old dispatcher {pid} to exit"), TIMEOUT, || {
            (!process_alive(pid)).then_some(())
        });
    }
    assert!(process_alive(*current));
    h.stop();
}

#[test]
fn bad_routes_files_and_worker_counts_are_refused_before_anything_is_bound() {
    let dir = TempDir::new("dispatch-bad");
    let ctl = dir.join("ctl");
    let mark = dir.join("ran");
    let unknown_pool = dir.join("unknown-pool.toml");
    std::fs::write(
        &unknown_pool,
        "[[route]]\nhost = \"a.test\"\npool = \"nope\"\n",
    )
    .unwrap();
    let not_toml = dir.join("not-toml.toml");
    std::fs::write(&not_toml, "[[pool]\nname = ").unwrap();
    let zero_workers = dir.join("zero.toml");
    std::fs::write(&zero_workers, "[[pool]]\nname = \"api\"\nworkers = 0\n").unwrap();
    let missing = dir.join("missing.toml");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--workers".into(),
                "2".into(),
                "--routes".into(),
                unknown_pool.display().to_string(),
            ],
            "no pool named \"nope\"",
        ),
        (
            vec![
                "--workers".into(),
                "2".into(),
                "--routes".into(),
                not_toml.display().to_string(),
            ],
            "not-toml.toml",
        ),
        (
            vec![
                "--workers".into(),
                "2".into(),
                "--routes".into(),
                zero_workers.display().to_string(),
            ],
            "workers must be 1 to 1024",
        ),
        (
            vec![
                "--workers".into(),
                "2".into(),
                "--routes".into(),
                missing.display().to_string(),
            ],
            "cannot read the routes file",
        ),
        (
            vec!["--workers".into(), "0".into()],
            "--workers must be 1 to 1024",
        ),
        (
            vec!["--workers".into(), "5000".into()],
            "--workers must be 1 to 1024",
        ),
        (
            vec!["--routes".into(), unknown_pool.display().to_string()],
            "--workers",
        ),
    ];
    for (args, says) in cases {
        let mut cmd = handover(["run", "--control"]);
        cmd.arg(&ctl)
            .args(["-l", "127.0.0.1:0"])
            .args(&args)
            .args(["--", "touch"])
            .arg(&mark);
        let out = run_with_timeout(&mut cmd, TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(
            stderr.contains("error") && stderr.contains(says),
            "{args:?}: expected {says:?} in {stderr}"
        );
        assert!(!stdout.contains("listening on"), "{args:?}: {stdout}");
        assert!(!mark.exists(), "{args:?}: a worker ran");
        assert!(!ctl.exists(), "{args:?}: the control socket was bound");
    }
}

#[test]
fn dispatch_without_activation_sockets_says_how_to_start_it() {
    let out = run_with_timeout(
        &mut handover(["dispatch", "--workers", "1", "--", "/bin/true"]),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("no sockets to accept on") && stderr.contains("handover run"),
        "{stderr}"
    );
    let out = run_with_timeout(
        &mut handover(["dispatch", "--workers", "0", "--", "/bin/true"]),
        TIMEOUT,
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--workers must be 1 to 1024"),
        "{out:?}"
    );
}

#[test]
fn a_worker_that_exits_at_once_is_restarted_with_backoff_and_clients_wait() {
    let dir = TempDir::new("dispatch-crashloop");
    let ctl = dir.join("ctl");
    let fixed = dir.join("fixed");
    // The worker exits at once until the file `fixed` exists.
    let script = r#"test -e "$1" || exit 3; exec "$0""#;
    let (mut h, addr) = start(&ctl, &["--workers", "1"], &worker_via_sh(script, &[&fixed]));
    let dispatcher = dispatcher_pid(&h, 1);
    // Each restart waits twice as long as the one before: no busy loop.
    let err = wait_log(&h, "worker died; restarting", 3);
    let delays: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("worker died; restarting"))
        .filter_map(|l| field(l, "delay"))
        .collect();
    assert_eq!(delays[..3], ["100ms", "200ms", "400ms"], "{}", h.report());
    // A client arriving meanwhile waits (accepted, queued) ...
    let waiting = std::thread::spawn(move || try_get(addr, "t"));
    std::fs::write(&fixed, "").unwrap();
    // ... and is served once the worker program works.
    let a = waiting
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", h.report()));
    assert_eq!((a.pool.as_str(), a.worker), ("default", 0));
    assert_eq!(dispatcher_pid(&h, 1), dispatcher);
    assert!(process_alive(dispatcher), "the dispatcher kept running");
    assert!(
        !h.stderr().contains("started generation=2"),
        "{}",
        h.report()
    );
    wait_log(&h, "every worker is ready", 1);
    assert!(h.exited().is_none(), "{}", h.report());
    h.stop();
}

#[test]
fn the_dispatchers_descriptors_return_to_baseline_after_two_thousand_connections() {
    let (mut h, addr, _dir) = routed("2", &[]);
    let dispatcher = dispatcher_pid(&h, 1);
    let baseline = open_fds_of(dispatcher);
    let api = Load::start(addr, 2, Some(700), "api.example.com");
    let other = Load::start(addr, 2, Some(300), "other.test");
    // Clients that close before sending anything, and ones that send half
    // a head and go.
    for i in 0..200 {
        let mut s = connect(addr);
        if i % 2 == 0 {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHo");
        }
    }
    let api = api.finish(&h);
    let other = other.finish(&h);
    assert!(api.iter().all(|a| a.pool == "api"), "{}", h.report());
    assert!(other.iter().all(|a| a.pool == "default"));
    assert_eq!(api.len() + other.len(), 2000);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = open_fds_of(dispatcher);
        if now == baseline {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "the dispatcher has {} descriptors open, {} before:\nnow: {now:#?}\nbefore: {baseline:#?}\n{}",
                now.len(),
                baseline.len(),
                h.report()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    h.stop();
}

/// CPU time (user + system) process `pid` has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); fields[0] is 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A client that sent part of a request head and waits is peeked again
/// only when more bytes come (or its peer closes): the dispatcher does not
/// spin on bytes it has already seen. Then the rest of the head routes it;
/// and one that closes after half a head goes to the default pool.
#[test]
fn a_client_that_sends_half_a_head_does_not_make_the_dispatcher_spin() {
    let dir = TempDir::new("dispatch-halfhead");
    let routes = dir.join("routes.toml");
    std::fs::write(&routes, ROUTES.replace("300ms", "1s")).unwrap();
    let (mut h, addr) = start(
        &dir.join("ctl"),
        &["--workers", "1", "--routes", routes.to_str().unwrap()],
        &worker(&["--log-connections"]),
    );
    wait_log(&h, "every worker is ready", 1);
    let dispatcher = dispatcher_pid(&h, 1);

    // Half a head, then nothing until the peek times out (1s): the
    // dispatcher waits without using the CPU meanwhile (a loop re-peeking
    // the same bytes uses all of it).
    let mut slow = connect(addr);
    let cpu = cpu_time(dispatcher);
    let took = took_by(&h, || slow.write_all(b"GET / HTTP/1.1\r\nHo").unwrap());
    let used = cpu_time(dispatcher) - cpu;
    assert_eq!(
        (took.pool.as_str(), took.peeked),
        ("default", 18),
        "{took:?}"
    );
    assert!(
        used < Duration::from_millis(300),
        "the dispatcher used {used:?} of CPU waiting for one client's next bytes\n{}",
        h.report()
    );
    drop(slow);

    // Half a head, then the rest: routed by the whole head.
    let took = took_by(&h, || {
        let mut s = connect(addr);
        s.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
        // The first part is peeked before the rest comes (or not: either
        // way the whole head decides).
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(b"st: api.example.com\r\nConnection: close\r\n\r\n")
            .unwrap();
        let a = Answer::from_response(&read_all(s)).unwrap();
        assert_eq!(a.pool, "api", "{a:?}");
    });
    assert!(took.first_bytes_match, "{took:?}");

    // Half a head, then the client closes: the default pool.
    let took = took_by(&h, || {
        let mut s = connect(addr);
        s.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert_eq!(
        (took.pool.as_str(), took.peeked),
        ("default", 18),
        "{took:?}"
    );
    h.stop();
}

/// A reload while a hung worker holds connections unacknowledged: the old
/// dispatcher drains, the hung worker is killed, and what it held is
/// still served (by a worker of the old generation started for them),
/// not dropped with the old dispatcher.
#[test]
fn a_hung_worker_killed_while_its_generation_drains_loses_no_connection() {
    let dir = TempDir::new("dispatch-hung-drain");
    let ctl = dir.join("ctl");
    let mark = dir.join("stalled");
    let (mut h, addr) = start(
        &ctl,
        &["--workers", "2", "--dispatch", "round-robin"],
        &worker_via_sh(STALL_ONCE, &[&mark]),
    );
    let load = Load::start(addr, 4, None, "t");
    let hung = stalled_pid(&h);
    wait_for("clients waiting on the hung worker", TIMEOUT, || {
        (load.waiting_longer_than(Duration::from_secs(1)) >= 1).then_some(())
    });
    let out = run_with_timeout(
        handover(["reload", "--control"]).arg(&ctl),
        Duration::from_secs(40),
    );
    assert!(out.status.success(), "{out:?}\n{}", h.report());
    wait_log(&h, "draining: no more accepts", 1);
    // SAFETY: kill(2) on a worker process of this test's handover.
    assert_eq!(unsafe { libc::kill(hung, libc::SIGKILL) }, 0);
    wait_log(&h, "handing the connections it had not taken", 1);
    wait_for("the old dispatcher to finish", TIMEOUT, || {
        (!process_alive(dispatcher_pid(&h, 1))).then_some(())
    });
    let answers = load.finish(&h);
    assert!(answers.iter().any(|a| a.generation == 2), "{}", h.report());
    assert!(
        answers
            .iter()
            .any(|a| a.generation == 1 && a.worker == 0 && a.pid != hung as u32),
        "the hung worker's connections were served by its successor\n{}",
        h.report()
    );
    h.stop();
}
