//! Windows: message-mode named pipes; sockets as WSAPROTOCOL_INFOW, other
//! handles pulled by the receiver out of the sender's process.
//!
//! Every frame is one pipe message. Handles travel in the records' `value`
//! and `extra` fields (docs/protocol.md, "Windows"):
//!
//! - a socket: `extra` is a WSAPROTOCOL_INFOW made for the peer's pid by
//!   WSADuplicateSocketW, `value` is 0; the receiver rebuilds it with
//!   WSASocketW(FROM_PROTOCOL_INFO).
//! - any other handle: the sender makes a non-inheritable transfer copy in
//!   its own process and sends its value; the receiver duplicates it out
//!   of the sender's process (never closing the source) and acknowledges
//!   the frame, and only then does the sender close its copies. A value
//!   off the wire can therefore only ever name a handle of the sender.
//!
//! All pipe I/O is overlapped, so that waits can have deadlines.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::windows::io::{
    AsRawHandle, AsRawSocket, FromRawHandle, FromRawSocket, IntoRawHandle, IntoRawSocket,
    OwnedHandle, OwnedSocket, RawHandle,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Instant;

use windows_sys::Win32::Foundation::{
    DuplicateHandle, GetLastError, DUPLICATE_SAME_ACCESS, ERROR_BROKEN_PIPE, ERROR_IO_INCOMPLETE,
    ERROR_IO_PENDING, ERROR_MORE_DATA, ERROR_NO_DATA, ERROR_OPERATION_ABORTED, ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED, ERROR_PIPE_NOT_CONNECTED, GENERIC_READ, GENERIC_WRITE, HANDLE,
    INVALID_HANDLE_VALUE, WAIT_OBJECT_0, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    getsockopt, WSADuplicateSocketW, WSAGetLastError, WSASocketW, WSAStartup, AF_INET, AF_INET6,
    AF_UNIX, FROM_PROTOCOL_INFO, INVALID_SOCKET, IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM,
    SOCK_SEQPACKET, SOCK_STREAM, SOL_SOCKET, SO_ACCEPTCONN, SO_PROTOCOL_INFOW, SO_TYPE, WSADATA,
    WSAPROTOCOL_INFOW, WSA_FLAG_NO_HANDLE_INHERIT, WSA_FLAG_OVERLAPPED,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, GetFileInformationByHandle, GetFileType, ReadFile, WriteFile,
    BY_HANDLE_FILE_INFORMATION, FILE_ATTRIBUTE_DIRECTORY, FILE_FLAG_FIRST_PIPE_INSTANCE,
    FILE_FLAG_OVERLAPPED, FILE_TYPE_CHAR, FILE_TYPE_DISK, FILE_TYPE_PIPE, OPEN_EXISTING,
    PIPE_ACCESS_DUPLEX, SECURITY_IDENTIFICATION, SECURITY_SQOS_PRESENT,
};
use windows_sys::Win32::System::Pipes::{
    ConnectNamedPipe, CreateNamedPipeW, GetNamedPipeClientProcessId, GetNamedPipeInfo,
    GetNamedPipeServerProcessId, SetNamedPipeHandleState, WaitNamedPipeW, PIPE_READMODE_MESSAGE,
    PIPE_REJECT_REMOTE_CLIENTS, PIPE_SERVER_END, PIPE_TYPE_MESSAGE, PIPE_UNLIMITED_INSTANCES,
    PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{
    CreateEventW, GetCurrentProcess, OpenProcess, WaitForSingleObject, INFINITE,
    PROCESS_DUP_HANDLE, PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

use super::{Direction, Expect};
use crate::handle::{Handle, HandleKind, SocketFamily, SocketInfo, SocketType};
use crate::wire;

/// An owned Windows handle: a kernel object handle or a Winsock socket.
#[derive(Debug)]
pub(crate) enum OwnedRaw {
    Handle(OwnedHandle),
    Socket(OwnedSocket),
}

impl From<OwnedHandle> for OwnedRaw {
    fn from(h: OwnedHandle) -> Self {
        OwnedRaw::Handle(h)
    }
}
impl From<OwnedSocket> for OwnedRaw {
    fn from(s: OwnedSocket) -> Self {
        OwnedRaw::Socket(s)
    }
}
impl From<File> for OwnedRaw {
    fn from(f: File) -> Self {
        OwnedRaw::Handle(f.into())
    }
}
macro_rules! socket_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for OwnedRaw {
            fn from(s: $ty) -> Self {
                OwnedRaw::Socket(s.into())
            }
        }
    )*};
}
socket_from!(TcpListener, TcpStream, UdpSocket);

/// The size of a socket's record data: one WSAPROTOCOL_INFOW.
const PROTOCOL_INFO_LEN: usize = std::mem::size_of::<WSAPROTOCOL_INFOW>();

pub(crate) fn extra_len(raw: &OwnedRaw) -> usize {
    match raw {
        OwnedRaw::Socket(_) => PROTOCOL_INFO_LEN,
        OwnedRaw::Handle(_) => 0,
    }
}

pub(crate) fn winsock_init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: WSADATA is plain data that WSAStartup fills in. Winsock
        // counts start-ups; this one is never undone, as std's is not.
        unsafe {
            let mut data: WSADATA = std::mem::zeroed();
            WSAStartup(0x202, &mut data);
        }
    });
}

fn wsa_error() -> io::Error {
    // SAFETY: reads the calling thread's last Winsock error.
    io::Error::from_raw_os_error(unsafe { WSAGetLastError() })
}

