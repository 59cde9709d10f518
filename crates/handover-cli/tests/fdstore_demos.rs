//! The restart demos (examples/http_demo.rs, examples/counter_demo.rs)
//! under the activators that exist today, and counter_demo across two
//! generations with this test playing the supervisor: a NotifySocket that
//! keeps stored descriptors and acknowledges, and `handover::Command` to
//! pass the listener plus the stored descriptors to the next generation.
#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use handover::notify::{ack_reply, fdstore_request, Notification, NotifySocket, StoreReply};
use handover::unix::ChildExt;
use handover::Handle;

/// The body's pid, from `generation G pid P`.
fn body_of(response: &str) -> (String, u32) {
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    let mut words = body.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("generation"), Some(g), Some("pid"), Some(p)) => (g.to_owned(), p.parse().unwrap()),
        _ => panic!("unexpected body {body:?}"),
    }
}

#[test]
fn demos_refuse_to_start_without_sockets() {
    for name in ["http_demo", "counter_demo"] {
        let out = run_with_timeout(
            std::process::Command::new(example(name))
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID"),
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no listening TCP socket"),
            "{name}: {out:?}"
        );
    }
}

#[test]
fn http_demo_serves_and_drains_under_handover_run() {
    let server = example("http_demo");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .arg(&server)
            .arg("--log-connections")
            // handover numbers the generations itself: ours is not passed on.
            .env("HANDOVER_GENERATION", "7"),
    );
    let addr = h.tcp_addr();
    let (generation, pid) = body_of(&http_get(addr));
    assert_eq!(generation, "1");
    assert_ne!(pid as i32, h.pid(), "served by the child");

    // A request in flight when SIGTERM comes is still answered.
    let mut slow = connect(addr);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t").unwrap();
    wait_for("the second connection to be accepted", TIMEOUT, || {
        h.stderr()
            .contains("http_demo: accepted connection 2")
            .then_some(())
    });
    h.signal(libc::SIGTERM);
    // Not answered yet: the request is incomplete. Finish it.
    std::thread::sleep(Duration::from_millis(200));
    slow.write_all(b"est\r\n\r\n").unwrap();
    let (_, same) = body_of(&read_all(slow));
    assert_eq!(same, pid);
    let status = h.wait(TIMEOUT);
    assert!(h.stderr().contains("http_demo: drained"), "{}", h.report());
    assert!(
        status.success() || status.code().is_none(),
        "{}",
        describe(status)
    );
}

