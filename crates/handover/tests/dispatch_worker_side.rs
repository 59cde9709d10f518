//! The worker's side of dispatch (`handover::dispatch::Incoming`, and
//! `AsyncIncoming` with the tokio feature), with the test acting as the
//! dispatcher on the other end of a `Channel::pair()`: ready comes first,
//! a delivery becomes a connection that works from its first byte, it is
//! marked taken in the state page before the connection is returned and
//! counted done when it is dropped, nothing else is sent, malformed
//! deliveries are errors with their handles closed, and the end of the
//! channel ends the iteration. Real sockets; every wait is bounded.
#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{no_leak, open_fds, pipe, serial};
use handover::dispatch::protocol::{Delivery, Report, VERSION};
use handover::dispatch::state::StatePage;
use handover::dispatch::{Incoming, Stream};
use handover::{Channel, Error, Handle, SharedMemory};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A client connected to a server-side socket: what a dispatcher accepts.
struct Tcp {
    client: TcpStream,
    server: TcpStream,
}

fn tcp() -> Tcp {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.set_write_timeout(Some(TIMEOUT)).unwrap();
    Tcp { client, server }
}

fn delivery(id: u64, peer: &str, peeked: &[u8]) -> Vec<u8> {
    Delivery {
        id,
        listener: "web".into(),
        peer: peer.into(),
        peeked: peeked.to_vec(),
    }
    .encode()
}

/// A dispatcher's channel and state page, and the worker's ends of both.
fn worker_ends() -> (Channel, StatePage, Channel, SharedMemory) {
    let (dispatcher, worker) = Channel::pair().unwrap();
    let (page, memory) = StatePage::create().unwrap();
    (dispatcher, page, worker, memory)
}

/// A dispatcher's channel and state page, and the worker's `Incoming`.
fn incoming_pair() -> (Channel, StatePage, Incoming) {
    let (dispatcher, page, worker, memory) = worker_ends();
    let incoming = Incoming::new(worker, &memory).unwrap();
    (dispatcher, page, incoming)
}

/// The next report from the worker, which must already be on its way.
fn report(dispatcher: &Channel, wait: Duration) -> Report {
    let m = dispatcher
        .recv_timeout(wait)
        .expect("a report from the worker")
        .expect("the worker's end is open");
    assert!(m.handles.is_empty(), "a report with handles: {m:?}");
    Report::decode(&m.bytes).unwrap_or_else(|e| panic!("{e}: {:?}", m.bytes))
}

/// Nothing more from the worker for now.
fn no_report(dispatcher: &Channel) {
    match dispatcher.recv_timeout(Duration::ZERO) {
        Err(Error::TimedOut { .. }) => {}
        other => panic!("unexpected report: {other:?}"),
    }
}

/// The client's side sees its server socket closed: every copy of it is.
fn closed(client: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection is still open: {other:?}"),
    }
}

/// A delivery whose one handle is the only copy of the server's socket:
/// the client tells whether it was closed.
fn send_only_copy(dispatcher: &Channel, bytes: &[u8], server: TcpStream) {
    let handle = Handle::from(server);
    dispatcher
        .send(bytes, &[handle])
        .expect("sending a delivery");
    // Our copy goes with `handle`, as the dispatcher's does once acked.
}

/// A delivery of the server's socket, keeping a copy as the dispatcher
/// does until it sees the connection taken.
fn send_keeping_copy(dispatcher: &Channel, bytes: &[u8], server: TcpStream) -> Handle {
    let handle = Handle::from(server);
    dispatcher
        .send(bytes, std::slice::from_ref(&handle))
        .expect("sending a delivery");
    handle
}

#[test]
fn ready_is_sent_before_any_delivery_arrives() {
    let _serial = serial();
    let (dispatcher, _page, worker, memory) = worker_ends();
    let t = std::thread::spawn(move || {
        let mut incoming = Incoming::new(worker, &memory).unwrap();
        incoming.accept().map(|c| c.is_none())
    });
    // The worker is blocked waiting: its ready is already here.
    assert_eq!(
        report(&dispatcher, TIMEOUT),
        Report::Ready { version: VERSION }
    );
    drop(dispatcher);
    assert!(t.join().unwrap().unwrap(), "EOF ends the iteration");
}

