//! The holder against clients that misbehave, and against many at once:
//! malformed and truncated requests get an error reply and leave no
//! descriptor behind in the daemon; silent clients are dropped after the
//! timeout without holding up anyone; each limit has its own clear error;
//! a thousand concurrent clients store and retrieve without a loss.

#![cfg(target_os = "linux")]

mod holder_common;

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handover::holder::protocol::{decode_reply, ErrorCode, Reply};
use handover::holder::{Client, StoreOptions};
use handover::wire::{FrameHeader, Record, FLAG_FIRST, FLAG_LAST};
use handover::{Channel, Handle, HandleKind};
use holder_common::*;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// The holder's reply on `ch`: its code, or None if it succeeded.
fn reply_code(ch: &Channel) -> Option<ErrorCode> {
    let msg = ch
        .recv_timeout(TIMEOUT)
        .expect("a reply")
        .expect("a reply, not the end of the connection");
    assert!(msg.handles.is_empty());
    match decode_reply(&msg.bytes).expect("a valid reply") {
        Reply::Failed { code, message } => {
            assert!(!message.is_empty(), "{code}: an error says why");
            Some(code)
        }
        _ => None,
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().unwrap()
}

/// Opens, uses and closes one client, so that everything the daemon
/// creates lazily exists before descriptors are counted; returns the
/// daemon's count once that client's connection is closed there too.
fn warm_up(holder: &Holder) -> usize {
    let mut c = holder.client();
    c.list().unwrap();
    let connected = holder.open_fds();
    drop(c);
    holder.assert_fds(connected - 1, "the warm-up client");
    connected - 1
}

#[test]
fn malformed_requests_get_an_error_and_leak_nothing() {
    let holder = Holder::start(&[]);
    let before = warm_up(&holder);
    let ch = Channel::connect(&holder.path).unwrap();
    let (r, _w) = pipe();
    let one = [Handle::from(r)];
    let (r2, _w2) = pipe();
    let two = [one[0].try_clone().unwrap(), Handle::from(r2)];
    let long_name = format!("{{\"op\":\"remove\",\"name\":\"{}\"}}", "n".repeat(300));
    let huge = vec![b' '; 70_000];
    let cases: Vec<(&[u8], &[Handle], ErrorCode)> = vec![
        (b"", &[], ErrorCode::Malformed),
        (b"not json", &[], ErrorCode::Malformed),
        (b"[\"store\"]", &one, ErrorCode::Malformed),
        (b"{\"op\":42}", &[], ErrorCode::Malformed),
        (
            b"{\"op\":\"store\",\"name\":\"x\"}",
            &[],
            ErrorCode::Malformed,
        ),
        (
            b"{\"op\":\"store\",\"name\":\"x\"}",
            &two,
            ErrorCode::Malformed,
        ),
        (
            b"{\"op\":\"store\",\"name\":\"x\",\"ttl_ms\":0}",
            &one,
            ErrorCode::Malformed,
        ),
        (
            b"{\"op\":\"store\",\"name\":\"x\",\"ttl_ms\":\"soon\"}",
            &one,
            ErrorCode::Malformed,
        ),
        (
            b"{\"op\":\"retrieve\",\"names\":[\"x\"]}",
            &one,
            ErrorCode::Malformed,
        ),
        (
            b"{\"op\":\"retrieve\",\"names\":[]}",
            &[],
            ErrorCode::Malformed,
        ),
        (b"{\"op\":\"list\"}", &two, ErrorCode::Malformed),
        (b"{\"op\":\"frobnicate\"}", &one, ErrorCode::UnknownOp),
        (
            b"{\"op\":\"store\",\"name\":\"a:b\"}",
            &one,
            ErrorCode::BadName,
        ),
        (
            b"{\"op\":\"store\",\"name\":\"a b\"}",
            &one,
            ErrorCode::BadName,
        ),
        (long_name.as_bytes(), &[], ErrorCode::BadName),
        (&huge, &[], ErrorCode::Malformed),
        (
            b"{\"op\":\"wait\",\"name\":\"x\",\"timeout_ms\":-5}",
            &[],
            ErrorCode::Malformed,
        ),
    ];
    for (bytes, handles, code) in cases {
        ch.send(bytes, handles).unwrap();
        assert_eq!(
            reply_code(&ch),
            Some(code.clone()),
            "{:?} with {} handles",
            String::from_utf8_lossy(&bytes[..bytes.len().min(60)]),
            handles.len()
        );
    }
    // Nothing was stored by any of them, and the connection still works.
    ch.send(b"{\"op\":\"list\"}", &[]).unwrap();
    let msg = ch.recv_timeout(TIMEOUT).unwrap().unwrap();
    assert_eq!(decode_reply(&msg.bytes), Ok(Reply::Entries(vec![])));
    drop(ch);
    holder.assert_fds(before, "malformed requests");
    // Others are served as before.
    let mut c = holder.client();
    c.store("ok", &one[0], StoreOptions::new()).unwrap();
    drop(c.retrieve("ok").unwrap());
}

/// Sends raw bytes with descriptors attached, bypassing handover.
fn raw_send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("raw sendmsg");
}

