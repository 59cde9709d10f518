//! The control socket of a running `handover run`, and the `handover
//! reload` and `handover status` commands that talk to it
//! (docs/protocol.md §16).
//!
//! The socket is a handover channel listener on a path, mode 0600, and
//! only clients with our own uid (or root) are served. A request is one
//! message: `reload` or `status`. The answer is one message, a JSON
//! object; a reload is answered once it is over: `{"ok":true,
//! "generation":N,"pid":P}` when the new generation is ready, or
//! `{"ok":false,"error":"…"}` when it was rolled back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handover::unix::PeerCredentialsExt;
use handover::{Channel, ChannelListener};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where `handover run` listens and `handover reload`/`status` connect when
/// no `--control` is given: $HANDOVER_CONTROL, else
/// $XDG_RUNTIME_DIR/handover.sock, else /tmp/handover-UID.sock.
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

pub struct Control {
    pub listener: ChannelListener,
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
        match ChannelListener::bind(&path) {
            Ok(listener) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod {}", path.display()))?;
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

    /// The clients still to send their request, to poll with the listener.
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
        let me = rustix::process::getuid().as_raw();
        while let Ok(ch) = self.listener.accept_timeout(Duration::ZERO) {
            match ch.peer_credentials() {
                Ok(c) if c.uid() == me || c.uid() == 0 => {
                    self.waiting.push((ch, Instant::now() + REQUEST_TIMEOUT));
                }
                Ok(c) => {
                    tracing::warn!(uid = c.uid(), "control: refused a client of another user");
                    reply(
                        &ch,
                        &serde_json::json!({"ok": false, "error": "permission denied"}),
                    );
                }
                Err(_) => {}
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
    let ch = Channel::connect_timeout(&path, Duration::from_secs(5)).with_context(|| {
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
