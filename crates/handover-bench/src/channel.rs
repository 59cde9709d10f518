//! Scenario `channel`: moving handles over one connection, between a
//! sending thread and a receiving thread of one process.
//!
//! Cases: handles per second at 1, 16 and 253 handles per message (253 is
//! Linux's SCM_MAX_FD, the most one sendmsg may carry, and exactly one
//! handover frame), with the CPU time those cost per handle; and the
//! round-trip latency of one handle (A sends one to B, B closes it and
//! sends one back), with the two threads on two CPUs and, to take the
//! cross-CPU wake-up out of the figure, on one.
//!
//! Subjects: `plain` (the baseline: a bare rustix sendmsg/recvmsg loop on a
//! SOCK_SEQPACKET socketpair, the ceiling), `handover` (blocking
//! [`handover::Channel`]), `handover-async` (`AsyncChannel`, each end on its
//! own single-threaded tokio runtime), `sendfd` (crate sendfd 0.4 on a
//! UnixDatagram pair) and `passfd` (crate passfd 0.1 on a UnixStream pair;
//! one descriptor per call, so N handles per message is N calls).
//!
//! Every subject sends the same descriptors again and again (duplicates of
//! one UDP socket, made once per run), and every receiver closes each
//! descriptor as it arrives and checks that each message brought exactly
//! the number sent; a run also checks that every message sent was received,
//! so a broken subject fails instead of reporting a fast figure. Unless
//! `--no-pin`, the two threads are pinned to two different CPUs. Runs are
//! timed over a fixed window after a warm-up and repeated, the subjects
//! interleaved in a rotating order, to report the median.

mod asynch;
mod subjects;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::report::{self, Better, OutputArgs, Report};
use subjects::{End, HandoverEnd, PassfdEnd, PlainEnd, SendfdEnd};

/// Options of the `channel` scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Repetitions of every (case, subject); the median is reported.
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Length of each timed window, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub measure_ms: u64,
    /// Warm-up before each timed window, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub warmup_ms: u64,
    /// Let the scheduler place the two threads instead of pinning them to
    /// two different CPUs (the one-CPU round trip stays on one CPU).
    #[arg(long)]
    pub no_pin: bool,
    /// Only these subjects (plain, the baseline, always runs).
    #[arg(long, value_delimiter = ',', value_parser = parse_subject)]
    pub subjects: Vec<Subject>,
    /// Only these cases: 1, 16, 253 (handles per message), rtt (round
    /// trip), rtt1 (round trip, both threads on one CPU).
    #[arg(long, value_delimiter = ',', value_parser = parse_case)]
    pub cases: Vec<Case>,
}

fn parse_subject(s: &str) -> Result<Subject, String> {
    SUBJECTS.into_iter().find(|x| x.name() == s).ok_or_else(|| {
        let names: Vec<_> = SUBJECTS.iter().map(|x| x.name()).collect();
        format!("one of {}", names.join(", "))
    })
}

