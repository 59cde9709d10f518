//! Windows: who may open handover's named pipes.
//!
//! A named pipe created without security attributes gets the default
//! DACL, which lets Everyone (and anonymous logons) open it for reading:
//! another user on the machine could connect to a listener and be handed
//! sockets. handover's pipes are created with a DACL that grants access to
//! the current user and to SYSTEM only.

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{LocalFree, HANDLE};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{
    GetTokenInformation, TokenUser, PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES, TOKEN_QUERY,
    TOKEN_USER,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

/// A self-relative security descriptor, allocated once for the life of the
/// process and never changed.
struct Descriptor(PSECURITY_DESCRIPTOR);

// SAFETY: the descriptor is immutable after creation and never freed;
// Win32 only reads it.
unsafe impl Send for Descriptor {}
// SAFETY: as above.
unsafe impl Sync for Descriptor {}

/// Security attributes for a pipe only this user (and SYSTEM) may open,
/// not inheritable. The pointer inside stays valid for the whole process.
pub(crate) fn owner_only() -> io::Result<SECURITY_ATTRIBUTES> {
    static DESCRIPTOR: OnceLock<Result<Descriptor, i32>> = OnceLock::new();
    let d = DESCRIPTOR.get_or_init(|| make().map_err(|e| e.raw_os_error().unwrap_or(0)));
    match d {
        Ok(d) => Ok(SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: d.0,
            bInheritHandle: 0,
        }),
        Err(code) => Err(io::Error::from_raw_os_error(*code)),
    }
}

fn make() -> io::Result<Descriptor> {
    let sid = current_user_sid()?;
    // P: protected (nothing inherited from a parent object); GA: generic
    // all; SY: LocalSystem.
    let sddl: Vec<u16> = format!("D:P(A;;GA;;;{sid})(A;;GA;;;SY)")
        .encode_utf16()
        .chain(Some(0))
        .collect();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `sddl` is NUL-terminated UTF-16; `sd` receives a LocalAlloc'd
    // descriptor that we keep for the life of the process.
    let ok = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    } != 0;
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(Descriptor(sd))
}

/// The current process's user SID in string form (S-1-5-…).
fn current_user_sid() -> io::Result<String> {
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: our own process's pseudo-handle; `token` receives a handle.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that nothing else owns.
    let token = unsafe { OwnedHandle::from_raw_handle(token as RawHandle) };
    // TOKEN_USER plus the SID it points into; u64 units keep it aligned.
    let mut buf = vec![0u64; 64];
    let mut len = 0u32;
    // SAFETY: the token is open; `buf` is writable for the length given.
    let ok = unsafe {
        GetTokenInformation(
            token.as_raw_handle() as HANDLE,
            TokenUser,
            buf.as_mut_ptr().cast(),
            (buf.len() * 8) as u32,
            &mut len,
        )
    } != 0;
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: GetTokenInformation filled `buf` with a TOKEN_USER.
    let sid = unsafe { (*(buf.as_ptr() as *const TOKEN_USER)).User.Sid };
    let mut text: *mut u16 = std::ptr::null_mut();
    // SAFETY: `sid` points into `buf`, alive here; `text` receives a
    // LocalAlloc'd string, freed below.
    if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `text` is a NUL-terminated UTF-16 string from the call above.
    let s = unsafe {
        let len = (0..).take_while(|&i| *text.add(i) != 0).count();
        String::from_utf16_lossy(std::slice::from_raw_parts(text, len))
    };
    // SAFETY: allocated by ConvertSidToStringSidW with LocalAlloc.
    unsafe { LocalFree(text.cast()) };
    Ok(s)
}
