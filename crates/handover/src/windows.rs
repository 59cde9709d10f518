//! Windows-only extensions: kernel object handles and Winsock sockets.
//!
//! The mirror of `handover::unix`. A [`Handle`] on Windows owns either a
//! kernel object handle ([`OwnedHandle`]) or a socket ([`OwnedSocket`]);
//! the two are kept apart because Windows passes them differently.

use std::os::windows::io::{
    AsHandle, AsSocket, BorrowedHandle, BorrowedSocket, OwnedHandle, OwnedSocket,
};

use crate::handle::Handle;
use crate::spawn::Command;
use crate::sys::OwnedRaw;

impl From<OwnedHandle> for Handle {
    fn from(h: OwnedHandle) -> Handle {
        Handle::from_raw(OwnedRaw::Handle(h))
    }
}

impl From<OwnedSocket> for Handle {
    fn from(s: OwnedSocket) -> Handle {
        Handle::from_raw(OwnedRaw::Socket(s))
    }
}

/// Access to what a [`Handle`] owns, as Windows types.
pub trait HandleExt: Sized {
    /// The kernel object handle, borrowed; `None` for a socket.
    fn as_handle(&self) -> Option<BorrowedHandle<'_>>;
    /// The socket, borrowed; `None` for any other handle.
    fn as_socket(&self) -> Option<BorrowedSocket<'_>>;
    /// The kernel object handle; a socket is given back as `Err`.
    fn into_owned_handle(self) -> Result<OwnedHandle, Self>;
    /// The socket; any other handle is given back as `Err`.
    fn into_owned_socket(self) -> Result<OwnedSocket, Self>;
}

impl HandleExt for Handle {
    fn as_handle(&self) -> Option<BorrowedHandle<'_>> {
        match &self.raw {
            OwnedRaw::Handle(h) => Some(h.as_handle()),
            OwnedRaw::Socket(_) => None,
        }
    }

    fn as_socket(&self) -> Option<BorrowedSocket<'_>> {
        match &self.raw {
            OwnedRaw::Socket(s) => Some(s.as_socket()),
            OwnedRaw::Handle(_) => None,
        }
    }

    fn into_owned_handle(self) -> Result<OwnedHandle, Self> {
        match self.raw {
            OwnedRaw::Handle(h) => Ok(h),
            raw @ OwnedRaw::Socket(_) => Err(Handle { raw, ..self }),
        }
    }

    fn into_owned_socket(self) -> Result<OwnedSocket, Self> {
        match self.raw {
            OwnedRaw::Socket(s) => Ok(s),
            raw @ OwnedRaw::Handle(_) => Err(Handle { raw, ..self }),
        }
    }
}

/// Windows-only choices for starting a child.
///
/// A child started by [`Command`] inherits exactly its three standard
/// handles and the handles given to [`inherit`](CommandExt::inherit),
/// through PROC_THREAD_ATTRIBUTE_HANDLE_LIST; every other inheritable
/// handle of this process stays out. The listed handles are marked
/// inheritable only while CreateProcessW runs, under a lock that
/// serialises handover's spawns; a `std::process::Command` spawned by
/// another thread at that very moment could still inherit them (std's own
/// lock cannot be shared), so do not mix the two in one process when that
/// matters.
pub trait CommandExt {
    /// Lets the child inherit `handle`, at the same handle value as here
    /// (tell the child that value, for example in an argument). Sockets
    /// are refused: pass them with [`Command::activation`].
    fn inherit(&mut self, handle: Handle) -> crate::Result<&mut Command>;
    /// Extra CreateProcessW creation flags, such as CREATE_NO_WINDOW or
    /// CREATE_NEW_PROCESS_GROUP.
    fn creation_flags(&mut self, flags: u32) -> &mut Command;
    /// Also serves the activation sockets by systemfd's protocol
    /// (SYSTEMFD_SOCKET_SERVER, SYSTEMFD_SOCKET_SECRET), so that programs
    /// written against the `listenfd` crate find them, for as long as the
    /// child runs.
    fn systemfd(&mut self, on: bool) -> &mut Command;
    /// Puts the child (and whatever it starts) in a job object that ends
    /// them all when the job's last handle closes: when this process exits,
    /// however it exits, or when the [`crate::Child`] is dropped. The
    /// Windows counterpart of `parent_death_signal` on Linux.
    fn end_with_parent(&mut self, on: bool) -> &mut Command;
}

impl CommandExt for Command {
    fn inherit(&mut self, handle: Handle) -> crate::Result<&mut Command> {
        if let OwnedRaw::Socket(_) = handle.raw {
            return Err(crate::Error::InvalidInput {
                what: "inherit",
                why: "sockets are not inherited on Windows (Winsock does not promise that \
                      inherited sockets work); pass them with Command::activation"
                    .into(),
            });
        }
        self.windows.inherit.push(handle);
        Ok(self)
    }

    fn creation_flags(&mut self, flags: u32) -> &mut Command {
        self.windows.creation_flags = flags;
        self
    }

    fn systemfd(&mut self, on: bool) -> &mut Command {
        self.windows.systemfd = on;
        self
    }

    fn end_with_parent(&mut self, on: bool) -> &mut Command {
        self.windows.end_with_parent = on;
        self
    }
}