fn parse_case(s: &str) -> Result<Case, String> {
    CASES
        .into_iter()
        .find(|c| c.flag() == s)
        .ok_or_else(|| "one of 1, 16, 253, rtt, rtt1".to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Plain,
    Handover,
    HandoverAsync,
    Sendfd,
    Passfd,
}

const SUBJECTS: [Subject; 5] = [
    Subject::Plain,
    Subject::Handover,
    Subject::HandoverAsync,
    Subject::Sendfd,
    Subject::Passfd,
];

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Plain => "plain",
            Subject::Handover => "handover",
            Subject::HandoverAsync => "handover-async",
            Subject::Sendfd => "sendfd",
            Subject::Passfd => "passfd",
        }
    }

    /// At most 8 bytes, so that thread names stay within Linux's 15.
    fn tag(self) -> &'static str {
        match self {
            Subject::HandoverAsync => "hoasync",
            other => other.name(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Handles per second at this many handles per message.
    Throughput(usize),
    /// Microseconds per round trip of one handle; with `one_cpu`, both
    /// threads are pinned to one CPU.
    RoundTrip { one_cpu: bool },
}

const CASES: [Case; 5] = [
    Case::Throughput(1),
    Case::Throughput(16),
    Case::Throughput(253),
    Case::RoundTrip { one_cpu: false },
    Case::RoundTrip { one_cpu: true },
];

impl Case {
    fn name(self) -> String {
        match self {
            Case::Throughput(1) => "1 handle/msg".to_owned(),
            Case::Throughput(n) => format!("{n} handles/msg"),
            Case::RoundTrip { one_cpu: false } => "round trip, 1 handle".to_owned(),
            Case::RoundTrip { one_cpu: true } => "round trip, 1 handle, 1 CPU".to_owned(),
        }
    }

    fn flag(self) -> String {
        match self {
            Case::Throughput(n) => n.to_string(),
            Case::RoundTrip { one_cpu: false } => "rtt".to_owned(),
            Case::RoundTrip { one_cpu: true } => "rtt1".to_owned(),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Case::Throughput(_) => "handles/s",
            Case::RoundTrip { .. } => "us",
        }
    }

    fn better(self) -> Better {
        match self {
            Case::Throughput(_) => Better::Higher,
            Case::RoundTrip { .. } => Better::Lower,
        }
    }
}

/// How long to run each measurement.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    warmup: Duration,
    measure: Duration,
    /// CPUs for the two threads (the sender or timing side, then the
    /// receiver or echoing side), or wherever the scheduler likes.
    cpus: Option<(usize, usize)>,
    /// Short subject name for thread names (as `perf` shows them).
    tag: &'static str,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(args.measure_ms > 0, "--measure-ms must be above 0");
    let timing = Timing {
        warmup: Duration::from_millis(args.warmup_ms),
        measure: Duration::from_millis(args.measure_ms),
        cpus: None,
        tag: "",
    };
    let allowed = allowed_cpus()?;
    let two = match allowed[..] {
        [a, b, ..] if !args.no_pin => Some((a, b)),
        _ => None,
    };
    let one = Some((allowed[0], allowed[0]));
    let subjects: Vec<Subject> = SUBJECTS
        .into_iter()
        .filter(|s| *s == Subject::Plain || args.subjects.is_empty() || args.subjects.contains(s))
        .collect();
    let cases: Vec<Case> = CASES
        .into_iter()
        .filter(|c| args.cases.is_empty() || args.cases.contains(c))
        .collect();
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); subjects.len()]; cases.len()];
    let load_before = load_average();
    let started = Instant::now();
    for rep in 0..args.reps {
        eprintln!("channel: run {}/{}", rep + 1, args.reps);
        for (c, &case) in cases.iter().enumerate() {
            // Rotate the order each repetition so that no subject always
            // runs first (or right after the same neighbour).
            for k in 0..subjects.len() {
                let s = (k + rep) % subjects.len();
                let subject = subjects[s];
                let cpus = match case {
                    Case::RoundTrip { one_cpu: true } => one,
                    _ => two,
                };
                let t = Timing {
                    cpus,
                    tag: subject.tag(),
                    ..timing
                };
                let value = measure(subject, case, t).with_context(|| {
                    format!("subject {} in case {:?}", subject.name(), case.name())
                })?;
                samples[c][s].push(value);
            }
        }
    }
    eprintln!("channel: done in {:.1} s", started.elapsed().as_secs_f64());

    let case_list: Vec<report::Case> = cases
        .iter()
        .map(|&case| report::Case {
            name: case.name(),
            unit: case.unit(),
            better: case.better(),
        })
        .collect();
    let names: Vec<&str> = subjects.iter().map(|s| s.name()).collect();
    // CPU time per handle, where it could be read: the figure that shows
    // overhead.
    let figures = report::figures(
        &case_list,
        &names,
        &samples,
        |x| x.value,
        "ns/handle",
        |x| x.cpu_ns_per_handle,
    );
    let title = format!(
        "handles over one connection between two threads; {} CPUs, Linux {}; median of {} runs of {} ms",
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".to_owned(), |r| r.trim().to_owned()),
        args.reps,
        args.measure_ms
    );
    let notes = vec![
        "ratio: how many times better than plain (speed: subject/plain; latency: plain/subject); above 1 beats the baseline".to_owned(),
        "round trip: A sends one handle to B, B closes it and sends one back, microseconds each; \"1 CPU\": both threads pinned to one CPU, so each hop is a context switch instead of waking the other, perhaps idle, CPU".to_owned(),
        "CPU time: the sender's and the receiver's time on a CPU together (from /proc/self/task/*/schedstat) over the timed window, per handle; steadier than the rate on a shared machine".to_owned(),
        "plain: bare rustix sendmsg/recvmsg with SCM_RIGHTS on a SOCK_SEQPACKET socketpair".to_owned(),
        "handover-async: AsyncChannel, each end on its own current-thread tokio runtime".to_owned(),
        "sendfd: sendfd 0.4 on a UnixDatagram pair".to_owned(),
        "passfd: passfd 0.1 on a UnixStream pair; it sends one descriptor per call, so N handles/msg is N calls (and N recvmsg + fcntl on the receiver)".to_owned(),
        format!(
            "1-minute load average before: {load_before}, after: {} (other work on the machine skews every figure)",
            load_average()
        ),
    ];
    let report = Report::compare("channel", title, Subject::Plain.name(), figures, notes)?;
    report.print(&args.out)
}

