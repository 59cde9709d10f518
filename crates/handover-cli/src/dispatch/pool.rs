//! Pools of worker processes and the bookkeeping of delivery: which
//! connections each worker has not taken yet (the dispatcher keeps its own
//! copy of those, to hand them to another worker should this one die), how
//! many it has open, whom the policy picks next, and restarting workers
//! that die. What a worker has taken and finished is read from its state
//! page (`handover::dispatch::state`), never waited for.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use handover::dispatch::protocol::{encode_delivery, Report, VERSION};
use handover::dispatch::state::StatePage;
use handover::dispatch::{CHANNEL_NAME, STATE_NAME};
use handover::{Channel, Child, Command, Handle};

/// How many connections a worker may have not yet taken at once. A
/// worker that stops taking connections holds at most this many (they go
/// elsewhere if it dies), and, with MAX_UNACKED_BYTES, the channel's
/// buffer never fills, so a send to a worker does not wait.
pub const MAX_UNACKED: usize = 64;

/// The peeked bytes a worker may have in deliveries not yet taken: with
/// routing, each delivery carries up to 64 KiB, and 64 of them would
/// overflow the channel's buffer. A worker with no delivery waiting always
/// gets one.
pub const MAX_UNACKED_BYTES: usize = 128 * 1024;

/// How long a send to a worker may take before the worker is passed over
/// for this connection.
const SEND_TIMEOUT: Duration = Duration::from_millis(50);

/// The most reports read from one worker per loop round.
const REPORTS_PER_ROUND: usize = 256;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A worker that ran this long resets its backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// The worker with the fewest connections open (not yet taken, or
    /// taken and not yet finished).
    LeastBusy,
    /// Each worker in turn.
    RoundRobin,
}

/// A connection accepted and not yet taken by a worker.
pub struct Conn {
    pub handle: Handle,
    /// The listener's activation name, shared by its connections.
    pub listener: std::rc::Rc<str>,
    pub peer: String,
    pub peeked: Vec<u8>,
}

pub struct Worker {
    child: Option<Child>,
    pub pid: u32,
    channel: Option<Channel>,
    /// Our mapping of the page the worker counts in.
    state: Option<StatePage>,
    ready: bool,
    /// The id of the last delivery sent on this channel (ids run 1, 2, ...).
    sent: u64,
    /// The state page as last read: the id of the last delivery taken, and
    /// how many connections are finished.
    taken: u64,
    done: u64,
    /// Delivered, not yet taken, in id order: ours to hand elsewhere.
    unacked: VecDeque<(u64, Conn)>,
    /// The peeked bytes those deliveries carried.
    unacked_bytes: usize,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// The channel was shut for writing: the worker is draining.
    ended: bool,
}

pub struct Pool {
    pub name: String,
    argv: Vec<OsString>,
    path: PathBuf,
    pub workers: Vec<Worker>,
    /// Waiting for a worker: taken back from a dead one (first) or new.
    pub queue: VecDeque<Conn>,
    policy: Policy,
    turn: usize,
    /// The message being sent, reused for every delivery.
    message: Vec<u8>,
}

impl Worker {
    fn load(&self) -> u64 {
        self.unacked.len() as u64 + (self.taken - self.done)
    }

    /// Reads the state page: what the worker took since it was last read
    /// no longer needs our copy, and what it finished counts for least-busy.
    /// A page that goes backwards, claims a delivery never sent, or counts
    /// more finished than taken is the worker breaking the protocol.
    ///
    /// An impossible `taken` says nothing about what the worker really
    /// took, and a connection must never be served twice: everything sent
    /// to it then counts as taken (our copies close; a client it never got
    /// loses its connection rather than risk two servers).
    fn observe(&mut self) -> Result<(), String> {
        let Some(page) = &self.state else {
            return Ok(());
        };
        // `done` first: a connection is taken before it is finished, so
        // read in this order an honest worker never shows done > taken.
        let done = page.done();
        let taken = page.taken();
        let mut broken = None;
        let taken = if taken < self.taken || taken > self.sent {
            broken = Some(format!(
                "its state page says it took connection {taken}, but {} were sent and {} taken \
                 before",
                self.sent, self.taken
            ));
            self.sent
        } else {
            taken
        };
        self.taken = taken;
        // Taken: our copy closes here, and the worker's close alone ends
        // the connection.
        while self.unacked.front().is_some_and(|(id, _)| *id <= taken) {
            self.drop_front();
        }
        if done < self.done || done > taken {
            broken.get_or_insert(format!(
                "its state page counts {done} connections finished of {taken} taken ({} before)",
                self.done
            ));
        } else {
            self.done = done;
        }
        broken.map_or(Ok(()), Err)
    }

