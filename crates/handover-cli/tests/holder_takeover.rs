//! `handover hold --takeover`: a new holder replaces the running one while
//! clients keep storing, retrieving and removing, and nothing is lost;
//! a takeover that fails half-way leaves the old holder serving as before.

#![cfg(target_os = "linux")]

mod holder_common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handover::holder::protocol::{decode_reply, encode_request, Reply, Request};
use handover::holder::{Client, Entry, StoreOptions};
use handover::{Channel, Handle};
use holder_common::*;

/// A memfd holding `text`: its contents survive any number of reads.
fn memfd(text: &str) -> Handle {
    let fd = rustix::fs::memfd_create("takeover", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(text.as_bytes()).unwrap();
    f.rewind().unwrap();
    Handle::from(f)
}

fn contents(h: Handle) -> String {
    let f = h.into_file().unwrap();
    let mut buf = vec![0u8; 256];
    let n = f.read_at(&mut buf, 0).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// One client's work until `stop`: store, read back, and remove every
/// third entry; returns the names it left stored with their contents, or
/// the first error.
fn load(
    path: std::path::PathBuf,
    t: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Result<(BTreeMap<String, String>, usize), String> {
    let mut c = Client::connect(&path).map_err(|e| e.to_string())?;
    let mut kept = BTreeMap::new();
    let mut ops = 0;
    let mut k = 0;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("load/{t}/{k}");
        let text = format!("{t}:{k}");
        c.store(&name, &memfd(&text), StoreOptions::new())
            .map_err(|e| format!("store {name}: {e}"))?;
        let got = contents(
            c.retrieve(&name)
                .map_err(|e| format!("retrieve {name}: {e}"))?,
        );
        if got != text {
            return Err(format!("{name} held {got:?}, not {text:?}"));
        }
        if k % 3 == 0 {
            c.remove(&name).map_err(|e| format!("remove {name}: {e}"))?;
        } else {
            kept.insert(name, text);
        }
        ops += 3;
        done.fetch_add(3, Ordering::SeqCst);
        k += 1;
    }
    Ok((kept, ops))
}

#[test]
fn takeover_under_load_loses_nothing() {
    let mut old = Holder::start(&[]);
    let path = old.path.clone();
    let mut c = old.client();

    // What is held before: listeners, memfds with contents, TTLs.
    let mut listeners = Vec::new();
    for i in 0..20 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        listeners.push((format!("tcp/{i}"), l.local_addr().unwrap()));
        c.store(&format!("tcp/{i}"), &Handle::from(l), StoreOptions::new())
            .unwrap();
    }
    for i in 0..300 {
        let ttl = if i % 2 == 0 {
            StoreOptions::new().ttl(Duration::from_secs(3600))
        } else {
            StoreOptions::new()
        };
        c.store(&format!("mem/{i}"), &memfd(&format!("before {i}")), ttl)
            .unwrap();
    }
    let before: Vec<Entry> = c.list().unwrap();
    assert_eq!(before.len(), 320);

    // Clients busy throughout, and one waiting for a name that comes
    // only after the takeover.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (path, stop, done) = (path.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || load(path, t, stop, done))
        })
        .collect();
    let waiter = {
        let path = path.clone();
        std::thread::spawn(move || Client::connect(&path).and_then(|mut c| c.wait("after", None)))
    };
    eventually("the clients to get going", || {
        (done.load(Ordering::SeqCst) > 100).then_some(())
    });

    // The takeover.
    let mut cmd = handover(["hold", "--takeover"]);
    cmd.arg(&path);
    let new = Holder::spawn(cmd, path.clone(), scratch("new"));
    let status = old.wait_exit();
    assert!(
        status.success(),
        "the old holder exited with {status}: {}",
        old.stderr()
    );
    assert!(old.stderr().contains("takeover done"), "{}", old.stderr());
    new.wait_for_log("took over the holder's socket");
    assert!(path.exists(), "the socket file stayed in place");

    // Clients carry on against the new holder.
    let at_exit = done.load(Ordering::SeqCst);
    eventually("the clients to carry on", || {
        (done.load(Ordering::SeqCst) > at_exit + 100).then_some(())
    });
    let mut c = new.client();
    c.store("after", &memfd("after"), StoreOptions::new())
        .unwrap();
    waiter
        .join()
        .unwrap()
        .expect("the waiter got its answer from the new holder");
    stop.store(true, Ordering::SeqCst);
    let mut expected = BTreeMap::new();
    let mut ops = 0;
    for w in workers {
        let (kept, n) = w.join().unwrap().expect("no client saw an error");
        expected.extend(kept);
        ops += n;
    }
    assert!(ops > 0);

    // Everything held before is held now, as it was.
    let now: BTreeMap<String, Entry> = c
        .list()
        .unwrap()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    for e in &before {
        let after = now
            .get(&e.name)
            .unwrap_or_else(|| panic!("{} was lost", e.name));
        assert_eq!(after, e, "{} changed", e.name);
    }
    for i in [0, 1, 150, 299] {
        assert_eq!(
            contents(c.retrieve(&format!("mem/{i}")).unwrap()),
            format!("before {i}")
        );
    }
    // The listeners work through the new holder.
    for (name, addr) in &listeners[..3] {
        let l = c.retrieve(name).unwrap().into_tcp_listener().unwrap();
        let mut conn = TcpStream::connect(addr).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).unwrap();
    }
    // Everything the clients left stored is there, with its contents, and
    // nothing they removed came back.
    for (name, text) in &expected {
        assert!(now.contains_key(name), "{name} was lost");
        assert_eq!(&contents(c.retrieve(name).unwrap()), text);
    }
    let load_entries = now.keys().filter(|n| n.starts_with("load/")).count();
    assert_eq!(load_entries, expected.len(), "removed entries came back");
    assert_eq!(now.len(), before.len() + expected.len() + 1);
}

