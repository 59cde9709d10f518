//! Windows: signalling an event and waiting for one, for the stop request
//! a supervisor sends to a program (`handover::windows::StopEvent`).

use std::io;
use std::os::windows::io::{AsRawHandle, BorrowedHandle};
use std::time::Duration;

use windows_sys::Win32::Foundation::{HANDLE, WAIT_OBJECT_0, WAIT_TIMEOUT};
use windows_sys::Win32::System::Threading::{SetEvent, WaitForSingleObject, INFINITE};

/// Sets (signals) a manual-reset event.
pub(crate) fn set_event(event: BorrowedHandle<'_>) -> io::Result<()> {
    // SAFETY: the handle is borrowed, so open for the call.
    if unsafe { SetEvent(event.as_raw_handle() as HANDLE) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `object` is signalled (true) or `timeout` passes (false);
/// None waits for ever. An error when the handle cannot be waited on.
pub(crate) fn wait_event(
    object: BorrowedHandle<'_>,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let ms = match timeout {
        None => INFINITE,
        // Rounded up, so that a short wait is never a zero-time look; and
        // kept below INFINITE.
        Some(t) => t
            .as_nanos()
            .div_ceil(1_000_000)
            .min(u128::from(INFINITE - 1)) as u32,
    };
    // SAFETY: the handle is borrowed, so open for the call.
    match unsafe { WaitForSingleObject(object.as_raw_handle() as HANDLE, ms) } {
        WAIT_OBJECT_0 => Ok(true),
        WAIT_TIMEOUT => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}