#[test]
fn http_demo_under_systemd_socket_activate() {
    if std::process::Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-socket-activate is not installed");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &addr.to_string()])
        .arg(example("http_demo"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("HANDOVER_GENERATION")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // systemd-socket-activate binds before it starts the program, and
    // starts it on the first connection.
    let response = wait_for("systemd-socket-activate to listen", TIMEOUT, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .ok()
            .map(|s| {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                http_get_on(s)
            })
    });
    let (generation, _) = body_of(&response);
    assert_eq!(generation, "0");
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `line` (which may lack its newline) and, when `expect` is given,
/// reads one answer line.
fn ask(reader: &mut BufReader<TcpStream>, line: &str, expect: Option<&str>) {
    reader.get_mut().write_all(line.as_bytes()).unwrap();
    if let Some(expect) = expect {
        let mut got = String::new();
        reader
            .read_line(&mut got)
            .unwrap_or_else(|e| panic!("reading the answer to {line:?}: {e}"));
        assert_eq!(got, expect, "answer to {line:?}");
    }
}

fn client(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(connect(addr))
}

#[test]
fn counter_demo_counts_under_handover_run() {
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .arg(example("counter_demo"))
            .arg("--no-ack"),
    );
    let addr = h.tcp_addr();
    let mut a = client(addr);
    let mut b = client(addr);
    ask(&mut a, "one\n", Some("1\n"));
    ask(&mut a, "two\n", Some("2\n"));
    ask(&mut b, "x\n", Some("1\n"));
    ask(&mut a, "thr", None);
    ask(&mut a, "ee\n", Some("3\n"));
    // Several lines in one write are each answered.
    ask(&mut b, "y\nz\n", Some("2\n"));
    ask(&mut b, "", Some("3\n"));
    h.signal(libc::SIGTERM);
    h.wait(TIMEOUT);
    assert!(
        h.stderr().contains("counter_demo: handed over"),
        "{}",
        h.report()
    );
}

/// The test's fd store: what a supervisor keeps between generations.
#[derive(Default)]
struct Store {
    entries: Vec<Handle>,
    refusals: Vec<String>,
}

impl Store {
    /// Handles one notification; true when it is READY=1.
    fn handle(&mut self, sock: &NotifySocket, mut n: Notification) -> bool {
        let ready = n.get("READY") == Some("1");
        match fdstore_request(&mut n) {
            None => {}
            Some(Ok(r)) => {
                let outcome = if r.remove {
                    self.entries.retain(|h| h.name() != Some(r.name.as_str()));
                    StoreReply::Removed
                } else {
                    self.entries.extend(r.handles);
                    StoreReply::Stored
                };
                if let Some(cookie) = &r.cookie {
                    sock.reply(&n, &ack_reply(cookie, &outcome, &r.name))
                        .unwrap();
                }
            }
            Some(Err(e)) => {
                self.refusals.push(e.reason.clone());
                if let Some(cookie) = &e.cookie {
                    let outcome = StoreReply::Refused(e.reason.clone());
                    sock.reply(&n, &ack_reply(cookie, &outcome, &e.name))
                        .unwrap();
                }
            }
        }
        ready
    }

    /// Serves notifications until `done` (checked between them) holds.
    fn pump_until(&mut self, sock: &NotifySocket, what: &str, mut done: impl FnMut(bool) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        let mut ready = false;
        loop {
            while let Some(n) = sock.try_recv().unwrap() {
                ready |= self.handle(sock, n);
            }
            if done(ready) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.iter().filter_map(|h| h.name()).collect();
        names.sort();
        names
    }
}

fn start(
    server: &std::path::Path,
    listener: &TcpListener,
    store: &Store,
    sock: &NotifySocket,
) -> handover::Child {
    let mut cmd = handover::Command::new(server);
    cmd.env("NOTIFY_SOCKET", sock.address());
    cmd.activation(Handle::from(listener.try_clone().unwrap()).with_name("counter"))
        .unwrap();
    for h in &store.entries {
        let name = h.name().unwrap().to_owned();
        cmd.activation(h.try_clone().unwrap().with_name(name))
            .unwrap();
    }
    cmd.spawn().unwrap()
}

fn stop(child: &mut handover::Child, store: &mut Store, sock: &NotifySocket) {
    child.signal(libc::SIGTERM).unwrap();
    store.pump_until(sock, "the program to exit", |_| {
        child.try_wait().unwrap().is_some()
    });
    // Anything sent just before the exit.
    store.pump_until(sock, "the last notifications", |_| true);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn counter_demo_keeps_its_clients_across_a_restart() {
    let server = example("counter_demo");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sock = NotifySocket::bind_unique().unwrap().keep_handles(true);
    let mut store = Store::default();

    let mut gen1 = start(&server, &listener, &store, &sock);
    store.pump_until(&sock, "generation 1 to be ready", |ready| ready);
    let mut a = client(addr);
    let mut b = client(addr);
    ask(&mut a, "a\n", Some("1\n"));
    ask(&mut a, "b\n", Some("2\n"));
    ask(&mut b, "x\n", Some("1\n"));
    // Half a line before the restart, the rest after it.
    ask(&mut a, "c", None);
    // Usually generation 1 reads the half line before it stops and it
    // travels in the state memfd; otherwise it is still in the socket.
    // Either way it must count once.
    std::thread::sleep(Duration::from_millis(300));

    stop(&mut gen1, &mut store, &sock);
    assert_eq!(store.names(), ["conn-0", "conn-1", "state"]);
    assert!(store.refusals.is_empty(), "{:?}", store.refusals);

    // Between generations the clients may talk; nobody answers yet.
    ask(&mut b, "y\n", None);

    let mut gen2 = start(&server, &listener, &store, &sock);
    store.pump_until(&sock, "generation 2 to be ready", |ready| ready);
    // Resumed entries were removed from the store.
    assert!(store.entries.is_empty(), "{:?}", store.names());
    ask(&mut b, "", Some("2\n"));
    ask(&mut a, "\n", Some("3\n"));
    ask(&mut a, "d\n", Some("4\n"));
    ask(&mut b, "z\n", Some("3\n"));
    let mut c = client(addr);
    ask(&mut c, "new\n", Some("1\n"));

    stop(&mut gen2, &mut store, &sock);
    assert_eq!(store.names(), ["conn-0", "conn-1", "conn-2", "state"]);
    assert!(store.refusals.is_empty(), "{:?}", store.refusals);
}
