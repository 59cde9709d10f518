//! Generations under `handover run`: reloads under load without a failed
//! request, rollback of a generation that crashes or is never ready,
//! long-lived connections carried through the fd store, SIGHUP and
//! coalesced reloads, crash restarts, --watch, --stop-timeout, option
//! errors, and the `handover reload` / `handover status` clients. Real
//! processes and sockets; every wait is bounded; each test has its own
//! control socket (tests run in parallel).
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `handover run --control CTL ARGS… -- PROGRAM…`.
fn run_cmd(ctl: &Path, args: &[&str]) -> Command {
    let mut cmd = handover(["run", "--control"]);
    cmd.arg(ctl).args(args);
    cmd
}

/// `handover reload --control CTL`, run to completion.
fn reload(ctl: &Path) -> std::process::Output {
    run_with_timeout(
        handover(["reload", "--control"]).arg(ctl),
        Duration::from_secs(40),
    )
}

/// The generation and pid of a successful `handover reload`.
fn reloaded(out: &std::process::Output, h: &Running) -> (u64, u32) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reload failed: {}\nstdout: {stdout}\nstderr: {}\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr),
        h.report()
    );
    let rest = stdout
        .trim()
        .strip_prefix("reloaded: generation ")
        .unwrap_or_else(|| panic!("unexpected reload output {stdout:?}"));
    let (generation, pid) = rest
        .split_once(" is serving, pid ")
        .unwrap_or_else(|| panic!("unexpected reload output {stdout:?}"));
    (generation.parse().unwrap(), pid.parse().unwrap())
}

/// `handover status --json --control CTL`, parsed; None while nothing
/// listens there yet.
fn try_status(ctl: &Path) -> Option<Value> {
    if !ctl.exists() {
        return None;
    }
    Some(status(ctl))
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

/// The generations in `state`, as (generation, pid, ready).
fn gens_in(s: &Value, state: &str) -> Vec<(u64, u32, bool)> {
    s["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .filter(|g| g["state"] == state)
        .map(|g| {
            (
                g["generation"].as_u64().unwrap(),
                g["pid"].as_u64().unwrap() as u32,
                g["ready"] == true,
            )
        })
        .collect()
}

/// Waits until generation `n` (or a later one) is the one ready serving
/// generation; returns its (generation, pid).
fn wait_serving(ctl: &Path, n: u64) -> (u64, u32) {
    wait_for(&format!("generation {n} to serve"), TIMEOUT, || {
        let s = try_status(ctl)?;
        match gens_in(&s, "serving")[..] {
            [(g, pid, true)] if g >= n && s["reload_in_progress"] == false => Some((g, pid)),
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                None
            }
        }
    })
}

/// The generation and pid in http_demo's `generation G pid P`.
fn served_by(response: &str) -> (u64, u32) {
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["generation", g, "pid", p] => (g.parse().unwrap(), p.parse().unwrap()),
        _ => panic!("unexpected body {body:?}"),
    }
}

/// http_demo under `handover run --ready notify` with `extra` options,
/// through `sh -c SCRIPT HTTP_DEMO` (the program is $0) when a script is
/// given.
fn http_demo(ctl: &Path, extra: &[&str], script: Option<&str>) -> (Running, SocketAddr) {
    let mut args = vec!["--ready", "notify", "-l", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    args.push("--");
    let mut cmd = run_cmd(ctl, &args);
    match script {
        Some(s) => cmd.args(["/bin/sh", "-c", s]).arg(example("http_demo")),
        None => cmd.arg(example("http_demo")),
    };
    let h = Running::spawn(&mut cmd);
    let addr = h.tcp_addr();
    wait_serving(ctl, 1);
    (h, addr)
}

/// GETs until generation `g` answers (an old generation that was just
/// told to stop may still take a connection or two while it drains).
fn wait_served_by(addr: SocketAddr, g: u64) -> u32 {
    wait_for(&format!("generation {g} to answer"), TIMEOUT, || {
        let (n, pid) = served_by(&http_get(addr));
        (n == g).then_some(pid)
    })
}

/// One GET on a new connection: the serving generation, or what went
/// wrong.
fn try_get(addr: SocketAddr) -> Result<u64, String> {
    let out = try_http_get(addr)?;
    if !out.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("not a 200: {out:?}"));
    }
    Ok(served_by(&out).0)
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let dir = TempDir::new("load");
    let ctl = dir.join("ctl");
    let (mut h, addr) = http_demo(&ctl, &[], None);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, seen, failures) = (stop.clone(), seen.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut ok = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    match try_get(addr) {
                        Ok(g) => {
                            ok += 1;
                            seen.lock().unwrap().insert(g);
                        }
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
                ok
            })
        })
        .collect();

    let mut pids = BTreeSet::new();
    let mut last = 1;
    for _ in 0..20 {
        let (generation, pid) = reloaded(&reload(&ctl), &h);
        assert!(generation > last, "generation {generation} after {last}");
        assert!(pids.insert(pid), "pid {pid} named twice\n{}", h.report());
        last = generation;
    }
    stop.store(true, Ordering::SeqCst);
    let ok: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)],
        h.report()
    );
    let seen = seen.lock().unwrap();
    assert!(ok > 0 && seen.len() >= 3, "ok {ok}, generations {seen:?}");
    let s = status(&ctl);
    assert_eq!(s["reloads"]["ok"], 20, "{s}");
    assert_eq!(s["reloads"]["failed"], 0, "{s}");
    assert_eq!(s["last_reload"]["ok"], true, "{s}");
    let serving = gens_in(&s, "serving");
    assert_eq!(serving.len(), 1, "{s}");
    assert_eq!(serving[0].0, last, "{s}");
    h.stop();
}

