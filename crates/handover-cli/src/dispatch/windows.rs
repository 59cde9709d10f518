//! The Windows event loop of `handover dispatch`.
//!
//! Sockets can be waited on together (WSAPoll), named pipes and processes
//! cannot be waited on with them. So the loop waits in WSAPoll on the
//! listening sockets and the connections being peeked, never longer than
//! CHECK, and looks at the rest at most every CHECK: each worker's channel
//! (`ready`, or its end: a zero-time receive), each worker's process (a
//! zero-time wait), and the stop event that `handover run` sets instead of
//! sending SIGTERM (HANDOVER_STOP_EVENT). A connection is accepted as soon
//! as WSAPoll sees it, never a tick late; what waits for a look is a
//! worker's death or readiness and the stop, which were never faster than
//! a few milliseconds to matter.
//!
//! Per connection: accept, making it blocking again (an accepted socket
//! inherits the listener's non-blocking mode, and a duplicate shares it),
//! WSADuplicateSocketW and a pipe write, closesocket, and a share of
//! WSAPoll.
//!
//! Windows has no SO_RCVLOWAT: a connection being peeked that is still
//! undecided would be readable to WSAPoll again and again for the same
//! bytes, so after each look it is left out of the poll for REPEEK.
//!
//! Only TCP listeners can be dispatched here: a Unix-socket listener is
//! refused at the start.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::windows::io::AsRawSocket;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handover::windows::StopEvent;
use handover::{Handle, HandleKind, SocketFamily, SocketType};
use windows_sys::Win32::Networking::WinSock::{
    WSAGetLastError, WSAPoll, POLLRDNORM, SOCKET_ERROR, WSAPOLLFD,
};

use super::pool::Conn;
use super::routes::Verdict;
use super::{Core, Listening, ACCEPT_BURST, MAX_WAITING};

/// How often the workers' channels and processes and the stop event are
/// looked at, and the longest WSAPoll waits.
const CHECK: Duration = Duration::from_millis(5);
/// How long a connection being peeked, still undecided, is left out of
/// the poll after a look.
const REPEEK: Duration = Duration::from_millis(5);

/// A listening TCP socket, non-blocking.
pub(super) struct Listener(TcpListener);

/// What the loop takes before the workers start: the stop event, from
/// HANDOVER_STOP_EVENT (removed from the environment, so the workers do
/// not take it for theirs). Without one (not under `handover run`),
/// nothing asks for a drain.
pub(super) struct Os {
    stop: Option<StopEvent>,
}

impl Os {
    pub fn install() -> Result<Os> {
        let stop = StopEvent::from_env().context("the stop event")?;
        if stop.is_none() {
            tracing::debug!("no HANDOVER_STOP_EVENT: nothing will ask this dispatcher to drain");
        }
        Ok(Os { stop })
    }
}

/// A connection whose first bytes are awaited, to route it. It stays
/// non-blocking meanwhile (peeks never wait).
struct Peeking {
    stream: TcpStream,
    peer: SocketAddr,
    listener: Rc<str>,
    peeked: Vec<u8>,
    deadline: Instant,
    /// Left out of the poll until then (see REPEEK).
    quiet_until: Option<Instant>,
}

impl Peeking {
    fn into_conn(self) -> Conn {
        conn(self.stream, self.peer, self.listener, self.peeked)
    }
}

/// A connection ready for its worker: blocking again, as a worker expects
/// a connection to be (it shares the mode with our copy).
fn conn(stream: TcpStream, peer: SocketAddr, listener: Rc<str>, peeked: Vec<u8>) -> Conn {
    if let Err(e) = stream.set_nonblocking(false) {
        // The connection is most likely gone already; the worker will see.
        tracing::debug!(%peer, error = %e, "making an accepted connection blocking");
    }
    Conn {
        handle: Handle::from_accepted_tcp(stream, &peer),
        listener,
        peer: peer.to_string(),
        peeked,
    }
}

struct Dispatcher {
    core: Core,
    listeners: Vec<Listening>,
    peeking: Vec<Peeking>,
    os: Os,
    /// When the channels, processes and stop event are next looked at.
    next_check: Instant,
}

/// Runs the loop until the drain is over.
pub(super) fn serve(core: Core, listeners: Vec<Listening>, os: Os) -> Result<()> {
    let mut d = Dispatcher {
        core,
        listeners,
        peeking: Vec::new(),
        os,
        next_check: Instant::now(),
    };
    loop {
        d.step()?;
        if d.core.finished() {
            return Ok(());
        }
    }
}

pub(super) fn listener(handle: Handle) -> Result<Listener> {
    let listener = match handle.kind() {
        HandleKind::Socket(info) if info.socket_type == SocketType::Stream && info.listening => {
            if info.family == SocketFamily::Unix {
                bail!(
                    "a Unix-socket listener cannot be dispatched on Windows: only TCP \
                     listeners can"
                );
            }
            handle.into_tcp_listener()?
        }
        kind => bail!("{kind} cannot be dispatched: only listening TCP sockets can"),
    };
    listener
        .set_nonblocking(true)
        .context("making a listener non-blocking")?;
    Ok(Listener(listener))
}

