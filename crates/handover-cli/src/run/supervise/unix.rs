//! The Unix side of the supervisor: one poll loop over a signalfd, the
//! notify socket, the control socket, the file watcher and the fd store;
//! children reaped on SIGCHLD (handover is their subreaper); each
//! generation in its own process group, signalled as a group.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use handover::unix::ChildExt;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::{Generation, Supervisor};
use crate::run::control::Control;
use crate::run::signals::{self, Signals};

pub use crate::run::watch::Watcher;

/// What only the Unix supervisor holds: its signals.
pub struct Os {
    signals: Signals,
}

/// Nothing extra per generation: its process group is its pid.
pub struct Extra;

/// Nothing to add to a generation's command: the process group and the
/// parent-death signal are set by `Program::command_at`.
pub(super) fn prepare(_cmd: &mut handover::Command) -> Result<Extra> {
    Ok(Extra)
}

/// How a generation is told to stop: a signal number.
pub type StopSignal = i32;

/// `--stop-signal`: a signal name or number.
pub fn parse_stop_signal(text: &str) -> Result<StopSignal> {
    signals::parse(text)
}

impl Os {
    pub fn install() -> Result<Os> {
        let signals = Signals::install()?;
        become_subreaper();
        Ok(Os { signals })
    }
}

impl Supervisor<'_> {
    /// One round of the loop: wait for something, then handle it.
    pub(super) fn step(&mut self) -> Result<()> {
        let timeout = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        let (control_ready, watch_ready, notify_ready, store_revents) = {
            let mut fds = vec![
                PollFd::new(&self.os.signals, PollFlags::IN),
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
        while let Some(sig) = self.os.signals.next()? {
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

    pub(super) fn on_signal(&mut self, sig: i32) {
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
                self.shut_down(&signals::name(sig));
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
}

/// Sends the stop signal to a generation (and to the pid it named as its
/// main one).
pub(super) fn signal_stop(g: &mut Generation, signal: StopSignal) {
    if let Err(e) = g.child.signal(signal) {
        tracing::warn!(error = %e, "stop signal failed");
    }
    if g.main_pid != g.pid {
        // SAFETY: kill on the pid the program named as its main one.
        unsafe { libc::kill(g.main_pid as libc::pid_t, signal) };
    }
}

/// Ends a generation at once: SIGKILL to its process group.
pub(super) fn kill_now(g: &mut Generation) {
    // SAFETY: kill on the generation's process group.
    unsafe { libc::kill(-(g.pid as libc::pid_t), libc::SIGKILL) };
}

/// What an exited generation left in its process group is asked to stop;
/// the supervisor kills it after LEFTOVER_GRACE (`kill_leftovers`). False
/// when nothing is left.
pub(super) fn stop_leftovers(g: &Generation) -> bool {
    if !group_is_ours(g.pid) {
        return false;
    }
    // SAFETY: kill with a negative pid signals the generation's group,
    // which still has a member that is our child.
    unsafe { libc::kill(-(g.pid as libc::pid_t), libc::SIGTERM) };
    true
}

/// The grace is over: SIGKILL to what is left of a generation's group.
pub(super) fn kill_leftovers(pgid: u32) {
    if group_is_ours(pgid) {
        // SAFETY: kill on a process group that was a generation's and
        // still has a member that is our child.
        unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
    }
}

/// Whether process group `pgid` (a generation's, by number) still has a
/// member that is our child. Once every member is gone the number is free
/// for the system to give to an unrelated group, which must never be
/// signalled. What a generation leaves behind is re-parented to us (the
/// subreaper), so a live leftover always shows up among our children.
fn group_is_ours(pgid: u32) -> bool {
    own_children().into_iter().any(|pid| {
        rustix::process::Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::getpgid(Some(p)).ok())
            .is_some_and(|g| g.as_raw_nonzero().get() as u32 == pgid)
    })
}

/// Runs the `--ready exec:` check for a generation: `sh -c CMD` with
/// HANDOVER_PID and HANDOVER_GENERATION set.
pub(super) fn spawn_check(cmd: &str, g: &Generation) -> handover::Result<handover::Child> {
    let mut c = handover::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("HANDOVER_PID", g.pid.to_string())
        .env("HANDOVER_GENERATION", g.number.to_string());
    c.spawn()
}

/// Exits this process the way the program exited.
pub(super) fn exit_like(status: ExitStatus) -> ! {
    signals::exit_like(status)
}

pub(super) fn monotonic_usec() -> u64 {
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
    clean_up_groups(&[pgid]);
}

/// At exit: what is left of the generations' groups, and every child of
/// ours (descendants re-parented to us, in whatever group or session), is
/// stopped and reaped.
pub(super) fn clean_up_at_exit(pgids: &[u32]) {
    clean_up_groups(pgids);
}

fn clean_up_groups(pgids: &[u32]) {
    // A group is signalled only while it still has a member that is our
    // child: its number may belong to an unrelated group once it is empty.
    let ours = || -> Vec<u32> {
        pgids
            .iter()
            .copied()
            .filter(|&g| group_is_ours(g))
            .collect()
    };
    for g in ours() {
        // SAFETY: kill with a negative pid signals a process group.
        unsafe { libc::kill(-(g as libc::pid_t), libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut termed = Vec::new();
    loop {
        reap_all();
        let children = own_children();
        if children.is_empty() {
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
            for g in ours() {
                // SAFETY: as above, with SIGKILL.
                unsafe { libc::kill(-(g as libc::pid_t), libc::SIGKILL) };
            }
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