/// A reload whose new generation fails is rolled back: `handover reload`
/// exits 1 saying `why`, generation 1 keeps serving.
fn rolled_back(extra: &[&str], gen2: &str, why: &str) {
    let dir = TempDir::new("rollback");
    let ctl = dir.join("ctl");
    let script = format!(
        "if [ \"$HANDOVER_GENERATION\" -gt 1 ]; then exec \"$0\" {gen2}; else exec \"$0\"; fi"
    );
    let (mut h, addr) = http_demo(&ctl, extra, Some(&script));
    let (g, pid) = served_by(&http_get(addr));
    assert_eq!(g, 1);

    let out = reload(&ctl);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", h.report());
    assert!(
        stderr.contains("handover: error: reload failed:") && stderr.contains(why),
        "{stderr}"
    );
    assert_eq!(served_by(&http_get(addr)), (1, pid), "{}", h.report());
    let s = status(&ctl);
    assert_eq!(s["last_reload"]["ok"], false, "{s}");
    assert!(
        s["last_reload"]["error"].as_str().unwrap().contains(why),
        "{s}"
    );
    assert_eq!(s["reloads"]["failed"], 1, "{s}");
    assert_eq!(gens_in(&s, "serving"), vec![(1, pid, true)], "{s}");
    // And a later reload may still succeed or fail the same way: handover
    // is not stuck in the failed one.
    assert!(h.exited().is_none(), "{}", h.report());
    h.stop();
}

#[test]
fn a_generation_that_crashes_on_start_is_rolled_back() {
    rolled_back(&[], "--crash-on-start", "exited");
}

#[test]
fn a_generation_never_ready_is_rolled_back_after_ready_timeout() {
    rolled_back(
        &["--ready-timeout", "2s"],
        "--delay-ready 1000",
        "not ready within",
    );
}

/// A counter_demo client: sends a line, reads the count back.
struct Counter {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    count: u64,
}

impl Counter {
    fn new(addr: SocketAddr) -> Counter {
        let s = connect(addr);
        Counter {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            count: 0,
        }
    }

    /// One line; its answer must be the next count.
    fn line(&mut self, h: &Running) {
        self.writer.write_all(b"x\n").expect("sending a line");
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("reading a count: {e}\n{}", h.report()));
        assert!(n > 0, "the connection was closed\n{}", h.report());
        self.count += 1;
        assert_eq!(
            answer.trim(),
            self.count.to_string(),
            "the count did not carry on\n{}",
            h.report()
        );
    }
}

