//! `handover hold` with the library client and the CLI commands: every
//! kind of handle stored and retrieved and then really used, put/get/ls/
//! rm/wait, TTL expiry (the descriptor is really closed), waits that start
//! before the producer.

#![cfg(target_os = "linux")]

mod holder_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use handover::holder::{Entry, ErrorCode, StoreOptions};
use handover::unix::HandleExt;
use handover::Handle;
use holder_common::*;

fn kind_of(entries: &[Entry], name: &str) -> String {
    entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {entries:?}"))
        .kind
        .clone()
}

#[test]
fn every_kind_of_handle_is_stored_retrieved_and_works() {
    let holder = Holder::start(&[]);
    let mut client = holder.client();
    let opts = StoreOptions::new;

    // A TCP listener: connect to it, accept through the retrieved one.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    client.store("tcp", &Handle::from(tcp), opts()).unwrap();

    // A UDP socket: a datagram to its address arrives on the retrieved one.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    client.store("udp", &Handle::from(udp), opts()).unwrap();

    // A Unix stream listener and a Unix datagram socket, on paths.
    let unix_path = holder.dir.join("stream.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    client.store("unix", &Handle::from(unix), opts()).unwrap();
    let dgram_path = holder.dir.join("dgram.sock");
    let dgram = UnixDatagram::bind(&dgram_path).unwrap();
    client.store("dgram", &Handle::from(dgram), opts()).unwrap();

    // A pipe's reading end: what is written later is read through it.
    let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
    client.store("pipe", &Handle::from(pipe_r), opts()).unwrap();

    // A memfd with contents.
    let memfd = rustix::fs::memfd_create("holder-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut mem = std::fs::File::from(memfd);
    mem.write_all(b"in memory").unwrap();
    client.store("memfd", &Handle::from(mem), opts()).unwrap();

    // A regular file.
    let file_path = holder.dir.join("data.txt");
    std::fs::write(&file_path, b"on disk").unwrap();
    let file = std::fs::File::open(&file_path).unwrap();
    client.store("file", &Handle::from(file), opts()).unwrap();

    // The holder describes each from what the OS says it is.
    let entries = client.list().unwrap();
    assert_eq!(entries.len(), 7);
    for (name, kind) in [
        ("tcp", "tcp-listener"),
        ("udp", "udp"),
        ("unix", "unix-listener"),
        ("dgram", "unix-dgram"),
        ("pipe", "pipe"),
        ("memfd", "memfd"),
        ("file", "file"),
    ] {
        assert_eq!(kind_of(&entries, name), kind, "{name}");
    }
    let tcp_entry = entries.iter().find(|e| e.name == "tcp").unwrap();
    assert_eq!(
        tcp_entry.address.as_deref(),
        Some(tcp_addr.to_string().as_str())
    );
    assert_eq!(tcp_entry.owner_uid, rustix::process::getuid().as_raw());
    let unix_entry = entries.iter().find(|e| e.name == "unix").unwrap();
    assert_eq!(unix_entry.address.as_deref(), unix_path.to_str());

    // Every one of them works after retrieval (the originals are closed
    // here: the holder's and the retrieved copies are all that remain).
    let listener = client.retrieve("tcp").unwrap().into_tcp_listener().unwrap();
    let mut conn = TcpStream::connect(tcp_addr).unwrap();
    let (mut served, _) = listener.accept().unwrap();
    served.write_all(b"tcp ok").unwrap();
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"tcp ok");

    let udp = client.retrieve("udp").unwrap().into_udp_socket().unwrap();
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"udp ok", udp_addr)
        .unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    let n = udp.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"udp ok");

    let unix = client
        .retrieve("unix")
        .unwrap()
        .into_unix_listener()
        .unwrap();
    let mut c = UnixStream::connect(&unix_path).unwrap();
    let (mut s, _) = unix.accept().unwrap();
    s.write_all(b"unix ok").unwrap();
    let mut buf = [0u8; 7];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"unix ok");

    let dgram = client
        .retrieve("dgram")
        .unwrap()
        .into_unix_datagram()
        .unwrap();
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"dgram ok", &dgram_path)
        .unwrap();
    dgram.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    let n = dgram.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"dgram ok");

    let pipe: OwnedFd = client.retrieve("pipe").unwrap().into();
    let mut w = std::fs::File::from(pipe_w);
    w.write_all(b"pipe ok").unwrap();
    drop(w);
    let mut got = String::new();
    std::fs::File::from(pipe).read_to_string(&mut got).unwrap();
    // The holder still holds a reading end, so EOF came only because the
    // writer closed: the bytes are what matters.
    assert_eq!(got, "pipe ok");

    let mut mem = client.retrieve("memfd").unwrap().into_file().unwrap();
    let mut got = String::new();
    std::io::Seek::seek(&mut mem, std::io::SeekFrom::Start(0)).unwrap();
    mem.read_to_string(&mut got).unwrap();
    assert_eq!(got, "in memory");

    let mut file = client.retrieve("file").unwrap().into_file().unwrap();
    let mut got = String::new();
    file.read_to_string(&mut got).unwrap();
    assert_eq!(got, "on disk");

    // Retrieval hands out duplicates: everything is still held.
    assert_eq!(client.list().unwrap().len(), 7);
    // `take` hands out the entry itself and forgets it.
    let _ = client.take("tcp").unwrap().into_tcp_listener().unwrap();
    let e = client.retrieve("tcp").unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::NotFound), "{e}");
    assert_eq!(client.list().unwrap().len(), 6);
}

