//! Scenario `dispatch`: `handover run --workers N` (handover accepts and
//! hands each connection to a worker process over a channel, no byte
//! proxied) against the usual ways of getting connections to N worker
//! processes, in one run:
//!
//! * **short requests**, one connection per request (HTTP/1.1,
//!   `Connection: close`, a body of about 20 bytes), from K client threads:
//!   requests/s and latency for `dispatch` (N workers behind `handover run
//!   --workers N`), `so-reuseport` (the baseline: N processes, each binding
//!   the same port with SO_REUSEPORT and accepting itself) and `single` (one
//!   process accepting itself);
//! * **large responses** (10 MiB each): MiB/s through `dispatch` against
//!   `proxy` (the baseline: a byte-copying proxy process in front of N
//!   SO_REUSEPORT workers; a read/write loop on a 64 KiB buffer each way).
//!
//! Every variant runs the same worker code (`serve.rs`, this program in
//! `--serve` mode); only the way it gets its connections differs. Every
//! answer is checked (status line, Content-Length, the whole body), by the
//! restart scenario's client (`restart/load.rs`), and every failure is
//! counted and reported. The variants alternate: each round runs each of
//! them once, in a rotating order, and the median over the rounds is
//! reported with every round's figure.

pub(crate) mod procs;
pub(crate) mod serve;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::report::{self, Better, Check, Figure, OutputArgs, Report};
use crate::restart::load::{self, Shared, REQUEST_TIMEOUT};
use crate::restart::server::Server;
use crate::restart::stats::{Latencies, Outcome, Request};
use procs::Proc;

/// Options of the `dispatch` scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Rounds: each runs every variant once; medians over the rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Worker processes [default: the number of CPUs].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Client threads for the short requests, each a request at a time on
    /// a new connection.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Client threads for the large responses.
    #[arg(long, default_value_t = 2)]
    pub large_clients: usize,
    /// The size of a large response, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 10)]
    pub large_mib: usize,
    /// Load before each measurement, not counted, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub warmup_ms: u64,
    /// Length of each measurement, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2500)]
    pub measure_ms: u64,
    /// `handover run --dispatch POLICY`.
    #[arg(long, default_value = "least-busy")]
    pub policy: String,
    /// Which parts to run.
    #[arg(long, value_delimiter = ',', default_values_t = [Part::Short, Part::Large])]
    pub parts: Vec<Part>,
    /// Run only these subjects (dispatch, so-reuseport, single, proxy), to
    /// profile one; the ratios then need the baselines too.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The handover binary [default: `handover` next to this program, i.e.
    /// target/release/handover; build it with `cargo build --release -p
    /// handover-cli`].
    #[arg(long, value_name = "PATH")]
    pub handover: Option<PathBuf>,
    /// Internal: be one of the scenario's servers instead (`serve.rs`).
    #[arg(long, value_enum, hide = true)]
    pub serve: Option<serve::Mode>,
    #[arg(long, hide = true, default_value_t = 0)]
    pub port: u16,
    #[arg(long, hide = true)]
    pub reuseport: bool,
    #[arg(long, hide = true)]
    pub body_bytes: Option<usize>,
    #[arg(long, hide = true)]
    pub backend: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Short,
    Large,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Short => "short",
            Part::Large => "large",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Dispatch,
    ReusePort,
    Single,
    Proxy,
}

const SHORT: [Variant; 3] = [Variant::ReusePort, Variant::Dispatch, Variant::Single];
const LARGE: [Variant; 2] = [Variant::Proxy, Variant::Dispatch];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Dispatch => "dispatch",
            Variant::ReusePort => "so-reuseport",
            Variant::Single => "single",
            Variant::Proxy => "proxy",
        }
    }
}

/// What serves a variant while it is measured; dropped, it stops.
enum Running {
    Handover(Server),
    Procs(Vec<Proc>),
}

