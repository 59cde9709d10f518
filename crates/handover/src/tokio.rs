//! The async channel, on tokio's reactor (cargo feature `tokio`).
//!
//! [`AsyncChannel`] speaks the same wire format as [`Channel`] and shares
//! its framing and reassembly code; only waiting differs. For a deadline,
//! wrap a call in `tokio::time::timeout`.
//!
//! Cancellation: dropping a `recv` future loses nothing, because a
//! half-received message stays in the channel and a later `recv` completes
//! it. Dropping a `send` future after its first frame of a multi-frame
//! message leaves that message incomplete; the peer reports it as abandoned
//! when the next message starts.

use std::path::Path;

use ::tokio::io::unix::AsyncFd;
use ::tokio::sync::Mutex;

use crate::channel::{name_address, Inbox, Step};
use crate::error::{Error, Result};
use crate::outgoing::{Frames, Outbox};
use crate::sys::{self, Address, Transport};
use crate::{Channel, ChannelListener, ChannelOptions, Handle, Message, PeerCredentials};

/// A [`Channel`] for async code.
pub struct AsyncChannel {
    io: AsyncFd<Transport>,
    options: ChannelOptions,
    outbox: Mutex<Outbox>,
    inbox: Mutex<Inbox>,
}

impl std::fmt::Debug for AsyncChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannel")
            .field("transport", self.io.get_ref())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl AsyncChannel {
    /// Two connected ends. Must be called within a tokio runtime.
    pub fn pair() -> Result<(AsyncChannel, AsyncChannel)> {
        let (a, b) = Channel::pair()?;
        Ok((AsyncChannel::try_from(a)?, AsyncChannel::try_from(b)?))
    }

    /// Connects to a listener on a filesystem path.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncChannel> {
        Self::connect_addr(Address::Path(path.as_ref().to_owned())).await
    }

    /// Connects to a listener bound to a name.
    pub async fn connect_name(name: &str) -> Result<AsyncChannel> {
        Self::connect_addr(name_address(name)?).await
    }

    async fn connect_addr(addr: Address) -> Result<AsyncChannel> {
        // A Unix-socket connect completes or fails at once, except while
        // the listener's backlog is full; then wait off the reactor.
        let ch = ::tokio::task::spawn_blocking(move || Channel::connect_addr(&addr, None))
            .await
            .map_err(|e| Error::Io {
                op: "connect",
                source: std::io::Error::other(e),
            })??;
        AsyncChannel::try_from(ch)
    }

    /// Sends one message. See [`Channel::send`].
    pub async fn send(&self, bytes: &[u8], handles: &[Handle]) -> Result<()> {
        let mut outbox = self.outbox.lock().await;
        let Outbox { seq, scratch } = &mut *outbox;
        let mut frames = Frames::new(seq, bytes, handles)?;
        while let Some((payload, frame_handles)) = frames.encode_next(scratch) {
            loop {
                let mut guard = self.io.writable().await.map_err(Error::io("poll"))?;
                let sent = guard.try_io(|t| {
                    t.get_ref()
                        .send_frame(scratch, payload, frame_handles, true)
                });
                match sent {
                    Ok(result) => {
                        result.map_err(sys::send_error)?;
                        break;
                    }
                    Err(_would_block) => continue,
                }
            }
        }
        Ok(())
    }

    /// Receives one message; `Ok(None)` when the peer closed cleanly.
    pub async fn recv(&self) -> Result<Option<Message>> {
        let mut inbox = self.inbox.lock().await;
        loop {
            let mut guard = self.io.readable().await.map_err(Error::io("poll"))?;
            loop {
                match inbox.step(self.io.get_ref(), true) {
                    Step::Message(m) => return Ok(Some(Message::from_assembled(m))),
                    Step::More => continue,
                    Step::Eof => return Ok(None),
                    Step::Err(e) => return Err(e),
                    Step::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                }
            }
        }
    }

    /// The process at the other end. See [`Channel::peer_credentials`].
    pub fn peer_credentials(&self) -> Result<PeerCredentials> {
        let info = self
            .io
            .get_ref()
            .peer()
            .map_err(Error::io("getsockopt(SO_PEERCRED)"))?;
        Ok(PeerCredentials { info })
    }

    /// Back to a blocking channel, keeping any half-received message.
    pub fn into_channel(self) -> Result<Channel> {
        let transport = self.io.into_inner();
        transport
            .set_nonblocking(false)
            .map_err(Error::io("ioctl(FIONBIO)"))?;
        Ok(Channel::from_parts(
            transport,
            self.options,
            self.outbox.into_inner(),
            self.inbox.into_inner(),
        ))
    }
}

impl TryFrom<Channel> for AsyncChannel {
    type Error = Error;

    /// Registers a channel with the current tokio runtime.
    fn try_from(ch: Channel) -> Result<AsyncChannel> {
        let (transport, options, outbox, inbox) = ch.into_parts();
        transport
            .set_nonblocking(true)
            .map_err(Error::io("ioctl(FIONBIO)"))?;
        Ok(AsyncChannel {
            io: register(transport)?,
            options,
            outbox: Mutex::new(outbox),
            inbox: Mutex::new(inbox),
        })
    }
}

/// Registers an owned socket with the current runtime's reactor.
fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor (an OwnedFd inside) and never
    // replaces it, so the descriptor stays open and the same until the
    // AsyncFd is dropped or `into_inner` hands `inner` back.
    unsafe { AsyncFd::register(inner) }.map_err(|e| Error::Io {
        op: "register with tokio",
        source: std::io::Error::from(e),
    })
}

/// A [`ChannelListener`] for async code.
pub struct AsyncChannelListener {
    io: AsyncFd<sys::Listener>,
    options: ChannelOptions,
}

impl AsyncChannelListener {
    /// Listens on a filesystem path. See [`ChannelListener::bind`].
    pub fn bind(path: impl AsRef<Path>) -> Result<AsyncChannelListener> {
        AsyncChannelListener::try_from(ChannelListener::bind(path)?)
    }

    /// Listens on a name. See [`ChannelListener::bind_name`].
    pub fn bind_name(name: &str) -> Result<AsyncChannelListener> {
        AsyncChannelListener::try_from(ChannelListener::bind_name(name)?)
    }

    /// Waits for a peer.
    pub async fn accept(&self) -> Result<AsyncChannel> {
        loop {
            let mut guard = self.io.readable().await.map_err(Error::io("poll"))?;
            match guard.try_io(|l| l.get_ref().accept(true)) {
                Ok(Ok(t)) => {
                    let ch = Channel::new(t, self.options.clone())?;
                    let (transport, options, outbox, inbox) = ch.into_parts();
                    return Ok(AsyncChannel {
                        io: register(transport)?,
                        options,
                        outbox: Mutex::new(outbox),
                        inbox: Mutex::new(inbox),
                    });
                }
                Ok(Err(e)) => {
                    return Err(Error::Io {
                        op: "accept",
                        source: e,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }
}

impl TryFrom<ChannelListener> for AsyncChannelListener {
    type Error = Error;

    fn try_from(l: ChannelListener) -> Result<AsyncChannelListener> {
        let (listener, options) = l.into_parts();
        listener
            .set_nonblocking(true)
            .map_err(Error::io("ioctl(FIONBIO)"))?;
        Ok(AsyncChannelListener {
            io: register(listener)?,
            options,
        })
    }
}
