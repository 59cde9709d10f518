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
//! Everything happens on one thread, in one poll loop: signals (signalfd),
//! notifications (NOTIFY_SOCKET), the control socket, the file watcher,
//! the fd store's hang-up watch, and deadlines.

use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use handover::listen::Bound;
use handover::notify::{self, NotifySocket, StoreReply};
use handover::unix::ChildExt;
use handover::{Channel, Child, Handle};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use serde_json::json;

use super::control::{self, Control};
use super::fdstore::FdStore;
use super::signals::{self, Signals};
use super::watch::Watcher;
use super::Program;

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
    pub stop_signal: i32,
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
/// How long what a generation leaves in its process group has after
/// SIGTERM before SIGKILL.
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
    check_pid: Option<u32>,
    next_check: Instant,
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
    signals: Signals,
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
    let signals = Signals::install()?;
    become_subreaper();
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
        signals,
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
        let _ = std::fs::remove_file(&c.path);
    }
    for &(pgid, _) in &s.leftovers {
        clean_up(pgid);
    }
    drop(s);
    signals::exit_like(status)
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
            check_pid: None,
            next_check: now,
        });
        Ok(number)
    }

    fn gen_mut(&mut self, number: u64) -> Option<&mut Generation> {
        self.gens.iter_mut().find(|g| g.number == number)
    }

    fn serving(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.state == State::Serving)
    }

    /// One round of the loop: wait for something, then handle it.
    fn step(&mut self) -> Result<()> {
        let timeout = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        let (control_ready, watch_ready, notify_ready, store_revents) = {
            let mut fds = vec![
                PollFd::new(&self.signals, PollFlags::IN),
                PollFd::new(&self.notify_socket, PollFlags::IN),
            ];
            let control_at = self.control.as_ref().map(|c| {
                let first = fds.len();
                fds.push(PollFd::new(&c.listener, PollFlags::IN));
                fds.extend(c.waiting().map(|ch| PollFd::new(ch, PollFlags::IN)));
                first..fds.len()
            });
            let watch_at = self.watcher.as_ref().map(|w| {
                fds.push(PollFd::new(w, PollFlags::IN));
                fds.len() - 1
            });
            let store_at = fds.len();
            fds.extend(self.fdstore.poll_fds());
            let ts = timeout.map(|t| Timespec {
                tv_sec: t.as_secs() as _,
                tv_nsec: t.subsec_nanos() as _,
            });
            match poll(&mut fds, ts.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
            let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
            (
                control_at.is_some_and(|r| fds[r].iter().any(|f| !f.revents().is_empty())),
                ready(watch_at),
                !fds[1].revents().is_empty(),
                fds[store_at..]
                    .iter()
                    .map(|f| f.revents())
                    .collect::<Vec<_>>(),
            )
        };
        self.fdstore.drop_hung_up(&store_revents);
        while let Some(sig) = self.signals.next()? {
            self.on_signal(sig);
        }
        if notify_ready {
            while let Some(n) = self.notify_socket.try_recv()? {
                self.on_notification(n);
            }
        }
        let control_due = self
            .control
            .as_ref()
            .and_then(Control::next_deadline)
            .is_some_and(|t| t <= Instant::now());
        if control_ready || control_due {
            let requests = self
                .control
                .as_mut()
                .map(Control::requests)
                .unwrap_or_default();
            for (ch, request) in requests {
                self.on_control(ch, &request);
            }
        }
        if watch_ready {
            if let Some(w) = &mut self.watcher {
                w.drain();
            }
        }
        self.on_time(Instant::now());
        Ok(())
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
                    Ready::Exec(_) if g.check_pid.is_none() => at(Some(g.next_check)),
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

    fn on_signal(&mut self, sig: i32) {
        match sig {
            libc::SIGCHLD => {
                for (pid, status) in reap_all() {
                    self.on_exit(pid, status);
                }
            }
            libc::SIGPIPE => {}
            libc::SIGHUP => {
                tracing::info!("SIGHUP: reload");
                self.request_reload(None);
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                if !self.shutting_down {
                    tracing::info!(signal = %signals::name(sig), "stopping");
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
                for g in &self.gens {
                    tracing::info!(signal = %signals::name(sig), pid = g.pid, "forwarding");
                    if let Err(e) = g.child.signal(sig) {
                        tracing::warn!(error = %e, "forwarding failed");
                    }
                }
            }
            sig => {
                if let Some(g) = self.serving() {
                    tracing::info!(signal = %signals::name(sig), pid = g.pid, "forwarding");
                    if let Err(e) = g.child.signal(sig) {
                        tracing::warn!(error = %e, "forwarding failed");
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, pid: u32, status: ExitStatus) {
        if let Some(g) = self.gens.iter_mut().find(|g| g.check_pid == Some(pid)) {
            g.check_pid = None;
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
        // What it left in its process group goes too.
        // SAFETY: kill with a negative pid signals the generation's group.
        unsafe { libc::kill(-(g.pid as libc::pid_t), libc::SIGTERM) };
        self.leftovers
            .push((g.pid, Instant::now() + LEFTOVER_GRACE));
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
                        "did not stop in time: SIGKILL"
                    );
                    // SAFETY: kill on the generation's process group.
                    unsafe { libc::kill(-(g.pid as libc::pid_t), libc::SIGKILL) };
                    g.stop_deadline = None;
                }
            }
            if g.ready || g.state == State::Draining {
                continue;
            }
            match &self.opts.ready {
                Ready::Delay(d) if g.started + *d <= now => ready.push(g.number),
                Ready::Exec(cmd) if g.check_pid.is_none() && g.next_check <= now => {
                    match spawn_check(cmd, g) {
                        Ok(pid) => g.check_pid = Some(pid),
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
            // SAFETY: kill on a process group that was a generation's.
            unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
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

    /// Tells a generation to stop, with `--stop-timeout` before SIGKILL.
    fn stop(&mut self, number: u64) {
        let (signal, timeout) = (self.opts.stop_signal, self.opts.stop_timeout);
        if let Some(g) = self.gen_mut(number) {
            tracing::info!(generation = number, pid = g.pid, "draining");
            g.state = State::Draining;
            g.stop_deadline = Some(Instant::now() + timeout);
            if let Err(e) = g.child.signal(signal) {
                tracing::warn!(error = %e, "stop signal failed");
            }
            if g.main_pid != g.pid {
                // SAFETY: kill on the pid the program named as its main one.
                unsafe { libc::kill(g.main_pid as libc::pid_t, signal) };
            }
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
            monotonic_usec(),
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
                // SAFETY: kill on the failed generation's process group.
                unsafe { libc::kill(-(g.pid as libc::pid_t), libc::SIGKILL) };
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

/// Runs the `--ready exec:` check for a generation: `sh -c CMD` with
/// HANDOVER_PID and HANDOVER_GENERATION set.
fn spawn_check(cmd: &str, g: &Generation) -> handover::Result<u32> {
    let mut c = handover::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("HANDOVER_PID", g.pid.to_string())
        .env("HANDOVER_GENERATION", g.number.to_string());
    let child = c.spawn()?;
    Ok(child.id())
}

fn monotonic_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// Orphans of the program are re-parented to us rather than to init, so
/// that we can reap them and none is left behind.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reaps every child that has exited.
pub fn reap_all() -> Vec<(u32, ExitStatus)> {
    use std::os::unix::process::ExitStatusExt;
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid as u32, ExitStatus::from_raw(status)));
    }
}

/// Whatever the program left behind — in its process group, or re-parented
/// to us because we are a subreaper — is asked to stop, then killed, and
/// reaped, so that handover never exits leaving an orphan.
pub fn clean_up(pgid: u32) {
    // SAFETY: kill with a negative pid signals a process group.
    unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut termed = Vec::new();
    loop {
        reap_all();
        // SAFETY: signal 0 only checks whether the group still exists.
        let group_alive = unsafe { libc::kill(-(pgid as libc::pid_t), 0) } == 0;
        let children = own_children();
        if !group_alive && children.is_empty() {
            return;
        }
        for &pid in &children {
            if !termed.contains(&pid) {
                // SAFETY: kill on a child of ours, which we have not reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                termed.push(pid);
            }
        }
        if Instant::now() >= deadline {
            // SAFETY: as above, with SIGKILL.
            unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
            for pid in own_children() {
                // SAFETY: as above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            if Instant::now() >= deadline + Duration::from_secs(2) {
                tracing::warn!("some descendants could not be reaped");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This process's children, from /proc (every thread's list).
fn own_children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}
