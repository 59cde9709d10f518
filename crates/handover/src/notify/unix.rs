//! The sd_notify transport on Unix: datagrams on the AF_UNIX socket named
//! by NOTIFY_SOCKET, descriptors in SCM_RIGHTS, the sender's pid and uid
//! from SCM_CREDENTIALS (the system calls are in `sys/unix.rs`).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use rustix::net::SocketAddrUnix;

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::sys;

/// Where an answer to a notification goes: the sender's bound address.
pub(crate) type Sender = SocketAddrUnix;

/// One notification as received.
pub(crate) struct Raw {
    pub pid: u32,
    pub uid: u32,
    pub payload: Vec<u8>,
    pub handles: Vec<Handle>,
    pub sender: Option<Sender>,
    pub truncated: bool,
}

fn borrow(handles: &[Handle]) -> Vec<BorrowedFd<'_>> {
    handles.iter().map(|h| h.as_fd()).collect()
}

/// Sends one notification, fire and forget.
pub(crate) fn send(target: &str, payload: &[u8], handles: &[Handle]) -> Result<()> {
    sys::notify_send(target, payload, &borrow(handles)).map_err(Error::io("sendmsg(NOTIFY_SOCKET)"))
}

/// A notification that expects an answer (see `sys::NotifyClient`).
pub(crate) struct Client(sys::NotifyClient);

impl Client {
    pub fn connect(target: &str) -> Result<Client> {
        sys::NotifyClient::connect(target)
            .map(Client)
            .map_err(Error::io("connect(NOTIFY_SOCKET)"))
    }

    /// False when the supervisor's queue stayed full until the deadline.
    pub fn send(&self, payload: &[u8], handles: &[Handle], deadline: Instant) -> Result<bool> {
        self.0
            .send(payload, &borrow(handles), deadline)
            .map_err(Error::io("sendmsg(NOTIFY_SOCKET)"))
    }

    /// One answer's payload; None once the deadline has passed.
    pub fn recv(&self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        self.0
            .recv(deadline)
            .map_err(Error::io("recvmsg(fd store acknowledgement)"))
    }
}

/// The supervisor's socket.
#[derive(Debug)]
pub(crate) struct Receiver(sys::NotifyReceiver);

impl Receiver {
    pub fn bind_unique() -> Result<Receiver> {
        sys::NotifyReceiver::bind_unique()
            .map(Receiver)
            .map_err(Error::io("bind(NOTIFY_SOCKET)"))
    }

    pub fn address(&self) -> &str {
        self.0.address()
    }

    pub fn recv(&self, keep_handles: bool) -> Result<Option<Raw>> {
        let Some(raw) = self
            .0
            .recv(keep_handles)
            .map_err(Error::io("recvmsg(NOTIFY_SOCKET)"))?
        else {
            return Ok(None);
        };
        Ok(Some(Raw {
            pid: raw.pid,
            uid: raw.uid,
            payload: raw.payload,
            handles: raw.fds.into_iter().map(Handle::from_raw).collect(),
            sender: raw.sender,
            truncated: raw.truncated,
        }))
    }

    pub fn reply(&self, to: &Sender, payload: &[u8]) -> Result<()> {
        self.0
            .reply(to, payload)
            .map_err(Error::io("sendto(notification sender)"))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
