//! The seam between the platform-neutral crate and the OS.
//!
//! Each platform file provides the same items: `OwnedRaw` (the owned handle
//! type), `Transport` (one end of a channel), `Listener`, kind detection and
//! type checks. Nothing outside `sys` makes a system call.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub(crate) use unix::*;
#[cfg(unix)]
mod unix_spawn;
#[cfg(unix)]
pub(crate) use unix_spawn::{is_executable, kill_child, spawn_child, wait_child, Spawned};
#[cfg(unix)]
pub(crate) use unix_spawn::{own_pidfd_inode_id, signal as signal_child};
#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub(crate) use windows::*;
#[cfg(windows)]
mod windows_event;
#[cfg(windows)]
pub(crate) use windows_event::{set_event, wait_event};
#[cfg(windows)]
mod windows_listen;
#[cfg(windows)]
mod windows_security;
#[cfg(windows)]
pub(crate) use windows_listen::{bind_inet, bind_unix, SocketFile, EAFNOSUPPORT};
#[cfg(windows)]
mod windows_spawn;
#[cfg(windows)]
pub(crate) use windows_spawn::{
    is_executable, kill_child, program_candidates, random_bytes, socket_protocol_info_for,
    spawn_child, wait_child, ExitWatch, Spawned,
};
#[cfg(unix)]
mod unix_pull;
#[cfg(unix)]
pub(crate) use unix_pull::{handle_numbers, pull};
#[cfg(windows)]
mod windows_handles;
#[cfg(windows)]
pub(crate) use windows_handles::handle_numbers;
#[cfg(windows)]
mod windows_pull;
#[cfg(windows)]
pub(crate) use windows_pull::pull;
#[cfg(unix)]
mod unix_shm;
#[cfg(unix)]
pub(crate) use unix_shm::{create_shared_memory, map_shared_memory, shared_memory_len, View};
#[cfg(windows)]
mod windows_shm;
#[cfg(windows)]
pub(crate) use windows_shm::{create_shared_memory, map_shared_memory, shared_memory_len, View};

/// Bytes of platform data a handle's record carries (none on Unix, where
/// the handle itself rides in SCM_RIGHTS).
#[cfg(unix)]
#[inline(always)]
pub(crate) fn extra_len(_: &OwnedRaw) -> usize {
    0
}

/// What a typed conversion requires of a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expect {
    TcpListener,
    TcpStream,
    UdpSocket,
    File,
    Channel,
    #[cfg_attr(not(unix), allow(dead_code))]
    UnixListener,
    #[cfg_attr(not(unix), allow(dead_code))]
    UnixStream,
    #[cfg_attr(not(unix), allow(dead_code))]
    UnixDatagram,
}

/// Which way a wait is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}