/// A frame by hand: header, `records` pipe records, payload.
fn frame(
    flags: u16,
    totals: (u32, u32),
    records: u32,
    payload: &[u8],
    frame_bytes: u32,
) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        flags,
        seq: 0,
        total_handles: totals.0,
        total_bytes: totals.1,
        frame_handles: records,
        frame_bytes,
    }
    .encode(&mut out);
    for _ in 0..records {
        Record {
            kind: HandleKind::Pipe,
            name: None,
            value: 0,
            extra: &[],
        }
        .encode(&mut out);
    }
    out.extend_from_slice(payload);
    out
}

/// A raw SOCK_SEQPACKET connection to the holder.
fn raw_connect(holder: &Holder) -> OwnedFd {
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        None,
    )
    .unwrap();
    let addr = rustix::net::SocketAddrUnix::new(&holder.path).unwrap();
    rustix::net::connect(&fd, &addr).unwrap();
    fd
}

/// Broken frames at the wire level, with descriptors attached: each gets a
/// `malformed` reply, the descriptors are closed by the daemon, and the
/// connection recovers.
#[test]
fn broken_frames_get_an_error_and_leak_nothing() {
    let holder = Holder::start(&["--timeout", "2s"]);
    let before = warm_up(&holder);
    let sock = raw_connect(&holder);
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| pipe()).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    let body = b"{\"op\":\"list\"}";
    let n = body.len() as u32;
    let both = FLAG_FIRST | FLAG_LAST;
    // Noise, with three descriptors attached.
    raw_send(sock.as_fd(), &[0x55; 100], &fds);
    // A header that announces two handles, with one attached.
    raw_send(sock.as_fd(), &frame(both, (2, n), 2, body, n), &fds[..1]);
    // Descriptors on a frame that announces none.
    raw_send(sock.as_fd(), &frame(both, (0, n), 0, body, n), &fds);
    // A truncated frame: it announces more payload than it has.
    raw_send(sock.as_fd(), &frame(both, (0, 40), 0, body, 40), &[]);
    // A frame cut inside its header.
    raw_send(
        sock.as_fd(),
        &frame(both, (0, n), 0, body, n)[..20],
        &fds[..2],
    );
    // A header that announces more handles than the holder accepts.
    raw_send(sock.as_fd(), &frame(both, (3, n), 3, body, n), &fds);
    let ch = Channel::try_from(sock).unwrap();
    for what in [
        "noise",
        "count mismatch",
        "unannounced",
        "truncated",
        "cut header",
        "too many",
    ] {
        assert_eq!(reply_code(&ch), Some(ErrorCode::Malformed), "{what}");
    }
    // A valid request still works on the same connection.
    ch.send(body, &[]).unwrap();
    assert_eq!(reply_code(&ch), None);
    drop(ch);
    drop(pipes);
    holder.assert_fds(before, "broken frames");

    // A request truncated in another way: the first frame of a
    // two-frame message, then silence. The holder cannot answer a
    // message it never got; it drops the client at its timeout, with
    // `closing`, and closes the descriptors of the partial message.
    let sock = raw_connect(&holder);
    let (r, _w) = pipe();
    raw_send(
        sock.as_fd(),
        &frame(FLAG_FIRST, (1, n), 1, &body[..4], 4),
        &[r.as_fd()],
    );
    drop(r);
    let started = Instant::now();
    let ch = Channel::try_from(sock).unwrap();
    assert_eq!(reply_code(&ch), Some(ErrorCode::Closing));
    assert!(
        matches!(ch.recv_timeout(TIMEOUT), Ok(None)),
        "then the connection ends"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    drop(ch);
    holder.assert_fds(before, "a half message");

    // A client that leaves in the middle of a message, descriptors sent.
    for _ in 0..10 {
        let sock = raw_connect(&holder);
        let (r, _w) = pipe();
        raw_send(
            sock.as_fd(),
            &frame(FLAG_FIRST, (2, n), 1, &body[..4], 4),
            &[r.as_fd()],
        );
    }
    holder.assert_fds(before, "clients gone mid-message");
    let mut c = holder.client();
    c.list().unwrap();
}

