//! Windows: which handle values another process has open, read from the
//! system's handle table (`NtQuerySystemInformation` with
//! `SystemExtendedHandleInformation`). That class is not in the Windows
//! SDK's headers but has been stable since Windows XP; Wine implements it
//! from its server's handle tables. Its entries name the owning process
//! and the value, which is all [`handle_numbers`] takes from them.

use std::ffi::c_void;
use std::io;
use std::mem::size_of;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};

use windows_sys::Wdk::System::SystemInformation::{
    NtQuerySystemInformation, SYSTEM_INFORMATION_CLASS,
};
use windows_sys::Win32::Foundation::{ERROR_INVALID_PARAMETER, HANDLE, WAIT_OBJECT_0};
use windows_sys::Win32::System::Threading::{
    OpenProcess, WaitForSingleObject, PROCESS_SYNCHRONIZE,
};

use crate::pull::PullError;

/// `SystemExtendedHandleInformation`: pids and handle values as full
/// pointer-sized integers (the older class 16 truncates both to 16 bits).
const SYSTEM_EXTENDED_HANDLE_INFORMATION: SYSTEM_INFORMATION_CLASS = 64;
const STATUS_INFO_LENGTH_MISMATCH: i32 = 0xC000_0004_u32 as i32;

/// The table's header, `SYSTEM_HANDLE_INFORMATION_EX`.
#[repr(C)]
struct TableHeader {
    count: usize,
    _reserved: usize,
}

/// One entry, `SYSTEM_HANDLE_TABLE_ENTRY_INFO_EX`.
#[repr(C)]
struct TableEntry {
    _object: *mut c_void,
    pid: usize,
    value: usize,
    _granted_access: u32,
    _creator_back_trace_index: u16,
    _object_type_index: u16,
    _attributes: u32,
    _reserved: u32,
}

/// The table grows between calls; it is asked for again with more room,
/// up to this much (a system with millions of handles is refused, not
/// allowed to take gigabytes).
const MAX_TABLE_BYTES: usize = 512 << 20;

/// The handle values process `pid` has open, in increasing order.
pub(crate) fn handle_numbers(pid: u32) -> Result<Vec<u32>, PullError> {
    // The table is the whole system's: a pid with no process would just
    // have no entries. Whether it exists is asked first: a pid that names
    // no process, or a process that has exited (still held open by
    // someone, so its pid is not reused yet), has no handles to list.
    // Access to it may be refused, which says it exists.
    // SAFETY: no pointers; a non-null result is owned below.
    let process = unsafe { OpenProcess(PROCESS_SYNCHRONIZE, 0, pid) };
    if process.is_null() {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(ERROR_INVALID_PARAMETER as i32) {
            return Err(PullError::NoSuchProcess { pid });
        }
    } else {
        // SAFETY: a fresh process handle that nothing else owns.
        let process = unsafe { OwnedHandle::from_raw_handle(process as _) };
        // SAFETY: the handle is open; a zero timeout only polls.
        let exited =
            unsafe { WaitForSingleObject(process.as_raw_handle() as HANDLE, 0) == WAIT_OBJECT_0 };
        if exited {
            return Err(PullError::NoSuchProcess { pid });
        }
    }
    let mut words = 1usize << 17; // 1 MiB of usize, aligned for the entries
    let table = loop {
        let mut buf = vec![0usize; words];
        let bytes = u32::try_from(words * size_of::<usize>()).unwrap_or(u32::MAX);
        let mut needed = 0u32;
        // SAFETY: the buffer is `bytes` long, writable and aligned for the
        // table; `needed` is a live u32.
        let status = unsafe {
            NtQuerySystemInformation(
                SYSTEM_EXTENDED_HANDLE_INFORMATION,
                buf.as_mut_ptr().cast(),
                bytes,
                &mut needed,
            )
        };
        if status == STATUS_INFO_LENGTH_MISMATCH {
            let want = (needed as usize).max(words * size_of::<usize>() * 2);
            if want > MAX_TABLE_BYTES {
                return Err(io_error(
                    pid,
                    io::Error::other("the system's handle table is larger than 512 MiB"),
                ));
            }
            // Room for the handles opened before the next call.
            words = want.div_ceil(size_of::<usize>()) + (64 << 10) / size_of::<usize>();
            continue;
        }
        if status < 0 {
            return Err(io_error(
                pid,
                io::Error::other(format!("NTSTATUS {:#010x}", status as u32)),
            ));
        }
        let filled = (needed as usize).min(words * size_of::<usize>());
        break (buf, filled);
    };
    let (buf, filled) = table;
    Ok(numbers_in(&buf, filled, pid))
}

/// The values of `pid`'s entries in a table of `filled` bytes. The count
/// in the header is believed only as far as the bytes go.
fn numbers_in(buf: &[usize], filled: usize, pid: u32) -> Vec<u32> {
    let header = size_of::<TableHeader>();
    if filled < header {
        return Vec::new();
    }
    let fit = (filled - header) / size_of::<TableEntry>();
    let count = buf[0].min(fit);
    // SAFETY: the entries start right after the header, which is 16 bytes
    // (a multiple of the entries' alignment, 8) into a buffer of usize;
    // `count` entries fit in the `filled` bytes the call wrote.
    let entries = unsafe {
        std::slice::from_raw_parts(
            buf.as_ptr().cast::<u8>().add(header).cast::<TableEntry>(),
            count,
        )
    };
    let mut numbers: Vec<u32> = entries
        .iter()
        .filter(|e| e.pid == pid as usize)
        // Handle values have 32 significant bits (they are shared with
        // 32-bit processes), so a wider one is not a handle `pull` takes.
        .filter_map(|e| u32::try_from(e.value).ok())
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers
}

fn io_error(pid: u32, source: io::Error) -> PullError {
    PullError::Io {
        pid,
        op: "NtQuerySystemInformation(SystemExtendedHandleInformation)",
        source,
    }
}
