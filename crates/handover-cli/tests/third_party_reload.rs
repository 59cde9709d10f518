//! A real server nobody here wrote: gunicorn (from PyPI), which takes its
//! sockets by systemd socket activation (LISTEN_FDS/LISTEN_PID) and says
//! READY=1 on NOTIFY_SOCKET, run under `handover run --ready notify` and
//! reloaded five times while clients keep it busy. Not one request may
//! fail, every generation must answer, gunicorn must serve on the socket
//! handover holds (never one of its own), nothing may be left running once
//! handover is stopped, and handover may not keep descriptors from the
//! generations it replaced.
//!
//! gunicorn is found through $HANDOVER_GUNICORN (`.ci/run` installs a
//! pinned version into a venv and sets it), else on PATH. Without it the
//! test says loudly that it is skipped, unless
//! $HANDOVER_REQUIRE_THIRD_PARTY is set (as in CI): then it fails.
#![cfg(target_os = "linux")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How many times the server is replaced under load.
const RELOADS: u64 = 5;

/// The WSGI application: answers every request with the pids of the
/// gunicorn master (the generation handover started) and of the worker
/// that served it; `/slow` takes 200 ms, so that requests are in flight
/// whenever an old generation is told to stop.
const APP: &str = r#"import os
import time


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        time.sleep(0.2)
    body = ("master %d worker %d\n" % (os.getppid(), os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"#;

/// gunicorn: $HANDOVER_GUNICORN, else the first `gunicorn` on PATH.
fn find_gunicorn() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HANDOVER_GUNICORN") {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "HANDOVER_GUNICORN={} is not an executable file",
            p.display()
        );
        return Some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("gunicorn"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `gunicorn ARGS…`, run to completion; its stdout and stderr together.
fn gunicorn_says(gunicorn: &Path, args: &[&str]) -> String {
    let out = run_with_timeout(Command::new(gunicorn).args(args), Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        gunicorn.display(),
        describe(out.status),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `handover reload --control CTL`, run to completion: the new
/// generation's number and pid.
fn reload(ctl: &Path, h: &Running) -> (u64, u32) {
    let out = run_with_timeout(
        handover(["reload", "--control"]).arg(ctl),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reload failed: {}\nstdout: {stdout}\nstderr: {}\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr),
        h.report()
    );
    let parsed = stdout
        .trim()
        .strip_prefix("reloaded: generation ")
        .and_then(|rest| rest.split_once(" is serving, pid "))
        .and_then(|(g, p)| Some((g.parse().ok()?, p.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("unexpected reload output {stdout:?}"))
}

/// `handover status --json --control CTL`, parsed.
fn status(ctl: &Path) -> Value {
    let out = run_with_timeout(
        handover(["status", "--json", "--control"]).arg(ctl),
        TIMEOUT,
    );
    assert!(
        out.status.success(),
        "status: {}: {}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout))
}

/// Waits until exactly one generation is left, ready and serving, with
/// no reload under way; returns its (generation, pid).
fn wait_alone(ctl: &Path, h: &Running) -> (u64, u32) {
    wait_for(
        &format!("one generation serving alone\n{}", h.report()),
        Duration::from_secs(90),
        || {
            if !ctl.exists() {
                std::thread::sleep(Duration::from_millis(50));
                return None;
            }
            let s = status(ctl);
            let gens = s["generations"].as_array().expect("generations");
            match &gens[..] {
                [g] if g["state"] == "serving"
                    && g["ready"] == true
                    && s["reload_in_progress"] == false =>
                {
                    Some((g["generation"].as_u64()?, g["pid"].as_u64()? as u32))
                }
                _ => {
                    std::thread::sleep(Duration::from_millis(50));
                    None
                }
            }
        },
    )
}

/// One request on a new connection: (master pid, worker pid), or what
/// went wrong.
fn try_get(addr: SocketAddr, path: &str) -> Result<(u32, u32), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read: {e} (got {:?})", String::from_utf8_lossy(&raw)))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("not a 200: {text:?}"));
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| format!("no Content-Length: {text:?}"))?;
    if body.len() != length {
        return Err(format!(
            "body of {} bytes, not {length}: {text:?}",
            body.len()
        ));
    }
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["master", m, "worker", w] => Ok((
            m.parse().map_err(|_| format!("bad body {body:?}"))?,
            w.parse().map_err(|_| format!("bad body {body:?}"))?,
        )),
        _ => Err(format!("unexpected body {body:?}")),
    }
}

/// The listening TCP sockets of this network namespace: inode → port.
/// (Slow while thousands of connections are in TIME_WAIT, as they are once
/// the clients have run: the kernel lists every one.)
fn listening_inodes() -> BTreeMap<u64, u16> {
    let mut out = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let mut f = line.split_whitespace();
            let (Some(local), Some(state)) = (f.nth(1), f.nth(1)) else {
                continue;
            };
            if state != "0A" {
                continue;
            }
            let port = local.rsplit_once(':').map_or("", |(_, p)| p);
            let inode = f.nth(5).and_then(|i| i.parse().ok());
            if let (Ok(port), Some(inode)) = (u16::from_str_radix(port, 16), inode) {
                out.insert(inode, port);
            }
        }
    }
    out
}

/// The descriptors of process `pid`: number → what it points at.
fn fds(pid: u32) -> BTreeMap<u32, String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let n = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        Some((n, target.to_string_lossy().into_owned()))
    })
    .collect()
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    fds(pid)
        .values()
        .filter_map(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// The listening TCP sockets process `pid` holds: inode → port.
fn listening_sockets_of(pid: u32) -> BTreeMap<u64, u16> {
    let mut listening = listening_inodes();
    let held = socket_inodes(pid);
    listening.retain(|inode, _| held.contains(inode));
    listening
}

/// Whether `pid` still runs gunicorn in our directory (`marker`): a pid
/// may have been reused by now (pid_max may be as low as 32768).
fn gunicorn_alive(pid: u32, marker: &str) -> bool {
    process_alive(pid as i32)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
}

/// The processes whose command line mentions `marker`.
fn processes_mentioning(marker: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) && process_alive(pid as i32) {
            out.push((pid, cmdline));
        }
    }
    out
}

