//! Windows: another process's handle through `OpenProcess(PROCESS_DUP_HANDLE)`
//! + `DuplicateHandle` (the Winsock FAQ's ConvertProcessSocket, without
//! closing the source). A socket is then made into a socket of this
//! process by `WSADuplicateSocketW` + `WSASocketW` (std's
//! `OwnedSocket::try_clone`), so that Winsock and any layered provider
//! know it here, and the raw duplicate is closed.

use std::io;
use std::os::windows::io::{
    AsRawHandle, AsRawSocket, FromRawHandle, FromRawSocket, IntoRawSocket, OwnedHandle,
    OwnedSocket, RawHandle,
};

use windows_sys::Win32::Foundation::{
    DuplicateHandle, DUPLICATE_SAME_ACCESS, ERROR_ACCESS_DENIED, ERROR_INVALID_HANDLE,
    ERROR_INVALID_PARAMETER, HANDLE,
};
use windows_sys::Win32::Networking::WinSock::SO_TYPE;
use windows_sys::Win32::Storage::FileSystem::{GetFileType, FILE_TYPE_CHAR, FILE_TYPE_DISK};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcess, PROCESS_DUP_HANDLE};

use super::windows::{sockopt_int, winsock_init, OwnedRaw};
use crate::pull::PullError;

pub(crate) fn pull(pid: u32, number: u32) -> Result<OwnedRaw, PullError> {
    // SAFETY: no pointers; a null result is checked below.
    let process = unsafe { OpenProcess(PROCESS_DUP_HANDLE, 0, pid) };
    if process.is_null() {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error().map(|c| c as u32) {
            Some(ERROR_INVALID_PARAMETER) => PullError::NoSuchProcess { pid },
            Some(ERROR_ACCESS_DENIED) => PullError::PermissionDenied {
                pid,
                permission: "PROCESS_DUP_HANDLE",
                cause: "the process runs as another user, at a higher integrity level, or is \
                        protected; only an elevated caller with SeDebugPrivilege may open it"
                    .into(),
            },
            _ => PullError::Io {
                pid,
                op: "OpenProcess(PROCESS_DUP_HANDLE)",
                source: e,
            },
        });
    }
    // SAFETY: a fresh process handle that nothing else owns.
    let process = unsafe { OwnedHandle::from_raw_handle(process as _) };
    if number == 0 {
        return Err(PullError::NoSuchHandle { pid, number });
    }
    let mut out: HANDLE = std::ptr::null_mut();
    // SAFETY: duplicates from the other process's table into this one,
    // without DUPLICATE_CLOSE_SOURCE, not inheritable, into `out`.
    let ok = unsafe {
        DuplicateHandle(
            process.as_raw_handle() as HANDLE,
            number as usize as HANDLE,
            GetCurrentProcess(),
            &mut out,
            0,
            0,
            DUPLICATE_SAME_ACCESS,
        )
    };
    if ok == 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error().map(|c| c as u32) {
            Some(ERROR_INVALID_HANDLE) => PullError::NoSuchHandle { pid, number },
            _ => PullError::Io {
                pid,
                op: "DuplicateHandle",
                source: e,
            },
        });
    }
    // SAFETY: a fresh handle that nothing else owns, held as a socket
    // only while Winsock is asked whether it is one.
    let dup = unsafe { OwnedSocket::from_raw_socket(out as usize as u64) };
    if !is_socket(&dup) {
        // SAFETY: the same owned value, passed on as owned.
        let h = unsafe { OwnedHandle::from_raw_handle(dup.into_raw_socket() as RawHandle) };
        return Ok(OwnedRaw::Handle(h));
    }
    // A socket this process's Winsock made (WSADuplicateSocketW for this
    // pid, then WSASocketW): the reliable kind. Where that fails the raw
    // duplicate is kept, which works with the in-box providers.
    match dup.try_clone() {
        Ok(socket) => Ok(OwnedRaw::Socket(socket)),
        Err(e) => {
            tracing::debug!(pid, number, error = %e, "WSADuplicateSocketW failed; keeping the raw duplicate");
            Ok(OwnedRaw::Socket(dup))
        }
    }
}

/// Whether Winsock takes `s` for a socket. Files and character devices
/// are never asked.
fn is_socket(s: &OwnedSocket) -> bool {
    // SAFETY: the handle is open for the call.
    let ty = unsafe { GetFileType(s.as_raw_socket() as usize as HANDLE) };
    if ty == FILE_TYPE_DISK || ty == FILE_TYPE_CHAR {
        return false;
    }
    winsock_init();
    // Winsock fails with WSAENOTSOCK on what is not a socket.
    sockopt_int(s, SO_TYPE).is_ok()
}
