//! `holder`: store + retrieve round trips per second through `handover
//! hold`, by the library client and by the CLI, side by side with their
//! baselines: a bare channel doing the same two exchanges with no holder
//! (the floor for the library), and s6's `s6-fdholder-store` +
//! `s6-fdholder-retrieve` against `s6-fdholder-daemon` (for the CLI).
//!
//! A library round trip is `store(name, handle, replace)` then
//! `retrieve(name)` on one connection, the handle retrieved checked to be
//! the one stored (same inode); measured with one client, and with
//! `--clients` clients at once, each on its own connection and thread with
//! its own name, as a daemon is loaded in use. A CLI round trip is two processes
//! run one after the other: `handover put NAME --fd 0` then `handover get
//! NAME --remove --stdin -- /bin/true`, against `s6-fdholder-store PATH
//! NAME` then `s6-fdholder-retrieve -D PATH NAME /bin/true`: each stores
//! its stdin and hands it, removed, to a program on its stdin.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use handover::holder::{AsyncClient, Client, StoreOptions};
use handover::{Channel, Handle};

use crate::report::{self, Better, Check, OutputArgs, Report};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Repetitions of every (case, subject); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Timed round trips per library run (shared by the clients).
    #[arg(long, default_value_t = 20_000)]
    pub round_trips: usize,
    /// Concurrent library clients in the second library case.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Timed round trips per CLI run (two processes each).
    #[arg(long, default_value_t = 300)]
    pub cli_round_trips: usize,
    /// The handover binary [default: `handover` next to this program, i.e.
    /// target/release/handover; build it with `cargo build --release -p
    /// handover-cli`].
    #[arg(long, value_name = "PATH")]
    pub handover: Option<PathBuf>,
    /// Where s6's programs are (Debian's package s6).
    #[arg(long, value_name = "DIR", default_value = "/usr/bin")]
    pub s6: PathBuf,
}

const TRUE: &str = "/bin/true";

