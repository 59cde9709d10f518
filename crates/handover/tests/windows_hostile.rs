//! Hostile and broken peers on Windows, like tests/hostile.rs and the
//! robustness tests of tests/channel.rs on Linux: raw clients writing
//! garbage straight into the named pipe, forged handle values, limits,
//! a peer killed in the middle of a message, channels handed on to
//! another process, and peers that connect and say nothing. Every failure
//! is an error value (never a panic or a hang), closes the handles that
//! came with it, and leaves the channel or the listener serving.
//!
//! Run under Wine by scripts/windows-test.sh.

#![cfg(windows)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::windows::io::AsRawHandle;
use std::process::Stdio;
use std::time::{Duration, Instant};

use handover::wire::{self, FrameHeader, Record, FLAG_FIRST, FLAG_LAST};
use handover::{Channel, ChannelListener, ChannelOptions, Error, Handle, HandleKind};

const WAIT: Duration = Duration::from_secs(20);

mod windows_common;
use windows_common::*;

/// A raw client of a listener's pipe: every write is one pipe message.
fn raw_client(name: &str) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(format!(r"\\.\pipe\{name}"))
        .unwrap()
}

fn raw_send(raw: &mut File, bytes: &[u8]) {
    assert_eq!(raw.write(bytes).unwrap(), bytes.len());
}

fn frame(header: FrameHeader, records: &[Record<'_>], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    header.encode(&mut out);
    for r in records {
        r.encode(&mut out);
    }
    out.extend_from_slice(payload);
    out
}

fn header(flags: u16, seq: u32, totals: (u32, u32), handles: u32, bytes: u32) -> FrameHeader {
    FrameHeader {
        flags,
        seq,
        total_handles: totals.0,
        total_bytes: totals.1,
        frame_handles: handles,
        frame_bytes: bytes,
    }
}

/// A whole message of one frame, with no handles.
fn whole(seq: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    frame(
        header(FLAG_FIRST | FLAG_LAST, seq, (0, n), 0, n),
        &[],
        payload,
    )
}

fn file_record(value: u32) -> Record<'static> {
    Record {
        kind: HandleKind::File,
        name: None,
        value,
        extra: &[],
    }
}

/// The channel still delivers a good message from `raw`.
fn still_serves(raw: &mut File, ch: &Channel) {
    raw_send(raw, &whole(0xffff, b"still alive"));
    assert_eq!(
        ch.recv_timeout(WAIT).unwrap().unwrap().bytes,
        b"still alive"
    );
}

// --- child processes ---------------------------------------------------

const ROLE: &str = "HANDOVER_TEST_ROLE";
const CHANNEL: &str = "HANDOVER_TEST_CHANNEL";

fn spawn_child(role: &str, name: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(CHANNEL, name)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills a child if a test fails before it does, so that no test leaves
/// a process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The entry point of the child processes these tests start.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let name = std::env::var(CHANNEL).unwrap();
    match role.as_str() {
        "half-message" => {
            // The first frame of a three-frame message, with ten real
            // handles of this process named in it, then wait to be killed.
            let mut raw = raw_client(&name);
            let files: Vec<File> = (0..10).map(|_| temp_file(b"half")).collect();
            let records: Vec<Record<'_>> = files
                .iter()
                .map(|f| file_record(f.as_raw_handle() as usize as u32))
                .collect();
            raw_send(
                &mut raw,
                &frame(header(FLAG_FIRST, 1, (30, 10), 10, 3), &records, b"abc"),
            );
            std::thread::sleep(Duration::from_secs(60));
        }
        "big-sender" => {
            // A message of many frames through the real API, with handles:
            // the parent kills this process while it is being sent.
            let ch = Channel::connect_name_timeout(&name, WAIT).unwrap();
            let file = temp_file(b"big");
            let hs: Vec<Handle> = (0..100)
                .map(|_| Handle::from(file.try_clone().unwrap()))
                .collect();
            let big = vec![7u8; 12 * 1024 * 1024];
            let _ = ch.send(&big, &hs);
            std::thread::sleep(Duration::from_secs(60));
        }
        "moved-end" => {
            // Takes a channel end out of a message and talks over it.
            let ch = Channel::connect_name_timeout(&name, WAIT).unwrap();
            let mut m = ch.recv_timeout(WAIT).unwrap().unwrap();
            assert_eq!(m.bytes, b"your end");
            let end = m.take("end").unwrap().into_channel().unwrap();
            // The end that stayed can send bytes and pulled handles here:
            // this process pulls them from the parent, which is where the
            // other end is, as the kernel says.
            let mut m = end.recv_timeout(WAIT).unwrap().unwrap();
            assert_eq!(m.bytes, b"hello, moved end");
            let mut f = m.take("file").unwrap().into_file().unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, "through a moved channel");
            end.send(b"bytes from the child", &[]).unwrap();
            // A handle from here cannot be received at the other end: it
            // would pull from the wrong process, so it refuses.
            let mine = temp_file(b"not receivable");
            end.send(b"with a file", &[Handle::from(mine)]).unwrap();
            end.send(b"bye", &[]).unwrap();
            // Stay until the parent has read everything.
            assert_eq!(ch.recv_timeout(WAIT).unwrap().unwrap().bytes, b"done");
        }
        other => panic!("unknown role {other}"),
    }
}

