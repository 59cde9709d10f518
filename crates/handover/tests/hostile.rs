//! Hostile and broken peers: every failure gives an error value, closes
//! every descriptor that arrived with the bad message, and leaves the
//! channel usable for the next message.

#![cfg(unix)]

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use handover::wire::{FLAG_FIRST, FLAG_LAST};
use handover::{Channel, ChannelListener, Error};

const T: Duration = Duration::from_secs(10);

/// Sends `frame` with `n` pipe ends attached from a raw socket, and returns
/// what the handover end made of it. Then proves the channel still works.
fn deliver(frame: &[u8], n: usize) -> Result<Option<handover::Message>, Error> {
    let (raw, ours) = Channel::pair().unwrap();
    let raw = OwnedFd::from(raw);
    let pipes: Vec<OwnedFd> = (0..n.div_ceil(2))
        .flat_map(|_| {
            let (r, w) = pipe();
            [r, w]
        })
        .take(n)
        .collect();
    raw_send(raw.as_fd(), frame, &borrow_all(&pipes));
    drop(pipes);
    let got = ours.recv_timeout(T);
    raw_send(raw.as_fd(), &whole(100, 0, b"still alive"), &[]);
    let next = ours.recv_timeout(T).unwrap().unwrap();
    assert_eq!(next.bytes, b"still alive");
    got
}

#[test]
fn handle_count_disagrees_with_header() {
    let _g = serial();
    no_leak("count mismatch", || {
        let got = deliver(&whole(1, 3, b"x"), 2);
        assert!(
            matches!(
                got,
                Err(Error::HandleCountMismatch {
                    announced: 3,
                    received: 2
                })
            ),
            "{got:?}"
        );
        let got = deliver(&whole(1, 1, b"x"), 5);
        assert!(
            matches!(
                got,
                Err(Error::HandleCountMismatch {
                    announced: 1,
                    received: 5
                })
            ),
            "{got:?}"
        );
    });
}

#[test]
fn handles_where_none_were_announced() {
    let _g = serial();
    no_leak("unannounced handles", || {
        let got = deliver(&whole(1, 0, b"x"), 4);
        assert!(
            matches!(got, Err(Error::UnannouncedHandles { received: 4 })),
            "{got:?}"
        );
        // Bytes that are no frame at all, with descriptors attached.
        let got = deliver(b"GET / HTTP/1.0\r\n\r\n", 3);
        assert!(matches!(got, Err(Error::Malformed(_))), "{got:?}");
    });
}

#[test]
fn truncated_and_garbled_frames() {
    let _g = serial();
    no_leak("garbled frames", || {
        let good = whole(1, 2, b"payload");
        for cut in [0usize, 1, 10, 27, 28, 30, 44, good.len() - 1] {
            let got = deliver(&good[..cut], 2);
            assert!(got.is_err(), "cut at {cut}: {got:?}");
        }
        for (at, value) in [
            (0usize, b'X'),
            (4, 9),
            (5, 0),
            (6, 0xf0),
            (28, 77),
            (29, 9),
            (40, 1),
        ] {
            let mut bad = good.clone();
            bad[at] = value;
            let got = deliver(&bad, 2);
            assert!(
                matches!(got, Err(Error::Malformed(_))),
                "byte {at}={value}: {got:?}"
            );
        }
        // A record whose name is not UTF-8.
        let mut named = Vec::new();
        handover::wire::FrameHeader {
            flags: FLAG_FIRST | FLAG_LAST,
            seq: 1,
            total_handles: 1,
            total_bytes: 0,
            frame_handles: 1,
            frame_bytes: 0,
        }
        .encode(&mut named);
        handover::wire::Record {
            kind: handover::HandleKind::File,
            name: Some("ab"),
            value: 0,
            extra: &[],
        }
        .encode(&mut named);
        let at = named.len() - 1;
        named[at] = 0xff;
        assert!(matches!(deliver(&named, 1), Err(Error::Malformed(_))));
    });
}

#[test]
fn oversized_frame_is_cut_and_closed() {
    let _g = serial();
    no_leak("oversized frame", || {
        let mut big = whole(1, 2, &vec![0u8; 100_000]);
        big.truncate(100_000);
        let got = deliver(&big, 2);
        assert!(
            matches!(got, Err(Error::FrameTooLarge { closed: 2 })),
            "{got:?}"
        );
    });
}

#[test]
fn control_data_truncated() {
    let _g = serial();
    no_leak("MSG_CTRUNC", || {
        // With SO_PASSCRED on the receiving socket, the kernel puts an
        // SCM_CREDENTIALS message ahead of the rights in the control buffer,
        // so a full frame of 253 descriptors no longer fits: the kernel
        // installs what fits, drops the rest and sets MSG_CTRUNC.
        let (raw, ours) = Channel::pair().unwrap();
        let raw = OwnedFd::from(raw);
        rustix::net::sockopt::set_socket_passcred(ours.as_fd(), true).unwrap();
        let pipes: Vec<OwnedFd> = (0..127)
            .flat_map(|_| {
                let (r, w) = pipe();
                [r, w]
            })
            .take(253)
            .collect();
        raw_send(raw.as_fd(), &whole(1, 253, b""), &borrow_all(&pipes));
        drop(pipes);
        let got = ours.recv_timeout(T);
        match got {
            Err(Error::ControlTruncated { closed }) => assert!(closed > 0 && closed < 253),
            other => panic!("expected MSG_CTRUNC, got {other:?}"),
        }
        rustix::net::sockopt::set_socket_passcred(ours.as_fd(), false).unwrap();
        raw_send(raw.as_fd(), &whole(2, 0, b"after"), &[]);
        assert_eq!(ours.recv_timeout(T).unwrap().unwrap().bytes, b"after");
    });
}