#[derive(Default)]
struct Load {
    /// Requests answered, by (master pid, worker pid).
    served: BTreeMap<(u32, u32), u64>,
    failures: Vec<String>,
}

impl Load {
    fn by_master(&self, master: u32) -> u64 {
        self.served
            .iter()
            .filter(|((m, _), _)| *m == master)
            .map(|(_, n)| n)
            .sum()
    }
}

#[test]
fn gunicorn_is_reloaded_under_load_without_a_failed_request() {
    let Some(gunicorn) = find_gunicorn() else {
        assert!(
            std::env::var_os("HANDOVER_REQUIRE_THIRD_PARTY").is_none(),
            "HANDOVER_REQUIRE_THIRD_PARTY is set, but gunicorn is neither at \
             $HANDOVER_GUNICORN nor on PATH (.ci/run installs it)"
        );
        // Straight to stderr: libtest would swallow eprintln! of a passing
        // test.
        let _ = writeln!(
            std::io::stderr(),
            "\n**********************************************************************\n\
             SKIPPED third_party_reload: gunicorn not found (set HANDOVER_GUNICORN\n\
             or put gunicorn on PATH; `.ci/run` installs it from PyPI).\n\
             Set HANDOVER_REQUIRE_THIRD_PARTY=1 to make this a failure instead.\n\
             **********************************************************************\n"
        );
        return;
    };
    let version = gunicorn_says(&gunicorn, &["--version"]);
    eprintln!(
        "third_party_reload: {} is {}",
        gunicorn.display(),
        version.trim()
    );
    let help = gunicorn_says(&gunicorn, &["--help"]);

    let dir = TempDir::new("gunicorn");
    let ctl = dir.join("ctl");
    std::fs::write(dir.join("handover_wsgi_app.py"), APP).unwrap();
    let marker = dir.path().to_str().unwrap().to_owned();

    let mut cmd = handover(["run", "--control"]);
    cmd.arg(&ctl)
        .args([
            "--ready",
            "notify",
            "--ready-timeout",
            "60s",
            "--stop-signal",
            "TERM",
            "--stop-timeout",
            "60s",
            "-l",
            "127.0.0.1:0",
            "--",
        ])
        .arg(&gunicorn)
        // No --bind: gunicorn takes the LISTEN_FDS sockets instead of
        // binding (checked below). --preload imports the app in the master
        // before it says READY=1, so ready means the app loaded.
        .args(["--chdir", &marker, "--workers", "2", "--preload"])
        // SIGTERM is gunicorn's graceful stop: workers finish the request
        // they are serving, within --graceful-timeout.
        .args(["--graceful-timeout", "30", "--log-level", "info"]);
    if help.contains("--no-control-socket") {
        // gunicorn 25.1 and later open a control socket in every master
        // (27: ~/.gunicorn/gunicorn.ctl); two generations at once would
        // take it from each other.
        cmd.arg("--no-control-socket");
    }
    cmd.arg("handover_wsgi_app:app");
    let mut h = Running::spawn(&mut cmd);
    let addr = h.tcp_addr();

    let (first_gen, first) = wait_alone(&ctl, &h);
    assert_eq!(first_gen, 1, "{}", h.report());
    let mut masters = vec![first];

    // gunicorn serves on the socket handover holds, and on no other: the
    // master's only listening socket is handover's (checked for the first
    // and last generations: listing the listening sockets is slow once
    // the clients have left thousands of connections in TIME_WAIT), every
    // master holds handover's socket, and gunicorn says it listens at
    // handover's address.
    let theirs = listening_sockets_of(h.pid() as u32);
    assert_eq!(
        theirs.values().collect::<Vec<_>>(),
        [&addr.port()],
        "handover's listening sockets: {theirs:?}"
    );
    let inode = *theirs.keys().next().unwrap();
    let listens_only_on_ours = |master: u32, h: &Running| {
        assert_eq!(
            listening_sockets_of(master),
            theirs,
            "gunicorn master {master} listens on something else than handover's socket\n{}",
            h.report()
        );
    };
    let check_inherited = |master: u32, h: &Running| {
        assert!(
            socket_inodes(master).contains(&inode),
            "gunicorn master {master} does not hold handover's socket: {:?}\n{}",
            fds(master),
            h.report()
        );
        let said = format!("Listening at: http://{addr} ({master})");
        wait_for(&format!("gunicorn to say {said:?}"), TIMEOUT, || {
            h.stderr().contains(&said).then_some(())
        });
    };
    listens_only_on_ours(first, &h);
    check_inherited(first, &h);
    let (m, _) = try_get(addr, "/").unwrap_or_else(|e| panic!("{e}\n{}", h.report()));
    assert_eq!(m, first, "{}", h.report());

    // handover's own descriptors with generation 1 alone, to compare with
    // after the reloads. (A status request being answered may hold one
    // more for a moment, so the count must settle.)
    let before = wait_for("handover's descriptors to settle", TIMEOUT, || {
        let a = fds(h.pid() as u32);
        std::thread::sleep(Duration::from_millis(200));
        let b = fds(h.pid() as u32);
        (a == b).then_some(b)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, load) = (stop.clone(), load.clone());
            // Three clients as fast as they can, one with slow requests.
            let path = if i == 3 { "/slow" } else { "/" };
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = try_get(addr, path);
                    let mut load = load.lock().unwrap();
                    match r {
                        Ok(pids) => *load.served.entry(pids).or_default() += 1,
                        Err(e) => load.failures.push(format!("GET {path}: {e}")),
                    }
                }
            })
        })
        .collect();
    let answered_by = |master: u32, n: u64, h: &Running| {
        wait_for(
            &format!("{n} requests answered by master {master}\n{}", h.report()),
            Duration::from_secs(90),
            || (load.lock().unwrap().by_master(master) >= n).then_some(()),
        )
    };
    answered_by(first, 20, &h);

    for i in 1..=RELOADS {
        let t = Instant::now();
        let (generation, pid) = reload(&ctl, &h);
        let ready = t.elapsed();
        assert_eq!(generation, i + 1, "{}", h.report());
        assert!(!masters.contains(&pid), "pid {pid} again\n{}", h.report());
        masters.push(pid);
        check_inherited(pid, &h);
        // The new generation answers before the next reload.
        answered_by(pid, 20, &h);
        let (served, failed) = {
            let load = load.lock().unwrap();
            (load.served.values().sum::<u64>(), load.failures.len())
        };
        eprintln!(
            "third_party_reload: reload {i}: generation {generation} (master {pid}) ready \
             after {ready:?}, answering after {:?}; {served} requests served so far, {failed} \
             failed",
            t.elapsed()
        );
    }
    let (last_gen, last) = wait_alone(&ctl, &h);
    assert_eq!((last_gen, last), (RELOADS + 1, *masters.last().unwrap()));
    listens_only_on_ours(last, &h);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }

    let load = load.lock().unwrap();
    let ok: u64 = load.served.values().sum();
    let seen: BTreeSet<u32> = load.served.keys().map(|(m, _)| *m).collect();
    let workers: BTreeSet<u32> = load.served.keys().map(|(_, w)| *w).collect();
    eprintln!(
        "third_party_reload: {ok} requests served, {} failed, {RELOADS} reloads; \
         masters {masters:?}; {} workers",
        load.failures.len(),
        workers.len()
    );
    assert!(
        load.failures.is_empty(),
        "{} of {} requests failed, e.g. {:#?}\n{}",
        load.failures.len(),
        ok + load.failures.len() as u64,
        &load.failures[..load.failures.len().min(5)],
        h.report()
    );
    assert_eq!(
        seen,
        masters.iter().copied().collect(),
        "every generation answered, and only those"
    );
    assert!(workers.len() > masters.len(), "workers {workers:?}");

    let s = status(&ctl);
    assert_eq!(s["reloads"]["ok"], RELOADS, "{s}");
    assert_eq!(s["reloads"]["failed"], 0, "{s}");
    assert_eq!(s["restarts"], 0, "{s}");

    // The old generations are gone, and handover kept nothing of theirs.
    for &m in &masters[..masters.len() - 1] {
        assert!(!gunicorn_alive(m, &marker), "old master {m} still runs");
    }
    let mut after = fds(h.pid() as u32);
    let deadline = Instant::now() + TIMEOUT;
    while after.len() > before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = fds(h.pid() as u32);
    }
    assert!(
        after.len() <= before.len(),
        "handover holds more descriptors after {RELOADS} reloads than with one \
         generation:\nbefore {before:?}\nafter {after:?}"
    );
    eprintln!(
        "third_party_reload: handover holds {} descriptors with generation 1, {} with \
         generation {last_gen}",
        before.len(),
        after.len()
    );

    // TERM to handover: passed on to gunicorn, which stops gracefully and
    // exits 0; handover exits as it did, leaving nothing behind.
    h.signal(libc::SIGTERM);
    let exit = h.wait(Duration::from_secs(90));
    assert!(exit.success(), "{}\n{}", describe(exit), h.report());
    assert!(
        h.stderr()
            .contains(&format!("[{last}] [INFO] Shutting down: Master")),
        "{}",
        h.report()
    );
    // Every gunicorn process seen …
    let left: Vec<u32> = masters
        .iter()
        .chain(&workers)
        .copied()
        .filter(|&p| gunicorn_alive(p, &marker))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}\n{}", h.report());
    // … and any other that ran in our directory.
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "still running: {left:?}\n{}", h.report());
    assert!(!ctl.exists(), "the control socket is removed");
}