/// The library's goal, from the issue.
const LIBRARY_GOAL: f64 = 20_000.0;

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.reps > 0 && args.round_trips > 0 && args.cli_round_trips > 0 && args.clients > 0,
        "counts must be at least 1"
    );
    let handover = crate::accept::supervisor::find_handover(args.handover.as_deref())?;
    for prog in [
        "s6-fdholder-daemon",
        "s6-fdholder-store",
        "s6-fdholder-retrieve",
        "s6-ipcserver-socketbinder",
    ] {
        ensure!(
            args.s6.join(prog).is_file(),
            "{} is missing: it is in Debian's s6 package (apt-get install s6), or give --s6 DIR",
            args.s6.join(prog).display()
        );
    }
    ensure!(Path::new(TRUE).is_file(), "{TRUE} is missing");
    let dir = std::env::temp_dir().join(format!("handover-bench-holder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = measure_all(args, &handover, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let all = result?;

    let cases = [
        report::Case {
            name: "library store + retrieve, 1 client (baseline: a bare channel, no holder)".into(),
            unit: "rt/s",
            better: Better::Higher,
        },
        report::Case {
            name: format!(
                "library store + retrieve, {} clients (baseline: {} bare channels)",
                args.clients, args.clients
            ),
            unit: "rt/s",
            better: Better::Higher,
        },
        report::Case {
            name: "CLI put + get --remove (baseline: s6-fdholder-store + -retrieve -D)".into(),
            unit: "rt/s",
            better: Better::Higher,
        },
        report::Case {
            name: "CLI put + get --remove, CPU time of the two processes (baseline: s6's two)"
                .into(),
            unit: "us",
            better: Better::Lower,
        },
    ];
    let subjects = ["baseline", "handover", "handover async"];
    // samples[case][subject]; only the first case has an async subject:
    // the others repeat a figure there and that row is dropped below.
    let samples = vec![
        vec![all.channel, all.lib, all.lib_async],
        vec![all.channels, all.lib_many.clone(), all.lib_many],
        vec![all.s6, all.cli.clone(), all.cli],
        vec![all.s6_cpu, all.cli_cpu.clone(), all.cli_cpu],
    ];
    let mut figures = report::figures(&cases, &subjects, &samples, |x| *x, "", |_| None);
    figures.retain(|f| f.subject != "handover async" || f.case == cases[0].name);
    let title = format!(
        "round trips per second through `handover hold`; {} CPUs, Linux {}; median of {} runs",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        args.reps
    );
    let notes = vec![
        format!(
            "library: {} round trips per run (store with replace, then retrieve, the handle back checked \
             by inode), on one connection, or shared by {} clients each on its own connection and \
             thread; the baseline sends the same two request/reply exchanges (a handle each way) over \
             bare channels to threads that only answer; no CPU pinning",
            args.round_trips, args.clients
        ),
        format!(
            "CLI: {} round trips per run, each two processes one after the other, both storing \
             /dev/null (stdin) and exec'ing /bin/true with it on stdin; handover and s6 run back to \
             back in each repetition, each first in turn; s6 is {}",
            args.cli_round_trips,
            s6_version(&args.s6)
        ),
    ];
    let mut report = Report::compare("holder", title, "baseline", figures, notes)?;
    let lib_row = report
        .rows
        .iter()
        .find(|r| r.case == cases[0].name && r.subject == "handover")
        .context("library row")?;
    let lib_many_row = report
        .rows
        .iter()
        .find(|r| r.case == cases[1].name && r.subject == "handover")
        .context("library row, several clients")?;
    let cli_row = report
        .rows
        .iter()
        .find(|r| r.case.starts_with("CLI") && r.subject == "handover")
        .context("CLI row")?;
    report.checks = vec![
        Check {
            goal: format!(
                "library round trips/s, {} clients >= {LIBRARY_GOAL}",
                args.clients
            ),
            subject: "handover".into(),
            value: lib_many_row.value,
            limit: LIBRARY_GOAL,
            met: lib_many_row.value >= LIBRARY_GOAL,
        },
        Check {
            goal: format!("library round trips/s, 1 client >= {LIBRARY_GOAL}"),
            subject: "handover".into(),
            value: lib_row.value,
            limit: LIBRARY_GOAL,
            met: lib_row.value >= LIBRARY_GOAL,
        },
        Check {
            goal: "CLI round trips/s >= 1.0 x s6".into(),
            subject: "handover".into(),
            value: cli_row.ratio,
            limit: 1.0,
            met: cli_row.ratio >= 1.0,
        },
    ];
    report.print(&args.out)
}

type Samples = Vec<f64>;

/// Every subject's samples, per case.
#[derive(Default)]
struct All {
    lib: Samples,
    lib_async: Samples,
    channel: Samples,
    lib_many: Samples,
    channels: Samples,
    cli: Samples,
    s6: Samples,
    /// CPU time (user + system) of the CLI's processes per round trip, us.
    cli_cpu: Samples,
    s6_cpu: Samples,
}

fn measure_all(args: &Args, handover: &Path, dir: &Path) -> Result<All> {
    let mut all = All::default();
    let n = args.round_trips;
    for rep in 0..args.reps {
        eprintln!("holder: run {}/{}", rep + 1, args.reps);
        let holder = Daemon::handover(handover, &dir.join("h.sock"))?;
        push(&mut all.lib, library(&holder.path, 1, n))?;
        push(&mut all.lib_async, library_async(&holder.path, n))?;
        push(&mut all.lib_many, library(&holder.path, args.clients, n))?;
        push(&mut all.channel, bare_channel(1, n))?;
        push(&mut all.channels, bare_channel(args.clients, n))?;
        // The CLI against s6 back to back, each going first in turn.
        let s6 = Daemon::s6(&args.s6, dir)?;
        let m = args.cli_round_trips;
        let mut handover_cli = || -> Result<()> {
            let (rate, cpu) = cli_handover(handover, &holder.path, m)?;
            all.cli.push(rate);
            all.cli_cpu.push(cpu);
            Ok(())
        };
        if rep % 2 == 0 {
            handover_cli()?;
        }
        let (rate, cpu) = cli_s6(&args.s6, &s6.path, m)?;
        all.s6.push(rate);
        all.s6_cpu.push(cpu);
        if rep % 2 == 1 {
            handover_cli()?;
        }
    }
    Ok(all)
}

fn push(v: &mut Samples, rate: Result<f64>) -> Result<()> {
    v.push(rate?);
    Ok(())
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

/// A handle to store: a pipe's reading end.
fn pipe_handle() -> Result<(Handle, std::os::fd::OwnedFd)> {
    let (r, w) = rustix::pipe::pipe().context("pipe")?;
    Ok((Handle::from(r), w))
}

/// `clients` threads, each with its own connection and name, sharing `n`
/// round trips; the rate is all of them over the time the slowest took.
fn library(path: &Path, clients: usize, n: usize) -> Result<f64> {
    let per = n.div_ceil(clients);
    let start = std::sync::Barrier::new(clients + 1);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|i| {
                let start = &start;
                scope.spawn(move || -> Result<()> {
                    let mut c = Client::connect(path)?;
                    let (h, _w) = pipe_handle()?;
                    let id = identity(&h)?;
                    let name = format!("bench-{i}");
                    let opts = StoreOptions::new().replace(true);
                    let round_trip = || -> Result<()> {
                        c.store(&name, &h, opts.clone())?;
                        let back = c.retrieve(&name)?;
                        ensure!(identity(&back)? == id, "retrieved another descriptor");
                        Ok(())
                    };
                    warm_then_timed(per, start, round_trip)
                })
            })
            .collect();
        start.wait();
        let started = Instant::now();
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(rate(per * clients, started.elapsed()))
    })
}

