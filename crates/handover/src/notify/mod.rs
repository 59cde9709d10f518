//! The sd_notify protocol, both sides: a program tells its supervisor
//! `READY=1`, `STATUS=…`, `STOPPING=1`, `MAINPID=…` over the transport
//! named by NOTIFY_SOCKET.
//!
//! [`notify`] is the program side (like `sd_notify(3)`). [`NotifySocket`] is
//! the supervisor side: it takes the sender's pid from the kernel, never
//! from the message, and closes any handle a sender attaches unless the
//! caller asks for them.
//!
//! The fd store (systemd's FDSTORE=1, FDNAME=, FDSTOREREMOVE=1, FDPOLL=0)
//! is here on both sides too: [`store`] and [`remove_stored`] send
//! systemd-compatible requests; [`store_acked`] and [`remove_stored_acked`]
//! add handover's acknowledgement extension (`HANDOVER_ACK=`, described in
//! docs/protocol.md, "The fd store and its acknowledgement") and wait for
//! the supervisor's answer; [`fdstore_request`], [`ack_reply`] and
//! [`NotifySocket::reply`] are the supervisor's pieces.
//!
//! The transport is systemd's on Unix: a datagram socket, descriptors in
//! SCM_RIGHTS, the pid from SCM_CREDENTIALS (`unix.rs`). On Windows,
//! NOTIFY_SOCKET names a pipe and each notification is one message on a
//! handover channel (`windows.rs`); the text and the fd store's rules are
//! the same.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::handle::Handle;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as transport;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as transport;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the supervisor
/// named by NOTIFY_SOCKET. Returns `Ok(false)` when there is none.
///
/// On Windows this waits (up to 5 s) until the supervisor has taken the
/// message; on Unix it only queues a datagram.
pub fn notify(state: &str) -> Result<bool> {
    let Some(target) = notify_target()? else {
        return Ok(false);
    };
    transport::send(&target, state.as_bytes(), &[])?;
    Ok(true)
}

/// NOTIFY_SOCKET, if set.
fn notify_target() -> Result<Option<String>> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(None);
    };
    target
        .into_string()
        .map(Some)
        .map_err(|_| Error::InvalidInput {
            what: "NOTIFY_SOCKET",
            why: "not valid UTF-8".into(),
        })
}

/// The field of handover's acknowledgement extension: a client that wants
/// an answer to FDSTORE=1 or FDSTOREREMOVE=1 adds `HANDOVER_ACK=<cookie>`
/// and the supervisor's answer repeats it.
pub const ACK_FIELD: &str = "HANDOVER_ACK";

/// The name systemd gives stored descriptors sent without FDNAME=.
pub const DEFAULT_FDNAME: &str = "stored";

/// The most descriptors one datagram can carry (the kernel's SCM_MAX_FD).
pub const MAX_STORE_HANDLES: usize = 253;

/// Checks an acknowledgement cookie: 1 to 64 characters from
/// `A-Z a-z 0-9 _ -`.
pub fn check_cookie(cookie: &str) -> Result<()> {
    let ok = (1..=64).contains(&cookie.len())
        && cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            what: "HANDOVER_ACK cookie",
            why: format!("{cookie:?} is not 1 to 64 characters from A-Z a-z 0-9 _ -"),
        })
    }
}

/// What the supervisor answered to an acknowledged fd-store request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreReply {
    /// The descriptors are in the store under the requested name.
    Stored,
    /// Every descriptor stored under the name was removed (and closed).
    Removed,
    /// The supervisor refused; the descriptors sent (if any) were closed.
    /// The string is the supervisor's reason, on one line.
    Refused(String),
}

/// The store request's text (without HANDOVER_ACK).
fn store_payload(name: &str, handles: &[Handle], poll: bool) -> Result<String> {
    crate::spawn::check_fdname(name)?;
    if handles.is_empty() {
        return Err(Error::InvalidInput {
            what: "fd store request",
            why: "no descriptors to store".into(),
        });
    }
    if handles.len() > MAX_STORE_HANDLES {
        return Err(Error::TooLargeToSend {
            what: "descriptors in one fd-store request",
            limit: MAX_STORE_HANDLES,
            got: handles.len(),
        });
    }
    let mut text = format!("FDSTORE=1\nFDNAME={name}\n");
    if !poll {
        text.push_str("FDPOLL=0\n");
    }
    Ok(text)
}