// --- 1. a peer killed in the middle of a message -----------------------

/// Waits (bounded) until the handle count reaches `at_least`, receiving
/// meanwhile so that frames are read; every receive must time out, since
/// the message is never complete.
fn receive_until_count(ch: &Channel, at_least: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        match ch.recv_timeout(Duration::from_millis(1)) {
            Err(Error::TimedOut { .. }) => {}
            other => panic!("expected a timeout while the message is partial, got {other:?}"),
        }
        if handle_count() >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "the first frame never arrived");
    }
}

#[test]
fn peer_killed_after_the_first_frame() {
    let _g = serial();
    warm_up_winsock();
    let name = unique("half");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let before = handle_count();
    let mut child = KillOnDrop(spawn_child("half-message", &name));
    let ch = listener.accept_timeout(WAIT).unwrap();
    assert_eq!(ch.peer_credentials().unwrap().pid(), child.0.id());
    // The ten handles are pulled out of the child as the first frame is
    // read: then (only then) kill it.
    receive_until_count(&ch, before + 1 + 10);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let got = ch.recv_timeout(WAIT);
    assert!(
        matches!(
            got,
            Err(Error::PeerClosedMidMessage {
                handles: 10,
                bytes: 3
            })
        ),
        "{got:?}"
    );
    assert!(ch.recv_timeout(WAIT).unwrap().is_none());
    drop(ch);
    drop(child);
    assert_eq!(handle_count(), before, "the half message's handles closed");
    // The listener serves the next peer.
    let c = Channel::connect_name_timeout(&name, WAIT).unwrap();
    let s = listener.accept_timeout(WAIT).unwrap();
    c.send(b"next", &[Handle::from(temp_file(b"x"))]).unwrap();
    let m = s.recv_timeout(WAIT).unwrap().unwrap();
    assert_eq!((m.bytes.as_slice(), m.handles.len()), (&b"next"[..], 1));
}

#[test]
fn sender_killed_during_a_long_message() {
    let _g = serial();
    warm_up_winsock();
    let name = unique("big");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let before = handle_count();
    let mut child = KillOnDrop(spawn_child("big-sender", &name));
    let ch = listener.accept_timeout(WAIT).unwrap();
    // The first frame carries the 100 handles; 12 MiB of payload follow
    // in 64 KiB frames, far more than the pipe holds.
    receive_until_count(&ch, before + 1 + 100);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // What the pipe still holds arrives, then the end mid-message.
    let got = loop {
        match ch.recv_timeout(WAIT) {
            Err(Error::TimedOut { .. }) => panic!("no end after the kill"),
            other => break other,
        }
    };
    assert!(
        matches!(got, Err(Error::PeerClosedMidMessage { handles: 100, .. })),
        "{got:?}"
    );
    assert!(ch.recv_timeout(WAIT).unwrap().is_none());
    drop(ch);
    drop(child);
    assert_eq!(handle_count(), before, "the handles of the message closed");
}

// --- 2. limits ---------------------------------------------------------

