//! Taking the sockets this process was started with (systemd socket
//! activation: LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, LISTEN_PIDFDID).
//!
//! ```no_run
//! let mut sockets = handover::activation::take()?;
//! let http = sockets.take_named("http").expect("started without an http socket");
//! let listener = http.into_tcp_listener()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`take`] removes the four variables from the environment, as
//! `sd_listen_fds(1)` does, so that children started later do not believe
//! the sockets are theirs. Changing the environment is only sound while no
//! other thread reads it: call [`take`] first thing in `main`, before any
//! thread starts. A program that cannot do that calls [`take_from`] with
//! [`ActivationEnv::from_process`], which never touches the environment
//! (its children then must not inherit the variables: [`crate::Command`]
//! never passes them on).
//!
//! On Windows there are no descriptor numbers to agree on: a parent that
//! used [`crate::Command::activation`] names a pipe in
//! `HANDOVER_ACTIVATION_PIPE`, and [`take`] fetches the handles from it
//! over a [`crate::Channel`] (sockets rebuilt for this process), checked
//! against LISTEN_FDS and LISTEN_FDNAMES. The same program source takes
//! its sockets on both platforms. The parent serves only the process it
//! started (the pipe reports the client's pid), which stands in for
//! LISTEN_PID.
//!
//! The rules, stricter than most implementations:
//! - the sockets are ours only when LISTEN_PID is our pid; a different pid
//!   means "none for us", not an error;
//! - when LISTEN_PIDFDID is set, it must also match our own pidfd's inode
//!   (where the kernel has pidfs), so a recycled pid cannot be fooled;
//! - LISTEN_FDS must be a number, and LISTEN_FDNAMES, when set, must name
//!   exactly that many descriptors;
//! - every descriptor must be open, and all of them are set close-on-exec;
//! - each descriptor can be taken out once, by index or by name, and the
//!   whole set can be taken once per process.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::spawn::ACTIVATION_VARS;
#[cfg(unix)]
use crate::sys;

/// Checks a LISTEN_FDNAMES name: 1 to 255 printable ASCII characters
/// other than `:`.
pub fn check_name(name: &str) -> Result<()> {
    crate::spawn::check_fdname(name)
}

/// The first descriptor of the protocol.
pub const LISTEN_FDS_START: i32 = 3;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The values of the activation variables, however they were obtained.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivationEnv {
    pub listen_pid: Option<String>,
    pub listen_fds: Option<String>,
    pub listen_fdnames: Option<String>,
    pub listen_pidfdid: Option<String>,
    /// `HANDOVER_ACTIVATION_PIPE`: where a Windows child fetches its handles.
    pub activation_pipe: Option<String>,
}

impl ActivationEnv {
    /// Reads the variables from this process's environment, changing nothing.
    pub fn from_process() -> ActivationEnv {
        let get = |k: &str| std::env::var(k).ok();
        ActivationEnv {
            listen_pid: get("LISTEN_PID"),
            listen_fds: get("LISTEN_FDS"),
            listen_fdnames: get("LISTEN_FDNAMES"),
            listen_pidfdid: get("LISTEN_PIDFDID"),
            activation_pipe: get("HANDOVER_ACTIVATION_PIPE"),
        }
    }
}

/// The sockets (or other descriptors) this process was started with.
#[derive(Debug, Default)]
pub struct Activation {
    handles: Vec<Option<Handle>>,
    names: Vec<String>,
}

impl Activation {
    /// How many descriptors were passed (taken or not).
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether none were passed to this process.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The names, in descriptor order (`unknown` where none was given).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Takes descriptor `LISTEN_FDS_START + index`, once.
    pub fn take(&mut self, index: usize) -> Option<Handle> {
        self.handles.get_mut(index)?.take()
    }

    /// Takes the first not-yet-taken descriptor with this name.
    pub fn take_named(&mut self, name: &str) -> Option<Handle> {
        let index = self
            .names
            .iter()
            .zip(&self.handles)
            .position(|(n, h)| n == name && h.is_some())?;
        self.take(index)
    }

    /// Every descriptor not taken yet, in order.
    pub fn into_handles(self) -> Vec<Handle> {
        self.handles.into_iter().flatten().collect()
    }
}