/// Hands `handles` to the supervisor's fd store under `name`, as
/// systemd's `sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=name", …)`
/// does (plus `FDPOLL=0` when `poll` is false: the supervisor then keeps
/// the descriptors even after they report EPOLLHUP/EPOLLERR). Every handle
/// gets the same name; store them one call each to name them apart.
///
/// Fire and forget: `Ok(true)` means the datagram was queued, not that the
/// supervisor kept the descriptors (a supervisor without an fd store
/// closes them). `Ok(false)` when NOTIFY_SOCKET is unset. The caller keeps
/// its own copies of the handles.
pub fn store(name: &str, handles: &[Handle], poll: bool) -> Result<bool> {
    let text = store_payload(name, handles, poll)?;
    let Some(target) = notify_target()? else {
        return Ok(false);
    };
    transport::send(&target, text.as_bytes(), handles)?;
    Ok(true)
}

/// Asks the supervisor to close and forget every descriptor stored under
/// `name` (FDSTOREREMOVE=1). Fire and forget, like [`store`].
pub fn remove_stored(name: &str) -> Result<bool> {
    crate::spawn::check_fdname(name)?;
    let Some(target) = notify_target()? else {
        return Ok(false);
    };
    transport::send(
        &target,
        format!("FDSTOREREMOVE=1\nFDNAME={name}\n").as_bytes(),
        &[],
    )?;
    Ok(true)
}

/// [`store`], then waits for the supervisor's answer (handover's
/// acknowledgement extension). `timeout` bounds the whole exchange,
/// including a wait for room in a full supervisor queue.
///
/// Only handover answers: systemd and other supervisors accept the request
/// (they ignore the unknown `HANDOVER_ACK=` field) but never reply, so
/// under them this returns [`Error::TimedOut`] even though the descriptors
/// may well be stored. Use it only under a supervisor known to be
/// handover. NOTIFY_SOCKET unset is an [`Error::InvalidInput`] (there is
/// nobody to answer).
pub fn store_acked(
    name: &str,
    handles: &[Handle],
    poll: bool,
    timeout: Duration,
) -> Result<StoreReply> {
    let text = store_payload(name, handles, poll)?;
    acked(text, handles, timeout)
}

/// [`remove_stored`], then waits up to `timeout` for the supervisor's
/// answer; see [`store_acked`] for when to use it.
pub fn remove_stored_acked(name: &str, timeout: Duration) -> Result<StoreReply> {
    crate::spawn::check_fdname(name)?;
    acked(format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[], timeout)
}

fn acked(mut text: String, handles: &[Handle], timeout: Duration) -> Result<StoreReply> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(target) = notify_target()? else {
        return Err(Error::InvalidInput {
            what: "NOTIFY_SOCKET",
            why: "not set: no supervisor to acknowledge the request".into(),
        });
    };
    let cookie = format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    text.push_str(&format!("{ACK_FIELD}={cookie}\n"));
    let deadline = Instant::now() + timeout;
    // Connected to the supervisor's socket, the client socket receives
    // datagrams from nowhere else, so an answer cannot be forged by a
    // third process that guessed the autobound address.
    let client = transport::Client::connect(&target)?;
    let timed_out = || Error::TimedOut {
        op: "receive the fd store's acknowledgement",
        timeout,
    };
    if !client.send(text.as_bytes(), handles, deadline)? {
        return Err(timed_out());
    }
    loop {
        let Some(payload) = client.recv(deadline)? else {
            return Err(timed_out());
        };
        if let Some(reply) = parse_ack(&payload, &cookie) {
            return Ok(reply);
        }
    }
}

/// Reads an acknowledgement; None when it is not the answer for `cookie`.
fn parse_ack(payload: &[u8], cookie: &str) -> Option<StoreReply> {
    let fields = parse(payload);
    let get = |key: &str| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if get(ACK_FIELD) != Some(cookie) {
        return None;
    }
    Some(match get("STATUS") {
        Some("stored") => StoreReply::Stored,
        Some("removed") => StoreReply::Removed,
        Some("refused") => StoreReply::Refused(get("REASON").unwrap_or("").to_owned()),
        other => StoreReply::Refused(format!(
            "the supervisor answered with an unknown STATUS={}",
            other.unwrap_or("(none)")
        )),
    })
}

