//! Supervising a program across generations: reloads without refusing a
//! connection, readiness, rollback, crash restarts, the fd store, and
//! exiting as the program exits.
//!
//! handover keeps the listening sockets (and the fd store) for the whole
//! run, so a new generation starts on the very same sockets while the old
//! one is still serving: the kernel queues connections for whichever
//! process accepts. The old generation is told to stop only once the new
//! one is ready; if the new one is not ready in time, or exits first, it
//! is stopped and the old one keeps serving (rollback).
//!
//! Everything happens on one thread, in one loop, and the state machine
//! here is the same on every platform. How the loop waits, how a
//! generation is told to stop and how processes end is the platform's:
//! `unix.rs` (a poll loop over a signalfd, the notify socket, the control
//! socket, the file watcher and the fd store's hang-up watch; process
//! groups and signals) and `windows.rs` (a short-tick loop; stop events,
//! job objects).

use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use handover::listen::Bound;
use handover::notify::{self, NotifySocket, StoreReply};
use handover::{Channel, Child, Handle};
use serde_json::json;

use super::control::{self, Control};
use super::fdstore::FdStore;
use super::Program;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as os;
#[cfg(unix)]
pub use unix::{become_subreaper, clean_up, reap_all};
#[cfg(windows)]
mod windows;
use os::Watcher;
pub use os::{parse_stop_signal, StopSignal};
#[cfg(windows)]
use windows as os;

/// How readiness of a new generation is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// READY=1 on NOTIFY_SOCKET.
    Notify,
    /// A check command (`sh -c`) that exits 0 once the program is ready.
    Exec(String),
    /// Ready once it has run this long.
    Delay(Duration),
}

/// Whether a generation that exits on its own is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    No,
    OnFailure,
    Always,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub stop_signal: StopSignal,
    pub stop_timeout: Duration,
    pub restart: Restart,
    pub restart_max_delay: Duration,
    pub fdstore_max: usize,
    pub watch: Vec<std::path::PathBuf>,
    pub control: Option<std::path::PathBuf>,
}

/// The first delay before restarting a crashed program, doubled at each
/// crash in a row up to `--restart-max-delay`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A generation that ran this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often a failing `--ready exec:` check is tried again.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// How long what a generation leaves behind (its process group, on Unix)
/// has after SIGTERM before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Started by a reload; not serving until ready.
    Starting,
    /// The generation in charge.
    Serving,
    /// Told to stop; finishing its work.
    Draining,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Draining => "draining",
        }
    }
}

struct Generation {
    number: u64,
    child: Child,
    pid: u32,
    /// The pid the program named with MAINPID=, if any.
    main_pid: u32,
    state: State,
    ready: bool,
    started: Instant,
    started_wall: SystemTime,
    stop_deadline: Option<Instant>,
    /// The running `--ready exec:` check, and when to run the next one.
    check: Option<Child>,
    next_check: Instant,
    /// What the platform keeps per generation (its stop event, on Windows).
    #[cfg_attr(unix, allow(dead_code))]
    os: os::Extra,
}

/// A reload in progress: the generation it started and who waits for it.
struct Reload {
    generation: u64,
    deadline: Instant,
    waiters: Vec<Channel>,
}

struct Outcome {
    ok: bool,
    generation: u64,
    pid: Option<u32>,
    error: Option<String>,
    at: SystemTime,
}

struct Supervisor<'a> {
    program: &'a Program,
    opts: Options,
    listeners: Vec<Handle>,
    bound: Vec<Bound>,
    #[cfg_attr(windows, allow(dead_code))]
    os: os::Os,
    notify_socket: NotifySocket,
    control: Option<Control>,
    watcher: Option<Watcher>,
    upward: bool,
    gens: Vec<Generation>,
    next_number: u64,
    reload: Option<Reload>,
    /// Reloads asked for during one in progress: one more runs after it,
    /// and these wait for that one.
    pending: Option<Vec<Channel>>,
    fdstore: FdStore,
    restart_at: Option<Instant>,
    backoff: Duration,
    restarts: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload: Option<Outcome>,
    ready_sent: bool,
    shutting_down: bool,
    /// The status to exit with once every generation is gone.
    final_status: Option<ExitStatus>,
    leftovers: Vec<(u32, Instant)>,
    /// Learned once a generation stored descriptors while draining after
    /// its successor had started (which therefore never got them): from
    /// then on a reload stops the old generation first and starts the new
    /// one on the fd store once the old has exited. Clients wait in the
    /// backlog meanwhile; no rollback is possible then.
    sequential: bool,
    /// In a sequential reload: the generation whose exit starts the new one.
    spawn_after: Option<u64>,
}

