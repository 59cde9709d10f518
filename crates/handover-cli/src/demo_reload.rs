//! `handover demo`: zero-downtime reloads, seen in ten seconds.
//!
//! It runs the HTTP demo server (examples/http_demo.rs, built into this
//! binary as `handover demo-http`) under `handover run`, keeps a load
//! client of four threads busy against it, reloads it every two seconds
//! through the control socket, and prints what the clients saw: requests
//! served, failed requests, reloads, and which generations answered.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::run::control;

const RELOADS: u32 = 5;
const EVERY: Duration = Duration::from_secs(2);
const CLIENTS: usize = 4;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    generations: Mutex<BTreeSet<u64>>,
    first_error: Mutex<Option<String>>,
}

pub fn run() -> Result<()> {
    let exe = std::env::current_exe().context("finding the handover executable")?;
    let control_path =
        std::env::temp_dir().join(format!("handover-demo-{}.ctl", std::process::id()));
    let mut supervisor = Command::new(&exe)
        .args([
            "run",
            "--ready",
            "notify",
            "--stop-timeout",
            "10s",
            "-l",
            "127.0.0.1:0=http",
        ])
        .arg("--control")
        .arg(&control_path)
        .arg("--")
        .arg(&exe)
        .arg("demo-http")
        .env("HANDOVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting `handover run`")?;
    let result = drive(&mut supervisor, &control_path);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(supervisor.id() as libc::pid_t, libc::SIGTERM) };
    let _ = supervisor.wait();
    let _ = std::fs::remove_file(&control_path);
    result
}

fn drive(supervisor: &mut std::process::Child, control_path: &std::path::Path) -> Result<()> {
    let mut lines = BufReader::new(supervisor.stdout.take().context("no stdout")?).lines();
    let addr: SocketAddr = loop {
        let Some(line) = lines.next() else {
            bail!("`handover run` exited before listening");
        };
        // handover: listening on 127.0.0.1:PORT (http) as fd 3
        if let Some(rest) = line?.strip_prefix("handover: listening on ") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            break addr
                .parse()
                .with_context(|| format!("unexpected address {addr:?}"))?;
        }
    };
    println!("[demo] `handover run` listens on {addr} and runs the HTTP demo server under it");
    wait_until_serving(addr)?;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            std::thread::spawn(move || load(addr, &tally, &stop))
        })
        .collect();
    println!("[demo] {CLIENTS} clients send requests as fast as they can, a new connection each");

    let mut reloads = 0;
    for _ in 0..RELOADS {
        std::thread::sleep(EVERY);
        let started = Instant::now();
        let answer = control::ask(Some(control_path), "reload", Duration::from_secs(60))?;
        if answer["ok"] != serde_json::Value::Bool(true) {
            println!("[demo] reload failed: {}", answer["error"]);
            continue;
        }
        reloads += 1;
        println!(
            "[demo] reload {reloads}: generation {} (pid {}) ready after {} ms; the old one drains; {} requests served so far, {} failed",
            answer["generation"],
            answer["pid"],
            started.elapsed().as_millis(),
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
    }
    std::thread::sleep(EVERY);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let generations = tally.generations.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "[demo] {ok} requests served, {failed} failed, {reloads} reloads; answered by generations {generations:?}"
    );
    if let Some(e) = tally
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        println!("[demo] first failure: {e}");
    }
    if failed > 0 || reloads < RELOADS {
        bail!("{failed} requests failed and {reloads} of {RELOADS} reloads succeeded");
    }
    println!("[demo] done: every request was served while the server was replaced {reloads} times");
    Ok(())
}

fn wait_until_serving(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!("the demo server does not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One request on a new connection; the generation that answered.
fn get(addr: SocketAddr) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200 ") {
        bail!("answer {:?}", answer.lines().next().unwrap_or(""));
    }
    let generation = answer
        .split("generation ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .context("no generation in the answer")?;
    Ok(generation)
}

fn load(addr: SocketAddr, tally: &Tally, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match get(addr) {
            Ok(g) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally
                    .generations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(g);
            }
            Err(e) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                tally
                    .first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}
