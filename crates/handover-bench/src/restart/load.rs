//! The built-in load client: K threads, each making one HTTP request per
//! connection, back to back, and recording every request (start, end,
//! outcome, which server process answered).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::stats::{Outcome, Request};

/// How long a request may take, connect and answer each, before it counts
/// as failed (timed out).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits after a failed request before its next one, as
/// a retrying client would: without it, refused connections (which fail
/// in microseconds) would make the failure count a measure of how fast a
/// loop can be refused, and the spinning clients would take the CPUs the
/// restarting server needs.
pub const RETRY_DELAY: Duration = Duration::from_millis(1);

pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: handover-bench\r\nConnection: close\r\n\r\n";

/// What the clients share with the thread that drives the run.
pub struct Shared {
    pub epoch: Instant,
    pub addr: SocketAddr,
    pub stop: AtomicBool,
    /// The pid of the server process that answered the latest successful
    /// request, so the driver can tell when a new server is answering.
    pub latest_pid: AtomicU32,
}

impl Shared {
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Runs `clients` threads, each `client(shared)`, while `drive` runs on
/// this one; then stops them and gathers every request they made. A
/// client thread that could not start or panicked is an error.
pub fn run_clients<T>(
    shared: &Shared,
    clients: usize,
    client: impl Fn(&Shared) -> Vec<Request> + Sync,
    drive: impl FnOnce() -> Result<T>,
) -> (Result<T>, Vec<Request>) {
    thread::scope(|s| {
        let mut threads = Vec::with_capacity(clients);
        let mut spawned = Ok(());
        for i in 0..clients {
            let client = &client;
            match thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn_scoped(s, move || client(shared))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawned = Err(anyhow!(e).context("starting a client thread"));
                    break;
                }
            }
        }
        let driven = spawned.and_then(|()| drive());
        shared.stop.store(true, Ordering::Relaxed);
        let mut requests = Vec::new();
        let mut panicked = false;
        for t in threads {
            match t.join() {
                Ok(r) => requests.extend(r),
                Err(_) => panicked = true,
            }
        }
        let driven = if panicked {
            driven.and(Err(anyhow!("a client thread panicked")))
        } else {
            driven
        };
        (driven, requests)
    })
}

/// One client thread: requests back to back until `stop`.
pub fn client(shared: &Shared) -> Vec<Request> {
    client_with(shared, request)
}

/// [`client`] with another request: `request(addr, buf)` makes one on a
/// new connection and says how it ended and which server pid answered.
pub fn client_with(
    shared: &Shared,
    request: impl Fn(SocketAddr, &mut Vec<u8>) -> (Outcome, u32),
) -> Vec<Request> {
    let mut records = Vec::with_capacity(1 << 16);
    let mut buf = Vec::with_capacity(256);
    while !shared.stop.load(Ordering::Relaxed) {
        let start = shared.now();
        let (outcome, pid) = request(shared.addr, &mut buf);
        let end = shared.now();
        records.push(Request {
            start,
            end,
            outcome,
            pid,
        });
        if outcome == Outcome::Ok {
            shared.latest_pid.store(pid, Ordering::Relaxed);
        } else {
            thread::sleep(RETRY_DELAY);
        }
    }
    records
}

/// One request on a new connection: connect, send, read until the server
/// closes, check the answer. The demo server answers `Connection: close`.
pub fn request(addr: SocketAddr, buf: &mut Vec<u8>) -> (Outcome, u32) {
    buf.clear();
    let result = (|| -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
        conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        conn.write_all(REQUEST)?;
        conn.read_to_end(buf)?;
        Ok(())
    })();
    if let Err(e) = result {
        return (failure(&e), 0);
    }
    check_answer(buf)
}

/// How a request that failed with `e` is counted.
pub fn failure(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Outcome::Reset
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// `HTTP/1.1 200 OK`, a Content-Length matching the body, and the demo
/// server's body `generation G pid P`; the pid.
pub fn check_answer(answer: &[u8]) -> (Outcome, u32) {
    let (body_start, length) = match parse_head(answer) {
        Ok(head) => head,
        Err(outcome) => return (outcome, 0),
    };
    let body = &answer[body_start..];
    if length != Some(body.len()) {
        return (Outcome::Short, 0);
    }
    // generation G pid P
    let pid = std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.strip_prefix("generation "))
        .and_then(|b| b.split_once(" pid "))
        .and_then(|(_, p)| p.trim().parse::<u32>().ok());
    match pid {
        Some(pid) => (Outcome::Ok, pid),
        None => (Outcome::Short, 0),
    }
}

/// The head at the start of `answer`: `HTTP/1.1 200 ` (else NotOk), where
/// the body starts and the Content-Length, if any. Short when the answer
/// is empty or the head does not end in it.
pub fn parse_head(answer: &[u8]) -> Result<(usize, Option<usize>), Outcome> {
    if answer.is_empty() {
        return Err(Outcome::Short);
    }
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        return Err(Outcome::NotOk);
    }
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(Outcome::Short);
    };
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    Ok((head_end + 4, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let body = "generation 3 pid 4242\n";
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let ok = ok.as_bytes();
        assert_eq!(check_answer(ok), (Outcome::Ok, 4242));
        assert_eq!(check_answer(&ok[..ok.len() - 3]).0, Outcome::Short);
        assert_eq!(check_answer(b"").0, Outcome::Short);
        assert_eq!(
            check_answer(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").0,
            Outcome::NotOk
        );
        assert_eq!(
            check_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n").0,
            Outcome::Short
        );
    }
}
