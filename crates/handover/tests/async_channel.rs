//! The tokio channel: same wire format, same guarantees.
#![cfg(feature = "tokio")]

mod common;

use std::time::Duration;

use common::*;
use handover::tokio::{AsyncChannel, AsyncChannelListener};
use handover::{Channel, Error, Handle};

/// Runs one test body on its own runtime, holding the descriptor-count lock
/// for the runtime's whole life: a runtime owns descriptors too.
fn run<F: std::future::Future>(body: F) -> F::Output {
    let _g = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(body);
    // The runtime's own descriptors must be gone before the lock is.
    drop(rt);
    out
}

#[test]
fn many_messages_with_handles_leak_nothing() {
    run(many_messages())
}

async fn many_messages() {
    let before = open_fds();
    {
        let (a, b) = AsyncChannel::pair().unwrap();
        let (r, w) = pipe();
        let handles = [Handle::from(r), Handle::from(w).with_name("w")];
        let receiver = tokio::spawn(async move {
            let mut n = 0u32;
            while let Some(m) = b.recv().await.unwrap() {
                assert_eq!(m.bytes, n.to_le_bytes());
                assert_eq!(m.handles.len(), 2);
                n += 1;
            }
            n
        });
        for i in 0..20_000u32 {
            a.send(&i.to_le_bytes(), &handles).await.unwrap();
        }
        drop(a);
        assert_eq!(receiver.await.unwrap(), 20_000);
    }
    assert_eq!(open_fds(), before);
}

#[test]
fn async_and_blocking_ends_interoperate() {
    run(interoperate())
}

async fn interoperate() {
    raise_fd_limit();
    let (a, b) = Channel::pair().unwrap();
    let b = AsyncChannel::try_from(b).unwrap();
    let pipes: Vec<Handle> = (0..300)
        .map(|_| Handle::from(pipe().0).with_name("p"))
        .collect();
    let sender = std::thread::spawn(move || {
        a.send(&[5u8; 100_000], &pipes).unwrap();
        a
    });
    let m = b.recv().await.unwrap().unwrap();
    assert_eq!((m.bytes.len(), m.handles.len()), (100_000, 300));
    let a = sender.join().unwrap();
    // And back to blocking, with the channel intact.
    let b = b.into_channel().unwrap();
    a.send(b"back", &[]).unwrap();
    assert_eq!(
        b.recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .bytes,
        b"back"
    );
}

#[test]
fn listener_accepts_and_hostile_frames_fail_cleanly() {
    run(listener_and_hostile())
}

async fn listener_and_hostile() {
    let name = format!("handover-async-{}", std::process::id());
    let l = AsyncChannelListener::bind_name(&name).unwrap();
    let client = AsyncChannel::connect_name(&name).await.unwrap();
    let server = l.accept().await.unwrap();
    let before = open_fds();
    // A raw frame that announces three handles and carries one.
    let (r, _w) = pipe();
    let blocking = client.into_channel().unwrap();
    let fd = std::os::fd::OwnedFd::from(blocking);
    raw_send(
        std::os::fd::AsFd::as_fd(&fd),
        &whole(1, 3, b"x"),
        &[std::os::fd::AsFd::as_fd(&r)],
    );
    let got = tokio::time::timeout(Duration::from_secs(5), server.recv())
        .await
        .unwrap();
    assert!(
        matches!(
            got,
            Err(Error::HandleCountMismatch {
                announced: 3,
                received: 1
            })
        ),
        "{got:?}"
    );
    drop((r, _w));
    assert_eq!(
        open_fds(),
        before,
        "the one descriptor that arrived was closed"
    );
    drop(fd);
    assert!(server.recv().await.unwrap().is_none());
}
