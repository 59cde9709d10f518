//! Accept mode: one program per connection, like systemd's Accept=yes and
//! inetd. The connection is descriptor 3 by the activation protocol, or
//! stdin and stdout with `--inetd`.
//!
//! One thread polls the listeners and the signalfd, accepts, reaps and
//! forwards signals; a few spawner threads start the programs. Spawning
//! suspends the thread that does it until the program has exec'd
//! (CLONE_VFORK), which on a busy machine lasts until the new process has
//! got a CPU: done by the loop itself, that would stop the accepting for
//! every connection in turn. Every accepted connection gets a ticket and is
//! counted from then on (for --max-connections); the loop learns its
//! handler's pid from the spawner's result, and until then keeps the
//! signals it forwards for it and anything it reaps that it cannot place.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::process::ExitStatus;
use std::sync::{Condvar, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use handover::listen::{Bound, ListenAddr, ListenSpec, UnixType};
use handover::unix::{ChildExt, CommandExt};
use handover::{Handle, HandleKind, SocketType};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::net::{SocketAddrAny, SocketFlags};

use super::signals::{self, Signals};
use super::supervise::{become_subreaper, reap_all};
use super::Program;

/// Checks, before anything is bound, that accept mode can work with these
/// sockets: they must be stream sockets.
pub fn check(specs: &[ListenSpec], max: Option<usize>) -> Result<()> {
    for spec in specs {
        let stream = matches!(
            spec.addr,
            ListenAddr::Tcp(_)
                | ListenAddr::TcpAny(_)
                | ListenAddr::UnixPath(_, UnixType::Stream)
                | ListenAddr::UnixAbstract(_, UnixType::Stream)
        );
        if !stream {
            bail!("--accept and --inetd need stream sockets (TCP or Unix stream); {spec:?} is not one");
        }
    }
    if max == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    Ok(())
}

pub fn serve(program: &Program, bound: &[Bound], inetd: bool, max: Option<usize>) -> Result<()> {
    for b in bound {
        let stream = matches!(
            b.handle().kind(),
            HandleKind::Socket(s) if s.listening && s.socket_type == SocketType::Stream
        );
        if !stream {
            bail!("--accept and --inetd need stream sockets; {b} is not one");
        }
        rustix::io::ioctl_fionbio(b.handle(), true).context("making a listener non-blocking")?;
    }
    // Before any thread is started: the spawners inherit this thread's
    // mask, so the signals reach us only through the signalfd.
    let signals = Signals::install()?;
    become_subreaper();
    let pool = Pool::new()?;
    std::thread::scope(|scope| {
        // However this ends, the spawners are told to stop, or the scope
        // would wait for them forever. On success nothing is left for them
        // by then; after an error, queued connections are dropped.
        let _closing = Closing(&pool);
        for i in 0..spawners() {
            std::thread::Builder::new()
                .name(format!("spawner-{i}"))
                .spawn_scoped(scope, || pool.work(program, inetd))
                .context("starting a spawner thread")?;
        }
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            // Nothing to wait for: every connection gets a fresh program.
            let _ = handover::notify::notify("READY=1\nSTATUS=accepting connections");
        }
        Supervisor::default().run(&signals, &pool, bound, max)
    })
}

/// Closes the pool when dropped.
struct Closing<'a>(&'a Pool);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How many threads spawn: `clone(CLONE_VFORK)` suspends the thread that
/// calls it until the child has exec'd, which under load means until the
/// child has got a CPU; a few spawners let several children get there at
/// once while the accept loop goes on accepting.
fn spawners() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cpus).clamp(2, 8)
}

/// A connection accepted and waiting for a spawner.
struct Job {
    ticket: u64,
    conn: OwnedFd,
    peer: Option<SocketAddrAny>,
}

/// A spawner's answer for one job.
struct Done {
    ticket: u64,
    result: Result<handover::Child>,
}

#[derive(Default)]
struct Queues {
    jobs: VecDeque<Job>,
    done: Vec<Done>,
    /// Whether the loop wants to be woken for every result, not just for
    /// failures: see [`Supervisor::must_know_at_once`].
    wake: bool,
    closed: bool,
}

