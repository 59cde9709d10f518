//! Windows: creating listening sockets for `handover::listen`.
//!
//! Sockets are made with WSA_FLAG_NO_HANDLE_INHERIT, so no child started
//! by anyone inherits them by accident; they reach children through the
//! activation bootstrap. SO_EXCLUSIVEADDRUSE is set rather than
//! SO_REUSEADDR, which on Windows would let another socket steal the port.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::windows::io::{AsRawSocket, FromRawSocket, OwnedSocket, RawSocket};

use windows_sys::Win32::Networking::WinSock::{
    bind, listen, setsockopt, WSAGetLastError, WSASocketW, AF_INET, AF_INET6, IN6_ADDR, IN6_ADDR_0,
    INVALID_SOCKET, IN_ADDR, IN_ADDR_0, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_V6ONLY,
    SOCKADDR_IN, SOCKADDR_IN6, SOCKADDR_IN6_0, SOCK_DGRAM, SOCK_STREAM, SOL_SOCKET,
    SO_EXCLUSIVEADDRUSE, WSAEAFNOSUPPORT, WSA_FLAG_NO_HANDLE_INHERIT, WSA_FLAG_OVERLAPPED,
};

use super::OwnedRaw;

/// The error of a machine without IPv6 (then `:PORT` falls back to IPv4).
pub(crate) const EAFNOSUPPORT: i32 = WSAEAFNOSUPPORT;

/// Unix socket files do not exist here; the type keeps `listen` portable.
#[derive(Debug)]
pub(crate) struct SocketFile;

fn wsa_error() -> io::Error {
    // SAFETY: reads the calling thread's last Winsock error.
    io::Error::from_raw_os_error(unsafe { WSAGetLastError() })
}

fn set_int(s: &OwnedSocket, level: i32, opt: i32, value: i32) -> io::Result<()> {
    // SAFETY: the socket is open; the option value is a live i32.
    let rc = unsafe {
        setsockopt(
            s.as_raw_socket() as usize,
            level,
            opt,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as i32,
        )
    };
    if rc != 0 {
        return Err(wsa_error());
    }
    Ok(())
}

/// Creates a TCP (listening) or UDP socket bound to `addr`; `dual_stack`
/// makes an IPv6 socket accept IPv4 too. Returns the socket and where it
/// is bound, with the real port when 0 was asked for.
pub(crate) fn bind_inet(
    addr: SocketAddr,
    udp: bool,
    dual_stack: bool,
    backlog: i32,
) -> io::Result<(OwnedRaw, String, Option<SocketFile>)> {
    super::winsock_init();
    let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
    let (ty, proto) = if udp {
        (SOCK_DGRAM, IPPROTO_UDP)
    } else {
        (SOCK_STREAM, IPPROTO_TCP)
    };
    // SAFETY: plain socket creation; no protocol info is passed.
    let raw = unsafe {
        WSASocketW(
            family as i32,
            ty,
            proto,
            std::ptr::null(),
            0,
            WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT,
        )
    };
    if raw == INVALID_SOCKET {
        return Err(wsa_error());
    }
    // SAFETY: a fresh socket that nothing else owns.
    let sock = unsafe { OwnedSocket::from_raw_socket(raw as RawSocket) };
    if addr.is_ipv6() {
        set_int(&sock, IPPROTO_IPV6, IPV6_V6ONLY, (!dual_stack) as i32)?;
    }
    set_int(&sock, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, 1)?;
    let rc = match addr {
        SocketAddr::V4(a) => {
            let sa = SOCKADDR_IN {
                sin_family: AF_INET,
                sin_port: a.port().to_be(),
                sin_addr: IN_ADDR {
                    S_un: IN_ADDR_0 {
                        S_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sa` is a complete SOCKADDR_IN of the size given.
            unsafe {
                bind(
                    sock.as_raw_socket() as usize,
                    (&sa as *const SOCKADDR_IN).cast(),
                    std::mem::size_of::<SOCKADDR_IN>() as i32,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = SOCKADDR_IN6 {
                sin6_family: AF_INET6,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: IN6_ADDR {
                    u: IN6_ADDR_0 {
                        Byte: a.ip().octets(),
                    },
                },
                Anonymous: SOCKADDR_IN6_0 {
                    sin6_scope_id: a.scope_id(),
                },
            };
            // SAFETY: `sa` is a complete SOCKADDR_IN6 of the size given.
            unsafe {
                bind(
                    sock.as_raw_socket() as usize,
                    (&sa as *const SOCKADDR_IN6).cast(),
                    std::mem::size_of::<SOCKADDR_IN6>() as i32,
                )
            }
        }
    };
    if rc != 0 {
        return Err(wsa_error());
    }
    // std reads the bound address back (getsockname) for us.
    let (sock, local) = if udp {
        let s = UdpSocket::from(sock);
        let local = s.local_addr()?;
        (OwnedSocket::from(s), local)
    } else {
        // SAFETY: the socket is open and bound.
        if unsafe { listen(sock.as_raw_socket() as usize, backlog) } != 0 {
            return Err(wsa_error());
        }
        let l = TcpListener::from(sock);
        let local = l.local_addr()?;
        (OwnedSocket::from(l), local)
    };
    Ok((OwnedRaw::Socket(sock), local.to_string(), None))
}

/// Unix sockets are not offered on Windows.
pub(crate) fn bind_unix(
    _addr: &crate::listen::ListenAddr,
    _options: &crate::listen::ListenOptions,
) -> io::Result<(OwnedRaw, String, Option<SocketFile>)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "Unix sockets are not supported on Windows by handover",
    ))
}
