//! A dispatch worker: an HTTP/1.1 server that takes its connections from
//! `handover::dispatch::incoming()` instead of a listening socket, so it
//! runs under `handover run --workers N` (or `handover dispatch`).
//!
//! ```text
//! handover run -l 127.0.0.1:8080 --workers 4 -- target/debug/examples/dispatch_worker
//! curl http://127.0.0.1:8080/
//! ```
//!
//! Each request is answered with `pool P worker W pid N generation G
//! listener L peeked K`, so a test can tell who served it. One thread per
//! connection; requests on a connection are served until the client
//! closes it. When the dispatcher ends the channel (a reload or a stop),
//! it finishes the connections it has and exits 0.
//!
//! Flags: `--body-bytes N` answers with N bytes of body instead (for the
//! benchmark's large responses); `--stall-after N` stops taking
//! connections after N of them (but keeps the channel open), as a worker
//! that hangs would — a test then kills it and checks nothing is lost;
//! `--delay-ready SECS` waits before asking for the first connection;
//! `--corrupt-state-after N` writes a lie into its state page (that it
//! took connection 2^64-1) once it has taken N connections, as a broken
//! worker would — the dispatcher must drop it; `--corrupt-done-after N`
//! counts 1,000 connections done that it never took, instead;
//! `--close-after N` closes its channel after N connections, serves them,
//! and lives on 10 s before exiting;
//! `--only-worker W` makes those flags (stall, corrupt, close) apply only
//! in worker W (HANDOVER_WORKER), and `--once DIR` only in the first
//! worker to create directory DIR, so that one misbehaving worker among
//! well-behaved ones, and its well-behaved restart, need no shell;
//! `--log-connections` prints `dispatch_worker: pool P took connection ID
//! listener L peeked K first-bytes-match yes|no rcvlowat R` to stderr for
//! each connection, after reading its first K bytes and comparing them
//! with the K bytes the dispatcher peeked (they must be the same: peeking
//! consumes nothing); R is the socket's SO_RCVLOWAT (1 unless the
//! dispatcher left it changed).
//!
//! A connection that starts with a TLS record (0x16) is not HTTP: it is
//! answered with the plain line above and closed, so that TLS clients
//! (routed by SNI) end at once instead of waiting for a handshake.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handover::dispatch::Connection;

