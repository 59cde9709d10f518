//! Unix-only extensions: descriptors, Unix sockets, and credentials.
//!
//! Everything here has no Windows counterpart, which is why it is kept out
//! of the platform-neutral API.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use crate::channel::{Channel, PeerCredentials};
use crate::handle::{Handle, WrongType};
use crate::spawn::{Child, Command};
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

/// Unix-only choices for starting a child.
pub trait CommandExt {
    /// Places a handle at descriptor `target` in the child (0, 1 and 2 are
    /// stdin, stdout and stderr). The command keeps the handle.
    fn fd(&mut self, target: i32, handle: Handle) -> &mut Command;
    /// Runs the child as this user id.
    fn uid(&mut self, uid: u32) -> &mut Command;
    /// Runs the child as this group id.
    fn gid(&mut self, gid: u32) -> &mut Command;
    /// Sets the child's supplementary groups.
    fn groups(&mut self, groups: &[u32]) -> &mut Command;
    /// Starts the child in a new session (setsid).
    fn setsid(&mut self, on: bool) -> &mut Command;
    /// Starts the child in a process group of its own, so that everything
    /// it starts can be signalled together.
    fn process_group(&mut self, on: bool) -> &mut Command;
    /// The signal the child gets when this thread exits (PR_SET_PDEATHSIG),
    /// so that a supervisor killed outright leaves no orphan.
    fn parent_death_signal(&mut self, signal: Option<i32>) -> &mut Command;
}

impl CommandExt for Command {
    fn fd(&mut self, target: i32, handle: Handle) -> &mut Command {
        self.unix.placed.retain(|(t, _)| *t != target);
        self.unix.placed.push((target, handle));
        self
    }
    fn uid(&mut self, uid: u32) -> &mut Command {
        self.unix.uid = Some(uid);
        self
    }
    fn gid(&mut self, gid: u32) -> &mut Command {
        self.unix.gid = Some(gid);
        self
    }
    fn groups(&mut self, groups: &[u32]) -> &mut Command {
        self.unix.groups = Some(groups.to_vec());
        self
    }
    fn setsid(&mut self, on: bool) -> &mut Command {
        self.unix.setsid = on;
        self
    }
    fn process_group(&mut self, on: bool) -> &mut Command {
        self.unix.process_group = on;
        self
    }
    fn parent_death_signal(&mut self, signal: Option<i32>) -> &mut Command {
        self.unix.parent_death_signal = signal;
        self
    }
}

/// Unix-only operations on a child.
pub trait ChildExt {
    /// Sends a signal (through the pidfd, so a reused pid is never hit).
    fn signal(&self, signal: i32) -> crate::Result<()>;
    /// The child's pidfd, where the kernel gave one (CLONE_PIDFD).
    fn pidfd(&self) -> Option<BorrowedFd<'_>>;
}

impl ChildExt for Child {
    fn signal(&self, signal: i32) -> crate::Result<()> {
        sys::signal_child(&self.inner, signal).map_err(crate::Error::io("kill"))
    }
    fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.pidfd.as_ref().map(|fd| fd.as_fd())
    }
}

/// Claims descriptor `fd`, inherited from the parent process, as an owned
/// handle, after checking that it is open; it is marked close-on-exec.
///
/// # Safety
///
/// Nothing else in this process may own descriptor `fd` (no `OwnedFd`,
/// `File`, socket, …), and it must not be claimed twice: the returned
/// handle closes it when dropped.
pub unsafe fn take_inherited(fd: i32) -> crate::Result<Handle> {
    let mut fds = sys::adopt_inherited(fd, 1)?;
    Ok(Handle::from_raw(fds.remove(0)))
}