#[test]
fn limits_drop_the_message_and_close_its_handles() {
    let _g = serial();
    no_leak("limits", || {
        let (a, mut b) = Channel::pair().unwrap();
        b.set_options(ChannelOptions::new().max_handles(3).max_bytes(100_000))
            .unwrap();
        let file = temp_file(b"x");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mixed = |n: usize| -> Vec<Handle> {
            (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        Handle::from(file.try_clone().unwrap())
                    } else {
                        Handle::from(udp.try_clone().unwrap())
                    }
                })
                .collect()
        };
        let before = handle_count();
        // One handle too many, files and sockets.
        let four = mixed(4);
        a.send(b"", &four).unwrap();
        drop(four);
        let got = b.recv_timeout(WAIT);
        assert!(
            matches!(
                got,
                Err(Error::LimitExceeded {
                    what: "handles",
                    limit: 3,
                    got: 4
                })
            ),
            "{got:?}"
        );
        // Too many bytes.
        a.send(&[0u8; 100_001], &[]).unwrap();
        let got = b.recv_timeout(WAIT);
        assert!(
            matches!(
                got,
                Err(Error::LimitExceeded {
                    what: "bytes",
                    limit: 100_000,
                    got: 100_001
                })
            ),
            "{got:?}"
        );
        // A refused message of several frames (300 sockets and files, and
        // 300 KB): every frame of it is read, its handles closed, and the
        // next message is delivered.
        let many = mixed(300);
        let big = vec![3u8; 300_000];
        let two = mixed(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                a.send(&big, &many).unwrap();
                a.send(b"ok", &two).unwrap();
            });
            let got = b.recv_timeout(WAIT);
            assert!(
                matches!(
                    got,
                    Err(Error::LimitExceeded {
                        what: "handles",
                        got: 300,
                        ..
                    })
                ),
                "{got:?}"
            );
            // The rest of the refused message goes quietly; the next one
            // is delivered.
            let m = b.recv_timeout(WAIT).unwrap().unwrap();
            assert_eq!((m.bytes.as_slice(), m.handles.len()), (&b"ok"[..], 2));
        });
        drop((many, two));
        // The sender takes the acks (and closes its transfer copies).
        b.send(b"acked", &[]).unwrap();
        assert_eq!(a.recv_timeout(WAIT).unwrap().unwrap().bytes, b"acked");
        assert_eq!(
            handle_count(),
            before,
            "refused handles closed at both ends"
        );
    });
}

// --- 3. channels over channels -----------------------------------------

