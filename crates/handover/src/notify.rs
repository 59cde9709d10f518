//! The sd_notify protocol, both sides: a program tells its supervisor
//! `READY=1`, `STATUS=…`, `STOPPING=1`, `MAINPID=…` over the datagram
//! socket named by NOTIFY_SOCKET.
//!
//! [`notify`] is the program side (like `sd_notify(3)`). [`NotifySocket`] is
//! the supervisor side: it takes the sender's pid from the kernel
//! (SCM_CREDENTIALS), never from the message, and closes any descriptor a
//! sender attaches unless the caller asks for them.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::sys;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the supervisor
/// named by NOTIFY_SOCKET. Returns `Ok(false)` when there is none.
pub fn notify(state: &str) -> Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.into_string().map_err(|_| Error::InvalidInput {
        what: "NOTIFY_SOCKET",
        why: "not valid UTF-8".into(),
    })?;
    sys::notify_send(&target, state.as_bytes(), &[])
        .map_err(Error::io("sendmsg(NOTIFY_SOCKET)"))?;
    Ok(true)
}

/// One datagram received on a [`NotifySocket`].
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, from the kernel.
    pub pid: u32,
    /// The sender's uid, from the kernel.
    pub uid: u32,
    /// The fields, in order; a later field of the same name wins in [`get`](Self::get).
    pub fields: Vec<(String, String)>,
    /// Descriptors sent with the message (FDSTORE=1), when the socket was
    /// asked to keep them; otherwise they were closed on arrival.
    pub handles: Vec<Handle>,
}

impl Notification {
    /// The last value of a field.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The fields as a map (last value wins).
    pub fn map(&self) -> BTreeMap<&str, &str> {
        self.fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// Parses a notification payload: `KEY=VALUE` lines; lines without `=`
/// and non-UTF-8 are dropped, as systemd drops them.
pub fn parse(payload: &[u8]) -> Vec<(String, String)> {
    payload
        .split(|&b| b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The supervisor's end: a datagram socket to put in a child's
/// NOTIFY_SOCKET.
#[derive(Debug)]
pub struct NotifySocket {
    inner: sys::NotifyReceiver,
    keep_handles: bool,
}

impl NotifySocket {
    /// Binds a fresh abstract socket with a unique name.
    pub fn bind_unique() -> Result<NotifySocket> {
        Ok(NotifySocket {
            inner: sys::NotifyReceiver::bind_unique().map_err(Error::io("bind(NOTIFY_SOCKET)"))?,
            keep_handles: false,
        })
    }

    /// Keep descriptors that senders attach (for an fd store) instead of
    /// closing them.
    pub fn keep_handles(mut self, keep: bool) -> Self {
        self.keep_handles = keep;
        self
    }

    /// The value for the child's NOTIFY_SOCKET.
    pub fn address(&self) -> &str {
        self.inner.address()
    }

    /// Receives one datagram without waiting: `Ok(None)` when none is
    /// queued.
    pub fn try_recv(&self) -> Result<Option<Notification>> {
        let Some(raw) = self
            .inner
            .recv(self.keep_handles)
            .map_err(Error::io("recvmsg(NOTIFY_SOCKET)"))?
        else {
            return Ok(None);
        };
        Ok(Some(Notification {
            pid: raw.pid,
            uid: raw.uid,
            fields: parse(&raw.payload),
            handles: raw.fds.into_iter().map(Handle::from_raw).collect(),
        }))
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for NotifySocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_systemd() {
        let f = parse(b"READY=1\nSTATUS=up and running\nnoequals\n\xff=1\n=x\nMAINPID=42");
        assert_eq!(
            f,
            vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "up and running".into()),
                ("MAINPID".into(), "42".into())
            ]
        );
    }
}
