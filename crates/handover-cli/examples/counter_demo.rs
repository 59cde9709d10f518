//! A line counter whose clients survive restarts: every connection counts
//! the lines it sent and gets `N\n` back for each. On SIGTERM the program
//! hands its open connections, and a memfd with their counts, to the
//! supervisor's fd store (systemd's FDSTORE=1), then exits without
//! closing them; the next generation gets them back after its listening
//! sockets and carries on counting where the last one stopped.
//!
//! ```text
//! handover run -l 127.0.0.1:7000 -- target/debug/examples/counter_demo
//! ```
//!
//! Fd store names: `conn-0`, `conn-1`, … one per connection, and `state`,
//! a memfd holding one line per connection: `NAME COUNT PENDING`, where
//! PENDING is the hex of a partial line not yet answered ("-" if none).
//!
//! Once a generation has resumed the stored connections it removes them
//! from the store (FDSTOREREMOVE=1): systemd-style stores keep entries
//! until removed and pass them to every later generation, and a connection
//! must not be served by two. It stores its connections again, under fresh
//! names, when it stops.
//!
//! Requests carry handover's acknowledgement (HANDOVER_ACK) so that
//! a refusal is seen; if the first request is not answered within two
//! seconds (a supervisor such as systemd, which never answers) the rest go
//! unacknowledged. `--no-ack` never asks.

#[cfg(not(unix))]
fn main() {
    eprintln!("counter_demo: Unix only (it needs an fd store over NOTIFY_SOCKET)");
    std::process::exit(2);
}

#[cfg(unix)]
fn main() {
    unix::main()
}

#[cfg(unix)]
mod unix {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    use handover::notify::{self, StoreReply};
    use handover::{Error, Handle, SharedMemory};
    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    struct Conn {
        stream: TcpStream,
        count: u64,
        /// Bytes of a line not finished yet: they travel with the
        /// connection, so a line split across a restart still counts once.
        pending: Vec<u8>,
    }

    /// Whether fd-store requests ask for an answer (see the module docs).
    struct Store {
        ack: bool,
    }

    impl Store {
        fn send(&mut self, name: &str, handles: &[Handle], poll: bool) {
            let result = if self.ack {
                let r = match handles {
                    [] => notify::remove_stored_acked(name, Duration::from_secs(2)),
                    _ => notify::store_acked(name, handles, poll, Duration::from_secs(2)),
                };
                match r {
                    Ok(StoreReply::Refused(why)) => Err(format!("refused: {why}")),
                    Ok(_) => Ok(()),
                    Err(Error::TimedOut { .. }) => {
                        // Probably stored anyway: never resend, stop asking.
                        eprintln!("counter_demo: the supervisor does not acknowledge");
                        self.ack = false;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            } else {
                match handles {
                    [] => notify::remove_stored(name),
                    _ => notify::store(name, handles, poll),
                }
                .map(drop)
                .map_err(|e| e.to_string())
            };
            if let Err(e) = result {
                eprintln!("counter_demo: fd store {name}: {e}");
            }
        }
    }

    pub fn main() {
        // Blocked before threads exist (there are none): SIGTERM is read
        // from a signalfd in the poll loop, never interrupting a write.
        let sigfd = signalfd_sigterm();
        let mut activation = match handover::activation::take() {
            Ok(a) => a,
            Err(e) => fail(&format!("bad activation environment: {e}")),
        };
        let mut store = Store {
            ack: !std::env::args().any(|a| a == "--no-ack"),
        };
        let names = activation.names().to_vec();
        let state = activation.take_named("state").map(read_state);
        let mut listeners = Vec::new();
        let mut conns = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let Some(handle) = activation.take(i) else {
                continue;
            };
            if name.starts_with("conn-") {
                let Ok(stream) = handle.into_tcp_stream() else {
                    eprintln!("counter_demo: {name} is not a TCP connection");
                    continue;
                };
                let (count, pending) = state
                    .as_ref()
                    .and_then(|s| s.get(name).cloned())
                    .unwrap_or_default();
                conns.push(Conn {
                    stream,
                    count,
                    pending,
                });
            } else if let Ok(l) = handle.into_tcp_listener() {
                listeners.push(l);
            }
        }
        if listeners.is_empty() {
            fail(
                "no listening TCP socket was passed; run me under an activator, \
                 e.g. `handover run -l 127.0.0.1:7000 -- counter_demo`",
            );
        }
        // Resumed: out of the store, so no later generation gets them too.
        let mut stored: Vec<&String> = names.iter().filter(|n| is_stored(n)).collect();
        stored.sort();
        stored.dedup();
        for name in stored {
            store.send(name, &[], false);
        }
        for l in &listeners {
            // Shared with other generations: see http_demo's accept loop.
            l.set_nonblocking(true).expect("non-blocking listener");
        }
        eprintln!(
            "counter_demo: pid {} serving, {} connection(s) resumed",
            std::process::id(),
            conns.len()
        );
        let _ = notify::notify("READY=1\nSTATUS=counting");

        serve(&sigfd, &listeners, &mut conns);

        let _ = notify::notify("STOPPING=1\nSTATUS=handing over");
        let mut table = String::new();
        for (i, c) in conns.into_iter().enumerate() {
            let name = format!("conn-{i}");
            let pending = if c.pending.is_empty() {
                "-".to_owned()
            } else {
                c.pending.iter().map(|b| format!("{b:02x}")).collect()
            };
            table.push_str(&format!("{name} {} {pending}\n", c.count));
            // poll: a connection that hangs up meanwhile may be dropped.
            store.send(&name, &[Handle::from(c.stream)], true);
        }
        if !table.is_empty() {
            let shm = SharedMemory::create("state", table.len()).expect("memfd");
            let map = shm.map().expect("map state");
            map.write_at(0, table.as_bytes()).expect("write state");
            store.send("state", &[Handle::from(shm)], false);
        }
        // Exiting closes our copies only: the store holds the connections.
        eprintln!("counter_demo: handed over, exiting");
    }