#[test]
fn a_channel_end_handed_to_another_process() {
    let _g = serial();
    let name = unique("moved");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let _child = KillOnDrop(spawn_child("moved-end", &name));
    let ch = listener.accept_timeout(WAIT).unwrap();
    let (stays, moves) = Channel::pair().unwrap();
    ch.send(b"your end", &[Handle::from(moves).with_name("end")])
        .unwrap();
    stays
        .send(
            b"hello, moved end",
            &[Handle::from(temp_file(b"through a moved channel")).with_name("file")],
        )
        .unwrap();
    assert_eq!(
        stays.recv_timeout(WAIT).unwrap().unwrap().bytes,
        b"bytes from the child"
    );
    // The end that stayed still takes its peer to be this process (the
    // kernel's word at connect time): a value the child sends is looked
    // up only among the transfer copies this process made, finds none,
    // and the message is refused with its handle count.
    let got = stays.recv_timeout(WAIT);
    assert!(
        matches!(
            got,
            Err(Error::HandleCountMismatch {
                announced: 1,
                received: 0
            })
        ),
        "{got:?}"
    );
    assert_eq!(stays.recv_timeout(WAIT).unwrap().unwrap().bytes, b"bye");
    ch.send(b"done", &[]).unwrap();
    let mut child = _child;
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn channels_travel_within_a_process() {
    let _g = serial();
    no_leak("channel over a channel", || {
        let (a, b) = Channel::pair().unwrap();
        let (c, d) = Channel::pair().unwrap();
        a.send(b"", &[Handle::from(d)]).unwrap();
        let mut m = b.recv_timeout(WAIT).unwrap().unwrap();
        let d = m.handles.remove(0).into_channel().unwrap();
        c.send(b"through a sent channel", &[Handle::from(temp_file(b"f"))])
            .unwrap();
        let m = d.recv_timeout(WAIT).unwrap().unwrap();
        assert_eq!(
            (m.bytes.as_slice(), m.handles.len()),
            (&b"through a sent channel"[..], 1)
        );
        d.send(b"back", &[Handle::from(temp_file(b"g"))]).unwrap();
        assert_eq!(c.recv_timeout(WAIT).unwrap().unwrap().handles.len(), 1);
        // A pipe that is not a channel end is refused.
        let (r, _w) = anonymous_pipe();
        assert!(Handle::from(r).into_channel().is_err());
        drop((m, c, d));
        b.send(b"ack", &[]).unwrap();
        a.recv_timeout(WAIT).unwrap().unwrap();
    });
}

// --- 4. raw hostile clients --------------------------------------------

/// A raw client connected to `listener`, and the accepted channel.
fn raw_pair(listener: &ChannelListener, name: &str) -> (File, Channel) {
    let raw = raw_client(name);
    let ch = listener.accept_timeout(WAIT).unwrap();
    (raw, ch)
}

#[test]
fn truncated_and_garbled_frames() {
    let _g = serial();
    warm_up_winsock();
    let name = unique("garbled");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let (mut raw, ch) = raw_pair(&listener, &name);
    let before = handle_count();
    let good = frame(
        header(FLAG_FIRST | FLAG_LAST, 1, (1, 7), 1, 7),
        &[file_record(0x7fff_fff0)],
        b"payload",
    );
    for cut in [1usize, 10, 27, 28, 30, 44, good.len() - 1] {
        raw_send(&mut raw, &good[..cut]);
        let got = ch.recv_timeout(WAIT);
        assert!(got.is_err(), "cut at {cut}: {got:?}");
        still_serves(&mut raw, &ch);
    }
    for (at, value) in [
        (0usize, b'X'),
        (4, 9),
        (5, 0),
        (5, 7),
        (6, 0xf0),
        (28, 77),
        (29, 9),
        (40, 1),
    ] {
        let mut bad = good.clone();
        bad[at] = value;
        raw_send(&mut raw, &bad);
        let got = ch.recv_timeout(WAIT);
        assert!(
            matches!(got, Err(Error::Malformed(_))),
            "byte {at}={value}: {got:?}"
        );
        still_serves(&mut raw, &ch);
    }
    // Huge lengths announced in a short frame.
    for (totals, frame_bytes) in [
        ((0, u32::MAX), u32::MAX),
        ((u32::MAX, 10), 10),
        ((0, 10), 65_536 * 4),
    ] {
        raw_send(
            &mut raw,
            &frame(
                header(FLAG_FIRST | FLAG_LAST, 2, totals, 0, frame_bytes),
                &[],
                b"0123456789",
            ),
        );
        let got = ch.recv_timeout(WAIT);
        assert!(got.is_err(), "{totals:?} {frame_bytes}: {got:?}");
        still_serves(&mut raw, &ch);
    }
    // A message of 4 MiB, far larger than a frame may be (and than the
    // pipe holds: written from a thread while it is read).
    let got = std::thread::scope(|s| {
        let raw = &mut raw;
        s.spawn(move || raw_send(raw, &vec![0xaau8; 4 * 1024 * 1024]));
        ch.recv_timeout(WAIT)
    });
    assert!(matches!(got, Err(Error::FrameTooLarge { .. })), "{got:?}");
    still_serves(&mut raw, &ch);
    // A continuation with no start, and a message that ends short.
    raw_send(
        &mut raw,
        &frame(header(FLAG_LAST, 4, (0, 4), 0, 2), &[], b"xy"),
    );
    assert!(matches!(ch.recv_timeout(WAIT), Err(Error::Sequence(_))));
    raw_send(
        &mut raw,
        &frame(header(FLAG_FIRST, 5, (0, 4), 0, 2), &[], b"xy"),
    );
    raw_send(
        &mut raw,
        &frame(header(FLAG_LAST, 5, (0, 4), 0, 1), &[], b"z"),
    );
    assert!(matches!(ch.recv_timeout(WAIT), Err(Error::Sequence(_))));
    still_serves(&mut raw, &ch);
    assert_eq!(handle_count(), before, "garbled frames leave nothing open");
    // Another client is served meanwhile.
    let other = Channel::connect_name_timeout(&name, WAIT).unwrap();
    let served = listener.accept_timeout(WAIT).unwrap();
    other.send(b"other", &[]).unwrap();
    assert_eq!(served.recv_timeout(WAIT).unwrap().unwrap().bytes, b"other");
}

/// Handle values off the wire are only ever looked up where they can have
/// come from: a peer in this very process (a raw client, or a pair whose
/// other end has gone elsewhere) may only name transfer copies this
/// process made for sending, never any handle of its table.
#[test]
fn forged_handle_values_are_refused() {
    let _g = serial();
    warm_up_winsock();
    let name = unique("forged");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let (mut raw, ch) = raw_pair(&listener, &name);
    // Real handles of this process that were never sent.
    let secret = temp_file(b"secret");
    let (pipe_r, pipe_w) = anonymous_pipe();
    let before = handle_count();
    for value in [
        secret.as_raw_handle() as usize as u32,
        pipe_r.as_raw_handle() as usize as u32,
        pipe_w.as_raw_handle() as usize as u32,
        raw.as_raw_handle() as usize as u32,
        0x7fff_fff0,
        0,
        u32::MAX,
    ] {
        raw_send(
            &mut raw,
            &frame(
                header(FLAG_FIRST | FLAG_LAST, 1, (1, 0), 1, 0),
                &[file_record(value)],
                b"",
            ),
        );
        let got = ch.recv_timeout(WAIT);
        assert!(
            matches!(
                got,
                Err(Error::HandleCountMismatch {
                    announced: 1,
                    received: 0
                })
            ),
            "value {value:#x}: {got:?}"
        );
        still_serves(&mut raw, &ch);
    }
    // The ack for each frame with a pulled record is still sent (and
    // counts the record), so that a real sender would close its copies.
    let mut ack = [0u8; wire::HEADER_LEN];
    raw.read_exact(&mut ack).unwrap();
    assert_eq!(wire::decode_ack(&ack), Some((1, 1)));
    // Acks that match nothing sent are ignored.
    raw_send(&mut raw, &wire::encode_ack(1, 1));
    raw_send(&mut raw, &wire::encode_ack(u32::MAX, u32::MAX));
    still_serves(&mut raw, &ch);
    assert_eq!(handle_count(), before, "nothing was duplicated");
    // A real pair in this process still pulls what was really sent.
    let (a, b) = Channel::pair().unwrap();
    a.send(b"file", &[Handle::from(secret.try_clone().unwrap())])
        .unwrap();
    let m = b.recv_timeout(WAIT).unwrap().unwrap();
    let mut f = m.handles.into_iter().next().unwrap().into_file().unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "secret");
}

