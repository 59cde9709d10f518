//! The holder client against a scripted holder (a plain channel listener
//! in this process): it sends a request again after `closing` or a
//! connection closed without an answer, reports refusals with their codes,
//! and refuses replies that break the protocol. Blocking and async.

#![cfg(target_os = "linux")]

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use handover::holder::protocol::{decode_request, encode_reply, Entry, ErrorCode, Reply, Request};
use handover::holder::{Client, Error, StoreOptions};
use handover::{ChannelListener, Handle};

const TIMEOUT: Duration = Duration::from_secs(20);

fn socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "handover-holder-client-{}-{tag}.sock",
        std::process::id()
    ))
}

fn entry(name: &str) -> Entry {
    Entry {
        name: name.into(),
        kind: "pipe".into(),
        address: None,
        owner_uid: 0,
        owner_gid: 0,
        stored_unix_ms: 1,
        expires_unix_ms: None,
    }
}

/// What the scripted holder does with each connection, in turn: reads one
/// request and answers it with the given replies (and handles), or closes
/// at once without answering (`None`).
type Script = Vec<Option<(Reply, usize)>>;

/// Serves `script`, one step per connection, and returns the requests it
/// read with how many handles each carried.
fn scripted(path: PathBuf, script: Script) -> JoinHandle<Vec<(Request, usize)>> {
    let _ = std::fs::remove_file(&path);
    let listener = ChannelListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for step in script {
            let ch = listener.accept_timeout(TIMEOUT).unwrap();
            let msg = ch.recv_timeout(TIMEOUT).unwrap().unwrap();
            seen.push((decode_request(&msg.bytes).unwrap(), msg.handles.len()));
            if let Some((reply, handles)) = step {
                let hs: Vec<Handle> = (0..handles)
                    .map(|_| Handle::from(std::fs::File::open("/dev/null").unwrap()))
                    .collect();
                ch.send(&encode_reply(&reply), &hs).unwrap();
                // Wait for the client to go, so that its next connection
                // is the next step.
                let _ = ch.recv_timeout(Duration::from_millis(200));
            }
        }
        seen
    })
}

fn closing() -> Option<(Reply, usize)> {
    Some((
        Reply::Failed {
            code: ErrorCode::Closing,
            message: "the holder is being replaced".into(),
        },
        0,
    ))
}

#[test]
fn a_request_is_sent_again_after_closing_or_a_silent_close() {
    let path = socket("again");
    let server = scripted(
        path.clone(),
        vec![closing(), None, Some((Reply::Stored(entry("x")), 0))],
    );
    let mut c = Client::connect(&path).unwrap();
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let stored = c
        .store(
            "x",
            &Handle::from(r),
            StoreOptions::new().ttl(Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(stored, entry("x"));
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 3, "sent three times");
    for (req, handles) in &seen {
        assert_eq!(
            req,
            &Request::Store {
                name: "x".into(),
                ttl: Some(Duration::from_secs(5)),
                replace: false
            }
        );
        assert_eq!(*handles, 1, "each time with its handle");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_client_gives_up_after_five_closings() {
    let path = socket("giveup");
    let server = scripted(
        path.clone(),
        vec![closing(), closing(), None, closing(), None],
    );
    let mut c = Client::connect(&path).unwrap();
    let e = c.list().unwrap_err();
    assert!(matches!(e, Error::Channel(_)), "{e:?}");
    assert!(e.to_string().contains("tried 5 times"), "{e}");
    assert_eq!(server.join().unwrap().len(), 5);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn refusals_and_broken_replies() {
    let path = socket("refusals");
    let denied = Reply::Failed {
        code: ErrorCode::Denied,
        message: "uid 1 may not retrieve \"x\"".into(),
    };
    let future = Reply::Failed {
        code: ErrorCode::Other("from-the-future".into()),
        message: "?".into(),
    };
    let server = scripted(
        path.clone(),
        vec![
            Some((denied, 0)),
            Some((future, 0)),
            // One description but no handle: not a valid retrieve reply.
            Some((Reply::Entries(vec![entry("x")]), 0)),
            // A handle, described: fine.
            Some((Reply::Entries(vec![entry("x")]), 1)),
            // A store answered as if it were a list.
            Some((Reply::Entries(vec![]), 0)),
        ],
    );
    let mut c = Client::connect(&path).unwrap();
    let e = c.retrieve("x").unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::Denied));
    assert!(e.to_string().contains("may not retrieve"), "{e}");
    // Each step of the script is one connection: make the client
    // reconnect by dropping it.
    drop(c);
    let mut c = Client::connect(&path).unwrap();
    let e = c.remove("x").unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::Other("from-the-future".into())));
    drop(c);
    let mut c = Client::connect(&path).unwrap();
    let e = c.retrieve("x").unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(e.to_string().contains("0 handles"), "{e}");
    drop(c);
    let mut c = Client::connect(&path).unwrap();
    let got = c.retrieve_many(&["x"], false).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.name, "x");
    drop(c);
    let mut c = Client::connect(&path).unwrap();
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let e = c
        .store("x", &Handle::from(r), StoreOptions::new())
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(c);
    server.join().unwrap();
    // Bad names and counts are refused before anything is sent.
    let e = Client::connect(&path).map(|_| ()).unwrap_err();
    assert!(
        matches!(e, Error::Channel(_)),
        "nothing listens any more: {e:?}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn no_socket_is_a_clear_error() {
    std::env::remove_var("HANDOVER_HOLDER");
    let e = Client::from_env().unwrap_err();
    assert!(e.to_string().contains("HANDOVER_HOLDER"), "{e}");
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn the_async_client_sends_again_too() {
    use handover::holder::AsyncClient;
    let path = socket("async");
    let server = scripted(
        path.clone(),
        vec![
            None,
            closing(),
            Some((Reply::Entries(vec![entry("a"), entry("b")]), 2)),
        ],
    );
    let mut c = AsyncClient::connect(&path).await.unwrap();
    let got = c.retrieve_many(&["a", "b"], true).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].0.name, "b");
    let seen = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[2].0,
        Request::Retrieve {
            names: vec!["a".into(), "b".into()],
            remove: true
        }
    );
    let _ = std::fs::remove_file(&path);
}
