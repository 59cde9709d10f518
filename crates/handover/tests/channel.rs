//! The channel with well-behaved peers: volume, large messages, typed
//! conversions, listeners, credentials, inheritance and timeouts.

#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use handover::unix::{HandleExt, PeerCredentialsExt};
use handover::{
    Channel, ChannelListener, ChannelOptions, Error, Handle, HandleKind, SocketFamily, SocketInfo,
    SocketType,
};

const T: Duration = Duration::from_secs(10);

#[test]
fn hundred_thousand_messages_leak_nothing() {
    let _g = serial();
    no_leak("100,000 messages with handles", || {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = pipe();
        let handles = [Handle::from(r), Handle::from(w).with_name("w")];
        let receiver = std::thread::spawn(move || {
            let mut count = 0usize;
            while let Some(m) = b.recv_timeout(T).unwrap() {
                assert_eq!(m.handles.len(), 2);
                assert_eq!(m.handles[1].name(), Some("w"));
                assert_eq!(m.handles[0].kind(), HandleKind::Pipe);
                assert_eq!(m.bytes, (count as u64).to_le_bytes());
                count += 1;
            }
            count
        });
        for i in 0..100_000u64 {
            a.send(&i.to_le_bytes(), &handles).unwrap();
        }
        drop(a);
        assert_eq!(receiver.join().unwrap(), 100_000);
    });
}

#[test]
fn a_thousand_handles_in_one_message() {
    let _g = serial();
    raise_fd_limit();
    no_leak("1,000 handles in one message", || {
        let (a, b) = Channel::pair().unwrap();
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..500).map(|_| pipe()).collect();
        let mut handles = Vec::new();
        for (i, (r, w)) in pipes.into_iter().enumerate() {
            handles.push(Handle::from(r).with_name(format!("r{i}")));
            handles.push(Handle::from(w).with_name(format!("w{i}")));
        }
        let payload = vec![7u8; 300_000];
        let sender = std::thread::spawn(move || {
            a.send(&payload, &handles).unwrap();
            handles
        });
        let mut m = b.recv_timeout(T).unwrap().unwrap();
        let handles = sender.join().unwrap();
        assert_eq!(m.handles.len(), 1000);
        assert_eq!(m.bytes.len(), 300_000);
        assert!(m.bytes.iter().all(|&x| x == 7));
        for (i, h) in m.handles.iter().enumerate() {
            let want = if i % 2 == 0 { "r" } else { "w" };
            assert_eq!(h.name(), Some(format!("{want}{}", i / 2).as_str()));
        }
        // Prove the 999th handle really is the write end of the 499th pipe.
        let w = m.take("w499").unwrap();
        let mut w = std::fs::File::from(OwnedFd::from(w));
        w.write_all(b"x").unwrap();
        let mut r = std::fs::File::from(OwnedFd::from(handles[998].try_clone().unwrap()));
        let mut buf = [0u8; 1];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
        drop((m, handles));
    });
}

#[test]
fn bytes_only_and_empty_messages() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    a.send(b"", &[]).unwrap();
    let m = b.recv_timeout(T).unwrap().unwrap();
    assert!(m.bytes.is_empty() && m.handles.is_empty());
    a.send(&vec![1u8; 200_000], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.recv_timeout(T).unwrap().unwrap().bytes.len(), 200_000);
}

