//! `handover hold`: the holder daemon, which keeps named handles for
//! unrelated processes (docs/protocol.md §17).
//!
//! Concurrency: one tokio task per client on a current-thread runtime.
//! The store is a plain map behind a mutex that no task holds across an
//! await, so every request is carried out in one uninterrupted step and
//! the order of steps is the order of requests; a client that is slow or
//! silent only ever holds up its own task, which its timeout ends. Waits
//! are tasks that sleep on a notification, so a thousand waiting clients
//! cost a thousand small futures, not threads.

mod rules;
mod store;
mod takeover;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::holder::protocol::{
    decode_request, encode_reply, ErrorCode, Reply, Request, MAX_REQUEST_BYTES,
};
use handover::tokio::AsyncChannel;
use handover::unix::PeerCredentialsExt;
use handover::{Channel, ChannelOptions, Handle, Message};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use rules::{Op, Rules};
use store::{Held, Limits, Store};

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Where to listen (a handover channel socket). Default: $HANDOVER_HOLDER.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Access rules (TOML). Without it only the holder's own uid is served.
    /// SIGHUP reads the file again; a bad file is refused and the rules in
    /// force stay.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Replace the holder running at PATH: receive its listening socket and
    /// every entry (names, owners, TTLs), then serve on PATH while it exits.
    #[arg(long, value_name = "PATH")]
    takeover: Option<PathBuf>,
    /// The most entries held at once.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_entries: usize,
    /// The most entries one uid may own.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_per_uid: usize,
    /// The most clients connected at once; more are told `clients-limit`.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_clients: usize,
    /// How long a client may take to send a request (or to read a reply)
    /// before it is disconnected.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    timeout: String,
    /// The socket file's mode (octal). Default: 600 without --rules (only
    /// we may connect), 666 with --rules (the rules decide).
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
}

/// The client at the other end, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: u32,
}

/// What every task shares.
struct Shared {
    own_uid: u32,
    timeout: Duration,
    store: Mutex<Store>,
    rules: Mutex<Arc<Rules>>,
    /// Woken whenever something is stored (waits look again).
    stored: Notify,
    /// Woken when an entry with a deadline is stored.
    expiry_changed: Notify,
    /// Set while the store is being handed to a new holder: no request is
    /// carried out, and connections are closed with `closing`.
    frozen: watch::Sender<bool>,
    /// Set once a takeover has completed: this holder exits.
    handed_over: Notify,
    listener: Arc<AsyncFd<OwnedFd>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub fn run(args: HoldArgs) -> Result<()> {
    let own_uid = rustix::process::getuid().as_raw();
    let timeout = crate::run::duration(&args.timeout).context("--timeout")?;
    if timeout.is_zero() {
        bail!("--timeout must be more than 0");
    }
    if args.max_clients == 0 || args.max_entries == 0 || args.max_per_uid == 0 {
        bail!("--max-clients, --max-entries and --max-per-uid must be at least 1");
    }
    let rules = match &args.rules {
        Some(path) => Rules::load(path, own_uid)?,
        None => Rules::owner_only(own_uid),
    };
    let mode = match &args.socket_mode {
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| format!("--socket-mode {m:?}: expected an octal mode such as 660"))?,
        None if args.rules.is_some() => 0o666,
        None => 0o600,
    };
    raise_fd_limit();
    let limits = Limits {
        max_entries: args.max_entries,
        max_per_uid: args.max_per_uid,
    };
    let mut store = Store::new(limits);
    let (listener, path) = match &args.takeover {
        Some(old) => {
            if let Some(s) = args.socket.as_ref().filter(|s| *s != old) {
                bail!(
                    "--takeover {} serves on the old holder's socket; --socket {} differs",
                    old.display(),
                    s.display()
                );
            }
            let fetched = takeover::fetch(old, timeout)?;
            let count = fetched.entries.len();
            for held in fetched.entries {
                store.adopt(held);
            }
            tracing::info!(
                path = %old.display(),
                entries = count,
                "took over the holder's socket and {count} entries"
            );
            (fetched.listener, old.clone())
        }
        None => {
            let path = handover::holder::socket_path(args.socket.as_deref()).map_err(|_| {
                anyhow::anyhow!("no socket: give --socket PATH or set HANDOVER_HOLDER")
            })?;
            (bind(&path, mode)?, path)
        }
    };
    let file = std::fs::metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .with_context(|| format!("stat {}", path.display()))?;
    let ready = format!(
        "holder ready: {}, {} rules, {} entries",
        path.display(),
        rules.len(),
        store.len()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let outcome = runtime.block_on(async move {
        listener_nonblocking(&listener)?;
        // SAFETY: the OwnedFd inside stays open and the same until the
        // AsyncFd is dropped.
        let listener = unsafe { AsyncFd::register(listener) }.context("registering the socket")?;
        let listener = Arc::new(listener);
        let (frozen, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            own_uid,
            timeout,
            store: Mutex::new(store),
            rules: Mutex::new(Arc::new(rules)),
            stored: Notify::new(),
            expiry_changed: Notify::new(),
            frozen,
            handed_over: Notify::new(),
            listener,
        });
        serve(shared, args.rules, args.max_clients, ready).await
    })?;
    match outcome {
        Stop::HandedOver => {
            tracing::info!("handed everything over to the new holder; exiting");
        }
        Stop::Signal(name) => {
            // Remove the socket file only if it is still the one we made
            // (a new holder may have taken its place).
            if std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == file) {
                let _ = std::fs::remove_file(&path);
            }
            tracing::info!("{name}: stopped");
        }
    }
    Ok(())
}

