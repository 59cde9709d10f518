//! The platform-neutral handle: an owned OS handle with a name and a kind.

use std::fmt;
use std::fs::File;
use std::net::{TcpListener, TcpStream, UdpSocket};

use crate::assemble::Slot;
use crate::sys;
use crate::wire::KindCodes;

/// What an OS handle is. Sent with every handle so that the receiver can
/// tell a listener from a connection before touching it; typed conversions
/// still check the real type, because a peer's word is only a hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleKind {
    /// A socket, with what is known about it.
    Socket(SocketInfo),
    /// A regular file.
    File,
    /// A pipe or FIFO.
    Pipe,
    /// Shared memory: a memfd or POSIX shared memory on Linux, a section
    /// (file mapping) on Windows.
    SharedMemory,
    /// A directory.
    Directory,
    /// A character device, such as a terminal or /dev/null.
    CharDevice,
    /// Anything else: an eventfd, a pidfd, an event, a process handle, …
    Other,
}

/// The facts about a socket that decide what it can be used as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketInfo {
    pub family: SocketFamily,
    pub socket_type: SocketType,
    /// Whether listen(2) has been called on it (SO_ACCEPTCONN).
    pub listening: bool,
}

/// A socket's address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SocketFamily {
    Unix,
    Ipv4,
    Ipv6,
    Other,
}

/// A socket's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SocketType {
    Stream,
    Datagram,
    SeqPacket,
    Other,
}

impl fmt::Display for HandleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleKind::Socket(info) => write!(f, "{info}"),
            HandleKind::File => f.write_str("a regular file"),
            HandleKind::Pipe => f.write_str("a pipe"),
            HandleKind::SharedMemory => f.write_str("shared memory"),
            HandleKind::Directory => f.write_str("a directory"),
            HandleKind::CharDevice => f.write_str("a character device"),
            HandleKind::Other => f.write_str("a handle of another kind"),
        }
    }
}

impl fmt::Display for SocketInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            SocketFamily::Unix => "Unix",
            SocketFamily::Ipv4 => "IPv4",
            SocketFamily::Ipv6 => "IPv6",
            SocketFamily::Other => "other-family",
        };
        let ty = match self.socket_type {
            SocketType::Stream => "stream",
            SocketType::Datagram => "datagram",
            SocketType::SeqPacket => "seqpacket",
            SocketType::Other => "other-type",
        };
        let state = if self.listening { "listening " } else { "" };
        write!(f, "a {state}{family} {ty} socket")
    }
}

/// An owned OS handle (a file descriptor on Unix; a HANDLE or SOCKET on
/// Windows) with an optional name and its kind.
///
/// Dropping a `Handle` closes it. Sending one over a [`Channel`] duplicates
/// it into the peer and leaves this one open.
///
/// [`Channel`]: crate::Channel
pub struct Handle {
    pub(crate) raw: sys::OwnedRaw,
    pub(crate) name: Option<String>,
    /// The kind as its wire codes, which is what sending writes and
    /// receiving reads, so that neither converts it.
    pub(crate) kind: KindCodes,
}

impl Handle {
    /// A handle made in this process: the OS is asked what it is, once,
    /// here, so that sending it later costs no extra system calls.
    pub(crate) fn from_raw(raw: sys::OwnedRaw) -> Handle {
        let kind = sys::detect_kind(&raw).unwrap_or(HandleKind::Other);
        Handle {
            raw,
            name: None,
            kind: KindCodes::of(kind),
        }
    }

    /// A handle just received, before its record is read: no name, and
    /// kind "other" until [`Slot::set_record`] gives it what the sender
    /// declared.
    pub(crate) fn received(raw: sys::OwnedRaw) -> Handle {
        Handle {
            raw,
            name: None,
            kind: KindCodes::OTHER,
        }
    }

    /// An accepted TCP connection, declared a connected TCP stream of its
    /// peer's address family without asking the OS: this saves the three
    /// system calls [`From<TcpStream>`](#impl-From<TcpStream>-for-Handle)
    /// makes, which counts in a loop that hands on every connection it
    /// accepts. `peer` is the address `accept` returned with it. A wrong
    /// declaration misleads only [`kind`](Self::kind), here and at a
    /// receiver; the typed conversions ask the OS.
    pub fn from_accepted_tcp(stream: TcpStream, peer: &std::net::SocketAddr) -> Handle {
        let family = match peer {
            std::net::SocketAddr::V4(_) => SocketFamily::Ipv4,
            std::net::SocketAddr::V6(_) => SocketFamily::Ipv6,
        };
        Handle {
            raw: sys::OwnedRaw::from(stream),
            name: None,
            kind: KindCodes::of(HandleKind::Socket(SocketInfo {
                family,
                socket_type: SocketType::Stream,
                listening: false,
            })),
        }
    }

    /// Gives the handle a name, which travels with it. Names are checked when
    /// the handle is sent: 1 to 255 bytes of UTF-8, without NUL.
    pub fn with_name(mut self, name: impl Into<String>) -> Handle {
        self.name = Some(name.into());
        self
    }

