//! The control socket of a running `handover run`, and the `handover
//! reload` and `handover status` commands that talk to it
//! (docs/protocol.md §16).
//!
//! On Unix the socket is a handover channel listener on a path, mode 0600,
//! and only clients with our own uid (or root) are served. On Windows it is
//! a named pipe (`--control NAME`), which admits only the current user. A request is one
//! message: `reload` or `status`. The answer is one message, a JSON
//! object; a reload is answered once it is over: `{"ok":true,
//! "generation":N,"pid":P}` when the new generation is ready, or
//! `{"ok":false,"error":"…"}` when it was rolled back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handover::{Channel, ChannelListener};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where `handover run` listens and `handover reload`/`status` connect when
/// no `--control` is given: $HANDOVER_CONTROL, else
/// $XDG_RUNTIME_DIR/handover.sock, else /tmp/handover-UID.sock.
#[cfg(unix)]
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HANDOVER_CONTROL") {
        return p.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("handover.sock");
    }
    PathBuf::from(format!(
        "/tmp/handover-{}.sock",
        rustix::process::getuid().as_raw()
    ))
}

/// On Windows: $HANDOVER_CONTROL, else the pipe `handover-control-USER`.
#[cfg(windows)]
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HANDOVER_CONTROL") {
        return p.into();
    }
    let user = std::env::var("USERNAME").unwrap_or_else(|_| "default".into());
    PathBuf::from(format!("handover-control-{user}"))
}

/// Listens at `path`: a socket file (mode 0600) on Unix, a pipe name on
/// Windows.
#[cfg(unix)]
fn listen_at(path: &Path) -> Result<ChannelListener> {
    use std::os::unix::fs::PermissionsExt;
    let listener = ChannelListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

#[cfg(windows)]
fn listen_at(path: &Path) -> Result<ChannelListener> {
    Ok(ChannelListener::bind_name(&path.to_string_lossy())?)
}

#[cfg(unix)]
fn connect_to(path: &Path) -> handover::Result<Channel> {
    Channel::connect_timeout(path, Duration::from_secs(5))
}

#[cfg(windows)]
fn connect_to(path: &Path) -> handover::Result<Channel> {
    Channel::connect_name_timeout(&path.to_string_lossy(), Duration::from_secs(5))
}

/// Whether a client may use the control socket: our own uid or root. (On
/// Windows the pipe's DACL already admits only the current user.)
#[cfg(unix)]
fn admitted(ch: &Channel) -> Result<(), String> {
    use handover::unix::PeerCredentialsExt;
    let me = rustix::process::getuid().as_raw();
    match ch.peer_credentials() {
        Ok(c) if c.uid() == me || c.uid() == 0 => Ok(()),
        Ok(c) => Err(format!("uid {}", c.uid())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(windows)]
fn admitted(_: &Channel) -> Result<(), String> {
    Ok(())
}

pub struct Control {
    pub listener: ChannelListener,
    #[cfg_attr(windows, allow(dead_code))]
    pub path: PathBuf,
    /// Clients accepted whose request has not arrived yet, with the time
    /// they are dropped at: the supervisor's loop never waits for one.
    waiting: Vec<(Channel, Instant)>,
}

impl Control {
    /// Binds the control socket. With an explicit path, failing is an
    /// error; at the default path, another live handover there only means
    /// this one runs without a control socket (logged).
    pub fn bind(path: Option<&Path>) -> Result<Option<Control>> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (default_path(), false),
        };
        match listen_at(&path) {
            Ok(listener) => {
                tracing::info!(path = %path.display(), "control socket");
                Ok(Some(Control {
                    listener,
                    path,
                    waiting: Vec::new(),
                }))
            }
            Err(e) if !explicit => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "no control socket (another handover run has it?); pass --control PATH \
                     for `handover reload` and `handover status`"
                );
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("--control {}", path.display())),
        }
    }

    /// Removes the socket file (Unix; a pipe goes with its listener).
    pub fn remove(&self) {
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }

    /// The clients still to send their request, to poll with the listener.
    #[cfg(unix)]
    pub fn waiting(&self) -> impl Iterator<Item = &Channel> {
        self.waiting.iter().map(|(ch, _)| ch)
    }

    /// When the oldest waiting client is dropped for saying nothing.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|&(_, t)| t).min()
    }

    /// Accepts every client queued on the listener (refusing other users),
    /// then collects the requests that have arrived, without blocking.
    /// Clients that closed, sent something unusable, or sent nothing within
    /// REQUEST_TIMEOUT are dropped.
    pub fn requests(&mut self) -> Vec<(Channel, String)> {
        while let Ok(ch) = self.listener.accept_timeout(Duration::ZERO) {
            match admitted(&ch) {
                Ok(()) => self.waiting.push((ch, Instant::now() + REQUEST_TIMEOUT)),
                Err(who) => {
                    tracing::warn!(client = %who, "control: refused a client of another user");
                    reply(
                        &ch,
                        &serde_json::json!({"ok": false, "error": "permission denied"}),
                    );
                }
            }
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (ch, deadline) in std::mem::take(&mut self.waiting) {
            match ch.recv_timeout(Duration::ZERO) {
                Ok(Some(m)) if m.handles.is_empty() => {
                    let request = String::from_utf8_lossy(&m.bytes).trim().to_owned();
                    out.push((ch, request));
                }
                Err(handover::Error::TimedOut { .. }) if deadline > now => {
                    self.waiting.push((ch, deadline));
                }
                _ => {}
            }
        }
        out
    }
}

/// Sends a JSON answer; a client that left is not an error.
pub fn reply(ch: &Channel, value: &serde_json::Value) {
    let _ = ch.send_timeout(value.to_string().as_bytes(), &[], Duration::from_secs(1));
}

/// The client side: sends `request` and returns the JSON answer.
pub fn ask(path: Option<&Path>, request: &str, timeout: Duration) -> Result<serde_json::Value> {
    let path = path.map(Path::to_owned).unwrap_or_else(default_path);
    let ch = connect_to(&path).with_context(|| {
        format!(
            "cannot reach a running `handover run` at {} (give --control PATH)",
            path.display()
        )
    })?;
    ch.send_timeout(request.as_bytes(), &[], Duration::from_secs(5))
        .context("sending the request")?;
    let Some(answer) = ch.recv_timeout(timeout).context("waiting for the answer")? else {
        bail!("the supervisor closed the control connection without answering");
    };
    serde_json::from_slice(&answer.bytes).context("the supervisor's answer is not JSON")
}
