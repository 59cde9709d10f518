//! The fd store over NOTIFY_SOCKET with real sockets: a child process (this
//! binary again) stores a pipe and a memfd, asks for acknowledgements and
//! removes; this test plays the supervisor with a `NotifySocket` and
//! answers. Hostile senders must not make the parsing helpers panic, and
//! nothing may leak on either side.
#![cfg(target_os = "linux")]

mod common;

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{child_command, child_role, no_leak, open_fds, pipe, serial};
use handover::notify::{
    ack_reply, fdstore_request, FdStoreRequest, Notification, NotifySocket, StoreReply,
};
use handover::{Error, Handle, SharedMemory};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

const ENTRY: &str = "child_entry";

/// Waits (bounded) for the next notification.
fn next(sock: &NotifySocket, deadline: Instant) -> Notification {
    loop {
        if let Some(n) = sock.try_recv().expect("recv") {
            return n;
        }
        assert!(Instant::now() < deadline, "no notification in time");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn request(n: &mut Notification) -> FdStoreRequest {
    fdstore_request(n)
        .expect("an fd store request")
        .expect("a valid request")
}

fn is_cloexec(h: &Handle) -> bool {
    rustix::io::fcntl_getfd(h.as_fd())
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)
}

#[test]
fn store_acknowledge_refuse_remove() {
    let _g = serial();
    let before = open_fds();
    {
        let sock = NotifySocket::bind_unique().unwrap().keep_handles(true);
        let mut child = child_command(ENTRY, "store")
            .env("NOTIFY_SOCKET", sock.address())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);

        // 1. Fire and forget: no cookie, the sender is unbound.
        let mut n = next(&sock, deadline);
        assert_eq!(n.pid, pid, "the pid comes from the kernel");
        assert!(!n.can_reply());
        assert_eq!(n.get("FDSTORE"), Some("1"));
        assert_eq!(n.get("FDPOLL"), Some("0"));
        let r = request(&mut n);
        assert_eq!((r.name.as_str(), r.poll, r.remove), ("pair", false, false));
        assert!(r.cookie.is_none());
        assert_eq!(r.handles.len(), 2);
        assert!(r.handles.iter().all(is_cloexec));
        assert!(
            !sock.reply(&n, "ignored").unwrap(),
            "no reply to an unbound sender"
        );
        let mut it = r.handles.into_iter();
        // The pipe's read end: the child wrote into it before storing.
        let mut pipe_read = std::fs::File::from(OwnedFd::from(it.next().unwrap()));
        let mut got = [0u8; 10];
        pipe_read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"from child");
        // The memfd: written by the child, writable by us.
        let shm = it.next().unwrap().into_shared_memory().unwrap();
        let map = shm.map().unwrap();
        let mut text = [0u8; 5];
        map.read_at(0, &mut text).unwrap();
        assert_eq!(&text, b"state");

        // 2. Acknowledged store.
        let mut n = next(&sock, deadline);
        assert_eq!(n.pid, pid);
        assert!(n.can_reply());
        let r = request(&mut n);
        assert_eq!((r.name.as_str(), r.poll), ("acked", true));
        let cookie = r.cookie.clone().expect("a cookie");
        assert!(cookie.starts_with(&format!("{pid}-")), "{cookie}");
        let stored = r.handles;
        assert_eq!(stored.len(), 1);
        assert!(sock
            .reply(&n, &ack_reply(&cookie, &StoreReply::Stored, &r.name))
            .unwrap());

        // 3. Refused, with a reason.
        let mut n = next(&sock, deadline);
        let r = request(&mut n);
        assert_eq!(r.name, "refuse-me");
        let reason = StoreReply::Refused("the store is full".into());
        sock.reply(
            &n,
            &ack_reply(r.cookie.as_deref().unwrap(), &reason, &r.name),
        )
        .unwrap();
        drop(r);

        // 4. Acknowledged removal. Write into the shared memory first: the
        // child checks it still sees what we wrote (same memfd).
        map.write_at(0, b"STATE").unwrap();
        let mut n = next(&sock, deadline);
        let r = request(&mut n);
        assert!(r.remove);
        assert_eq!(r.name, "pair");
        assert!(r.handles.is_empty());
        sock.reply(
            &n,
            &ack_reply(r.cookie.as_deref().unwrap(), &StoreReply::Removed, &r.name),
        )
        .unwrap();

        // 5. Never answered: the child times out.
        let mut n = next(&sock, deadline);
        let r = request(&mut n);
        assert_eq!(r.name, "unanswered");
        drop(r);

        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "child failed: {status}\n{out}");
        assert!(out.contains("acked: Stored"), "{out}");
        assert!(
            out.contains("refuse-me: Refused(\"the store is full\")"),
            "{out}"
        );
        assert!(out.contains("removed: Removed"), "{out}");
        assert!(out.contains("unanswered: timed out"), "{out}");
        assert!(out.contains("memfd: STATE"), "{out}");
        drop(stored);
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
}