/// A tenth of `per` round trips to warm up, then, once every thread is
/// ready (`start`), `per` timed ones.
fn warm_then_timed(
    per: usize,
    start: &std::sync::Barrier,
    mut round_trip: impl FnMut() -> Result<()>,
) -> Result<()> {
    for _ in 0..per / 10 {
        round_trip()?;
    }
    start.wait();
    for _ in 0..per {
        round_trip()?;
    }
    Ok(())
}

/// What a descriptor refers to: (device, inode).
fn identity(h: &Handle) -> Result<(u64, u64)> {
    let st = rustix::fs::fstat(h).context("fstat")?;
    Ok((st.st_dev, st.st_ino))
}

fn library_async(path: &Path, n: usize) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = AsyncClient::connect(path).await?;
        let (h, _w) = pipe_handle()?;
        let id = identity(&h)?;
        let opts = StoreOptions::new().replace(true);
        let mut started = Instant::now();
        for i in 0..n + n / 10 {
            if i == n / 10 {
                started = Instant::now();
            }
            c.store("bench-async", &h, opts.clone()).await?;
            let back = c.retrieve("bench-async").await?;
            ensure!(identity(&back)? == id, "retrieved another descriptor");
        }
        Ok(rate(n, started.elapsed()))
    })
}

/// The floor: the same two exchanges over `pairs` bare channels, each to
/// a thread that answers each request at once (a handle back for the
/// second), the client checking it as the library runs do.
fn bare_channel(pairs: usize, n: usize) -> Result<f64> {
    let per = n.div_ceil(pairs);
    let start = std::sync::Barrier::new(pairs + 1);
    std::thread::scope(|scope| {
        let mut answerers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..pairs {
            let (client, server) = Channel::pair()?;
            answerers.push(scope.spawn(move || -> Result<()> {
                let mut kept: Option<Handle> = None;
                while let Some(mut msg) = server.recv()? {
                    if let Some(h) = msg.handles.pop() {
                        kept = Some(h);
                        server.send(b"{\"ok\":true}", &[])?;
                    } else {
                        let h = kept.as_ref().context("nothing kept")?;
                        server.send(b"{\"ok\":true}", std::slice::from_ref(h))?;
                    }
                }
                Ok(())
            }));
            let start = &start;
            clients.push(scope.spawn(move || -> Result<()> {
                let (h, _w) = pipe_handle()?;
                let id = identity(&h)?;
                let round_trip = || -> Result<()> {
                    client.send(
                        b"{\"op\":\"store\",\"name\":\"bench\",\"replace\":true}",
                        std::slice::from_ref(&h),
                    )?;
                    client.recv()?.context("closed")?;
                    client.send(b"{\"op\":\"retrieve\",\"names\":[\"bench\"]}", &[])?;
                    let mut back = client.recv()?.context("closed")?;
                    let back = back.handles.pop().context("no handle back")?;
                    ensure!(identity(&back)? == id, "another descriptor came back");
                    Ok(())
                };
                warm_then_timed(per, start, round_trip)
            }));
        }
        start.wait();
        let started = Instant::now();
        let joined = |t: std::thread::ScopedJoinHandle<'_, Result<()>>| {
            t.join()
                .map_err(|_| anyhow::anyhow!("a bare-channel thread panicked"))?
        };
        for t in clients {
            joined(t)?;
        }
        let took = started.elapsed();
        // Each client's end closed when its thread ended, ending its answerer.
        for t in answerers {
            joined(t)?;
        }
        Ok(rate(per * pairs, took))
    })
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// CPU time (user + system) used so far by this process's waited-for
/// children, in microseconds (cutime + cstime of /proc/self/stat, in clock
/// ticks: 10 ms at 100 Hz, under 2 % of a run's total).
fn children_cpu_us() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 16 and 17 of proc(5), counted from the state (field 3).
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("/proc/self/stat")?
            .parse::<f64>()?)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(16)? + ticks(17)?) / hz * 1e6)
}

