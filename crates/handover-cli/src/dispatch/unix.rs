//! The Unix event loop of `handover dispatch`: one poll over the
//! signalfd, the listening sockets (TCP and Unix), the connections being
//! peeked for routing (SO_RCVLOWAT raised past what was peeked, so that
//! poll wakes only for more), and every worker's channel. Per connection:
//! accept4, sendmsg, close, and a share of ppoll.

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handover::unix::HandleExt;
use handover::{Handle, HandleKind, SocketFamily, SocketType};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::pool::Conn;
use super::routes::Verdict;
use super::{Core, Listening, ACCEPT_BURST, MAX_WAITING};
use crate::run::signals::{self, Signals};

/// What the loop takes before the workers start: the signals, blocked
/// and read from a signalfd.
pub(super) type Os = Signals;

/// Runs the loop until the drain is over.
pub(super) fn serve(core: Core, listeners: Vec<Listening>, signals: Signals) -> Result<()> {
    let mut d = Dispatcher {
        core,
        listeners,
        peeking: Vec::new(),
        signals,
    };
    loop {
        d.step()?;
        if d.core.finished() {
            return Ok(());
        }
    }
}

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection whose first bytes are awaited, to route it.
struct Peeking {
    conn: Conn,
    deadline: Instant,
    /// A TCP connection: once bytes are peeked, its SO_RCVLOWAT is raised
    /// above them, so that poll wakes only for more bytes or the peer's
    /// close, not again and again for the same ones.
    tcp: bool,
    /// SO_RCVLOWAT was raised: it is put back before a worker gets it.
    lowat: bool,
    /// A Unix connection woken with nothing new (its poll ignores
    /// SO_RCVLOWAT): not polled again before this.
    quiet_until: Option<Instant>,
}

/// How often a Unix connection with part of a head is peeked again.
const UNIX_REPEEK: Duration = Duration::from_millis(10);

impl Peeking {
    /// The connection, its SO_RCVLOWAT back to 1 for the worker's reads.
    fn into_conn(self) -> Conn {
        if self.lowat {
            if let Err(e) = set_rcvlowat(&self.conn.handle, 1) {
                tracing::warn!(error = %e, "resetting SO_RCVLOWAT");
            }
        }
        self.conn
    }
}

