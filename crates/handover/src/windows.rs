//! Windows-only extensions: kernel object handles and Winsock sockets.
//!
//! The mirror of `handover::unix`. A [`Handle`] on Windows owns either a
//! kernel object handle ([`OwnedHandle`]) or a socket ([`OwnedSocket`]);
//! the two are kept apart because Windows passes them differently.

use std::os::windows::io::{
    AsHandle, AsRawHandle, AsSocket, BorrowedHandle, BorrowedSocket, FromRawHandle, OwnedHandle,
    OwnedSocket, RawHandle,
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
    /// Lets the child inherit `event` and names it in HANDOVER_STOP_EVENT,
    /// so that the child can learn when it is asked to stop
    /// ([`StopEvent::from_env`]): Windows has no SIGTERM, and console
    /// control events need a console the two processes share.
    fn stop_event(&mut self, event: &StopEvent) -> crate::Result<&mut Command>;
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

    fn stop_event(&mut self, event: &StopEvent) -> crate::Result<&mut Command> {
        let copy = event
            .0
            .try_clone()
            .map_err(crate::Error::io("DuplicateHandle"))?;
        // An inherited handle has the same value in the child.
        let value = copy.as_raw_handle() as usize;
        self.env(STOP_EVENT_VAR, value.to_string());
        self.inherit(Handle::from(copy))
    }
}

/// Windows-only choices for a [`Channel`](crate::Channel).
pub trait ChannelExt {
    /// Makes `child` the process at the other end of this channel, for one
    /// end of a [`Channel::pair`](crate::Channel::pair) whose other end
    /// was given to `child` (as an activation handle, say). Both ends of a
    /// pair name the process that made it, and a socket sent on a channel
    /// is duplicated for the peer (WSADuplicateSocketW), so without this a
    /// child could not use the sockets sent to it. Refused (PermissionDenied)
    /// for an end that was not made by this process's `pair`.
    fn set_peer(&mut self, child: &crate::Child) -> crate::Result<()>;
}

impl ChannelExt for crate::Channel {
    fn set_peer(&mut self, child: &crate::Child) -> crate::Result<()> {
        self.transport_mut()
            .set_peer(child.id())
            .map_err(crate::Error::io("OpenProcess"))
    }
}

/// The environment variable that names a child's stop event.
pub const STOP_EVENT_VAR: &str = "HANDOVER_STOP_EVENT";

/// A request to stop, as a manual-reset event: the Windows counterpart of
/// the SIGTERM that `handover run` sends on Unix before a generation
/// drains.
///
/// The supervisor makes one per child ([`StopEvent::new`]), hands it over
/// with [`CommandExt::stop_event`] and [`set`](StopEvent::set)s it to ask
/// the child to stop. The child takes it with [`StopEvent::from_env`] and
/// [`wait`](StopEvent::wait)s on it, typically in a thread that then stops
/// accepting connections, finishes the ones it has, and exits.
#[derive(Debug)]
pub struct StopEvent(OwnedHandle);

impl StopEvent {
    /// A fresh, unset event (not inheritable until handed to a command).
    pub fn new() -> crate::Result<StopEvent> {
        crate::sys::new_event()
            .map(StopEvent)
            .map_err(crate::Error::io("CreateEventW"))
    }

    /// The event this process was given in HANDOVER_STOP_EVENT, if any.
    /// The variable is removed, so that programs this one starts do not
    /// take it for theirs. A value that is not a number, or not a handle
    /// of this process that can be waited on, is an error.
    ///
    /// Call it before starting threads (it edits the environment).
    pub fn from_env() -> crate::Result<Option<StopEvent>> {
        let Some(value) = std::env::var_os(STOP_EVENT_VAR) else {
            return Ok(None);
        };
        std::env::remove_var(STOP_EVENT_VAR);
        let bad = |why: String| crate::Error::InvalidInput {
            what: STOP_EVENT_VAR,
            why,
        };
        let text = value.to_string_lossy().into_owned();
        let raw: usize = text
            .parse()
            .ok()
            .filter(|&v| v != 0)
            .ok_or_else(|| bad(format!("{text:?} is not a handle value")))?;
        // SAFETY: only borrowed for the check below, which fails cleanly
        // (ERROR_INVALID_HANDLE) for a value that is not an open handle.
        let borrowed = unsafe { BorrowedHandle::borrow_raw(raw as RawHandle) };
        crate::sys::wait_event(borrowed, Some(std::time::Duration::ZERO))
            .map_err(|e| bad(format!("handle {raw} cannot be waited on: {e}")))?;
        // SAFETY: the supervisor gave this handle to this process alone
        // (inherited, named only in the variable just removed), and it is
        // open: it is ours to own from here.
        Ok(Some(StopEvent(unsafe {
            OwnedHandle::from_raw_handle(raw as RawHandle)
        })))
    }

    /// Asks the process that holds the other end to stop.
    pub fn set(&self) -> crate::Result<()> {
        crate::sys::set_event(self.0.as_handle()).map_err(crate::Error::io("SetEvent"))
    }

    /// Whether a stop was asked for, without waiting.
    pub fn is_set(&self) -> bool {
        self.wait_timeout(std::time::Duration::ZERO)
    }

    /// Waits until a stop is asked for.
    pub fn wait(&self) {
        // An error here means the handle is gone, which cannot happen to
        // an owned one: treat it as a stop rather than spin.
        let _ = crate::sys::wait_event(self.0.as_handle(), None);
    }

    /// Waits up to `timeout`; true once a stop was asked for.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        crate::sys::wait_event(self.0.as_handle(), Some(timeout)).unwrap_or(true)
    }
}
