//! Listening sockets from a one-line spec, as `handover run -l SPEC` and
//! `handover put --listen SPEC` take them.
//!
//! | spec | socket |
//! | --- | --- |
//! | `127.0.0.1:8080`, `[::1]:8080` | TCP on that address (port 0: the kernel picks) |
//! | `:8080` | TCP on every address, IPv6 and IPv4 (`[::]` dual-stack, or `0.0.0.0` without IPv6) |
//! | `udp:127.0.0.1:53`, `udp::53` | UDP |
//! | `/run/app.sock`, `unix:/run/app.sock` | Unix stream socket on a path |
//! | `unix-dgram:PATH`, `unix-seqpacket:PATH` | Unix datagram or seqpacket socket |
//! | `@name`, `unix-dgram:@name`, … | Linux abstract socket name |
//!
//! Any spec may end in `=NAME`, the name that LISTEN_FDNAMES carries.
//! SO_REUSEADDR is set on TCP and UDP sockets only, never on Unix ones; a
//! stale socket file that nobody listens on is replaced, and the file is
//! removed again when the [`Bound`] socket is dropped.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::sys;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP on one address.
    Tcp(SocketAddr),
    /// TCP on every address, this port.
    TcpAny(u16),
    /// UDP on one address.
    Udp(SocketAddr),
    /// UDP on every address, this port.
    UdpAny(u16),
    /// A Unix socket on a filesystem path.
    UnixPath(PathBuf, UnixType),
    /// A Linux abstract Unix socket name.
    UnixAbstract(String, UnixType),
}

/// The type of a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixType {
    Stream,
    Datagram,
    SeqPacket,
}

/// One `-l` argument: an address and an optional name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: ListenAddr,
    pub name: Option<String>,
}

/// How to create listening sockets.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// listen(2) backlog for stream and seqpacket sockets.
    pub backlog: i32,
    /// File mode for Unix socket files, e.g. 0o660.
    pub socket_mode: Option<u32>,
    /// Owner (uid, gid) for Unix socket files.
    pub socket_owner: Option<(Option<u32>, Option<u32>)>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            backlog: 4096,
            socket_mode: None,
            socket_owner: None,
        }
    }
}

fn bad(spec: &str, why: impl Into<String>) -> Error {
    Error::InvalidInput {
        what: "listen spec",
        why: format!("{spec:?}: {}", why.into()),
    }
}

impl FromStr for ListenSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<ListenSpec> {
        // The name comes after the last '='; addresses never contain one.
        let (addr, name) = match spec.rsplit_once('=') {
            Some((a, n)) => {
                crate::spawn::check_fdname(n).map_err(|_| {
                    bad(
                        spec,
                        "a name is 1 to 255 printable ASCII characters other than ':'",
                    )
                })?;
                (a, Some(n.to_owned()))
            }
            None => (spec, None),
        };
        Ok(ListenSpec {
            addr: parse_addr(addr).map_err(|why| bad(spec, why))?,
            name,
        })
    }
}

fn parse_addr(s: &str) -> std::result::Result<ListenAddr, String> {
    let unix = |rest: &str, ty: UnixType| -> std::result::Result<ListenAddr, String> {
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() || name.len() > 107 {
                return Err("an abstract name is 1 to 107 bytes".into());
            }
            return Ok(ListenAddr::UnixAbstract(name.to_owned(), ty));
        }
        if rest.is_empty() {
            return Err("a Unix socket needs a path".into());
        }
        if rest.len() > 107 {
            return Err("a Unix socket path is at most 107 bytes".into());
        }
        Ok(ListenAddr::UnixPath(PathBuf::from(rest), ty))
    };
    if let Some(rest) = s.strip_prefix("unix-dgram:") {
        return unix(rest, UnixType::Datagram);
    }
    if let Some(rest) = s.strip_prefix("unix-seqpacket:") {
        return unix(rest, UnixType::SeqPacket);
    }
    if let Some(rest) = s.strip_prefix("unix:") {
        return unix(rest, UnixType::Stream);
    }
    if s.starts_with('/') || s.starts_with("./") || s.starts_with('@') {
        return unix(s, UnixType::Stream);
    }
    let (udp, inet) = match s.strip_prefix("udp:") {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix("tcp:").unwrap_or(s)),
    };
    if let Some(port) = inet.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number (0 to 65535)"))?;
        return Ok(if udp {
            ListenAddr::UdpAny(port)
        } else {
            ListenAddr::TcpAny(port)
        });
    }
    let addr: SocketAddr = inet.parse().map_err(|_| {
        "expected HOST:PORT (127.0.0.1:8080, [::]:443), :PORT, udp:…, a path, unix:…, or @name"
            .to_string()
    })?;
    Ok(if udp {
        ListenAddr::Udp(addr)
    } else {
        ListenAddr::Tcp(addr)
    })
}

