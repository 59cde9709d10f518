//! Windows-only extensions: kernel object handles and Winsock sockets.
//!
//! The mirror of `handover::unix`. A [`Handle`] on Windows owns either a
//! kernel object handle ([`OwnedHandle`]) or a socket ([`OwnedSocket`]);
//! the two are kept apart because Windows passes them differently.

use std::os::windows::io::{
    AsHandle, AsSocket, BorrowedHandle, BorrowedSocket, OwnedHandle, OwnedSocket,
};

use crate::handle::Handle;
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
