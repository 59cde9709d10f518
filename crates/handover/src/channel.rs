//! The blocking channel: messages of bytes and handles between two processes.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::assemble::{Arrival, Assembled, Assembler, Limits};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::outgoing::{Frames, Outbox};
use crate::sys::{self, Address, Direction, Transport};
use crate::wire;

/// What a channel end is willing to receive.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    pub(crate) accept_handles: bool,
    pub(crate) max_handles: usize,
    pub(crate) max_bytes: usize,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            accept_handles: true,
            max_handles: 4096,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl ChannelOptions {
    /// Handles accepted, up to 4096 handles and 16 MiB per message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse handles: the kernel is asked to reject them at the sender
    /// (SO_PASSRIGHTS) where it can; anything that still arrives is closed
    /// and reported as [`Error::HandlesRefused`].
    pub fn bytes_only(mut self) -> Self {
        self.accept_handles = false;
        self
    }

    /// The most handles one message may carry.
    pub fn max_handles(mut self, n: usize) -> Self {
        self.max_handles = n;
        self
    }

    /// The most payload bytes one message may carry.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            accept_handles: self.accept_handles,
            max_handles: self.max_handles,
            max_bytes: self.max_bytes,
        }
    }
}

/// One received message: its bytes and its handles, in the order sent.
#[derive(Debug, Default)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub handles: Vec<Handle>,
}

impl Message {
    #[inline]
    pub(crate) fn from_assembled(m: Assembled<Handle>) -> Message {
        Message {
            bytes: m.bytes,
            handles: m.handles,
        }
    }

    /// Takes the first handle with this name out of the message.
    pub fn take(&mut self, name: &str) -> Option<Handle> {
        let at = self.handles.iter().position(|h| h.name() == Some(name))?;
        Some(self.handles.remove(at))
    }
}

/// Who is at the other end of a channel, as the OS reports it (never as
/// the peer claims).
#[derive(Debug)]
pub struct PeerCredentials {
    pub(crate) info: sys::PeerInfo,
}

impl PeerCredentials {
    /// The peer's process id, as it was when the connection was made.
    pub fn pid(&self) -> u32 {
        self.info.pid
    }
}

/// State for receiving.
pub(crate) struct Inbox {
    buf: Vec<u8>,
    /// The handles of the frame being read, as they arrived.
    fds: Vec<Handle>,
    assembler: Assembler<Handle>,
}

impl Inbox {
    pub(crate) fn new(limits: Limits) -> Inbox {
        Inbox {
            buf: Vec::new(),
            fds: Vec::new(),
            assembler: Assembler::new(limits),
        }
    }

    /// Reads frames until a message is complete, an error occurs or the
    /// transport would block (`Ok(None)` then, with `would_block` set).
    #[inline]
    pub(crate) fn step(&mut self, transport: &Transport, nonblocking: bool) -> Step {
        if let Some(m) = self.assembler.take_ready() {
            return Step::Message(m);
        }
        if self.buf.is_empty() {
            self.buf = vec![0; wire::MAX_FRAME_LEN];
        }
        let accept = self.assembler.limits().accept_handles;
        let got = match transport.recv_frame(&mut self.buf, &mut self.fds, accept, nonblocking) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::WouldBlock,
            Err(e) => {
                return Step::Err(Error::Io {
                    op: RECV_CALL,
                    source: e,
                })
            }
        };
        if got.eof {
            return match self.assembler.end_of_stream() {
                Ok(()) => Step::Eof,
                Err(e) => Step::Err(e),
            };
        }
        let arrival = Arrival {
            frame: &self.buf[..got.len],
            handles: &mut self.fds,
            control_truncated: got.control_truncated,
            frame_truncated: got.frame_truncated,
        };
        match self.assembler.push(arrival) {
            Ok(Some(m)) => Step::Message(m),
            Ok(None) => Step::More,
            Err(e) => Step::Err(e),
        }
    }
}

pub(crate) enum Step {
    Message(Assembled<Handle>),
    More,
    WouldBlock,
    Eof,
    Err(Error),
}

/// A connected, message-oriented link between two processes. Each message
/// carries bytes and any number of handles, delivered whole or not at all.
///
/// A `Channel` may be shared between threads: sends are serialised per
/// message, and so are receives.
pub struct Channel {
    transport: Transport,
    options: ChannelOptions,
    outbox: Mutex<Outbox>,
    inbox: Mutex<Inbox>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("transport", &self.transport)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Two connected channel ends, with default options.
    pub fn pair() -> Result<(Channel, Channel)> {
        Self::pair_with(ChannelOptions::default())
    }

    /// Two connected channel ends, both with these options.
    pub fn pair_with(options: ChannelOptions) -> Result<(Channel, Channel)> {
        let (a, b) = Transport::pair().map_err(Error::io(PAIR_CALL))?;
        Ok((Channel::new(a, options.clone())?, Channel::new(b, options)?))
    }

