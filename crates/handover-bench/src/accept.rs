//! Scenario `accept`: connections per second with one spawned process per
//! connection, inetd style (the connection on the program's stdin and
//! stdout).
//!
//! Subjects: `systemd-socket-activate` (the baseline: `systemd-socket-activate
//! --inetd --accept --listen 127.0.0.1:PORT PROGRAM...`, which forks and
//! execs a child per connection) and `handover` (`handover run --inetd -l
//! 127.0.0.1:0 -- PROGRAM...`, which spawns with clone3(CLONE_VM |
//! CLONE_VFORK) from a few spawner threads while its loop goes on
//! accepting). Both run the same program, `/bin/echo
//! handover-bench-accept`, in the same clean environment.
//!
//! A client on 127.0.0.1 makes a fixed number of connections (1000 by
//! default), with 1 and with 8 of them open at a time (the cases); each
//! connection is read until end of stream and its bytes checked against
//! what the program prints, so a broken subject fails rather than
//! reporting a fast figure. Every run starts a fresh supervisor, makes a few
//! untimed warm-up connections, times the rest, and stops the supervisor
//! again (killing it if it will not stop), failed run or not. Runs are
//! repeated with the subjects interleaved in a rotating order, and the
//! median is reported.

pub(crate) mod supervisor;

use std::ffi::OsString;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};

use crate::report::{self, Better, OutputArgs, Report};
use supervisor::Supervisor;

/// Options of the `accept` scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Repetitions of every (case, subject); the median is reported.
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Timed connections per run.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Untimed connections at the start of each run.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// The cases: how many connections the client keeps open at a time.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub concurrency: Vec<usize>,
    /// The handover binary [default: `handover` next to this program, i.e.
    /// target/release/handover; build it with `cargo build --release -p
    /// handover-cli`].
    #[arg(long, value_name = "PATH")]
    pub handover: Option<PathBuf>,
    /// The baseline's binary.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/bin/systemd-socket-activate"
    )]
    pub socket_activate: PathBuf,
    /// SYSTEMD_LOG_LEVEL for the baseline; at `info` (its default) it logs
    /// three lines per connection, handover none.
    #[arg(long, value_name = "LEVEL", default_value = "notice")]
    pub socket_activate_log_level: String,
}

/// What each connection's program prints: `/bin/echo` with this argument.
const WORD: &str = "handover-bench-accept";
const ECHO: &str = "/bin/echo";

/// How long one connection may take before the run is failed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    SocketActivate,
    Handover,
}

const SUBJECTS: [Subject; 2] = [Subject::SocketActivate, Subject::Handover];

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Subject::SocketActivate => "systemd-socket-activate",
            Subject::Handover => "handover",
        }
    }
}

