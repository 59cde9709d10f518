//! A minimal HTTP server written for socket activation with the `listenfd`
//! crate, as many Rust servers are: it knows nothing about handover. Run it
//! under any activator, for instance
//!
//! ```text
//! handover run -l 127.0.0.1:8080 -- target/debug/examples/listenfd_server
//! curl http://127.0.0.1:8080/
//! ```
//!
//! It answers every request with `hello from pid PID on ADDR`, and refuses
//! to start (exit 2) when it was given no listening TCP socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let mut fds = listenfd::ListenFd::from_env();
    let listener: TcpListener = match fds.take_tcp_listener(0) {
        Ok(Some(listener)) => listener,
        Ok(None) => {
            eprintln!(
                "listenfd_server: no socket was passed (LISTEN_FDS is not set for this \
                 process); run me under an activator, e.g. `handover run -l ADDR -- listenfd_server`"
            );
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("listenfd_server: the passed descriptor is not a TCP listener: {e}");
            std::process::exit(2);
        }
    };
    let local = match listener.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => {
            eprintln!("listenfd_server: getsockname: {e}");
            std::process::exit(2);
        }
    };
    eprintln!(
        "listenfd_server: pid {} serving on {local}",
        std::process::id()
    );
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                if let Err(e) = serve(conn, &local) {
                    eprintln!("listenfd_server: {e}");
                }
            }
            Err(e) => eprintln!("listenfd_server: accept: {e}"),
        }
    }
}

fn serve(mut conn: TcpStream, local: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    // Read the request head: up to the blank line, at most 64 KiB.
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let body = format!("hello from pid {} on {local}\n", std::process::id());
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
