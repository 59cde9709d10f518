//! Scenario `restart`: what clients see while a server is replaced under
//! full load, `handover reload` against a naive restart (stop, then start)
//! of the same server.
//!
//! The server is the HTTP demo server (`handover demo-http`, source
//! crates/handover-cli/examples/http_demo.rs) under `handover run --ready
//! notify`, for both subjects:
//!
//! * `handover`: reloaded over its control socket (what `handover reload`
//!   does): a new generation starts on the same listening socket, and once
//!   it is ready the old one is sent SIGTERM and drains.
//! * `naive-restart` (the baseline): `handover run` is sent SIGTERM (its
//!   program drains and exits, then it exits and closes the socket), and a
//!   fresh `handover run` is started on the same fixed port.
//!
//! K client threads make requests back to back, one connection per request,
//! and every request is recorded (start, end, outcome, which server process
//! answered). Each subject's run has a warm-up, a steady state without
//! reloads, and then N reloads spaced evenly. A request belongs to a reload
//! window when it was in flight at some moment between the reload's
//! request (or the naive SIGTERM) and the moment the old server process had
//! exited and the new one had answered a request ([`stats::classify`]).
//! The report compares latency percentiles during the windows with the
//! steady state's, and counts failed requests.

pub(crate) mod load;
pub(crate) mod server;
pub(crate) mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::report::{self, Better, Check, Figure, OutputArgs, Report};
use load::Shared;
use server::{Server, Watched};
use stats::{Latencies, Outcome, Phase, Request, Span};

/// Options of the `restart` scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Reloads (or naive restarts) per subject.
    #[arg(long, default_value_t = 10)]
    pub reloads: usize,
    /// Time between reloads, in milliseconds; the first comes half of it
    /// after the steady state.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub interval_ms: u64,
    /// Length of the steady state (no reloads), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub steady_ms: u64,
    /// Load before the steady state, not counted, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub warmup_ms: u64,
    /// Client threads, each making one request at a time, a new connection
    /// per request.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// The port on 127.0.0.1 that the naive restart's server comes back on
    /// [default: a free one below the ephemeral range].
    #[arg(long)]
    pub port: Option<u16>,
    /// The handover binary [default: `handover` next to this program, i.e.
    /// target/release/handover; build it with `cargo build --release -p
    /// handover-cli`].
    #[arg(long, value_name = "PATH")]
    pub handover: Option<PathBuf>,
    /// Also write every request to PATH as CSV (subject, start and end in
    /// ns since the subject's run began, outcome, answering pid, phase),
    /// and every reload window, for a closer look at the slow ones.
    #[arg(long, value_name = "PATH")]
    pub records: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Naive,
    Handover,
}

const SUBJECTS: [Subject; 2] = [Subject::Naive, Subject::Handover];

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Naive => "naive-restart",
            Subject::Handover => "handover",
        }
    }
}

/// One reload as the driver saw it, times in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug)]
struct Reload {
    /// Just before the reload request (or the naive SIGTERM).
    start: u64,
    /// The pid of the server process that was serving before.
    old_pid: u32,
    /// When the old process was seen to have exited: its pidfd became
    /// readable (handover), or `handover run` had exited (naive).
    old_exited: u64,
    /// When the new server was ready: the reload's answer came (handover),
    /// or the new `handover run` reported its program ready (naive).
    ready: u64,
}

/// Everything one subject's run recorded.
struct Run {
    requests: Vec<Request>,
    steady: Span,
    reloads: Vec<Reload>,
    /// The reload windows, ends computed from the requests.
    windows: Vec<Span>,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.reloads > 0, "--reloads must be at least 1");
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.steady_ms > 0, "--steady-ms must be above 0");
    let bin = crate::accept::supervisor::find_handover(args.handover.as_deref())?;
    let port = match args.port {
        Some(p) => p,
        None => server::free_port()?,
    };
    eprintln!(
        "restart: handover is {}; the naive restart's server comes back on 127.0.0.1:{port}",
        bin.display()
    );
    let load_before = load_average();
    let started = Instant::now();
    let mut runs = Vec::new();
    for subject in SUBJECTS {
        eprintln!(
            "restart: {}: {} ms warm-up, {} ms steady state, {} reloads {} ms apart, {} clients",
            subject.name(),
            args.warmup_ms,
            args.steady_ms,
            args.reloads,
            args.interval_ms,
            args.clients
        );
        let run = measure(subject, &bin, args, port)
            .with_context(|| format!("subject {}", subject.name()))?;
        runs.push(run);
    }
    eprintln!("restart: done in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.records {
        write_records(path, &runs).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("restart: every request is in {}", path.display());
    }
    let report = build_report(args, &runs, port, &load_before)?;
    report.print(&args.out)
}