/// Takes the activation descriptors and removes the variables from the
/// environment. Call it before any thread starts (see the module docs).
pub fn take() -> Result<Activation> {
    let env = ActivationEnv::from_process();
    for var in ACTIVATION_VARS {
        // Documented above: this runs before other threads exist.
        std::env::remove_var(var);
    }
    take_from(&env)
}

/// Takes the activation descriptors described by `env`, leaving the
/// process environment alone.
pub fn take_from(env: &ActivationEnv) -> Result<Activation> {
    #[cfg(windows)]
    if env.listen_pid.is_none() {
        return take_from_pipe(env);
    }
    let Some(pid) = env.listen_pid.as_deref() else {
        return Ok(Activation::default());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| Error::Activation(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != std::process::id() {
        return Ok(Activation::default());
    }
    #[cfg(unix)]
    if let Some(id) = env.listen_pidfdid.as_deref() {
        let id: u64 = id.trim().parse().map_err(|_| {
            Error::Activation(format!("LISTEN_PIDFDID={id:?} is not an inode number"))
        })?;
        if let Some(ours) = sys::own_pidfd_inode_id() {
            if ours != id {
                // Our pid, but another process that had it before us.
                return Ok(Activation::default());
            }
        }
    }
    let (count, names) = count_and_names(env, "LISTEN_PID is ours")?;
    #[cfg(windows)]
    {
        take_over_pipe(env, count, names)
    }
    #[cfg(unix)]
    {
        claim()?;
        let handles = sys::adopt_inherited(LISTEN_FDS_START, count)
            .inspect_err(|_| TAKEN.store(false, Ordering::Release))?;
        Ok(Activation {
            handles: handles
                .into_iter()
                .zip(&names)
                .map(|(fd, name)| Some(Handle::from_raw(fd).with_name(name.clone())))
                .collect(),
            names,
        })
    }
}

/// LISTEN_FDS, and LISTEN_FDNAMES checked against it. `why` says why the
/// variables must be there.
fn count_and_names(env: &ActivationEnv, why: &str) -> Result<(usize, Vec<String>)> {
    let count_text = env
        .listen_fds
        .as_deref()
        .ok_or_else(|| Error::Activation(format!("{why} but LISTEN_FDS is not set")))?;
    let count: usize = count_text
        .trim()
        .parse()
        .map_err(|_| Error::Activation(format!("LISTEN_FDS={count_text:?} is not a count")))?;
    if count > 65_536 {
        return Err(Error::Activation(format!(
            "LISTEN_FDS={count} is not plausible"
        )));
    }
    let names: Vec<String> = match env.listen_fdnames.as_deref() {
        None => vec!["unknown".to_owned(); count],
        Some("") if count == 0 => Vec::new(),
        Some(list) => list.split(':').map(str::to_owned).collect(),
    };
    if names.len() != count {
        return Err(Error::Activation(format!(
            "LISTEN_FDNAMES names {} descriptors but LISTEN_FDS is {count}",
            names.len()
        )));
    }
    Ok((count, names))
}

/// Marks the activation handles as taken in this process, once.
fn claim() -> Result<()> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(Error::Activation(
            "the activation descriptors were already taken in this process".into(),
        ));
    }
    Ok(())
}

/// Windows without LISTEN_PID: the handles are fetched from the pipe named
/// in HANDOVER_ACTIVATION_PIPE, if any.
#[cfg(windows)]
fn take_from_pipe(env: &ActivationEnv) -> Result<Activation> {
    if env.activation_pipe.is_none() {
        return Ok(Activation::default());
    }
    let (count, names) = count_and_names(env, "HANDOVER_ACTIVATION_PIPE is set")?;
    take_over_pipe(env, count, names)
}

#[cfg(windows)]
fn take_over_pipe(env: &ActivationEnv, count: usize, names: Vec<String>) -> Result<Activation> {
    let Some(pipe) = env.activation_pipe.as_deref() else {
        return Err(Error::Activation(
            "LISTEN_FDS is set but HANDOVER_ACTIVATION_PIPE is not: on Windows the handles \
             come over that pipe"
                .into(),
        ));
    };
    claim()?;
    let handles = crate::bootstrap::fetch(pipe, count, &names)
        .inspect_err(|_| TAKEN.store(false, Ordering::Release))?;
    Ok(Activation {
        handles: handles.into_iter().map(Some).collect(),
        names,
    })
}