#[test]
fn random_noise_never_panics_or_leaks() {
    let _g = serial();
    warm_up_winsock();
    let name = unique("noise");
    let listener = ChannelListener::bind_name(&name).unwrap();
    let (mut raw, ch) = raw_pair(&listener, &name);
    let keep = temp_file(b"k");
    let before = handle_count();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seed = frame(
        header(FLAG_FIRST, 1, (3, 4), 2, 2),
        &[
            file_record(keep.as_raw_handle() as usize as u32),
            file_record(8),
        ],
        b"ab",
    );
    let mut errors = 0;
    for i in 0..1500u32 {
        let mut f = if next() % 3 == 0 {
            whole(i, b"xy")
        } else {
            seed.clone()
        };
        for _ in 0..next() % 4 {
            let at = next() as usize % f.len();
            f[at] = next() as u8;
        }
        f.truncate(next() as usize % (f.len() + 1));
        raw_send(&mut raw, &f);
        loop {
            match ch.recv_timeout(Duration::from_millis(0)) {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no end expected"),
                Err(Error::TimedOut { .. }) => break,
                Err(_) => errors += 1,
            }
        }
    }
    assert!(errors > 500, "only {errors} errors from 1500 noisy frames");
    raw_send(&mut raw, &whole(0xffff, b"clean"));
    let m = loop {
        match ch.recv_timeout(WAIT) {
            Ok(Some(m)) => break m,
            Ok(None) => panic!("end"),
            Err(Error::TimedOut { .. }) => panic!("the clean message never came"),
            Err(_) => continue,
        }
    };
    assert_eq!(m.bytes, b"clean");
    assert_eq!(handle_count(), before, "noise leaves nothing open");
}

// --- 5. peers that say nothing -----------------------------------------