#[test]
fn long_lived_connections_keep_counting_across_ten_reloads() {
    let dir = TempDir::new("counter");
    let ctl = dir.join("ctl");
    let mut h = Running::spawn(
        run_cmd(&ctl, &["--ready", "notify", "-l", "127.0.0.1:0", "--"])
            .arg(example("counter_demo")),
    );
    let addr = h.tcp_addr();
    wait_serving(&ctl, 1);
    let mut clients: Vec<Counter> = (0..3).map(|_| Counter::new(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for _ in 0..=i {
            c.line(&h);
        }
    }
    let mut last = 1;
    for _ in 0..10 {
        let (generation, _) = reloaded(&reload(&ctl), &h);
        assert!(generation > last);
        last = generation;
        for c in &mut clients {
            c.line(&h);
            c.line(&h);
        }
        // The new generation took the connections out of the store.
        let s = status(&ctl);
        assert_eq!(s["fdstore"], serde_json::json!([]), "{s}");
    }
    let s = status(&ctl);
    // Generation 1 stores its connections only once generation 2 is
    // serving: handover hands them over with one more reload (and stops
    // the old generation first from then on). That one may be shared with
    // one of ours.
    let ok = s["reloads"]["ok"].as_u64().unwrap();
    assert!(ok == 10 || ok == 11, "{s}");
    assert_eq!(s["reloads"]["failed"], 0, "{s}");
    assert_eq!(gens_in(&s, "serving").len(), 1, "{s}");
    assert!(
        h.stderr()
            .contains("stored descriptors after its successor started"),
        "{}",
        h.report()
    );
    h.stop();
}

#[test]
fn sighup_reloads_and_concurrent_reloads_are_coalesced() {
    let dir = TempDir::new("hup");
    let ctl = dir.join("ctl");
    let (mut h, addr) = http_demo(&ctl, &[], None);
    h.signal(libc::SIGHUP);
    let (g, pid) = wait_serving(&ctl, 2);
    assert_eq!(g, 2);
    assert_eq!(wait_served_by(addr, 2), pid);

    let a = std::thread::spawn({
        let ctl = ctl.clone();
        move || reload(&ctl)
    });
    let b = std::thread::spawn({
        let ctl = ctl.clone();
        move || reload(&ctl)
    });
    let (ga, _) = reloaded(&a.join().unwrap(), &h);
    let (gb, _) = reloaded(&b.join().unwrap(), &h);
    // Each is answered by a generation started after it asked; the one
    // that came during the other's reload shares the reload after it.
    assert!(ga > 2 && gb > 2, "{ga} {gb}");
    let s = status(&ctl);
    let serving = gens_in(&s, "serving");
    assert_eq!(serving.len(), 1, "{s}");
    assert!(serving[0].0 <= 4, "more generations than needed: {s}");
    assert_eq!(
        s["reloads"]["ok"].as_u64().unwrap(),
        serving[0].0 - 1,
        "{s}"
    );
    h.stop();
}

#[test]
fn on_failure_restarts_and_clients_wait_instead_of_being_refused() {
    let dir = TempDir::new("onfail");
    let ctl = dir.join("ctl");
    // Generation 1 fails at once; later ones serve.
    let mut h = Running::spawn(
        run_cmd(
            &ctl,
            &[
                "--ready",
                "notify",
                "--restart",
                "on-failure",
                "-l",
                "127.0.0.1:0",
                "--",
                "/bin/sh",
                "-c",
                "if [ \"$HANDOVER_GENERATION\" -eq 1 ]; then exit 1; fi; exec \"$0\"",
            ],
        )
        .arg(example("http_demo")),
    );
    let addr = h.tcp_addr();
    let (g, pid) = served_by(&http_get(addr));
    assert_eq!(g, 2, "{}", h.report());

    // Killed: the next connection waits in the backlog for generation 3.
    // SAFETY: kill(2) on the program handover started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_for("the killed generation to die", TIMEOUT, || {
        (!process_alive(pid as i32)).then_some(())
    });
    let (g3, pid3) = served_by(&http_get(addr));
    assert_eq!(g3, 3, "{}", h.report());
    assert_ne!(pid3, pid);
    let s = status(&ctl);
    assert_eq!(s["restarts"], 2, "{s}");
    assert!(h.exited().is_none());
    h.stop();
}

#[test]
fn restart_no_exits_like_the_program() {
    let dir = TempDir::new("norestart");
    let ctl = dir.join("ctl");
    let mut h = Running::spawn(&mut run_cmd(
        &ctl,
        &[
            "-l",
            "127.0.0.1:0",
            "--",
            "/bin/sh",
            "-c",
            "sleep 0.2; exit 7",
        ],
    ));
    let status = h.wait(TIMEOUT);
    assert_eq!(status.code(), Some(7), "{}", h.report());
    assert!(!ctl.exists(), "the control socket is removed");
}

#[test]
fn a_change_under_a_watched_directory_reloads() {
    let dir = TempDir::new("watch");
    let ctl = dir.join("ctl");
    let watched = dir.join("src");
    std::fs::create_dir(&watched).unwrap();
    let w = watched.to_str().unwrap();
    let (mut h, addr) = http_demo(&ctl, &["--watch", w], None);
    std::fs::write(watched.join("main.rs"), "fn main() {}\n").unwrap();
    let (g, pid) = wait_serving(&ctl, 2);
    assert_eq!(wait_served_by(addr, g), pid);
    h.stop();
}