    /// Connects to a [`ChannelListener`] bound to a filesystem path.
    pub fn connect(path: impl AsRef<Path>) -> Result<Channel> {
        Self::connect_addr(&Address::Path(path.as_ref().to_owned()), None)
    }

    /// Like [`connect`](Self::connect), giving up after `timeout` if the
    /// listener's backlog stays full.
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Channel> {
        let addr = Address::Path(path.as_ref().to_owned());
        Self::connect_addr(&addr, Some(timeout))
    }

    /// Connects to a [`ChannelListener`] bound to a name (a Linux abstract
    /// socket name; a pipe name on Windows).
    pub fn connect_name(name: &str) -> Result<Channel> {
        Self::connect_addr(&name_address(name)?, None)
    }

    /// Like [`connect_name`](Self::connect_name), giving up after `timeout`.
    pub fn connect_name_timeout(name: &str, timeout: Duration) -> Result<Channel> {
        Self::connect_addr(&name_address(name)?, Some(timeout))
    }

    pub(crate) fn connect_addr(addr: &Address, timeout: Option<Duration>) -> Result<Channel> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let t = Transport::connect(addr, deadline).map_err(|e| match (e.kind(), timeout) {
            (std::io::ErrorKind::TimedOut, Some(timeout)) => Error::TimedOut {
                op: "connect",
                timeout,
            },
            _ => Error::Io {
                op: "connect",
                source: e,
            },
        })?;
        Channel::new(t, ChannelOptions::default())
    }

    pub(crate) fn from_transport(transport: Transport) -> Channel {
        let options = ChannelOptions::default();
        Channel {
            outbox: Mutex::new(Outbox::default()),
            inbox: Mutex::new(Inbox::new(options.limits())),
            transport,
            options,
        }
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn from_parts(
        transport: Transport,
        options: ChannelOptions,
        outbox: Outbox,
        inbox: Inbox,
    ) -> Channel {
        Channel {
            transport,
            options,
            outbox: Mutex::new(outbox),
            inbox: Mutex::new(inbox),
        }
    }

    pub(crate) fn new(transport: Transport, options: ChannelOptions) -> Result<Channel> {
        let mut ch = Channel::from_transport(transport);
        ch.set_options(options)?;
        Ok(ch)
    }

    /// Changes what this end accepts. Takes effect for the next message.
    pub fn set_options(&mut self, options: ChannelOptions) -> Result<()> {
        if !options.accept_handles {
            self.transport
                .refuse_handles()
                .map_err(Error::io("setsockopt(SO_PASSRIGHTS)"))?;
        }
        *self.inbox.get_mut().unwrap_or_else(|p| p.into_inner()) = Inbox::new(options.limits());
        self.options = options;
        Ok(())
    }

    /// This end's options.
    pub fn options(&self) -> &ChannelOptions {
        &self.options
    }

    /// Sends one message, blocking until the transport takes all of it.
    /// The handles are duplicated into the peer; this process keeps its own.
    pub fn send(&self, bytes: &[u8], handles: &[Handle]) -> Result<()> {
        self.send_until(bytes, handles, None)
    }

    /// Like [`send`](Self::send), giving up with [`Error::TimedOut`] once
    /// `timeout` has passed. A message given up after its first frame is
    /// reported to the peer as abandoned when the next one starts.
    pub fn send_timeout(&self, bytes: &[u8], handles: &[Handle], timeout: Duration) -> Result<()> {
        self.send_until(bytes, handles, Some((Instant::now() + timeout, timeout)))
    }

    /// Receives one message, blocking until it is complete. `Ok(None)`
    /// means the peer closed the channel cleanly.
    pub fn recv(&self) -> Result<Option<Message>> {
        self.recv_until(None)
    }

    /// Like [`recv`](Self::recv), giving up with [`Error::TimedOut`] once
    /// `timeout` has passed. A partly received message is kept and
    /// completed by a later call.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>> {
        self.recv_until(Some((Instant::now() + timeout, timeout)))
    }

    /// The process at the other end, from SO_PEERCRED.
    pub fn peer_credentials(&self) -> Result<PeerCredentials> {
        let info = self
            .transport
            .peer()
            .map_err(Error::io("getsockopt(SO_PEERCRED)"))?;
        Ok(PeerCredentials { info })
    }

    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn transport(&self) -> &Transport {
        &self.transport
    }

    pub(crate) fn into_transport(self) -> Transport {
        self.transport
    }

    #[cfg(windows)]
    pub(crate) fn transport_mut(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// Everything a channel is, so that the async channel can carry on
    /// where this one stopped, a half-received message included.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn into_parts(self) -> (Transport, ChannelOptions, Outbox, Inbox) {
        (
            self.transport,
            self.options,
            self.outbox.into_inner().unwrap_or_else(|p| p.into_inner()),
            self.inbox.into_inner().unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn send_until(
        &self,
        bytes: &[u8],
        handles: &[Handle],
        deadline: Option<(Instant, Duration)>,
    ) -> Result<()> {
        let mut outbox = lock(&self.outbox);
        let Outbox { seq, scratch } = &mut *outbox;
        let mut frames = Frames::new(seq, bytes, handles)?;
        while let Some((payload, frame_handles)) = frames.encode_next(scratch) {
            let Some((deadline, timeout)) = deadline else {
                self.transport
                    .send_frame(scratch, payload, frame_handles, false)
                    .map_err(sys::send_error)?;
                continue;
            };
            loop {
                match self
                    .transport
                    .send_frame(scratch, payload, frame_handles, true)
                {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    other => break other.map_err(sys::send_error)?,
                }
                let ready = self
                    .transport
                    .wait(Direction::Write, Some(deadline))
                    .map_err(Error::io(WAIT_CALL))?;
                if !ready {
                    return Err(Error::TimedOut {
                        op: "send",
                        timeout,
                    });
                }
            }
        }
        Ok(())
    }

    fn recv_until(&self, deadline: Option<(Instant, Duration)>) -> Result<Option<Message>> {
        let mut inbox = lock(&self.inbox);
        loop {
            match inbox.step(&self.transport, deadline.is_some()) {
                Step::Message(m) => return Ok(Some(Message::from_assembled(m))),
                Step::More => continue,
                Step::Eof => return Ok(None),
                Step::Err(e) => return Err(e),
                Step::WouldBlock => {
                    // A deadline already passed (a zero timeout: "only what
                    // is there") needs no wait, nor its system call.
                    if let Some((at, timeout)) = deadline {
                        if at <= Instant::now() {
                            return Err(Error::TimedOut {
                                op: "receive",
                                timeout,
                            });
                        }
                    }
                    let ready = self
                        .transport
                        .wait(Direction::Read, deadline.map(|d| d.0))
                        .map_err(Error::io(WAIT_CALL))?;
                    if let (false, Some((_, timeout))) = (ready, deadline) {
                        return Err(Error::TimedOut {
                            op: "receive",
                            timeout,
                        });
                    }
                }
            }
        }
    }
}

/// The system calls that `Error::Io` names, as each platform makes them.
#[cfg(unix)]
const RECV_CALL: &str = "recvmsg";
#[cfg(windows)]
const RECV_CALL: &str = "ReadFile";
#[cfg(unix)]
const WAIT_CALL: &str = "poll";
#[cfg(windows)]
const WAIT_CALL: &str = "WaitForSingleObject";
#[cfg(unix)]
const PAIR_CALL: &str = "socketpair";
#[cfg(windows)]
const PAIR_CALL: &str = "CreateNamedPipeW";

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these states half-updated in a way
    // that matters: the assembler drops what it holds on any error.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn name_address(name: &str) -> Result<Address> {
    if name.is_empty() || name.len() > 100 || name.contains('\0') {
        return Err(Error::InvalidInput {
            what: "channel name",
            why: format!("{name:?} must be 1 to 100 bytes without NUL"),
        });
    }
    Ok(Address::Name(name.to_owned()))
}