/// One subject's run: start the server, load it, steady state, reloads,
/// stop everything (also on error).
fn measure(subject: Subject, bin: &std::path::Path, args: &Args, port: u16) -> Result<Run> {
    let listen = match subject {
        Subject::Naive => format!("127.0.0.1:{port}"),
        Subject::Handover => "127.0.0.1:0".to_owned(),
    };
    let (first, pid) = Server::start(bin, &listen, subject.name())?;
    let addr = first.addr;
    let mut server = Some(first);
    let mut buf = Vec::new();
    let (outcome, _) = load::request(addr, &mut buf);
    if outcome != Outcome::Ok {
        let s = server.as_ref().expect("started");
        return Err(s.failure(&format!("the first request failed: {}", outcome.name())));
    }
    let shared = Shared {
        epoch: Instant::now(),
        addr,
        stop: AtomicBool::new(false),
        latest_pid: AtomicU32::new(pid),
    };
    let (driven, requests) = load::run_clients(&shared, args.clients, load::client, || {
        drive(subject, bin, &listen, &mut server, pid, &shared, args)
    });
    let (steady, reloads) = driven?;
    // The last server is stopped cleanly: an error if it will not.
    if let Some(s) = server.take() {
        s.stop().context("stopping the server at the end")?;
    }
    let mut requests = requests;
    requests.sort_unstable_by_key(|r| r.start);
    let windows = reloads
        .iter()
        .map(|r| {
            let end = stats::window_end(&requests, r.start, r.old_pid, r.old_exited)
                .unwrap_or(r.old_exited);
            Span {
                start: r.start,
                end,
            }
        })
        .collect();
    Ok(Run {
        requests,
        steady,
        reloads,
        windows,
    })
}

/// The driver's part of a run, while the clients load the server: the
/// steady state, then the reloads. `server` is replaced at each naive
/// restart; whatever is in it when this returns is stopped by the caller
/// (or by its drop).
fn drive(
    subject: Subject,
    bin: &std::path::Path,
    listen: &str,
    server: &mut Option<Server>,
    mut pid: u32,
    shared: &Shared,
    args: &Args,
) -> Result<(Span, Vec<Reload>)> {
    thread::sleep(Duration::from_millis(args.warmup_ms));
    let steady_start = shared.now();
    let t = Instant::now();
    thread::sleep(Duration::from_millis(args.steady_ms));
    let steady = Span {
        start: steady_start,
        end: shared.now(),
    };
    let phase = t + Duration::from_millis(args.steady_ms);
    let interval = Duration::from_millis(args.interval_ms);
    let mut reloads = Vec::with_capacity(args.reloads);
    for i in 0..args.reloads {
        let at = phase + interval * i as u32 + interval / 2;
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let old = Watched::new(pid)?;
        let start = shared.now();
        let (new_pid, ready, old_exited) = match subject {
            Subject::Handover => {
                let s = server.as_mut().expect("a server is running");
                let new_pid = s.reload()?;
                let ready = shared.now();
                if !old.wait_until(Instant::now() + server::STOP_TIMEOUT)? {
                    bail!(
                        "the old generation (pid {pid}) had not exited {:?} after the reload",
                        server::STOP_TIMEOUT
                    );
                }
                (new_pid, ready, shared.now())
            }
            Subject::Naive => {
                let s = server.take().expect("a server is running");
                s.stop().context("the naive stop")?;
                // `handover run` exits only after its program has.
                let old_exited = shared.now();
                let (s, new_pid) =
                    Server::start(bin, listen, subject.name()).context("the naive start")?;
                *server = Some(s);
                (new_pid, shared.now(), old_exited)
            }
        };
        // Wait until a client has had an answer from the new process, so
        // that the next reload does not begin before this one is over.
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.latest_pid.load(Ordering::Relaxed) != new_pid {
            ensure!(
                Instant::now() < deadline,
                "no client got an answer from the new server (pid {new_pid}) within 10 s"
            );
            thread::sleep(Duration::from_micros(500));
        }
        eprintln!(
            "restart: {} {}/{}: new server pid {new_pid} ready after {:.1} ms, old one gone after {:.1} ms",
            subject.name(),
            i + 1,
            args.reloads,
            (ready - start) as f64 / 1e6,
            (old_exited - start) as f64 / 1e6,
        );
        reloads.push(Reload {
            start,
            old_pid: pid,
            old_exited,
            ready,
        });
        pid = new_pid;
    }
    let end = phase + interval * args.reloads as u32;
    thread::sleep(end.saturating_duration_since(Instant::now()));
    Ok((steady, reloads))
}