impl Running {
    fn check_alive(&mut self) -> Result<()> {
        match self {
            Running::Handover(s) => s.check_alive(),
            Running::Procs(ps) => ps.iter_mut().try_for_each(Proc::check_alive),
        }
    }

    /// Stops it; an error if handover did not stop cleanly.
    fn stop(self) -> Result<()> {
        match self {
            Running::Handover(s) => s.stop().map(drop),
            Running::Procs(ps) => {
                drop(ps);
                Ok(())
            }
        }
    }
}

/// One measurement of one variant.
struct Sample {
    /// Successful answers that ended inside the timed window, per second.
    rate: f64,
    /// Of those answers.
    latencies: Latencies,
    /// Every failed request of the run, warm-up and tail included.
    failed: Vec<Outcome>,
    /// Successful answers in the window by the pid that answered.
    by_pid: Vec<(u32, usize)>,
    /// On-CPU time of the server processes over the window, per answer in
    /// it, in microseconds: all of them, and the front one alone (the
    /// dispatcher or the proxy), if any.
    server_cpu_us: f64,
    front_cpu_us: Option<f64>,
}

/// The server processes of a variant, whose CPU time is measured.
struct Pids {
    /// The dispatcher or the proxy.
    front: Option<u32>,
    workers: Vec<u32>,
}

/// A process's user + system time so far, in microseconds (from
/// /proc/PID/stat, in clock ticks: threads that have exited included).
fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: state is
    // field 3, utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    let (Some(u), Some(s)) = (ticks(14), ticks(15)) else {
        bail!("/proc/{pid}/stat: {stat:?}");
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((u + s) as f64 * 1e6 / hz)
}

impl Pids {
    /// (front, all) CPU time so far, microseconds.
    fn cpu(&self) -> Result<(f64, f64)> {
        let front = self.front.map(cpu_us).transpose()?.unwrap_or(0.0);
        let mut all = front;
        for &w in &self.workers {
            all += cpu_us(w)?;
        }
        Ok((front, all))
    }
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(mode) = args.serve {
        return serve::run(&serve::Options {
            mode,
            port: args.port,
            reuseport: args.reuseport,
            body_bytes: args.body_bytes,
            backend: args.backend,
        });
    }
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        args.clients > 0 && args.large_clients > 0,
        "--clients must be at least 1"
    );
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let workers = args.workers.unwrap_or(cpus);
    ensure!(workers > 0, "--workers must be at least 1");
    let bin = crate::accept::supervisor::find_handover(args.handover.as_deref())?;
    let exe = std::env::current_exe().context("locating this program")?;
    let load_before = crate::restart::load_average();
    let started = Instant::now();
    let large_bytes = args.large_mib << 20;
    let parts: Vec<(Part, &[Variant])> = [(Part::Short, &SHORT[..]), (Part::Large, &LARGE[..])]
        .into_iter()
        .filter(|(p, _)| args.parts.contains(p))
        .collect();
    // samples[part][variant][round]
    let mut samples: Vec<Vec<Vec<Sample>>> = parts
        .iter()
        .map(|(_, vs)| vs.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..args.rounds {
        for (p, (part, variants)) in parts.iter().enumerate() {
            for k in 0..variants.len() {
                let v = (round + k) % variants.len();
                let variant = variants[v];
                if !args.only.is_empty() && !args.only.iter().any(|o| o == variant.name()) {
                    continue;
                }
                let body = (*part == Part::Large).then_some(large_bytes);
                let sample = measure(variant, body, &bin, &exe, workers, args)
                    .with_context(|| format!("{part} requests, {}", variant.name()))?;
                eprintln!(
                    "dispatch: round {}/{}, {part}: {:<12} {:>10.1} {}, p99 {:>8.0} us, {} failed",
                    round + 1,
                    args.rounds,
                    variant.name(),
                    sample.rate / unit_divisor(*part, large_bytes),
                    rate_unit(*part),
                    sample.latencies.p99_us,
                    sample.failed.len()
                );
                samples[p][v].push(sample);
            }
        }
    }
    eprintln!("dispatch: done in {:.1} s", started.elapsed().as_secs_f64());
    if !args.only.is_empty() {
        // Not every subject ran: the lines above are all there is.
        return Ok(());
    }
    let reports = build_reports(
        args,
        &parts,
        &samples,
        workers,
        cpus,
        large_bytes,
        &load_before,
    )?;
    if args.out.json {
        let mut all = reports[0].clone();
        for r in &reports[1..] {
            all.rows.extend(r.rows.iter().cloned());
            all.checks.extend(r.checks.iter().cloned());
        }
        all.print(&args.out)
    } else {
        let mut out = std::io::stdout().lock();
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            out.write_all(r.table().as_bytes())?;
        }
        out.flush()?;
        Ok(())
    }
}

