//! sd_notify and the fd store on Windows (`handover::notify` over a pipe,
//! docs/protocol.md §14 "On Windows"), run under Wine by
//! scripts/windows-test.sh: a child tells READY=1 and stores a file with an
//! acknowledgement; the supervisor side learns the sender's pid from the
//! pipe; noise, silence and oversized messages from a peer are survived,
//! and no handle leaks.

#![cfg(windows)]

use std::io::{Read, Seek, Write};
use std::time::{Duration, Instant};

use handover::notify::{self, NotifySocket, StoreReply};
use handover::{Channel, Command, Handle};

mod windows_common;
use windows_common::{handle_count, serial};

const WAIT: Duration = Duration::from_secs(30);

/// Receives until `n` notifications arrived (or WAIT passes).
fn receive(socket: &NotifySocket, n: usize) -> Vec<notify::Notification> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} arrived",
            out.len()
        );
        match socket.try_recv().unwrap() {
            Some(note) => out.push(note),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    out
}

fn pipe_name(socket: &NotifySocket) -> String {
    socket
        .address()
        .strip_prefix(r"\\.\pipe\")
        .expect("NOTIFY_SOCKET names a pipe")
        .to_owned()
}

#[test]
fn a_child_says_ready_and_stores_a_file_with_an_acknowledgement() {
    let _serial = serial();
    let socket = NotifySocket::bind_unique().unwrap().keep_handles(true);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "notifying_child", "--nocapture"])
        .env("NOTIFY_SOCKET", socket.address());
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    // The store request comes first and waits for its answer.
    let mut store = receive(&socket, 1).remove(0);
    assert_eq!(store.pid, child.id(), "the pid comes from the pipe");
    let request = notify::fdstore_request(&mut store).unwrap().unwrap();
    assert_eq!(request.name, "state");
    assert!(!request.poll);
    assert_eq!(request.handles.len(), 1);
    let mut file = request
        .handles
        .into_iter()
        .next()
        .unwrap()
        .into_file()
        .unwrap();
    file.rewind().unwrap();
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    assert_eq!(text, "kept by the supervisor");
    let cookie = request.cookie.expect("an acknowledged request");
    assert!(socket
        .reply(
            &store,
            &notify::ack_reply(&cookie, &StoreReply::Stored, "state")
        )
        .unwrap());
    drop(store);
    let ready = receive(&socket, 1).remove(0);
    assert_eq!(ready.pid, child.id());
    assert_eq!(ready.get("READY"), Some("1"));
    assert_eq!(ready.get("STATUS"), Some("up"));
    drop(ready);
    assert!(child.wait().unwrap().success(), "the child saw Stored");
}

/// The child of the test above.
#[test]
#[ignore = "started by a_child_says_ready_and_stores_a_file_with_an_acknowledgement"]
fn notifying_child() {
    assert!(
        std::env::var_os("NOTIFY_SOCKET").is_some(),
        "run by the test above only"
    );
    let path = std::env::temp_dir().join(format!("handover-notify-{}.txt", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(b"kept by the supervisor")
        .unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let reply = notify::store_acked("state", &[Handle::from(file)], false, WAIT).unwrap();
    assert_eq!(reply, StoreReply::Stored);
    assert!(notify::notify("READY=1\nSTATUS=up").unwrap());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn noise_silence_and_oversized_messages_are_survived_without_leaks() {
    let _serial = serial();
    let socket = NotifySocket::bind_unique().unwrap();
    let name = pipe_name(&socket);
    let before = handle_count();
    // Each peer connects, sends, and waits until the receiver closes the
    // connection (the receiver is polled from this thread, as a
    // supervisor's loop polls it).
    let peer = |name: String, bytes: Vec<u8>, handle: Option<std::fs::File>| {
        std::thread::spawn(move || {
            let ch = Channel::connect_name_timeout(&name, WAIT).unwrap();
            let handles: Vec<Handle> = handle.into_iter().map(Handle::from).collect();
            if !bytes.is_empty() {
                ch.send_timeout(&bytes, &handles, WAIT).unwrap();
            }
            // None: closed by the receiver, having handled the message (or
            // given up on a silent peer).
            ch.recv_timeout(WAIT).map(|m| m.is_none()).unwrap_or(false)
        })
    };
    // A peer that connects and says nothing does not hold up the others.
    let silent = peer(name.clone(), Vec::new(), None);
    // Noise: not UTF-8, no `=`, with a handle the socket was not asked to
    // keep.
    let (r, w) = windows_common::anonymous_pipe();
    let noisy = peer(
        name.clone(),
        b"\xff\xfe garbage\nno equals sign".to_vec(),
        Some(r),
    );
    // Over the 4096-byte limit.
    let big = peer(name.clone(), vec![b'A'; 5000], None);
    let got = receive(&socket, 2);
    let me = std::process::id();
    assert!(got.iter().all(|n| n.pid == me));
    let noise = got.iter().find(|n| !n.truncated).expect("the noisy one");
    assert!(
        noise.fields.is_empty() && noise.handles.is_empty(),
        "{noise:?}"
    );
    assert!(got.iter().any(|n| n.truncated && n.fields.is_empty()));
    drop(got);
    assert!(noisy.join().unwrap(), "closed by the receiver");
    assert!(big.join().unwrap(), "closed by the receiver");
    // Meanwhile a real notification gets through.
    let real = peer(name.clone(), b"READY=1".to_vec(), None);
    assert_eq!(receive(&socket, 1)[0].get("READY"), Some("1"));
    assert!(real.join().unwrap());
    // The silent peer is let go after its 2 s.
    let deadline = Instant::now() + WAIT;
    while !silent.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the silent peer was never let go"
        );
        assert!(socket.try_recv().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(silent.join().unwrap());
    drop(w);
    assert_eq!(
        handle_count(),
        before,
        "every handle that came in was closed"
    );
}