/// A bound socket, ready to hand over.
#[derive(Debug)]
pub struct Bound {
    handle: Handle,
    local: String,
    _file: Option<sys::SocketFile>,
}

impl Bound {
    /// The socket, named as the spec said.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A duplicate of the socket, for passing on while this one stays.
    pub fn try_clone_handle(&self) -> Result<Handle> {
        self.handle.try_clone().map_err(Error::io("dup"))
    }

    /// Where it listens, with the real port when port 0 was asked for.
    pub fn local(&self) -> &str {
        &self.local
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.handle.name() {
            Some(n) => write!(f, "{} ({n})", self.local),
            None => f.write_str(&self.local),
        }
    }
}

/// Creates, binds and (for stream and seqpacket sockets) listens.
pub fn bind(spec: &ListenSpec, options: &ListenOptions) -> Result<Bound> {
    let (raw, local, file) = match &spec.addr {
        ListenAddr::TcpAny(port) | ListenAddr::UdpAny(port) => {
            let udp = matches!(spec.addr, ListenAddr::UdpAny(_));
            let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port);
            match sys::bind_inet(any6, udp, true, options.backlog) {
                Ok(b) => Ok(b),
                // No IPv6 on this machine: every IPv4 address instead.
                Err(e) if e.raw_os_error() == Some(sys::EAFNOSUPPORT) => {
                    let any4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), *port);
                    sys::bind_inet(any4, udp, false, options.backlog)
                }
                Err(e) => Err(e),
            }
            .map_err(|e| bind_error(spec, e))?
        }
        ListenAddr::Tcp(addr) | ListenAddr::Udp(addr) => {
            let udp = matches!(spec.addr, ListenAddr::Udp(_));
            sys::bind_inet(*addr, udp, false, options.backlog).map_err(|e| bind_error(spec, e))?
        }
        ListenAddr::UnixPath(..) | ListenAddr::UnixAbstract(..) => {
            sys::bind_unix(&spec.addr, options).map_err(|e| bind_error(spec, e))?
        }
    };
    let mut handle = Handle::from_raw(raw);
    if let Some(name) = &spec.name {
        handle = handle.with_name(name.clone());
    }
    Ok(Bound {
        handle,
        local,
        _file: file,
    })
}

fn bind_error(spec: &ListenSpec, e: std::io::Error) -> Error {
    let what = match &spec.addr {
        ListenAddr::Tcp(a) => format!("TCP {a}"),
        ListenAddr::TcpAny(p) => format!("TCP port {p}"),
        ListenAddr::Udp(a) => format!("UDP {a}"),
        ListenAddr::UdpAny(p) => format!("UDP port {p}"),
        ListenAddr::UnixPath(p, _) => format!("Unix socket {}", p.display()),
        ListenAddr::UnixAbstract(n, _) => format!("abstract Unix socket @{n}"),
    };
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => " (address already in use: another process listens there)",
        std::io::ErrorKind::PermissionDenied => match spec.addr {
            ListenAddr::Tcp(a) | ListenAddr::Udp(a) if a.port() < 1024 => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            ListenAddr::TcpAny(p) | ListenAddr::UdpAny(p) if p < 1024 => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => " (permission denied)",
        },
        std::io::ErrorKind::AddrNotAvailable => " (no such address on this machine)",
        _ => "",
    };
    Error::Bind {
        what: format!("{what}{hint}"),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ListenSpec {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            p("127.0.0.1:8080").addr,
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(p("[::]:443=https").name.as_deref(), Some("https"));
        assert_eq!(p(":8080").addr, ListenAddr::TcpAny(8080));
        assert_eq!(
            p("udp:127.0.0.1:53").addr,
            ListenAddr::Udp("127.0.0.1:53".parse().unwrap())
        );
        assert_eq!(p("udp::53").addr, ListenAddr::UdpAny(53));
        assert_eq!(
            p("/run/a.sock=api").addr,
            ListenAddr::UnixPath("/run/a.sock".into(), UnixType::Stream)
        );
        assert_eq!(
            p("unix-dgram:/x").addr,
            ListenAddr::UnixPath("/x".into(), UnixType::Datagram)
        );
        assert_eq!(
            p("unix-seqpacket:@n").addr,
            ListenAddr::UnixAbstract("n".into(), UnixType::SeqPacket)
        );
        assert_eq!(
            p("@n").addr,
            ListenAddr::UnixAbstract("n".into(), UnixType::Stream)
        );
    }

    #[test]
    fn rejects_bad_specs_clearly() {
        for bad in [
            "",
            "8080",
            "localhost:80",
            ":99999",
            "1.2.3.4",
            "unix:",
            "@",
            "x:1=a:b",
            ":80=",
        ] {
            let e = bad.parse::<ListenSpec>().unwrap_err().to_string();
            assert!(e.contains("listen spec"), "{bad}: {e}");
        }
    }
}