/// Where each subject's binary is.
struct Binaries {
    handover: PathBuf,
    socket_activate: PathBuf,
    /// SYSTEMD_LOG_LEVEL for socket_activate.
    log_level: String,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|&c| c > 0),
        "--concurrency takes counts of 1 or more"
    );
    ensure!(
        std::path::Path::new(ECHO).is_file(),
        "{ECHO}, the program every connection runs, is missing"
    );
    let bins = Binaries {
        handover: supervisor::find_handover(args.handover.as_deref())?,
        socket_activate: args.socket_activate.clone(),
        log_level: args.socket_activate_log_level.clone(),
    };
    ensure!(
        bins.socket_activate.is_file(),
        "{} is missing: it is in Debian's systemd package (apt-get install systemd), \
         or give its path with --socket-activate PATH",
        bins.socket_activate.display()
    );
    eprintln!(
        "accept: handover is {}, the baseline {}",
        bins.handover.display(),
        bins.socket_activate.display()
    );
    let version = baseline_version(&bins.socket_activate);
    let program: Vec<OsString> = vec![ECHO.into(), WORD.into()];
    let expected = format!("{WORD}\n").into_bytes();

    let cases = &args.concurrency;
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); SUBJECTS.len()]; cases.len()];
    let mut rss: Vec<Option<u64>> = vec![None; SUBJECTS.len()];
    let load_before = load_average();
    let started = Instant::now();
    for rep in 0..args.reps {
        eprintln!("accept: run {}/{}", rep + 1, args.reps);
        for (c, &concurrency) in cases.iter().enumerate() {
            // Rotate the order each repetition so that no subject always
            // runs first.
            for k in 0..SUBJECTS.len() {
                let s = (k + rep + c) % SUBJECTS.len();
                let subject = SUBJECTS[s];
                let run = Run {
                    connections: args.connections,
                    warmup: args.warmup,
                    concurrency,
                    expected: &expected,
                };
                let sample = measure(subject, &bins, &program, &run).with_context(|| {
                    format!(
                        "subject {} with {concurrency} concurrent connections",
                        subject.name()
                    )
                })?;
                rss[s] = rss[s].max(sample.rss_kib);
                samples[c][s].push(sample);
            }
        }
    }
    eprintln!("accept: done in {:.1} s", started.elapsed().as_secs_f64());

    let case_list: Vec<report::Case> = cases
        .iter()
        .map(|concurrency| report::Case {
            name: format!("{concurrency} concurrent"),
            unit: "conn/s",
            better: Better::Higher,
        })
        .collect();
    let names: Vec<&str> = SUBJECTS.iter().map(|s| s.name()).collect();
    // CPU time per connection, where /proc could be read.
    let figures = report::figures(
        &case_list,
        &names,
        &samples,
        |x| x.rate,
        "us/conn",
        |x| x.cpu_us_per_conn,
    );
    let title = format!(
        "one process per connection ({ECHO} {WORD}), {} connections per run from a client on 127.0.0.1; {} CPUs, Linux {}; median of {} runs",
        args.connections,
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".to_owned(), |r| r.trim().to_owned()),
        args.reps,
    );
    let kib = |s: Subject| {
        rss[SUBJECTS.iter().position(|&x| x == s).expect("a subject")].map_or_else(
            || "?".to_owned(),
            |k| format!("{:.1} MiB", k as f64 / 1024.0),
        )
    };
    let notes = vec![
        "ratio: how many times better than systemd-socket-activate (conn/s: subject/baseline; us/conn: baseline/subject); above 1 beats the baseline".to_owned(),
        "each connection: connect, read until end of stream, check the bytes; N concurrent: N client threads sharing the connections".to_owned(),
        "CPU time: the supervisor's and its reaped programs' CPU time over the timed connections (utime+stime+cutime+cstime from /proc/PID/stat, 10 ms resolution), per connection; /bin/echo's own start-up is most of it, for both".to_owned(),
        format!(
            "systemd-socket-activate ({version}): --inetd --accept --listen 127.0.0.1:PORT, SYSTEMD_LOG_LEVEL={} (at info, its default, it logs 3 lines per connection); fork + exec per connection",
            args.socket_activate_log_level
        ),
        "handover: run --inetd -l 127.0.0.1:0; clone3(CLONE_VM|CLONE_VFORK) + exec per connection, from a few spawner threads".to_owned(),
        "both supervisors get the same clean environment (PATH, LANG) and a fresh start every run".to_owned(),
        format!(
            "largest supervisor RSS seen: systemd-socket-activate {}, handover {}; both parents are small, so fork's page-table copying costs little here (a large parent is not measured)",
            kib(Subject::SocketActivate),
            kib(Subject::Handover)
        ),
        format!(
            "1-minute load average before: {load_before}, after: {} (other work on the machine skews every figure)",
            load_average()
        ),
    ];
    let report = Report::compare(
        "accept",
        title,
        Subject::SocketActivate.name(),
        figures,
        notes,
    )?;
    report.print(&args.out)
}

/// One run's shape.
struct Run<'a> {
    connections: usize,
    warmup: usize,
    concurrency: usize,
    expected: &'a [u8],
}

/// One run's figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Connections per second.
    rate: f64,
    /// CPU time of the supervisor and its programs per connection.
    cpu_us_per_conn: Option<f64>,
    /// The supervisor's RSS after the timed connections.
    rss_kib: Option<u64>,
}

/// Lets the supervisor reap the programs of the last connections before
/// its CPU time is read (an idle supervisor uses none).
const SETTLE: Duration = Duration::from_millis(20);