#[test]
fn typed_conversions_check_the_real_type() {
    let _g = serial();
    no_leak("typed conversions", || {
        let (a, b) = Channel::pair().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let udp = UdpSocket::bind("[::1]:0").unwrap();
        let dir = tempdir();
        let ul = UnixListener::bind(dir.join("s")).unwrap();
        let (us, _us2) = UnixStream::pair().unwrap();
        let (ud, _ud2) = UnixDatagram::pair().unwrap();
        let file = std::fs::File::create(dir.join("f")).unwrap();
        let handles = [
            Handle::from(tcp),
            Handle::from(client),
            Handle::from(udp),
            Handle::from(ul),
            Handle::from(us),
            Handle::from(ud),
            Handle::from(file),
        ];
        a.send(b"", &handles).unwrap();
        let m = b.recv_timeout(T).unwrap().unwrap();
        let kinds: Vec<HandleKind> = m.handles.iter().map(|h| h.kind()).collect();
        assert_eq!(
            kinds[0],
            HandleKind::Socket(SocketInfo {
                family: SocketFamily::Ipv4,
                socket_type: SocketType::Stream,
                listening: true
            })
        );
        assert_eq!(
            kinds[2],
            HandleKind::Socket(SocketInfo {
                family: SocketFamily::Ipv6,
                socket_type: SocketType::Datagram,
                listening: false
            })
        );
        assert_eq!(kinds[6], HandleKind::File);

        let mut hs = m.handles.into_iter();
        // Every wrong conversion hands the handle back intact.
        let h = hs.next().unwrap();
        let err = h.into_tcp_stream().unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a TCP stream socket, found a listening IPv4 stream socket"),
            "{err}"
        );
        let l = err.into_handle().into_tcp_listener().unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);

        let h = hs.next().unwrap();
        let h = h.into_tcp_listener().unwrap_err().into_handle();
        h.into_tcp_stream().unwrap();
        let h = hs.next().unwrap();
        let h = h.into_tcp_listener().unwrap_err().into_handle();
        h.into_udp_socket().unwrap();
        let h = hs.next().unwrap();
        let h = h.into_unix_stream().unwrap_err().into_handle();
        h.into_unix_listener().unwrap();
        let h = hs.next().unwrap();
        let h = h.into_unix_datagram().unwrap_err().into_handle();
        h.into_unix_stream().unwrap();
        let h = hs.next().unwrap();
        let h = h.into_file().unwrap_err().into_handle();
        h.into_unix_datagram().unwrap();
        let h = hs.next().unwrap();
        let h = h.into_udp_socket().unwrap_err().into_handle();
        h.into_file().unwrap();
        // A lying peer: a pipe declared as a TCP listener is still refused.
        let (r, _w) = pipe();
        let e = Handle::from(r).into_tcp_listener().unwrap_err();
        assert_eq!(e.found(), Ok(HandleKind::Pipe));
        let e: Error = e.into();
        assert!(matches!(e, Error::WrongType { .. }));
        drop(handles);
    });
}

#[test]
fn memfd_is_shared_memory_and_maps_on_the_other_side() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    let memfd = rustix::fs::memfd_create("handover-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut f = std::fs::File::from(memfd);
    f.write_all(b"shared state").unwrap();
    let h = Handle::from(f);
    assert_eq!(h.kind(), HandleKind::SharedMemory);
    a.send(b"", &[h]).unwrap();
    let mut m = b.recv_timeout(T).unwrap().unwrap();
    let h = m.handles.remove(0);
    assert_eq!(h.kind(), HandleKind::SharedMemory);
    let f = h.into_file().unwrap();
    let mut s = String::new();
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "shared state");
}

#[test]
fn a_received_listener_serves_connections() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    a.send(b"take it", &[Handle::from(tcp).with_name("http")])
        .unwrap();
    let mut m = b.recv_timeout(T).unwrap().unwrap();
    let listener = m.take("http").unwrap().into_tcp_listener().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"served").unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut buf = String::new();
    c.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "served");
    server.join().unwrap();
}