fn main() {
    let mut body_bytes: Option<usize> = None;
    let mut stall_after: Option<usize> = None;
    let mut delay_ready = 0.0f64;
    let mut log = false;
    let mut corrupt_after: Option<usize> = None;
    let mut corrupt_done = false;
    let mut close_after: Option<usize> = None;
    let mut only_worker: Option<String> = None;
    let mut once: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || args.next().and_then(|v| v.parse::<f64>().ok());
        match arg.as_str() {
            "--body-bytes" => body_bytes = number().map(|n| n as usize),
            "--stall-after" => stall_after = number().map(|n| n as usize),
            "--delay-ready" => delay_ready = number().unwrap_or(0.0),
            "--log-connections" => log = true,
            "--corrupt-state-after" => corrupt_after = number().map(|n| n as usize),
            "--corrupt-done-after" => {
                corrupt_after = number().map(|n| n as usize);
                corrupt_done = true;
            }
            "--close-after" => close_after = number().map(|n| n as usize),
            "--only-worker" => only_worker = args.next(),
            "--once" => once = args.next(),
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    let chosen = only_worker
        .is_none_or(|w| std::env::var("HANDOVER_WORKER").is_ok_and(|mine| mine == w))
        && once.is_none_or(|dir| std::fs::create_dir(dir).is_ok());
    if !chosen {
        (stall_after, corrupt_after, close_after) = (None, None, None);
    }
    let (incoming, page) = match corrupt_after {
        None => match handover::dispatch::incoming() {
            Ok(i) => (i, None),
            Err(e) => fail(&e.to_string()),
        },
        Some(_) => match incoming_and_page() {
            Ok((i, p)) => (i, Some(p)),
            Err(e) => fail(&e.to_string()),
        },
    };
    std::thread::sleep(Duration::from_secs_f64(delay_ready));
    let who = Arc::new(format!(
        "pool {} worker {} pid {} generation {}",
        std::env::var("HANDOVER_POOL").unwrap_or_default(),
        std::env::var("HANDOVER_WORKER").unwrap_or_default(),
        std::process::id(),
        std::env::var("HANDOVER_GENERATION").unwrap_or_else(|_| "0".into()),
    ));
    let body = Arc::new(body_bytes.map(|n| vec![b'x'; n]));
    let served = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for (taken, conn) in incoming.enumerate() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dispatch_worker: {e}");
                continue;
            }
        };
        let (who, body, served) = (Arc::clone(&who), Arc::clone(&body), Arc::clone(&served));
        threads.push(std::thread::spawn(move || {
            serve(conn, &who, body.as_deref(), &served, log)
        }));
        threads.retain(|t| !t.is_finished());
        if let (Some(n), Some(page)) = (corrupt_after, &page) {
            if taken + 1 >= n {
                say(&format!(
                    "dispatch_worker: pid {} corrupting its state page\n",
                    std::process::id()
                ));
                if corrupt_done {
                    (0..1000).for_each(|_| page.add_done());
                } else {
                    page.set_taken(u64::MAX);
                }
            }
        }
        if close_after.is_some_and(|n| taken + 1 >= n) {
            say(&format!(
                "dispatch_worker: pid {} closing its channel\n",
                std::process::id()
            ));
            break;
        }
        if stall_after.is_some_and(|n| taken + 1 >= n) {
            say(&format!(
                "dispatch_worker: pid {} stalling after {} connections\n",
                std::process::id(),
                taken + 1
            ));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    // The dispatcher ended the channel (or we closed it): finish what we
    // have, then exit.
    for t in threads {
        let _ = t.join();
    }
    if close_after.is_some() {
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// What `incoming()` does, keeping a mapping of the state page for
/// `--corrupt-state-after`.
fn incoming_and_page() -> handover::Result<(
    handover::dispatch::Incoming,
    handover::dispatch::state::StatePage,
)> {
    use handover::dispatch::{state::StatePage, Incoming, CHANNEL_NAME, STATE_NAME};
    let mut activation = handover::activation::take()?;
    let mut take = |name: &str| {
        activation
            .take_named(name)
            .ok_or_else(|| handover::Error::Activation(format!("no {name} handle")))
    };
    let channel = take(CHANNEL_NAME)?.into_channel()?;
    let memory = take(STATE_NAME)?.into_shared_memory()?;
    let page = StatePage::open(&memory)?;
    Ok((Incoming::new(channel, &memory)?, page))
}

/// The connection, read from its first byte: the first bytes already
/// read (to compare them with the peeked ones) come first.
struct Reread {
    first: Vec<u8>,
    at: usize,
    conn: Connection,
}

impl Read for Reread {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.first.len() {
            let n = buf.len().min(self.first.len() - self.at);
            buf[..n].copy_from_slice(&self.first[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.conn.read(buf)
    }
}

/// One line to stderr in one write, so that lines of several processes
/// sharing the stream do not interleave.
fn say(line: &str) {
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The socket's SO_RCVLOWAT (which the dispatcher raises while peeking
/// and must put back), or -1 if it cannot be read.
#[cfg(not(unix))]
fn rcvlowat(_: &handover::dispatch::Stream) -> i32 {
    -1
}

/// The socket's SO_RCVLOWAT, or -1 if it cannot be read.
#[cfg(unix)]
fn rcvlowat(stream: &handover::dispatch::Stream) -> i32 {
    use std::os::fd::{AsRawFd, RawFd};
    let fd: RawFd = match stream {
        handover::dispatch::Stream::Tcp(s) => s.as_raw_fd(),
        handover::dispatch::Stream::Unix(s) => s.as_raw_fd(),
    };
    let mut value: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on the connection's open descriptor, into one
    // c_int of the length given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        value
    } else {
        -1
    }
}

fn serve(mut conn: Connection, who: &str, body: Option<&[u8]>, served: &AtomicUsize, log: bool) {
    let label = format!(
        "{who} listener {} peeked {}\n",
        conn.listener(),
        conn.peeked().len()
    );
    // The peeked bytes are still unread on the socket: reading as many
    // gives the same bytes (they are in the socket's buffer already).
    let mut first = vec![0u8; conn.peeked().len()];
    let same = conn.read_exact(&mut first).is_ok() && first == conn.peeked();
    if log {
        say(&format!(
            "dispatch_worker: pool {} took connection {} listener {} peeked {} first-bytes-match {} rcvlowat {}\n",
            std::env::var("HANDOVER_POOL").unwrap_or_default(),
            conn.id(),
            conn.listener(),
            conn.peeked().len(),
            if same { "yes" } else { "no" },
            rcvlowat(conn.stream()),
        ));
    }
    if first.first() == Some(&0x16) {
        // A TLS ClientHello: not ours to answer with HTTP.
        let _ = conn.write_all(label.as_bytes());
        return;
    }
    let mut reader = BufReader::new(Reread { first, at: 0, conn });
    loop {
        // The request head; the body of a request is not expected.
        let mut line = String::new();
        let mut close = false;
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end().to_ascii_lowercase();
            if first && l.ends_with("http/1.0") {
                close = true;
            }
            first = false;
            if l == "connection: close" {
                close = true;
            }
            if l.is_empty() {
                break;
            }
        }
        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = &mut reader.get_mut().conn;
        let payload: &[u8] = body.unwrap_or(label.as_bytes());
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Served: {n}\r\n{}\r\n",
            payload.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(payload).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn fail(why: &str) -> ! {
    eprintln!("dispatch_worker: {why}");
    std::process::exit(2);
}