/// Accepts channel connections on a filesystem path or a name.
#[derive(Debug)]
pub struct ChannelListener {
    listener: sys::Listener,
    options: ChannelOptions,
}

impl ChannelListener {
    /// Listens on a filesystem path. A stale socket file that nothing
    /// listens on is replaced; the file is removed when the listener drops.
    pub fn bind(path: impl AsRef<Path>) -> Result<ChannelListener> {
        let addr = Address::Path(path.as_ref().to_owned());
        Self::bind_addr(&addr)
    }

    /// Listens on a name: a Linux abstract socket name (no file), or a
    /// named pipe on Windows.
    pub fn bind_name(name: &str) -> Result<ChannelListener> {
        Self::bind_addr(&name_address(name)?)
    }

    fn bind_addr(addr: &Address) -> Result<ChannelListener> {
        let listener = sys::Listener::bind(addr).map_err(Error::io("bind"))?;
        Ok(ChannelListener {
            listener,
            options: ChannelOptions::default(),
        })
    }

    /// Options for every channel this listener accepts.
    pub fn with_options(mut self, options: ChannelOptions) -> Self {
        self.options = options;
        self
    }

    /// Waits for a peer and returns the connected channel.
    pub fn accept(&self) -> Result<Channel> {
        let t = self.listener.accept(false).map_err(Error::io("accept"))?;
        Channel::new(t, self.options.clone())
    }

    /// Like [`accept`](Self::accept), giving up after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Channel> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self
                .listener
                .wait(Some(deadline))
                .map_err(Error::io(WAIT_CALL))?
            {
                return Err(Error::TimedOut {
                    op: "accept",
                    timeout,
                });
            }
            match self.listener.accept(true) {
                Ok(t) => {
                    t.set_nonblocking(false).map_err(Error::io("fcntl"))?;
                    return Channel::new(t, self.options.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(Error::Io {
                        op: "accept",
                        source: e,
                    })
                }
            }
        }
    }

    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn sys(&self) -> &sys::Listener {
        &self.listener
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn into_parts(self) -> (sys::Listener, ChannelOptions) {
        (self.listener, self.options)
    }
}