fn rate_unit(part: Part) -> &'static str {
    match part {
        Part::Short => "req/s",
        Part::Large => "MiB/s",
    }
}

/// Short rates are in requests/s; large ones are turned into MiB/s.
fn unit_divisor(part: Part, large_bytes: usize) -> f64 {
    match part {
        Part::Short => 1.0,
        Part::Large => (1u64 << 20) as f64 / large_bytes as f64,
    }
}

/// Starts `variant`'s servers (answering `body` bytes, or the short
/// answer), loads them, stops them.
fn measure(
    variant: Variant,
    body: Option<usize>,
    bin: &Path,
    exe: &Path,
    workers: usize,
    args: &Args,
) -> Result<Sample> {
    let mut worker_argv: Vec<OsString> = Vec::new();
    if let Some(n) = body {
        worker_argv.extend(["--body-bytes".into(), n.to_string().into()]);
    }
    let os = |s: &str| OsString::from(s);
    let (mut running, addr, pids) = match variant {
        Variant::Dispatch => {
            let n = workers.to_string();
            let mut program = vec![exe.as_os_str().to_owned(), os("dispatch"), os("--serve")];
            program.push(os("incoming"));
            program.extend(worker_argv);
            let program: Vec<&std::ffi::OsStr> = program.iter().map(|s| s.as_os_str()).collect();
            let run_args = ["--workers".as_ref(), n.as_ref(), "--dispatch".as_ref()];
            let run_args = [&run_args[..], &[args.policy.as_ref()]].concat();
            let (server, dispatcher) =
                Server::start_with(bin, "127.0.0.1:0", "dispatch", &run_args, &program)?;
            let addr = server.addr;
            let children =
                std::fs::read_to_string(format!("/proc/{dispatcher}/task/{dispatcher}/children"))
                    .context("finding the workers")?;
            let pids = Pids {
                front: Some(dispatcher),
                workers: children
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect(),
            };
            ensure!(
                pids.workers.len() == workers,
                "the dispatcher has {} children, not {workers}",
                pids.workers.len()
            );
            (Running::Handover(server), addr, pids)
        }
        Variant::ReusePort | Variant::Single | Variant::Proxy => {
            let (count, reuseport) = match variant {
                Variant::Single => (1, false),
                _ => (workers, true),
            };
            let mut procs: Vec<Proc> = Vec::with_capacity(count + 1);
            for _ in 0..count {
                let port = procs.first().map_or(0, |p| p.port);
                let mut argv = vec![os("--serve"), os("accept"), os("--port")];
                argv.push(port.to_string().into());
                if reuseport {
                    argv.push(os("--reuseport"));
                }
                argv.extend(worker_argv.iter().cloned());
                procs.push(Proc::start(exe, &argv)?);
            }
            let mut port = procs[0].port;
            if variant == Variant::Proxy {
                let argv = [
                    os("--serve"),
                    os("proxy"),
                    os("--backend"),
                    format!("127.0.0.1:{port}").into(),
                ];
                let proxy = Proc::start(exe, &argv)?;
                port = proxy.port;
                procs.push(proxy);
            }
            let mut ids: Vec<u32> = procs.iter().map(Proc::pid).collect();
            let pids = Pids {
                front: (variant == Variant::Proxy).then(|| ids.pop().expect("the proxy")),
                workers: ids,
            };
            (
                Running::Procs(procs),
                SocketAddr::from(([127, 0, 0, 1], port)),
                pids,
            )
        }
    };
    let clients = if body.is_some() {
        args.large_clients
    } else {
        args.clients
    };
    let sample = load(addr, clients, body, &pids, args);
    running.check_alive()?;
    running.stop()?;
    sample
}