#[test]
fn a_delivery_becomes_an_acknowledged_connection_read_from_its_first_byte() {
    let _serial = serial();
    let (dispatcher, page, mut incoming) = incoming_pair();
    let Tcp { mut client, server } = tcp();
    let request = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    client.write_all(request).unwrap();
    let peer = client.local_addr().unwrap();
    // The dispatcher peeked the head (say 20 bytes of it) without consuming.
    let peeked = &request[..20];
    let dispatchers_copy = send_keeping_copy(
        &dispatcher,
        &delivery(41, &peer.to_string(), peeked),
        server,
    );

    assert_eq!((page.taken(), page.done()), (0, 0));
    let mut conn = incoming.accept().unwrap().expect("a connection");
    // Ready was sent, and the connection marked taken, before accept
    // returned; nothing else is sent.
    assert_eq!(
        report(&dispatcher, Duration::ZERO),
        Report::Ready { version: VERSION }
    );
    no_report(&dispatcher);
    assert_eq!((page.taken(), page.done()), (41, 0));

    assert_eq!(conn.id(), 41);
    assert_eq!(conn.listener(), "web");
    assert_eq!(conn.peer_addr(), Some(peer));
    assert_eq!(conn.peeked(), peeked);
    assert!(matches!(conn.stream(), Stream::Tcp(_)));
    let mut got = vec![0u8; request.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &request[..], "read from byte 0");
    assert_eq!(&got[..peeked.len()], conn.peeked());
    conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
    let mut answer = [0u8; 27];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 204 No Content\r\n\r\n");

    drop(conn);
    assert_eq!(page.done(), 1);
    // The dispatcher still holds its copy, yet the client sees the end:
    // a dropped connection is shut down, not only closed.
    closed(&mut client);
    drop(dispatchers_copy);

    // into_parts: done is counted when its Done goes, not the stream.
    let Tcp { client, server } = tcp();
    send_only_copy(&dispatcher, &delivery(42, "", b""), server);
    let conn = incoming.next().unwrap().unwrap();
    assert_eq!((page.taken(), page.done()), (42, 1));
    assert_eq!(conn.peer_addr(), None);
    assert!(conn.peeked().is_empty());
    let (stream, done) = conn.into_parts();
    assert_eq!(page.done(), 1);
    drop(done);
    assert_eq!(page.done(), 2);
    drop((stream, client));
    no_report(&dispatcher);

    // An id that does not increase is refused, its handle closed.
    let Tcp { mut client, server } = tcp();
    send_only_copy(&dispatcher, &delivery(42, "", b""), server);
    let e = incoming.accept().unwrap_err().to_string();
    assert!(e.contains("ids must increase"), "{e}");
    closed(&mut client);
    assert_eq!((page.taken(), page.done()), (42, 2));

    drop(dispatcher);
    assert!(incoming.next().is_none(), "EOF ends the iteration");
}

#[test]
fn a_unix_stream_connection_is_delivered_as_one() {
    let _serial = serial();
    let (dispatcher, _page, mut incoming) = incoming_pair();
    let (mut client, server) = UnixStream::pair().unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    dispatcher
        .send(&delivery(1, "", b"hi"), &[Handle::from(server)])
        .unwrap();
    client.write_all(b"hi there").unwrap();
    let mut conn = incoming.accept().unwrap().unwrap();
    assert!(matches!(conn.stream(), Stream::Unix(_)));
    let mut got = [0u8; 8];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi there");
    conn.write_all(b"ok").unwrap();
    let mut answer = [0u8; 2];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"ok");
}