/// Starts the program on `handles` and supervises it until it exits for
/// good; then exits this process the way the program exited.
pub fn run(
    program: &Program,
    handles: Vec<Handle>,
    bound: Vec<Bound>,
    opts: Options,
) -> Result<()> {
    let os = os::Os::install()?;
    let notify_socket = NotifySocket::bind_unique()?.keep_handles(true);
    let control = Control::bind(opts.control.as_deref())?;
    let watcher = if opts.watch.is_empty() {
        None
    } else {
        Some(Watcher::new(&opts.watch)?)
    };
    let mut s = Supervisor {
        program,
        fdstore: FdStore::new(opts.fdstore_max),
        opts,
        listeners: handles,
        bound,
        os,
        notify_socket,
        control,
        watcher,
        upward: std::env::var_os("NOTIFY_SOCKET").is_some(),
        gens: Vec::new(),
        next_number: 1,
        reload: None,
        pending: None,
        restart_at: None,
        backoff: FIRST_BACKOFF,
        restarts: 0,
        reloads_ok: 0,
        reloads_failed: 0,
        last_reload: None,
        ready_sent: false,
        shutting_down: false,
        final_status: None,
        leftovers: Vec::new(),
        sequential: false,
        spawn_after: None,
    };
    // The first start fails loudly: nothing is serving yet.
    let path = program.resolve()?;
    s.spawn(&path, State::Serving)?;
    let status = loop {
        s.step()?;
        if s.gens.is_empty() && s.restart_at.is_none() && s.reload.is_none() {
            if let Some(status) = s.final_status {
                break status;
            }
        }
    };
    if let Some(c) = &s.control {
        c.remove();
    }
    #[cfg(unix)]
    unix::clean_up_at_exit(&s.leftovers.iter().map(|&(g, _)| g).collect::<Vec<_>>());
    drop(s);
    os::exit_like(status)
}

