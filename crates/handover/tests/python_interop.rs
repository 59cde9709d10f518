//! Interoperability with a peer written from docs/protocol.md alone:
//! tests/interop/peer.py, in plain Python (standard library only).
//!
//! This test is alone in its binary on purpose: it compares the number of
//! open descriptors before and after, which tests running in parallel
//! threads of the same process would disturb.
#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use handover::{
    Channel, ChannelListener, Handle, HandleKind, Message, SocketFamily, SocketInfo, SocketType,
};

/// No single step may take longer than this; nothing in the test waits
/// without a deadline.
const STEP: Duration = Duration::from_secs(30);

const BIG_HANDLES: usize = 300;
const BIG_BYTES: usize = 150_000;

fn open_descriptors() -> usize {
    // The directory's own descriptor is counted too, the same every time.
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/peer.py")
}

/// The Python process; killed and reaped if the test fails midway.
struct Peer {
    child: Option<Child>,
}

impl Peer {
    fn spawn(socket_path: &Path) -> Peer {
        let script = peer_script();
        assert!(
            script.is_file(),
            "the Python peer is missing: {}",
            script.display()
        );
        let child = Command::new("python3")
            .arg(&script)
            .arg(socket_path)
            .stdin(Stdio::null())
            // The peer's diagnostics go straight to the test's stderr.
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                if e.kind() == ErrorKind::NotFound {
                    panic!(
                        "python3 was not found on PATH: this test needs Python 3 \
                         (3.9 or later) to run tests/interop/peer.py ({e})"
                    )
                }
                panic!("could not start python3 {}: {e}", script.display())
            });
        Peer { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("peer running").id()
    }

    /// Fails the test if the peer has already exited: a dead peer would
    /// otherwise only show up as a timeout.
    fn check_alive(&mut self, while_doing: &str) {
        let child = self.child.as_mut().expect("peer running");
        if let Some(status) = child.try_wait().expect("try_wait on python3") {
            self.child = None;
            panic!("the Python peer exited ({status}) while the test was {while_doing}; see its stderr above");
        }
    }

    fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("peer running");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on python3") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the Python peer did not exit within {STEP:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh private directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("handover-pyinterop-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn accept(listener: &ChannelListener, peer: &mut Peer) -> Channel {
    let deadline = Instant::now() + STEP;
    loop {
        match listener.accept_timeout(Duration::from_millis(100)) {
            Ok(ch) => return ch,
            Err(handover::Error::TimedOut { .. }) if Instant::now() < deadline => {
                peer.check_alive("waiting for it to connect");
            }
            Err(e) => panic!("accepting the Python peer: {e}"),
        }
    }
}

fn recv(ch: &Channel, peer: &mut Peer, what: &str) -> Message {
    match ch.recv_timeout(STEP) {
        Ok(Some(m)) => m,
        Ok(None) => {
            peer.check_alive(what);
            panic!("the Python peer closed the channel while the test was {what}")
        }
        Err(e) => panic!("receiving from the Python peer while {what}: {e}"),
    }
}

/// Accepts one connection on a listener that we did not create, without
/// ever blocking past the deadline.
fn accept_tcp(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept through the listener from Python: {e}"),
        }
    }
}

fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).expect("read until end of stream");
    s
}

#[test]
fn python_peer_written_from_the_spec_interoperates() {
    let fds_before = open_descriptors();
    converse();
    let fds_after = open_descriptors();
    assert_eq!(
        fds_before, fds_after,
        "descriptors leaked: {fds_before} open before the conversation, {fds_after} after"
    );
}

fn converse() {
    let dir = TempDir::new();
    let socket_path = dir.0.join("channel.sock");
    let listener = ChannelListener::bind(&socket_path).expect("bind the channel listener");
    let mut peer = Peer::spawn(&socket_path);

    let ch = accept(&listener, &mut peer);
    let creds = ch.peer_credentials().expect("peer credentials");
    assert_eq!(
        creds.pid(),
        peer.pid(),
        "SO_PEERCRED names the Python process"
    );
    drop(creds);

    // (a) Python hands over a listening TCP socket, its port as the payload.
    let mut msg = recv(&ch, &mut peer, "waiting for the listener");
    let port: u16 = std::str::from_utf8(&msg.bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("payload {:?} is not a port number", msg.bytes));
    assert_eq!(
        msg.handles.len(),
        1,
        "exactly one handle: {:?}",
        msg.handles
    );
    let handle = msg.take("from-python").expect("a handle named from-python");
    assert_eq!(
        handle.kind(),
        HandleKind::Socket(SocketInfo {
            family: SocketFamily::Ipv4,
            socket_type: SocketType::Stream,
            listening: true,
        }),
        "the kind Python declared"
    );
    let tcp_listener = handle
        .into_tcp_listener()
        .unwrap_or_else(|e| panic!("the handle from Python is not a TCP listener: {e}"));
    let addr = tcp_listener.local_addr().unwrap();
    assert_eq!(addr.port(), port, "the payload names the listener's port");
    assert!(addr.ip().is_loopback());

    // The listener works here: connect through it and talk both ways.
    let mut client = TcpStream::connect(addr).expect("connect to the handed-over listener");
    let mut server = accept_tcp(&tcp_listener);
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
    for s in [&client, &server] {
        s.set_read_timeout(Some(STEP)).unwrap();
    }
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    drop(tcp_listener);

    // (b) Send Python two sockets to write into: one end of a Unix stream
    // pair, and the server side of the TCP connection just made.
    let (unix_mine, unix_theirs) = UnixStream::pair().unwrap();
    unix_mine.set_read_timeout(Some(STEP)).unwrap();
    let handles = [
        Handle::from(unix_theirs).with_name("unix-end"),
        Handle::from(server).with_name("tcp-conn"),
    ];
    ch.send(b"write your lines", &handles)
        .expect("send the sockets");
    // Sending duplicated them into Python; closing ours lets the reads
    // below end when Python closes its copies.
    drop(handles);
    assert_eq!(read_all(&unix_mine), "hello from python via unix\n");
    assert_eq!(read_all(&client), "hello from python via tcp\n");
    drop((unix_mine, client));

    // A message that must be split: more handles than one frame may carry
    // and more bytes than one frame may hold.
    let null = File::open("/dev/null").unwrap();
    let handles: Vec<Handle> = (0..BIG_HANDLES)
        .map(|i| Handle::from(null.try_clone().unwrap()).with_name(format!("null-{i}")))
        .collect();
    drop(null);
    let payload: Vec<u8> = (0..BIG_BYTES).map(|i| (i % 251) as u8).collect();
    ch.send(&payload, &handles).expect("send the big message");
    drop(handles);

    let reply = recv(&ch, &mut peer, "waiting for the verdict on the big message");
    let reply_text = String::from_utf8_lossy(&reply.bytes).into_owned();
    assert!(reply.handles.is_empty());
    assert!(
        reply_text.starts_with("ok frames=") && reply_text.ends_with(" handles=300 bytes=150000"),
        "unexpected reply {reply_text:?}"
    );
    let frames: usize = reply_text["ok frames=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(frames >= 3, "150000 bytes cannot fit in {frames} frames");

    // Hang up: Python expects a clean end of stream, then exits 0.
    drop(ch);
    let status = peer.wait();
    assert!(status.success(), "the Python peer failed: {status}");
    drop(listener);
    assert!(
        !socket_path.exists(),
        "the listener removes its socket file"
    );
}
