//! Windows: another process's handle through `OpenProcess(PROCESS_DUP_HANDLE)`
//! + `DuplicateHandle` (the Winsock FAQ's ConvertProcessSocket, without
//! closing the source). A socket is then made into a socket of this
//! process by `WSADuplicateSocketW` + `WSASocketW` (std's
//! `OwnedSocket::try_clone`), so that Winsock and any layered provider
//! know it here, and the raw duplicate is closed.
//!
//! `WSADuplicateSocketW` is also what tells a socket from a pipe: it is
//! the one Winsock call that takes a handle this process's Winsock never
//! made both on Windows (where ws2_32 adopts any IFS socket handle) and
//! under Wine (whose `getsockopt` and `closesocket` answer WSAENOTSOCK
//! for a handle that ws2_32 did not create or import itself).

use std::io;
use std::os::windows::io::{
    AsRawHandle, FromRawHandle, FromRawSocket, IntoRawHandle, OwnedHandle, OwnedSocket,
};

use windows_sys::Win32::Foundation::{
    CloseHandle, DuplicateHandle, DUPLICATE_SAME_ACCESS, ERROR_ACCESS_DENIED, ERROR_INVALID_HANDLE,
    ERROR_INVALID_PARAMETER, HANDLE, WAIT_OBJECT_0,
};
use windows_sys::Win32::Networking::WinSock::{closesocket, WSAGetLastError, WSAENOTSOCK};
use windows_sys::Win32::Storage::FileSystem::{GetFileType, FILE_TYPE_CHAR, FILE_TYPE_DISK};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, OpenProcess, WaitForSingleObject, PROCESS_DUP_HANDLE, PROCESS_SYNCHRONIZE,
};

use super::windows::{winsock_init, OwnedRaw};
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
                cause: "the process runs as another user, at a higher integrity level, is \
                        protected, or its DACL does not grant it; only an elevated caller with \
                        SeDebugPrivilege may open it regardless"
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
    // Handle values are multiples of 4. The kernel (and Wine) ignore the
    // low two bits, so 4n+1 would silently be handle 4n: refused instead.
    // The value is widened without sign extension, so that no 32-bit value
    // can become a pseudo-handle (-1 is the source process itself).
    if number == 0 || number & 3 != 0 {
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
        // A process that has exited but whose process object is still
        // held somewhere has no handle table any more: Windows answers
        // ERROR_ACCESS_DENIED, Wine ERROR_INVALID_HANDLE. Say it exited.
        if has_exited(pid) {
            return Err(PullError::NoSuchProcess { pid });
        }
        return Err(match e.raw_os_error().map(|c| c as u32) {
            Some(ERROR_INVALID_HANDLE) => PullError::NoSuchHandle { pid, number },
            _ => PullError::Io {
                pid,
                op: "DuplicateHandle",
                source: e,
            },
        });
    }
    drop(process);
    // SAFETY: a fresh handle that nothing else owns.
    let dup = unsafe { OwnedHandle::from_raw_handle(out as _) };
    // SAFETY: the handle is open for the call.
    let ty = unsafe { GetFileType(dup.as_raw_handle() as HANDLE) };
    if ty == FILE_TYPE_DISK || ty == FILE_TYPE_CHAR {
        return Ok(OwnedRaw::Handle(dup));
    }
    winsock_init();
    // A socket this process's Winsock made (WSADuplicateSocketW for this
    // pid, then WSASocketW): the reliable kind. std's socket is borrowed
    // from the duplicate only for the call.
    // SAFETY: `dup` stays owned (and open) by this function; ManuallyDrop
    // keeps the borrowed OwnedSocket from closing it.
    let borrowed = std::mem::ManuallyDrop::new(unsafe {
        OwnedSocket::from_raw_socket(dup.as_raw_handle() as usize as u64)
    });
    match borrowed.try_clone() {
        Ok(socket) => {
            close_raw_socket(dup);
            Ok(OwnedRaw::Socket(socket))
        }
        Err(e) if e.raw_os_error() == Some(WSAENOTSOCK) => Ok(OwnedRaw::Handle(dup)),
        Err(e) => {
            // A socket that a layered provider does not let be duplicated:
            // the raw duplicate is kept, which works with the in-box
            // providers, as a plain handle (kind `Other` or `Pipe`).
            tracing::debug!(pid, number, error = %e, "WSADuplicateSocketW failed; keeping the raw duplicate as a handle");
            Ok(OwnedRaw::Handle(dup))
        }
    }
}

/// Whether process `pid` (which this process holds open, so the pid
/// still names it) has exited. False when it cannot be asked.
fn has_exited(pid: u32) -> bool {
    // SAFETY: no pointers; a null result is checked.
    let h = unsafe { OpenProcess(PROCESS_SYNCHRONIZE, 0, pid) };
    if h.is_null() {
        return false;
    }
    // SAFETY: a fresh process handle that nothing else owns.
    let h = unsafe { OwnedHandle::from_raw_handle(h as _) };
    // SAFETY: the handle is open; a zero timeout only polls.
    unsafe { WaitForSingleObject(h.as_raw_handle() as HANDLE, 0) == WAIT_OBJECT_0 }
}

/// Closes the raw duplicate of a socket once a proper copy is made:
/// `closesocket`, so that Winsock forgets whatever it recorded about the
/// value (Windows adopted it in WSADuplicateSocketW), and `CloseHandle`
/// where Winsock does not take it for one of its sockets (Wine, which
/// then closes nothing).
fn close_raw_socket(dup: OwnedHandle) {
    let raw = dup.into_raw_handle();
    // SAFETY: `raw` is owned here and closed exactly once below.
    unsafe {
        if closesocket(raw as usize) != 0 && WSAGetLastError() == WSAENOTSOCK {
            CloseHandle(raw as HANDLE);
        }
    }
}