#[test]
fn unix_datagrams_arrive_through_the_retrieved_socket() {
    let holder = Holder::start(&[]);
    let mut client = holder.client();
    let path = holder.dir.join("d.sock");
    client
        .store(
            "d",
            &Handle::from(UnixDatagram::bind(&path).unwrap()),
            StoreOptions::new(),
        )
        .unwrap();
    let d = client.retrieve("d").unwrap().into_unix_datagram().unwrap();
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"dgram ok", &path)
        .unwrap();
    d.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    let n = d.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"dgram ok");
}

#[test]
fn store_refuses_a_taken_name_unless_replace() {
    let holder = Holder::start(&[]);
    let mut client = holder.client();
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let h = Handle::from(r);
    client.store("x", &h, StoreOptions::new()).unwrap();
    let e = client.store("x", &h, StoreOptions::new()).unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::Exists), "{e}");
    assert!(e.to_string().contains("replace"), "{e}");
    let file = std::fs::File::open("/dev/null").unwrap();
    let entry = client
        .store("x", &Handle::from(file), StoreOptions::new().replace(true))
        .unwrap();
    assert_eq!(entry.kind, "char-device");
    assert_eq!(kind_of(&client.list().unwrap(), "x"), "char-device");
    // Bad names never reach the holder.
    let e = client.store("a:b", &h, StoreOptions::new()).unwrap_err();
    assert!(e.to_string().contains("':'"), "{e}");
}

