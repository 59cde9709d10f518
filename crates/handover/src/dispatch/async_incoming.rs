//! The worker's side of dispatch for tokio programs: the same protocol as
//! [`super::Incoming`], on an [`AsyncChannel`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::{TcpStream, UnixStream};

use super::protocol::{Delivery, Report, VERSION};
use super::state::StatePage;
use super::{take_delivery, Incoming, Stream};
use crate::tokio::AsyncChannel;
use crate::{Channel, Error, Result, SharedMemory};

/// [`super::incoming`] for tokio: takes the dispatcher's channel and state
/// page from the activation handles. Must be called within a tokio
/// runtime.
pub fn incoming_async() -> Result<AsyncIncoming> {
    let mut activation = crate::activation::take()?;
    AsyncIncoming::from_sync(super::incoming_from(&mut activation)?)
}

/// The connections a dispatcher hands this worker, for async code. Call
/// [`AsyncIncoming::next`] in a loop.
#[derive(Debug)]
pub struct AsyncIncoming {
    channel: AsyncChannel,
    state: Arc<StatePage>,
    last_id: u64,
    ready_sent: bool,
}

impl AsyncIncoming {
    /// Connections arriving on `channel`, acknowledged in the state page
    /// `state`. Must be called within a tokio runtime.
    pub fn new(channel: Channel, state: &SharedMemory) -> Result<AsyncIncoming> {
        AsyncIncoming::from_sync(Incoming::new(channel, state)?)
    }

    fn from_sync(sync: Incoming) -> Result<AsyncIncoming> {
        Ok(AsyncIncoming {
            channel: AsyncChannel::try_from(sync.channel)?,
            state: sync.state,
            last_id: sync.last_id,
            ready_sent: sync.ready_sent,
        })
    }

    /// The next connection, acknowledged; `None` once the dispatcher has
    /// closed the channel. See [`super::Incoming::accept`].
    pub async fn next(&mut self) -> Option<Result<AsyncConnection>> {
        self.accept().await.transpose()
    }

    async fn accept(&mut self) -> Result<Option<AsyncConnection>> {
        if !self.ready_sent {
            let ready = Report::Ready { version: VERSION };
            self.channel.send(&ready.encode(), &[]).await?;
            self.ready_sent = true;
        }
        let Some(message) = self.channel.recv().await? else {
            return Ok(None);
        };
        // A connection tokio cannot take is counted done as it goes
        // (`done` is dropped with the error).
        let (delivery, stream, done) = take_delivery(message, &self.state, &mut self.last_id)?;
        let stream = match stream {
            Stream::Tcp(s) => {
                s.set_nonblocking(true).map_err(io_error)?;
                AsyncStream::Tcp(TcpStream::from_std(s).map_err(io_error)?)
            }
            Stream::Unix(s) => {
                s.set_nonblocking(true).map_err(io_error)?;
                AsyncStream::Unix(UnixStream::from_std(s).map_err(io_error)?)
            }
        };
        Ok(Some(AsyncConnection {
            stream: Owned(Some(stream)),
            peer: delivery.peer.parse().ok(),
            done: AsyncDone { _done: done },
            delivery,
        }))
    }
}

fn io_error(source: io::Error) -> Error {
    Error::Io {
        op: "registering a dispatched connection with tokio",
        source,
    }
}

/// A connection's socket, registered with tokio.
#[derive(Debug)]
pub enum AsyncStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// As [`super::Connection`]'s: the socket is shut down when the
/// connection is dropped, since the dispatcher may still hold a copy.
#[derive(Debug)]
struct Owned(Option<AsyncStream>);

impl Owned {
    fn get(&mut self) -> &mut AsyncStream {
        match &mut self.0 {
            Some(s) => s,
            None => {
                unreachable!("only into_parts takes the stream, and it consumes the connection")
            }
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        let fd = match &self.0 {
            Some(AsyncStream::Tcp(s)) => s.as_fd(),
            Some(AsyncStream::Unix(s)) => s.as_fd(),
            None => return,
        };
        // Errors: the client is gone already.
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
    }
}

/// Counts a connection finished in the state page, when dropped (any
/// thread, inside the runtime or not).
#[derive(Debug)]
pub struct AsyncDone {
    _done: super::Done,
}

/// One connection for async code; see [`super::Connection`].
#[derive(Debug)]
pub struct AsyncConnection {
    stream: Owned,
    delivery: Delivery,
    peer: Option<std::net::SocketAddr>,
    done: AsyncDone,
}

impl AsyncConnection {
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    pub fn listener(&self) -> &str {
        &self.delivery.listener
    }

    pub fn peeked(&self) -> &[u8] {
        &self.delivery.peeked
    }

    pub fn id(&self) -> u64 {
        self.delivery.id
    }

    /// The socket, and what to drop once finished with it; see
    /// [`super::Connection::into_parts`] (shut it down when finished).
    pub fn into_parts(mut self) -> (AsyncStream, AsyncDone) {
        match self.stream.0.take() {
            Some(s) => (s, self.done),
            None => unreachable!("a connection's stream is taken only here"),
        }
    }
}

impl AsyncRead for AsyncConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stream.get() {
            AsyncStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            AsyncStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AsyncConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream.get() {
            AsyncStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            AsyncStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.get() {
            AsyncStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            AsyncStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.get() {
            AsyncStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            AsyncStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