pub(crate) fn sockopt_int(s: &OwnedSocket, opt: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as i32;
    // SAFETY: the socket is open for the call; the out-pointers refer to a
    // live i32 and its length.
    let rc = unsafe {
        getsockopt(
            s.as_raw_socket() as usize,
            SOL_SOCKET,
            opt,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(wsa_error());
    }
    Ok(value)
}

fn protocol_info(s: &OwnedSocket) -> io::Result<WSAPROTOCOL_INFOW> {
    // SAFETY: WSAPROTOCOL_INFOW is plain data; all zeroes is a valid value.
    let mut info: WSAPROTOCOL_INFOW = unsafe { std::mem::zeroed() };
    let mut len = PROTOCOL_INFO_LEN as i32;
    // SAFETY: the socket is open; the out-pointers refer to a live
    // WSAPROTOCOL_INFOW and its length.
    let rc = unsafe {
        getsockopt(
            s.as_raw_socket() as usize,
            SOL_SOCKET,
            SO_PROTOCOL_INFOW,
            (&mut info as *mut WSAPROTOCOL_INFOW).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(wsa_error());
    }
    Ok(info)
}

fn socket_info(s: &OwnedSocket) -> io::Result<(SocketInfo, i32)> {
    let ty = sockopt_int(s, SO_TYPE)?;
    let info = protocol_info(s)?;
    let family = match info.iAddressFamily as u16 {
        AF_INET => SocketFamily::Ipv4,
        AF_INET6 => SocketFamily::Ipv6,
        AF_UNIX => SocketFamily::Unix,
        _ => SocketFamily::Other,
    };
    let socket_type = match ty {
        SOCK_STREAM => SocketType::Stream,
        SOCK_DGRAM => SocketType::Datagram,
        SOCK_SEQPACKET => SocketType::SeqPacket,
        _ => SocketType::Other,
    };
    let listening = matches!(socket_type, SocketType::Stream | SocketType::SeqPacket)
        && sockopt_int(s, SO_ACCEPTCONN)? != 0;
    Ok((
        SocketInfo {
            family,
            socket_type,
            listening,
        },
        info.iProtocol,
    ))
}

fn raw(h: &OwnedHandle) -> HANDLE {
    h.as_raw_handle() as HANDLE
}

pub(crate) fn detect_kind(raw_handle: &OwnedRaw) -> io::Result<HandleKind> {
    let h = match raw_handle {
        OwnedRaw::Socket(s) => return Ok(HandleKind::Socket(socket_info(s)?.0)),
        OwnedRaw::Handle(h) => h,
    };
    // SAFETY: the handle is open for the call.
    let ty = unsafe { GetFileType(raw(h)) };
    Ok(match ty {
        FILE_TYPE_DISK => {
            // SAFETY: plain data, filled in by the call.
            let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
            // SAFETY: the handle is open; `info` is live and writable.
            let ok = unsafe { GetFileInformationByHandle(raw(h), &mut info) } != 0;
            if ok && info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0 {
                HandleKind::Directory
            } else {
                HandleKind::File
            }
        }
        FILE_TYPE_PIPE => HandleKind::Pipe,
        FILE_TYPE_CHAR => HandleKind::CharDevice,
        // Sections (file mappings), events, processes, …: telling them
        // apart takes NtQueryObject, which this version does not use.
        _ => HandleKind::Other,
    })
}

pub(crate) fn check(
    raw_handle: &OwnedRaw,
    expect: Expect,
) -> Result<(), Result<HandleKind, io::ErrorKind>> {
    let kind = detect_kind(raw_handle).map_err(|e| Err(e.kind()))?;
    let ok = match (raw_handle, expect) {
        (OwnedRaw::Handle(_), Expect::File) => kind == HandleKind::File,
        (OwnedRaw::Handle(h), Expect::Channel) => kind == HandleKind::Pipe && is_message_pipe(h),
        (OwnedRaw::Socket(s), _) => {
            let (info, protocol) = socket_info(s).map_err(|e| Err(e.kind()))?;
            let inet = matches!(info.family, SocketFamily::Ipv4 | SocketFamily::Ipv6);
            let tcp = protocol == IPPROTO_TCP;
            match expect {
                Expect::TcpListener => {
                    inet && tcp && info.socket_type == SocketType::Stream && info.listening
                }
                Expect::TcpStream => {
                    inet && tcp && info.socket_type == SocketType::Stream && !info.listening
                }
                Expect::UdpSocket => {
                    inet && info.socket_type == SocketType::Datagram && protocol == IPPROTO_UDP
                }
                _ => false,
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

fn pipe_flags(h: HANDLE) -> Option<u32> {
    let mut flags = 0;
    // SAFETY: the handle is open; the other out-pointers may be null.
    let ok = unsafe {
        GetNamedPipeInfo(
            h,
            &mut flags,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    (ok != 0).then_some(flags)
}

fn is_message_pipe(h: &OwnedHandle) -> bool {
    pipe_flags(raw(h)).is_some_and(|f| f & PIPE_TYPE_MESSAGE != 0)
}

pub(crate) fn duplicate(raw_handle: &OwnedRaw) -> io::Result<OwnedRaw> {
    Ok(match raw_handle {
        // DuplicateHandle, same access, not inheritable.
        OwnedRaw::Handle(h) => OwnedRaw::Handle(h.try_clone()?),
        // WSADuplicateSocketW to this process, then WSASocketW.
        OwnedRaw::Socket(s) => OwnedRaw::Socket(s.try_clone()?),
    })
}

/// A socket made out of what `check` found to be a socket. `check` never
/// passes a plain handle for a socket type, so the second arm is only
/// there to keep ownership total.
fn into_socket(r: OwnedRaw) -> OwnedSocket {
    match r {
        OwnedRaw::Socket(s) => s,
        // SAFETY: the value is owned and passed on as owned; a SOCKET is a
        // kernel handle for every in-box Winsock provider.
        OwnedRaw::Handle(h) => unsafe { OwnedSocket::from_raw_socket(h.into_raw_handle() as u64) },
    }
}

pub(crate) fn into_tcp_listener(r: OwnedRaw) -> TcpListener {
    into_socket(r).into()
}
pub(crate) fn into_tcp_stream(r: OwnedRaw) -> TcpStream {
    into_socket(r).into()
}
pub(crate) fn into_udp_socket(r: OwnedRaw) -> UdpSocket {
    into_socket(r).into()
}
pub(crate) fn into_file(r: OwnedRaw) -> File {
    match r {
        OwnedRaw::Handle(h) => h.into(),
        // SAFETY: as in `into_socket`, the other way round; `check` never
        // lets a socket through as a file.
        OwnedRaw::Socket(s) => unsafe { File::from_raw_handle(s.into_raw_socket() as RawHandle) },
    }
}

/// What the OS knows about the process at the other end.
#[derive(Debug)]
pub(crate) struct PeerInfo {
    pub pid: u32,
}

/// One frame as received, before validation.
pub(crate) struct Received {
    pub len: usize,
    pub eof: bool,
    pub control_truncated: bool,
    pub frame_truncated: bool,
}

/// A manual-reset event, owned, not inheritable.
pub(crate) fn new_event() -> io::Result<OwnedHandle> {
    // SAFETY: no security attributes, no name.
    let h = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
    if h.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that nothing else owns.
    Ok(unsafe { OwnedHandle::from_raw_handle(h as RawHandle) })
}

/// One overlapped operation's state: the OVERLAPPED (boxed, so that its
/// address stays put while the kernel holds it), its event and its buffer.
struct Op {
    ov: Box<OVERLAPPED>,
    /// None only when no event could be made (`Transport::from_raw`):
    /// every wait then fails with an error.
    event: Option<OwnedHandle>,
    buf: Vec<u8>,
    /// Whether the kernel may still be writing into `ov` and `buf`.
    pending: bool,
}

// SAFETY: the raw pointers inside OVERLAPPED are only the event handle and
// kernel-owned fields; every access goes through the owning Mutex.
unsafe impl Send for Op {}

/// How an operation ended.
enum Done {
    Bytes(usize),
    MoreData(usize),
    Failed(io::Error),
}

impl Op {
    fn new(capacity: usize) -> io::Result<Op> {
        Ok(Op {
            // SAFETY: OVERLAPPED is plain data; zeroes are its initial state.
            ov: Box::new(unsafe { std::mem::zeroed() }),
            event: Some(new_event()?),
            buf: vec![0; capacity],
            pending: false,
        })
    }

    fn unusable(capacity: usize) -> Op {
        Op {
            // SAFETY: as in `new`.
            ov: Box::new(unsafe { std::mem::zeroed() }),
            event: None,
            buf: vec![0; capacity],
            pending: false,
        }
    }

    fn reset(&mut self) {
        // SAFETY: as in `new`; only done when no operation is pending.
        *self.ov = unsafe { std::mem::zeroed() };
        self.ov.hEvent = self.event.as_ref().map_or(std::ptr::null_mut(), raw);
    }

    /// The result of a call that started an operation: completed now,
    /// pending, or failed.
    fn started(&mut self, file: HANDLE, ok: bool) -> Option<Done> {
        if ok {
            return Some(self.finish(file, false).unwrap_or_else(|| {
                Done::Failed(io::Error::other("operation reported pending after success"))
            }));
        }
        // SAFETY: reads the thread's last error.
        let err = unsafe { GetLastError() };
        if err == ERROR_IO_PENDING {
            self.pending = true;
            return None;
        }
        if err == ERROR_MORE_DATA {
            return self.finish(file, false);
        }
        Some(Done::Failed(io::Error::from_raw_os_error(err as i32)))
    }

    /// Collects a finished (or, with `wait`, finishing) operation's result;
    /// `None` while it is still under way.
    fn finish(&mut self, file: HANDLE, wait: bool) -> Option<Done> {
        let mut n = 0u32;
        // SAFETY: `ov` is the OVERLAPPED the operation was started with,
        // alive and in place.
        let ok = unsafe { GetOverlappedResult(file, &*self.ov, &mut n, wait as i32) } != 0;
        if ok {
            self.pending = false;
            return Some(Done::Bytes(n as usize));
        }
        // SAFETY: reads the thread's last error.
        let err = unsafe { GetLastError() };
        if err == ERROR_IO_PENDING || err == ERROR_IO_INCOMPLETE {
            return None;
        }
        self.pending = false;
        if err == ERROR_MORE_DATA {
            return Some(Done::MoreData(n as usize));
        }
        Some(Done::Failed(io::Error::from_raw_os_error(err as i32)))
    }

    /// Waits for the pending operation until `deadline`; true when done.
    fn wait(&self, deadline: Option<Instant>) -> io::Result<bool> {
        let Some(event) = &self.event else {
            return Err(io::Error::other("no event for overlapped I/O"));
        };
        let ms = match deadline {
            None => INFINITE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up, so that a wait never ends before the deadline.
                let ms = left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0);
                ms.min(u128::from(INFINITE - 1)) as u32
            }
        };
        // SAFETY: the event is open for the call.
        match unsafe { WaitForSingleObject(raw(event), ms) } {
            WAIT_OBJECT_0 => Ok(true),
            WAIT_TIMEOUT => Ok(false),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Cancels a pending operation and waits until the kernel lets go of
    /// the buffer. Returns how it ended (it may have completed meanwhile).
    fn cancel(&mut self, file: HANDLE) -> Option<Done> {
        if !self.pending {
            return None;
        }
        // SAFETY: cancels only the operation started with this OVERLAPPED.
        unsafe { CancelIoEx(file, &*self.ov) };
        let done = self.finish(file, true);
        self.pending = false;
        done
    }
}

/// The read side: at most one read under way, and a frame read ahead (by
/// `wait`, or while draining acks) that `recv_frame` has not taken yet.
struct ReadState {
    op: Op,
    ready: Option<Done>,
}

/// The write side: at most one frame's write under way, the transfer
/// copies that go with it, and how a write that finished in `wait` ended.
struct WriteState {
    op: Op,
    copies: Option<(u32, Vec<TransferCopy>)>,
    done: Option<Done>,
}

/// Acknowledgements waiting to go out. At most one write of them is under
/// way and nothing ever waits for it, so that a peer that never reads
/// cannot block this side: the rest wait in the queue.
struct AckState {
    op: Op,
    queue: VecDeque<[u8; wire::HEADER_LEN]>,
}

/// Transfer copies of frames sent and not yet acknowledged, oldest first:
/// (message seq, the copies). Closed when the peer acknowledges the frame.
type InFlight = VecDeque<(u32, Vec<TransferCopy>)>;

/// The values of every transfer copy this process holds open, whatever
/// the channel. When the kernel names this very process as a channel's
/// peer (a pair, an in-process client, or a pair whose other end has
/// been handed to another process since), a value off the wire is only
/// pulled if it is one of these: never any other handle of this
/// process's own table.
static TRANSFER_COPIES: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

/// A transfer copy, listed in `TRANSFER_COPIES` for as long as it is open.
struct TransferCopy(OwnedHandle);

impl TransferCopy {
    fn new(copy: OwnedHandle) -> TransferCopy {
        lock(&TRANSFER_COPIES).insert(copy.as_raw_handle() as usize);
        TransferCopy(copy)
    }

    /// Leaves the copy open (and listed) for good.
    fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for TransferCopy {
    fn drop(&mut self) {
        // Unlisted before the handle closes (the field drops after this),
        // so that a value is never listed while it names something else.
        lock(&TRANSFER_COPIES).remove(&(self.0.as_raw_handle() as usize));
    }
}

/// Everything of a transport but the pipe handle itself, which `Transport`
/// owns and drops after this (field order), so that `file` stays valid
/// for as long as this lives.
struct Inner {
    /// The pipe's raw value, borrowed from `Transport::pipe`.
    file: usize,
    peer_pid: u32,
    /// The peer process, opened at connect time (PROCESS_DUP_HANDLE), for
    /// pulling handles and for telling whether it has exited.
    peer_process: Option<OwnedHandle>,
    read: Mutex<ReadState>,
    write: Mutex<WriteState>,
    in_flight: Mutex<InFlight>,
    acks: Mutex<AckState>,
}

/// One end of a channel: a message-mode named pipe, opened overlapped.
pub(crate) struct Transport {
    inner: Inner,
    pipe: OwnedHandle,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("pipe", &self.pipe)
            .field("peer_pid", &self.inner.peer_pid)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

fn pipe_path(name: &str) -> String {
    format!(r"\\.\pipe\{name}")
}

fn path_unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "channels on filesystem paths are not supported on Windows yet; use a name (bind_name/connect_name)",
    )
}

/// A new instance of the named pipe `path`: overlapped, message mode,
/// local clients only, default security (the creating user's).
fn create_instance(path: &[u16], first: bool, max_instances: u32) -> io::Result<OwnedHandle> {
    let mut open_mode = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED;
    if first {
        // Fails if the name exists, so that nobody else's pipe is joined.
        open_mode |= FILE_FLAG_FIRST_PIPE_INSTANCE;
    }
    let size = (wire::MAX_FRAME_LEN * 2) as u32;
    let security = super::windows_security::owner_only()?;
    // SAFETY: `path` is NUL-terminated UTF-16; `security` points to a
    // descriptor that lives as long as the process.
    let h = unsafe {
        CreateNamedPipeW(
            path.as_ptr(),
            open_mode,
            PIPE_TYPE_MESSAGE | PIPE_READMODE_MESSAGE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            max_instances,
            size,
            size,
            0,
            &security,
        )
    };
    if h == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that nothing else owns.
    Ok(unsafe { OwnedHandle::from_raw_handle(h as RawHandle) })
}

/// Opens the client end of `path`; `Ok(None)` while every instance is busy.
fn open_client(path: &[u16]) -> io::Result<Option<OwnedHandle>> {
    // SAFETY: `path` is NUL-terminated UTF-16. SECURITY_IDENTIFICATION
    // lets the server identify this user, not act as it.
    let h = unsafe {
        CreateFileW(
            path.as_ptr(),
            GENERIC_READ | GENERIC_WRITE,
            0,
            std::ptr::null(),
            OPEN_EXISTING,
            FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
            std::ptr::null_mut(),
        )
    };
    if h == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: a fresh handle that nothing else owns.
    let h = unsafe { OwnedHandle::from_raw_handle(h as RawHandle) };
    let mode = PIPE_READMODE_MESSAGE;
    // SAFETY: the handle is open; `mode` is live for the call.
    if unsafe { SetNamedPipeHandleState(raw(&h), &mode, std::ptr::null(), std::ptr::null()) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(h))
}

/// The kernel's word on the process at the other end of `pipe`.
fn pipe_peer_pid(pipe: HANDLE) -> io::Result<u32> {
    let server = pipe_flags(pipe).ok_or_else(io::Error::last_os_error)? & PIPE_SERVER_END != 0;
    let mut pid = 0u32;
    // SAFETY: the handle is open; `pid` is live for the call.
    let ok = unsafe {
        if server {
            GetNamedPipeClientProcessId(pipe, &mut pid)
        } else {
            GetNamedPipeServerProcessId(pipe, &mut pid)
        }
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

fn open_process(pid: u32) -> Option<OwnedHandle> {
    // SAFETY: asks for a handle to the process; null on failure.
    let h = unsafe {
        OpenProcess(
            PROCESS_DUP_HANDLE | PROCESS_SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION,
            0,
            pid,
        )
    };
    if h.is_null() {
        tracing::debug!(
            pid,
            error = %io::Error::last_os_error(),
            "cannot open the peer process: handles other than sockets cannot be received"
        );
        return None;
    }
    // SAFETY: a fresh handle that nothing else owns.
    Some(unsafe { OwnedHandle::from_raw_handle(h as RawHandle) })
}

fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nonce = std::collections::hash_map::RandomState::new();
    let r = std::hash::BuildHasher::hash_one(&nonce, Instant::now());
    format!(
        "handover-pair-{}-{}-{r:016x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits for a client on `instance` with an overlapped ConnectNamedPipe.
/// `Ok(false)` when the deadline passed first: the operation then stays
/// pending in `op`, to be waited on again.
fn connect_instance(
    instance: &OwnedHandle,
    op: &mut Op,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    let was_pending = op.pending;
    match connect_once(instance, op, deadline) {
        // The thread that started the connect (an `accept_timeout` that
        // gave up) has exited since, which cancels its I/O: wait for the
        // next client with a new one.
        Err(e) if was_pending && is_aborted(&e) => connect_once(instance, op, deadline),
        other => other,
    }
}

fn connect_once(
    instance: &OwnedHandle,
    op: &mut Op,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    if !op.pending {
        op.reset();
        // SAFETY: `ov` is boxed and stays alive and in place until the
        // operation completes or is cancelled (Listener's Drop).
        let ok = unsafe { ConnectNamedPipe(raw(instance), &mut *op.ov) } != 0;
        if ok {
            return Ok(true);
        }
        // SAFETY: reads the thread's last error.
        match unsafe { GetLastError() } {
            ERROR_PIPE_CONNECTED => return Ok(true),
            // A client connected and has closed its end already: accepted
            // all the same, as on Linux; what it wrote is still there to
            // be read, then the end of the stream.
            ERROR_NO_DATA => return Ok(true),
            ERROR_IO_PENDING => op.pending = true,
            e => return Err(io::Error::from_raw_os_error(e as i32)),
        }
    }
    if !op.wait(deadline)? {
        return Ok(false);
    }
    match op.finish(raw(instance), true) {
        Some(Done::Bytes(_)) => Ok(true),
        Some(Done::Failed(e)) => Err(e),
        Some(Done::MoreData(_)) | None => Ok(false),
    }
}

/// An operation cancelled: Windows cancels the I/O a thread started when
/// that thread exits, so a read or connect left pending by a timed-out
/// call in a thread that has ended since reports this. Nothing was
/// transferred; the operation is started again.
fn is_aborted(e: &io::Error) -> bool {
    e.raw_os_error() == Some(ERROR_OPERATION_ABORTED as i32)
}

fn is_end_of_stream(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(|c| c as u32),
        Some(ERROR_BROKEN_PIPE) | Some(ERROR_PIPE_NOT_CONNECTED)
    )
}

/// A socket rebuilt from a WSAPROTOCOL_INFOW off the wire.
fn rebuild_socket(extra: &[u8]) -> io::Result<OwnedSocket> {
    if extra.len() != PROTOCOL_INFO_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "socket record data is not a WSAPROTOCOL_INFOW",
        ));
    }
    winsock_init();
    // SAFETY: WSAPROTOCOL_INFOW is plain data of exactly this size, and any
    // bit pattern is a value of it; the read does not assume alignment.
    let info: WSAPROTOCOL_INFOW = unsafe { std::ptr::read_unaligned(extra.as_ptr().cast()) };
    // SAFETY: `info` is live for the call. WSASocketW validates it; on
    // success the new socket belongs to this process and to nobody else.
    let s = unsafe {
        WSASocketW(
            FROM_PROTOCOL_INFO,
            FROM_PROTOCOL_INFO,
            FROM_PROTOCOL_INFO,
            &info,
            0,
            WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT,
        )
    };
    if s == INVALID_SOCKET {
        return Err(wsa_error());
    }
    // SAFETY: a fresh socket that nothing else owns.
    Ok(unsafe { OwnedSocket::from_raw_socket(s as u64) })
}

impl Inner {
    fn new(file: HANDLE, peer_pid: u32) -> io::Result<Inner> {
        Ok(Inner {
            file: file as usize,
            peer_pid,
            peer_process: (peer_pid != 0).then(|| open_process(peer_pid)).flatten(),
            read: Mutex::new(ReadState {
                op: Op::new(wire::MAX_FRAME_LEN + 1)?,
                ready: None,
            }),
            write: Mutex::new(WriteState {
                op: Op::new(0)?,
                copies: None,
                done: None,
            }),
            in_flight: Mutex::new(VecDeque::new()),
            acks: Mutex::new(AckState {
                op: Op::new(wire::HEADER_LEN)?,
                queue: VecDeque::new(),
            }),
        })
    }

    fn file(&self) -> HANDLE {
        self.file as HANDLE
    }

    /// Reads until a frame that is not an ack is in `st.ready` (true), or
    /// the deadline passes (false; a read started stays under way). Acks
    /// are handled here and never seen above.
    fn read_ahead(&self, st: &mut ReadState, deadline: Option<Instant>) -> io::Result<bool> {
        let file = self.file();
        loop {
            if st.ready.is_some() {
                return Ok(true);
            }
            let was_pending = st.op.pending;
            let done = if was_pending {
                if !st.op.wait(deadline)? {
                    return Ok(false);
                }
                st.op.finish(file, true)
            } else {
                st.op.reset();
                let len = st.op.buf.len() as u32;
                // SAFETY: `ov` and `buf` are owned by the read state and
                // stay alive and in place until the read completes or is
                // cancelled (`stop_io`); `buf` is never resized meanwhile.
                let ok = unsafe {
                    ReadFile(
                        file,
                        st.op.buf.as_mut_ptr(),
                        len,
                        std::ptr::null_mut(),
                        &mut *st.op.ov,
                    )
                } != 0;
                st.op.started(file, ok)
            };
            match done {
                Some(Done::Bytes(n)) => {
                    match wire::decode_ack(&st.op.buf[..n.min(st.op.buf.len())]) {
                        Some((seq, pulled)) => self.acked(seq, pulled),
                        None => st.ready = Some(Done::Bytes(n)),
                    }
                }
                // Left pending by a thread that has exited since (see
                // `is_aborted`): nothing was read, read again.
                Some(Done::Failed(e)) if was_pending && is_aborted(&e) => {}
                Some(other) => st.ready = Some(other),
                None => {}
            }
        }
    }

    /// The peer has duplicated `pulled` handles of a frame of message
    /// `seq`: their transfer copies can go.
    fn acked(&self, seq: u32, pulled: u32) {
        let mut fl = lock(&self.in_flight);
        let at = fl
            .iter()
            .position(|(s, copies)| *s == seq && copies.len() == pulled as usize);
        match at {
            Some(at) => drop(fl.remove(at)),
            None => tracing::debug!(seq, pulled, "ack for no frame in flight, ignored"),
        }
    }

    /// Takes acks that are already waiting, without blocking and without
    /// getting in the way of a receiver: skipped when one is busy.
    fn drain_acks(&self) {
        if lock(&self.in_flight).is_empty() {
            return;
        }
        let Ok(mut st) = self.read.try_lock() else {
            return;
        };
        let _ = self.read_ahead(&mut st, Some(Instant::now()));
    }

    fn queue_ack(&self, seq: u32, pulled: u32) {
        lock(&self.acks)
            .queue
            .push_back(wire::encode_ack(seq, pulled));
        self.flush_acks();
    }

    /// Starts writing queued acks, one at a time, never waiting.
    fn flush_acks(&self) {
        let file = self.file();
        let mut st = lock(&self.acks);
        loop {
            if st.op.pending {
                match st.op.finish(file, false) {
                    None => return,
                    // Cancelled by the exit of the thread that started it
                    // (see `is_aborted`): written again, first.
                    Some(Done::Failed(e)) if is_aborted(&e) => {
                        if let Ok(ack) = <[u8; wire::HEADER_LEN]>::try_from(&st.op.buf[..]) {
                            st.queue.push_front(ack);
                        }
                    }
                    Some(_) => {}
                }
            }
            let Some(ack) = st.queue.pop_front() else {
                return;
            };
            st.op.buf.clear();
            st.op.buf.extend_from_slice(&ack);
            st.op.reset();
            // SAFETY: `ov` and `buf` are owned by the ack state and stay
            // alive and in place until the write completes or is
            // cancelled (`stop_io`).
            let ok = unsafe {
                WriteFile(
                    file,
                    st.op.buf.as_ptr(),
                    st.op.buf.len() as u32,
                    std::ptr::null_mut(),
                    &mut *st.op.ov,
                )
            } != 0;
            if let Some(Done::Failed(e)) = st.op.started(file, ok) {
                // The peer is gone or the pipe broken: acks are moot.
                tracing::debug!(error = %e, "writing an ack failed");
                st.queue.clear();
                return;
            }
        }
    }

    /// Turns one handle into its record's `value` and `extra`, keeping a
    /// transfer copy of anything but a socket in `copies`.
    fn export(
        &self,
        h: &Handle,
        copies: &mut Vec<TransferCopy>,
        extra: &mut Vec<u8>,
    ) -> io::Result<u32> {
        match &h.raw {
            OwnedRaw::Socket(s) => {
                winsock_init();
                // SAFETY: plain data, filled in by the call.
                let mut info: WSAPROTOCOL_INFOW = unsafe { std::mem::zeroed() };
                // SAFETY: the socket is open; `info` is live and writable.
                let rc = unsafe {
                    WSADuplicateSocketW(s.as_raw_socket() as usize, self.peer_pid, &mut info)
                };
                if rc != 0 {
                    return Err(wsa_error());
                }
                // SAFETY: WSAPROTOCOL_INFOW is plain data of this size.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        (&info as *const WSAPROTOCOL_INFOW).cast::<u8>(),
                        PROTOCOL_INFO_LEN,
                    )
                };
                extra.extend_from_slice(bytes);
                Ok(0)
            }
            OwnedRaw::Handle(own) => {
                let mut copy: HANDLE = std::ptr::null_mut();
                // SAFETY: duplicates within this process, not inheritable,
                // into `copy`, which then belongs to this code alone.
                let ok = unsafe {
                    let me = GetCurrentProcess();
                    DuplicateHandle(me, raw(own), me, &mut copy, 0, 0, DUPLICATE_SAME_ACCESS)
                };
                if ok == 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh handle that nothing else owns.
                let copy = unsafe { OwnedHandle::from_raw_handle(copy as RawHandle) };
                // Handle values are 32-bit significant on 64-bit Windows
                // (documented, for 32/64-bit interoperability).
                let value = copy.as_raw_handle() as usize as u32;
                copies.push(TransferCopy::new(copy));
                Ok(value)
            }
        }
    }

    /// A handle of the peer, duplicated into this process. The source is
    /// never closed: the value can only ever name a handle of the peer.
    fn pull(&self, value: u32) -> io::Result<OwnedHandle> {
        let Some(peer) = &self.peer_process else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer process could not be opened",
            ));
        };
        if value == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "handle value 0"));
        }
        // A peer in this very process may only name transfer copies; the
        // list stays locked until the duplicate is made, so that a listed
        // value cannot be closed and reused meanwhile.
        let listed = (self.peer_pid == std::process::id()).then(|| lock(&TRANSFER_COPIES));
        if let Some(list) = &listed {
            if !list.contains(&(value as usize)) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("handle value {value:#x} is no transfer copy of this process"),
                ));
            }
        }
        let mut out: HANDLE = std::ptr::null_mut();
        // SAFETY: duplicates from the peer's table into this process,
        // without DUPLICATE_CLOSE_SOURCE, not inheritable, into `out`.
        let ok = unsafe {
            DuplicateHandle(
                raw(peer),
                value as usize as HANDLE,
                GetCurrentProcess(),
                &mut out,
                0,
                0,
                DUPLICATE_SAME_ACCESS,
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        drop(listed);
        // SAFETY: a fresh handle that nothing else owns.
        Ok(unsafe { OwnedHandle::from_raw_handle(out as RawHandle) })
    }

    /// The handles a frame's records describe, as owned values in
    /// `handles`, in record order; a record that cannot be made into a
    /// handle is left out, which the assembler reports as a count
    /// mismatch. Pulled handles are acknowledged.
    fn import(&self, frame: &[u8], handles: &mut Vec<Handle>) {
        // A frame that does not decode is refused by the assembler; none
        // of its records is acted on.
        let Ok(f) = wire::decode(frame) else {
            return;
        };
        let mut pulled = 0u32;
        for (index, r) in f.records().enumerate() {
            let got = if r.extra.is_empty() {
                pulled += 1;
                self.pull(r.value).map(OwnedRaw::Handle)
            } else {
                rebuild_socket(r.extra).map(OwnedRaw::Socket)
            };
            match got {
                Ok(raw_handle) => handles.push(Handle::received(raw_handle)),
                Err(e) => {
                    tracing::debug!(index, error = %e, "a record's handle could not be received")
                }
            }
        }
        if pulled > 0 {
            self.queue_ack(f.header.seq, pulled);
        }
    }

    fn recv_frame(
        &self,
        buf: &mut [u8],
        handles: &mut Vec<Handle>,
        nonblocking: bool,
    ) -> io::Result<Received> {
        let mut st = lock(&self.read);
        let deadline = nonblocking.then(Instant::now);
        if !self.read_ahead(&mut st, deadline)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let done = st.ready.take();
        let mut got = Received {
            len: 0,
            eof: false,
            control_truncated: false,
            frame_truncated: false,
        };
        match done {
            None => return Err(io::ErrorKind::WouldBlock.into()),
            Some(Done::Failed(e)) if is_end_of_stream(&e) => got.eof = true,
            Some(Done::Failed(e)) => return Err(e),
            Some(Done::MoreData(n)) => {
                // Larger than any valid frame: keep the start (for the
                // header), read and discard the rest of the message.
                got.len = n.min(buf.len());
                buf[..got.len].copy_from_slice(&st.op.buf[..got.len]);
                got.frame_truncated = true;
                drop(st);
                self.discard_rest()?;
            }
            Some(Done::Bytes(n)) => {
                let n = n.min(st.op.buf.len());
                got.len = n.min(buf.len());
                buf[..got.len].copy_from_slice(&st.op.buf[..got.len]);
                if n > buf.len() {
                    got.frame_truncated = true;
                } else {
                    drop(st);
                    self.import(&buf[..got.len], handles);
                }
            }
        }
        self.flush_acks();
        Ok(got)
    }

    /// Reads the rest of an oversized message and throws it away.
    fn discard_rest(&self) -> io::Result<()> {
        let file = self.file();
        let mut st = lock(&self.read);
        loop {
            st.op.reset();
            let len = st.op.buf.len() as u32;
            // SAFETY: as in `read_ahead`.
            let ok = unsafe {
                ReadFile(
                    file,
                    st.op.buf.as_mut_ptr(),
                    len,
                    std::ptr::null_mut(),
                    &mut *st.op.ov,
                )
            } != 0;
            let mut done = st.op.started(file, ok);
            if done.is_none() {
                st.op.wait(None)?;
                done = st.op.finish(file, true);
            }
            match done {
                Some(Done::MoreData(_)) | None => continue,
                Some(Done::Bytes(_)) => return Ok(()),
                Some(Done::Failed(e)) if is_end_of_stream(&e) => return Ok(()),
                Some(Done::Failed(e)) => return Err(e),
            }
        }
    }

    fn send_frame(
        &self,
        head: &[u8],
        payload: &[u8],
        handles: &[Handle],
        nonblocking: bool,
    ) -> io::Result<()> {
        self.drain_acks();
        self.flush_acks();
        let file = self.file();
        let mut st = lock(&self.write);
        if st.op.pending {
            // A write went pending in an earlier call for this same frame
            // (the channel retries it after `wait`).
            match st.op.finish(file, false) {
                Some(done) => st.done = Some(done),
                None if nonblocking => return Err(io::ErrorKind::WouldBlock.into()),
                None => {
                    st.op.wait(None)?;
                    st.done = st.op.finish(file, true);
                }
            }
        }
        if let Some(done) = st.done.take() {
            return self.settle(&mut st, done);
        }
        let mut copies = Vec::new();
        let mut frame = Vec::with_capacity(head.len() + payload.len() + 16 * handles.len());
        frame.extend_from_slice(head.get(..wire::HEADER_LEN).unwrap_or(head));
        let seq = head
            .get(8..12)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let mut extra = Vec::new();
        for h in handles {
            extra.clear();
            // On failure, the copies made so far drop (close) here: the
            // peer never saw their values.
            let value = self.export(h, &mut copies, &mut extra)?;
            wire::Record {
                kind: h.kind(),
                name: h.name(),
                value,
                extra: &extra,
            }
            .encode(&mut frame);
        }
        frame.extend_from_slice(payload);
        st.op.buf = frame;
        st.copies = Some((seq, copies));
        st.op.reset();
        // SAFETY: `ov` and `buf` are owned by the write state and stay
        // alive and in place until the write completes or is cancelled
        // (`wait`, `stop_io`); `buf` is not touched meanwhile.
        let ok = unsafe {
            WriteFile(
                file,
                st.op.buf.as_ptr(),
                st.op.buf.len() as u32,
                std::ptr::null_mut(),
                &mut *st.op.ov,
            )
        } != 0;
        let done = match st.op.started(file, ok) {
            Some(done) => done,
            None if nonblocking => return Err(io::ErrorKind::WouldBlock.into()),
            None => {
                st.op.wait(None)?;
                st.op
                    .finish(file, true)
                    .unwrap_or_else(|| Done::Failed(io::ErrorKind::Interrupted.into()))
            }
        };
        self.settle(&mut st, done)
    }

    /// A frame's write has ended: on success its transfer copies wait for
    /// the peer's ack; on failure they close, the peer never saw them.
    fn settle(&self, st: &mut WriteState, done: Done) -> io::Result<()> {
        let copies = st.copies.take();
        match done {
            Done::Bytes(n) if n == st.op.buf.len() => {
                if let Some((seq, copies)) = copies.filter(|(_, c)| !c.is_empty()) {
                    lock(&self.in_flight).push_back((seq, copies));
                }
                Ok(())
            }
            Done::Bytes(_) | Done::MoreData(_) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the pipe took part of a frame",
            )),
            Done::Failed(e) => Err(e),
        }
    }

    fn wait(&self, direction: Direction, deadline: Option<Instant>) -> io::Result<bool> {
        match direction {
            Direction::Read => {
                let mut st = lock(&self.read);
                self.read_ahead(&mut st, deadline)
            }
            Direction::Write => {
                let file = self.file();
                let mut st = lock(&self.write);
                if !st.op.pending {
                    return Ok(true);
                }
                if st.op.wait(deadline)? {
                    st.done = st.op.finish(file, true);
                    return Ok(true);
                }
                // Given up: cancel, so that a timed-out frame is not
                // written later. It may have completed meanwhile.
                match st.op.cancel(file) {
                    Some(Done::Bytes(n)) => {
                        st.done = Some(Done::Bytes(n));
                        Ok(true)
                    }
                    _ => {
                        st.copies = None;
                        Ok(false)
                    }
                }
            }
        }
    }

    /// Cancels every operation under way and waits until the kernel has
    /// let go of their buffers.
    fn stop_io(&mut self) {
        let file = self.file();
        let read = self.read.get_mut().unwrap_or_else(|p| p.into_inner());
        read.op.cancel(file);
        let write = self.write.get_mut().unwrap_or_else(|p| p.into_inner());
        let done = write.op.cancel(file);
        let copies = write.copies.take();
        if let (Some(Done::Bytes(n)), Some((seq, copies))) = (done, copies) {
            if n == write.op.buf.len() && !copies.is_empty() {
                // Written after all: the peer may pull them.
                self.in_flight
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((seq, copies));
            }
        }
        let acks = self.acks.get_mut().unwrap_or_else(|p| p.into_inner());
        acks.op.cancel(file);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Acks already waiting close their frames' copies.
        self.drain_acks();
        self.stop_io();
        let in_flight = std::mem::take(self.in_flight.get_mut().unwrap_or_else(|p| p.into_inner()));
        if in_flight.is_empty() {
            return;
        }
        let exited = self.peer_process.as_ref().is_some_and(|p| {
            // SAFETY: the process handle is open; a zero timeout only polls.
            unsafe { WaitForSingleObject(raw(p), 0) == WAIT_OBJECT_0 }
        });
        let count: usize = in_flight.iter().map(|(_, c)| c.len()).sum();
        if exited {
            drop(in_flight);
        } else {
            // The peer may still duplicate them: closing could let it take
            // whatever handle reuses a value. Leaving them is the safe
            // side, until this process exits.
            tracing::debug!(
                count,
                peer = self.peer_pid,
                "channel dropped with unacknowledged transfer copies; leaving them open"
            );
            for (_, copies) in in_flight {
                for c in copies {
                    c.leak();
                }
            }
        }
    }
}