/// The CLI: `put --listen` stores a bound socket and prints its address;
/// `get … -- PROGRAM` starts the program on it by socket activation; the
/// program (Python, knowing nothing of handover) serves through it.
#[test]
fn cli_put_get_ls_rm() {
    let holder = Holder::start(&[]);
    let addr = ok(&mut holder.cmd(["put", "web", "--listen", "127.0.0.1:0"]));
    let addr: std::net::SocketAddr = addr.trim().parse().expect("put prints the address");

    // A pipe stored by descriptor number.
    let (r, w) = rustix::pipe::pipe().unwrap();
    let mut put = holder.cmd(["put", "in", "--fd", "3"]);
    {
        use std::os::unix::process::CommandExt;
        let r = std::sync::Mutex::new(Some(r));
        let raw = std::os::fd::AsRawFd::as_raw_fd(r.lock().unwrap().as_ref().unwrap());
        // SAFETY: dup2 in the child between fork and exec, on a descriptor
        // that stays open in the parent until the child has run.
        unsafe {
            put.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        ok(&mut put);
    }
    let mut w = std::fs::File::from(w);
    w.write_all(b"through stdin\n").unwrap();
    drop(w);

    let json = ok(&mut holder.cmd(["ls", "--json"]));
    let list: Vec<Entry> = serde_json::from_str(&json).unwrap();
    assert_eq!(list.len(), 2, "{json}");
    assert_eq!(kind_of(&list, "web"), "tcp-listener");
    assert_eq!(kind_of(&list, "in"), "pipe");
    let table = ok(&mut holder.cmd(["ls"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(&addr.to_string()), "{table}");

    // The program gets the socket at fd 3 with LISTEN_FDS, LISTEN_PID (its
    // own pid) and LISTEN_FDNAMES, and serves one connection through it.
    let script = "import os, socket\n\
        assert os.environ['LISTEN_FDS'] == '1', os.environ.get('LISTEN_FDS')\n\
        assert os.environ['LISTEN_PID'] == str(os.getpid())\n\
        assert os.environ['LISTEN_FDNAMES'] == 'web'\n\
        s = socket.socket(fileno=3)\n\
        c, _ = s.accept()\n\
        c.sendall(b'served from fd 3')\n\
        c.close()\n";
    let mut get = holder.cmd(["get", "web", "--", "python3", "-c", script]);
    get.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut program = get.spawn().unwrap();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "served from fd 3");
    let status = wait_child(&mut program);
    assert!(status.success(), "{status}");

    // --stdin: the pipe on the program's standard input.
    let out = ok(&mut holder.cmd(["get", "in", "--stdin", "--", "cat"]));
    assert_eq!(out, "through stdin\n");

    // A Unix socket bound by `put` keeps its file after `put` exits: the
    // socket lives on in the holder, and connections reach it.
    let unix_path = holder.dir.join("put.sock");
    let printed = ok(&mut holder.cmd([
        "put",
        "u",
        "--listen",
        &format!("unix:{}", unix_path.display()),
    ]));
    assert_eq!(printed.trim(), unix_path.to_str().unwrap());
    assert!(unix_path.exists(), "the socket file was removed");
    let mut c = holder.client();
    let unix = c.retrieve("u").unwrap().into_unix_listener().unwrap();
    let mut client_end = UnixStream::connect(&unix_path).unwrap();
    let (mut server_end, _) = unix.accept().unwrap();
    server_end.write_all(b"u").unwrap();
    let mut one = [0u8; 1];
    client_end.read_exact(&mut one).unwrap();
    c.remove("u").unwrap();

    // The exit status is the program's.
    let out = run(&mut holder.cmd(["get", "web", "--", "sh", "-c", "exit 7"]));
    assert_eq!(out.status.code(), Some(7));

    // A missing program is found before anything leaves the holder.
    let e = fails(&mut holder.cmd(["get", "web", "--remove", "--", "/nonexistent/program"]));
    assert!(e.contains("not found"), "{e}");
    // All or nothing: one missing name, nothing is handed out or removed.
    let e = fails(&mut holder.cmd(["get", "web", "nope", "--remove", "--", "true"]));
    assert!(e.contains("no entry named \"nope\""), "{e}");
    ok(&mut holder.cmd(["get", "web", "--remove", "--", "true"]));
    let e = fails(&mut holder.cmd(["get", "web", "--", "true"]));
    assert!(e.contains("not-found"), "{e}");

    ok(&mut holder.cmd(["rm", "in"]));
    let e = fails(&mut holder.cmd(["rm", "in"]));
    assert!(e.contains("no entry named \"in\""), "{e}");
    assert_eq!(ok(&mut holder.cmd(["ls", "--json"])).trim(), "[]");

    // Usage errors are clear.
    let e = fails(handover(["ls"]).env_remove("HANDOVER_HOLDER"));
    assert!(e.contains("HANDOVER_HOLDER"), "{e}");
    let e = fails(&mut holder.cmd(["put", "bad name", "--fd", "0"]));
    assert!(e.contains("names are made of"), "{e}");
    let e = fails(&mut holder.cmd(["put", "x", "--listen", "nonsense"]));
    assert!(e.contains("listen spec"), "{e}");
}

fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An entry expires at its TTL and its descriptor is really closed: the
/// holder held the only writing end of a pipe, and the reader sees EOF.
#[test]
fn ttl_expiry_closes_the_descriptor() {
    let holder = Holder::start(&[]);
    let mut client = holder.client();
    let (r, w) = rustix::pipe::pipe().unwrap();
    client
        .store(
            "w",
            &Handle::from(w),
            StoreOptions::new().ttl(Duration::from_millis(300)),
        )
        .unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    client
        .store(
            "tcp",
            &Handle::from(tcp),
            StoreOptions::new().ttl(Duration::from_millis(300)),
        )
        .unwrap();
    client
        .store(
            "kept",
            &Handle::from(std::fs::File::open("/dev/null").unwrap()),
            StoreOptions::new(),
        )
        .unwrap();
    let entries = client.list().unwrap();
    let w_entry = entries.iter().find(|e| e.name == "w").unwrap();
    let expires = w_entry.expires_unix_ms.expect("a TTL shows as expiry");
    assert!(expires > w_entry.stored_unix_ms && expires - w_entry.stored_unix_ms <= 1000);

    // Our writing end is closed (the store took a duplicate): once the
    // holder closes its own, the reader gets EOF.
    let started = Instant::now();
    let mut reader = std::fs::File::from(r);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = tx.send(reader.read_to_end(&mut buf).map(|_| buf));
    });
    let got = rx
        .recv_timeout(TIMEOUT)
        .expect("the holder never closed the expired pipe");
    assert_eq!(got.unwrap(), b"");
    assert!(started.elapsed() >= Duration::from_millis(100));

    let names: Vec<String> = eventually("the listing to drop expired entries", || {
        let names: Vec<String> = client.list().unwrap().into_iter().map(|e| e.name).collect();
        (names.len() == 1).then_some(names)
    });
    assert_eq!(names, ["kept"]);
    // The expired listener is closed too: nothing listens on its port.
    eventually("the expired listener to be closed", || {
        TcpStream::connect(addr).is_err().then_some(())
    });
    let e = client.retrieve("w").unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::NotFound));
    holder.wait_for_log("expired");
}

