//! The holder's client: keep handles by name in a running `handover hold`
//! daemon, and get them back from any process the daemon's rules allow.
//!
//! ```no_run
//! use handover::holder::{Client, StoreOptions};
//! use std::net::TcpListener;
//!
//! let mut holder = Client::connect("/run/handover-holder.sock")?;
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! holder.store("web/http", &listener.into(), StoreOptions::new())?;
//!
//! // Later, in another process:
//! let listener = holder.retrieve("web/http")?.into_tcp_listener()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The daemon and its protocol are Unix-only for now (docs/protocol.md
//! §17); a Windows holder is future work.
//!
//! Each `Client` keeps one connection and sends one request at a time. The
//! holder closes a connection that stays idle past its timeout, and hands
//! all its connections over when it is replaced (`handover hold
//! --takeover`); in both cases a request it had not answered was not
//! carried out, so the client reconnects and sends it again, and callers
//! never see it.

pub mod protocol;

#[cfg(feature = "tokio")]
mod async_client;
#[cfg(feature = "tokio")]
pub use async_client::AsyncClient;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Channel, Handle, HandleKind, SocketFamily, SocketType};
pub use protocol::{check_name, Entry, ErrorCode};
use protocol::{decode_reply, encode_request, Reply, Request};

/// The environment variable that names the holder's socket when no path
/// is given.
pub const ENV_SOCKET: &str = "HANDOVER_HOLDER";

/// How often a request is sent again after the holder closed the
/// connection without carrying it out (at a takeover, say).
const ATTEMPTS: usize = 5;

/// What one attempt of a request came to, for both clients.
pub(crate) enum Attempt {
    /// Not carried out (the holder closed, reset, or answered `closing`):
    /// send it again on a new connection; the reason, for the last error.
    Again(String),
    /// An answer (or a refusal) on a connection that stays usable.
    Answered(Result<(Reply, Vec<Handle>)>),
    /// The connection is broken: give up, and drop it.
    Broken(Error),
}

/// Judges what came back for a request.
pub(crate) fn judge(answer: crate::Result<Option<crate::Message>>) -> Attempt {
    let mut msg = match answer {
        Ok(Some(msg)) => msg,
        Ok(None) => return Attempt::Again("the holder closed the connection".into()),
        Err(crate::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            return Attempt::Again("the holder reset the connection".into())
        }
        Err(e) => return Attempt::Broken(e.into()),
    };
    match decode_reply(&msg.bytes) {
        Err(e) => Attempt::Broken(Error::Protocol(e.0)),
        Ok(Reply::Failed {
            code: ErrorCode::Closing,
            message,
        }) => Attempt::Again(message),
        Ok(Reply::Failed { code, message }) => {
            Attempt::Answered(Err(Error::Refused { code, message }))
        }
        Ok(reply) => Attempt::Answered(Ok((reply, std::mem::take(&mut msg.handles)))),
    }
}

/// The error once every attempt was sent back.
pub(crate) fn gave_up(last: Option<String>) -> Error {
    crate::Error::Io {
        op: "holder request",
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!(
                "{} (tried {ATTEMPTS} times)",
                last.unwrap_or_else(|| "no answer".into())
            ),
        ),
    }
    .into()
}

/// What can go wrong talking to the holder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The holder refused the request, and said why.
    #[error("the holder refused: {message} ({code})")]
    Refused { code: ErrorCode, message: String },
    /// The connection failed (the holder is not running, a timeout, …).
    #[error(transparent)]
    Channel(#[from] crate::Error),
    /// The holder's reply broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No socket path was given and HANDOVER_HOLDER is not set.
    #[error("no holder socket: give its path, or set HANDOVER_HOLDER")]
    NoSocket,
    /// A bad argument, found before anything was sent.
    #[error("invalid {what}: {why}")]
    InvalidInput { what: &'static str, why: String },
}

impl Error {
    /// The holder's reason, for a refusal.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The result type of the holder client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to store an entry.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    pub(crate) ttl: Option<Duration>,
    pub(crate) replace: bool,
}

impl StoreOptions {
    /// Held until removed, and refused if the name is taken.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry expires after `ttl` (its descriptor is then closed).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Replaces an entry of the same name (this needs the `remove` right
    /// on it too) instead of failing with `exists`.
    pub fn replace(mut self, on: bool) -> Self {
        self.replace = on;
        self
    }
}

/// The holder's socket: `path`, or else $HANDOVER_HOLDER.
pub fn socket_path(path: Option<&Path>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p.to_owned()),
        None => std::env::var_os(ENV_SOCKET)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .ok_or(Error::NoSocket),
    }
}