/// The supervisor's answer to an acknowledged request, as sent by
/// [`NotifySocket::reply`]: `HANDOVER_ACK=<cookie>`, then `STATUS=stored`
/// or `STATUS=removed` with `FDNAME=<name>`, or `STATUS=refused` with
/// `REASON=<one line>` (control characters become spaces, cut to 512
/// bytes) and `FDNAME=<name>` when `name` is a valid name. `cookie` must
/// pass [`check_cookie`], as the cookies of [`fdstore_request`] do.
pub fn ack_reply(cookie: &str, outcome: &StoreReply, name: &str) -> String {
    debug_assert!(check_cookie(cookie).is_ok(), "bad cookie {cookie:?}");
    let mut out = format!("{ACK_FIELD}={cookie}\n");
    match outcome {
        StoreReply::Stored => out.push_str("STATUS=stored\n"),
        StoreReply::Removed => out.push_str("STATUS=removed\n"),
        StoreReply::Refused(_) => out.push_str("STATUS=refused\n"),
    }
    if crate::spawn::check_fdname(name).is_ok() {
        out.push_str(&format!("FDNAME={name}\n"));
    }
    if let StoreReply::Refused(reason) = outcome {
        let mut line: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if line.len() > 512 {
            let mut cut = 512;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        out.push_str(&format!("REASON={line}\n"));
    }
    out
}

/// An fd-store request read from a [`Notification`] by [`fdstore_request`].
#[derive(Debug)]
pub struct FdStoreRequest {
    /// FDNAME=, checked like a LISTEN_FDNAMES name; [`DEFAULT_FDNAME`]
    /// for FDSTORE=1 without one.
    pub name: String,
    /// FDSTOREREMOVE=1 (and `handles` is empty); otherwise FDSTORE=1.
    pub remove: bool,
    /// False for FDPOLL=0: keep the descriptors even after they hang up.
    pub poll: bool,
    /// HANDOVER_ACK=, checked: answer with [`NotifySocket::reply`] and
    /// [`ack_reply`]. None when the sender asked for no answer.
    pub cookie: Option<String>,
    /// The descriptors to store (at least one for FDSTORE=1), each named
    /// `name`.
    pub handles: Vec<Handle>,
}

/// Why an fd-store request was refused, and whom to tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdStoreRefusal {
    /// The sender's valid HANDOVER_ACK cookie, if it gave one: answer with
    /// `ack_reply(cookie, &StoreReply::Refused(reason), name)`.
    pub cookie: Option<String>,
    /// FDNAME= as sent (possibly the reason for the refusal).
    pub name: String,
    /// One line saying what was wrong.
    pub reason: String,
}

impl std::fmt::Display for FdStoreRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Reads an fd-store request (FDSTORE=1 or FDSTOREREMOVE=1) out of a
/// notification: None when it is not one; `Err` when it is one but
/// malformed; otherwise the request, with the notification's handles
/// moved into it. On `Err` the handles stay in the notification and close
/// when it is dropped.
///
/// Refused: FDSTORE=1 and FDSTOREREMOVE=1 together; FDSTORE=1 without
/// descriptors (also what a [`NotifySocket`] without
/// [`keep_handles`](NotifySocket::keep_handles) sees); FDSTOREREMOVE=1
/// with descriptors or without FDNAME=; a name that is not 1 to 255
/// printable ASCII characters other than `:`; FDPOLL= other than 0 or 1;
/// a HANDOVER_ACK cookie that fails [`check_cookie`] (then `cookie` is
/// None: a bad cookie is never echoed). Never panics, whatever the fields.
pub fn fdstore_request(
    n: &mut Notification,
) -> Option<std::result::Result<FdStoreRequest, FdStoreRefusal>> {
    let has = |field: &str| n.fields.iter().any(|(k, v)| k == field && v == "1");
    let (store, remove) = (has("FDSTORE"), has("FDSTOREREMOVE"));
    if !store && !remove {
        return None;
    }
    let name = n.get("FDNAME");
    let mut refusal = FdStoreRefusal {
        cookie: None,
        name: name.unwrap_or(DEFAULT_FDNAME).to_owned(),
        reason: String::new(),
    };
    let refuse = |mut r: FdStoreRefusal, reason: String| {
        r.reason = reason;
        Some(Err(r))
    };
    let cookie = match n.get(ACK_FIELD) {
        None => None,
        Some(c) if check_cookie(c).is_ok() => Some(c.to_owned()),
        Some(_) => {
            return refuse(
                refusal,
                format!("{ACK_FIELD}= must be 1 to 64 characters from A-Z a-z 0-9 _ -"),
            )
        }
    };
    refusal.cookie = cookie.clone();
    if store && remove {
        return refuse(
            refusal,
            "FDSTORE=1 and FDSTOREREMOVE=1 together in one message".into(),
        );
    }
    if remove && name.is_none() {
        return refuse(refusal, "FDSTOREREMOVE=1 without FDNAME=".into());
    }
    if crate::spawn::check_fdname(&refusal.name).is_err() {
        let shown: String = refusal.name.chars().take(64).collect();
        return refuse(
            refusal,
            format!("FDNAME={shown:?} is not 1 to 255 printable ASCII characters other than ':'"),
        );
    }
    let poll = match n.get("FDPOLL") {
        None | Some("1") => true,
        Some("0") => false,
        Some(_) => return refuse(refusal, "FDPOLL= must be 0 or 1".into()),
    };
    if store && n.handles.is_empty() {
        return refuse(refusal, "FDSTORE=1 without descriptors".into());
    }
    if remove && !n.handles.is_empty() {
        return refuse(
            refusal,
            format!(
                "FDSTOREREMOVE=1 with {} descriptors attached",
                n.handles.len()
            ),
        );
    }
    let name = refusal.name;
    let handles = std::mem::take(&mut n.handles)
        .into_iter()
        .map(|h| h.with_name(name.clone()))
        .collect();
    Some(Ok(FdStoreRequest {
        name,
        remove,
        poll,
        cookie,
        handles,
    }))
}