#[test]
fn an_old_generation_that_ignores_the_stop_signal_is_killed_after_stop_timeout() {
    let dir = TempDir::new("stoptimeout");
    let ctl = dir.join("ctl");
    let mut h = Running::spawn(&mut run_cmd(
        &ctl,
        &[
            "--ready",
            "delay:100ms",
            "--stop-timeout",
            "2s",
            "-l",
            "127.0.0.1:0",
            "--",
            "/bin/sh",
            "-c",
            "if [ \"$HANDOVER_GENERATION\" -eq 1 ]; then trap '' TERM; fi; exec sleep 1000",
        ],
    ));
    h.tcp_addr();
    let (_, old) = wait_serving(&ctl, 1);
    let (_, new) = reloaded(&reload(&ctl), &h);
    assert_ne!(old, new);
    wait_for("the old generation to be killed", TIMEOUT, || {
        (!process_alive(old as i32)).then_some(())
    });
    assert!(
        h.stderr().contains("did not stop in time: killed"),
        "{}",
        h.report()
    );
    let s = wait_for("the old generation to be gone", TIMEOUT, || {
        let s = status(&ctl);
        (s["generations"].as_array().unwrap().len() == 1).then_some(s)
    });
    assert_eq!(gens_in(&s, "serving")[0].1, new, "{s}");
    h.stop();
}

#[test]
fn bad_options_are_refused_before_anything_starts() {
    let dir = TempDir::new("badopts");
    let ctl = dir.join("ctl");
    let mark = dir.join("started");
    for (opt, value) in [
        ("--ready", "bogus"),
        ("--restart", "sometimes"),
        ("--stop-signal", "NOPE"),
        ("--ready-timeout", "5parsecs"),
    ] {
        let out = run_with_timeout(
            run_cmd(&ctl, &[opt, value, "-l", "127.0.0.1:0", "--", "touch"]).arg(&mark),
            TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{opt} {value}: {out:?}");
        assert!(
            stderr.contains("handover: error:") && stderr.contains(opt) && stderr.contains(value),
            "{opt} {value}: {stderr}"
        );
        assert!(!stdout.contains("listening on"), "{opt} {value}: {stdout}");
        assert!(!mark.exists(), "{opt} {value}: the program ran");
        assert!(!ctl.exists(), "{opt} {value}: a control socket was bound");
    }
}

#[test]
fn status_table_and_json_and_reload_without_a_supervisor() {
    let dir = TempDir::new("status");
    let ctl = dir.join("ctl");

    let out = reload(&ctl);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("handover: error: cannot reach a running `handover run`")
            && stderr.contains(ctl.to_str().unwrap()),
        "{stderr}"
    );

    let (mut h, _addr) = http_demo(&ctl, &[], None);
    let s = status(&ctl);
    assert_eq!(s["ok"], true);
    assert_eq!(s["supervisor_pid"], h.pid());
    assert_eq!(s["reloads"]["ok"], 0);
    assert!(s["last_reload"].is_null(), "{s}");
    assert_eq!(s["sockets"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["fdstore"].as_array().unwrap().len(), 0, "{s}");
    let (_, pid, _) = gens_in(&s, "serving")[0];

    let table = run_with_timeout(handover(["status", "--control"]).arg(&ctl), TIMEOUT);
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!("handover pid {}", h.pid()))
            && text.contains("GENERATION")
            && text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 4 && w[..4] == ["1", &pid.to_string(), "serving", "yes"]
            })
            && text.contains("reloads: 0 ok, 0 failed")
            && text.contains("last reload: none"),
        "{text}"
    );
    h.stop();
}

/// Clients that connect to the control socket and say nothing hold up
/// neither other clients nor the supervisor: with 8 of them connected,
/// `handover status` (which gives up after 10 s) is answered and a reload
/// goes through. (Waiting 2 s for each in turn would take 16 s.)
#[test]
fn silent_control_clients_do_not_hold_up_others() {
    let dir = TempDir::new("silent");
    let ctl = dir.join("ctl");
    let (mut h, _addr) = http_demo(&ctl, &[], None);
    let silent: Vec<handover::Channel> = (0..8)
        .map(|_| handover::Channel::connect(&ctl).unwrap())
        .collect();
    assert_eq!(status(&ctl)["ok"], Value::Bool(true));
    let out = reload(&ctl);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(silent);
    h.stop();
}