/// K clients for `warmup_ms`, then `measure_ms` timed.
fn load(
    addr: SocketAddr,
    clients: usize,
    body: Option<usize>,
    pids: &Pids,
    args: &Args,
) -> Result<Sample> {
    let shared = Shared {
        epoch: Instant::now(),
        addr,
        stop: AtomicBool::new(false),
        latest_pid: AtomicU32::new(0),
    };
    let (window, requests) = load::run_clients(
        &shared,
        clients,
        |shared| match body {
            None => load::client(shared),
            Some(n) => load::client_with(shared, |addr, buf| large_request(addr, buf, n)),
        },
        || {
            thread::sleep(Duration::from_millis(args.warmup_ms));
            let cpu_start = pids.cpu()?;
            let start = shared.now();
            thread::sleep(Duration::from_millis(args.measure_ms));
            let end = shared.now();
            let cpu_end = pids.cpu()?;
            Ok((start, end, cpu_end.0 - cpu_start.0, cpu_end.1 - cpu_start.1))
        },
    );
    let (start, end, front, all) = window?;
    let mut sample = summarize(&requests, start, end);
    let answers = sample.rate * (end - start) as f64 / 1e9;
    sample.server_cpu_us = all / answers;
    sample.front_cpu_us = pids.front.map(|_| front / answers);
    Ok(sample)
}

fn summarize(requests: &[Request], start: u64, end: u64) -> Sample {
    let inside: Vec<&Request> = requests
        .iter()
        .filter(|r| r.ok() && r.end >= start && r.end <= end)
        .collect();
    let mut by_pid: Vec<(u32, usize)> = Vec::new();
    for r in &inside {
        match by_pid.iter_mut().find(|(p, _)| *p == r.pid) {
            Some((_, n)) => *n += 1,
            None => by_pid.push((r.pid, 1)),
        }
    }
    by_pid.sort_unstable_by_key(|&(_, n)| std::cmp::Reverse(n));
    Sample {
        rate: inside.len() as f64 / ((end - start) as f64 / 1e9),
        latencies: Latencies::of(inside.iter().map(|r| r.latency()).collect()),
        failed: requests
            .iter()
            .filter(|r| !r.ok())
            .map(|r| r.outcome)
            .collect(),
        by_pid,
        server_cpu_us: 0.0,
        front_cpu_us: None,
    }
}

/// Read size of the large-response client.
const CHUNK: usize = 256 * 1024;

