//! Connection dispatch, the worker's side: take the connections a
//! dispatcher (`handover run --workers N`) accepted and handed over.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! for conn in handover::dispatch::incoming()? {
//!     let mut conn = conn?;
//!     let mut request = [0u8; 1024];
//!     let n = conn.read(&mut request)?;
//!     conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A worker is started with two activation handles: one end of a channel,
//! named [`CHANNEL_NAME`], and a page of shared memory, named
//! [`STATE_NAME`]. Each connection arrives on the channel as one message
//! with its metadata (docs/protocol.md §18). No byte is proxied: the
//! worker owns the client's socket and talks to the client directly.
//!
//! Delivery is acknowledged: [`Incoming`] marks a connection taken in the
//! state page before it gives it to you, and until the dispatcher has seen
//! that it keeps its own copy, so a worker that dies first loses nothing —
//! its connections go to another worker. When the connection is dropped
//! (or [`Connection::into_parts`]'s [`Done`] is), the page counts it
//! finished, which is what least-busy dispatch counts. Neither costs a
//! message or wakes the dispatcher. The iteration ends when the dispatcher
//! closes the channel: the worker is being drained and should finish the
//! connections it has and exit.

#[cfg(all(feature = "tokio", unix))]
mod async_incoming;
pub mod peek;
pub mod protocol;
pub mod state;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::sync::Arc;

#[cfg(all(feature = "tokio", unix))]
pub use async_incoming::{incoming_async, AsyncConnection, AsyncDone, AsyncIncoming, AsyncStream};
use protocol::{Delivery, Report};
use state::StatePage;
pub use state::STATE_NAME;

use crate::activation::Activation;
use crate::{Channel, Error, Handle, HandleKind, Message, Result, SocketFamily, SocketType};

/// The activation name of the worker's channel to its dispatcher
/// (LISTEN_FDNAMES).
pub const CHANNEL_NAME: &str = "handover-dispatch";

/// Takes the dispatcher's channel and state page from the activation
/// handles ([`crate::activation::take`]) and returns the connections
/// arriving on the channel. Use [`incoming_from`] if the program takes
/// other activation handles too.
pub fn incoming() -> Result<Incoming> {
    let mut activation = crate::activation::take()?;
    incoming_from(&mut activation)
}

/// Like [`incoming`], taking the channel and the state page out of
/// activation handles already taken.
pub fn incoming_from(activation: &mut Activation) -> Result<Incoming> {
    let mut take = |name: &str| {
        activation.take_named(name).ok_or_else(|| {
            Error::Activation(format!(
                "no {name:?} handle among the activation handles ({}): is this program \
                 started by `handover run --workers`?",
                if activation.is_empty() {
                    "there are none".to_owned()
                } else {
                    activation.names().join(", ")
                }
            ))
        })
    };
    let channel = take(CHANNEL_NAME)?.into_channel()?;
    let state = take(STATE_NAME)?.into_shared_memory()?;
    Incoming::new(channel, &state)
}

/// The connections a dispatcher hands this worker. An iterator; each item
/// is a connection already acknowledged.
#[derive(Debug)]
pub struct Incoming {
    channel: Channel,
    state: Arc<StatePage>,
    /// The id of the last delivery read: each must be greater.
    last_id: u64,
    ready_sent: bool,
}

impl Incoming {
    /// Connections arriving on `channel`, the worker's end of a dispatch
    /// channel, acknowledged in the state page `state`.
    pub fn new(channel: Channel, state: &crate::SharedMemory) -> Result<Incoming> {
        Ok(Incoming {
            channel,
            state: Arc::new(StatePage::open(state)?),
            last_id: 0,
            ready_sent: false,
        })
    }

    /// Waits for the next connection. `Ok(None)` once the dispatcher has
    /// closed the channel (or shut it for writing): no more will come.
    ///
    /// A message that breaks the protocol is an error, with its handle
    /// closed; the next call goes on with the next message.
    pub fn accept(&mut self) -> Result<Option<Connection>> {
        if !self.ready_sent {
            let ready = Report::Ready {
                version: protocol::VERSION,
            };
            match self.channel.send(&ready.encode(), &[]) {
                // The dispatcher closed the channel before this worker
                // asked for anything (drained before it was ready; on
                // Windows a pipe cannot be half-closed, so ending the
                // channel closes it): no connection will come.
                Err(Error::Disconnected) => return Ok(None),
                sent => sent?,
            }
            self.ready_sent = true;
        }
        let Some(message) = self.channel.recv()? else {
            return Ok(None);
        };
        let (delivery, stream, done) = take_delivery(message, &self.state, &mut self.last_id)?;
        Ok(Some(Connection {
            stream: Owned(Some(stream)),
            peer: delivery.peer.parse().ok(),
            done,
            delivery,
        }))
    }
}

impl Iterator for Incoming {
    type Item = Result<Connection>;

    fn next(&mut self) -> Option<Result<Connection>> {
        self.accept().transpose()
    }
}

