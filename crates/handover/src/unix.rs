//! Unix-only extensions: descriptors, Unix sockets, and credentials.
//!
//! Everything here has no Windows counterpart, which is why it is kept out
//! of the platform-neutral API.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use crate::channel::{Channel, PeerCredentials};
use crate::handle::{Handle, WrongType};
use crate::sys::{self, Expect};

impl From<OwnedFd> for Handle {
    fn from(fd: OwnedFd) -> Handle {
        Handle::from_raw(fd)
    }
}

impl From<Handle> for OwnedFd {
    fn from(h: Handle) -> OwnedFd {
        h.raw
    }
}

impl AsFd for Handle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.raw.as_fd()
    }
}

macro_rules! unix_handle_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Handle {
            fn from(value: $ty) -> Handle {
                Handle::from_raw(OwnedFd::from(value))
            }
        }
    )*};
}
unix_handle_from!(UnixListener, UnixStream, UnixDatagram);

/// Typed conversions to Unix socket types.
pub trait HandleExt: Sized {
    /// The handle as a listening Unix stream socket.
    fn into_unix_listener(self) -> Result<UnixListener, WrongType>;
    /// The handle as a connected Unix stream socket.
    fn into_unix_stream(self) -> Result<UnixStream, WrongType>;
    /// The handle as a Unix datagram socket.
    fn into_unix_datagram(self) -> Result<UnixDatagram, WrongType>;
}

impl HandleExt for Handle {
    fn into_unix_listener(self) -> Result<UnixListener, WrongType> {
        self.convert("a listening Unix stream socket", Expect::UnixListener)
            .map(sys::into_unix_listener)
    }

    fn into_unix_stream(self) -> Result<UnixStream, WrongType> {
        self.convert("a connected Unix stream socket", Expect::UnixStream)
            .map(sys::into_unix_stream)
    }

    fn into_unix_datagram(self) -> Result<UnixDatagram, WrongType> {
        self.convert("a Unix datagram socket", Expect::UnixDatagram)
            .map(sys::into_unix_datagram)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.transport().as_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(ch: Channel) -> OwnedFd {
        ch.into_transport().into_raw()
    }
}

impl TryFrom<OwnedFd> for Channel {
    type Error = WrongType;

    /// Adopts a descriptor as a channel end, after checking that it is a
    /// connected AF_UNIX SOCK_SEQPACKET socket: for example one inherited
    /// from a parent process.
    fn try_from(fd: OwnedFd) -> Result<Channel, WrongType> {
        Handle::from(fd).into_channel()
    }
}

impl AsFd for crate::ChannelListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sys().as_fd()
    }
}

/// Unix credentials of a channel's peer.
pub trait PeerCredentialsExt {
    /// The peer's effective user id.
    fn uid(&self) -> u32;
    /// The peer's effective group id.
    fn gid(&self) -> u32;
    /// A pidfd for the peer (SO_PEERPIDFD), where the kernel offers one. It
    /// names the very process that connected, even if its pid is reused.
    fn pidfd(&self) -> Option<BorrowedFd<'_>>;
    /// Takes the pidfd out.
    fn take_pidfd(&mut self) -> Option<OwnedFd>;
}

impl PeerCredentialsExt for PeerCredentials {
    fn uid(&self) -> u32 {
        self.info.uid
    }
    fn gid(&self) -> u32 {
        self.info.gid
    }
    fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.info.pidfd.as_ref().map(|fd| fd.as_fd())
    }
    fn take_pidfd(&mut self) -> Option<OwnedFd> {
        self.info.pidfd.take()
    }
}