/// One large response on a new connection: `200 OK`, a Content-Length of
/// `expected`, and exactly that many bytes of body before the end of
/// stream, read [`CHUNK`] bytes at a time and counted, not kept.
fn large_request(addr: SocketAddr, buf: &mut Vec<u8>, expected: usize) -> (Outcome, u32) {
    buf.resize(CHUNK, 0);
    let result = (|| -> std::io::Result<Outcome> {
        let mut conn = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
        conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        conn.write_all(load::REQUEST)?;
        let mut have = 0;
        loop {
            let n = conn.read(&mut buf[have..])?;
            let from = have.saturating_sub(3);
            have += n;
            if n == 0 || have == buf.len() || buf[from..have].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let (body_start, length) = match load::parse_head(&buf[..have]) {
            Ok(head) => head,
            Err(outcome) => return Ok(outcome),
        };
        if length != Some(expected) {
            return Ok(Outcome::Short);
        }
        let mut body = have - body_start;
        loop {
            match conn.read(buf)? {
                0 => break,
                n => body += n,
            }
        }
        Ok(if body == expected {
            Outcome::Ok
        } else {
            Outcome::Short
        })
    })();
    match result {
        Ok(outcome) => (outcome, 0),
        Err(e) => (load::failure(&e), 0),
    }
}

fn build_reports(
    args: &Args,
    parts: &[(Part, &[Variant])],
    samples: &[Vec<Vec<Sample>>],
    workers: usize,
    cpus: usize,
    large_bytes: usize,
    load_before: &str,
) -> Result<Vec<Report>> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".to_owned(), |r| r.trim().to_owned());
    let mut reports = Vec::new();
    for ((part, variants), samples) in parts.iter().zip(samples) {
        let part = *part;
        let baseline = variants[0];
        let div = unit_divisor(part, large_bytes);
        let prefix = match part {
            Part::Short => "short".to_owned(),
            Part::Large => format!("{} MiB", args.large_mib),
        };
        let mut figures = Vec::new();
        let mut add =
            |case: &str, unit: &'static str, better: Better, f: &dyn Fn(&Sample) -> f64| {
                for (v, runs) in variants.iter().zip(samples) {
                    figures.push(Figure {
                        case: format!("{prefix}: {case}"),
                        subject: v.name().to_owned(),
                        unit,
                        better,
                        samples: runs.iter().map(f).collect(),
                    });
                }
            };
        let latency_unit = match part {
            Part::Short => "us",
            Part::Large => "ms",
        };
        let scale = match part {
            Part::Short => 1.0,
            Part::Large => 1e-3,
        };
        let (rate_case, title) = match part {
            Part::Short => (
                "requests",
                format!(
                    "short requests, a new connection per request, {} client threads; {workers} workers ({cpus} CPUs), Linux {kernel}; {} rounds of {} ms",
                    args.clients, args.rounds, args.measure_ms
                ),
            ),
            Part::Large => (
                "throughput",
                format!(
                    "{} MiB responses, a new connection per response, {} client threads; {workers} workers ({cpus} CPUs), Linux {kernel}; {} rounds of {} ms",
                    args.large_mib, args.large_clients, args.rounds, args.measure_ms
                ),
            ),
        };
        add(rate_case, rate_unit(part), Better::Higher, &|s| {
            s.rate / div
        });
        add("p50 latency", latency_unit, Better::Lower, &|s| {
            s.latencies.p50_us * scale
        });
        add("p99 latency", latency_unit, Better::Lower, &|s| {
            s.latencies.p99_us * scale
        });
        add("server CPU per answer", "us", Better::Lower, &|s| {
            s.server_cpu_us
        });
        add("failed requests", "requests", Better::Lower, &|s| {
            s.failed.len() as f64
        });
        let mut notes = vec![
            format!(
                "ratio: how many times better than {} (rates: subject/baseline; latencies, failures: baseline/subject)",
                baseline.name()
            ),
            describe(part, workers, args),
            format!(
                "rates count the successful answers that ended in the {} ms window after a {} ms warm-up; latencies (connect to end of stream) are theirs; failures are counted over the whole run; every answer is checked: status line, Content-Length, the whole body; server CPU per answer: user + system time of the server processes (dispatcher + workers, proxy + workers, or the workers alone; /proc/PID/stat, 10 ms ticks) over the window, divided by the answers in it (`handover run` itself, idle, not counted)",
                args.measure_ms, args.warmup_ms
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            let runs = &samples[i];
            let rounds: Vec<String> = runs
                .iter()
                .map(|s| {
                    format!(
                        "{:.1} {} p99 {:.0} {latency_unit}, server CPU {:.1} us/answer{}",
                        s.rate / div,
                        rate_unit(part),
                        s.latencies.p99_us * scale,
                        s.server_cpu_us,
                        s.front_cpu_us
                            .map(|f| format!(" ({f:.1} in the {})", front_name(*v)))
                            .unwrap_or_default()
                    )
                })
                .collect();
            notes.push(format!("{}: each round: {}", v.name(), rounds.join("; ")));
        }
        for (i, v) in variants.iter().enumerate() {
            let mut kinds: Vec<(Outcome, usize)> = Vec::new();
            for o in samples[i].iter().flat_map(|s| &s.failed) {
                match kinds.iter_mut().find(|(k, _)| k == o) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((*o, 1)),
                }
            }
            if !kinds.is_empty() {
                let kinds: Vec<String> = kinds
                    .iter()
                    .map(|(o, n)| format!("{n} {}", o.name()))
                    .collect();
                notes.push(format!("{} FAILED: {}", v.name(), kinds.join(", ")));
            }
            if part == Part::Short && *v != Variant::Single {
                let shares: Vec<String> = samples[i]
                    .iter()
                    .map(|s| {
                        let total: usize = s.by_pid.iter().map(|&(_, n)| n).sum();
                        let pct: Vec<String> = s
                            .by_pid
                            .iter()
                            .map(|&(_, n)| format!("{:.0}%", 100.0 * n as f64 / total as f64))
                            .collect();
                        pct.join("/")
                    })
                    .collect();
                notes.push(format!(
                    "{}: share of the answers per worker process, each round: {}",
                    v.name(),
                    shares.join(", ")
                ));
            }
        }
        notes.push(format!(
            "1-minute load average before: {load_before}, after: {} (other work on the machine skews every figure)",
            crate::restart::load_average()
        ));
        let mut report = Report::compare("dispatch", title, baseline.name(), figures, notes)?;
        let rate = |v: Variant| -> Result<f64> {
            let i = variants.iter().position(|&x| x == v).expect("a variant");
            report::median(&samples[i].iter().map(|s| s.rate).collect::<Vec<_>>())
        };
        let ratio = rate(Variant::Dispatch)? / rate(baseline)?;
        let goal = match part {
            Part::Short => 0.9,
            Part::Large => 1.3,
        };
        report.checks.push(Check {
            goal: format!(
                "{part}: dispatch {} / {} >= {goal}",
                rate_unit(part),
                baseline.name()
            ),
            subject: Variant::Dispatch.name().to_owned(),
            value: (ratio * 1000.0).round() / 1000.0,
            limit: goal,
            met: ratio >= goal,
        });
        let failed: usize = variants
            .iter()
            .position(|&x| x == Variant::Dispatch)
            .map(|i| samples[i].iter().map(|s| s.failed.len()).sum())
            .unwrap_or(0);
        report.checks.push(Check::at_most(
            format!("{part}: failed requests = 0"),
            Variant::Dispatch.name(),
            failed as f64,
            0.0,
        ));
        if report.rows.is_empty() {
            bail!("no figures");
        }
        reports.push(report);
    }
    Ok(reports)
}

