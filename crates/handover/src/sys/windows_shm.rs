//! Windows shared memory: sections backed by the paging file.
//!
//! GetFileType cannot tell a section from an event or a thread, so a
//! handle counts as shared memory when a view of it can be mapped. A
//! section's exact size is only available through the undocumented
//! NtQuerySection, so the size of a received one is that of a view of the
//! whole of it, from VirtualQuery: the size rounded up to the page size.

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::ptr::NonNull;

use windows_sys::Win32::Foundation::{ERROR_INVALID_HANDLE, HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::System::Memory::{
    CreateFileMappingW, MapViewOfFile, UnmapViewOfFile, VirtualQuery, FILE_MAP, FILE_MAP_READ,
    FILE_MAP_WRITE, MEMORY_BASIC_INFORMATION, MEMORY_MAPPED_VIEW_ADDRESS, MEM_COMMIT,
    PAGE_READWRITE,
};

use super::OwnedRaw;
use crate::handle::HandleKind;

/// A new section of `len` bytes (zeroes), committed from the paging file.
/// It has no name, so it is reachable only through its handles, and the
/// handle is not inheritable. `_name` is for Linux, where it shows in
/// /proc; Windows has nowhere to put it that is not a global namespace.
pub(crate) fn create_shared_memory(_name: &str, len: usize) -> io::Result<OwnedRaw> {
    let size = len as u64;
    // SAFETY: no file (INVALID_HANDLE_VALUE: the paging file), no security
    // attributes (not inheritable), no name.
    let h = unsafe {
        CreateFileMappingW(
            INVALID_HANDLE_VALUE,
            std::ptr::null(),
            PAGE_READWRITE,
            (size >> 32) as u32,
            size as u32,
            std::ptr::null(),
        )
    };
    if h.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that nothing else owns.
    Ok(OwnedRaw::Handle(unsafe { OwnedHandle::from_raw_handle(h) }))
}

/// The size of a section (whole pages), or what the handle is instead.
pub(crate) fn shared_memory_len(
    raw_handle: &OwnedRaw,
) -> Result<usize, Result<HandleKind, io::ErrorKind>> {
    let h = match raw_handle {
        OwnedRaw::Handle(h) => h,
        OwnedRaw::Socket(_) => return Err(super::detect_kind(raw_handle).map_err(|e| e.kind())),
    };
    let view = match map(h, FILE_MAP_READ, 0) {
        Ok(view) => view,
        Err(e) => {
            // Not a section: say what it is. A section that cannot be
            // mapped (no access, …): say why.
            let kind = super::detect_kind(raw_handle).map_err(|e| e.kind());
            return Err(match kind {
                Ok(HandleKind::Other) if e.raw_os_error() != Some(ERROR_INVALID_HANDLE as i32) => {
                    Err(e.kind())
                }
                kind => kind,
            });
        }
    };
    Ok(view.len)
}

/// A read-write view of a section, unmapped on drop.
#[derive(Debug)]
pub(crate) struct View {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the view is plain memory owned by this value; every access goes
// through raw pointers, never through references that assume exclusivity.
unsafe impl Send for View {}
// SAFETY: as above.
unsafe impl Sync for View {}

impl View {
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let address = MEMORY_MAPPED_VIEW_ADDRESS {
            Value: self.ptr.as_ptr().cast(),
        };
        // SAFETY: the base address MapViewOfFile returned, unmapped once.
        unsafe { UnmapViewOfFile(address) };
    }
}

/// Maps the first `len` bytes of a section, read-write.
pub(crate) fn map_shared_memory(raw_handle: &OwnedRaw, len: usize) -> io::Result<View> {
    let OwnedRaw::Handle(h) = raw_handle else {
        return Err(io::Error::from_raw_os_error(ERROR_INVALID_HANDLE as i32));
    };
    if len == 0 {
        // MapViewOfFile would take 0 as "all of it".
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut view = map(h, FILE_MAP_READ | FILE_MAP_WRITE, len)?;
    if view.len < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the section is smaller than its recorded length",
        ));
    }
    view.len = len;
    Ok(view)
}

/// Maps `len` bytes (0: all) and measures the view. Only committed memory
/// counts: a reserved, uncommitted page would fault when touched.
fn map(h: &OwnedHandle, access: FILE_MAP, len: usize) -> io::Result<View> {
    // SAFETY: the handle is open for the call; the system picks the address.
    let address = unsafe { MapViewOfFile(h.as_raw_handle() as HANDLE, access, 0, 0, len) };
    let ptr = NonNull::new(address.Value.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
    // Unmapped on every path from here, including the errors below.
    let mut view = View { ptr, len: 0 };
    // SAFETY: plain data, filled in by the call.
    let mut info: MEMORY_BASIC_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: `ptr` is the base of the live view; `info` is writable.
    let n = unsafe {
        VirtualQuery(
            ptr.as_ptr().cast(),
            &mut info,
            std::mem::size_of::<MEMORY_BASIC_INFORMATION>(),
        )
    };
    if n == 0 {
        return Err(io::Error::last_os_error());
    }
    if info.State != MEM_COMMIT {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the section's memory is reserved but not committed",
        ));
    }
    view.len = info.RegionSize;
    Ok(view)
}