/// `handover wait` started before the producer returns once the name is
/// stored; with --timeout and no producer it fails clearly.
#[test]
fn wait_for_a_name_that_comes_later() {
    let holder = Holder::start(&[]);
    let mut waiter = holder.cmd(["wait", "later", "--timeout", "20s"]);
    waiter
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut waiter = waiter.spawn().unwrap();
    // The library's wait too, in a thread.
    let path = holder.path.clone();
    let lib_waiter = std::thread::spawn(move || {
        let mut c = handover::holder::Client::connect(&path).unwrap();
        c.wait("later", None)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "wait returned before the name existed"
    );
    assert!(!lib_waiter.is_finished());
    ok(&mut holder.cmd(["put", "later", "--listen", "127.0.0.1:0"]));
    assert!(wait_child(&mut waiter).success());
    lib_waiter.join().unwrap().unwrap();

    // Present already: at once.
    ok(&mut holder.cmd(["wait", "later"]));
    let started = Instant::now();
    let e = fails(&mut holder.cmd(["wait", "never", "--timeout", "300ms"]));
    assert!(e.contains("did not appear within 300ms"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut c = holder.client();
    let e = c
        .wait("never", Some(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::Timeout), "{e}");
}

/// A waiting client that goes away frees its place: a holder limited to
/// two clients serves others after two waiters were killed.
#[test]
fn a_waiter_that_leaves_frees_its_place() {
    let holder = Holder::start(&["--max-clients", "2"]);
    let before = holder.open_fds();
    let mut waiters: Vec<_> = (0..2)
        .map(|_| {
            let mut w = holder.cmd(["wait", "nothing"]);
            w.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            w.spawn().unwrap()
        })
        .collect();
    eventually("both waiters to connect", || {
        (holder.open_fds() == before + 2).then_some(())
    });
    let e = fails(&mut holder.cmd(["ls"]));
    assert!(e.contains("clients-limit"), "{e}");
    for w in &mut waiters {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    holder.assert_fds(before, "killed waiters");
    ok(&mut holder.cmd(["ls"]));
}

/// SIGTERM: the holder closes everything and removes its socket file.
#[test]
fn sigterm_stops_cleanly() {
    let mut holder = Holder::start(&[]);
    ok(&mut holder.cmd(["put", "x", "--listen", "127.0.0.1:0"]));
    holder.signal(libc::SIGTERM);
    assert!(holder.wait_exit().success());
    assert!(!holder.path.exists(), "the socket file stayed");
    // A second holder on the same path refuses while the first runs, and
    // says how to replace it.
    let holder = Holder::start(&[]);
    let mut second = handover(["hold", "--socket"]);
    second.arg(&holder.path);
    let e = fails(&mut second);
    assert!(e.contains("--takeover"), "{e}");
}

/// `handover get` becomes its program (exec, as s6-fdholder-retrieve):
/// the same pid, signals sent to it reach the program, the exit status is
/// the program's, with its code or of the same signal.
#[test]
fn get_becomes_its_program() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let holder = Holder::start(&[]);
    ok(&mut holder.cmd(["put", "x", "--listen", "127.0.0.1:0"]));
    let script = "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let mut get = holder.cmd(["get", "x", "--", "sh", "-c", script]);
    get.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut get = get.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(get.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(get.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_child(&mut get).code(), Some(42));

    let out = run(&mut holder.cmd(["get", "x", "--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));

    // The program has exactly its descriptors: not the holder connection,
    // nor one `handover get` inherited without close-on-exec (5 here).
    let mut get = holder.cmd(["get", "x", "--", "sh", "-c", "echo $$; ls /proc/$$/fd"]);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: dup2 in the child between fork and exec, onto a number
        // nothing else uses there.
        unsafe {
            get.pre_exec(|| {
                if libc::dup2(2, 5) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    get.stdout(std::process::Stdio::piped());
    let child = get.spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let out = String::from_utf8(out.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(pid.to_string().as_str()), "{out}");
    let fds: Vec<&str> = lines.collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{out}");
}

/// A client in Python, standard library only, written from
/// docs/protocol.md §17 on top of the channel framing of
/// tests/interop/peer.py: store, list, retrieve (a listener stored from
/// Rust), retrieve with remove, and the error codes.
#[test]
fn a_python_client_written_from_the_protocol() {
    let holder = Holder::start(&[]);
    let mut c = holder.client();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    c.store("rust/listener", &Handle::from(l), StoreOptions::new())
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/holder_peer.py"
    );
    let mut python = std::process::Command::new("python3");
    python.arg(script).arg(&holder.path).arg(port.to_string());
    let out = run(&mut python);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("all good"), "{stderr}");
    // What Python left behind, seen from Rust.
    let names: Vec<String> = c.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["py/kept", "rust/listener"]);
}