impl Transport {
    fn new(pipe: OwnedHandle) -> io::Result<Transport> {
        let peer_pid = pipe_peer_pid(raw(&pipe))?;
        Ok(Transport {
            inner: Inner::new(raw(&pipe), peer_pid)?,
            pipe,
        })
    }

    pub fn pair() -> io::Result<(Transport, Transport)> {
        let path = wide(&pipe_path(&unique_name()));
        let server = create_instance(&path, true, 1)?;
        let client =
            open_client(&path)?.ok_or_else(|| io::Error::from(io::ErrorKind::AddrInUse))?;
        let mut op = Op::new(0)?;
        if !connect_instance(&server, &mut op, Some(Instant::now()))? {
            op.cancel(raw(&server));
            return Err(io::ErrorKind::TimedOut.into());
        }
        let (a, b) = (Transport::new(server)?, Transport::new(client)?);
        // Only this process may be at either end.
        let me = std::process::id();
        if a.inner.peer_pid != me || b.inner.peer_pid != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "another process connected to the pair's pipe",
            ));
        }
        Ok((a, b))
    }

    /// Connects to a listener's pipe; while every instance is busy, waits
    /// (WaitNamedPipeW) until the deadline.
    pub fn connect(addr: &Address, deadline: Option<Instant>) -> io::Result<Transport> {
        let name = match addr {
            Address::Name(n) => n,
            Address::Path(_) => return Err(path_unsupported()),
        };
        let path = wide(&pipe_path(name));
        loop {
            if let Some(h) = open_client(&path)? {
                return Transport::new(h);
            }
            let ms = match deadline {
                None => 1000,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    left.as_millis().clamp(1, 1000) as u32
                }
            };
            // SAFETY: `path` is NUL-terminated UTF-16. The result only
            // says whether to try again, which the loop does anyway.
            unsafe { WaitNamedPipeW(path.as_ptr(), ms) };
        }
    }

    /// A transport from a handle `check` found to be a message-mode pipe.
    pub fn from_raw(r: OwnedRaw) -> Transport {
        let pipe = match r {
            OwnedRaw::Handle(h) => h,
            // SAFETY: `check` only lets pipes through; this arm keeps
            // ownership total.
            OwnedRaw::Socket(s) => unsafe {
                OwnedHandle::from_raw_handle(s.into_raw_socket() as RawHandle)
            },
        };
        // Infallible by signature: a pipe whose peer cannot be asked gets
        // peer pid 0 (and receives no pulled handles).
        let peer_pid = pipe_peer_pid(raw(&pipe)).unwrap_or(0);
        let inner = match Inner::new(raw(&pipe), peer_pid) {
            Ok(inner) => inner,
            Err(_) => Inner {
                file: raw(&pipe) as usize,
                peer_pid,
                peer_process: None,
                read: Mutex::new(ReadState {
                    op: Op::unusable(wire::MAX_FRAME_LEN + 1),
                    ready: None,
                }),
                write: Mutex::new(WriteState {
                    op: Op::unusable(0),
                    copies: None,
                    done: None,
                }),
                in_flight: Mutex::new(VecDeque::new()),
                acks: Mutex::new(AckState {
                    op: Op::unusable(wire::HEADER_LEN),
                    queue: VecDeque::new(),
                }),
            },
        };
        Transport { inner, pipe }
    }

    /// Names `pid` as the process at the other end, for an end of a pair
    /// made in this process whose other end went to `pid`: the pipe itself
    /// still names this process (it opened both ends), and sockets must be
    /// duplicated for the process that will use them. Refused for any
    /// other end, whose peer the kernel names.
    pub fn set_peer(&mut self, pid: u32) -> io::Result<()> {
        if self.inner.peer_pid != std::process::id() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "only an end of a pair made by this process can be given another peer",
            ));
        }
        let process = open_process(pid).ok_or_else(io::Error::last_os_error)?;
        self.inner.peer_pid = pid;
        self.inner.peer_process = Some(process);
        Ok(())
    }

    pub fn into_raw(self) -> OwnedRaw {
        let Transport { inner, pipe } = self;
        drop(inner);
        OwnedRaw::Handle(pipe)
    }

    pub fn set_nonblocking(&self, _on: bool) -> io::Result<()> {
        // Pipe I/O is overlapped: waits carry their own deadlines.
        Ok(())
    }

    /// Windows cannot make the kernel refuse handles; they are pulled and
    /// closed in user space (false: the caller closes them).
    pub fn refuse_handles(&self) -> io::Result<bool> {
        Ok(false)
    }

    pub fn peer(&self) -> io::Result<PeerInfo> {
        Ok(PeerInfo {
            pid: self.inner.peer_pid,
        })
    }

    #[inline]
    pub fn send_frame(
        &self,
        head: &[u8],
        payload: &[u8],
        handles: &[Handle],
        nonblocking: bool,
    ) -> io::Result<()> {
        self.inner.send_frame(head, payload, handles, nonblocking)
    }

    /// Receives one frame into `buf`, turning its records into owned
    /// handles at once. Handles are received (and so closed) even when
    /// `accept_handles` is false: there is no kernel refusal to lean on.
    #[inline]
    pub fn recv_frame(
        &self,
        buf: &mut [u8],
        handles: &mut Vec<Handle>,
        _accept_handles: bool,
        nonblocking: bool,
    ) -> io::Result<Received> {
        self.inner.recv_frame(buf, handles, nonblocking)
    }

    pub fn wait(&self, direction: Direction, deadline: Option<Instant>) -> io::Result<bool> {
        self.inner.wait(direction, deadline)
    }
}