/// A connection to a holder.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    channel: Option<Channel>,
    timeout: Duration,
}

impl Client {
    /// Connects to the holder listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        let mut client = Client {
            path: path.as_ref().to_owned(),
            channel: None,
            timeout: Duration::from_secs(30),
        };
        client.channel = Some(client.open()?);
        Ok(client)
    }

    /// Connects to the holder named by $HANDOVER_HOLDER.
    pub fn from_env() -> Result<Client> {
        Client::connect(socket_path(None)?)
    }

    /// How long to wait for the holder to take a request and answer it
    /// (30 s unless set); `wait` adds its own timeout to this.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The holder's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a duplicate of `handle` under `name`; the caller keeps its own.
    pub fn store(&mut self, name: &str, handle: &Handle, options: StoreOptions) -> Result<Entry> {
        let request = Request::Store {
            name: checked(name)?,
            ttl: options.ttl,
            replace: options.replace,
        };
        let (reply, _) = self.call(&request, std::slice::from_ref(handle), None)?;
        match reply {
            Reply::Stored(entry) => Ok(entry),
            other => Err(unexpected("store", &other)),
        }
    }

    /// A duplicate of the entry `name`; the holder keeps it.
    pub fn retrieve(&mut self, name: &str) -> Result<Handle> {
        Ok(self.retrieve_many(&[name], false)?.remove(0).1)
    }

    /// The entry `name` itself, which the holder forgets (retrieve and
    /// remove in one step, so no other client can get it in between).
    pub fn take(&mut self, name: &str) -> Result<Handle> {
        Ok(self.retrieve_many(&[name], true)?.remove(0).1)
    }

    /// Several entries at once, in order, each named: all of them or none
    /// (if one is missing or denied, nothing is handed out or removed).
    pub fn retrieve_many(&mut self, names: &[&str], remove: bool) -> Result<Vec<(Entry, Handle)>> {
        let names = retrieve_names(names)?;
        let count = names.len();
        let (reply, handles) = self.call(&Request::Retrieve { names, remove }, &[], None)?;
        retrieved(count, reply, handles)
    }

    /// Forgets the entry `name`, closing the holder's descriptor.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let (reply, _) = self.call(
            &Request::Remove {
                name: checked(name)?,
            },
            &[],
            None,
        )?;
        done("remove", reply)
    }

    /// The entries this client may list, by name.
    pub fn list(&mut self) -> Result<Vec<Entry>> {
        match self.call(&Request::List, &[], None)?.0 {
            Reply::Entries(entries) => Ok(entries),
            other => Err(unexpected("list", &other)),
        }
    }

    /// Returns once `name` is held, or fails with the `timeout` code when
    /// `timeout` (if any) has passed first.
    pub fn wait(&mut self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let name = checked(name)?;
        let timeout = timeout.map(|t| t.min(Duration::from_millis(protocol::MAX_DURATION_MS)));
        let deadline = timeout.map(|t| Instant::now() + t);
        // Sent again after a takeover, with what is left of the timeout.
        let (reply, _) = self.call_with(
            || Request::Wait {
                name: name.clone(),
                timeout: deadline.map(|d| {
                    d.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1))
                }),
            },
            &[],
            Some(timeout),
        )?;
        done("wait", reply)
    }

    fn open(&self) -> Result<Channel> {
        Ok(Channel::connect_timeout(&self.path, self.timeout)?)
    }

    fn call(
        &mut self,
        request: &Request,
        handles: &[Handle],
        wait: Option<Option<Duration>>,
    ) -> Result<(Reply, Vec<Handle>)> {
        self.call_with(|| request.clone(), handles, wait)
    }

    /// Sends a request and reads its reply, reconnecting and sending it
    /// again when the holder closed the connection without carrying it out.
    /// `wait`: the request is a wait with this timeout (None: forever).
    fn call_with(
        &mut self,
        request: impl Fn() -> Request,
        handles: &[Handle],
        wait: Option<Option<Duration>>,
    ) -> Result<(Reply, Vec<Handle>)> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let ch = match self.channel.take() {
                Some(ch) => ch,
                None => self.open()?,
            };
            let bytes = encode_request(&request());
            match ch.send_timeout(&bytes, handles, self.timeout) {
                Ok(()) => {}
                Err(crate::Error::Disconnected) => {
                    last = Some("the holder closed the connection".to_owned());
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let answer = match wait {
                None => ch.recv_timeout(self.timeout),
                Some(None) => ch.recv(),
                Some(Some(t)) => ch.recv_timeout(t.saturating_add(self.timeout)),
            };
            match judge(answer) {
                Attempt::Again(why) => last = Some(why),
                Attempt::Answered(result) => {
                    self.channel = Some(ch);
                    return result;
                }
                Attempt::Broken(e) => return Err(e),
            }
        }
        Err(gave_up(last))
    }
}