    /// The handle's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// What the handle is. For a handle made in this process the OS was
    /// asked when the `Handle` was made; for a received handle this is what
    /// the sender declared. The typed `into_*` conversions always ask the OS.
    pub fn kind(&self) -> HandleKind {
        self.kind.kind()
    }

    /// The kind as it goes on the wire.
    #[inline]
    pub(crate) fn kind_codes(&self) -> KindCodes {
        self.kind
    }

    /// Asks the OS what the handle is now, ignoring any declared kind.
    pub fn detect_kind(&self) -> std::io::Result<HandleKind> {
        sys::detect_kind(&self.raw)
    }

    /// Duplicates the handle, keeping its name and kind.
    pub fn try_clone(&self) -> std::io::Result<Handle> {
        Ok(Handle {
            raw: sys::duplicate(&self.raw)?,
            name: self.name.clone(),
            kind: self.kind,
        })
    }

    /// The handle as a listening TCP socket; fails unless it is one.
    pub fn into_tcp_listener(self) -> Result<TcpListener, WrongType> {
        self.convert("a listening TCP socket", sys::Expect::TcpListener)
            .map(sys::into_tcp_listener)
    }

    /// The handle as a connected (non-listening) TCP socket.
    pub fn into_tcp_stream(self) -> Result<TcpStream, WrongType> {
        self.convert("a TCP stream socket", sys::Expect::TcpStream)
            .map(sys::into_tcp_stream)
    }

    /// The handle as a UDP socket.
    pub fn into_udp_socket(self) -> Result<UdpSocket, WrongType> {
        self.convert("a UDP socket", sys::Expect::UdpSocket)
            .map(sys::into_udp_socket)
    }

    /// The handle as a regular file (shared memory counts: it is a file
    /// that lives in memory).
    pub fn into_file(self) -> Result<File, WrongType> {
        self.convert("a regular file", sys::Expect::File)
            .map(sys::into_file)
    }

    /// The handle as shared memory, ready to map: a memfd (or other shmem
    /// file) on Linux; on Windows, a section of which a view can be mapped.
    pub fn into_shared_memory(self) -> Result<crate::SharedMemory, WrongType> {
        match sys::shared_memory_len(&self.raw) {
            Ok(len) => Ok(crate::SharedMemory::from_raw(self.raw, len)),
            Err(found) => Err(WrongType {
                expected: "shared memory",
                found,
                handle: self,
            }),
        }
    }

    /// The handle as a channel end, so that channels can travel over channels.
    pub fn into_channel(self) -> Result<crate::Channel, WrongType> {
        self.convert("a handover channel end", sys::Expect::Channel)
            .map(|raw| crate::Channel::from_transport(sys::Transport::from_raw(raw)))
    }

    pub(crate) fn convert(
        self,
        expected: &'static str,
        expect: sys::Expect,
    ) -> Result<sys::OwnedRaw, WrongType> {
        match sys::check(&self.raw, expect) {
            Ok(()) => Ok(self.raw),
            Err(found) => Err(WrongType {
                expected,
                found,
                handle: self,
            }),
        }
    }
}

impl Slot for Handle {
    #[inline]
    fn set_record(&mut self, kind: KindCodes, name: Option<&str>) {
        self.kind = kind;
        self.name = name.map(str::to_owned);
    }

    #[inline]
    fn set_kind(&mut self, kind: KindCodes) {
        self.kind = kind;
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("raw", &self.raw)
            .field("name", &self.name)
            .field("kind", &self.kind())
            .finish()
    }
}

macro_rules! handle_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Handle {
            fn from(value: $ty) -> Handle {
                Handle::from_raw(sys::OwnedRaw::from(value))
            }
        }
    )*};
}
handle_from!(TcpListener, TcpStream, UdpSocket, File);

impl From<crate::Channel> for Handle {
    fn from(channel: crate::Channel) -> Handle {
        Handle::from_raw(channel.into_transport().into_raw())
    }
}

/// A typed conversion found a different kind of handle. The handle is
/// given back, untouched, so nothing is lost.
pub struct WrongType {
    pub(crate) expected: &'static str,
    pub(crate) found: Result<HandleKind, std::io::ErrorKind>,
    pub(crate) handle: Handle,
}

impl WrongType {
    /// Takes back the handle that did not convert.
    pub fn into_handle(self) -> Handle {
        self.handle
    }

    /// What the conversion wanted.
    pub fn expected(&self) -> &'static str {
        self.expected
    }

    /// What the handle really is, or why the OS could not say.
    pub fn found(&self) -> Result<HandleKind, std::io::ErrorKind> {
        self.found
    }
}

impl fmt::Display for WrongType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found {
            Ok(found) => write!(f, "expected {}, found {found}", self.expected),
            Err(kind) => write!(
                f,
                "expected {}, but the handle could not be inspected: {kind}",
                self.expected
            ),
        }
    }
}

impl fmt::Debug for WrongType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrongType")
            .field("expected", &self.expected)
            .field("found", &self.found)
            .finish_non_exhaustive()
    }
}

impl std::error::Error for WrongType {}
