//! The Windows side of the supervisor.
//!
//! Windows has nothing like poll over processes, pipes and timers at once,
//! so the loop ticks: every TICK (or sooner, at a deadline) it looks at
//! each process (a zero-time wait on its handle), takes queued
//! notifications and control requests (zero-timeout accepts and reads),
//! lets the `--watch` watcher rescan (it polls, at most every 500 ms:
//! `run/watch_poll.rs`), then handles deadlines. A reload's hand-over is
//! therefore at most a tick late, which the sockets absorb: connections
//! wait in the backlog.
//!
//! A generation is told to stop through its stop event
//! (`handover::windows::StopEvent`, HANDOVER_STOP_EVENT), Windows having no
//! SIGTERM; `--stop-signal kill` ends it at once instead. Each generation
//! runs in a kill-on-close job (`Program::command_at`), so whatever it
//! started ends when its `Child` is dropped: there are no leftovers to
//! chase as on Unix.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use handover::windows::{CommandExt, StopEvent};

use super::{Generation, Supervisor};

/// How often the loop looks at everything when no deadline is nearer.
const TICK: Duration = Duration::from_millis(20);

/// Nothing is held beyond what the supervisor holds.
pub struct Os;

impl Os {
    pub fn install() -> Result<Os> {
        Ok(Os)
    }
}

/// Per generation: the event that asks it to stop.
pub type Extra = StopEvent;

/// How a generation is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// Set its stop event, then wait up to --stop-timeout.
    Event,
    /// TerminateProcess at once.
    Kill,
}

/// `--stop-signal` on Windows: `event` (or TERM, the portable default) or
/// `kill`.
pub fn parse_stop_signal(text: &str) -> Result<StopSignal> {
    match text.to_ascii_uppercase().trim_start_matches("SIG") {
        "EVENT" | "TERM" => Ok(StopSignal::Event),
        "KILL" => Ok(StopSignal::Kill),
        _ => bail!("on Windows a generation is stopped by `event` (TERM) or `kill`"),
    }
}

/// --watch polls on Windows (`run/watch_poll.rs`), rescanning from
/// `step` at most every 500 ms.
pub use crate::run::watch_poll::Watcher;

/// Gives the generation its stop event.
pub(super) fn prepare(cmd: &mut handover::Command) -> Result<Extra> {
    let event = StopEvent::new()?;
    cmd.stop_event(&event)?;
    Ok(event)
}

impl Supervisor<'_> {
    /// One round of the loop: wait a tick (or until the next deadline),
    /// then look at everything.
    pub(super) fn step(&mut self) -> Result<()> {
        let now = Instant::now();
        let wait = self
            .next_deadline()
            .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
        std::thread::sleep(wait);
        let mut exited: Vec<(u32, ExitStatus)> = Vec::new();
        for g in &mut self.gens {
            if let Some(status) = g.child.try_wait()? {
                exited.push((g.pid, status));
            }
            if let Some(check) = &mut g.check {
                if let Some(status) = check.try_wait()? {
                    exited.push((check.id(), status));
                }
            }
        }
        for (pid, status) in exited {
            self.on_exit(pid, status);
        }
        while let Some(n) = self.notify_socket.try_recv()? {
            self.on_notification(n);
        }
        let requests = self
            .control
            .as_mut()
            .map(super::Control::requests)
            .unwrap_or_default();
        for (ch, request) in requests {
            self.on_control(ch, &request);
        }
        let now = Instant::now();
        if let Some(w) = &mut self.watcher {
            w.scan(now);
        }
        self.on_time(now);
        Ok(())
    }
}

/// Asks a generation to stop.
pub(super) fn signal_stop(g: &mut Generation, how: StopSignal) {
    let done = match how {
        StopSignal::Event => g.os.set(),
        StopSignal::Kill => g.child.kill(),
    };
    if let Err(e) = done {
        tracing::warn!(error = %e, "stopping the generation failed");
    }
}

/// Ends a generation at once (TerminateProcess; its job goes when the
/// `Child` is dropped).
pub(super) fn kill_now(g: &mut Generation) {
    if let Err(e) = g.child.kill() {
        tracing::warn!(error = %e, "TerminateProcess failed");
    }
}

/// Nothing to chase: the generation's job ends what it started once its
/// `Child` is dropped.
pub(super) fn stop_leftovers(_g: &Generation) -> bool {
    false
}

/// Never called: `stop_leftovers` records nothing.
pub(super) fn kill_leftovers(_pgid: u32) {}

/// Runs the `--ready exec:` check for a generation: `cmd /C CMD` with
/// HANDOVER_PID and HANDOVER_GENERATION set.
pub(super) fn spawn_check(cmd: &str, g: &Generation) -> handover::Result<handover::Child> {
    let mut c = handover::Command::new("cmd");
    c.arg("/C")
        .arg(cmd)
        .env("HANDOVER_PID", g.pid.to_string())
        .env("HANDOVER_GENERATION", g.number.to_string())
        .end_with_parent(true);
    c.spawn()
}

/// Exits this process with the program's exit code.
pub(super) fn exit_like(status: ExitStatus) -> ! {
    std::process::exit(status.code().unwrap_or(1))
}

/// For RELOADING=1's MONOTONIC_USEC: microseconds on a monotonic clock
/// (systemd's CLOCK_MONOTONIC has no Windows counterpart that a peer would
/// compare with, so this only orders the messages).
pub(super) fn monotonic_usec() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}
