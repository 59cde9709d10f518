//! Helpers shared by the Windows integration tests: handle counting that
//! works under Wine, temporary files, anonymous pipes, unique names.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::windows::io::{FromRawHandle, OwnedHandle};
use std::sync::{Mutex, MutexGuard};

use windows_sys::Win32::System::Threading::{GetCurrentProcess, GetProcessHandleCount};

/// Tests that count handles hold this, so that no other test in this
/// binary opens or closes handles meanwhile.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many file, pipe and socket handles this process has open: the
/// kinds these tests move. GetProcessHandleCount would count every handle,
/// but Wine 8 always answers 0 there, so every value a handle can have
/// (multiples of 4) up to 4 * 65536 is asked with GetHandleInformation
/// instead. Handles GetFileType does not know (threads, events), which the
/// test harness and Wine open and close on their own schedule, are not
/// counted.
pub fn handle_count() -> u32 {
    use windows_sys::Win32::Foundation::GetHandleInformation;
    use windows_sys::Win32::Storage::FileSystem::{GetFileType, FILE_TYPE_UNKNOWN};
    let mut reported = 0;
    // SAFETY: the pseudo-handle of this process; `reported` is live.
    unsafe { GetProcessHandleCount(GetCurrentProcess(), &mut reported) };
    let probed = (1..65536usize)
        .filter(|i| {
            let mut flags = 0;
            let h = (i * 4) as _;
            // SAFETY: only asks about a value; nothing is dereferenced.
            unsafe {
                GetHandleInformation(h, &mut flags) != 0 && GetFileType(h) != FILE_TYPE_UNKNOWN
            }
        })
        .count() as u32;
    // Where the OS does report a count (Windows), it must agree in kind.
    if reported != 0 {
        assert!(probed <= reported, "{probed} probed, {reported} reported");
    }
    probed
}

/// Winsock (Wine's ws2_32 at least) keeps handles of its own per process
/// and per thread once sockets are used, such as an event for blocking
/// calls. Using sockets once in this thread before counting keeps those
/// out of the comparison.
pub fn warm_up_winsock() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).unwrap();
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(b"x", u.local_addr().unwrap()).unwrap();
    u.recv_from(&mut one).unwrap();
    let _ = l.try_clone().unwrap();
}

/// Asserts that `body` leaves the process's handle count as it found it.
pub fn no_leak<T>(what: &str, body: impl FnOnce() -> T) -> T {
    warm_up_winsock();
    let before = handle_count();
    let out = body();
    let after = handle_count();
    assert_eq!(
        before, after,
        "{what}: {before} handles before, {after} after"
    );
    out
}

pub fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "handover-test-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn temp_file(contents: &[u8]) -> File {
    let path = std::env::temp_dir().join(unique("file"));
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(contents).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    // Gone once the last handle to it closes.
    let _ = std::fs::remove_file(&path);
    f
}

/// An anonymous pipe: (read end, write end).
pub fn anonymous_pipe() -> (File, File) {
    use windows_sys::Win32::System::Pipes::CreatePipe;
    let (mut r, mut w) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: out-pointers to live handles; no security attributes.
    let ok = unsafe { CreatePipe(&mut r, &mut w, std::ptr::null(), 0) };
    assert_ne!(ok, 0, "CreatePipe: {}", std::io::Error::last_os_error());
    // SAFETY: fresh handles that nothing else owns.
    unsafe {
        (
            File::from(OwnedHandle::from_raw_handle(r)),
            File::from(OwnedHandle::from_raw_handle(w)),
        )
    }
}
