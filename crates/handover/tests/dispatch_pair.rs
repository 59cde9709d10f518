//! The worker's side of dispatch on every platform (on Windows under Wine,
//! by scripts/windows-test.sh): a test thread plays the dispatcher over a
//! channel pair and hands a real TCP connection to `dispatch::Incoming`.
//! The Unix suites in dispatch_worker_side.rs go further (hostile
//! deliveries, descriptor counts, the async side).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use handover::dispatch::protocol::{Delivery, Report, VERSION};
use handover::dispatch::state::StatePage;
use handover::dispatch::Incoming;
use handover::{Channel, Handle};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
const WAIT: Duration = Duration::from_secs(20);

/// Waits (bounded) for the worker to write the state page.
fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn report(ch: &Channel) -> Report {
    let m = ch.recv_timeout(WAIT).unwrap().expect("a report");
    assert!(m.handles.is_empty());
    Report::decode(&m.bytes).unwrap()
}

#[test]
fn a_delivered_connection_is_taken_served_and_counted_done() {
    let (dispatcher, worker) = Channel::pair().unwrap();
    // The state page goes to the worker as shared memory, as a worker's
    // activation handle would (a section on Windows).
    let (page, memory) = StatePage::create().unwrap();
    let memory = Handle::from(memory).into_shared_memory().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(REQUEST).unwrap();
    let (accepted, peer) = listener.accept().unwrap();

    let serving = std::thread::spawn(move || {
        let mut incoming = Incoming::new(worker, &memory).unwrap();
        let mut conn = incoming.accept().unwrap().expect("a connection");
        let info = (
            conn.id(),
            conn.listener().to_owned(),
            conn.peer_addr(),
            conn.peeked().to_vec(),
        );
        // All of it: closing a socket with unread bytes resets it.
        let mut head = [0u8; REQUEST.len()];
        conn.read_exact(&mut head).unwrap();
        conn.write_all(b"served").unwrap();
        drop(conn);
        // The dispatcher ends the channel: the iteration ends.
        assert!(incoming.next().is_none());
        (info, head)
    });

    assert_eq!(report(&dispatcher), Report::Ready { version: VERSION });
    let delivery = Delivery {
        id: 41,
        listener: "http".into(),
        peer: peer.to_string(),
        peeked: b"GET / HTTP/1.1\r\n".to_vec(),
    };
    let handle = Handle::from(accepted);
    dispatcher
        .send(&delivery.encode(), std::slice::from_ref(&handle))
        .unwrap();
    until("marked taken", || page.taken() == 41);
    // Taken: the dispatcher's copy goes, as a dispatcher's would.
    drop(handle);
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert_eq!(
        answer, b"served",
        "the worker closed it: the client sees the end"
    );
    until("counted done", || page.done() == 1);
    assert_eq!(page.taken(), 41);
    drop(dispatcher);

    let ((id, listener_name, peer_addr, peeked), head) = serving.join().unwrap();
    assert_eq!(id, 41);
    assert_eq!(listener_name, "http");
    assert_eq!(peer_addr, Some(peer));
    assert_eq!(peeked, b"GET / HTTP/1.1\r\n");
    // Peeked bytes are not consumed: the worker reads from byte 0.
    assert_eq!(&head, REQUEST);
}

#[test]
fn a_delivery_without_a_socket_is_an_error_and_the_next_one_is_served() {
    let (dispatcher, worker) = Channel::pair().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let (page, memory) = StatePage::create().unwrap();
    let serving = std::thread::spawn(move || {
        let mut incoming = Incoming::new(worker, &memory).unwrap();
        let first = incoming.accept().map(|c| c.map(|c| c.id()));
        let second = incoming.accept().map(|c| c.map(|c| c.id()));
        (
            first.map_err(|e| e.to_string()),
            second.map_err(|e| e.to_string()),
        )
    });
    assert_eq!(report(&dispatcher), Report::Ready { version: VERSION });
    let no_handle = Delivery {
        id: 1,
        listener: "http".into(),
        peer: String::new(),
        peeked: Vec::new(),
    };
    dispatcher.send(&no_handle.encode(), &[]).unwrap();
    let good = Delivery { id: 2, ..no_handle };
    dispatcher
        .send(&good.encode(), &[Handle::from(accepted)])
        .unwrap();
    let (first, second) = serving.join().unwrap();
    assert_eq!(page.taken(), 2);
    let e = first.unwrap_err();
    assert!(e.contains("0 handles instead of one"), "{e}");
    assert_eq!(second.unwrap(), Some(2));
}