/// One notification received on a [`NotifySocket`].
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, from the kernel.
    pub pid: u32,
    /// The sender's uid, from the kernel. (Not on Windows, where the pipe
    /// admits only the current user.)
    #[cfg(unix)]
    pub uid: u32,
    /// The fields, in order; a later field of the same name wins in [`get`](Self::get).
    pub fields: Vec<(String, String)>,
    /// Descriptors sent with the message (FDSTORE=1), when the socket was
    /// asked to keep them; otherwise they were closed on arrival. They are
    /// close-on-exec.
    pub handles: Vec<Handle>,
    /// The datagram did not fit (over 4096 bytes, or more control data
    /// than expected: MSG_TRUNC/MSG_CTRUNC). `fields` and `handles` are
    /// empty: whatever descriptors had arrived were closed.
    pub truncated: bool,
    /// Where an answer goes, for [`NotifySocket::reply`]: the sender's
    /// bound address on Unix, its connection on Windows.
    sender: Option<transport::Sender>,
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

    /// Whether the sender's socket has an address, so that
    /// [`NotifySocket::reply`] can answer it.
    pub fn can_reply(&self) -> bool {
        self.sender.is_some()
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

/// The supervisor's end, to put in a child's NOTIFY_SOCKET: a datagram
/// socket on Unix, a pipe on Windows.
#[derive(Debug)]
pub struct NotifySocket {
    inner: transport::Receiver,
    keep_handles: bool,
}

impl NotifySocket {
    /// Binds a fresh abstract socket (a pipe on Windows) with a unique name.
    pub fn bind_unique() -> Result<NotifySocket> {
        Ok(NotifySocket {
            inner: transport::Receiver::bind_unique()?,
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
        let Some(raw) = self.inner.recv(self.keep_handles)? else {
            return Ok(None);
        };
        Ok(Some(Notification {
            pid: raw.pid,
            #[cfg(unix)]
            uid: raw.uid,
            fields: parse(&raw.payload),
            handles: raw.handles,
            truncated: raw.truncated,
            sender: raw.sender,
        }))
    }

    /// Sends `payload` (for an acknowledgement, from [`ack_reply`]) to the
    /// socket `to` came from, without waiting. `Ok(false)` when the sender's
    /// socket is unbound, so nothing can reach it (plain sd_notify senders
    /// are); an error when the sender is gone or its queue is full.
    pub fn reply(&self, to: &Notification, payload: &str) -> Result<bool> {
        let Some(addr) = &to.sender else {
            return Ok(false);
        };
        self.inner.reply(addr, payload.as_bytes())?;
        Ok(true)
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for NotifySocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(all(test, unix))]
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

    fn note(payload: &[u8], handles: usize) -> Notification {
        Notification {
            pid: 1,
            #[cfg(unix)]
            uid: 0,
            fields: parse(payload),
            handles: (0..handles)
                .map(|_| {
                    let (r, _w) = rustix::pipe::pipe().unwrap();
                    Handle::from(r)
                })
                .collect(),
            truncated: false,
            sender: None,
        }
    }

    #[test]
    fn fdstore_requests() {
        assert!(fdstore_request(&mut note(b"READY=1\n", 0)).is_none());
        assert!(fdstore_request(&mut note(b"FDSTORE=0\nFDNAME=x\n", 1)).is_none());
        let mut n = note(
            b"FDSTORE=1\nFDNAME=conn-0\nFDPOLL=0\nHANDOVER_ACK=12-3\n",
            2,
        );
        let r = fdstore_request(&mut n).unwrap().unwrap();
        assert_eq!(
            (r.name.as_str(), r.remove, r.poll, r.cookie.as_deref()),
            ("conn-0", false, false, Some("12-3"))
        );
        assert_eq!(r.handles.len(), 2);
        assert!(n.handles.is_empty());
        assert!(r.handles.iter().all(|h| h.name() == Some("conn-0")));
        let r = fdstore_request(&mut note(b"FDSTORE=1\n", 1))
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.poll, r.cookie),
            (DEFAULT_FDNAME, true, None)
        );
        let r = fdstore_request(&mut note(b"FDSTOREREMOVE=1\nFDNAME=a\n", 0))
            .unwrap()
            .unwrap();
        assert!(r.remove);
        let refused = |p: &[u8], h: usize| fdstore_request(&mut note(p, h)).unwrap().unwrap_err();
        let long = format!("FDSTORE=1\nFDNAME={}\nHANDOVER_ACK=c\n", "x".repeat(256));
        let e = refused(long.as_bytes(), 1);
        assert_eq!(e.cookie.as_deref(), Some("c"));
        assert!(e.reason.contains("FDNAME"), "{e}");
        assert!(refused(b"FDSTORE=1\nFDNAME=a:b\n", 1)
            .reason
            .contains("FDNAME"));
        assert!(refused(b"FDSTORE=1\nFDNAME=a\x01\n", 1)
            .reason
            .contains("FDNAME"));
        assert!(refused(b"FDSTORE=1\nFDNAME=\n", 1)
            .reason
            .contains("FDNAME"));
        assert!(refused(b"FDSTORE=1\nFDNAME=a\n", 0)
            .reason
            .contains("without descriptors"));
        assert!(refused(b"FDSTOREREMOVE=1\n", 0)
            .reason
            .contains("without FDNAME"));
        assert!(refused(b"FDSTOREREMOVE=1\nFDNAME=a\n", 1)
            .reason
            .contains("attached"));
        assert!(refused(b"FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=a\n", 1)
            .reason
            .contains("together"));
        assert!(refused(b"FDSTORE=1\nFDNAME=a\nFDPOLL=yes\n", 1)
            .reason
            .contains("FDPOLL"));
        let e = refused(b"FDSTORE=1\nFDNAME=a\nHANDOVER_ACK=a b\n", 1);
        assert_eq!(e.cookie, None);
        let e = refused(
            format!("FDSTORE=1\nFDNAME=a\nHANDOVER_ACK={}\n", "c".repeat(65)).as_bytes(),
            1,
        );
        assert_eq!(e.cookie, None);
    }

    #[test]
    fn acknowledgements_round_trip() {
        let stored = ack_reply("p-1", &StoreReply::Stored, "conn-0");
        assert_eq!(stored, "HANDOVER_ACK=p-1\nSTATUS=stored\nFDNAME=conn-0\n");
        assert_eq!(
            parse_ack(stored.as_bytes(), "p-1"),
            Some(StoreReply::Stored)
        );
        assert_eq!(parse_ack(stored.as_bytes(), "p-2"), None);
        let removed = ack_reply("p-1", &StoreReply::Removed, "conn-0");
        assert_eq!(
            parse_ack(removed.as_bytes(), "p-1"),
            Some(StoreReply::Removed)
        );
        let refused = ack_reply(
            "p-1",
            &StoreReply::Refused("no\nroom é".repeat(100)),
            "bad:name",
        );
        assert!(!refused.contains("FDNAME"));
        assert_eq!(refused.lines().count(), 3, "{refused}");
        let Some(StoreReply::Refused(reason)) = parse_ack(refused.as_bytes(), "p-1") else {
            panic!("{refused}")
        };
        assert!(reason.starts_with("no room é") && reason.len() <= 512);
        assert!(matches!(
            parse_ack(b"HANDOVER_ACK=p-1\nSTATUS=maybe\n", "p-1"),
            Some(StoreReply::Refused(r)) if r.contains("maybe")
        ));
        assert_eq!(parse_ack(b"\xff\xfe garbage", "p-1"), None);
    }
}
