//! Supervising one program: forward signals, follow its sd_notify messages,
//! pass readiness up to our own supervisor, and exit as it exits.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use handover::listen::Bound;
use handover::notify::{self, NotifySocket};
use handover::unix::ChildExt;
use handover::Handle;
use rustix::event::{poll, PollFd, PollFlags};

use super::signals::{self, Signals};
use super::Program;

/// Starts the program on `handles` and supervises it until it exits; then
/// exits this process the way the program exited.
pub fn run(program: &Program, handles: Vec<Handle>, bound: Vec<Bound>) -> Result<()> {
    let signals = Signals::install()?;
    become_subreaper();
    let notify_socket = NotifySocket::bind_unique()?;
    let upward = std::env::var_os("NOTIFY_SOCKET").is_some();

    let mut cmd = program.command();
    cmd.env("NOTIFY_SOCKET", notify_socket.address());
    for h in handles {
        cmd.activation(h)?;
    }
    let child = cmd.spawn()?;
    // The sockets stay open here as well: they are ours to keep across
    // restarts, and the kernel keeps queueing connections even while no
    // program is accepting.
    drop(cmd);
    let pid = child.id();
    tracing::info!(pid, program = %program.name(), "started");

    let mut main_pid = pid;
    let mut ready_sent = false;
    let status = loop {
        let mut fds = [
            PollFd::new(&signals, PollFlags::IN),
            PollFd::new(&notify_socket, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let mut exited = None;
        while let Some(sig) = signals.next()? {
            match sig {
                libc::SIGCHLD => {
                    for (reaped, status) in reap_all() {
                        if reaped == pid {
                            exited = Some(status);
                        }
                    }
                }
                libc::SIGPIPE => {}
                sig => {
                    tracing::info!(signal = %signals::name(sig), pid, "forwarding");
                    if let Err(e) = child.signal(sig) {
                        tracing::warn!(error = %e, "forwarding {} failed", signals::name(sig));
                    }
                }
            }
        }
        while let Some(n) = notify_socket.try_recv()? {
            if n.pid != pid && n.pid != main_pid {
                tracing::warn!(
                    from = n.pid,
                    "ignoring a notification from a process that is not the program"
                );
                continue;
            }
            for (key, value) in &n.fields {
                match key.as_str() {
                    "READY" if value == "1" => {
                        tracing::info!(pid, "ready");
                        if upward && !ready_sent {
                            send_up(&format!("READY=1\nSTATUS=running {}", program.name()));
                            ready_sent = true;
                        }
                    }
                    "STATUS" => {
                        tracing::info!(pid, status = %value, "status");
                        if upward {
                            send_up(&format!("STATUS={value}"));
                        }
                    }
                    "STOPPING" if value == "1" => {
                        tracing::info!(pid, "stopping");
                        if upward {
                            send_up("STOPPING=1");
                        }
                    }
                    "MAINPID" => match value.parse::<u32>() {
                        // Our own MAINPID stays ours: we are the service.
                        Ok(p) => {
                            tracing::info!(pid, main_pid = p, "the program names its main pid");
                            main_pid = p;
                        }
                        Err(_) => tracing::warn!(value = %value, "ignoring a bad MAINPID"),
                    },
                    _ => {}
                }
            }
        }
        if let Some(status) = exited {
            break status;
        }
    };
    tracing::info!(pid, %status, "exited");
    clean_up(pid);
    drop(bound);
    signals::exit_like(status)
}

fn send_up(state: &str) {
    if let Err(e) = notify::notify(state) {
        tracing::warn!(error = %e, "telling our own supervisor failed");
    }
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