/// A new holder that receives everything but never confirms: the old one
/// thaws and serves as before, with everything still held.
#[test]
fn a_failed_takeover_leaves_the_old_holder_serving() {
    let holder = Holder::start(&["--timeout", "2s"]);
    let mut c = holder.client();
    for i in 0..5 {
        c.store(
            &format!("e{i}"),
            &memfd(&format!("{i}")),
            StoreOptions::new(),
        )
        .unwrap();
    }
    let fake = Channel::connect(&holder.path).unwrap();
    fake.send(&encode_request(&Request::Takeover), &[]).unwrap();
    let first = fake.recv_timeout(TIMEOUT).unwrap().unwrap();
    assert_eq!(first.handles.len(), 1, "the listening socket");
    let v: serde_json::Value = serde_json::from_slice(&first.bytes).unwrap();
    assert_eq!(v["takeover"], "listener");
    let part = fake.recv_timeout(TIMEOUT).unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&part.bytes).unwrap();
    assert_eq!(v["takeover"], "entries");
    assert_eq!(v["last"], true);
    assert_eq!(part.handles.len(), 5);
    assert_eq!(v["entries"].as_array().unwrap().len(), 5);
    assert_eq!(v["entries"][0]["name"], "e0");
    // Frozen meanwhile: a request on an existing connection is answered
    // `closing`; the client sends it again on a new connection, which
    // waits in the backlog.
    let path = holder.path.clone();
    let pending = std::thread::spawn(move || {
        let mut c = Client::connect(&path)?;
        c.set_timeout(Duration::from_secs(60));
        c.retrieve("e3").map(contents)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pending.is_finished(), "served while frozen");
    // The "new holder" leaves without confirming.
    drop(fake);
    drop(first);
    drop(part);
    holder.wait_for_log("takeover failed");
    assert_eq!(pending.join().unwrap().unwrap(), "3");
    // The old connection was closed with `closing`; the client reconnects
    // on its own and everything is still there.
    assert_eq!(c.list().unwrap().len(), 5);
    c.store("later", &memfd("later"), StoreOptions::new())
        .unwrap();
    assert_eq!(contents(c.retrieve("e0").unwrap()), "0");

    // A takeover that is confirmed makes the old holder exit.
    let fake = Channel::connect(&holder.path).unwrap();
    fake.send(&encode_request(&Request::Takeover), &[]).unwrap();
    let _listener = fake.recv_timeout(TIMEOUT).unwrap().unwrap();
    let _entries = fake.recv_timeout(TIMEOUT).unwrap().unwrap();
    fake.send(&handover::holder::protocol::encode_reply(&Reply::Done), &[])
        .unwrap();
    let done = fake.recv_timeout(TIMEOUT).unwrap().unwrap();
    assert_eq!(decode_reply(&done.bytes), Ok(Reply::Done));
    let mut holder = holder;
    assert!(holder.wait_exit().success());
    assert!(
        holder.path.exists(),
        "the socket file is left for the new holder"
    );
}

#[test]
fn takeover_of_nothing_is_a_clear_error() {
    let dir = scratch("none");
    let mut cmd = handover(["hold", "--takeover"]);
    cmd.arg(dir.join("absent.sock"));
    let e = fails(&mut cmd);
    assert!(e.contains("cannot reach a holder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
