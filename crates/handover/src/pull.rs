//! Pulling a handle out of another running process by its pid and handle
//! number: `pidfd_open` + `pidfd_getfd` on Linux (5.6 or later),
//! `OpenProcess(PROCESS_DUP_HANDLE)` + `DuplicateHandle` on Windows.
//!
//! The process is not told and not stopped: it keeps its own handle, and
//! the caller gets a second one to the same open file description (the
//! same socket, with the same accept queue). This is how a server started
//! without handover can be taken over (`handover adopt`).
//!
//! ```no_run
//! // Descriptor 6 of process 4242 is a listening socket.
//! let listener = handover::pull(4242, 6)?.into_tcp_listener()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;

use crate::handle::Handle;
use crate::sys;

/// Duplicates handle `number` of process `pid` into this process.
///
/// `number` is a file descriptor number on Linux, and a HANDLE or SOCKET
/// value on Windows (whose handle values have 32 significant bits; they
/// are multiples of 4, and any other value is refused as
/// [`PullError::NoSuchHandle`] rather than taken, as Windows would, for
/// the multiple of 4 below it). The
/// returned [`Handle`] has no name, and its kind is what the OS says it is
/// now, so the typed conversions (`into_tcp_listener`, …) work as on any
/// handle made in this process. It is not inheritable (close-on-exec).
///
/// Permissions:
/// - **Linux**: the caller needs ptrace access to the process in mode
///   `PTRACE_MODE_ATTACH_REALCREDS`: the same real uid and gid as the
///   target's real, effective and saved ones, and a dumpable target; or
///   `CAP_SYS_PTRACE`. Yama (`kernel.yama.ptrace_scope`) may restrict it
///   further. A refusal says which of these it found wanting.
/// - **Windows**: the caller needs `PROCESS_DUP_HANDLE` access to the
///   process. A socket is pulled as a handle and then made into a socket of
///   this process through `WSADuplicateSocketW`, so that Winsock knows it
///   here; a layered service provider (LSP) that does not recognise the
///   raw duplicate makes it arrive as a plain handle (of kind `Pipe`, as
///   Windows reports socket handles), which the socket conversions refuse.
///   A process that has exited but is still held open by someone is
///   reported as [`PullError::NoSuchProcess`].
pub fn pull(pid: u32, number: u32) -> Result<Handle, PullError> {
    let raw = sys::pull(pid, number)?;
    Ok(Handle::from_raw(raw))
}

/// The handle numbers process `pid` has open now, in increasing order:
/// what [`pull`] may be asked for. A handle may close before it is pulled.
///
/// - **Linux**: the entries of `/proc/PID/fd`, which needs ptrace read
///   access to the process (`PTRACE_MODE_READ_FSCREDS`: the same uid, or
///   `CAP_SYS_PTRACE`).
/// - **Windows**: the process's entries in the system's handle table
///   (`NtQuerySystemInformation`, `SystemExtendedHandleInformation`), which
///   any process may read; every kind of handle is listed (events, threads,
///   registry keys as well as files and sockets).
///
/// A process that does not exist is [`PullError::NoSuchProcess`].
pub fn handle_numbers(pid: u32) -> Result<Vec<u32>, PullError> {
    sys::handle_numbers(pid)
}

/// Why [`pull`] failed. Each variant says which process and handle, and
/// what the OS refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// No process has this pid (or it has exited).
    #[error("no process {pid}: it does not exist or has exited")]
    NoSuchProcess { pid: u32 },

    /// The process has no open handle of this number.
    #[error("process {pid} has no open handle {number}")]
    NoSuchHandle { pid: u32, number: u32 },

    /// This process may not take handles from that one: `permission` is
    /// what was missing, `cause` what was found (a differing uid, a target
    /// that is not dumpable, a Yama setting, …).
    #[error("{permission} access to process {pid} denied: {cause}")]
    PermissionDenied {
        pid: u32,
        permission: &'static str,
        cause: String,
    },

    /// The OS cannot do it: on Linux, a kernel without `pidfd_open` (5.3)
    /// or `pidfd_getfd` (5.6).
    #[error("pulling handles needs {needs}, which this system does not have")]
    Unsupported { needs: &'static str },

    /// Any other failure of a system call.
    #[error("{op} for process {pid} failed: {source}")]
    Io {
        pid: u32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}
