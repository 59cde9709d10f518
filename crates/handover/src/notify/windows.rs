//! The sd_notify transport on Windows: a handover channel over a named
//! pipe (docs/protocol.md §14, "On Windows").
//!
//! Windows has no datagram sockets with credentials, so NOTIFY_SOCKET
//! names a pipe, `\\.\pipe\handover-notify-…`, and each notification is
//! one connection carrying one message: the same `KEY=VALUE` text, with the
//! handles to store attached as channel handles. The sender's pid comes
//! from the pipe (GetNamedPipeClientProcessId), never from the text. The
//! pipe admits only the current user (its DACL), so there is no uid.
//!
//! The supervisor answers on the same connection when the request asked
//! for an acknowledgement, and closes it once the notification is handled.
//! A sender waits for that close (or answer) before it lets go: a handle
//! travels by being pulled out of the sender's process, so the sender must
//! still be holding it when the supervisor reads the message.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::{Channel, ChannelListener, ChannelOptions};

/// Where an answer to a notification goes: the connection it came on.
pub(crate) type Sender = Channel;

/// One notification as received.
pub(crate) struct Raw {
    pub pid: u32,
    pub payload: Vec<u8>,
    pub handles: Vec<Handle>,
    pub sender: Option<Sender>,
    pub truncated: bool,
}

/// The prefix of NOTIFY_SOCKET on Windows.
const PIPE_PREFIX: &str = r"\\.\pipe\";
/// The largest notification handled, as systemd's NOTIFY_BUFFER_MAX.
const NOTIFY_BUFFER: usize = 4096;
/// The most handles one notification carries, as on Unix (SCM_MAX_FD).
const MAX_HANDLES: usize = 253;
/// How long a sender has to send its one message once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How many senders may be connected and silent at once; more are dropped.
const MAX_WAITING: usize = 64;
/// How long a fire-and-forget sender waits for the supervisor to take the
/// message before it gives up (and closes what it sent).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

fn pipe_name(target: &str) -> Result<&str> {
    target
        .strip_prefix(PIPE_PREFIX)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Error::InvalidInput {
            what: "NOTIFY_SOCKET",
            why: format!("{target:?} is not a pipe name (\\\\.\\pipe\\NAME) on Windows"),
        })
}

/// Sends one notification and waits until the supervisor has taken it.
pub(crate) fn send(target: &str, payload: &[u8], handles: &[Handle]) -> Result<()> {
    let client = Client::connect(target)?;
    let deadline = Instant::now() + SEND_TIMEOUT;
    if !client.send(payload, handles, deadline)? {
        return Err(Error::TimedOut {
            op: "send a notification",
            timeout: SEND_TIMEOUT,
        });
    }
    // The supervisor closes the connection once it has handled the
    // message (or answers, which is as good). Only then are the handles
    // surely in its hands.
    match client.0.recv_timeout(SEND_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(Error::TimedOut { .. }) => Err(Error::TimedOut {
            op: "hand a notification to the supervisor",
            timeout: SEND_TIMEOUT,
        }),
        Err(e) => Err(e),
    }
}

/// One connection to the supervisor's pipe.
pub(crate) struct Client(Channel);

impl Client {
    pub fn connect(target: &str) -> Result<Client> {
        Channel::connect_name_timeout(pipe_name(target)?, SEND_TIMEOUT).map(Client)
    }

    /// False when the deadline passed before the message went out.
    pub fn send(&self, payload: &[u8], handles: &[Handle], deadline: Instant) -> Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.0.send_timeout(payload, handles, left) {
            Ok(()) => Ok(true),
            Err(Error::TimedOut { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The answer's payload; None once the deadline has passed.
    pub fn recv(&self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.0.recv_timeout(left) {
            Ok(Some(m)) => Ok(Some(m.bytes)),
            Ok(None) => Err(Error::Io {
                op: "receive the fd store's acknowledgement",
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the supervisor closed the connection without answering",
                ),
            }),
            Err(Error::TimedOut { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The supervisor's pipe. Receiving never blocks: connections are
/// accepted and read with zero timeouts, like the control socket's
/// clients, and a sender that says nothing is dropped after
/// REQUEST_TIMEOUT.
#[derive(Debug)]
pub(crate) struct Receiver {
    listener: ChannelListener,
    address: String,
    state: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Connected senders whose message has not arrived, with their deadline.
    waiting: Vec<(Channel, Instant)>,
    ready: VecDeque<Raw>,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("pid", &self.pid)
            .field("bytes", &self.payload.len())
            .field("handles", &self.handles.len())
            .finish()
    }
}

impl Receiver {
    pub fn bind_unique() -> Result<Receiver> {
        let random = crate::sys::random_bytes::<8>()?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("handover-notify-{}-{hex}", std::process::id());
        let listener = ChannelListener::bind_name(&name)?.with_options(
            ChannelOptions::new()
                .max_bytes(NOTIFY_BUFFER)
                .max_handles(MAX_HANDLES),
        );
        Ok(Receiver {
            listener,
            address: format!("{PIPE_PREFIX}{name}"),
            state: Mutex::new(Pending::default()),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn recv(&self, keep_handles: bool) -> Result<Option<Raw>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Ok(ch) = self.listener.accept_timeout(Duration::ZERO) {
            if state.waiting.len() >= MAX_WAITING {
                tracing::warn!("notify: too many silent senders; dropping a connection");
                continue;
            }
            state.waiting.push((ch, now + REQUEST_TIMEOUT));
        }
        for (ch, deadline) in std::mem::take(&mut state.waiting) {
            match ch.recv_timeout(Duration::ZERO) {
                Ok(Some(mut m)) => {
                    let Ok(pid) = ch.peer_credentials().map(|c| c.pid()) else {
                        continue;
                    };
                    if !keep_handles {
                        m.handles.clear();
                    }
                    state.ready.push_back(Raw {
                        pid,
                        payload: m.bytes,
                        handles: m.handles,
                        sender: Some(ch),
                        truncated: false,
                    });
                }
                Err(Error::TimedOut { .. }) if deadline > now => {
                    state.waiting.push((ch, deadline));
                }
                // Over the limits: answered as a truncated datagram is on
                // Unix, with whatever arrived already closed.
                Err(Error::LimitExceeded { .. })
                | Err(Error::FrameTooLarge { .. })
                | Err(Error::HandlesRefused { .. }) => {
                    if let Ok(pid) = ch.peer_credentials().map(|c| c.pid()) {
                        state.ready.push_back(Raw {
                            pid,
                            payload: Vec::new(),
                            handles: Vec::new(),
                            sender: Some(ch),
                            truncated: true,
                        });
                    }
                }
                // Closed, silent past its deadline, or broken: dropped.
                _ => {}
            }
        }
        Ok(state.ready.pop_front())
    }

    pub fn reply(&self, to: &Sender, payload: &[u8]) -> Result<()> {
        to.send_timeout(payload, &[], Duration::from_secs(1))
    }
}