/// Sets SO_RCVLOWAT: readable (for poll, on TCP) once this many bytes are.
fn set_rcvlowat(socket: &impl AsFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on an open descriptor, reading one c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

struct Dispatcher {
    core: Core,
    listeners: Vec<Listening>,
    peeking: Vec<Peeking>,
    signals: Signals,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

pub(super) fn listener(handle: Handle) -> Result<Listener> {
    let socket = match handle.kind() {
        HandleKind::Socket(info) if info.socket_type == SocketType::Stream && info.listening => {
            if info.family == SocketFamily::Unix {
                Listener::Unix(handle.into_unix_listener()?)
            } else {
                Listener::Tcp(handle.into_tcp_listener()?)
            }
        }
        kind => bail!("{kind} cannot be dispatched: only listening stream sockets can"),
    };
    match &socket {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l) => l.set_nonblocking(true),
    }
    .context("making a listener non-blocking")?;
    Ok(socket)
}

impl Dispatcher {
    fn waiting(&self) -> usize {
        self.peeking.len() + self.core.pending()
    }

    fn step(&mut self) -> Result<()> {
        let accepting = !self.core.draining && self.waiting() < MAX_WAITING;
        let deadline = self.core.deadline(
            self.peeking
                .iter()
                .map(|p| p.quiet_until.map_or(p.deadline, |q| q.min(p.deadline)))
                .min(),
        );
        let (signal_ready, listen_ready, peek_ready, worker_ready) = {
            let mut fds = vec![PollFd::new(&self.signals, PollFlags::IN)];
            let listen_at = fds.len();
            if accepting {
                fds.extend(
                    self.listeners
                        .iter()
                        .map(|l| PollFd::new(&l.socket, PollFlags::IN)),
                );
            }
            let peek_at = fds.len();
            let now = Instant::now();
            let mut peekers = Vec::new();
            for (i, p) in self.peeking.iter().enumerate() {
                if p.quiet_until.is_none_or(|t| t <= now) {
                    fds.push(PollFd::new(&p.conn.handle, PollFlags::IN));
                    peekers.push(i);
                }
            }
            let worker_at = fds.len();
            let mut owners = Vec::new();
            for (pi, pool) in self.core.pools.iter().enumerate() {
                for (slot, ch) in pool.watched() {
                    fds.push(PollFd::new(ch, PollFlags::IN));
                    owners.push((pi, slot));
                }
            }
            let timeout = deadline.map(|d| {
                let t = d.saturating_duration_since(Instant::now());
                Timespec {
                    tv_sec: t.as_secs() as _,
                    tv_nsec: t.subsec_nanos() as _,
                }
            });
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
            let hit = |f: &PollFd| !f.revents().is_empty();
            (
                hit(&fds[0]),
                (listen_at..peek_at)
                    .filter(|&i| hit(&fds[i]))
                    .map(|i| i - listen_at)
                    .collect::<Vec<_>>(),
                (peek_at..worker_at)
                    .filter(|&i| hit(&fds[i]))
                    .map(|i| peekers[i - peek_at])
                    .collect::<Vec<_>>(),
                (worker_at..fds.len())
                    .filter(|&i| hit(&fds[i]))
                    .map(|i| owners[i - worker_at])
                    .collect::<Vec<_>>(),
            )
        };
        // Only when poll says so: a read per loop would be a failed
        // system call per connection under load.
        if signal_ready {
            while let Some(sig) = self.signals.next()? {
                self.on_signal(sig);
            }
        }
        for (pi, slot) in worker_ready {
            self.core.pools[pi].read_reports(slot);
        }
        for i in listen_ready {
            self.accept_from(i);
        }
        self.peek(&peek_ready);
        self.core.settle();
        Ok(())
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            libc::SIGCHLD => {
                for pool in &mut self.core.pools {
                    pool.reap(self.core.draining);
                }
                // What the workers left (re-parented to a subreaper above
                // us, or to init) is not ours to reap.
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT if !self.core.draining => {
                tracing::info!(signal = %signals::name(sig), "draining: no more accepts; workers finish what they have");
                self.core.draining = true;
                // Our copies of the listening sockets go: what is still in
                // their backlog is for whoever else holds them (handover
                // run's next generation), not lost with us.
                self.listeners.clear();
                // Connections not routed yet go to the default pool.
                for p in std::mem::take(&mut self.peeking) {
                    self.core.pools[0].queue.push_back(p.into_conn());
                }
            }
            libc::SIGPIPE | libc::SIGHUP => {}
            sig => {
                for pool in &self.core.pools {
                    for w in pool.workers.iter().filter(|w| w.is_running()) {
                        // SAFETY: kill on a worker of ours that has not been
                        // reaped (its Child is still held).
                        unsafe { libc::kill(w.pid as libc::pid_t, sig) };
                    }
                }
            }
        }
    }

    fn accept_from(&mut self, index: usize) {
        for _ in 0..ACCEPT_BURST {
            let l = &self.listeners[index];
            let accepted = match &l.socket {
                Listener::Tcp(s) => s
                    .accept()
                    .map(|(c, peer)| (Handle::from_accepted_tcp(c, &peer), peer.to_string())),
                Listener::Unix(s) => s.accept().map(|(c, _)| (Handle::from(c), String::new())),
            };
            let (handle, peer) = match accepted {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED, EMFILE and the like: this connection
                    // is lost to the kernel or we are out of descriptors;
                    // the loop goes on.
                    tracing::warn!(listener = %l.name, error = %e, "accept failed");
                    return;
                }
            };
            let conn = Conn {
                handle,
                listener: l.name.clone(),
                peer,
                peeked: Vec::new(),
            };
            if self.core.routes.peeks() {
                self.peeking.push(Peeking {
                    conn,
                    deadline: Instant::now() + self.core.routes.peek_timeout,
                    tcp: matches!(l.socket, Listener::Tcp(_)),
                    lowat: false,
                    quiet_until: None,
                });
            } else {
                self.core.pools[0].queue.push_back(conn);
            }
        }
    }

    /// Looks at the first bytes of connections being routed, without
    /// consuming them, and moves those decided to their pool's queue.
    /// `readable` holds positions in `peeking` as it was polled (sorted);
    /// connections accepted since then come after those.
    fn peek(&mut self, readable: &[usize]) {
        let now = Instant::now();
        let mut buf = vec![0u8; self.core.routes.peek_limit];
        for (index, mut p) in std::mem::take(&mut self.peeking).into_iter().enumerate() {
            let mut full = p.deadline <= now;
            let due = p.quiet_until.is_some_and(|t| t <= now);
            if due || readable.binary_search(&index).is_ok() {
                p.quiet_until = None;
                let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                match rustix::net::recv(&p.conn.handle, &mut buf, flags) {
                    Ok((n, _)) => {
                        // 0: the client closed before saying anything; the
                        // default pool's worker sees that for itself.
                        full |= n == 0 || n >= buf.len();
                        if n == p.conn.peeked.len() {
                            if p.lowat {
                                // Woken with nothing new past SO_RCVLOWAT:
                                // the peer closed; no more will come.
                                full = true;
                            } else if !p.tcp {
                                p.quiet_until = Some(now + UNIX_REPEEK);
                            }
                        }
                        p.conn.peeked = buf[..n].to_vec();
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(_) => full = true,
                }
            }
            match self.core.routes.decide(&p.conn.peeked, full) {
                Verdict::Wait => {
                    if p.tcp {
                        let more = p.conn.peeked.len() + 1;
                        p.lowat = set_rcvlowat(&p.conn.handle, more).is_ok() || p.lowat;
                    }
                    self.peeking.push(p)
                }
                Verdict::Pool(pool) => self.core.pools[pool].queue.push_back(p.into_conn()),
            }
        }
    }
}
