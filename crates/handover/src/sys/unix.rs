//! Unix: AF_UNIX SOCK_SEQPACKET sockets, SCM_RIGHTS, SO_PEERCRED.

use std::ffi::c_int;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::FileType;

/// Exec in place, beside `spawn_child` (re-exported through this module's
/// glob in `sys`).
pub(crate) use super::unix_spawn::exec_in_place;
use rustix::io::Errno;
use rustix::net::{
    self as rnet, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
    SocketType as RawType,
};

use super::{Direction, Expect};
use crate::handle::{Handle, HandleKind, SocketFamily, SocketInfo, SocketType};
use crate::wire;

pub(crate) type OwnedRaw = OwnedFd;

/// Linux's SO_PEERPIDFD (6.5+): a pidfd for the peer, race-free.
const SO_PEERPIDFD: c_int = 77;
/// Linux's SO_PASSRIGHTS (6.16+): when 0, the kernel refuses to queue
/// SCM_RIGHTS to this socket, so the sender gets EPERM.
const SO_PASSRIGHTS: c_int = 83;

/// Control buffer room for a full frame of handles, plus one spare
/// descriptor so that a frame with too many attached is seen as a count
/// mismatch rather than as truncation where possible.
const CONTROL_SPACE: usize = rustix::cmsg_space!(ScmRights(wire::MAX_FRAME_HANDLES + 1));