/// Reads one delivery message and marks it taken in the state page: from
/// then on the connection is this worker's alone, and the dispatcher will
/// not hand it to another. A message whose header decodes is marked taken
/// even if its handle is wrong, so that the dispatcher closes its copy of
/// what this worker could not use; it is then counted done as well (the
/// [`Done`] made here is dropped), so least-busy does not count it open.
/// Then checks it: one handle, a connected stream socket. Anything else is
/// refused, its handles closed.
pub(crate) fn take_delivery(
    mut message: Message,
    state: &Arc<StatePage>,
    last_id: &mut u64,
) -> Result<(Delivery, Stream, Done)> {
    let delivery = Delivery::decode(&message.bytes).map_err(|e| Error::Dispatch(e.0))?;
    if delivery.id <= *last_id {
        return Err(Error::Dispatch(format!(
            "connection {} came after connection {}: ids must increase",
            delivery.id, *last_id
        )));
    }
    *last_id = delivery.id;
    state.set_taken(delivery.id);
    let done = Done {
        state: Arc::clone(state),
    };
    if message.handles.len() != 1 {
        return Err(Error::Dispatch(format!(
            "connection {} came with {} handles instead of one",
            delivery.id,
            message.handles.len()
        )));
    }
    let handle = message.handles.remove(0);
    let stream = into_stream(handle).map_err(|why| {
        Error::Dispatch(format!(
            "connection {} came as {why}, not a connected TCP or Unix stream socket",
            delivery.id
        ))
    })?;
    Ok((delivery, stream, done))
}

/// The connection as the dispatcher declared it: a connected TCP or Unix
/// stream socket, taken at its word without asking the OS (four system
/// calls per connection). The dispatcher is the worker's own supervisor;
/// were it wrong, reads and writes would fail with the OS's error, no
/// worse. Undeclared handles are checked.
fn into_stream(handle: Handle) -> std::result::Result<Stream, String> {
    use crate::sys;
    match handle.kind() {
        HandleKind::Socket(info) if info.socket_type == SocketType::Stream && !info.listening => {
            match info.family {
                SocketFamily::Ipv4 | SocketFamily::Ipv6 => {
                    Ok(Stream::Tcp(sys::into_tcp_stream(handle.raw)))
                }
                #[cfg(unix)]
                SocketFamily::Unix => Ok(Stream::Unix(sys::into_unix_stream(handle.raw))),
                _ => Err(handle.kind().to_string()),
            }
        }
        HandleKind::Other => {
            #[cfg(unix)]
            if let Ok(HandleKind::Socket(info)) = handle.detect_kind() {
                if info.family == SocketFamily::Unix {
                    use crate::unix::HandleExt;
                    return handle
                        .into_unix_stream()
                        .map(Stream::Unix)
                        .map_err(|e| e.to_string());
                }
            }
            handle
                .into_tcp_stream()
                .map(Stream::Tcp)
                .map_err(|e| e.to_string())
        }
        other => Err(other.to_string()),
    }
}

/// A connection's socket: TCP, or a Unix stream socket when the listener
/// was one.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Stream {
    fn shutdown(&self) {
        // Errors: the client is gone already; nothing more to end.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            #[cfg(unix)]
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// The connection's socket inside a [`Connection`]: shut down when the
/// connection is dropped. The dispatcher may hold a copy of the socket
/// until it has read the acknowledgement; closing ours alone would then
/// not end the connection, and a client reading to the end would wait
/// for the dispatcher.
#[derive(Debug)]
struct Owned(Option<Stream>);

impl Owned {
    fn get(&mut self) -> io::Result<&mut Stream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.shutdown();
        }
    }
}

/// Counts a connection finished in the state page, when dropped.
#[derive(Debug)]
pub struct Done {
    state: Arc<StatePage>,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.state.add_done();
    }
}

/// One connection, acknowledged: the client's socket and what the
/// dispatcher knew about it. Reading and writing go straight to the
/// socket.
#[derive(Debug)]
pub struct Connection {
    stream: Owned,
    delivery: Delivery,
    peer: Option<SocketAddr>,
    done: Done,
}

impl Connection {
    /// The client's address (TCP), as the dispatcher accepted it.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The activation name of the listening socket it arrived on.
    pub fn listener(&self) -> &str {
        &self.delivery.listener
    }

    /// The bytes the dispatcher peeked to route it (empty when it did not
    /// route). They have not been consumed: reading starts at byte 0.
    pub fn peeked(&self) -> &[u8] {
        &self.delivery.peeked
    }

    /// The dispatcher's number for this connection.
    pub fn id(&self) -> u64 {
        self.delivery.id
    }

    /// The socket, borrowed.
    pub fn stream(&self) -> &Stream {
        match &self.stream.0 {
            Some(s) => s,
            None => {
                unreachable!("only into_parts takes the stream, and it consumes the connection")
            }
        }
    }

    /// The socket, and the [`Done`] to drop once finished with it (for
    /// least-busy dispatch to count this worker's connections right).
    /// Dropping a [`Connection`] shuts its socket down, even if it was
    /// cloned; the stream from here is not: shut it down yourself when
    /// finished (`shutdown(Both)`), or a client waiting for the end of the
    /// stream may wait until the dispatcher has closed its copy (up to
    /// 64 ms).
    pub fn into_parts(mut self) -> (Stream, Done) {
        match self.stream.0.take() {
            Some(s) => (s, self.done),
            None => unreachable!("a connection's stream is taken only here"),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.stream.get()? {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.stream.get()? {
            Stream::Tcp(s) => s.write(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