#[test]
fn broken_sequences() {
    let _g = serial();
    no_leak("broken sequences", || {
        // A continuation with no start.
        let got = deliver(&frame(FLAG_LAST, 4, (2, 0), 2, b""), 2);
        assert!(matches!(got, Err(Error::Sequence(_))), "{got:?}");

        // A message that ends short of its announced totals.
        let (raw, ours) = Channel::pair().unwrap();
        let raw = OwnedFd::from(raw);
        let (r, w) = pipe();
        raw_send(
            raw.as_fd(),
            &frame(FLAG_FIRST, 1, (3, 0), 1, b""),
            &[r.as_fd()],
        );
        raw_send(
            raw.as_fd(),
            &frame(FLAG_LAST, 1, (3, 0), 1, b""),
            &[w.as_fd()],
        );
        assert!(matches!(ours.recv_timeout(T), Err(Error::Sequence(_))));

        // A first frame abandoned by a new message: the old one is
        // reported, the new one delivered on the next call.
        raw_send(
            raw.as_fd(),
            &frame(FLAG_FIRST, 2, (2, 0), 1, b""),
            &[r.as_fd()],
        );
        raw_send(raw.as_fd(), &whole(3, 1, b"new"), &[w.as_fd()]);
        assert!(matches!(ours.recv_timeout(T), Err(Error::Sequence(_))));
        let m = ours.recv_timeout(T).unwrap().unwrap();
        assert_eq!((m.bytes.as_slice(), m.handles.len()), (&b"new"[..], 1));

        // Totals that change midway.
        raw_send(
            raw.as_fd(),
            &frame(FLAG_FIRST, 5, (2, 0), 1, b""),
            &[r.as_fd()],
        );
        raw_send(
            raw.as_fd(),
            &frame(FLAG_LAST, 5, (1, 0), 1, b""),
            &[w.as_fd()],
        );
        assert!(matches!(ours.recv_timeout(T), Err(Error::Sequence(_))));
        drop((m, r, w));
    });
}

#[test]
fn random_noise_never_panics_or_leaks() {
    let _g = serial();
    no_leak("random noise", || {
        let (raw, ours) = Channel::pair().unwrap();
        let raw = OwnedFd::from(raw);
        let (r, w) = pipe();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = frame(FLAG_FIRST, 1, (3, 4), 2, b"ab");
        let mut errors = 0;
        for i in 0..3000u32 {
            let mut f = if next() % 3 == 0 {
                whole(i, (next() % 3) as u32, b"xy")
            } else {
                seed.clone()
            };
            for _ in 0..next() % 4 {
                let at = next() as usize % f.len();
                f[at] = next() as u8;
            }
            f.truncate(next() as usize % (f.len() + 1));
            let n = (next() % 4) as usize;
            let fds: Vec<_> = [r.as_fd(), w.as_fd(), r.as_fd()][..n.min(3)].to_vec();
            raw_send(raw.as_fd(), &f, &fds);
            // Drain whatever this produced without blocking.
            loop {
                match ours.recv_timeout(Duration::from_millis(0)) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("no EOF expected"),
                    Err(Error::TimedOut { .. }) => break,
                    Err(_) => errors += 1,
                }
            }
        }
        assert!(errors > 1000, "only {errors} errors from 3000 noisy frames");
        // A clean message still gets through after all that.
        raw_send(raw.as_fd(), &whole(0xffff, 0, b"clean"), &[]);
        let m = loop {
            match ours.recv_timeout(T) {
                Ok(Some(m)) => break m,
                Ok(None) => panic!("EOF"),
                Err(_) => continue,
            }
        };
        assert_eq!(m.bytes, b"clean");
        drop((r, w));
    });
}

/// The entry point of child processes started by these tests.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    match role.as_str() {
        "half-message" => {
            // Connect, send the first frame of a three-frame message with
            // descriptors attached, and wait to be killed.
            let name = std::env::var("HANDOVER_TEST_NAME").unwrap();
            let ch = Channel::connect_name(&name).unwrap();
            let fd = OwnedFd::from(ch);
            let pipes: Vec<OwnedFd> = (0..5)
                .flat_map(|_| {
                    let (r, w) = pipe();
                    [r, w]
                })
                .collect();
            raw_send(
                fd.as_fd(),
                &frame(FLAG_FIRST, 1, (30, 10), 10, b"abc"),
                &borrow_all(&pipes),
            );
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn peer_killed_mid_message() {
    let _g = serial();
    no_leak("peer killed mid-message", || {
        let name = format!("handover-hostile-{}", std::process::id());
        let listener = ChannelListener::bind_name(&name).unwrap();
        let mut child = child_command("child_entry", "half-message")
            .env("HANDOVER_TEST_NAME", &name)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let ch = listener.accept_timeout(T).unwrap();
        // Wait until the half message is queued, then kill the sender.
        let mut pfd = [rustix::event::PollFd::new(
            &ch,
            rustix::event::PollFlags::IN,
        )];
        let ten = rustix::event::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut pfd, Some(&ten)).unwrap(), 1);
        child.kill().unwrap();
        child.wait().unwrap();
        let got = ch.recv_timeout(T);
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
        assert!(ch.recv_timeout(T).unwrap().is_none());
        drop((ch, listener));
    });
}

#[test]
fn an_empty_record_from_a_live_peer_is_not_a_clean_close() {
    let _g = serial();
    no_leak("empty record", || {
        let got = deliver(b"", 0);
        assert!(
            matches!(
                got,
                Err(Error::Malformed(handover::wire::DecodeError::ShortHeader(
                    0
                )))
            ),
            "{got:?}"
        );
    });
}