/// `d` in whole milliseconds, rounded up (WSAPoll's unit), so that a wait
/// for a deadline does not end just before it and spin.
fn millis_up(d: Duration) -> i32 {
    let ms = d.as_micros().div_ceil(1000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

impl Dispatcher {
    fn waiting(&self) -> usize {
        self.peeking.len() + self.core.pending()
    }

    fn step(&mut self) -> Result<()> {
        let now = Instant::now();
        let accepting = !self.core.draining && self.waiting() < MAX_WAITING;
        let peek_deadline = self
            .peeking
            .iter()
            .map(|p| p.quiet_until.map_or(p.deadline, |q| q.min(p.deadline)))
            .min();
        let deadline = self
            .core
            .deadline(Some(
                peek_deadline.map_or(self.next_check, |d| d.min(self.next_check)),
            ))
            .unwrap_or(self.next_check);
        let wait = deadline.saturating_duration_since(now).min(CHECK);

        let mut fds: Vec<WSAPOLLFD> = Vec::new();
        let poll = |s: &dyn AsRawSocket| WSAPOLLFD {
            fd: s.as_raw_socket() as usize,
            events: POLLRDNORM,
            revents: 0,
        };
        if accepting {
            fds.extend(self.listeners.iter().map(|l| poll(&l.socket.0)));
        }
        let peek_at = fds.len();
        let mut peekers = Vec::new();
        for (i, p) in self.peeking.iter().enumerate() {
            if p.quiet_until.is_none_or(|t| t <= now) {
                fds.push(poll(&p.stream));
                peekers.push(i);
            }
        }
        if fds.is_empty() {
            // WSAPoll refuses an empty set (draining, or every listener
            // paused): just wait.
            std::thread::sleep(wait);
        } else {
            let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
            // SAFETY: `fds` is a live array of `count` WSAPOLLFD entries,
            // each naming a socket this loop owns and keeps open for the
            // call; WSAPoll writes only their `revents`.
            let rc = unsafe { WSAPoll(fds.as_mut_ptr(), count, millis_up(wait)) };
            if rc == SOCKET_ERROR {
                // SAFETY: reads this thread's last Winsock error.
                let code = unsafe { WSAGetLastError() };
                return Err(std::io::Error::from_raw_os_error(code)).context("WSAPoll");
            }
        }
        let hit = |f: &WSAPOLLFD| f.revents != 0;
        let listen_ready: Vec<usize> = (0..peek_at).filter(|&i| hit(&fds[i])).collect();
        let peek_ready: Vec<usize> = (peek_at..fds.len())
            .filter(|&i| hit(&fds[i]))
            .map(|i| peekers[i - peek_at])
            .collect();

        let now = Instant::now();
        if now >= self.next_check {
            self.next_check = now + CHECK;
            self.check();
        }
        if !self.core.draining {
            for i in listen_ready {
                self.accept_from(i);
            }
        }
        self.peek(&peek_ready);
        self.core.settle();
        Ok(())
    }

    /// What WSAPoll cannot wait on: the stop event, the workers' exits,
    /// and what their channels say (`ready`, or their end).
    fn check(&mut self) {
        if !self.core.draining && self.os.stop.as_ref().is_some_and(StopEvent::is_set) {
            self.drain();
        }
        let draining = self.core.draining;
        for pool in &mut self.core.pools {
            pool.reap(draining);
            let slots: Vec<usize> = pool.watched().map(|(slot, _)| slot).collect();
            for slot in slots {
                pool.read_reports(slot);
            }
        }
    }

    fn drain(&mut self) {
        tracing::info!("draining (stop event): no more accepts; workers finish what they have");
        self.core.draining = true;
        // Our copies of the listening sockets go: what is still in their
        // backlog is for whoever else holds them (handover run's next
        // generation), not lost with us.
        self.listeners.clear();
        // Connections not routed yet go to the default pool.
        for p in std::mem::take(&mut self.peeking) {
            self.core.pools[0].queue.push_back(p.into_conn());
        }
    }

    fn accept_from(&mut self, index: usize) {
        for _ in 0..ACCEPT_BURST {
            let l = &self.listeners[index];
            let (stream, peer) = match l.socket.0.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // WSAECONNRESET (the client gave up first), out of
                    // buffers and the like: the loop goes on.
                    tracing::warn!(listener = %l.name, error = %e, "accept failed");
                    return;
                }
            };
            let listener = l.name.clone();
            if self.core.routes.peeks() {
                self.peeking.push(Peeking {
                    stream,
                    peer,
                    listener,
                    peeked: Vec::new(),
                    deadline: Instant::now() + self.core.routes.peek_timeout,
                    quiet_until: None,
                });
            } else {
                self.core.pools[0]
                    .queue
                    .push_back(conn(stream, peer, listener, Vec::new()));
            }
        }
    }

    /// Looks at the first bytes of connections being routed, without
    /// consuming them, and moves those decided to their pool's queue.
    /// `readable` holds positions in `peeking` as it was polled (sorted);
    /// connections accepted since then come after those.
    fn peek(&mut self, readable: &[usize]) {
        if self.peeking.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut buf = vec![0u8; self.core.routes.peek_limit];
        for (index, mut p) in std::mem::take(&mut self.peeking).into_iter().enumerate() {
            let mut full = p.deadline <= now;
            let due = p.quiet_until.is_some_and(|t| t <= now);
            let looked = due || readable.binary_search(&index).is_ok();
            if looked {
                p.quiet_until = None;
                match p.stream.peek(&mut buf) {
                    Ok(n) => {
                        // 0: the client closed before saying anything; the
                        // default pool's worker sees that for itself.
                        full |= n == 0 || n >= buf.len();
                        p.peeked = buf[..n].to_vec();
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(_) => full = true,
                }
            }
            match self.core.routes.decide(&p.peeked, full) {
                Verdict::Wait => {
                    if looked {
                        p.quiet_until = Some(now + REPEEK);
                    }
                    self.peeking.push(p)
                }
                Verdict::Pool(pool) => self.core.pools[pool].queue.push_back(p.into_conn()),
            }
        }
    }
}