/// Clients that connect and say nothing are dropped at the timeout and
/// hold up nobody meanwhile.
#[test]
fn silent_clients_are_dropped_and_others_are_served_meanwhile() {
    let holder = Holder::start(&["--timeout", "5s"]);
    let before = warm_up(&holder);
    let started = Instant::now();
    let silent: Vec<Channel> = (0..50)
        .map(|_| Channel::connect(&holder.path).unwrap())
        .collect();
    eventually("the silent clients to be accepted", || {
        (holder.open_fds() == before + 50).then_some(())
    });
    // Served meanwhile: a hundred round trips, new clients too.
    for i in 0..100 {
        let mut c = holder.client();
        let (r, _w) = pipe();
        c.store(&format!("n{i}"), &Handle::from(r), StoreOptions::new())
            .unwrap();
        drop(c.retrieve(&format!("n{i}")).unwrap());
    }
    let served_by = started.elapsed();
    // None of the silent ones was dropped yet, unless the machine was so
    // slow that the timeout passed (then this check proves nothing).
    if served_by < Duration::from_secs(4) {
        for ch in &silent {
            assert!(matches!(
                ch.recv_timeout(Duration::ZERO),
                Err(handover::Error::TimedOut { .. })
            ));
        }
    }
    for ch in &silent {
        assert_eq!(reply_code(ch), Some(ErrorCode::Closing));
        assert!(matches!(ch.recv_timeout(TIMEOUT), Ok(None)));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "dropped before the timeout"
    );
    drop(silent);
    // What is left open is the 100 entries.
    holder.assert_fds(before + 100, "silent clients");
}