/// What the front process of a variant is.
fn front_name(v: Variant) -> &'static str {
    match v {
        Variant::Proxy => "proxy",
        _ => "dispatcher",
    }
}

/// The footnote that says what each subject is.
fn describe(part: Part, workers: usize, args: &Args) -> String {
    match part {
        Part::Short => format!(
            "dispatch: `handover run -l 127.0.0.1:0 --workers {workers} --dispatch {}` (handover accepts, hands each connection to a worker over a channel); so-reuseport: {workers} processes each binding 127.0.0.1:PORT with SO_REUSEPORT and accepting; single: 1 process accepting; all run the same worker (handover-bench dispatch --serve: one thread, one connection at a time: read the request head, write the answer, close); clients: {} threads, each GET with Connection: close on a new connection, read until close, closed loop",
            args.policy, args.clients
        ),
        Part::Large => format!(
            "dispatch: as above, answering {} MiB; proxy: a process accepting on its own port, connecting to {workers} SO_REUSEPORT workers (the same worker code) and copying both ways with read/write on a {} KiB buffer (a thread per direction per connection); clients: {} threads, a new connection per response, reading {} KiB at a time",
            args.large_mib,
            serve::PROXY_BUFFER / 1024,
            args.large_clients,
            CHUNK / 1024
        ),
    }
}