/// Malformed deliveries, each built by `make` from an id (bytes and
/// handles, the test's copies of which are dropped once sent): each is an
/// error, no descriptor is left open, and one with a readable id is marked
/// taken (so that the dispatcher closes its copy); the next good delivery
/// still comes through.
fn malformed_deliveries(
    mut accept: impl FnMut() -> Result<Option<u64>, Error>,
    dispatcher: &Channel,
    page: &StatePage,
) {
    type Make = fn(u64) -> (Vec<u8>, Vec<Handle>, Vec<TcpStream>);
    let cases: [(&str, &str, Make); 8] = [
        ("bad header", "dispatch protocol", |_| {
            let Tcp { client, server } = tcp();
            (
                b"{\"t\":\"conn\"\n".to_vec(),
                vec![server.into()],
                vec![client],
            )
        }),
        ("no end of line", "dispatch protocol", |_| {
            let Tcp { client, server } = tcp();
            (
                b"GET / HTTP/1.1".to_vec(),
                vec![server.into()],
                vec![client],
            )
        }),
        ("no handle", "0 handles", |id| {
            (delivery(id, "", b""), vec![], vec![])
        }),
        ("two handles", "2 handles", |id| {
            let a = tcp();
            let b = tcp();
            (
                delivery(id, "", b""),
                vec![a.server.into(), b.server.into()],
                vec![a.client, b.client],
            )
        }),
        ("a pipe", "came as a pipe, not a connected", |id| {
            let (r, _w): (OwnedFd, OwnedFd) = pipe();
            (delivery(id, "", b""), vec![Handle::from(r)], vec![])
        }),
        ("a listening socket", "came as a listening", |id| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            (delivery(id, "", b""), vec![l.into()], vec![])
        }),
        ("a listening Unix socket", "came as a listening", |id| {
            let l = std::os::unix::net::UnixListener::bind_addr(
                &std::os::unix::net::SocketAddr::from_abstract_name(format!(
                    "handover-dispatch-test-{}",
                    std::process::id()
                ))
                .unwrap(),
            )
            .unwrap();
            (delivery(id, "", b""), vec![OwnedFd::from(l).into()], vec![])
        }),
        (
            "a Unix datagram socket",
            "datagram socket, not a connected",
            |id| {
                let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
                (delivery(id, "", b""), vec![OwnedFd::from(a).into()], vec![])
            },
        ),
    ];
    let mut id = page.taken();
    for (what, says, make) in cases {
        id += 1;
        let (bytes, handles, mut clients) = make(id);
        let before = open_fds() - handles.len();
        let taken_before = page.taken();
        let done_before = page.done();
        dispatcher.send(&bytes, &handles).unwrap();
        drop(handles);
        let e = accept().expect_err(what);
        assert!(e.to_string().contains(says), "{what}: {e}");
        assert_eq!(open_fds(), before, "{what}: a handle was left open");
        let readable_id = says != "dispatch protocol";
        let expect = if readable_id { id } else { taken_before };
        assert_eq!(page.taken(), expect, "{what}: taken");
        // Refused once taken, it is finished too: least-busy must not
        // count it open.
        let finished = done_before + u64::from(readable_id);
        assert_eq!(page.done(), finished, "{what}: done");
        for c in &mut clients {
            c.set_read_timeout(Some(TIMEOUT)).unwrap();
            closed(c);
        }
        no_report(dispatcher);
    }
    // The next delivery is served.
    let done = page.done();
    let Tcp { client, server } = tcp();
    send_only_copy(dispatcher, &delivery(id + 1, "", b""), server);
    assert_eq!(accept().unwrap(), Some(id + 1));
    assert_eq!((page.taken(), page.done()), (id + 1, done + 1));
    no_report(dispatcher);
    drop(client);
}

#[test]
fn malformed_deliveries_are_errors_and_their_handles_are_closed() {
    let _serial = serial();
    let (dispatcher, page, mut incoming) = incoming_pair();
    // Ready goes out with the first accept; an empty channel end first.
    dispatcher.send(&delivery(1, "", b""), &[]).unwrap();
    assert!(incoming.accept().is_err());
    assert_eq!(
        report(&dispatcher, TIMEOUT),
        Report::Ready { version: VERSION }
    );
    no_leak("malformed deliveries", || {
        malformed_deliveries(
            || incoming.accept().map(|c| c.map(|c| c.id())),
            &dispatcher,
            &page,
        )
    });
    drop(dispatcher);
    assert!(incoming.accept().unwrap().is_none());
}

