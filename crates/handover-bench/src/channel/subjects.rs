//! The blocking subjects, each behind the same small interface so that one
//! driver measures them all the same way.

use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use handover::{Channel, Handle};
use passfd::FdPassingExt;
use rustix::io::Errno;
use rustix::net::{
    self as rnet, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use sendfd::{RecvWithFd, SendWithFd};

/// The most descriptors one sendmsg may carry on Linux (SCM_MAX_FD).
pub const MAX_PER_MESSAGE: usize = 253;

/// How long a receiver on a socket without end-of-stream (a datagram
/// pair) waits before deciding its peer is gone.
const STALL: Duration = Duration::from_secs(10);

/// One end of a connection under test. Each end is made with the
/// descriptors it sends in every message (borrowed for `'f`; a subject that
/// needs owned ones duplicates them once, up front).
pub trait End<'f>: Sized + Send {
    /// Two connected ends: the first sends `a` in every message, the
    /// second `b`.
    fn pair(a: &'f [OwnedFd], b: &'f [OwnedFd]) -> Result<(Self, Self)>;

    /// Sends one message carrying this end's descriptors.
    fn send(&mut self) -> Result<()>;

    /// Receives one message of `expect` descriptors (a subject that cannot
    /// tell where a message ends uses this; the others report what came),
    /// closes every descriptor in it, and returns how many there were.
    /// `None` once the peer has finished.
    fn recv(&mut self, expect: usize) -> Result<Option<usize>>;

    /// Tells the peer that no more messages will come.
    fn finish(self) -> Result<()> {
        Ok(())
    }
}

fn count_bytes(n: usize) -> [u8; 4] {
    (n as u32).to_le_bytes()
}

/// The baseline: what a program would write by hand with rustix. One
/// sendmsg per message with a 4-byte count and SCM_RIGHTS; one recvmsg per
/// message with room for SCM_MAX_FD descriptors, received close-on-exec
/// (as every library should) and closed at once.
pub struct PlainEnd<'f> {
    sock: OwnedFd,
    fds: Vec<BorrowedFd<'f>>,
    count: [u8; 4],
}

const PLAIN_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_PER_MESSAGE));

impl<'f> End<'f> for PlainEnd<'f> {
    fn pair(a: &'f [OwnedFd], b: &'f [OwnedFd]) -> Result<(Self, Self)> {
        let (x, y) = rnet::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let end = |sock, fds: &'f [OwnedFd]| PlainEnd {
            sock,
            fds: fds.iter().map(AsFd::as_fd).collect(),
            count: count_bytes(fds.len()),
        };
        Ok((end(x, a), end(y, b)))
    }

    fn send(&mut self) -> Result<()> {
        let mut space = [MaybeUninit::<u8>::uninit(); PLAIN_SPACE];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !self.fds.is_empty() {
            ensure!(control.push(SendAncillaryMessage::ScmRights(&self.fds)));
        }
        let iov = [IoSlice::new(&self.count)];
        loop {
            match rnet::sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(4) => return Ok(()),
                Ok(k) => bail!("sendmsg took {k} of 4 bytes"),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e).context("sendmsg"),
            }
        }
    }

    fn recv(&mut self, _expect: usize) -> Result<Option<usize>> {
        let mut space = [MaybeUninit::<u8>::uninit(); PLAIN_SPACE];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut buf = [0u8; 8];
        let msg = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match rnet::recvmsg(&self.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(m) => break m,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e).context("recvmsg"),
            }
        };
        let mut got = 0;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                for fd in fds {
                    drop(fd);
                    got += 1;
                }
            }
        }
        ensure!(
            !msg.flags
                .intersects(ReturnFlags::CTRUNC | ReturnFlags::TRUNC),
            "truncated message"
        );
        if msg.bytes == 0 && got == 0 {
            return Ok(None);
        }
        ensure!(msg.bytes == 4, "a {}-byte message", msg.bytes);
        let announced = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        ensure!(
            announced == got,
            "{announced} handles announced, {got} came"
        );
        Ok(Some(got))
    }
}

/// The blocking [`handover::Channel`]. Its handles are made once (each a
/// duplicate of the descriptor given) and sent again and again.
pub struct HandoverEnd {
    ch: Channel,
    handles: Vec<Handle>,
}

