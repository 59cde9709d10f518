//! `holder`: store + retrieve round trips per second through `handover
//! hold`, by the library client and by the CLI, side by side with their
//! baselines: a bare channel doing the same two exchanges with no holder
//! (the floor for the library), and s6's `s6-fdholder-store` +
//! `s6-fdholder-retrieve` against `s6-fdholder-daemon` (for the CLI).
//!
//! A library round trip is `store(name, handle, replace)` then
//! `retrieve(name)` on one connection. A CLI round trip is two processes
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
    /// Timed round trips per library run.
    #[arg(long, default_value_t = 20_000)]
    pub round_trips: usize,
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
        args.reps > 0 && args.round_trips > 0 && args.cli_round_trips > 0,
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
            name: "library store + retrieve (baseline: a bare channel, no holder)".into(),
            unit: "rt/s",
            better: Better::Higher,
        },
        report::Case {
            name: "library store + retrieve, 1 CPU (baseline: a bare channel, no holder)".into(),
            unit: "rt/s",
            better: Better::Higher,
        },
        report::Case {
            name: "CLI put + get --remove (baseline: s6-fdholder-store + -retrieve -D)".into(),
            unit: "rt/s",
            better: Better::Higher,
        },
    ];
    let subjects = ["baseline", "handover", "handover async"];
    // samples[case][subject]; only the first case has an async subject:
    // the others repeat a figure there and that row is dropped below.
    let samples = vec![
        vec![all.channel, all.lib, all.lib_async],
        vec![all.channel_1cpu, all.lib_1cpu.clone(), all.lib_1cpu],
        vec![all.s6, all.cli.clone(), all.cli],
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
            "library: {} round trips per run on one connection (store with replace, then retrieve); \
             the baseline sends the same two request/reply exchanges (a handle each way) over a bare \
             channel to a thread that only answers",
            args.round_trips
        ),
        format!(
            "CLI: {} round trips per run, each two processes one after the other; s6 is {}",
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
    let lib_1cpu_row = report
        .rows
        .iter()
        .find(|r| r.case == cases[1].name && r.subject == "handover")
        .context("library row, 1 CPU")?;
    let cli_row = report
        .rows
        .iter()
        .find(|r| r.case.starts_with("CLI") && r.subject == "handover")
        .context("CLI row")?;
    report.checks = vec![
        Check {
            goal: format!("library round trips/s >= {LIBRARY_GOAL}"),
            subject: "handover".into(),
            value: lib_row.value,
            limit: LIBRARY_GOAL,
            met: lib_row.value >= LIBRARY_GOAL,
        },
        Check {
            goal: format!("library round trips/s, 1 CPU >= {LIBRARY_GOAL}"),
            subject: "handover".into(),
            value: lib_1cpu_row.value,
            limit: LIBRARY_GOAL,
            met: lib_1cpu_row.value >= LIBRARY_GOAL,
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
    lib_1cpu: Samples,
    channel_1cpu: Samples,
    cli: Samples,
    s6: Samples,
}

fn measure_all(args: &Args, handover: &Path, dir: &Path) -> Result<All> {
    let mut all = All::default();
    let cpu = *allowed_cpus()?.first().context("no CPU")?;
    for rep in 0..args.reps {
        eprintln!("holder: run {}/{}", rep + 1, args.reps);
        let holder = Daemon::handover(handover, &dir.join("h.sock"))?;
        push(&mut all.lib, library(&holder.path, args.round_trips))?;
        push(
            &mut all.lib_async,
            library_async(&holder.path, args.round_trips),
        )?;
        push(
            &mut all.cli,
            cli_handover(handover, &holder.path, args.cli_round_trips),
        )?;
        // Both ends on one CPU: each hop is a context switch instead of
        // waking an idle virtual CPU, which compares the code paths.
        holder.pin(cpu)?;
        push(
            &mut all.lib_1cpu,
            pinned(cpu, || library(&holder.path, args.round_trips)),
        )?;
        drop(holder);
        push(&mut all.channel, bare_channel(args.round_trips, None))?;
        push(
            &mut all.channel_1cpu,
            bare_channel(args.round_trips, Some(cpu)),
        )?;
        let daemon = Daemon::s6(&args.s6, dir)?;
        push(
            &mut all.s6,
            cli_s6(&args.s6, &daemon.path, args.cli_round_trips),
        )?;
    }
    Ok(all)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect())
}

fn one_cpu(cpu: usize) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    set
}