/// One subject's figures.
struct Summary {
    steady: Latencies,
    steady_rate: f64,
    during: Latencies,
    during_rate: f64,
    failed: usize,
    failed_by_kind: Vec<(Outcome, usize)>,
    failed_steady: usize,
    failed_windows: usize,
    failing_ms: Vec<f64>,
    /// Successful requests of the reloading phase outside the windows: the
    /// machine's own noise at the same time.
    between: Latencies,
    /// Every successful request started in the reloading phase, windows or
    /// not: a coarser definition of "during reloads".
    phase: Latencies,
    window_ms: Vec<f64>,
    ready_ms: Vec<f64>,
}

fn summarize(run: &Run) -> Summary {
    let mut steady_ns = Vec::new();
    let mut during_ns = Vec::new();
    let mut between_ns = Vec::new();
    let mut phase_ns = Vec::new();
    let (mut failed_steady, mut failed_windows) = (0, 0);
    for r in &run.requests {
        let phase = stats::classify(r, run.steady, &run.windows);
        if r.ok() && r.start > run.steady.end {
            phase_ns.push(r.latency());
        }
        match (phase, r.ok()) {
            (Phase::Steady, true) => steady_ns.push(r.latency()),
            (Phase::Steady, false) => failed_steady += 1,
            (Phase::Reload(_), true) => during_ns.push(r.latency()),
            (Phase::Reload(_), false) => failed_windows += 1,
            (Phase::Between, true) => between_ns.push(r.latency()),
            _ => {}
        }
    }
    let steady_rate = steady_ns.len() as f64 / (run.steady.len() as f64 / 1e9);
    // Answers that ended inside a window, per second of window.
    let window_ns: u64 = run.windows.iter().map(Span::len).sum();
    let ended_inside = run
        .requests
        .iter()
        .filter(|r| {
            r.ok()
                && run
                    .windows
                    .iter()
                    .any(|w| r.end >= w.start && r.end <= w.end)
        })
        .count();
    let during_rate = if window_ns == 0 {
        0.0
    } else {
        ended_inside as f64 / (window_ns as f64 / 1e9)
    };
    let failed_by_kind = Outcome::FAILURES
        .iter()
        .map(|&o| (o, run.requests.iter().filter(|r| r.outcome == o).count()))
        .filter(|&(_, n)| n > 0)
        .collect();
    Summary {
        steady: Latencies::of(steady_ns),
        steady_rate,
        during: Latencies::of(during_ns),
        during_rate,
        between: Latencies::of(between_ns),
        phase: Latencies::of(phase_ns),
        failed: run.requests.iter().filter(|r| !r.ok()).count(),
        failed_by_kind,
        failed_steady,
        failed_windows,
        failing_ms: stats::failing_spans(&run.requests, &run.windows)
            .into_iter()
            .map(|n| n as f64 / 1e6)
            .collect(),
        window_ms: run.windows.iter().map(|w| w.len() as f64 / 1e6).collect(),
        ready_ms: run
            .reloads
            .iter()
            .map(|r| (r.ready - r.start) as f64 / 1e6)
            .collect(),
    }
}

