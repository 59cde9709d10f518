//! Helpers the CLI's Windows suites (windows_run.rs, windows_dispatch.rs)
//! share: the examples built next to the tests, bounded polling, and
//! ending or waiting for a process by pid.

#![allow(dead_code)] // each suite uses its own subset

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An example of this package, built by `cargo test` next to the tests
/// (target/.../debug/examples).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(format!("{name}.exe"));
    assert!(
        path.is_file(),
        "{} is missing: run the whole `cargo test`, which builds the examples",
        path.display()
    );
    path
}

/// Polls `f` every 20 ms until it gives a value, for at most `limit`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends process `pid` (TerminateProcess), as a crash would; false if it
/// could not be opened (gone already).
pub fn terminate(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{OpenProcess, TerminateProcess, PROCESS_TERMINATE};
    // SAFETY: opens, terminates and closes a process handle of our own.
    unsafe {
        let h = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if h.is_null() {
            return false;
        }
        TerminateProcess(h, 9);
        CloseHandle(h);
        true
    }
}

/// Whether process `pid` has exited (or is gone) within `timeout`.
pub fn exited_within(pid: u32, timeout: Duration) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, WAIT_OBJECT_0};
    use windows_sys::Win32::System::Threading::{
        OpenProcess, WaitForSingleObject, PROCESS_SYNCHRONIZE,
    };
    // SAFETY: opens, waits on and closes a process handle of our own.
    unsafe {
        let h = OpenProcess(PROCESS_SYNCHRONIZE, 0, pid);
        if h.is_null() {
            return true;
        }
        let r = WaitForSingleObject(h, timeout.as_millis().min(u32::MAX as u128 - 1) as u32);
        CloseHandle(h);
        r == WAIT_OBJECT_0
    }
}