pub(crate) fn detect_kind(fd: &OwnedFd) -> io::Result<HandleKind> {
    match rnet::sockopt::socket_type(fd) {
        Ok(raw_type) => Ok(HandleKind::Socket(socket_info(fd, raw_type)?)),
        Err(Errno::NOTSOCK) => {
            let stat = rustix::fs::fstat(fd)?;
            Ok(match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => {
                    // Only shmem-backed files (memfd, shm_open) have seals.
                    if rustix::fs::fcntl_get_seals(fd).is_ok() {
                        HandleKind::SharedMemory
                    } else {
                        HandleKind::File
                    }
                }
                FileType::Fifo => HandleKind::Pipe,
                FileType::Directory => HandleKind::Directory,
                FileType::CharacterDevice => HandleKind::CharDevice,
                _ => HandleKind::Other,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn socket_info(fd: &OwnedFd, raw_type: RawType) -> io::Result<SocketInfo> {
    let family = match rnet::sockopt::socket_domain(fd)? {
        AddressFamily::UNIX => SocketFamily::Unix,
        AddressFamily::INET => SocketFamily::Ipv4,
        AddressFamily::INET6 => SocketFamily::Ipv6,
        _ => SocketFamily::Other,
    };
    let socket_type = match raw_type {
        RawType::STREAM => SocketType::Stream,
        RawType::DGRAM => SocketType::Datagram,
        RawType::SEQPACKET => SocketType::SeqPacket,
        _ => SocketType::Other,
    };
    let listening = matches!(socket_type, SocketType::Stream | SocketType::SeqPacket)
        && rnet::sockopt::socket_acceptconn(fd)?;
    Ok(SocketInfo {
        family,
        socket_type,
        listening,
    })
}

pub(crate) fn check(fd: &OwnedFd, expect: Expect) -> Result<(), Result<HandleKind, io::ErrorKind>> {
    let kind = detect_kind(fd).map_err(|e| Err(e.kind()))?;
    let ok = match (expect, kind) {
        (Expect::File, k) => matches!(k, HandleKind::File | HandleKind::SharedMemory),
        (_, HandleKind::Socket(s)) => {
            let inet = matches!(s.family, SocketFamily::Ipv4 | SocketFamily::Ipv6);
            let unix = s.family == SocketFamily::Unix;
            match expect {
                Expect::TcpListener => inet && stream_listener(s) && is_protocol(fd, "tcp"),
                Expect::TcpStream => {
                    inet && s.socket_type == SocketType::Stream
                        && !s.listening
                        && is_protocol(fd, "tcp")
                }
                Expect::UdpSocket => {
                    inet && s.socket_type == SocketType::Datagram && is_protocol(fd, "udp")
                }
                Expect::UnixListener => unix && stream_listener(s),
                Expect::UnixStream => unix && s.socket_type == SocketType::Stream && !s.listening,
                Expect::UnixDatagram => unix && s.socket_type == SocketType::Datagram,
                Expect::Channel => unix && s.socket_type == SocketType::SeqPacket && !s.listening,
                Expect::File => unreachable!("handled above"),
            }
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Ok(kind))
    }
}

fn stream_listener(s: SocketInfo) -> bool {
    s.socket_type == SocketType::Stream && s.listening
}

fn is_protocol(fd: &OwnedFd, which: &str) -> bool {
    let want = if which == "tcp" {
        rnet::ipproto::TCP
    } else {
        rnet::ipproto::UDP
    };
    // Kernels without SO_PROTOCOL report nothing; the family and type
    // checks have already narrowed it to TCP or UDP there.
    match rnet::sockopt::socket_protocol(fd) {
        Ok(Some(p)) => p == want,
        Ok(None) | Err(_) => true,
    }
}

pub(crate) fn duplicate(fd: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

pub(crate) fn into_tcp_listener(fd: OwnedFd) -> TcpListener {
    fd.into()
}
pub(crate) fn into_tcp_stream(fd: OwnedFd) -> TcpStream {
    fd.into()
}
pub(crate) fn into_udp_socket(fd: OwnedFd) -> UdpSocket {
    fd.into()
}
pub(crate) fn into_file(fd: OwnedFd) -> File {
    fd.into()
}
pub(crate) fn into_unix_listener(fd: OwnedFd) -> UnixListener {
    fd.into()
}
pub(crate) fn into_unix_stream(fd: OwnedFd) -> UnixStream {
    fd.into()
}
pub(crate) fn into_unix_datagram(fd: OwnedFd) -> UnixDatagram {
    fd.into()
}

/// Takes ownership of `count` inherited descriptors from `start` on, after
/// checking that every one is open, and marks them close-on-exec.
pub(crate) fn adopt_inherited(start: i32, count: usize) -> crate::Result<Vec<OwnedFd>> {
    let raws: Vec<i32> = (0..count).map(|i| start + i as i32).collect();
    for &raw in &raws {
        // SAFETY: F_GETFD only asks whether the number is an open descriptor.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(crate::Error::Activation(format!(
                "descriptor {raw} was announced but is not open"
            )));
        }
    }
    Ok(raws
        .into_iter()
        .map(|raw| {
            // SAFETY: the descriptor is open (checked above) and the
            // activation protocol hands it to this process to own; the
            // once-only guard in `activation` keeps a second owner away.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
            fd
        })
        .collect())
}

/// What the OS knows about the process at the other end.
#[derive(Debug)]
pub(crate) struct PeerInfo {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub pidfd: Option<OwnedFd>,
}

/// One frame as received, before validation.
pub(crate) struct Received {
    /// Bytes of the frame in the buffer; 0 with `eof` at end of stream.
    pub len: usize,
    pub eof: bool,
    pub control_truncated: bool,
    pub frame_truncated: bool,
}

/// One end of a channel: a connected AF_UNIX SOCK_SEQPACKET socket.
#[derive(Debug)]
pub(crate) struct Transport(OwnedFd);

impl Transport {
    pub fn pair() -> io::Result<(Transport, Transport)> {
        let (a, b) = rnet::socketpair(
            AddressFamily::UNIX,
            RawType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Transport(a), Transport(b)))
    }

    /// Connects; with a deadline, gives up (TimedOut) when the listener's
    /// backlog stays full until then. A Unix-socket connect never goes
    /// "in progress": it succeeds, fails, or says EAGAIN while the backlog
    /// is full, so waiting means retrying.
    pub fn connect(addr: &Address, deadline: Option<Instant>) -> io::Result<Transport> {
        let fd = seqpacket_socket()?;
        let sockaddr = addr.sockaddr()?;
        let Some(deadline) = deadline else {
            loop {
                match rnet::connect(&fd, &sockaddr) {
                    Err(Errno::INTR) => continue,
                    other => return other.map(|()| Transport(fd)).map_err(Into::into),
                }
            }
        };
        rustix::io::ioctl_fionbio(&fd, true)?;
        let mut pause = std::time::Duration::from_micros(200);
        loop {
            match rnet::connect(&fd, &sockaddr) {
                Ok(()) => break,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        rustix::io::ioctl_fionbio(&fd, false)?;
        Ok(Transport(fd))
    }

    pub fn from_raw(fd: OwnedFd) -> Transport {
        Transport(fd)
    }

    pub fn into_raw(self) -> OwnedFd {
        self.0
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        Ok(rustix::io::ioctl_fionbio(&self.0, on)?)
    }

    /// Asks the kernel to refuse handles sent to this end. Returns false
    /// where the kernel has no SO_PASSRIGHTS, so the caller closes them
    /// in user space instead.
    pub fn refuse_handles(&self) -> io::Result<bool> {
        let off: c_int = 0;
        // SAFETY: the descriptor is open for the duration of the call, and
        // the option value points at a live c_int of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PASSRIGHTS,
                (&off as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(false),
            _ => Err(err),
        }
    }

    pub fn peer(&self) -> io::Result<PeerInfo> {
        let cred = rnet::sockopt::socket_peercred(&self.0)?;
        Ok(PeerInfo {
            pid: rustix::process::Pid::as_raw(Some(cred.pid)) as u32,
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            pidfd: peer_pidfd(&self.0),
        })
    }

    /// Sends one frame: `head` (header and records), then `payload`, with
    /// the handles attached. SOCK_SEQPACKET makes this one atomic record.
    #[inline]
    pub fn send_frame(
        &self,
        head: &[u8],
        payload: &[u8],
        handles: &[Handle],
        nonblocking: bool,
    ) -> io::Result<()> {
        debug_assert!(handles.len() <= wire::MAX_FRAME_HANDLES);
        let mut fds = [MaybeUninit::<BorrowedFd<'_>>::uninit(); wire::MAX_FRAME_HANDLES];
        for (slot, h) in fds.iter_mut().zip(handles) {
            slot.write(h.raw.as_fd());
        }
        // SAFETY: the first `handles.len()` slots were written just above.
        let fds = unsafe {
            std::slice::from_raw_parts(fds.as_ptr().cast::<BorrowedFd<'_>>(), handles.len())
        };
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
            debug_assert!(pushed, "control space is sized for a full frame");
        }
        let iov = [IoSlice::new(head), IoSlice::new(payload)];
        let mut flags = SendFlags::NOSIGNAL;
        if nonblocking {
            flags |= SendFlags::DONTWAIT;
        }
        loop {
            match rnet::sendmsg(&self.0, &iov, &mut control, flags) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one frame into `buf`, moving any attached descriptors into
    /// `handles` as owned values at once (handles with no name or kind yet),
    /// so that every later error path closes them by dropping. With
    /// `accept_handles` false the control buffer is empty: the kernel then
    /// discards attached descriptors without installing them, and reports
    /// MSG_CTRUNC.
    #[inline]
    pub fn recv_frame(
        &self,
        buf: &mut [u8],
        handles: &mut Vec<Handle>,
        accept_handles: bool,
        nonblocking: bool,
    ) -> io::Result<Received> {
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let room = if accept_handles { CONTROL_SPACE } else { 0 };
        let mut control = RecvAncillaryBuffer::new(&mut space[..room]);
        let mut flags = RecvFlags::CMSG_CLOEXEC;
        if nonblocking {
            flags |= RecvFlags::DONTWAIT;
        }
        let msg = loop {
            let mut iov = [IoSliceMut::new(buf)];
            match rnet::recvmsg(&self.0, &mut iov, &mut control, flags) {
                Ok(m) => break m,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                handles.extend(fds.map(Handle::received));
            }
        }
        let control_truncated = msg.flags.contains(ReturnFlags::CTRUNC);
        // End of stream and an empty record both read as 0 bytes. An empty
        // record is never a valid frame; it only counts as the end when the
        // peer has really shut down, so that a live peer cannot fake a
        // clean close by sending nothing.
        let empty = msg.bytes == 0 && handles.is_empty() && !control_truncated;
        Ok(Received {
            len: msg.bytes.min(buf.len()),
            eof: empty && self.peer_hung_up()?,
            control_truncated,
            frame_truncated: msg.flags.contains(ReturnFlags::TRUNC),
        })
    }

    fn peer_hung_up(&self) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.0, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&now))?;
        Ok(fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP))
    }

    /// Waits until the socket is ready, or the deadline passes (false).
    pub fn wait(&self, direction: Direction, deadline: Option<Instant>) -> io::Result<bool> {
        wait_fd(self.0.as_fd(), direction, deadline)
    }
}

/// Waits for readiness; `None` waits without limit. False means the
/// deadline passed first.
fn wait_fd(
    fd: BorrowedFd<'_>,
    direction: Direction,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let events = match direction {
        Direction::Read => PollFlags::IN,
        Direction::Write => PollFlags::OUT,
    };
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let timeout = left.map(|left| Timespec {
            tv_sec: left.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: left.subsec_nanos() as _,
        });
        let mut fds = [PollFd::new(&fd, events)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) if left.is_some_and(|l| l.is_zero()) => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Maps a failed sendmsg to what it means for a channel.
pub(crate) fn send_error(e: io::Error) -> crate::Error {
    match Errno::from_io_error(&e) {
        Some(Errno::PIPE) | Some(Errno::CONNRESET) => crate::Error::Disconnected,
        // SO_PASSRIGHTS=0 at the peer makes the kernel refuse SCM_RIGHTS.
        Some(Errno::PERM) => crate::Error::PeerRefusesHandles,
        _ => crate::Error::Io {
            op: "sendmsg",
            source: e,
        },
    }
}

fn peer_pidfd(fd: &OwnedFd) -> Option<OwnedFd> {
    let mut raw: c_int = -1;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the duration of the call, and the
    // out-pointers refer to a live c_int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut raw as *mut c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || raw < 0 {
        return None;
    }
    // SAFETY: on success the kernel installed a new descriptor that nothing
    // else owns; the kernel marks it close-on-exec.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(rnet::socket_with(
        AddressFamily::UNIX,
        RawType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Where a channel listener lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Address {
    Path(PathBuf),
    /// A Linux abstract socket name: no file, gone with the last socket.
    Name(String),
}

impl Address {
    fn sockaddr(&self) -> io::Result<SocketAddrUnix> {
        Ok(match self {
            Address::Path(p) => SocketAddrUnix::new(p.as_path())?,
            Address::Name(n) => SocketAddrUnix::new_abstract_name(n.as_bytes())?,
        })
    }
}

/// A socket file this process created. It is removed on drop, unless
/// another socket has replaced the file meanwhile.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn record(path: &Path) -> io::Result<SocketFile> {
        let st = rustix::fs::stat(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(st) = rustix::fs::stat(self.path.as_path()) {
            if st.st_dev == self.dev && st.st_ino == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `sockaddr` on `fd`, replacing a stale socket file at `path`.
fn bind_replacing_stale(
    fd: &OwnedFd,
    sockaddr: &SocketAddrUnix,
    path: Option<&Path>,
) -> io::Result<()> {
    match rnet::bind(fd, sockaddr) {
        Ok(()) => Ok(()),
        Err(Errno::ADDRINUSE) => match path {
            Some(path) if is_stale_socket(path) => {
                std::fs::remove_file(path)?;
                Ok(rnet::bind(fd, sockaddr)?)
            }
            _ => Err(Errno::ADDRINUSE.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// A listening channel socket; a socket file it created goes with it.
#[derive(Debug)]
pub(crate) struct Listener {
    fd: OwnedFd,
    _file: Option<SocketFile>,
}

impl Listener {
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        let fd = seqpacket_socket()?;
        let path = match addr {
            Address::Path(p) => Some(p.as_path()),
            Address::Name(_) => None,
        };
        bind_replacing_stale(&fd, &addr.sockaddr()?, path)?;
        let file = path.map(SocketFile::record).transpose()?;
        rnet::listen(&fd, 128)?;
        Ok(Listener { fd, _file: file })
    }

    pub fn accept(&self, nonblocking: bool) -> io::Result<Transport> {
        let flags = if nonblocking {
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK
        } else {
            SocketFlags::CLOEXEC
        };
        loop {
            match rnet::accept_with(&self.fd, flags) {
                Ok(fd) => return Ok(Transport(fd)),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        Ok(rustix::io::ioctl_fionbio(&self.fd, on)?)
    }

    pub fn wait(&self, deadline: Option<Instant>) -> io::Result<bool> {
        wait_fd(self.fd.as_fd(), Direction::Read, deadline)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A socket file nobody listens on any more: safe to replace.
fn is_stale_socket(path: &Path) -> bool {
    let Ok(st) = rustix::fs::lstat(path) else {
        return false;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return false;
    }
    let probe = |ty| -> bool {
        let Ok(fd) = rnet::socket_with(AddressFamily::UNIX, ty, SocketFlags::CLOEXEC, None) else {
            return false;
        };
        let Ok(addr) = SocketAddrUnix::new(path) else {
            return false;
        };
        matches!(rnet::connect(&fd, &addr), Err(Errno::CONNREFUSED))
    };
    probe(RawType::SEQPACKET) && probe(RawType::STREAM)
}

pub(crate) const EAFNOSUPPORT: i32 = libc::EAFNOSUPPORT;

/// A bound TCP or UDP socket, described by its real local address.
pub(crate) fn bind_inet(
    addr: std::net::SocketAddr,
    udp: bool,
    dual_stack: bool,
    backlog: i32,
) -> io::Result<(OwnedFd, String, Option<SocketFile>)> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let ty = if udp { RawType::DGRAM } else { RawType::STREAM };
    let fd = rnet::socket_with(family, ty, SocketFlags::CLOEXEC, None)?;
    // Inet only: lets a restarted server bind while old connections linger
    // in TIME_WAIT. Never on Unix sockets, where it means nothing useful.
    rnet::sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv6() {
        rnet::sockopt::set_ipv6_v6only(&fd, !dual_stack)?;
    }
    rnet::bind(&fd, &addr)?;
    if !udp {
        rnet::listen(&fd, backlog)?;
    }
    let local = std::net::SocketAddr::try_from(rnet::getsockname(&fd)?)
        .map(|a| format!("{}{a}", if udp { "udp:" } else { "" }))
        .unwrap_or_else(|_| addr.to_string());
    Ok((fd, local, None))
}

/// A bound Unix socket on a path or an abstract name.
pub(crate) fn bind_unix(
    addr: &crate::listen::ListenAddr,
    options: &crate::listen::ListenOptions,
) -> io::Result<(OwnedFd, String, Option<SocketFile>)> {
    use crate::listen::{ListenAddr, UnixType};
    let (sockaddr, path, ty, local) = match addr {
        ListenAddr::UnixPath(p, ty) => (
            SocketAddrUnix::new(p.as_path())?,
            Some(p.as_path()),
            *ty,
            p.display().to_string(),
        ),
        ListenAddr::UnixAbstract(n, ty) => (
            SocketAddrUnix::new_abstract_name(n.as_bytes())?,
            None,
            *ty,
            format!("@{n}"),
        ),
        _ => return Err(io::ErrorKind::InvalidInput.into()),
    };
    let raw_type = match ty {
        UnixType::Stream => RawType::STREAM,
        UnixType::Datagram => RawType::DGRAM,
        UnixType::SeqPacket => RawType::SEQPACKET,
    };
    let fd = rnet::socket_with(AddressFamily::UNIX, raw_type, SocketFlags::CLOEXEC, None)?;
    bind_replacing_stale(&fd, &sockaddr, path)?;
    let file = path.map(SocketFile::record).transpose()?;
    if let Some(path) = path {
        if let Some(mode) = options.socket_mode {
            rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode))?;
        }
        if let Some((uid, gid)) = options.socket_owner {
            rustix::fs::chown(
                path,
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
    }
    if ty != UnixType::Datagram {
        rnet::listen(&fd, options.backlog)?;
    }
    Ok((fd, local, file))
}

/// A datagram from a NOTIFY_SOCKET sender, with kernel-given credentials.
pub(crate) struct RawNotification {
    pub pid: u32,
    pub uid: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Where the sender's socket is bound (None when it is unbound, so no
    /// reply can reach it).
    pub sender: Option<SocketAddrUnix>,
    /// The datagram did not fit (MSG_TRUNC or MSG_CTRUNC): its payload is
    /// empty and the descriptors that arrived were closed.
    pub truncated: bool,
}

/// The largest notification handled, as systemd's NOTIFY_BUFFER_MAX.
const NOTIFY_BUFFER: usize = 4096;

/// The receiving end of the sd_notify protocol: an abstract datagram
/// socket with SO_PASSCRED, so every message comes with the sender's pid.
#[derive(Debug)]
pub(crate) struct NotifyReceiver {
    fd: OwnedFd,
    address: String,
}

impl NotifyReceiver {
    pub fn bind_unique() -> io::Result<NotifyReceiver> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "handover/notify/{}/{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let fd = rnet::socket_with(
            AddressFamily::UNIX,
            RawType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rnet::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
        rnet::sockopt::set_socket_passcred(&fd, true)?;
        Ok(NotifyReceiver {
            fd,
            address: format!("@{name}"),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// One datagram, or None when nothing is queued. Descriptors are
    /// closed unless `keep_fds`, and always for a truncated datagram,
    /// which is returned with `truncated` set and no payload. Descriptors
    /// are received close-on-exec (MSG_CMSG_CLOEXEC).
    pub fn recv(&self, keep_fds: bool) -> io::Result<Option<RawNotification>> {
        const SPACE: usize = rustix::cmsg_space!(ScmRights(253), ScmCredentials(1));
        loop {
            let mut buf = vec![0u8; NOTIFY_BUFFER];
            let mut space = [MaybeUninit::<u8>::uninit(); SPACE];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                match rnet::recvmsg(
                    &self.fd,
                    &mut iov,
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
                ) {
                    Ok(m) => m,
                    Err(Errno::AGAIN) => return Ok(None),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            // Every descriptor becomes an OwnedFd here, before any check,
            // so that each path below closes what it does not keep.
            let mut fds = Vec::new();
            let mut cred = None;
            for m in control.drain() {
                match m {
                    RecvAncillaryMessage::ScmRights(it) => fds.extend(it),
                    RecvAncillaryMessage::ScmCredentials(c) => cred = Some(c),
                    _ => {}
                }
            }
            let Some(cred) = cred else { continue };
            let truncated =
                msg.flags.contains(ReturnFlags::TRUNC) || msg.flags.contains(ReturnFlags::CTRUNC);
            if truncated {
                buf.clear();
                fds.clear();
            } else {
                buf.truncate(msg.bytes);
            }
            if !keep_fds {
                fds.clear();
            }
            let sender = msg
                .address
                .and_then(|a| SocketAddrUnix::try_from(a).ok())
                .filter(|a| !a.is_unnamed());
            return Ok(Some(RawNotification {
                pid: rustix::process::Pid::as_raw(Some(cred.pid)) as u32,
                uid: cred.uid.as_raw(),
                payload: buf,
                fds,
                sender,
                truncated,
            }));
        }
    }

    /// Sends one datagram to a sender's address, without waiting: a full
    /// receive queue there is an error (EAGAIN), not a stall.
    pub fn reply(&self, to: &SocketAddrUnix, payload: &[u8]) -> io::Result<()> {
        loop {
            match rnet::sendto(
                &self.fd,
                payload,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                to,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn notify_target(target: &str) -> io::Result<SocketAddrUnix> {
    Ok(match target.strip_prefix('@') {
        Some(name) => SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        None => SocketAddrUnix::new(target)?,
    })
}

fn notify_control<'a>(
    space: &'a mut [MaybeUninit<u8>],
    fds: &'a [BorrowedFd<'a>],
) -> io::Result<SendAncillaryBuffer<'a, 'a, 'a>> {
    let mut control = SendAncillaryBuffer::new(space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    Ok(control)
}

/// Sends one sd_notify datagram to `target` ("@abstract" or a path).
pub(crate) fn notify_send(target: &str, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let addr = notify_target(target)?;
    let fd = rnet::socket_with(
        AddressFamily::UNIX,
        RawType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
    let mut control = notify_control(&mut space, fds)?;
    rnet::sendmsg_addr(
        &fd,
        &addr,
        &[IoSlice::new(payload)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// The client end of a notification that expects an answer: a datagram
/// socket autobound to a kernel-chosen abstract address and connected to
/// the supervisor, so that the kernel delivers datagrams from the
/// supervisor's socket only (anyone else's sendto fails with EPERM).
pub(crate) struct NotifyClient {
    fd: OwnedFd,
}

impl NotifyClient {
    pub fn connect(target: &str) -> io::Result<NotifyClient> {
        let addr = notify_target(target)?;
        let fd = rnet::socket_with(
            AddressFamily::UNIX,
            RawType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        // An unnamed address asks the kernel to autobind.
        rnet::bind(&fd, &SocketAddrUnix::new_unnamed())?;
        rnet::connect(&fd, &addr)?;
        Ok(NotifyClient { fd })
    }

    /// Sends one datagram; false when the supervisor's queue stayed full
    /// until the deadline.
    pub fn send(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> io::Result<bool> {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
        loop {
            let mut control = notify_control(&mut space, fds)?;
            match rnet::sendmsg(
                &self.fd,
                &[IoSlice::new(payload)],
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(_) => return Ok(true),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    if !wait_fd(self.fd.as_fd(), Direction::Write, Some(deadline))? {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One datagram's payload, or None once the deadline has passed.
    /// Descriptors attached to it (none should be) are closed.
    pub fn recv(&self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if !wait_fd(self.fd.as_fd(), Direction::Read, Some(deadline))? {
                return Ok(None);
            }
            let mut buf = vec![0u8; NOTIFY_BUFFER];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match rnet::recvmsg(
                &self.fd,
                &mut iov,
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Ok(m) => m,
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(it) = m {
                    it.for_each(drop);
                }
            }
            if msg.flags.contains(ReturnFlags::TRUNC) {
                continue;
            }
            buf.truncate(msg.bytes);
            return Ok(Some(buf));
        }
    }
}