#[test]
fn silent_peers_do_not_block_the_listener() {
    let _g = serial();
    let name = unique("silent");
    let listener = ChannelListener::bind_name(&name).unwrap();
    // A peer connects and says nothing: it is accepted all the same.
    let silent = raw_client(&name);
    let quiet = listener.accept_timeout(WAIT).unwrap();
    // The next clients are accepted and served while it stays silent.
    for i in 0..3u8 {
        let c = Channel::connect_name_timeout(&name, WAIT).unwrap();
        let s = listener.accept_timeout(WAIT).unwrap();
        c.send(&[i], &[]).unwrap();
        assert_eq!(s.recv_timeout(WAIT).unwrap().unwrap().bytes, [i]);
    }
    // From a thread, while the listener waits.
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let c = Channel::connect_name_timeout(&name, WAIT).unwrap();
            c.recv_timeout(WAIT).unwrap().unwrap().bytes
        });
        let server = listener.accept_timeout(WAIT).unwrap();
        server.send(b"served", &[]).unwrap();
        assert_eq!(t.join().unwrap(), b"served");
    });
    // The silent one only times out.
    assert!(matches!(
        quiet.recv_timeout(Duration::from_millis(100)),
        Err(Error::TimedOut { .. })
    ));
    // A peer that connects, writes one message and leaves before it is
    // accepted: accepted, its message read, then the end.
    let mut gone = raw_client(&name);
    raw_send(&mut gone, &whole(1, b"last words"));
    drop(gone);
    let ch = listener.accept_timeout(WAIT).unwrap();
    match ch.recv_timeout(WAIT) {
        Ok(Some(m)) => {
            assert_eq!(m.bytes, b"last words");
            assert!(ch.recv_timeout(WAIT).unwrap().is_none());
        }
        // Wine drops what a client wrote when it closes first.
        Ok(None) => {}
        other => panic!("{other:?}"),
    }
    // A peer that connects and leaves at once.
    drop(raw_client(&name));
    let ch = listener.accept_timeout(WAIT).unwrap();
    assert!(ch.recv_timeout(WAIT).unwrap().is_none());
    drop(silent);
    assert!(quiet.recv_timeout(WAIT).unwrap().is_none());
}

// --- I/O left under way by a thread that has ended ---------------------

/// Windows cancels the I/O a thread started when the thread exits. A
/// receive or accept that timed out in a thread that has ended since, or
/// a read-ahead for acks started by a send in such a thread, must not
/// turn into an error (ERROR_OPERATION_ABORTED) for the next caller.
#[test]
fn io_left_pending_by_an_ended_thread() {
    let _g = serial();
    no_leak("I/O of ended threads", || {
        let (a, b) = Channel::pair().unwrap();
        // A receive that times out in a thread, leaving its read pending.
        std::thread::scope(|s| {
            s.spawn(|| {
                let got = b.recv_timeout(Duration::from_millis(50));
                assert!(matches!(got, Err(Error::TimedOut { .. })), "{got:?}");
            });
        });
        a.send(b"after the thread", &[]).unwrap();
        assert_eq!(
            b.recv_timeout(WAIT).unwrap().unwrap().bytes,
            b"after the thread"
        );
        // A send with a pulled handle from a thread: its read-ahead for
        // acks and the receiver's ack write, both from ended threads.
        let file = temp_file(b"f");
        std::thread::scope(|s| {
            s.spawn(|| {
                a.send(b"f", &[Handle::from(file.try_clone().unwrap())])
                    .unwrap()
            });
        });
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(b.recv_timeout(WAIT).unwrap().unwrap().handles.len(), 1));
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                a.send(b"g", &[Handle::from(file.try_clone().unwrap())])
                    .unwrap()
            });
        });
        assert_eq!(b.recv_timeout(WAIT).unwrap().unwrap().handles.len(), 1);
        b.send(b"back", &[]).unwrap();
        assert_eq!(a.recv_timeout(WAIT).unwrap().unwrap().bytes, b"back");
        // An accept that times out in a thread.
        let name = unique("ended");
        let listener = ChannelListener::bind_name(&name).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(matches!(
                    listener.accept_timeout(Duration::from_millis(50)),
                    Err(Error::TimedOut { .. })
                ))
            });
        });
        let c = Channel::connect_name_timeout(&name, WAIT).unwrap();
        let server = listener.accept_timeout(WAIT).unwrap();
        c.send(b"accepted", &[]).unwrap();
        assert_eq!(
            server.recv_timeout(WAIT).unwrap().unwrap().bytes,
            b"accepted"
        );
    });
}
