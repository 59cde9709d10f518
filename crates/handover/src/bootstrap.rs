//! Socket activation on Windows: the child fetches its handles over a
//! Channel named in its environment (docs/protocol.md, "Activation on
//! Windows").
//!
//! Windows has no descriptor numbers to agree on, and sockets should not
//! be inherited, so [`crate::Command::activation`] works differently
//! there. Before the child starts, the parent creates a channel listener
//! under a fresh random pipe name and puts it in the child's environment
//! as `HANDOVER_ACTIVATION_PIPE`, next to LISTEN_FDS and LISTEN_FDNAMES.
//! `handover::activation::take` in the child connects, receives one
//! message with every handle (sockets rebuilt from WSAPROTOCOL_INFOW made
//! for the child's pid), checks it against LISTEN_FDS and LISTEN_FDNAMES,
//! and answers `TAKEN`. The parent serves only the process it started:
//! the client's pid comes from the pipe (GetNamedPipeClientProcessId),
//! and any other process is refused while the server keeps waiting for
//! the real child.
//!
//! The same server can also speak systemfd's Windows protocol, so that
//! programs written against the `listenfd` crate work unchanged: a TCP
//! listener on 127.0.0.1 named by `SYSTEMFD_SOCKET_SERVER`, a random
//! secret in `SYSTEMFD_SOCKET_SECRET`; a client sends `SECRET|PID`, shuts
//! down its sending side, and reads one WSAPROTOCOL_INFOW per socket. A
//! wrong secret or a malformed request is refused and the server keeps
//! serving (systemfd's own server stops on one). systemfd's protocol
//! serves any process that knows the secret, for as long as the child
//! runs, because in the development loop it is a grandchild (`cargo
//! watch` → `cargo run` → the server) that asks, and asks again after
//! every rebuild.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::channel::{Channel, ChannelListener};
use crate::error::{Error, Result};
use crate::handle::{Handle, HandleKind};
use crate::sys;

/// The variable that names the activation pipe.
pub(crate) const PIPE_VAR: &str = "HANDOVER_ACTIVATION_PIPE";
/// systemfd's variables.
pub(crate) const SYSTEMFD_SERVER_VAR: &str = "SYSTEMFD_SOCKET_SERVER";
pub(crate) const SYSTEMFD_SECRET_VAR: &str = "SYSTEMFD_SOCKET_SECRET";

/// The first bytes of the parent's message, and the child's answer.
pub(crate) const OFFER: &[u8] = b"HANDOVER-ACTIVATION 1";
pub(crate) const REFUSED: &[u8] = b"REFUSED ";
pub(crate) const TAKEN: &[u8] = b"TAKEN";

/// How long the child may take over each step of the exchange.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a systemfd client may take to send its request.
const SYSTEMFD_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// `SECRET|PID` is 36 + 1 + 10 bytes at most; anything longer is hostile.
const SYSTEMFD_MAX_REQUEST: u64 = 128;
/// How often the server looks at the stop flag and the child's state.
const TICK: Duration = Duration::from_millis(50);

/// A server made before the child starts, so its names can go into the
/// child's environment.
pub(crate) struct Prepared {
    listener: ChannelListener,
    pipe: String,
    systemfd: Option<(TcpListener, String)>,
}

impl Prepared {
    pub fn new(systemfd: bool) -> Result<Prepared> {
        let pipe = format!("handover-activation-{}", hex(&sys::random_bytes::<16>()?));
        let listener = ChannelListener::bind_name(&pipe)?;
        let systemfd = if systemfd {
            let tcp = TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind (systemfd)"))?;
            tcp.set_nonblocking(true)
                .map_err(Error::io("ioctlsocket(FIONBIO)"))?;
            Some((tcp, uuid(sys::random_bytes::<16>()?)))
        } else {
            None
        };
        Ok(Prepared {
            listener,
            pipe,
            systemfd,
        })
    }

    /// The variables the child needs, besides LISTEN_FDS and LISTEN_FDNAMES.
    pub fn env(&self) -> Result<Vec<(OsString, OsString)>> {
        let mut vars = vec![(PIPE_VAR.into(), self.pipe.clone().into())];
        if let Some((tcp, secret)) = &self.systemfd {
            let addr = tcp.local_addr().map_err(Error::io("getsockname"))?;
            vars.push((SYSTEMFD_SERVER_VAR.into(), addr.to_string().into()));
            vars.push((SYSTEMFD_SECRET_VAR.into(), secret.clone().into()));
        }
        Ok(vars)
    }

    /// Serves `handles` to the child with pid `child` (whose process
    /// `exited` watches) from a thread, until the child has them (and,
    /// with systemfd, until it exits) or the returned value is dropped.
    pub fn serve(self, child: u32, exited: sys::ExitWatch, handles: &[Handle]) -> Result<Serving> {
        let handles = handles
            .iter()
            .map(|h| h.try_clone().map_err(Error::io("DuplicateHandle")))
            .collect::<Result<Vec<Handle>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server {
            prepared: self,
            child,
            exited,
            handles,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("handover-activation".into())
            .spawn(move || server.run())
            .map_err(Error::io("CreateThread"))?;
        Ok(Serving {
            stop,
            thread: Some(thread),
        })
    }
}

/// The serving thread of one child; stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct Serving {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Server {
    prepared: Prepared,
    child: u32,
    exited: sys::ExitWatch,
    handles: Vec<Handle>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn run(self) {
        let mut delivered = false;
        while !self.stop.load(Ordering::Acquire) && !self.exited.has_exited() {
            if !delivered {
                match self.prepared.listener.accept_timeout(TICK) {
                    Ok(channel) => delivered = self.offer(channel),
                    Err(Error::TimedOut { .. }) => {}
                    Err(e) => {
                        tracing::warn!("activation pipe: {e}");
                        std::thread::sleep(TICK);
                    }
                }
            }
            match &self.prepared.systemfd {
                Some((tcp, secret)) => {
                    while let Ok((stream, _)) = tcp.accept() {
                        self.serve_systemfd(stream, secret);
                    }
                    if delivered {
                        std::thread::sleep(TICK);
                    }
                }
                None if delivered => return,
                None => {}
            }
        }
    }

