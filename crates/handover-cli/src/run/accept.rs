//! Accept mode: one program per connection, like systemd's Accept=yes and
//! inetd. The connection is descriptor 3 by the activation protocol, or
//! stdin and stdout with `--inetd`.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use handover::listen::{Bound, ListenAddr, ListenSpec, UnixType};
use handover::unix::{ChildExt, CommandExt};
use handover::{Handle, HandleKind, SocketType};
use rustix::event::{poll, PollFd, PollFlags};
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
    let signals = Signals::install()?;
    become_subreaper();
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        // Nothing to wait for: every connection gets a fresh program.
        let _ = handover::notify::notify("READY=1\nSTATUS=accepting connections");
    }
    let mut running: HashSet<u32> = HashSet::new();
    let mut children = Vec::new();
    let mut stopping = None;
    loop {
        let accepting = stopping.is_none() && max.is_none_or(|m| running.len() < m);
        let mut fds = vec![PollFd::new(&signals, PollFlags::IN)];
        if accepting {
            fds.extend(bound.iter().map(|b| PollFd::new(b.handle(), PollFlags::IN)));
        }
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let ready: Vec<usize> = fds[1..]
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.revents().is_empty())
            .map(|(i, _)| i)
            .collect();
        drop(fds);

        while let Some(sig) = signals.next()? {
            match sig {
                libc::SIGCHLD => {
                    for (pid, status) in reap_all() {
                        if running.remove(&pid) {
                            tracing::debug!(pid, %status, "connection handler exited");
                            // What the handler left in its process group
                            // goes with it, as systemd does per instance.
                            // SAFETY: kill on a process group id.
                            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGTERM) };
                        }
                    }
                    children.retain(|c: &handover::Child| running.contains(&c.id()));
                }
                libc::SIGPIPE => {}
                sig => {
                    if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
                        tracing::info!(signal = %signals::name(sig), "stopping: no more connections are accepted");
                        stopping = Some(sig);
                    }
                    for c in &children {
                        let _ = c.signal(sig);
                    }
                }
            }
        }
        if stopping.is_some() && running.is_empty() {
            super::supervise::clean_up(std::process::id());
            return Ok(());
        }
        if !accepting {
            continue;
        }
        for i in ready {
            // Accept everything queued, up to the limit.
            while max.is_none_or(|m| running.len() < m) {
                let (conn, peer) =
                    match rustix::net::acceptfrom_with(bound[i].handle(), SocketFlags::CLOEXEC) {
                        Ok(c) => c,
                        Err(rustix::io::Errno::AGAIN) => break,
                        Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                        Err(e) => {
                            // EMFILE and friends: log, and try again on the
                            // next wake-up rather than spin or die.
                            tracing::warn!(error = %e, "accept failed");
                            break;
                        }
                    };
                match start(program, conn, peer, inetd) {
                    Ok(child) => {
                        running.insert(child.id());
                        children.push(child);
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "starting a connection handler failed")
                    }
                }
            }
        }
    }
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