/// Runs `f` with the calling thread pinned to `cpu`, then unpins it.
fn pinned<T>(cpu: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let was = rustix::thread::sched_getaffinity(None)?;
    rustix::thread::sched_setaffinity(None, &one_cpu(cpu)).context("sched_setaffinity")?;
    let out = f();
    rustix::thread::sched_setaffinity(None, &was)?;
    out
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

fn library(path: &Path, n: usize) -> Result<f64> {
    let mut c = Client::connect(path)?;
    let (h, _w) = pipe_handle()?;
    let opts = StoreOptions::new().replace(true);
    for _ in 0..n / 10 {
        c.store("bench", &h, opts.clone())?;
        drop(c.retrieve("bench")?);
    }
    let started = Instant::now();
    for _ in 0..n {
        c.store("bench", &h, opts.clone())?;
        drop(c.retrieve("bench")?);
    }
    Ok(rate(n, started.elapsed()))
}

fn library_async(path: &Path, n: usize) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = AsyncClient::connect(path).await?;
        let (h, _w) = pipe_handle()?;
        let opts = StoreOptions::new().replace(true);
        for _ in 0..n / 10 {
            c.store("bench", &h, opts.clone()).await?;
            drop(c.retrieve("bench").await?);
        }
        let started = Instant::now();
        for _ in 0..n {
            c.store("bench", &h, opts.clone()).await?;
            drop(c.retrieve("bench").await?);
        }
        Ok(rate(n, started.elapsed()))
    })
}

/// The floor: the same two exchanges over a bare channel to a thread that
/// answers each request at once (a handle back for the second).
fn bare_channel(n: usize, cpu: Option<usize>) -> Result<f64> {
    let (client, server) = Channel::pair()?;
    let answering = std::thread::spawn(move || -> Result<()> {
        if let Some(cpu) = cpu {
            rustix::thread::sched_setaffinity(None, &one_cpu(cpu))?;
        }
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
    });
    let (h, _w) = pipe_handle()?;
    let was = rustix::thread::sched_getaffinity(None)?;
    if let Some(cpu) = cpu {
        rustix::thread::sched_setaffinity(None, &one_cpu(cpu))?;
    }
    let round_trip = || -> Result<()> {
        client.send(
            b"{\"op\":\"store\",\"name\":\"bench\",\"replace\":true}",
            std::slice::from_ref(&h),
        )?;
        client.recv()?.context("closed")?;
        client.send(b"{\"op\":\"retrieve\",\"names\":[\"bench\"]}", &[])?;
        drop(client.recv()?.context("closed")?);
        Ok(())
    };
    for _ in 0..n / 10 {
        round_trip()?;
    }
    let started = Instant::now();
    for _ in 0..n {
        round_trip()?;
    }
    let took = started.elapsed();
    rustix::thread::sched_setaffinity(None, &was)?;
    drop(client);
    answering
        .join()
        .map_err(|_| anyhow::anyhow!("the answering thread panicked"))??;
    Ok(rate(n, took))
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

fn cli_handover(bin: &Path, socket: &Path, n: usize) -> Result<f64> {
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
    for _ in 0..n / 10 {
        one()?;
    }
    let started = Instant::now();
    for _ in 0..n {
        one()?;
    }
    Ok(rate(n, started.elapsed()))
}

fn cli_s6(s6: &Path, socket: &Path, n: usize) -> Result<f64> {
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
    for _ in 0..n / 10 {
        one()?;
    }
    let started = Instant::now();
    for _ in 0..n {
        one()?;
    }
    Ok(rate(n, started.elapsed()))
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

    /// Pins the daemon's main thread (which runs its event loop) to `cpu`.
    fn pin(&self, cpu: usize) -> Result<()> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).context("pid")?;
        rustix::thread::sched_setaffinity(Some(pid), &one_cpu(cpu)).context("pinning the holder")
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