/// Starts the subject's supervisor, warms it up, times `connections`
/// connections, and stops it.
fn measure(
    subject: Subject,
    bins: &Binaries,
    program: &[OsString],
    run: &Run<'_>,
) -> Result<Sample> {
    let mut sup = match subject {
        Subject::SocketActivate => {
            Supervisor::socket_activate(&bins.socket_activate, &bins.log_level, program)?
        }
        Subject::Handover => Supervisor::handover(&bins.handover, program)?,
    };
    // The supervisor is stopped when `sup` is dropped, on every path.
    let timed = (|| -> Result<(Duration, Option<f64>)> {
        wait_until_accepting(&mut sup, run.expected)?;
        drive(sup.addr, run.expected, run.warmup, run.concurrency).context("warm-up")?;
        thread::sleep(SETTLE);
        let cpu0 = sup.cpu_seconds();
        let elapsed = drive(sup.addr, run.expected, run.connections, run.concurrency)?;
        thread::sleep(SETTLE);
        let cpu = match (cpu0, sup.cpu_seconds()) {
            (Some(a), Some(b)) => Some((b - a) * 1e6 / run.connections as f64),
            _ => None,
        };
        Ok((elapsed, cpu))
    })();
    let (elapsed, cpu_us_per_conn) = match timed {
        Ok(t) => t,
        Err(e) => {
            // Say whether the supervisor died under us, with its stderr.
            let why = match sup.check_alive() {
                Ok(()) => sup.failure(format!("{e:#}")),
                Err(dead) => dead.context(format!("{e:#}")),
            };
            return Err(why);
        }
    };
    sup.check_alive()?;
    let rss_kib = sup.rss_kib();
    let pid = sup.pid();
    sup.stop().with_context(|| format!("stopping pid {pid}"))?;
    Ok(Sample {
        rate: run.connections as f64 / elapsed.as_secs_f64(),
        cpu_us_per_conn,
        rss_kib,
    })
}

/// Connects until the supervisor answers (systemd-socket-activate is
/// started on a port, not watched until it listens).
fn wait_until_accepting(sup: &mut Supervisor, expected: &[u8]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    loop {
        match one_connection(sup.addr, expected, &mut buf) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && is_refused(&e) => {
                sup.check_alive()?;
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.context("first connection")),
        }
    }
}

fn is_refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Makes `total` connections from `concurrency` threads and returns how
/// long they took, until the last connection ended.
fn drive(addr: SocketAddr, expected: &[u8], total: usize, concurrency: usize) -> Result<Duration> {
    if total == 0 {
        return Ok(Duration::ZERO);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Starting the threads (tens of microseconds each) is inside the
    // timed span; a run takes about a second.
    let t0 = Instant::now();
    thread::scope(|s| {
        let mut workers = Vec::with_capacity(concurrency);
        for i in 0..concurrency {
            let (next, failed) = (&next, &failed);
            let worker = thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn_scoped(s, move || -> Result<usize> {
                    let mut buf = Vec::with_capacity(64);
                    let mut done = 0;
                    while !failed.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= total {
                            break;
                        }
                        if let Err(e) = one_connection(addr, expected, &mut buf) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e.context(format!("connection {n}")));
                        }
                        done += 1;
                    }
                    Ok(done)
                });
            match worker {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // The threads already started stop at their next
                    // connection and are joined by the scope.
                    failed.store(true, Ordering::Relaxed);
                    return Err(anyhow!(e).context("starting a client thread"));
                }
            }
        }
        let mut done = 0;
        let mut first_error = None;
        for w in workers {
            match w.join().map_err(|_| anyhow!("a client thread panicked"))? {
                Ok(n) => done += n,
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        let elapsed = t0.elapsed();
        if let Some(e) = first_error {
            return Err(e);
        }
        ensure!(done == total, "{done} connections made, {total} expected");
        Ok(elapsed)
    })
}

/// One connection: connect, read until end of stream, check the bytes.
fn one_connection(addr: SocketAddr, expected: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&addr, CONNECTION_TIMEOUT)?;
    conn.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    buf.clear();
    if let Err(e) = conn.read_to_end(buf) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            anyhow::bail!(
                "no end of the answer within {CONNECTION_TIMEOUT:?} (got {:?} so far)",
                String::from_utf8_lossy(buf)
            );
        }
        return Err(anyhow!(e).context("reading the answer"));
    }
    ensure!(
        buf.as_slice() == expected,
        "the answer was {:?}, not {:?}",
        String::from_utf8_lossy(buf),
        String::from_utf8_lossy(expected)
    );
    Ok(())
}

/// `systemd 252 (252.38-1~deb12u1)`, from `--version`'s first line.
fn baseline_version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "version unknown".to_owned())
}

/// The 1-minute load average, as /proc/loadavg has it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}