/// Runs `one` `n` times after a tenth as many to warm up: (round trips per
/// second, CPU microseconds of its processes per round trip).
fn timed_cli(n: usize, one: impl Fn() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..n / 10 {
        one()?;
    }
    let cpu = children_cpu_us()?;
    let started = Instant::now();
    for _ in 0..n {
        one()?;
    }
    let took = started.elapsed();
    Ok((rate(n, took), (children_cpu_us()? - cpu) / n as f64))
}

fn cli_handover(bin: &Path, socket: &Path, n: usize) -> Result<(f64, f64)> {
    let one = || -> Result<()> {
        run_quiet(
            Command::new(bin)
                .args(["put", "cli", "--fd", "0", "--socket"])
                .arg(socket),
        )?;
        run_quiet(
            Command::new(bin)
                .args(["get", "cli", "--remove", "--stdin", "--socket"])
                .arg(socket)
                .args(["--", TRUE]),
        )
    };
    timed_cli(n, one)
}

fn cli_s6(s6: &Path, socket: &Path, n: usize) -> Result<(f64, f64)> {
    let one = || -> Result<()> {
        run_quiet(
            Command::new(s6.join("s6-fdholder-store"))
                .arg(socket)
                .arg("bench"),
        )?;
        run_quiet(
            Command::new(s6.join("s6-fdholder-retrieve"))
                .arg("-D")
                .arg(socket)
                .args(["bench", TRUE]),
        )
    };
    timed_cli(n, one)
}

/// A holder daemon for one run, stopped when dropped.
struct Daemon {
    child: Child,
    path: PathBuf,
}

impl Daemon {
    fn handover(bin: &Path, path: &Path) -> Result<Daemon> {
        let child = Command::new(bin)
            .args(["hold", "--max-clients", "64", "--socket"])
            .arg(path)
            .env("HANDOVER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting handover hold")?;
        Daemon::ready(child, path.to_owned())
    }

    /// s6-fdholder-daemon with rules that let this uid store and retrieve
    /// anything.
    fn s6(s6: &Path, dir: &Path) -> Result<Daemon> {
        let uid = rustix::process::getuid().as_raw();
        let rules = dir.join("s6-rules");
        let env = rules.join(format!("uid/{uid}/env"));
        std::fs::create_dir_all(&env)?;
        std::fs::write(rules.join(format!("uid/{uid}/allow")), "")?;
        std::fs::write(env.join("S6_FDHOLDER_STORE_REGEX"), ".*\n")?;
        std::fs::write(env.join("S6_FDHOLDER_RETRIEVE_REGEX"), ".*\n")?;
        let path = dir.join("s6.sock");
        let _ = std::fs::remove_file(&path);
        let child = Command::new(s6.join("s6-fdholder-daemon"))
            .arg("-i")
            .arg(&rules)
            .arg(&path)
            .env("PATH", format!("{}:/usr/bin:/bin", s6.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting s6-fdholder-daemon")?;
        Daemon::ready(child, path)
    }

    fn ready(child: Child, path: PathBuf) -> Result<Daemon> {
        let daemon = Daemon { child, path };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&daemon.path).is_err()
            && Channel::connect(&daemon.path).is_err()
        {
            if Instant::now() > deadline {
                bail!("the daemon never listened on {}", daemon.path.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn s6_version(dir: &Path) -> String {
    // s6 programs have no --version; Debian's package records it.
    let _ = dir;
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "s6"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!("s6 {}", String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|| "s6 (version unknown)".into())
}