/// One run's figure, and for a throughput run the CPU time (sender and
/// receiver together) spent per handle over the timed window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    value: f64,
    cpu_ns_per_handle: Option<f64>,
}

impl From<f64> for Sample {
    fn from(value: f64) -> Sample {
        Sample {
            value,
            cpu_ns_per_handle: None,
        }
    }
}

fn measure(subject: Subject, case: Case, t: Timing) -> Result<Sample> {
    let n = match case {
        Case::Throughput(n) => n,
        Case::RoundTrip { .. } => 1,
    };
    // Both ends get descriptors to send; in a throughput case only the
    // first end sends.
    let (a, b) = (payload(n)?, payload(n)?);
    match (subject, case) {
        (Subject::Plain, Case::Throughput(n)) => throughput::<PlainEnd<'_>>(&a, n, t),
        (Subject::Plain, Case::RoundTrip { .. }) => {
            round_trip::<PlainEnd<'_>>(&a, &b, t).map(Sample::from)
        }
        (Subject::Handover, Case::Throughput(n)) => throughput::<HandoverEnd>(&a, n, t),
        (Subject::Handover, Case::RoundTrip { .. }) => {
            round_trip::<HandoverEnd>(&a, &b, t).map(Sample::from)
        }
        (Subject::HandoverAsync, Case::Throughput(n)) => asynch::throughput(&a, n, t),
        (Subject::HandoverAsync, Case::RoundTrip { .. }) => {
            asynch::round_trip(&a, &b, t).map(Sample::from)
        }
        (Subject::Sendfd, Case::Throughput(n)) => throughput::<SendfdEnd<'_>>(&a, n, t),
        (Subject::Sendfd, Case::RoundTrip { .. }) => {
            round_trip::<SendfdEnd<'_>>(&a, &b, t).map(Sample::from)
        }
        (Subject::Passfd, Case::Throughput(n)) => throughput::<PassfdEnd<'_>>(&a, n, t),
        (Subject::Passfd, Case::RoundTrip { .. }) => {
            round_trip::<PassfdEnd<'_>>(&a, &b, t).map(Sample::from)
        }
    }
}

/// The CPUs this process may run on, at least one.
fn allowed_cpus() -> Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect();
    ensure!(!cpus.is_empty(), "no CPU in the affinity mask");
    Ok(cpus)
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).context("sched_setaffinity")
}