/// Maps a failed pipe write to what it means for a channel.
pub(crate) fn send_error(e: io::Error) -> crate::Error {
    match e.raw_os_error().map(|c| c as u32) {
        Some(ERROR_BROKEN_PIPE) | Some(ERROR_NO_DATA) | Some(ERROR_PIPE_NOT_CONNECTED) => {
            crate::Error::Disconnected
        }
        _ => crate::Error::Io {
            op: "WriteFile",
            source: e,
        },
    }
}

/// Where a channel listener lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Address {
    /// Not supported on Windows yet.
    Path(std::path::PathBuf),
    /// A pipe name: `\\.\pipe\NAME`.
    Name(String),
}

struct ListenState {
    /// The instance the next client connects to.
    instance: Option<OwnedHandle>,
    op: Op,
    connected: bool,
}

/// A named pipe server: one instance always waits for the next client.
pub(crate) struct Listener {
    path: Vec<u16>,
    state: Mutex<ListenState>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("path", &String::from_utf16_lossy(&self.path))
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        let name = match addr {
            Address::Name(n) => n,
            Address::Path(_) => return Err(path_unsupported()),
        };
        let path = wide(&pipe_path(name));
        let instance = create_instance(&path, true, PIPE_UNLIMITED_INSTANCES).map_err(|e| {
            if e.raw_os_error() == Some(windows_sys::Win32::Foundation::ERROR_ACCESS_DENIED as i32)
            {
                // FILE_FLAG_FIRST_PIPE_INSTANCE: the name is taken.
                io::Error::new(io::ErrorKind::AddrInUse, "the pipe name is in use")
            } else {
                e
            }
        })?;
        Ok(Listener {
            path,
            state: Mutex::new(ListenState {
                instance: Some(instance),
                op: Op::new(0)?,
                connected: false,
            }),
        })
    }

    fn wait_locked(&self, st: &mut ListenState, deadline: Option<Instant>) -> io::Result<bool> {
        loop {
            if st.connected {
                return Ok(true);
            }
            let instance = match &st.instance {
                Some(i) => i,
                None => st.instance.insert(create_instance(
                    &self.path,
                    false,
                    PIPE_UNLIMITED_INSTANCES,
                )?),
            };
            match connect_instance(instance, &mut st.op, deadline) {
                Ok(true) => st.connected = true,
                Ok(false) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn accept(&self, nonblocking: bool) -> io::Result<Transport> {
        let mut st = lock(&self.state);
        let deadline = nonblocking.then(Instant::now);
        if !self.wait_locked(&mut st, deadline)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        st.connected = false;
        let Some(pipe) = st.instance.take() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // The next client can connect while this one is being set up.
        st.instance = create_instance(&self.path, false, PIPE_UNLIMITED_INSTANCES).ok();
        drop(st);
        Transport::new(pipe)
    }

    #[allow(dead_code)]
    pub fn set_nonblocking(&self, _on: bool) -> io::Result<()> {
        Ok(())
    }

    pub fn wait(&self, deadline: Option<Instant>) -> io::Result<bool> {
        let mut st = lock(&self.state);
        self.wait_locked(&mut st, deadline)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(instance) = &st.instance {
            st.op.cancel(raw(instance));
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Transport>();
    check::<Listener>();
}
