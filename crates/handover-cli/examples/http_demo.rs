//! A small HTTP/1.1 server for zero-downtime restarts: it takes its
//! listening sockets with `handover::activation::take()` (so the same
//! source runs on Linux and Windows), answers every request with
//! `generation G pid P`, and on SIGTERM (on Windows: when its stop event,
//! HANDOVER_STOP_EVENT, is set) stops accepting and finishes the requests
//! it already has before exiting 0. It says READY=1 over NOTIFY_SOCKET on
//! both.
//!
//! ```text
//! handover run -l 127.0.0.1:8080 -- target/debug/examples/http_demo
//! curl http://127.0.0.1:8080/
//! ```
//!
//! `G` is HANDOVER_GENERATION (0 when unset), so a test can tell which
//! generation served it. Flags for rollback tests: `--delay-ready SECS`
//! waits before telling the supervisor READY=1; `--crash-on-start` exits 3
//! right after taking the sockets, without ever being ready.
//! `--log-connections` prints `http_demo: accepted connection N` to stderr
//! for each connection, so that a test knows one is in flight.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Set once SIGTERM (or the stop event) arrives: accept no more
/// connections.
static STOP: AtomicBool = AtomicBool::new(false);
/// Connections accepted and not yet answered: what a drain waits for.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static LOG_CONNECTIONS: AtomicBool = AtomicBool::new(false);

pub fn main() {
    // Signals are blocked before any thread exists, so every thread
    // inherits the mask and only the waiting thread ever sees SIGTERM.
    #[cfg(unix)]
    block_sigterm();
    // First thing, before threads: take() edits the environment.
    let activation = match handover::activation::take() {
        Ok(a) => a,
        Err(e) => fail(&format!("bad activation environment: {e}")),
    };
    #[cfg(windows)]
    let stop_event = match handover::windows::StopEvent::from_env() {
        Ok(e) => e,
        Err(e) => fail(&format!("bad stop event: {e}")),
    };
    let mut delay_ready = Duration::ZERO;
    let mut crash = false;
    // `handover demo` runs this same code as `handover demo-http`: that
    // word is not an argument of the server.
    let mut args = std::env::args().skip(1).skip_while(|a| a == "demo-http");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--delay-ready" => {
                let secs = args.next().and_then(|s| s.parse::<f64>().ok());
                let Some(secs) = secs.filter(|s| s.is_finite() && *s >= 0.0) else {
                    fail("--delay-ready needs a number of seconds");
                };
                delay_ready = Duration::from_secs_f64(secs);
            }
            "--crash-on-start" => crash = true,
            "--log-connections" => LOG_CONNECTIONS.store(true, Ordering::SeqCst),
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    let listeners: Vec<TcpListener> = activation
        .into_handles()
        .into_iter()
        .filter_map(|h| h.into_tcp_listener().ok())
        .collect();
    if listeners.is_empty() {
        fail(
            "no listening TCP socket was passed; run me under an activator, \
             e.g. `handover run -l 127.0.0.1:8080 -- http_demo`",
        );
    }
    if crash {
        eprintln!("http_demo: crashing on start, as asked");
        std::process::exit(3);
    }
    let generation = std::env::var("HANDOVER_GENERATION").unwrap_or_else(|_| "0".into());
    let body: Arc<str> = format!("generation {generation} pid {}\n", std::process::id()).into();

    #[cfg(unix)]
    std::thread::spawn(|| {
        wait_sigterm();
        STOP.store(true, Ordering::SeqCst);
    });
    #[cfg(windows)]
    if let Some(event) = stop_event {
        std::thread::spawn(move || {
            event.wait();
            STOP.store(true, Ordering::SeqCst);
        });
    }

    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let body = body.clone();
            if let Ok(addr) = listener.local_addr() {
                eprintln!(
                    "http_demo: generation {generation} pid {} serving on {addr}",
                    std::process::id()
                );
            }
            std::thread::spawn(move || accept_loop(listener, body))
        })
        .collect();

    std::thread::sleep(delay_ready);
    if let Err(e) = handover::notify::notify("READY=1\nSTATUS=serving") {
        eprintln!("http_demo: READY=1 was not sent: {e}");
    }

    for a in acceptors {
        let _ = a.join();
    }
    let _ = handover::notify::notify("STOPPING=1\nSTATUS=draining");
    // Each connection has read and write timeouts, so this ends.
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("http_demo: drained, exiting");
}

fn accept_loop(listener: TcpListener, body: Arc<str>) {
    // Non-blocking, because another generation may share this socket and
    // take the connection between our poll and our accept: a blocking
    // accept would then hold us past SIGTERM. (The flag is on the shared
    // socket; every generation of this program copes with it.)
    if let Err(e) = listener.set_nonblocking(true) {
        fail(&format!("cannot make the listener non-blocking: {e}"));
    }
    let mut accepted = 0u64;
    while !STOP.load(Ordering::SeqCst) {
        #[cfg(unix)]
        if !readable(&listener) {
            continue;
        }
        match listener.accept() {
            Ok((conn, _)) => {
                IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                accepted += 1;
                if LOG_CONNECTIONS.load(Ordering::SeqCst) {
                    eprintln!("http_demo: accepted connection {accepted}");
                }
                let body = body.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, &body) {
                        eprintln!("http_demo: {e}");
                    }
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Windows has no poll here: look again shortly.
                #[cfg(windows)]
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("http_demo: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One request, answered with `Connection: close`: the simplest correct
/// HTTP/1.1, and a drain then never waits on an idle keep-alive client.
fn serve(mut conn: TcpStream, body: &str) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(()); // closed before a whole request: nothing to answer
        }
        head.extend_from_slice(&chunk[..n]);
    }
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn fail(why: &str) -> ! {
    eprintln!("http_demo: {why}");
    std::process::exit(2);
}

#[cfg(unix)]
fn sigterm_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

#[cfg(unix)]
fn block_sigterm() {
    let set = sigterm_set();
    // SAFETY: a valid set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

#[cfg(unix)]
fn wait_sigterm() {
    let set = sigterm_set();
    let mut sig = 0;
    // SAFETY: a valid set and out-pointer; SIGTERM is blocked everywhere.
    while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
}

/// Waits up to 100 ms for a connection, so that STOP is seen promptly.
#[cfg(unix)]
fn readable(listener: &TcpListener) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    matches!(poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}
