//! The async holder client (`handover::holder::AsyncClient`, feature
//! `tokio`) against a real `handover hold`: every operation, a wait that
//! starts before the producer, and many clients at once on one runtime.

#![cfg(target_os = "linux")]

mod holder_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use handover::holder::{AsyncClient, ErrorCode, StoreOptions};
use handover::Handle;
use holder_common::*;

#[tokio::test]
async fn the_async_client_does_everything() {
    let holder = Holder::start(&[]);
    let mut c = AsyncClient::connect(&holder.path).await.unwrap();

    // A waiter started before the producer.
    let path = holder.path.clone();
    let waiter = tokio::spawn(async move {
        let mut w = AsyncClient::connect(&path).await?;
        w.wait("web", Some(Duration::from_secs(20))).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let entry = c
        .store(
            "web",
            &Handle::from(l),
            StoreOptions::new().ttl(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_eq!(entry.kind, "tcp-listener");
    assert!(entry.expires_unix_ms.is_some());
    tokio::time::timeout(TIMEOUT, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let l = c
        .retrieve("web")
        .await
        .unwrap()
        .into_tcp_listener()
        .unwrap();
    let mut conn = TcpStream::connect(addr).unwrap();
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"async ok").unwrap();
    let mut buf = [0u8; 8];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"async ok");

    let (r, w) = rustix::pipe::pipe().unwrap();
    c.store("pipe", &Handle::from(r), StoreOptions::new())
        .await
        .unwrap();
    let names: Vec<String> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["pipe", "web"]);
    let got = c.retrieve_many(&["web", "pipe"], false).await.unwrap();
    assert_eq!(got[1].0.kind, "pipe");
    let pipe = c.take("pipe").await.unwrap();
    std::fs::File::from(w).write_all(b"piped").unwrap();
    let mut text = String::new();
    std::fs::File::from(OwnedFd::from(pipe))
        .read_to_string(&mut text)
        .unwrap();
    drop(got);
    assert_eq!(text, "piped");
    let e = c.retrieve("pipe").await.unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::NotFound));
    c.remove("web").await.unwrap();
    let e = c.remove("web").await.unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::NotFound));
    let e = c
        .wait("never", Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&ErrorCode::Timeout));
    assert!(c.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn many_async_clients_on_one_runtime() {
    let holder = Holder::start(&[]);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let path = holder.path.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = AsyncClient::connect(&path).await?;
            let f = std::fs::File::open("/dev/null").unwrap();
            c.store(&format!("n{i}"), &Handle::from(f), StoreOptions::new())
                .await?;
            c.wait(
                &format!("n{}", (i + 1) % 100),
                Some(Duration::from_secs(20)),
            )
            .await?;
            let h = c.retrieve(&format!("n{}", (i + 1) % 100)).await?;
            assert_eq!(h.name(), Some(format!("n{}", (i + 1) % 100).as_str()));
            Ok::<_, handover::holder::Error>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(TIMEOUT, t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert_eq!(holder.client().list().unwrap().len(), 100);
}