enum Stop {
    HandedOver,
    Signal(&'static str),
}

async fn serve(
    shared: Arc<Shared>,
    rules_path: Option<PathBuf>,
    max_clients: usize,
    ready: String,
) -> Result<Stop> {
    let mut tasks = JoinSet::new();
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // Only now: from here on SIGHUP reloads instead of ending the holder.
    tracing::info!(max_clients, "{ready}");
    let mut frozen = shared.frozen.subscribe();
    let stop = loop {
        let is_frozen = *frozen.borrow_and_update();
        let next_expiry = shared.store().next_deadline();
        tokio::select! {
            ready = shared.listener.readable(), if !is_frozen => {
                let mut guard = ready.context("waiting for clients")?;
                accept_all(&shared, &mut guard, &mut tasks, max_clients).await;
            }
            Some(_) = tasks.join_next() => {}
            _ = frozen.changed() => {}
            _ = shared.handed_over.notified() => break Stop::HandedOver,
            _ = shared.expiry_changed.notified() => {}
            _ = sleep_until(next_expiry), if next_expiry.is_some() => {
                let expired = shared.store().expire(Instant::now());
                for held in expired {
                    tracing::info!(name = %held.entry.name, "expired: closed");
                }
            }
            _ = hup.recv() => reload(&shared, rules_path.as_deref()),
            _ = term.recv() => break Stop::Signal("SIGTERM"),
            _ = int.recv() => break Stop::Signal("SIGINT"),
        }
    };
    match stop {
        Stop::HandedOver => {
            // Every client task sees the freeze, answers what it must and
            // ends; give them their timeout to do so.
            let _ = tokio::time::timeout(shared.timeout + Duration::from_secs(1), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
        }
        Stop::Signal(_) => {
            let held = shared.store().drain();
            tracing::info!(entries = held.len(), "stopping: closing every held entry");
        }
    }
    tasks.shutdown().await;
    Ok(stop)
}

/// Returns once the holder is frozen for a takeover.
async fn until_frozen(frozen: &mut watch::Receiver<bool>) {
    let _ = frozen.wait_for(|f| *f).await;
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn reload(shared: &Shared, path: Option<&Path>) {
    let Some(path) = path else {
        tracing::warn!(
            "SIGHUP: there is no --rules file to read again; only our own uid is served"
        );
        return;
    };
    match Rules::load(path, shared.own_uid) {
        Ok(rules) => {
            tracing::info!(rules = rules.len(), file = %path.display(), "rules reloaded");
            *shared.rules.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        }
        Err(e) => {
            tracing::error!(
                "SIGHUP: {e:#}; the rules file was refused and the previous rules stay in force"
            );
        }
    }
}

async fn accept_all(
    shared: &Arc<Shared>,
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    tasks: &mut JoinSet<()>,
    max_clients: usize,
) {
    loop {
        match rustix::net::accept_with(
            guard.get_inner(),
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        ) {
            Ok(fd) => {
                while tasks.try_join_next().is_some() {}
                admit(shared, fd, tasks, max_clients);
            }
            Err(rustix::io::Errno::AGAIN) => {
                guard.clear_ready();
                return;
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
            Err(e) => {
                // Out of descriptors, most likely: the clients queue in the
                // backlog until some leave.
                tracing::warn!("accept: {e}; pausing for 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, fd: OwnedFd, tasks: &mut JoinSet<()>, max_clients: usize) {
    let Ok(mut ch) = Channel::try_from(fd) else {
        return;
    };
    let options = ChannelOptions::new()
        .max_handles(1)
        .max_bytes(MAX_REQUEST_BYTES);
    if ch.set_options(options).is_err() {
        return;
    }
    let Ok(creds) = ch.peer_credentials() else {
        return;
    };
    let peer = Peer {
        uid: creds.uid(),
        gid: creds.gid(),
        pid: creds.pid(),
    };
    drop(creds);
    if tasks.len() >= max_clients {
        tracing::warn!(
            pid = peer.pid,
            uid = peer.uid,
            "refused a client: {max_clients} clients already"
        );
        let reply = Reply::Failed {
            code: ErrorCode::ClientsLimit,
            message: format!(
                "the holder already serves {max_clients} clients, its limit (--max-clients); try again later"
            ),
        };
        refuse(ch, encode_reply(&reply));
        return;
    }
    match AsyncChannel::try_from(ch) {
        Ok(ch) => {
            tasks.spawn(client(shared.clone(), ch, peer));
        }
        Err(e) => tracing::warn!("cannot serve a client: {e}"),
    }
}

/// Refused clients being answered at once; more are closed unanswered.
const MAX_REFUSING: usize = 64;

/// Answers a refused client without serving it: its request is read
/// first (for at most 200 ms), because closing a Unix socket with unread
/// data makes the peer's next read fail with ECONNRESET before it can see
/// the answer already queued for it.
fn refuse(ch: Channel, reply: Vec<u8>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static REFUSING: AtomicUsize = AtomicUsize::new(0);
    let Ok(ch) = AsyncChannel::try_from(ch) else {
        return;
    };
    if REFUSING.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        REFUSING.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_millis(200), ch.recv()).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), ch.send(&reply, &[])).await;
        REFUSING.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Serves one client: its requests one at a time, until it leaves, says
/// nothing for the timeout, breaks the protocol beyond repair, or the
/// holder is handed over.
async fn client(shared: Arc<Shared>, ch: AsyncChannel, peer: Peer) {
    let mut frozen = shared.frozen.subscribe();
    loop {
        if *frozen.borrow() {
            closing(
                &shared,
                &ch,
                "the holder is being replaced; reconnect and send the request again",
            )
            .await;
            return;
        }
        let received = tokio::select! {
            _ = until_frozen(&mut frozen) => continue,
            r = tokio::time::timeout(shared.timeout, ch.recv()) => r,
        };
        let msg = match received {
            Err(_) => {
                let why = format!(
                    "no request within {:?}; closing the connection",
                    shared.timeout
                );
                tracing::debug!(pid = peer.pid, "{why}");
                closing(&shared, &ch, &why).await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(handover::Error::Io { .. } | handover::Error::Disconnected)) => return,
            Ok(Err(e)) => {
                // The channel layer rejected what arrived and closed its
                // handles; the connection itself is still usable.
                tracing::debug!(pid = peer.pid, "malformed message: {e}");
                let reply = failed(ErrorCode::Malformed, format!("not a holder request: {e}"));
                if !send(&shared, &ch, &reply, &[]).await {
                    return;
                }
                continue;
            }
            Ok(Ok(Some(msg))) => msg,
        };
        if *frozen.borrow() {
            // Not carried out: the client sends it again to the new holder.
            continue;
        }
        if !request(&shared, &ch, peer, msg, &mut frozen).await {
            return;
        }
    }
}

fn failed(code: ErrorCode, message: String) -> Reply {
    Reply::Failed { code, message }
}

/// Sends a reply; false if the client could not take it in time.
async fn send(shared: &Shared, ch: &AsyncChannel, reply: &Reply, handles: &[Handle]) -> bool {
    let bytes = encode_reply(reply);
    matches!(
        tokio::time::timeout(shared.timeout, ch.send(&bytes, handles)).await,
        Ok(Ok(()))
    )
}

async fn closing(shared: &Shared, ch: &AsyncChannel, why: &str) {
    let reply = failed(ErrorCode::Closing, why.to_owned());
    let bytes = encode_reply(&reply);
    let limit = shared.timeout.min(Duration::from_secs(1));
    let _ = tokio::time::timeout(limit, ch.send(&bytes, &[])).await;
}

/// Carries out one request and answers it; false ends the connection.
async fn request(
    shared: &Arc<Shared>,
    ch: &AsyncChannel,
    peer: Peer,
    msg: Message,
    frozen: &mut watch::Receiver<bool>,
) -> bool {
    let Message { bytes, mut handles } = msg;
    let req = match decode_request(&bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(pid = peer.pid, "bad request: {}", e.message());
            return send(shared, ch, &failed(e.code(), e.message().to_owned()), &[]).await;
        }
    };
    if handles.len() != req.handles() {
        let why = format!(
            "a {} request carries {} handle{}; this one carried {} (closed)",
            req.op(),
            req.handles(),
            if req.handles() == 1 { "" } else { "s" },
            handles.len()
        );
        drop(handles);
        return send(shared, ch, &failed(ErrorCode::Malformed, why), &[]).await;
    }
    match req {
        Request::Wait { name, timeout } => wait(shared, ch, peer, &name, timeout, frozen).await,
        Request::Takeover => {
            takeover::serve(shared, ch, peer).await;
            false
        }
        req => {
            let (reply, out) = perform(shared, peer, req, handles.pop());
            send(shared, ch, &reply, &out).await
        }
    }
}

fn denied(peer: Peer, op: Op, name: &str) -> Reply {
    tracing::info!(
        uid = peer.uid,
        gid = peer.gid,
        pid = peer.pid,
        op = op.as_str(),
        name,
        "denied"
    );
    failed(
        ErrorCode::Denied,
        format!(
            "uid {} (gid {}) may not {} {name:?}: no rule grants it",
            peer.uid,
            peer.gid,
            op.as_str()
        ),
    )
}

/// Carries out every request but wait and takeover, in one step.
fn perform(
    shared: &Shared,
    peer: Peer,
    req: Request,
    handle: Option<Handle>,
) -> (Reply, Vec<Handle>) {
    let rules = shared.rules();
    let allowed = |op: Op, name: &str| rules.allows(peer.uid, peer.gid, op, name);
    let now = Instant::now();
    match req {
        Request::Store { name, ttl, replace } => {
            if !allowed(Op::Store, &name) {
                return (denied(peer, Op::Store, &name), vec![]);
            }
            let Some(handle) = handle else {
                return (
                    failed(ErrorCode::Malformed, "store needs a handle".into()),
                    vec![],
                );
            };
            let held = Held::new(name.clone(), handle, peer.uid, peer.gid, ttl);
            let entry = held.entry.clone();
            let mut store = shared.store();
            if replace && store.contains(&name, now) && !allowed(Op::Remove, &name) {
                return (denied(peer, Op::Remove, &name), vec![]);
            }
            match store.insert(held, replace, now) {
                Ok(old) => {
                    drop(store);
                    drop(old);
                    tracing::debug!(%name, uid = peer.uid, "stored");
                    shared.stored.notify_waiters();
                    if ttl.is_some() {
                        shared.expiry_changed.notify_one();
                    }
                    (Reply::Stored(entry), vec![])
                }
                Err(refusal) => (failed(refusal.code, refusal.message), vec![]),
            }
        }
        Request::Retrieve { names, remove } => {
            for name in &names {
                if !allowed(Op::Retrieve, name) {
                    return (denied(peer, Op::Retrieve, name), vec![]);
                }
                if remove && !allowed(Op::Remove, name) {
                    return (denied(peer, Op::Remove, name), vec![]);
                }
            }
            let mut store = shared.store();
            if let Some(missing) = names.iter().find(|n| !store.contains(n, now)) {
                return (not_found(missing), vec![]);
            }
            let mut entries = Vec::with_capacity(names.len());
            let mut handles = Vec::with_capacity(names.len());
            for name in &names {
                if remove {
                    let Some(held) = store.remove(name, now) else {
                        return (not_found(name), vec![]);
                    };
                    entries.push(held.entry);
                    handles.push(held.handle.with_name(name.clone()));
                } else {
                    let Some(held) = store.get(name, now) else {
                        return (not_found(name), vec![]);
                    };
                    match held.handle.try_clone() {
                        Ok(h) => handles.push(h.with_name(name.clone())),
                        Err(e) => {
                            return (
                                failed(
                                    ErrorCode::Internal,
                                    format!("cannot duplicate {name:?}: {e}"),
                                ),
                                vec![],
                            )
                        }
                    }
                    entries.push(held.entry.clone());
                }
            }
            tracing::debug!(?names, remove, uid = peer.uid, "retrieved");
            (Reply::Entries(entries), handles)
        }
        Request::Remove { name } => {
            if !allowed(Op::Remove, &name) {
                return (denied(peer, Op::Remove, &name), vec![]);
            }
            let removed = shared.store().remove(&name, now);
            match removed {
                Some(_) => {
                    tracing::debug!(%name, uid = peer.uid, "removed");
                    (Reply::Done, vec![])
                }
                None => (not_found(&name), vec![]),
            }
        }
        Request::List => {
            if !rules.allows_any(peer.uid, peer.gid, Op::List) {
                let why = format!(
                    "uid {} (gid {}) may not list: no rule grants it",
                    peer.uid, peer.gid
                );
                return (failed(ErrorCode::Denied, why), vec![]);
            }
            let store = shared.store();
            let entries = store
                .iter(now)
                .filter(|h| allowed(Op::List, &h.entry.name))
                .map(|h| h.entry.clone())
                .collect();
            (Reply::Entries(entries), vec![])
        }
        Request::Wait { .. } | Request::Takeover => (
            failed(ErrorCode::Internal, "not handled here".into()),
            vec![],
        ),
    }
}

fn not_found(name: &str) -> Reply {
    failed(ErrorCode::NotFound, format!("no entry named {name:?}"))
}

/// Answers once `name` is held, or at the timeout. The client may send
/// nothing meanwhile; its leaving ends the wait.
async fn wait(
    shared: &Arc<Shared>,
    ch: &AsyncChannel,
    peer: Peer,
    name: &str,
    timeout: Option<Duration>,
    frozen: &mut watch::Receiver<bool>,
) -> bool {
    if !shared.rules().allows(peer.uid, peer.gid, Op::Wait, name) {
        return send(shared, ch, &denied(peer, Op::Wait, name), &[]).await;
    }
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let stored = shared.stored.notified();
        tokio::pin!(stored);
        stored.as_mut().enable();
        if shared.store().contains(name, Instant::now()) {
            return send(shared, ch, &Reply::Done, &[]).await;
        }
        tokio::select! {
            _ = &mut stored => {}
            _ = sleep_until(deadline), if deadline.is_some() => {
                let why = format!("{name:?} was not stored within {:?}", timeout.unwrap_or_default());
                return send(shared, ch, &failed(ErrorCode::Timeout, why), &[]).await;
            }
            _ = until_frozen(frozen) => {
                closing(shared, ch, "the holder is being replaced; send the wait again").await;
                return false;
            }
            got = ch.recv() => {
                if let Ok(Some(_)) = got {
                    let why = "a request arrived before the wait was answered; one request at a time";
                    let _ = send(shared, ch, &failed(ErrorCode::Malformed, why.into()), &[]).await;
                }
                return false;
            }
        }
    }
}

/// Binds the holder's socket: a SOCK_SEQPACKET listener on `path`, mode
/// `mode`. A stale socket file (nothing listening) is replaced; a live
/// holder there is an error that says how to replace it instead.
fn bind(path: &Path, mode: u32) -> Result<OwnedFd> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match Channel::connect_timeout(path, Duration::from_secs(1)) {
                Ok(_) => bail!(
                    "a holder is already running at {} (to replace it without losing anything: \
                 handover hold --takeover {})",
                    path.display(),
                    path.display()
                ),
                Err(handover::Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    tracing::info!(path = %path.display(), "replacing a stale socket file");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing the stale socket {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("checking the socket {}", path.display()))
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .context("socket(AF_UNIX, SOCK_SEQPACKET)")?;
    let addr =
        SocketAddrUnix::new(path).with_context(|| format!("socket path {}", path.display()))?;
    rustix::net::bind(&fd, &addr)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, path.display()))
        .and_then(|()| rustix::net::listen(&fd, 4096).context("listen"));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(fd)
}

fn listener_nonblocking(fd: &OwnedFd) -> Result<()> {
    rustix::io::ioctl_fionbio(fd.as_fd(), true).context("ioctl(FIONBIO)")?;
    Ok(())
}

/// Up to the hard limit: a thousand clients and a few thousand entries
/// each take a descriptor.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}