#[test]
fn listeners_on_paths_and_names() {
    let _g = serial();
    let dir = tempdir();
    let path = dir.join("chan.sock");
    // A stale socket file left by a dead process is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = ChannelListener::bind(&path).unwrap();
    let t = std::thread::spawn({
        let path = path.clone();
        move || {
            let c = Channel::connect(&path).unwrap();
            c.send(b"by path", &[]).unwrap();
            c.recv_timeout(T).unwrap();
        }
    });
    let s = l.accept_timeout(T).unwrap();
    assert_eq!(s.recv_timeout(T).unwrap().unwrap().bytes, b"by path");
    drop(s);
    t.join().unwrap();
    // A live listener is not replaced.
    let err = ChannelListener::bind(&path).unwrap_err();
    assert!(err.to_string().contains("bind failed"), "{err}");
    drop(l);
    assert!(!path.exists(), "the socket file is removed on drop");

    let name = format!("handover-test-{}", std::process::id());
    let l = ChannelListener::bind_name(&name).unwrap();
    let c = Channel::connect_name(&name).unwrap();
    let s = l.accept_timeout(T).unwrap();
    c.send(b"by name", &[]).unwrap();
    assert_eq!(s.recv_timeout(T).unwrap().unwrap().bytes, b"by name");
    assert!(matches!(
        l.accept_timeout(Duration::from_millis(50)),
        Err(Error::TimedOut { op: "accept", .. })
    ));
    assert!(matches!(
        Channel::connect_name(&format!("{name}-nobody")),
        Err(Error::Io { op: "connect", .. })
    ));
    assert!(matches!(
        ChannelListener::bind_name(""),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn peer_credentials_come_from_the_kernel() {
    let _g = serial();
    let (a, _b) = Channel::pair().unwrap();
    let mut cred = a.peer_credentials().unwrap();
    assert_eq!(cred.pid(), std::process::id());
    assert_eq!(cred.uid(), rustix::process::getuid().as_raw());
    assert_eq!(cred.gid(), rustix::process::getgid().as_raw());
    // SO_PEERPIDFD exists since Linux 6.5; this machine runs newer.
    let pidfd = cred.take_pidfd().expect("a pidfd from SO_PEERPIDFD");
    // The kernel says which process a pidfd names in its fdinfo.
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).unwrap();
    let pid_line = info.lines().find(|l| l.starts_with("Pid:")).unwrap();
    assert_eq!(
        pid_line.split_whitespace().nth(1),
        Some(std::process::id().to_string().as_str())
    );
}

#[test]
fn channels_travel_over_channels() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    let (c, d) = Channel::pair().unwrap();
    a.send(b"", &[Handle::from(d)]).unwrap();
    let mut m = b.recv_timeout(T).unwrap().unwrap();
    let d = m.handles.remove(0).into_channel().unwrap();
    c.send(b"through a sent channel", &[]).unwrap();
    assert_eq!(
        d.recv_timeout(T).unwrap().unwrap().bytes,
        b"through a sent channel"
    );
    // A stream socket is not a channel.
    let (s, _s2) = UnixStream::pair().unwrap();
    assert!(Channel::try_from(OwnedFd::from(s)).is_err());
}

#[test]
fn timeouts_end_every_blocking_call() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    let start = Instant::now();
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(100)),
        Err(Error::TimedOut { op: "receive", .. })
    ));
    assert!(start.elapsed() >= Duration::from_millis(100));
    // Fill the socket buffer until a send has to wait, then time out.
    let big = vec![0u8; 60_000];
    let mut timed_out = false;
    for _ in 0..10_000 {
        match a.send_timeout(&big, &[], Duration::from_millis(100)) {
            Ok(()) => continue,
            Err(Error::TimedOut { op: "send", .. }) => {
                timed_out = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(timed_out, "the send buffer never filled");
    // The reader drains, and the channel still works afterwards.
    while b.recv_timeout(Duration::from_millis(100)).is_ok() {}
    a.send(b"after", &[]).unwrap();
    assert_eq!(b.recv_timeout(T).unwrap().unwrap().bytes, b"after");
}

#[test]
fn disconnects_are_reported() {
    let _g = serial();
    let (a, b) = Channel::pair().unwrap();
    drop(b);
    assert!(matches!(a.send(b"x", &[]), Err(Error::Disconnected)));
    let (a, b) = Channel::pair().unwrap();
    drop(a);
    assert!(b.recv().unwrap().is_none());
}

#[test]
fn bytes_only_channels_refuse_handles() {
    let _g = serial();
    no_leak("bytes-only refusal", || {
        let (a, b) = Channel::pair().unwrap();
        let mut b = b;
        b.set_options(ChannelOptions::new().bytes_only()).unwrap();
        let (r, _w) = pipe();
        let err = a.send(b"with a handle", &[Handle::from(r)]).unwrap_err();
        // SO_PASSRIGHTS (Linux 6.16+) refuses at the sender; older kernels
        // deliver, and the receiver closes and reports instead.
        match err {
            Error::PeerRefusesHandles => {}
            other => panic!("unexpected {other}"),
        }
        a.send(b"bytes are fine", &[]).unwrap();
        assert_eq!(b.recv_timeout(T).unwrap().unwrap().bytes, b"bytes are fine");
    });
}

#[test]
fn limits_drop_the_message_and_close_its_handles() {
    let _g = serial();
    no_leak("limits", || {
        let (a, b) = Channel::pair().unwrap();
        let mut b = b;
        b.set_options(ChannelOptions::new().max_handles(3).max_bytes(10))
            .unwrap();
        let (r, w) = pipe();
        let hs: Vec<Handle> = vec![Handle::from(r), Handle::from(w)];
        let four: Vec<Handle> = hs
            .iter()
            .chain(hs.iter())
            .map(|h| h.try_clone().unwrap())
            .collect();
        a.send(b"", &four).unwrap();
        assert!(matches!(
            b.recv_timeout(T),
            Err(Error::LimitExceeded {
                what: "handles",
                limit: 3,
                got: 4
            })
        ));
        a.send(&[0u8; 11], &[]).unwrap();
        assert!(matches!(
            b.recv_timeout(T),
            Err(Error::LimitExceeded {
                what: "bytes",
                limit: 10,
                got: 11
            })
        ));
        a.send(b"ok", &hs).unwrap();
        assert_eq!(b.recv_timeout(T).unwrap().unwrap().handles.len(), 2);
        // A bad name never leaves this process.
        let bad = hs[0].try_clone().unwrap().with_name("a\0b");
        assert!(matches!(
            a.send(b"", &[bad]),
            Err(Error::InvalidName { .. })
        ));
        let long = hs[0].try_clone().unwrap().with_name("n".repeat(256));
        assert!(matches!(
            a.send(b"", &[long]),
            Err(Error::InvalidName { .. })
        ));
    });
}

/// The entry point of child processes started by these tests.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    match role.as_str() {
        "inherited-channel" => {
            // The parent placed a channel end at fd 3; take it out of the
            // way of anything else this process opens.
            let fd = rustix::io::fcntl_dupfd_cloexec(
                // SAFETY: the parent guaranteed fd 3 is open in this process.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(3) },
                10,
            )
            .unwrap();
            let ch = Channel::try_from(fd).unwrap();
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            ch.send(
                &port.to_le_bytes(),
                &[Handle::from(tcp).with_name("from-child")],
            )
            .unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_child_inherits_a_channel_end() {
    let _g = serial();
    let (parent, child) = Channel::pair().unwrap();
    let child_fd = OwnedFd::from(child);
    let mut cmd = child_command("child_entry", "inherited-channel");
    let raw = std::os::fd::AsRawFd::as_raw_fd(&child_fd.as_fd());
    // SAFETY: between fork and exec this only calls dup2, which is
    // async-signal-safe, on descriptors that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                let flags = libc_fcntl_clear_cloexec(3);
                return flags;
            }
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status_child = cmd.stdout(std::process::Stdio::null()).spawn().unwrap();
    drop(child_fd);
    let mut m = parent.recv_timeout(T).unwrap().unwrap();
    let port = u16::from_le_bytes([m.bytes[0], m.bytes[1]]);
    let l = m.take("from-child").unwrap().into_tcp_listener().unwrap();
    assert_eq!(l.local_addr().unwrap().port(), port);
    let mut child = status_child;
    assert!(child.wait().unwrap().success());
}

fn libc_fcntl_clear_cloexec(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "handover-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn connect_gives_up_when_the_backlog_stays_full() {
    let _g = serial();
    raise_fd_limit();
    no_leak("connect timeout", || {
        let name = format!("handover-backlog-{}", std::process::id());
        let l = ChannelListener::bind_name(&name).unwrap();
        // Nobody accepts: connections queue until the backlog is full.
        let mut queued = Vec::new();
        let err = loop {
            match Channel::connect_name_timeout(&name, Duration::from_millis(20)) {
                Ok(c) => queued.push(c),
                Err(e) => break e,
            }
            assert!(queued.len() < 10_000, "the backlog never filled");
        };
        assert!(
            matches!(err, Error::TimedOut { op: "connect", .. }),
            "{err}"
        );
        // Accepting one makes room again.
        let _s = l.accept_timeout(T).unwrap();
        queued.push(Channel::connect_name_timeout(&name, T).unwrap());
        drop((queued, l));
    });
}