impl<'f> End<'f> for HandoverEnd {
    fn pair(a: &'f [OwnedFd], b: &'f [OwnedFd]) -> Result<(Self, Self)> {
        let (x, y) = Channel::pair()?;
        let handles = |fds: &[OwnedFd]| -> Result<Vec<Handle>> {
            fds.iter()
                .map(|fd| Ok(Handle::from(fd.try_clone()?)))
                .collect()
        };
        Ok((
            HandoverEnd {
                ch: x,
                handles: handles(a)?,
            },
            HandoverEnd {
                ch: y,
                handles: handles(b)?,
            },
        ))
    }

    fn send(&mut self) -> Result<()> {
        Ok(self.ch.send(&[], &self.handles)?)
    }

    fn recv(&mut self, _expect: usize) -> Result<Option<usize>> {
        // Dropping the message closes its handles.
        Ok(self.ch.recv()?.map(|m| m.handles.len()))
    }
}

/// A descriptor the kernel has just installed in this process, now owned.
fn adopt(raw: RawFd) -> Result<OwnedFd> {
    ensure!(raw >= 0, "a negative descriptor");
    // SAFETY: `raw` was just installed by recvmsg (SCM_RIGHTS) inside the
    // crate that returned it, and nothing else in this process knows it or
    // will close it; from here the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Crate sendfd 0.4 on a UnixDatagram pair (one datagram per message).
/// A datagram pair has no end of stream, so finishing sends an empty
/// message with a count of zero.
pub struct SendfdEnd<'f> {
    sock: UnixDatagram,
    fds: Vec<RawFd>,
    count: [u8; 4],
    incoming: Vec<RawFd>,
    _fds: std::marker::PhantomData<&'f OwnedFd>,
}

impl<'f> End<'f> for SendfdEnd<'f> {
    fn pair(a: &'f [OwnedFd], b: &'f [OwnedFd]) -> Result<(Self, Self)> {
        let (x, y) = UnixDatagram::pair()?;
        let end = |sock: UnixDatagram, fds: &'f [OwnedFd]| -> Result<Self> {
            sock.set_read_timeout(Some(STALL))?;
            Ok(SendfdEnd {
                sock,
                // Valid for 'f, which the PhantomData ties this end to.
                fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
                count: count_bytes(fds.len()),
                incoming: vec![-1; MAX_PER_MESSAGE],
                _fds: std::marker::PhantomData,
            })
        };
        Ok((end(x, a)?, end(y, b)?))
    }

    fn send(&mut self) -> Result<()> {
        let sent = self.sock.send_with_fd(&self.count, &self.fds)?;
        ensure!(sent == 4, "sent {sent} of 4 bytes");
        Ok(())
    }

    fn recv(&mut self, _expect: usize) -> Result<Option<usize>> {
        let mut buf = [0u8; 8];
        let (bytes, got) = self
            .sock
            .recv_with_fd(&mut buf, &mut self.incoming)
            .context("recv_with_fd")?;
        for &raw in &self.incoming[..got] {
            drop(adopt(raw)?);
        }
        ensure!(bytes == 4, "a {bytes}-byte message");
        let announced = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if announced == 0 && got == 0 {
            return Ok(None);
        }
        ensure!(
            announced == got,
            "{announced} handles announced, {got} came"
        );
        Ok(Some(got))
    }

    fn finish(self) -> Result<()> {
        self.sock.send(&count_bytes(0))?;
        Ok(())
    }
}

/// Crate passfd 0.1 on a UnixStream pair. It sends one descriptor per
/// call (with a 4-byte dummy payload), so a message of N handles is N
/// calls on each side.
pub struct PassfdEnd<'f> {
    sock: UnixStream,
    fds: Vec<RawFd>,
    _fds: std::marker::PhantomData<&'f OwnedFd>,
}

impl<'f> End<'f> for PassfdEnd<'f> {
    fn pair(a: &'f [OwnedFd], b: &'f [OwnedFd]) -> Result<(Self, Self)> {
        let (x, y) = UnixStream::pair()?;
        let end = |sock, fds: &'f [OwnedFd]| PassfdEnd {
            sock,
            // Valid for 'f, which the PhantomData ties this end to.
            fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
            _fds: std::marker::PhantomData,
        };
        Ok((end(x, a), end(y, b)))
    }

    fn send(&mut self) -> Result<()> {
        for &fd in &self.fds {
            self.sock.send_fd(fd).context("send_fd")?;
        }
        Ok(())
    }

    fn recv(&mut self, expect: usize) -> Result<Option<usize>> {
        for i in 0..expect {
            match self.sock.recv_fd() {
                Ok(raw) => drop(adopt(raw)?),
                Err(e) if i == 0 && e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e).context(format!("recv_fd, {i} of {expect} in")),
            }
        }
        Ok(Some(expect))
    }
}