/// The accept loop's side of the spawner threads: jobs go in, results come
/// back, and an eventfd wakes the loop for the results it must not leave
/// waiting. The others it takes whenever it wakes anyway: for the next
/// connection, or for the SIGCHLD of a handler's exit.
struct Pool {
    queues: Mutex<Queues>,
    work: Condvar,
    wake: OwnedFd,
}

impl Pool {
    fn new() -> Result<Pool> {
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).context("eventfd")?;
        Ok(Pool {
            queues: Mutex::default(),
            work: Condvar::new(),
            wake,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // Nothing panics while holding the lock; if something did, the
        // queues are still consistent.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.work.notify_one();
    }

    /// The results so far, oldest first; `woken` when the eventfd was
    /// readable, to reset it.
    fn take_done(&self, woken: bool) -> Vec<Done> {
        if woken {
            // Before looking: a result added after this read writes to it
            // again if it must, so the next poll wakes for it.
            let _ = rustix::io::read(&self.wake, &mut [0u8; 8]);
        }
        std::mem::take(&mut self.lock().done)
    }

    /// Whether the spawners are to wake the loop for every result from now
    /// on. Set under the lock that results are added under, before the
    /// loop looks for results one last time and polls: a spawner adding one
    /// after that look sees the new setting.
    fn wake_for_all(&self, on: bool) {
        self.lock().wake = on;
    }

    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// A spawner thread: starts a program for each job until closed. It
    /// must outlive the programs it starts (their parent-death signal is
    /// tied to the thread that spawned them), which it does: the loop
    /// closes the pool only when no handler is left, or on its way out.
    fn work(&self, program: &Program, inetd: bool) {
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // A panic would leave its ticket in flight for ever (and the
            // loop unable to stop): it is reported as a failed start.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                start(program, job.conn, job.peer, inetd)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the spawner panicked")));
            // A failure is reported at once, so that it is logged when it
            // happens.
            let failed = result.is_err();
            let wake = {
                let mut q = self.lock();
                q.done.push(Done {
                    ticket: job.ticket,
                    result,
                });
                q.wake || failed
            };
            if wake {
                let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
            }
        }
    }
}

impl AsFd for Pool {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

/// The accept loop's bookkeeping. Every handler is first *in flight* (its
/// connection handed to a spawner, its pid not known here yet), then
/// *running* (known by pid) until it is reaped. Only the loop's thread
/// touches any of this.
#[derive(Default)]
struct Supervisor {
    next_ticket: u64,
    /// Tickets of handlers in flight, with the signals forwarded meanwhile,
    /// which each gets as soon as it is known.
    in_flight: BTreeMap<u64, Vec<i32>>,
    running: HashMap<u32, handover::Child>,
    /// Children reaped while some handler was in flight, whose pids were
    /// not known: a handler can exit before its spawner has reported it.
    /// Each is kept with the last ticket given out when it was reaped, and
    /// dropped once every ticket up to that one is resolved (then it was
    /// an orphan, or a handler whose start failed). A pid is not reused
    /// before the kernel has cycled through every other one, so while it is
    /// here it names only that child.
    exited_early: Vec<(u32, u64)>,
    stopping: Option<i32>,
}

impl Supervisor {
    /// Handlers starting or running: what --max-connections limits.
    fn handlers(&self) -> usize {
        self.in_flight.len() + self.running.len()
    }