impl Supervisor<'_> {
    /// Starts a generation on the sockets and the fd store.
    fn spawn(&mut self, path: &std::path::Path, state: State) -> Result<u64> {
        let number = self.next_number;
        let mut cmd = self.program.command_at(path);
        cmd.env("NOTIFY_SOCKET", self.notify_socket.address())
            .env("HANDOVER_GENERATION", number.to_string());
        for h in &self.listeners {
            cmd.activation(h.try_clone().context("dup")?)?;
        }
        for h in self.fdstore.handles() {
            cmd.activation(h)?;
        }
        let extra = os::prepare(&mut cmd)?;
        let child = cmd.spawn()?;
        drop(cmd);
        self.next_number += 1;
        let pid = child.id();
        tracing::info!(generation = number, pid, program = %self.program.name(), "started");
        let now = Instant::now();
        self.gens.push(Generation {
            number,
            child,
            pid,
            main_pid: pid,
            state,
            ready: false,
            started: now,
            started_wall: SystemTime::now(),
            stop_deadline: None,
            check: None,
            next_check: now,
            os: extra,
        });
        Ok(number)
    }

    fn gen_mut(&mut self, number: u64) -> Option<&mut Generation> {
        self.gens.iter_mut().find(|g| g.number == number)
    }

    fn serving(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.state == State::Serving)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut out: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                out = Some(out.map_or(t, |o| o.min(t)));
            }
        };
        at(self.restart_at);
        at(self.reload.as_ref().map(|r| r.deadline));
        at(self.watcher.as_ref().and_then(Watcher::due));
        at(self.control.as_ref().and_then(Control::next_deadline));
        for g in &self.gens {
            at(g.stop_deadline);
            if !g.ready && matches!(g.state, State::Starting | State::Serving) {
                match &self.opts.ready {
                    Ready::Delay(d) => at(Some(g.started + *d)),
                    Ready::Exec(_) if g.check.is_none() => at(Some(g.next_check)),
                    _ => {}
                }
            }
        }
        for &(_, t) in &self.leftovers {
            at(Some(t));
        }
        out
    }

    // --- events --------------------------------------------------------

    fn on_exit(&mut self, pid: u32, status: ExitStatus) {
        let is_check = |g: &&mut Generation| g.check.as_ref().is_some_and(|c| c.id() == pid);
        if let Some(g) = self.gens.iter_mut().find(is_check) {
            g.check = None;
            if status.success() {
                let number = g.number;
                self.on_ready(number);
            } else {
                g.next_check = Instant::now() + CHECK_INTERVAL;
            }
            return;
        }
        let Some(at) = self.gens.iter().position(|g| g.pid == pid) else {
            return; // an orphan of the program, reaped
        };
        let g = self.gens.remove(at);
        tracing::info!(generation = g.number, pid, %status, state = g.state.name(), "exited");
        // What it left behind goes too.
        if os::stop_leftovers(&g) {
            self.leftovers
                .push((g.pid, Instant::now() + LEFTOVER_GRACE));
        }
        match g.state {
            State::Draining => self.on_drained(&g, status),
            State::Starting => {
                self.reload_failed(
                    g.number,
                    format!("the new generation exited ({status}) before it was ready"),
                    false,
                );
            }
            State::Serving => self.on_serving_exit(&g, status),
        }
    }

    /// A generation told to stop has exited. What it stored in the fd store
    /// while draining must reach a generation: the next one in a
    /// sequential reload, else a follow-up reload (sequential from now on)
    /// when the one serving started before it was stored.
    fn on_drained(&mut self, g: &Generation, status: ExitStatus) {
        if self.spawn_after == Some(g.number) {
            self.spawn_after = None;
            if self.shutting_down {
                self.final_status = Some(status);
                if self.reload.is_some() {
                    self.reload_failed(0, "handover is stopping".into(), false);
                }
                return;
            }
            if self.reload.is_none() {
                // The reload was given up meanwhile: start one anyway.
                self.start_restart();
                return;
            }
            let started = self
                .program
                .resolve()
                .and_then(|path| self.spawn(&path, State::Starting));
            match started {
                Ok(number) => {
                    if let Some(r) = &mut self.reload {
                        r.generation = number;
                        r.deadline = Instant::now() + self.opts.ready_timeout;
                    }
                }
                Err(e) => self.reload_failed(0, format!("{e:#}"), false),
            }
            return;
        }
        let missed = self
            .fdstore
            .entries()
            .iter()
            .any(|e| e.generation == g.number)
            && self.gens.iter().any(|n| n.number > g.number);
        if missed && !self.sequential && !self.shutting_down {
            tracing::info!(
                generation = g.number,
                "it stored descriptors after its successor started: reloading again to hand \
                 them over; reloads stop the old generation first from now on"
            );
            self.sequential = true;
            self.request_reload(None);
        }
    }

    fn on_serving_exit(&mut self, g: &Generation, status: ExitStatus) {
        if self.shutting_down {
            self.final_status = Some(status);
            return;
        }
        let restart = match self.opts.restart {
            Restart::No => false,
            Restart::OnFailure => !status.success(),
            Restart::Always => true,
        };
        if self.reload.is_some() {
            // The reload's generation takes over if it becomes ready; if not,
            // this exit decides (see reload_failed).
            tracing::warn!(
                generation = g.number,
                "the serving generation exited during a reload"
            );
            self.final_status = Some(status);
            return;
        }
        if !restart {
            self.final_status = Some(status);
            self.shutting_down = true;
            return;
        }
        if g.started.elapsed() >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.restart_max_delay);
        self.restarts += 1;
        tracing::warn!(
            generation = g.number,
            %status,
            delay = ?delay,
            "restarting; the sockets stay open, clients wait in the backlog"
        );
        self.restart_at = Some(Instant::now() + delay);
        self.final_status = Some(status);
    }

    fn on_notification(&mut self, mut n: handover::notify::Notification) {
        let Some(g) = self
            .gens
            .iter()
            .find(|g| g.pid == n.pid || g.main_pid == n.pid)
        else {
            tracing::warn!(
                from = n.pid,
                "ignoring a notification from a process that is not the program"
            );
            if let Some(req) = notify::fdstore_request(&mut n) {
                let (cookie, name) = match &req {
                    Ok(r) => (r.cookie.clone(), r.name.clone()),
                    Err(r) => (r.cookie.clone(), r.name.clone()),
                };
                if let Some(cookie) = cookie {
                    let why = StoreReply::Refused("not a process handover started".into());
                    let _ = self
                        .notify_socket
                        .reply(&n, &notify::ack_reply(&cookie, &why, &name));
                }
            }
            return;
        };
        let (number, state) = (g.number, g.state);
        match notify::fdstore_request(&mut n) {
            None => {}
            Some(Ok(req)) => {
                let cookie = req.cookie.clone();
                let name = req.name.clone();
                let outcome = self.fdstore.apply(req, number);
                if let Some(cookie) = cookie {
                    let _ = self
                        .notify_socket
                        .reply(&n, &notify::ack_reply(&cookie, &outcome, &name));
                }
            }
            Some(Err(refusal)) => {
                tracing::warn!(generation = number, "fd store: refused: {refusal}");
                if let Some(cookie) = &refusal.cookie {
                    let outcome = StoreReply::Refused(refusal.reason.clone());
                    let _ = self
                        .notify_socket
                        .reply(&n, &notify::ack_reply(cookie, &outcome, &refusal.name));
                }
            }
        }
        for (key, value) in n.fields.clone() {
            match key.as_str() {
                // A program that says it is ready is, unless an explicit
                // check (exec) is what decides.
                "READY" if value == "1" && !matches!(self.opts.ready, Ready::Exec(_)) => {
                    self.on_ready(number);
                }
                "STATUS" if state == State::Serving => {
                    tracing::info!(generation = number, status = %value, "status");
                    self.send_up(&format!("STATUS={value}"));
                }
                "STOPPING" if value == "1" => {
                    tracing::info!(generation = number, "stopping");
                    // Only the generation in charge speaks for the service;
                    // a draining one stopping is part of a reload.
                    if state == State::Serving && self.reload.is_none() {
                        self.send_up("STOPPING=1");
                    }
                }
                "MAINPID" => match value.parse::<u32>() {
                    // Our own MAINPID stays ours: we are the service.
                    Ok(p) => {
                        tracing::info!(
                            generation = number,
                            main_pid = p,
                            "the program names its main pid"
                        );
                        if let Some(g) = self.gen_mut(number) {
                            g.main_pid = p;
                        }
                    }
                    Err(_) => tracing::warn!(value = %value, "ignoring a bad MAINPID"),
                },
                _ => {}
            }
        }
    }

    fn on_control(&mut self, ch: Channel, request: &str) {
        match request {
            "reload" => self.request_reload(Some(ch)),
            "status" => control::reply(&ch, &self.status_json()),
            other => control::reply(
                &ch,
                &json!({"ok": false, "error": format!("unknown request {other:?}")}),
            ),
        }
    }

    fn on_time(&mut self, now: Instant) {
        if self.restart_at.is_some_and(|t| t <= now) {
            self.restart_at = None;
            self.start_restart();
        }
        if self.watcher.as_mut().is_some_and(|w| w.take_due(now)) {
            tracing::info!("a watched path changed: reload");
            self.request_reload(None);
        }
        if let Some(r) = &self.reload {
            if r.deadline <= now {
                let generation = r.generation;
                let why = format!(
                    "the new generation was not ready within {:?} (--ready-timeout)",
                    self.opts.ready_timeout
                );
                self.reload_failed(generation, why, true);
            }
        }
        let mut ready = Vec::new();
        for g in &mut self.gens {
            if let Some(deadline) = g.stop_deadline {
                if deadline <= now {
                    tracing::warn!(
                        generation = g.number,
                        pid = g.pid,
                        "did not stop in time: killed"
                    );
                    os::kill_now(g);
                    g.stop_deadline = None;
                }
            }
            if g.ready || g.state == State::Draining {
                continue;
            }
            match &self.opts.ready {
                Ready::Delay(d) if g.started + *d <= now => ready.push(g.number),
                Ready::Exec(cmd) if g.check.is_none() && g.next_check <= now => {
                    match os::spawn_check(cmd, g) {
                        Ok(child) => g.check = Some(child),
                        Err(e) => {
                            tracing::warn!(error = %e, "--ready exec: cannot run the check");
                            g.next_check = now + CHECK_INTERVAL;
                        }
                    }
                }
                _ => {}
            }
        }
        for number in ready {
            self.on_ready(number);
        }
        self.leftovers.retain(|&(pgid, deadline)| {
            if deadline > now {
                return true;
            }
            os::kill_leftovers(pgid);
            false
        });
    }

    // --- readiness and reloads -------------------------------------------

    fn on_ready(&mut self, number: u64) {
        let Some(g) = self.gen_mut(number) else {
            return;
        };
        if g.ready {
            return;
        }
        g.ready = true;
        let (pid, state) = (g.pid, g.state);
        tracing::info!(generation = number, pid, "ready");
        if state == State::Serving {
            if !self.ready_sent {
                self.send_up(&format!("READY=1\nSTATUS=running {}", self.program.name()));
                self.ready_sent = true;
            }
            return;
        }
        // A reload's generation is ready: it takes over, the old one drains.
        let old: Vec<u64> = self
            .gens
            .iter()
            .filter(|g| g.state == State::Serving)
            .map(|g| g.number)
            .collect();
        if let Some(g) = self.gen_mut(number) {
            g.state = State::Serving;
        }
        for o in old {
            self.stop(o);
        }
        self.final_status = None;
        let reload = self.reload.take();
        self.reloads_ok += 1;
        self.last_reload = Some(Outcome {
            ok: true,
            generation: number,
            pid: Some(pid),
            error: None,
            at: SystemTime::now(),
        });
        let answer = json!({"ok": true, "generation": number, "pid": pid});
        for w in reload.map(|r| r.waiters).unwrap_or_default() {
            control::reply(&w, &answer);
        }
        self.send_up(&format!(
            "READY=1\nSTATUS=running {} (generation {number})",
            self.program.name()
        ));
        self.ready_sent = true;
        self.start_pending();
    }

    /// Tells a generation to stop, with `--stop-timeout` before it is
    /// killed.
    fn stop(&mut self, number: u64) {
        let timeout = self.opts.stop_timeout;
        let how = self.opts.stop_signal;
        let Some(g) = self.gen_mut(number) else {
            return;
        };
        tracing::info!(generation = number, pid = g.pid, "draining");
        g.state = State::Draining;
        g.stop_deadline = Some(Instant::now() + timeout);
        os::signal_stop(g, how);
    }

    /// handover itself is asked to stop: no more restarts or reloads; the
    /// platform tells the generations. (On Windows nothing asks yet: a
    /// killed handover takes the program with it through its job.)
    #[cfg_attr(windows, allow(dead_code))]
    fn shut_down(&mut self, why: &str) {
        if !self.shutting_down {
            tracing::info!(reason = why, "stopping");
            self.send_up("STOPPING=1");
        }
        self.shutting_down = true;
        self.restart_at = None;
        for waiter in self.pending.take().unwrap_or_default() {
            control::reply(
                &waiter,
                &json!({"ok": false, "error": "handover is stopping"}),
            );
        }
    }

    fn request_reload(&mut self, waiter: Option<Channel>) {
        if self.shutting_down {
            if let Some(w) = waiter {
                control::reply(&w, &json!({"ok": false, "error": "handover is stopping"}));
            }
            return;
        }
        if self.reload.is_some() {
            // Coalesced: one more reload runs after this one, for everyone
            // who asked meanwhile.
            let pending = self.pending.get_or_insert_with(Vec::new);
            pending.extend(waiter);
            tracing::info!("a reload is in progress; another will follow it");
            return;
        }
        self.start_reload(waiter.into_iter().collect());
    }

    fn start_pending(&mut self) {
        if let Some(waiters) = self.pending.take() {
            self.start_reload(waiters);
        }
    }

    fn start_reload(&mut self, waiters: Vec<Channel>) {
        self.send_up(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading {}",
            os::monotonic_usec(),
            self.program.name()
        ));
        if self.sequential {
            let old: Vec<u64> = self
                .gens
                .iter()
                .filter(|g| g.state == State::Serving)
                .map(|g| g.number)
                .collect();
            if let Some(&last) = old.last() {
                for o in old {
                    self.stop(o);
                }
                self.restart_at = None;
                self.spawn_after = Some(last);
                self.reload = Some(Reload {
                    generation: 0,
                    deadline: Instant::now() + self.opts.stop_timeout + self.opts.ready_timeout,
                    waiters,
                });
                return;
            }
        }
        // A new binary at the same name is picked up.
        let started = self
            .program
            .resolve()
            .and_then(|path| self.spawn(&path, State::Starting));
        match started {
            Ok(number) => {
                self.restart_at = None;
                self.reload = Some(Reload {
                    generation: number,
                    deadline: Instant::now() + self.opts.ready_timeout,
                    waiters,
                });
            }
            Err(e) => {
                self.reload = Some(Reload {
                    generation: 0,
                    deadline: Instant::now(),
                    waiters,
                });
                self.reload_failed(0, format!("{e:#}"), false);
            }
        }
    }

    /// Rolls a reload back: its generation (if any, and `kill`) is stopped,
    /// the old one keeps serving, and whoever asked is told why.
    fn reload_failed(&mut self, number: u64, why: String, kill: bool) {
        tracing::warn!(
            generation = number,
            "reload failed: {why}; the old generation keeps serving"
        );
        if kill {
            if let Some(g) = self.gen_mut(number) {
                g.state = State::Draining;
                g.stop_deadline = None;
                os::kill_now(g);
            }
        }
        let waiters = match self.reload.take() {
            Some(r) if r.generation == number => r.waiters,
            Some(r) => {
                self.reload = Some(r);
                Vec::new()
            }
            None => Vec::new(),
        };
        self.reloads_failed += 1;
        self.last_reload = Some(Outcome {
            ok: false,
            generation: number,
            pid: None,
            error: Some(why.clone()),
            at: SystemTime::now(),
        });
        let answer = json!({"ok": false, "generation": number, "error": why});
        for w in waiters {
            control::reply(&w, &answer);
        }
        self.send_up("READY=1");
        if self.serving().is_none() && !self.shutting_down {
            // Nothing serves: the old generation died during the reload.
            if let Some(status) = self.final_status {
                let restart = match self.opts.restart {
                    Restart::No => false,
                    Restart::OnFailure => !status.success(),
                    Restart::Always => true,
                };
                if restart {
                    self.restarts += 1;
                    self.restart_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(self.opts.restart_max_delay);
                } else {
                    self.shutting_down = true;
                }
            } else if self.spawn_after.is_none() {
                // A sequential reload failed: the old generation was
                // stopped on purpose, so a new one is started as after a
                // crash.
                self.restarts += 1;
                self.restart_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(self.opts.restart_max_delay);
            }
            return;
        }
        self.start_pending();
    }

    fn start_restart(&mut self) {
        if self.shutting_down {
            return;
        }
        let started = self
            .program
            .resolve()
            .and_then(|path| self.spawn(&path, State::Serving));
        if let Err(e) = started {
            tracing::warn!("restart failed: {e:#}");
            self.restart_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(self.opts.restart_max_delay);
        }
    }

    fn send_up(&self, state: &str) {
        if !self.upward {
            return;
        }
        if let Err(e) = notify::notify(state) {
            tracing::warn!(error = %e, "telling our own supervisor failed");
        }
    }

    // --- status ------------------------------------------------------------

    fn status_json(&self) -> serde_json::Value {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        json!({
            "ok": true,
            "supervisor_pid": std::process::id(),
            "program": self.program.name(),
            "generations": self.gens.iter().map(|g| json!({
                "generation": g.number,
                "pid": g.pid,
                "state": g.state.name(),
                "ready": g.ready,
                "started_unix": unix(g.started_wall),
                "uptime_secs": g.started.elapsed().as_secs(),
            })).collect::<Vec<_>>(),
            "sockets": self.bound.iter().map(|b| json!({
                "name": b.handle().name().unwrap_or("unknown"),
                "address": b.local(),
            })).collect::<Vec<_>>(),
            "fdstore": self.fdstore.entries().iter().map(|e| json!({
                "name": e.name(),
                "kind": format!("{:?}", e.handle.kind()),
                "generation": e.generation,
                "stored_unix": unix(e.stored_at),
                "poll": e.poll,
            })).collect::<Vec<_>>(),
            "fdstore_max": self.opts.fdstore_max,
            "restarts": self.restarts,
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed},
            "reload_in_progress": self.reload.is_some(),
            "last_reload": self.last_reload.as_ref().map(|o| json!({
                "ok": o.ok,
                "generation": o.generation,
                "pid": o.pid,
                "error": o.error,
                "at_unix": unix(o.at),
            })),
        })
    }
}
