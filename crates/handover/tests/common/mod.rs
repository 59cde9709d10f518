//! Helpers shared by the integration tests: descriptor counting, a raw
//! SCM_RIGHTS sender for crafting hostile frames, and re-running the test
//! binary as a child process.

#![allow(dead_code)]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use handover::wire::{FrameHeader, Record, FLAG_FIRST, FLAG_LAST};
use handover::HandleKind;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Tests that count descriptors hold this, so that no other test in the
/// same binary opens or closes descriptors meanwhile.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Asserts that `body` leaves the descriptor count as it found it.
pub fn no_leak<T>(what: &str, body: impl FnOnce() -> T) -> T {
    let before = open_fds();
    let out = body();
    let after = open_fds();
    assert_eq!(
        before, after,
        "{what}: {before} descriptors before, {after} after"
    );
    out
}

/// Raises the soft descriptor limit to the hard one, for tests that hold
/// more than a thousand descriptors at once.
pub fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    )
    .unwrap();
}

/// Encodes a frame by hand. `records` handles are described as pipes.
pub fn frame(flags: u16, seq: u32, totals: (u32, u32), records: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        flags,
        seq,
        total_handles: totals.0,
        total_bytes: totals.1,
        frame_handles: records,
        frame_bytes: payload.len() as u32,
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

/// A complete one-frame message, with `records` handle records.
pub fn whole(seq: u32, records: u32, payload: &[u8]) -> Vec<u8> {
    frame(
        FLAG_FIRST | FLAG_LAST,
        seq,
        (records, payload.len() as u32),
        records,
        payload,
    )
}

/// Sends raw bytes with descriptors attached, bypassing handover entirely.
pub fn raw_send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
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

/// A pipe, for something cheap to send.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

/// Borrows every descriptor in a slice.
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// The name of the child role this process was started for, if any.
pub fn child_role() -> Option<String> {
    std::env::var("HANDOVER_TEST_ROLE").ok()
}

/// Runs this test binary again, as `role`, executing only the test named
/// `entry` (which must dispatch on [`child_role`]).
pub fn child_command(entry: &str, role: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env("HANDOVER_TEST_ROLE", role);
    cmd
}