    fn run(
        mut self,
        signals: &Signals,
        pool: &Pool,
        bound: &[Bound],
        max: Option<usize>,
    ) -> Result<()> {
        let below_max = |s: &Supervisor| max.is_none_or(|m| s.handlers() < m);
        loop {
            // The results that came without waking us, and whether the next
            // ones must (which depends on what came).
            loop {
                let waiting = self.stopping.is_some() || !below_max(&self);
                pool.wake_for_all(waiting || self.must_know_at_once());
                let done = pool.take_done(false);
                if done.is_empty() {
                    break;
                }
                for done in done {
                    self.resolve(done);
                }
            }
            if self.stopping.is_some() && self.handlers() == 0 {
                break;
            }
            // At the limit the listeners are not polled: connections beyond
            // it wait in the kernel's backlog.
            let accepting = self.stopping.is_none() && below_max(&self);
            let mut fds = vec![
                PollFd::new(signals, PollFlags::IN),
                PollFd::new(pool, PollFlags::IN),
            ];
            if accepting {
                fds.extend(bound.iter().map(|b| PollFd::new(b.handle(), PollFlags::IN)));
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
            let ready: Vec<usize> = fds[2..]
                .iter()
                .enumerate()
                .filter(|(_, f)| !f.revents().is_empty())
                .map(|(i, _)| i)
                .collect();
            let woken = !fds[1].revents().is_empty();
            drop(fds);

            // Results first: a handler that exits is then mostly known
            // by the time it is reaped.
            for done in pool.take_done(woken) {
                self.resolve(done);
            }
            while let Some(sig) = signals.next()? {
                match sig {
                    libc::SIGCHLD => self.reap(),
                    libc::SIGPIPE => {}
                    sig => self.forward(sig),
                }
            }
            if self.stopping.is_some() && self.handlers() == 0 {
                break;
            }
            if !accepting {
                continue;
            }
            for i in ready {
                // Accept everything queued, up to the limit.
                while below_max(&self) {
                    let Some((conn, peer)) = accept(&bound[i]) else {
                        break;
                    };
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.in_flight.insert(ticket, Vec::new());
                    pool.submit(Job { ticket, conn, peer });
                }
            }
        }
        super::supervise::clean_up(std::process::id());
        Ok(())
    }

    /// Whether a spawner's result can change what the loop does next, so
    /// that it must not wait until the loop wakes for something else:
    /// a handler reaped before it was known is resolved by it (and no
    /// longer counted), and a signal waits for it. (So do the count at the
    /// limit and a stop, when the listeners are not polled and a result may
    /// be what lets the loop go on.)
    fn must_know_at_once(&self) -> bool {
        !self.exited_early.is_empty() || self.in_flight.values().any(|s| !s.is_empty())
    }

    /// A spawner's result: the handler is running (or already gone), or
    /// its start failed and the connection is dropped.
    fn resolve(&mut self, done: Done) {
        let Some(forwarded) = self.in_flight.remove(&done.ticket) else {
            return;
        };
        match done.result {
            Ok(child) => {
                let pid = child.id();
                if let Some(i) = self.exited_early.iter().position(|&(p, _)| p == pid) {
                    self.exited_early.swap_remove(i);
                    tracing::debug!(pid, "connection handler exited before it was known");
                    handler_exited(pid);
                } else {
                    for sig in forwarded {
                        let _ = child.signal(sig);
                    }
                    self.running.insert(pid, child);
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "starting a connection handler failed")
            }
        }
        // Reaped children that no ticket still in flight can account for
        // were not handlers.
        let oldest = self.in_flight.keys().next().copied();
        self.exited_early
            .retain(|&(_, last)| oldest.is_some_and(|t| t <= last));
    }

    fn reap(&mut self) {
        for (pid, status) in reap_all() {
            self.reaped(pid, status);
        }
    }

    fn reaped(&mut self, pid: u32, status: ExitStatus) {
        if self.running.remove(&pid).is_some() {
            tracing::debug!(pid, %status, "connection handler exited");
            handler_exited(pid);
        } else if !self.in_flight.is_empty() {
            // A handler whose spawner has not reported yet, or an orphan:
            // which one, the spawners' reports tell.
            self.exited_early.push((pid, self.next_ticket - 1));
        }
        // Otherwise an orphan re-parented to us (we are a subreaper):
        // reaped, and not counted.
    }

    /// Passes `sig` to every handler, the ones still starting as soon as
    /// they are known; TERM, INT and QUIT also stop the accepting.
    fn forward(&mut self, sig: i32) {
        if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
            tracing::info!(signal = %signals::name(sig), "stopping: no more connections are accepted");
            self.stopping = Some(sig);
        }
        for c in self.running.values() {
            let _ = c.signal(sig);
        }
        for pending in self.in_flight.values_mut() {
            pending.push(sig);
        }
    }
}

/// The next connection queued on `listener`, if any.
fn accept(listener: &Bound) -> Option<(OwnedFd, Option<SocketAddrAny>)> {
    loop {
        match rustix::net::acceptfrom_with(listener.handle(), SocketFlags::CLOEXEC) {
            Ok(c) => return Some(c),
            Err(rustix::io::Errno::AGAIN) => return None,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
            Err(e) => {
                // EMFILE and friends: log, and try again on the next
                // wake-up rather than spin or die.
                tracing::warn!(error = %e, "accept failed");
                return None;
            }
        }
    }
}

/// What the handler left in its process group goes with it, as systemd
/// does per instance.
fn handler_exited(pid: u32) {
    // SAFETY: kill on a process group id.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGTERM) };
}

fn start(
    program: &Program,
    conn: OwnedFd,
    peer: Option<SocketAddrAny>,
    inetd: bool,
) -> Result<handover::Child> {
    let mut cmd = program.command();
    if let Some(addr) = peer.and_then(|a| std::net::SocketAddr::try_from(a).ok()) {
        // An IPv4 client of a dual-stack socket is reported as IPv4.
        cmd.env("REMOTE_ADDR", addr.ip().to_canonical().to_string())
            .env("REMOTE_PORT", addr.port().to_string());
    }
    cmd.env_remove("NOTIFY_SOCKET");
    let handle = Handle::from(conn);
    if inetd {
        let dup = handle.try_clone().context("dup")?;
        cmd.fd(0, handle).fd(1, dup);
    } else {
        cmd.activation(handle.with_name("connection"))?;
    }
    Ok(cmd.spawn()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn spawn(program: &str, args: &[&str]) -> handover::Child {
        handover::Command::new(program).args(args).spawn().unwrap()
    }

    /// Takes a ticket as the accept loop does.
    fn dispatch(s: &mut Supervisor) -> u64 {
        let t = s.next_ticket;
        s.next_ticket += 1;
        s.in_flight.insert(t, Vec::new());
        t
    }

    fn ok(ticket: u64, child: handover::Child) -> Done {
        Done {
            ticket,
            result: Ok(child),
        }
    }

    #[test]
    fn a_handler_that_exits_before_its_spawner_reports_is_not_counted_as_running() {
        let mut s = Supervisor::default();
        let t = dispatch(&mut s);
        let mut child = spawn("/bin/true", &[]);
        let pid = child.id();
        // The loop reaps it before the spawner's report arrives.
        let status = child.wait().unwrap();
        s.reaped(pid, status);
        assert_eq!(s.handlers(), 1, "still in flight");
        s.resolve(ok(t, child));
        assert_eq!(s.handlers(), 0);
        assert!(s.running.is_empty() && s.exited_early.is_empty());
    }

    #[test]
    fn orphans_reaped_while_handlers_start_are_forgotten_and_never_counted() {
        let mut s = Supervisor::default();
        let a = dispatch(&mut s);
        let b = dispatch(&mut s);
        // An orphan, reaped while a and b are in flight.
        s.reaped(u32::MAX - 1, ExitStatus::from_raw(0));
        let c = dispatch(&mut s);
        let child = spawn("/bin/sleep", &["10"]);
        let pid = child.id();
        s.resolve(ok(b, child));
        assert_eq!(s.exited_early.len(), 1, "a could still be the orphan");
        s.resolve(Done {
            ticket: a,
            result: Err(anyhow::anyhow!("failed")),
        });
        assert!(s.exited_early.is_empty(), "a and b are resolved: an orphan");
        assert_eq!(s.handlers(), 2, "b running, c in flight");
        // With nothing in flight, what is reaped is an orphan at once.
        s.resolve(Done {
            ticket: c,
            result: Err(anyhow::anyhow!("failed")),
        });
        s.reaped(u32::MAX - 2, ExitStatus::from_raw(0));
        assert!(s.exited_early.is_empty());
        assert_eq!(s.handlers(), 1);
        let mut child = s.running.remove(&pid).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn signals_forwarded_while_a_handler_starts_reach_it_once_it_is_known() {
        let mut s = Supervisor::default();
        let t = dispatch(&mut s);
        s.forward(libc::SIGUSR1);
        assert!(s.stopping.is_none());
        let child = spawn("/bin/sleep", &["10"]);
        let pid = child.id();
        s.resolve(ok(t, child));
        let mut child = s.running.remove(&pid).expect("running");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGUSR1), "{status:?}");
    }

    #[test]
    fn term_stops_accepting_and_is_kept_for_handlers_in_flight() {
        let mut s = Supervisor::default();
        let t = dispatch(&mut s);
        s.forward(libc::SIGTERM);
        assert_eq!(s.stopping, Some(libc::SIGTERM));
        assert_eq!(s.in_flight[&t], vec![libc::SIGTERM]);
    }
}