/// The 1-minute load average, as /proc/loadavg has it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// `n` descriptors to send: duplicates of one UDP socket.
fn payload(n: usize) -> Result<Vec<OwnedFd>> {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a UDP socket")?;
    (0..n)
        .map(|_| Ok(OwnedFd::from(udp.try_clone().context("dup")?)))
        .collect()
}

/// What the sending and the receiving thread share.
#[derive(Default)]
pub(crate) struct Shared {
    /// Set by the timer: the sender stops after the message in hand.
    pub stop: AtomicBool,
    /// Messages received so far, kept up to date by the receiver.
    pub received: AtomicU64,
    /// The threads' ids, for reading their CPU time (0: not yet known).
    sender_tid: AtomicI32,
    receiver_tid: AtomicI32,
}

/// Nanoseconds a thread of this process has run on a CPU, from
/// /proc/self/task/TID/schedstat; `None` where that is unavailable.
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

fn cpu_of(shared: &Shared) -> Option<u64> {
    let tx = thread_cpu_ns(shared.sender_tid.load(Ordering::Relaxed))?;
    let rx = thread_cpu_ns(shared.receiver_tid.load(Ordering::Relaxed))?;
    Some(tx + rx)
}

fn my_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

impl Shared {
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn count(&self, received: u64) {
        self.received.store(received, Ordering::Relaxed);
    }
}

/// Handles per second through a blocking subject; `fds` are what every
/// message carries.
fn throughput<'f, E: End<'f>>(fds: &'f [OwnedFd], n: usize, t: Timing) -> Result<Sample> {
    debug_assert_eq!(fds.len(), n);
    let (mut tx, mut rx) = E::pair(fds, &[])?;
    time_throughput(
        n,
        t,
        move |shared| {
            let mut sent = 0u64;
            while !shared.stopped() {
                tx.send()?;
                sent += 1;
            }
            tx.finish()?;
            Ok(sent)
        },
        move |shared| {
            let mut got = 0u64;
            while let Some(k) = rx.recv(n)? {
                ensure!(k == n, "message {got} brought {k} handles, not {n}");
                got += 1;
                shared.count(got);
            }
            Ok(got)
        },
    )
}

/// Runs a sender and a receiver on two threads, measures the receiver's
/// rate over the timed window, then stops the sender and checks that
/// every message sent was received.
pub(crate) fn time_throughput(
    per_message: usize,
    t: Timing,
    sender: impl FnOnce(&Shared) -> Result<u64> + Send,
    receiver: impl FnOnce(&Shared) -> Result<u64> + Send,
) -> Result<Sample> {
    let shared = Shared::default();
    thread::scope(|s| {
        let rx = thread::Builder::new()
            .name(format!("{}-rx", t.tag))
            .spawn_scoped(s, || {
                shared.receiver_tid.store(my_tid(), Ordering::Relaxed);
                if let Some((_, cpu)) = t.cpus {
                    pin_to(cpu)?;
                }
                receiver(&shared)
            })?;
        let tx = thread::Builder::new()
            .name(format!("{}-tx", t.tag))
            .spawn_scoped(s, || {
                shared.sender_tid.store(my_tid(), Ordering::Relaxed);
                if let Some((cpu, _)) = t.cpus {
                    pin_to(cpu)?;
                }
                sender(&shared)
            })?;
        thread::sleep(t.warmup);
        let cpu0 = cpu_of(&shared);
        let (c0, t0) = (shared.received.load(Ordering::Relaxed), Instant::now());
        thread::sleep(t.measure);
        let (c1, t1) = (shared.received.load(Ordering::Relaxed), Instant::now());
        let cpu1 = cpu_of(&shared);
        shared.stop.store(true, Ordering::Relaxed);
        let sent = tx
            .join()
            .map_err(|_| anyhow!("the sender panicked"))?
            .context("sender")?;
        let got = rx
            .join()
            .map_err(|_| anyhow!("the receiver panicked"))?
            .context("receiver")?;
        ensure!(sent == got, "{sent} messages sent but {got} received");
        ensure!(c1 > c0, "no message arrived in the timed window");
        let handles = (c1 - c0) as f64 * per_message as f64;
        Ok(Sample {
            value: handles / (t1 - t0).as_secs_f64(),
            cpu_ns_per_handle: match (cpu0, cpu1) {
                (Some(a), Some(b)) if b > a => Some((b - a) as f64 / handles),
                _ => None,
            },
        })
    })
}