fn checked(name: &str) -> Result<String> {
    check_name(name).map_err(|why| Error::InvalidInput { what: "name", why })?;
    Ok(name.to_owned())
}

fn done(op: &str, reply: Reply) -> Result<()> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(unexpected(op, &other)),
    }
}

/// The names of a retrieve, checked: each a valid name, 1 to
/// MAX_RETRIEVE_NAMES of them.
fn retrieve_names(names: &[&str]) -> Result<Vec<String>> {
    let names = names
        .iter()
        .map(|n| checked(n))
        .collect::<Result<Vec<_>>>()?;
    if names.is_empty() || names.len() > protocol::MAX_RETRIEVE_NAMES {
        return Err(Error::InvalidInput {
            what: "names",
            why: format!("1 to {} names at once", protocol::MAX_RETRIEVE_NAMES),
        });
    }
    Ok(names)
}

/// A retrieve's reply: exactly `count` entries and as many handles, paired.
fn retrieved(count: usize, reply: Reply, handles: Vec<Handle>) -> Result<Vec<(Entry, Handle)>> {
    let Reply::Entries(entries) = reply else {
        return Err(unexpected("retrieve", &reply));
    };
    if entries.len() != count || handles.len() != count {
        return Err(Error::Protocol(format!(
            "asked for {count} entries, got {} descriptions and {} handles",
            entries.len(),
            handles.len()
        )));
    }
    Ok(entries.into_iter().zip(handles).collect())
}

fn unexpected(op: &str, reply: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply to {op}: {reply:?}"))
}

/// The name of a handle's kind as the holder reports it (see
/// [`Entry::kind`]).
pub fn kind_name(kind: HandleKind) -> &'static str {
    match kind {
        HandleKind::Socket(s) => match (s.family, s.socket_type, s.listening) {
            (SocketFamily::Ipv4 | SocketFamily::Ipv6, SocketType::Stream, true) => "tcp-listener",
            (SocketFamily::Ipv4 | SocketFamily::Ipv6, SocketType::Stream, false) => "tcp",
            (SocketFamily::Ipv4 | SocketFamily::Ipv6, SocketType::Datagram, _) => "udp",
            (SocketFamily::Unix, SocketType::Stream, true) => "unix-listener",
            (SocketFamily::Unix, SocketType::Stream, false) => "unix-stream",
            (SocketFamily::Unix, SocketType::Datagram, _) => "unix-dgram",
            (SocketFamily::Unix, SocketType::SeqPacket, true) => "unix-seqpacket-listener",
            (SocketFamily::Unix, SocketType::SeqPacket, false) => "unix-seqpacket",
            _ => "socket",
        },
        HandleKind::File => "file",
        HandleKind::Pipe => "pipe",
        HandleKind::SharedMemory => "memfd",
        HandleKind::Directory => "directory",
        HandleKind::CharDevice => "char-device",
        HandleKind::Other => "other",
    }
}

impl Entry {
    /// When the entry was stored.
    pub fn stored(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.stored_unix_ms)
    }

    /// When the entry expires, if it does.
    pub fn expires(&self) -> Option<SystemTime> {
        self.expires_unix_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }
}
