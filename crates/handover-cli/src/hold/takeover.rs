//! `handover hold --takeover PATH`: a new holder takes everything from the
//! running one without losing a descriptor (docs/protocol.md §17.7).
//!
//! The new holder connects as a client and asks for a takeover. The old
//! one freezes (from then on it carries out no request: those that arrive
//! are answered `closing`, which tells clients to send them again), and
//! sends its *listening socket itself* followed by every entry with its
//! name, owner, times and remaining TTL. The new holder confirms; the old
//! one answers `done` and exits without removing the socket file. Because
//! the listening socket is handed over rather than bound again, the path
//! never disappears and no connection in the backlog is refused: clients
//! that connect meanwhile wait in the backlog until the new holder accepts.
//! If anything fails before `done`, the old holder thaws and carries on,
//! and the new one exits holding nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handover::holder::protocol::{
    decode_reply, encode_reply, encode_request, Entry, ErrorCode, Reply, Request,
};
use handover::tokio::AsyncChannel;
use handover::{Channel, ChannelOptions, Handle, HandleKind, SocketFamily, SocketType};
use serde::{Deserialize, Serialize};

use super::store::Held;
use super::{failed, send, Peer, Shared};

/// Entries per message (each message is one or a few frames).
const BATCH: usize = 200;

/// How long either side waits for the other at each step.
const STEP: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Part {
    takeover: String,
    #[serde(default)]
    entries: Vec<Moved>,
    #[serde(default)]
    last: bool,
}

#[derive(Serialize, Deserialize)]
struct Moved {
    #[serde(flatten)]
    entry: Entry,
    /// What is left of its TTL, in milliseconds; null: none.
    ttl_ms: Option<u64>,
}

/// The old holder's side, run by the task of the connection that asked.
pub async fn serve(shared: &Arc<Shared>, ch: &AsyncChannel, peer: Peer) {
    if peer.uid != shared.own_uid && peer.uid != 0 {
        let why = format!(
            "uid {} may not take this holder over (only uid {} or root)",
            peer.uid, shared.own_uid
        );
        let _ = send(shared, ch, &failed(ErrorCode::Denied, why), &[]).await;
        return;
    }
    if shared.frozen.send_replace(true) {
        let why = "another takeover is in progress".to_owned();
        let _ = send(shared, ch, &failed(ErrorCode::Internal, why), &[]).await;
        return;
    }
    tracing::info!(
        pid = peer.pid,
        "takeover asked: no more requests are carried out here"
    );
    match hand_over(shared, ch).await {
        Ok(count) => {
            tracing::info!(pid = peer.pid, entries = count, "takeover done");
            shared.handed_over.notify_one();
        }
        Err(e) => {
            tracing::warn!("takeover failed: {e:#}; carrying on as before");
            shared.frozen.send_replace(false);
        }
    }
}

async fn hand_over(shared: &Shared, ch: &AsyncChannel) -> Result<usize> {
    // The store is frozen: this snapshot is final.
    let now = Instant::now();
    let mut moved = Vec::new();
    let mut handles = Vec::new();
    for held in shared.store().iter(now) {
        let ttl_left = held.ttl_left(now);
        if ttl_left.is_some_and(|t| t.is_zero()) {
            continue;
        }
        handles.push(
            held.handle
                .try_clone()
                .with_context(|| format!("duplicating {:?}", held.entry.name))?,
        );
        moved.push(Moved {
            entry: held.entry.clone(),
            ttl_ms: ttl_left.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        });
    }
    let listener = shared
        .listener
        .get_ref()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the listening socket")?;
    let first = Part {
        takeover: "listener".into(),
        entries: Vec::new(),
        last: false,
    };
    step(ch.send(&json(&first), &[Handle::from(listener)])).await?;
    let count = moved.len();
    let mut rest_moved = moved.into_iter();
    let mut rest_handles = handles.into_iter();
    loop {
        let entries: Vec<Moved> = rest_moved.by_ref().take(BATCH).collect();
        let batch: Vec<Handle> = rest_handles.by_ref().take(BATCH).collect();
        let last = rest_moved.len() == 0;
        let part = Part {
            takeover: "entries".into(),
            entries,
            last,
        };
        step(ch.send(&json(&part), &batch)).await?;
        if last {
            break;
        }
    }
    let confirm = step(ch.recv())
        .await?
        .context("the new holder left before confirming")?;
    match decode_reply(&confirm.bytes) {
        Ok(Reply::Done) => {}
        other => bail!("the new holder did not confirm: {other:?}"),
    }
    step(ch.send(&encode_reply(&Reply::Done), &[])).await?;
    Ok(count)
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

async fn step<T>(f: impl std::future::Future<Output = handover::Result<T>>) -> Result<T> {
    match tokio::time::timeout(STEP, f).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("no progress within {STEP:?}"),
    }
}