/// The child side: a program under a supervisor.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "store");
    use handover::notify::{remove_stored_acked, store, store_acked};
    let (r, w) = pipe();
    std::fs::File::from(w).write_all(b"from child").unwrap();
    let shm = SharedMemory::create("state", 4096).unwrap();
    let map = shm.map().unwrap();
    map.write_at(0, b"state").unwrap();
    let keep = shm.try_clone().unwrap();
    assert!(store("pair", &[Handle::from(r), Handle::from(shm)], false).unwrap());

    let t = Duration::from_secs(30);
    let (a, _b) = pipe();
    let reply = store_acked("acked", &[Handle::from(a)], true, t).unwrap();
    println!("acked: {reply:?}");
    let (a, _b) = pipe();
    let reply = store_acked("refuse-me", &[Handle::from(a)], true, t).unwrap();
    println!("refuse-me: {reply:?}");
    let reply = remove_stored_acked("pair", t).unwrap();
    println!("removed: {reply:?}");
    let mut text = [0u8; 5];
    keep.map().unwrap().read_at(0, &mut text).unwrap();
    println!("memfd: {}", String::from_utf8_lossy(&text));
    let (a, _b) = pipe();
    match store_acked(
        "unanswered",
        &[Handle::from(a)],
        true,
        Duration::from_millis(300),
    ) {
        Err(Error::TimedOut { .. }) => println!("unanswered: timed out"),
        other => println!("unanswered: {other:?}"),
    }
    // Arguments the library refuses before sending anything.
    assert!(store("bad:name", &[Handle::from(pipe().0)], true).is_err());
    assert!(store("empty", &[], true).is_err());
}

fn dgram() -> OwnedFd {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap()
}

fn send_raw(from: &OwnedFd, to: &str, bytes: &[u8], fds: &[OwnedFd]) {
    let addr = SocketAddrUnix::new_abstract_name(to.strip_prefix('@').unwrap().as_bytes()).unwrap();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    rustix::net::sendmsg_addr(
        from,
        &addr,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
}

#[test]
fn hostile_senders() {
    let _g = serial();
    no_leak("hostile fd-store senders", || {
        let sock = NotifySocket::bind_unique().unwrap().keep_handles(true);
        let client = dgram();
        rustix::net::bind(&client, &SocketAddrUnix::new_unnamed()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let two = || {
            let (r, w) = pipe();
            vec![r, w]
        };
        let long_name = "n".repeat(300);
        let cases: Vec<(Vec<u8>, Vec<OwnedFd>, Option<&str>)> = vec![
            // Garbage: not an fd store request at all.
            (
                b"\xff\xfe\x00garbage\n==\n=\nFDSTORE\n".to_vec(),
                two(),
                None,
            ),
            (
                format!("FDSTORE=1\nFDNAME={long_name}\nHANDOVER_ACK=ok-1\n").into_bytes(),
                two(),
                Some("FDNAME"),
            ),
            (
                b"FDSTORE=1\nFDNAME=x\nHANDOVER_ACK=bad cookie!\n".to_vec(),
                two(),
                Some("HANDOVER_ACK"),
            ),
            (
                b"FDSTORE=1\nFDNAME=x\nHANDOVER_ACK=ok-2\n".to_vec(),
                Vec::new(),
                Some("without descriptors"),
            ),
            (
                b"FDSTOREREMOVE=1\nHANDOVER_ACK=ok-3\n".to_vec(),
                Vec::new(),
                Some("without FDNAME"),
            ),
            (
                b"FDSTORE=1\nFDNAME=x\nFDPOLL=maybe\nHANDOVER_ACK=ok-4\n".to_vec(),
                two(),
                Some("FDPOLL"),
            ),
        ];
        for (payload, fds, refused) in cases {
            send_raw(&client, sock.address(), &payload, &fds);
            drop(fds);
            let mut n = next(&sock, deadline);
            assert_eq!(n.pid, std::process::id());
            match (fdstore_request(&mut n), refused) {
                (None, None) => {}
                (Some(Err(e)), Some(what)) => {
                    assert!(e.reason.contains(what), "{e}");
                    if let Some(cookie) = &e.cookie {
                        let reply =
                            ack_reply(cookie, &StoreReply::Refused(e.reason.clone()), &e.name);
                        assert!(!reply.contains("FDNAME=nnn"), "{reply}");
                        assert!(sock.reply(&n, &reply).unwrap());
                        let mut buf = [0u8; 4096];
                        let got =
                            rustix::net::recv(&client, &mut buf, rustix::net::RecvFlags::empty())
                                .unwrap()
                                .0;
                        let text = std::str::from_utf8(&buf[..got]).unwrap();
                        assert!(
                            text.starts_with(&format!("HANDOVER_ACK={cookie}\nSTATUS=refused\n")),
                            "{text}"
                        );
                    }
                }
                (other, _) => panic!("{:?}: {other:?}", String::from_utf8_lossy(&payload)),
            }
        }
        // Oversized: cut short by the kernel, reported, its descriptors closed.
        send_raw(&client, sock.address(), &vec![b'x'; 10_000], &two());
        let mut n = next(&sock, deadline);
        assert!(n.truncated);
        assert!(n.fields.is_empty() && n.handles.is_empty());
        assert!(fdstore_request(&mut n).is_none());
        // Nothing left queued.
        assert!(sock.try_recv().unwrap().is_none());
    });
}
