//! The processes the `dispatch` scenario starts, all this very program
//! (`handover-bench dispatch --serve MODE`): one HTTP worker whose serving
//! code is the same in every mode, only the way it gets its connections
//! differs, and the byte-copying proxy of the large-response baseline.
//!
//! * `incoming`: from `handover::dispatch::incoming()`, under `handover run
//!   --workers N`;
//! * `accept`: from its own listening socket on 127.0.0.1 (`--port`, 0 for
//!   any; with `--reuseport`, SO_REUSEPORT set before bind, so that N such
//!   processes share the port and the kernel spreads connections);
//! * `proxy`: accepts, connects to `--backend`, and copies both ways.
//!
//! The worker serves one connection at a time on its one thread: read the
//! request head, write the whole answer, close. Short answers are `200 OK`
//! with the body `generation 0 pid P` (what the restart scenario's client
//! checks), large ones `--body-bytes N` bytes of `x`. The self-accepting
//! modes print `listening on PORT` on stdout once they listen.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;

use anyhow::{bail, Context, Result};

/// The proxy's copy buffer.
pub const PROXY_BUFFER: usize = 64 * 1024;
/// The most a request head may take.
const HEAD_LIMIT: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Incoming,
    Accept,
    Proxy,
}

/// What `--serve` needs besides the mode.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub port: u16,
    pub reuseport: bool,
    pub body_bytes: Option<usize>,
    pub backend: Option<SocketAddr>,
}

pub fn run(o: &Options) -> Result<()> {
    match o.mode {
        Mode::Incoming => {
            let answer = answer(o.body_bytes);
            let mut head = vec![0u8; HEAD_LIMIT];
            for conn in handover::dispatch::incoming()? {
                let mut conn = conn?;
                // A client that goes away is its own business.
                let _ = serve(&mut conn, &mut head, &answer);
            }
            Ok(())
        }
        Mode::Accept => {
            let listener = listen(o.port, o.reuseport)?;
            announce(&listener)?;
            let answer = answer(o.body_bytes);
            let mut head = vec![0u8; HEAD_LIMIT];
            loop {
                let (mut conn, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("accept"),
                };
                let _ = serve(&mut conn, &mut head, &answer);
            }
        }
        Mode::Proxy => {
            let Some(backend) = o.backend else {
                bail!("--serve proxy needs --backend ADDR");
            };
            let listener = listen(o.port, false)?;
            announce(&listener)?;
            loop {
                let (conn, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("accept"),
                };
                thread::spawn(move || {
                    if let Err(e) = proxy(conn, backend) {
                        eprintln!("dispatch proxy: {e}");
                    }
                });
            }
        }
    }
}

/// The whole answer, head and body, written with one `write_all`.
fn answer(body_bytes: Option<usize>) -> Vec<u8> {
    let body = match body_bytes {
        Some(n) => vec![b'x'; n],
        None => format!("generation 0 pid {}\n", std::process::id()).into_bytes(),
    };
    let mut a = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    a.extend_from_slice(&body);
    a
}

/// One connection: the request head, then the answer; the connection is
/// closed by the caller's drop.
fn serve(conn: &mut (impl Read + Write), head: &mut [u8], answer: &[u8]) -> io::Result<()> {
    let mut have = 0;
    loop {
        let n = conn.read(&mut head[have..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let from = have.saturating_sub(3);
        have += n;
        if head[from..have].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if have == head.len() {
            return Err(io::Error::other("request head too long"));
        }
    }
    conn.write_all(answer)
}

fn listen(port: u16, reuseport: bool) -> Result<TcpListener> {
    use rustix::net::{bind, listen, socket, sockopt, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if reuseport {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    bind(&fd, &addr).with_context(|| format!("binding {addr}"))?;
    listen(&fd, 1024)?;
    Ok(TcpListener::from(fd))
}

fn announce(listener: &TcpListener) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {}", listener.local_addr()?.port())?;
    out.flush()?;
    Ok(())
}

/// One proxied connection: the request one way on a thread of its own,
/// the answer the other way on this one, each a read/write loop on a
/// [`PROXY_BUFFER`]-byte buffer; each direction's end is passed on as a
/// shutdown.
fn proxy(client: TcpStream, backend: SocketAddr) -> io::Result<()> {
    let server = TcpStream::connect(backend)?;
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let up = thread::spawn(move || copy(c2, s2));
    let down = copy(server, client);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("panicked")));
    down.and(up)
}

fn copy(mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; PROXY_BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = to.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        to.write_all(&buf[..n])?;
    }
    // The peer may be gone already.
    let _ = to.shutdown(Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restart::load::check_answer;
    use crate::restart::stats::Outcome;

    #[test]
    fn answers_are_what_the_client_checks() {
        let a = answer(None);
        assert_eq!(check_answer(&a), (Outcome::Ok, std::process::id()));
        let big = answer(Some(1000));
        let (start, length) = crate::restart::load::parse_head(&big).unwrap();
        assert_eq!((big.len() - start, length), (1000, Some(1000)));
    }

    #[test]
    fn serves_one_request() {
        struct Fake(Vec<u8>, Vec<u8>);
        impl Read for Fake {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                // Two bytes at a time: the head's end spans reads.
                let n = b.len().min(2).min(self.0.len());
                b[..n].copy_from_slice(&self.0[..n]);
                self.0.drain(..n);
                Ok(n)
            }
        }
        impl Write for Fake {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut f = Fake(crate::restart::load::REQUEST.to_vec(), Vec::new());
        let mut head = vec![0u8; HEAD_LIMIT];
        serve(&mut f, &mut head, b"hi").unwrap();
        assert_eq!(f.1, b"hi");
        let mut f = Fake(b"GET / HTTP/1.1\r\n".to_vec(), Vec::new());
        assert!(serve(&mut f, &mut head, b"hi").is_err());
        assert!(f.1.is_empty());
    }
}