/// What the new holder received.
pub struct Fetched {
    pub listener: OwnedFd,
    pub entries: Vec<Held>,
}

/// The new holder's side, before it serves anyone.
pub fn fetch(path: &Path, timeout: Duration) -> Result<Fetched> {
    let context = || format!("--takeover {}", path.display());
    let mut ch = Channel::connect_timeout(path, timeout)
        .with_context(|| format!("cannot reach a holder at {}", path.display()))?;
    ch.set_options(ChannelOptions::new().max_handles(BATCH + 1))
        .with_context(context)?;
    ch.send_timeout(&encode_request(&Request::Takeover), &[], STEP)
        .with_context(context)?;
    let recv = |what: &str| -> Result<handover::Message> {
        ch.recv_timeout(STEP)
            .with_context(|| format!("waiting for {what}"))?
            .with_context(|| {
                format!("the old holder closed the connection instead of sending {what}")
            })
    };
    let mut first = recv("its listening socket")?;
    if let Ok(Reply::Failed { code, message }) = decode_reply(&first.bytes) {
        bail!(
            "the holder at {} refused the takeover: {message} ({code})",
            path.display()
        );
    }
    let part: Part =
        serde_json::from_slice(&first.bytes).context("the old holder's first message")?;
    if part.takeover != "listener" || first.handles.len() != 1 {
        bail!("the old holder's first message is not its listening socket");
    }
    let listener = first.handles.remove(0);
    let expected = HandleKind::Socket(handover::SocketInfo {
        family: SocketFamily::Unix,
        socket_type: SocketType::SeqPacket,
        listening: true,
    });
    if listener.detect_kind().ok() != Some(expected) {
        bail!("what the old holder sent as its socket is not a listening seqpacket socket");
    }
    let mut entries = Vec::new();
    loop {
        let msg = recv("its entries")?;
        let part: Part = serde_json::from_slice(&msg.bytes).context("the old holder's entries")?;
        if part.takeover != "entries" || part.entries.len() != msg.handles.len() {
            bail!(
                "the old holder sent {} entries with {} handles",
                part.entries.len(),
                msg.handles.len()
            );
        }
        for (m, handle) in part.entries.into_iter().zip(msg.handles) {
            if let Err(why) = handover::holder::check_name(&m.entry.name) {
                tracing::warn!("not taking over an entry with a bad name: {why}");
                continue;
            }
            let ttl = m.ttl_ms.map(Duration::from_millis);
            entries.push(Held::taken_over(m.entry, handle, ttl));
        }
        if part.last {
            break;
        }
    }
    ch.send_timeout(&encode_reply(&Reply::Done), &[], STEP)
        .with_context(context)?;
    let done = recv("its last word")?;
    if decode_reply(&done.bytes) != Ok(Reply::Done) {
        bail!("the old holder did not finish the takeover; it keeps everything");
    }
    Ok(Fetched {
        listener: OwnedFd::from(listener),
        entries,
    })
}