/// Microseconds per round trip of one handle through a blocking subject:
/// A sends `fa`, B receives it, closes it and sends `fb` back.
fn round_trip<'f, E: End<'f>>(fa: &'f [OwnedFd], fb: &'f [OwnedFd], t: Timing) -> Result<f64> {
    let (mut a, mut b) = E::pair(fa, fb)?;
    time_round_trips(
        t,
        move |laps| {
            while laps.next() {
                a.send()?;
                match a.recv(1)? {
                    Some(1) => {}
                    other => bail!("the echo brought {other:?} handles, not 1"),
                }
            }
            a.finish()
        },
        move || echo(&mut b),
    )
}

fn echo<'f, E: End<'f>>(b: &mut E) -> Result<u64> {
    let mut echoed = 0u64;
    while let Some(k) = b.recv(1)? {
        ensure!(k == 1, "round trip {echoed} brought {k} handles, not 1");
        b.send()?;
        echoed += 1;
    }
    Ok(echoed)
}

/// Counts round trips ("laps") over a timed window that follows a warm-up.
pub(crate) struct Laps {
    warm_until: Instant,
    measure: Duration,
    mark: Option<(Instant, u64)>,
    done: u64,
    /// Microseconds per lap over the timed window, once it is over.
    per_lap_us: Option<f64>,
}

impl Laps {
    fn new(t: Timing) -> Laps {
        Laps {
            warm_until: Instant::now() + t.warmup,
            measure: t.measure,
            mark: None,
            done: 0,
            per_lap_us: None,
        }
    }

    /// Call before each lap: false once the timed window is over. Every lap
    /// started before this call has finished.
    pub fn next(&mut self) -> bool {
        let now = Instant::now();
        match self.mark {
            None if now >= self.warm_until => self.mark = Some((now, self.done)),
            Some((from, at)) if now - from >= self.measure => {
                let laps = (self.done - at).max(1) as f64;
                self.per_lap_us = Some((now - from).as_secs_f64() * 1e6 / laps);
                return false;
            }
            _ => {}
        }
        self.done += 1;
        true
    }
}

/// Runs side A (which times itself with [`Laps`] and then ends the
/// stream) and side B (which echoes until the end of the stream and
/// returns how many it echoed) on two threads; checks that B echoed every
/// lap A made and returns microseconds per lap.
pub(crate) fn time_round_trips(
    t: Timing,
    a: impl FnOnce(&mut Laps) -> Result<()> + Send,
    b: impl FnOnce() -> Result<u64> + Send,
) -> Result<f64> {
    thread::scope(|s| {
        let echo = thread::Builder::new()
            .name(format!("{}-echo", t.tag))
            .spawn_scoped(s, move || {
                if let Some((_, cpu)) = t.cpus {
                    pin_to(cpu)?;
                }
                b()
            })?;
        let restore = match t.cpus {
            Some((cpu, _)) => {
                let was = rustix::thread::sched_getaffinity(None)?;
                pin_to(cpu)?;
                Some(was)
            }
            None => None,
        };
        let mut laps = Laps::new(t);
        let a_result = a(&mut laps);
        if let Some(was) = restore {
            rustix::thread::sched_setaffinity(None, &was)?;
        }
        let echoed = echo
            .join()
            .map_err(|_| anyhow!("the echoing side panicked"))?
            .context("echoing side")?;
        a_result.context("timing side")?;
        ensure!(
            echoed == laps.done,
            "{} round trips made but {echoed} echoed",
            laps.done
        );
        laps.per_lap_us.context("the timed window never ended")
    })
}