    fn is_stored(name: &str) -> bool {
        name == "state" || name.starts_with("conn-")
    }

    /// The loop: until SIGTERM, accept, and answer every complete line.
    fn serve(sigfd: &OwnedFd, listeners: &[TcpListener], conns: &mut Vec<Conn>) {
        loop {
            let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(sigfd, PollFlags::IN)];
            fds.extend(listeners.iter().map(|l| PollFd::new(l, PollFlags::IN)));
            fds.extend(conns.iter().map(|c| PollFd::new(&c.stream, PollFlags::IN)));
            let timeout = Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            if poll(&mut fds, Some(&timeout)).is_err() {
                continue; // EINTR
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if ready[0] {
                return;
            }
            for (l, _) in listeners.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
                while let Ok((stream, _)) = l.accept() {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                    conns.push(Conn {
                        stream,
                        count: 0,
                        pending: Vec::new(),
                    });
                }
            }
            let first = 1 + listeners.len();
            let mut closed = Vec::new();
            for (i, c) in conns.iter_mut().enumerate() {
                if ready.get(first + i) == Some(&true) && !read_lines(c) {
                    closed.push(i);
                }
            }
            for i in closed.into_iter().rev() {
                conns.remove(i);
            }
        }
    }

    /// One read (poll said it will not block), answering each whole line.
    /// False when the client is gone.
    fn read_lines(c: &mut Conn) -> bool {
        let mut buf = [0u8; 4096];
        let n = match c.stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        c.pending.extend_from_slice(&buf[..n]);
        let mut answer = String::new();
        while let Some(end) = c.pending.iter().position(|&b| b == b'\n') {
            c.pending.drain(..=end);
            c.count += 1;
            answer.push_str(&format!("{}\n", c.count));
        }
        c.stream.write_all(answer.as_bytes()).is_ok()
    }

    /// The `state` memfd: name -> (count, pending bytes).
    fn read_state(h: Handle) -> BTreeMap<String, (u64, Vec<u8>)> {
        let mut text = vec![0u8; 0];
        if let Ok(shm) = h.into_shared_memory() {
            if let Ok(map) = shm.map() {
                text = vec![0u8; map.len()];
                let _ = map.read_at(0, &mut text);
            }
        }
        let text = String::from_utf8_lossy(&text);
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let mut f = line.trim_end_matches('\0').split(' ');
            let (Some(name), Some(count), Some(pending)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Ok(count) = count.parse() else { continue };
            let pending = (0..pending.len() / 2)
                .filter_map(|i| u8::from_str_radix(pending.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            out.insert(name.to_owned(), (count, pending));
        }
        out
    }

    fn signalfd_sigterm() -> OwnedFd {
        // SAFETY: the set is initialised before use; signalfd returns a new
        // descriptor that we own, or -1.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                fail("signalfd failed");
            }
            OwnedFd::from_raw_fd(fd)
        }
    }

    fn fail(why: &str) -> ! {
        eprintln!("counter_demo: {why}");
        std::process::exit(2);
    }
}