#[test]
fn each_limit_has_a_clear_error() {
    // Per uid.
    let holder = Holder::start(&["--max-per-uid", "2"]);
    let mut c = holder.client();
    let (r, _w) = pipe();
    let h = Handle::from(r);
    c.store("a", &h, StoreOptions::new()).unwrap();
    c.store("b", &h, StoreOptions::new()).unwrap();
    let e = c.store("c", &h, StoreOptions::new()).unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::UidLimit), "{e}");
    assert!(e.to_string().contains("--max-per-uid 2"), "{e}");
    // Replacing one's own entry is not one more.
    c.store("b", &h, StoreOptions::new().replace(true)).unwrap();
    // After a removal there is room again.
    c.remove("a").unwrap();
    c.store("c", &h, StoreOptions::new()).unwrap();
    drop(holder);

    // In all.
    let holder = Holder::start(&["--max-entries", "2"]);
    ok(&mut holder.cmd(["put", "x1", "--listen", "127.0.0.1:0", "--ttl", "1h"]));
    ok(&mut holder.cmd(["put", "x2", "--listen", "127.0.0.1:0"]));
    let e = fails(&mut holder.cmd(["put", "x3", "--listen", "127.0.0.1:0"]));
    assert!(
        e.contains("entries-limit") && e.contains("--max-entries 2"),
        "{e}"
    );
    drop(holder);

    // Clients at once.
    let holder = Holder::start(&["--max-clients", "2"]);
    let c1 = holder.client();
    let mut c2 = holder.client();
    c2.list().unwrap();
    let e = Client::connect(&holder.path).unwrap().list().unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::ClientsLimit), "{e}");
    assert!(e.to_string().contains("--max-clients"), "{e}");
    drop(c1);
    eventually("a place to free up", || {
        Client::connect(&holder.path).ok()?.list().ok()
    });

    // Names: length and characters, from the holder itself (a raw
    // channel) and from the CLI.
    drop(c2);
    drop(holder);
    let holder = Holder::start(&[]);
    let ch = Channel::connect(&holder.path).unwrap();
    let (r, _w) = pipe();
    for name in [
        "x".repeat(256),
        "tab\there".into(),
        "star*".into(),
        "é".into(),
    ] {
        let req = serde_json::json!({"op": "store", "name": name}).to_string();
        ch.send(req.as_bytes(), &[Handle::from(r.try_clone().unwrap())])
            .unwrap();
        assert_eq!(reply_code(&ch), Some(ErrorCode::BadName), "{name:?}");
    }
    let e = fails(&mut holder.cmd(["rm", &"y".repeat(300)]));
    assert!(e.contains("at most 255"), "{e}");
}

/// A thousand clients connected at once each store an entry and retrieve
/// another's, and read what its owner wrote into it: nothing is lost.
#[test]
fn a_thousand_concurrent_clients_store_and_retrieve() {
    const N: usize = 1000;
    raise_fd_limit();
    let holder = Holder::start(&["--max-clients", "1100", "--max-entries", "2000"]);
    let before = warm_up(&holder);
    let connected = Arc::new(AtomicUsize::new(0));
    let stored = Arc::new(AtomicUsize::new(0));
    let rendezvous = |count: &AtomicUsize| -> Result<(), String> {
        count.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < N {
            if Instant::now() > deadline {
                return Err("not everyone arrived".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let path = holder.path.clone();
            let (connected, stored) = (connected.clone(), stored.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || -> Result<(), String> {
                    let mut c = Client::connect(&path).map_err(|e| format!("{i} connect: {e}"))?;
                    c.set_timeout(Duration::from_secs(60));
                    // Everyone is connected before anyone starts.
                    rendezvous(&connected)?;
                    let (r, w) = pipe();
                    std::fs::File::from(w)
                        .write_all(format!("written by {i}").as_bytes())
                        .unwrap();
                    c.store(&format!("c{i}"), &Handle::from(r), StoreOptions::new())
                        .map_err(|e| format!("{i} store: {e}"))?;
                    rendezvous(&stored)?;
                    let other = (i + 1) % N;
                    let h = c
                        .retrieve(&format!("c{other}"))
                        .map_err(|e| format!("{i} retrieve: {e}"))?;
                    let mut got = String::new();
                    std::fs::File::from(OwnedFd::from(h))
                        .read_to_string(&mut got)
                        .unwrap();
                    if got != format!("written by {other}") {
                        return Err(format!("{i} read {got:?} from c{other}"));
                    }
                    Ok(())
                })
                .unwrap()
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let list = holder.client().list().unwrap();
    assert_eq!(list.len(), N);
    // The daemon holds the N entries and nothing of the N clients.
    holder.assert_fds(before + N, "a thousand clients");
}