    /// Closes our copy of the oldest delivery not yet taken.
    fn drop_front(&mut self) {
        if let Some((_, conn)) = self.unacked.pop_front() {
            self.unacked_bytes -= conn.peeked.len();
        }
    }

    /// Room for one more delivery: fewer than MAX_UNACKED not yet taken,
    /// and their peeked bytes under MAX_UNACKED_BYTES (so that the channel
    /// buffer never fills and a send never waits on a busy worker).
    fn can_take(&self) -> bool {
        self.ready
            && !self.ended
            && self.channel.is_some()
            && self.unacked.len() < MAX_UNACKED
            && self.unacked_bytes < MAX_UNACKED_BYTES
    }

    /// Whether the process is still ours (not yet reaped): on Unix,
    /// signals the dispatcher does not handle are passed on to these.
    #[cfg_attr(windows, allow(dead_code))]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Pool {
    pub fn new(name: &str, argv: Vec<OsString>, size: usize, policy: Policy) -> Result<Pool> {
        let path = Command::new(&argv[0])
            .resolved_program()
            .with_context(|| format!("cannot run {:?}", argv[0].to_string_lossy()))?;
        let workers = (0..size)
            .map(|_| Worker {
                child: None,
                pid: 0,
                channel: None,
                state: None,
                ready: false,
                sent: 0,
                taken: 0,
                done: 0,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                started: Instant::now(),
                restart_at: Some(Instant::now()),
                backoff: FIRST_BACKOFF,
                ended: false,
            })
            .collect();
        Ok(Pool {
            name: name.to_owned(),
            argv,
            path,
            workers,
            queue: VecDeque::new(),
            policy,
            turn: 0,
            message: Vec::new(),
        })
    }

    /// Starts the worker in `slot` with two activation handles: its end of
    /// a new channel, named `handover-dispatch`, and a new state page,
    /// `handover-dispatch-state`.
    pub fn start(&mut self, slot: usize) -> Result<()> {
        let (ours, theirs) = Channel::pair()?;
        let (page, memory) = StatePage::create()?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.program_path(&self.path)
            .args(&self.argv[1..])
            .activation(Handle::from(theirs).with_name(CHANNEL_NAME))?
            .activation(Handle::from(memory).with_name(STATE_NAME))?;
        // Readiness is the dispatcher's to tell (once its workers are), and
        // the workers' stop is the end of their channel.
        cmd.env_remove("NOTIFY_SOCKET")
            .env("HANDOVER_POOL", &self.name)
            .env("HANDOVER_WORKER", slot.to_string());
        // If the dispatcher goes, so do its workers: told by SIGTERM on
        // Linux; on Windows a kill-on-close job ends them.
        #[cfg(unix)]
        {
            use handover::unix::CommandExt;
            cmd.parent_death_signal(Some(libc::SIGTERM));
        }
        #[cfg(windows)]
        {
            use handover::windows::CommandExt;
            cmd.end_with_parent(true);
        }
        let child = cmd.spawn()?;
        // Both ends of the pair name this process; the sockets sent on
        // ours must be duplicated for the worker.
        #[cfg(windows)]
        let ours = {
            use handover::windows::ChannelExt;
            let mut ours = ours;
            ours.set_peer(&child)?;
            ours
        };
        let w = &mut self.workers[slot];
        w.pid = child.id();
        tracing::info!(pool = %self.name, worker = slot, pid = w.pid, "worker started");
        w.child = Some(child);
        w.channel = Some(ours);
        w.state = Some(page);
        (w.sent, w.taken, w.done) = (0, 0, 0);
        w.ready = false;
        w.started = Instant::now();
        w.restart_at = None;
        w.ended = false;
        Ok(())
    }

    pub fn ready(&self) -> bool {
        self.workers.iter().all(|w| w.ready)
    }

    pub fn next_restart(&self) -> Option<Instant> {
        self.workers.iter().filter_map(|w| w.restart_at).min()
    }