    /// One client of the pipe: the child gets its handles, anyone else a
    /// refusal. True once the child has taken them.
    fn offer(&self, channel: Channel) -> bool {
        let pid = match channel.peer_credentials() {
            Ok(c) => c.pid(),
            Err(e) => {
                tracing::warn!("activation pipe: {e}");
                return false;
            }
        };
        if pid != self.child {
            tracing::warn!(
                "activation pipe: refused process {pid}; the handles are for process {}",
                self.child
            );
            let why = format!("the handles are for process {}", self.child);
            let _ = channel.send_timeout(&[REFUSED, why.as_bytes()].concat(), &[], STEP_TIMEOUT);
            return false;
        }
        let outcome = channel
            .send_timeout(OFFER, &self.handles, STEP_TIMEOUT)
            .and_then(|()| channel.recv_timeout(STEP_TIMEOUT));
        match outcome {
            Ok(Some(reply)) if reply.bytes == TAKEN => true,
            Ok(Some(reply)) => {
                tracing::warn!(
                    "activation pipe: process {pid} answered {:?}",
                    String::from_utf8_lossy(&reply.bytes)
                );
                // The child refused (it said why); it will not ask again.
                true
            }
            Ok(None) => {
                tracing::warn!("activation pipe: process {pid} left without answering");
                false
            }
            Err(e) => {
                tracing::warn!("activation pipe: process {pid}: {e}");
                false
            }
        }
    }

    /// One systemfd client: `SECRET|PID` in, WSAPROTOCOL_INFOW out.
    fn serve_systemfd(&self, mut stream: TcpStream, secret: &str) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.systemfd_reply(&mut stream, secret) {
            Ok(n) => tracing::debug!("systemfd: sent {n} sockets to {peer}"),
            Err(why) => tracing::warn!("systemfd: refused {peer}: {why}"),
        }
        // Closing tells the client the list is complete.
        let _ = stream.shutdown(Shutdown::Both);
    }

    fn systemfd_reply(&self, stream: &mut TcpStream, secret: &str) -> io::Result<usize> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(SYSTEMFD_READ_TIMEOUT))?;
        let mut request = Vec::new();
        (&mut *stream)
            .take(SYSTEMFD_MAX_REQUEST + 1)
            .read_to_end(&mut request)?;
        if request.len() as u64 > SYSTEMFD_MAX_REQUEST {
            return Err(io::Error::other("the request is too long"));
        }
        let request = std::str::from_utf8(&request)
            .map_err(|_| io::Error::other("the request is not text"))?;
        let (given, pid) = request
            .trim()
            .split_once('|')
            .ok_or_else(|| io::Error::other("expected SECRET|PID"))?;
        if !constant_time_eq(given.trim().as_bytes(), secret.as_bytes()) {
            return Err(io::Error::other("wrong secret"));
        }
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| io::Error::other("the pid is not a number"))?;
        let mut reply = Vec::new();
        let mut sent = 0;
        for handle in &self.handles {
            if let HandleKind::Socket(_) = handle.kind() {
                reply.extend_from_slice(&sys::socket_protocol_info_for(handle, pid)?);
                sent += 1;
            }
        }
        stream.write_all(&reply)?;
        Ok(sent)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A version-4 UUID, hyphenated, as systemfd's secrets are.
fn uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The child's side: fetch the handles from the pipe named in the
/// environment and check them against LISTEN_FDS and LISTEN_FDNAMES.
pub(crate) fn fetch(pipe: &str, count: usize, names: &[String]) -> Result<Vec<Handle>> {
    let channel = Channel::connect_name_timeout(pipe, STEP_TIMEOUT)?;
    let started = Instant::now();
    let msg = channel
        .recv_timeout(STEP_TIMEOUT)?
        .ok_or_else(|| Error::Activation(format!("the activation pipe {pipe} closed early")))?;
    if let Some(why) = msg.bytes.strip_prefix(REFUSED) {
        return Err(Error::Activation(format!(
            "the activation pipe refused us: {}",
            String::from_utf8_lossy(why)
        )));
    }
    let handles = msg.handles;
    let problem = if msg.bytes != OFFER {
        Some("the activation pipe sent something other than an offer".to_owned())
    } else if handles.len() != count {
        Some(format!(
            "LISTEN_FDS is {count} but the activation pipe sent {} handles",
            handles.len()
        ))
    } else {
        handles
            .iter()
            .zip(names)
            .find(|(h, n)| h.name().unwrap_or("unknown") != n.as_str())
            .map(|(h, n)| {
                format!(
                    "LISTEN_FDNAMES says {n:?} but the activation pipe sent {:?}",
                    h.name().unwrap_or("unknown")
                )
            })
    };
    let answer: &[u8] = match &problem {
        None => TAKEN,
        Some(why) => &[REFUSED, why.as_bytes()].concat(),
    };
    let remaining = STEP_TIMEOUT.saturating_sub(started.elapsed());
    let _ = channel.send_timeout(answer, &[], remaining.max(Duration::from_secs(1)));
    match problem {
        None => Ok(handles),
        Some(why) => Err(Error::Activation(why)),
    }
}