#[cfg(feature = "tokio")]
mod tokio_side {
    use super::*;
    use handover::dispatch::{AsyncIncoming, AsyncStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A runtime, and a dispatcher's channel and state page to an
    /// AsyncIncoming on it.
    fn async_pair() -> (tokio::runtime::Runtime, Channel, StatePage, AsyncIncoming) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (dispatcher, page, worker, memory) = worker_ends();
        let incoming = {
            let _enter = rt.enter();
            AsyncIncoming::new(worker, &memory).unwrap()
        };
        (rt, dispatcher, page, incoming)
    }

    /// Runs `f` on the runtime, failing after TIMEOUT.
    fn block_on<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = T>) -> T {
        rt.block_on(async { tokio::time::timeout(TIMEOUT, f).await })
            .expect("timed out")
    }

    #[test]
    fn async_ready_delivery_taken_done_and_eof() {
        let _serial = serial();
        let (rt, dispatcher, page, mut incoming) = async_pair();
        // Ready while the worker waits for its first connection.
        let waiting = rt.spawn(async move {
            let first = incoming.next().await.map(|r| r.map(|c| c.id()));
            (incoming, first)
        });
        assert_eq!(
            report(&dispatcher, TIMEOUT),
            Report::Ready { version: VERSION }
        );

        let Tcp { mut client, server } = tcp();
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(request).unwrap();
        let peer = client.local_addr().unwrap();
        send_only_copy(
            &dispatcher,
            &delivery(5, &peer.to_string(), request),
            server,
        );
        let (mut incoming, first) = block_on(&rt, waiting).unwrap();
        assert_eq!(first.unwrap().unwrap(), 5);
        // That connection was dropped in the task: taken, then done.
        assert_eq!((page.taken(), page.done()), (5, 1));
        no_report(&dispatcher);
        closed(&mut client);

        let Tcp { mut client, server } = tcp();
        client.write_all(request).unwrap();
        send_only_copy(
            &dispatcher,
            &delivery(6, &peer.to_string(), request),
            server,
        );
        let mut conn = block_on(&rt, incoming.next()).unwrap().unwrap();
        assert_eq!((page.taken(), page.done()), (6, 1));
        assert_eq!(conn.id(), 6);
        assert_eq!(conn.listener(), "web");
        assert_eq!(conn.peer_addr(), Some::<std::net::SocketAddr>(peer));
        assert_eq!(conn.peeked(), request);
        let got = block_on(&rt, async {
            let mut got = vec![0u8; request.len()];
            conn.read_exact(&mut got).await.unwrap();
            conn.write_all(b"pong").await.unwrap();
            got
        });
        assert_eq!(got, request, "read from byte 0");
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"pong");
        let (stream, done) = conn.into_parts();
        assert!(matches!(stream, AsyncStream::Tcp(_)));
        assert_eq!(page.done(), 1);
        // Outside the runtime too: counting needs no task.
        drop(done);
        assert_eq!(page.done(), 2);
        no_report(&dispatcher);
        {
            let _enter = rt.enter();
            drop(stream);
        }
        closed(&mut client);

        drop(dispatcher);
        assert!(block_on(&rt, incoming.next()).is_none(), "EOF ends it");
    }

    #[test]
    fn async_malformed_deliveries_are_errors_and_their_handles_are_closed() {
        let _serial = serial();
        let (rt, dispatcher, page, mut incoming) = async_pair();
        dispatcher.send(&delivery(1, "", b""), &[]).unwrap();
        assert!(block_on(&rt, incoming.next()).unwrap().is_err());
        assert_eq!(
            report(&dispatcher, TIMEOUT),
            Report::Ready { version: VERSION }
        );
        no_leak("malformed deliveries (async)", || {
            malformed_deliveries(
                || match block_on(&rt, incoming.next()) {
                    None => Ok(None),
                    Some(Err(e)) => Err(e),
                    Some(Ok(c)) => {
                        let id = c.id();
                        let _enter = rt.enter();
                        drop(c);
                        Ok(Some(id))
                    }
                },
                &dispatcher,
                &page,
            )
        });
        drop(dispatcher);
        assert!(block_on(&rt, incoming.next()).is_none());
    }
}