    /// Starts the workers whose restart is due.
    pub fn restart_due(&mut self, now: Instant) {
        for slot in 0..self.workers.len() {
            if self.workers[slot].restart_at.is_some_and(|t| t <= now) {
                if let Err(e) = self.start(slot) {
                    let w = &mut self.workers[slot];
                    tracing::warn!(pool = %self.name, worker = slot, "cannot start: {e:#}");
                    w.restart_at = Some(now + w.backoff);
                    w.backoff = (w.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Every worker's channel, watched for `ready` and for its end. A
    /// ready worker sends nothing more (taking and finishing connections
    /// are counted in the state pages, read every round by `observe` and,
    /// while a delivery waits to be taken, every 1 to 64 ms), so watching
    /// it costs no wake-up until its channel ends or it breaks the rules.
    pub fn watched(&self) -> impl Iterator<Item = (usize, &Channel)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(slot, w)| Some((slot, w.channel.as_ref()?)))
    }

    /// Whether some delivery waits to be taken.
    pub fn outstanding(&self) -> bool {
        self.workers.iter().any(|w| !w.unacked.is_empty())
    }

    /// Reads every worker's state page (no system call); a worker whose
    /// page breaks the protocol is lost. Whether some worker took
    /// something since the last look.
    pub fn observe(&mut self) -> bool {
        let mut progress = false;
        for slot in 0..self.workers.len() {
            if self.workers[slot].channel.is_none() {
                continue;
            }
            let before = self.workers[slot].taken;
            match self.workers[slot].observe() {
                Ok(()) => progress |= self.workers[slot].taken != before,
                Err(why) => self.lose(slot, &why),
            }
        }
        progress
    }

    /// Reads what worker `slot` sent: `ready`, or the end of its channel.
    /// A worker whose channel broke, or that broke the protocol, is lost:
    /// see [`Pool::lose`]; one that closed its channel is let go
    /// ([`Pool::let_go`]).
    pub fn read_reports(&mut self, slot: usize) {
        // Bounded, so that a worker sending without pause cannot hold the
        // loop: what is left is read on the next round.
        for _ in 0..REPORTS_PER_ROUND {
            let w = &mut self.workers[slot];
            let Some(ch) = &w.channel else { return };
            let m = match ch.recv_timeout(Duration::ZERO) {
                Ok(Some(m)) => m,
                Err(handover::Error::TimedOut { .. }) => return,
                Ok(None) => return self.let_go(slot),
                Err(e) => return self.lose(slot, &format!("its channel failed: {e}")),
            };
            if !m.handles.is_empty() {
                return self.lose(slot, "it sent handles on its channel");
            }
            match Report::decode(&m.bytes) {
                Ok(Report::Ready { .. }) if w.ready => {
                    return self.lose(slot, "it sent a second ready");
                }
                Ok(Report::Ready { version }) if version == VERSION => {
                    tracing::info!(pool = %self.name, worker = slot, pid = w.pid, "worker ready");
                    w.ready = true;
                }
                Ok(Report::Ready { version }) => {
                    return self.lose(slot, &format!("it speaks version {version}, not {VERSION}"))
                }
                Err(e) => return self.lose(slot, &e.to_string()),
            }
        }
    }

    /// Worker `slot` closed its channel (or, draining, ended): nobody can
    /// read what is queued on it any more, so what it had not taken goes
    /// to the others now. The process is left to finish the connections
    /// it has and exit; it is restarted once reaped (unless draining).
    fn let_go(&mut self, slot: usize) {
        let name = self.name.clone();
        let w = &mut self.workers[slot];
        if !w.ended {
            tracing::info!(pool = %name, worker = slot, pid = w.pid, "worker closed its channel; it gets no more connections");
        }
        w.channel = None;
        w.ready = false;
        self.requeue(slot);
    }

    /// Worker `slot` can take no more: it gets nothing new, and the
    /// process, if still running, is killed (it is restarted once reaped).
    /// Its unacknowledged connections go to the others once it is gone for
    /// sure (`requeue`, at its exit): a process still running might yet
    /// take one, and a connection must never be served twice.
    pub fn lose(&mut self, slot: usize, why: &str) {
        let name = self.name.clone();
        let w = &mut self.workers[slot];
        if w.channel.is_none() {
            return;
        }
        if w.ended {
            tracing::debug!(pool = %name, worker = slot, pid = w.pid, "worker's channel closed: {why}");
        } else {
            tracing::warn!(pool = %name, worker = slot, pid = w.pid, unacknowledged = w.unacked.len(), "worker lost: {why}");
        }
        w.channel = None;
        w.ready = false;
        match &mut w.child {
            Some(child) if !w.ended => {
                let _ = child.kill();
            }
            Some(_) => {}
            None => self.requeue(slot),
        }
    }

    /// A lost worker's connections not taken go back to the front of the
    /// queue, in the order they were accepted. Its state page is read a
    /// last time first: what it took before it went is not handed on (a
    /// page that broke the rules counts everything sent as taken).
    fn requeue(&mut self, slot: usize) {
        let w = &mut self.workers[slot];
        let _ = w.observe();
        w.unacked_bytes = 0;
        let back = std::mem::take(&mut w.unacked);
        if back.is_empty() {
            return;
        }
        tracing::info!(pool = %self.name, worker = slot, count = back.len(), "handing the connections it had not taken to other workers");
        for (_, conn) in back.into_iter().rev() {
            self.queue.push_front(conn);
        }
    }

    /// A worker process exited: lost if it was not already, its
    /// unacknowledged connections handed on, and started again unless
    /// `draining`.
    pub fn on_exit(&mut self, slot: usize, status: std::process::ExitStatus, draining: bool) {
        self.lose(slot, &format!("it exited ({status})"));
        self.requeue(slot);
        let name = self.name.clone();
        let stranded = !self.queue.is_empty();
        let w = &mut self.workers[slot];
        w.child = None;
        // Draining, a worker is started again only for connections left
        // waiting (a dead worker's unacknowledged ones): the others may
        // all be ended already, and none may be dropped.
        if (draining && !stranded) || w.ended {
            tracing::info!(pool = %name, worker = slot, pid = w.pid, %status, "worker exited");
            return;
        }
        if w.started.elapsed() >= STABLE_AFTER {
            w.backoff = FIRST_BACKOFF;
        }
        tracing::warn!(pool = %name, worker = slot, pid = w.pid, %status, delay = ?w.backoff, "worker died; restarting");
        w.restart_at = Some(Instant::now() + w.backoff);
        w.backoff = (w.backoff * 2).min(MAX_BACKOFF);
    }

    /// Reaps whichever workers have exited.
    pub fn reap(&mut self, draining: bool) {
        for slot in 0..self.workers.len() {
            let status = match self.workers[slot].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            self.on_exit(slot, status, draining);
        }
    }

    /// Hands queued connections to workers while some can take one;
    /// whether it handed any.
    pub fn deliver(&mut self) -> bool {
        let mut any = false;
        while let Some(conn) = self.queue.pop_front() {
            let Some(slot) = self.pick() else {
                self.queue.push_front(conn);
                return any;
            };
            let id = self.workers[slot].sent + 1;
            encode_delivery(
                id,
                &conn.listener,
                &conn.peer,
                &conn.peeked,
                &mut self.message,
            );
            let w = &mut self.workers[slot];
            let Some(ch) = &w.channel else {
                self.queue.push_front(conn);
                return any;
            };
            let sent = ch.send_timeout(
                &self.message,
                std::slice::from_ref(&conn.handle),
                SEND_TIMEOUT,
            );
            match sent {
                Ok(()) => {
                    w.sent = id;
                    w.unacked_bytes += conn.peeked.len();
                    w.unacked.push_back((id, conn));
                    any = true;
                }
                Err(e) => {
                    self.queue.push_front(conn);
                    self.lose(slot, &format!("a delivery failed: {e}"));
                }
            }
        }
        any
    }

    fn pick(&mut self) -> Option<usize> {
        let n = self.workers.len();
        let candidates = (0..n)
            .map(|i| (self.turn + i) % n)
            .filter(|&i| self.workers[i].can_take());
        let chosen = match self.policy {
            Policy::RoundRobin => candidates.into_iter().next(),
            Policy::LeastBusy => candidates.min_by_key(|&i| self.workers[i].load()),
        }?;
        self.turn = (chosen + 1) % n;
        Some(chosen)
    }

    /// Draining: each worker whose every delivery is acknowledged (and to
    /// which nothing is queued) has its channel shut for writing, which
    /// ends its `incoming()`; it finishes what it has and exits. A named
    /// pipe cannot be half-closed: on Windows the channel is closed, and
    /// the worker's exit is seen by its process alone (the state page
    /// tells what it finished, and nothing more needs reading).
    pub fn end_idle(&mut self) {
        if !self.queue.is_empty() {
            return;
        }
        for w in &mut self.workers {
            if w.ended || !w.unacked.is_empty() {
                continue;
            }
            #[cfg(unix)]
            if let Some(ch) = &w.channel {
                let _ = rustix::net::shutdown(ch, rustix::net::Shutdown::Write);
            }
            #[cfg(windows)]
            {
                w.channel = None;
                w.ready = false;
            }
            w.ended = true;
            w.restart_at = None;
        }
    }

    /// Every worker has exited and no connection waits for one.
    pub fn all_exited(&self) -> bool {
        self.queue.is_empty() && self.workers.iter().all(|w| w.child.is_none())
    }

    pub fn pending(&self) -> usize {
        self.queue.len() + self.workers.iter().map(|w| w.unacked.len()).sum::<usize>()
    }

    pub fn slots(&self) -> std::ops::Range<usize> {
        0..self.workers.len()
    }
}