fn build_report(args: &Args, runs: &[Run], port: u16, load_before: &str) -> Result<Report> {
    let sums: Vec<Summary> = runs.iter().map(summarize).collect();
    for (subject, s) in SUBJECTS.iter().zip(&sums) {
        if s.steady.count == 0 || s.during.count == 0 {
            bail!(
                "{}: no successful request in the steady state or during the reloads",
                subject.name()
            );
        }
    }
    let mut figures = Vec::new();
    let mut add =
        |case: &str, unit: &'static str, better: Better, value: &dyn Fn(&Summary) -> Vec<f64>| {
            for (subject, s) in SUBJECTS.iter().zip(&sums) {
                figures.push(Figure {
                    case: case.to_owned(),
                    subject: subject.name().to_owned(),
                    unit,
                    better,
                    samples: value(s),
                });
            }
        };
    add("steady state: requests", "req/s", Better::Higher, &|s| {
        vec![s.steady_rate]
    });
    add("steady state: p50 latency", "us", Better::Lower, &|s| {
        vec![s.steady.p50_us]
    });
    add("steady state: p99 latency", "us", Better::Lower, &|s| {
        vec![s.steady.p99_us]
    });
    add("during reloads: requests", "req/s", Better::Higher, &|s| {
        vec![s.during_rate]
    });
    add("during reloads: p50 latency", "us", Better::Lower, &|s| {
        vec![s.during.p50_us]
    });
    add("during reloads: p99 latency", "us", Better::Lower, &|s| {
        vec![s.during.p99_us]
    });
    add("during reloads: max latency", "us", Better::Lower, &|s| {
        vec![s.during.max_us]
    });
    add(
        "p99 during reloads / steady p99",
        "x",
        Better::Lower,
        &|s| vec![s.during.p99_us / s.steady.p99_us],
    );
    add("failed requests", "requests", Better::Lower, &|s| {
        vec![s.failed as f64]
    });
    add("time failing, per reload", "ms", Better::Lower, &|s| {
        s.failing_ms.clone()
    });

    let title = format!(
        "{} reloads {} ms apart under load from {} clients (a new connection per request) against `handover run` + the HTTP demo server; {} ms steady state; {} CPUs, Linux {}; one run per subject",
        args.reloads,
        args.interval_ms,
        args.clients,
        args.steady_ms,
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".to_owned(), |r| r.trim().to_owned()),
    );
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) => format!(
                "median {:.1} ({:.1} .. {:.1})",
                report::median(&v).unwrap_or(0.0),
                lo,
                hi
            ),
            _ => "none".to_owned(),
        }
    };
    let mut notes = vec![
        "ratio: how many times better than naive-restart (req/s: subject/baseline; us, x, requests, ms: baseline/subject); inf: the subject's figure is 0 and the baseline's is not".to_owned(),
        format!(
            "naive-restart: SIGTERM to `handover run` (its program drains and exits, then it exits, closing the socket), then a fresh `handover run -l 127.0.0.1:{port}`; handover: `reload` on the control socket (new generation on the same socket, READY=1, then SIGTERM to the old one, which drains)"
        ),
        format!(
            "clients: {} threads, each a request at a time on a new connection (connect, GET, read until close), closed loop; a failure (refused, reset, {} s timeout, not 200, short body) is followed by a {} ms pause",
            args.clients,
            load::REQUEST_TIMEOUT.as_secs(),
            load::RETRY_DELAY.as_millis()
        ),
        "during reloads: requests in flight at some moment of a reload window, from the reload request (naive: the SIGTERM) until the old server process has exited and the new one has answered; latencies and p99 are of successful requests; requests/s: answers that ended inside the windows per second of window".to_owned(),
    ];
    for (subject, s) in SUBJECTS.iter().zip(&sums) {
        let kinds: Vec<String> = s
            .failed_by_kind
            .iter()
            .map(|(o, n)| format!("{n} {}", o.name()))
            .collect();
        notes.push(format!(
            "{}: p99 of the whole reloading phase {:.0} us ({:.2}x steady; {} requests), of its requests outside the windows {:.0} us ({:.2}x steady)",
            subject.name(),
            s.phase.p99_us,
            s.phase.p99_us / s.steady.p99_us,
            s.phase.count,
            s.between.p99_us,
            s.between.p99_us / s.steady.p99_us,
        ));
        notes.push(format!(
            "{}: windows {} ms; new server ready {} ms after the request; {} requests in the steady state, {} during reloads; failed: {} ({} in the steady state, {} during reloads){}",
            subject.name(),
            spread(&s.window_ms),
            spread(&s.ready_ms),
            s.steady.count,
            s.during.count,
            s.failed,
            s.failed_steady,
            s.failed_windows,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(": {}", kinds.join(", "))
            }
        ));
    }
    notes.push(format!(
        "1-minute load average before: {load_before}, after: {} (other work on the machine skews every figure)",
        load_average()
    ));
    let mut report = Report::compare("restart", title, Subject::Naive.name(), figures, notes)?;
    let h = &sums[SUBJECTS
        .iter()
        .position(|&s| s == Subject::Handover)
        .expect("handover is a subject")];
    report.checks = vec![
        Check::at_most(
            "failed requests = 0".to_owned(),
            Subject::Handover.name(),
            h.failed as f64,
            0.0,
        ),
        Check::at_most(
            "p99 during reloads / steady p99 <= 2".to_owned(),
            Subject::Handover.name(),
            h.during.p99_us / h.steady.p99_us,
            2.0,
        ),
    ];
    Ok(report)
}

/// `--records`: every request and every window, as CSV.
fn write_records(path: &std::path::Path, runs: &[Run]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        out,
        "subject,kind,start_ns,end_ns,latency_us,outcome,pid,phase"
    )?;
    for (subject, run) in SUBJECTS.iter().zip(runs) {
        for (i, (w, r)) in run.windows.iter().zip(&run.reloads).enumerate() {
            writeln!(
                out,
                "{},window,{},{},{:.1},ready_at={};old_exited={},{},reload {i}",
                subject.name(),
                w.start,
                w.end,
                w.len() as f64 / 1e3,
                r.ready,
                r.old_exited,
                r.old_pid,
            )?;
        }
        for r in &run.requests {
            let phase = match stats::classify(r, run.steady, &run.windows) {
                Phase::Warmup => "warmup".to_owned(),
                Phase::Steady => "steady".to_owned(),
                Phase::Reload(i) => format!("reload {i}"),
                Phase::Between => "between".to_owned(),
            };
            writeln!(
                out,
                "{},request,{},{},{:.1},{},{},{phase}",
                subject.name(),
                r.start,
                r.end,
                r.latency() as f64 / 1e3,
                r.outcome.name(),
                r.pid,
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The 1-minute load average, as /proc/loadavg has it.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}
