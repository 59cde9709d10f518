//! Shared memory over channels: made, written, sent over a pair and to a
//! child process, mapped and written back by the peer; other handles given
//! back by the conversion; handle counts unchanged. The same tests run on
//! Linux and, under Wine, on Windows (scripts/windows-test.sh); the Linux
//! seal rules have tests of their own.

#[cfg(unix)]
mod common;

use std::io::ErrorKind;
use std::time::Duration;

use handover::{Channel, ChannelListener, Error, Handle, HandleKind, SharedMemory};

/// Not a whole number of pages, so that Windows's rounding shows.
const LEN: usize = 10_000;
const WAIT: Duration = Duration::from_secs(20);
const ROLE: &str = "HANDOVER_TEST_ROLE";
const CHANNEL: &str = "HANDOVER_TEST_CHANNEL";

/// The size a receiver sees: exact on Linux, whole pages on Windows.
fn received_len(len: usize) -> usize {
    if cfg!(windows) {
        len.div_ceil(4096) * 4096
    } else {
        len
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "handover-test-shm-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(unix)]
use common::{open_fds as open_handles, serial};

#[cfg(windows)]
use windows_count::{open_handles, serial};

/// Handle counting on Windows. The counts in windows_channel.rs leave out
/// handles GetFileType does not know, and a section is one of those, so
/// here a handle also counts if a view of it can be mapped.
#[cfg(windows)]
mod windows_count {
    use std::sync::{Mutex, MutexGuard};
    use windows_sys::Win32::Foundation::{GetHandleInformation, HANDLE};
    use windows_sys::Win32::Storage::FileSystem::{GetFileType, FILE_TYPE_UNKNOWN};
    use windows_sys::Win32::System::Memory::{MapViewOfFile, UnmapViewOfFile, FILE_MAP_READ};

    pub fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// File, pipe, socket and section handles: every value a handle can
    /// have (multiples of 4) is asked about, as GetProcessHandleCount
    /// answers 0 under Wine.
    pub fn open_handles() -> usize {
        (1..65536usize)
            .filter(|i| {
                let h = (i * 4) as HANDLE;
                let mut flags = 0;
                // SAFETY: only asks about a value; nothing is dereferenced.
                unsafe {
                    GetHandleInformation(h, &mut flags) != 0
                        && (GetFileType(h) != FILE_TYPE_UNKNOWN || is_section(h))
                }
            })
            .count()
    }

    fn is_section(h: HANDLE) -> bool {
        // SAFETY: maps one byte (one page) of whatever `h` is, if it is a
        // section at all, and unmaps it at once.
        unsafe {
            let view = MapViewOfFile(h, FILE_MAP_READ, 0, 0, 1);
            if view.Value.is_null() {
                return false;
            }
            UnmapViewOfFile(view);
            true
        }
    }
}

/// Asserts that `body` leaves the handle count as it found it.
fn no_leak<T>(what: &str, body: impl FnOnce() -> T) -> T {
    let before = open_handles();
    let out = body();
    let after = open_handles();
    assert_eq!(
        before, after,
        "{what}: {before} handles before, {after} after"
    );
    out
}

#[test]
fn create_map_write_read() {
    let _g = serial();
    let shm = SharedMemory::create("create-map", LEN).unwrap();
    assert_eq!(shm.len(), LEN);
    let a = shm.map().unwrap();
    let b = shm.map().unwrap();
    assert_eq!(a.len(), LEN);
    assert_ne!(a.as_ptr(), b.as_ptr(), "two views");

    // Fresh memory is zero; a write through one view shows in the other.
    let mut buf = vec![1u8; LEN];
    b.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    a.write_at(0, &pattern(LEN)).unwrap();
    b.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(LEN));
    a.write_at(LEN - 3, b"end").unwrap();
    let mut end = [0u8; 3];
    b.read_at(LEN - 3, &mut end).unwrap();
    assert_eq!(&end, b"end");
    // SAFETY: nothing writes to this memory while the slice lives.
    assert_eq!(&unsafe { b.as_slice() }[LEN - 3..], b"end");

    // Out of bounds: an error, and nothing copied.
    let err = a.write_at(LEN - 2, b"xyz").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    b.read_at(LEN - 3, &mut end).unwrap();
    assert_eq!(&end, b"end");
    assert_eq!(
        a.read_at(usize::MAX, &mut [0u8; 2]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert!(a.read_at(LEN + 1, &mut []).is_err());
    a.read_at(LEN, &mut []).unwrap();

    // A clone is the same memory.
    let c = shm.try_clone().unwrap().map().unwrap();
    c.read_at(LEN - 3, &mut end).unwrap();
    assert_eq!(&end, b"end");

    assert!(matches!(
        SharedMemory::create("empty", 0),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn counts_see_shared_memory() {
    let _g = serial();
    let before = open_handles();
    let shm = SharedMemory::create("counted", LEN).unwrap();
    assert_eq!(open_handles(), before + 1);
    let map = shm.map().unwrap();
    drop(shm);
    // The mapping keeps the memory, not a handle.
    assert_eq!(open_handles(), before);
    map.write_at(0, b"still mapped").unwrap();
}

#[test]
fn over_a_pair() {
    let _g = serial();
    no_leak("shared memory over a pair", || {
        let (a, b) = Channel::pair().unwrap();
        let shm = SharedMemory::create("pair", LEN).unwrap();
        let mine = shm.map().unwrap();
        mine.write_at(0, &pattern(LEN)).unwrap();
        a.send(b"look", &[Handle::from(shm).with_name("shm")])
            .unwrap();

        let mut m = b.recv_timeout(WAIT).unwrap().unwrap();
        let h = m.take("shm").unwrap();
        assert_eq!(h.kind(), HandleKind::SharedMemory);
        let theirs = h.into_shared_memory().unwrap();
        assert_eq!(theirs.len(), received_len(LEN));
        let view = theirs.map().unwrap();
        let mut buf = vec![0u8; LEN];
        view.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, pattern(LEN));
        view.write_at(100, b"written back").unwrap();

        let mut back = [0u8; 12];
        mine.read_at(100, &mut back).unwrap();
        assert_eq!(&back, b"written back");
    });
}

// --- a child process -------------------------------------------------

/// The child's part: map what the parent sends, check every byte, write
/// an answer into the memory, and say so.
fn child_maps_and_answers() {
    let name = std::env::var(CHANNEL).unwrap();
    let ch = Channel::connect_name_timeout(&name, WAIT).unwrap();
    let mut m = ch.recv_timeout(WAIT).unwrap().unwrap();
    let h = m.take("shm").unwrap();
    assert_eq!(h.kind(), HandleKind::SharedMemory);
    let shm = h.into_shared_memory().unwrap();
    assert_eq!(shm.len(), received_len(LEN));
    let view = shm.map().unwrap();
    let mut buf = vec![0u8; LEN];
    view.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(LEN));
    let answer = format!("from pid {}", std::process::id());
    view.write_at(LEN - answer.len(), answer.as_bytes())
        .unwrap();
    ch.send(&(answer.len() as u32).to_le_bytes(), &[]).unwrap();
}

#[test]
fn to_a_child_process() {
    if std::env::var(ROLE).as_deref() == Ok("child") {
        child_maps_and_answers();
        return;
    }
    let _g = serial();
    no_leak("shared memory to a child", || {
        let name = unique("child");
        let channels = ChannelListener::bind_name(&name).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "to_a_child_process", "--nocapture"])
            .args(["--test-threads=1"])
            .env(ROLE, "child")
            .env(CHANNEL, &name)
            .spawn()
            .unwrap();
        let ch = channels.accept_timeout(WAIT).unwrap();

        let shm = SharedMemory::create("child", LEN).unwrap();
        let mine = shm.map().unwrap();
        mine.write_at(0, &pattern(LEN)).unwrap();
        ch.send(b"", &[Handle::from(shm).with_name("shm")]).unwrap();

        let m = ch.recv_timeout(WAIT).unwrap().unwrap();
        let n = u32::from_le_bytes(m.bytes[..4].try_into().unwrap()) as usize;
        let mut answer = vec![0u8; n];
        mine.read_at(LEN - n, &mut answer).unwrap();
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            format!("from pid {}", child.id())
        );
        assert!(child.wait().unwrap().success());
    });
}

// --- other handles ---------------------------------------------------

/// Asserts that `h` does not convert, and returns it.
fn refused(h: Handle, found: HandleKind) -> Handle {
    let err = h.into_shared_memory().unwrap_err();
    assert_eq!(err.expected(), "shared memory");
    assert_eq!(err.found(), Ok(found), "{err}");
    err.into_handle()
}

#[test]
fn other_handles_are_given_back() {
    let _g = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = Handle::from(listener);
    let kind = h.detect_kind().unwrap();
    let back = refused(h, kind).into_tcp_listener().unwrap();
    assert_eq!(back.local_addr().unwrap().port(), port);

    let (a, _b) = Channel::pair().unwrap();
    let h = Handle::from(a);
    let kind = h.detect_kind().unwrap();
    refused(h, kind).into_channel().unwrap();

    #[cfg(unix)]
    {
        let (r, _w) = common::pipe();
        refused(Handle::from(r), HandleKind::Pipe);
        let dir = std::fs::File::open(".").unwrap();
        refused(Handle::from(dir), HandleKind::Directory);
    }
    #[cfg(windows)]
    {
        let path = std::env::temp_dir().join(unique("file"));
        let file = std::fs::File::create(&path).unwrap();
        refused(Handle::from(file), HandleKind::File)
            .into_file()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        refused(Handle::from(windows_event()), HandleKind::Other);
    }
}

#[cfg(windows)]
fn windows_event() -> std::os::windows::io::OwnedHandle {
    use std::os::windows::io::FromRawHandle;
    use windows_sys::Win32::System::Threading::CreateEventW;
    // SAFETY: an unnamed event with default security.
    let h = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
    assert!(!h.is_null());
    // SAFETY: a fresh handle that nothing else owns.
    unsafe { std::os::windows::io::OwnedHandle::from_raw_handle(h) }
}

// --- Linux seals -----------------------------------------------------

#[cfg(unix)]
mod seals {
    use super::*;
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::os::fd::OwnedFd;

    fn memfd(flags: MemfdFlags, len: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("foreign", MemfdFlags::CLOEXEC | flags).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    /// Memory made here keeps its size: neither end can shrink it under
    /// the other's mapping, nor grow it past what `len` says.
    #[test]
    fn created_memory_is_sealed_at_its_size() {
        let _g = serial();
        let shm = SharedMemory::create("sealed", LEN).unwrap();
        let map = shm.map().unwrap();
        let file = Handle::from(shm).into_file().unwrap();
        assert!(file.set_len(LEN as u64 / 2).is_err());
        assert!(file.set_len(LEN as u64 * 2).is_err());
        assert_eq!(file.metadata().unwrap().len(), LEN as u64);
        map.write_at(LEN - 1, b"!").unwrap();
    }

    /// A memfd made elsewhere without seals is sealed against shrinking
    /// when it is mapped.
    #[test]
    fn unsealed_memfds_are_sealed_when_mapped() {
        let _g = serial();
        let fd = memfd(MemfdFlags::ALLOW_SEALING, 8192);
        let probe = fd.try_clone().unwrap();
        let shm = Handle::from(fd).into_shared_memory().unwrap();
        assert_eq!(shm.len(), 8192);
        assert!(!rustix::fs::fcntl_get_seals(&probe)
            .unwrap()
            .contains(SealFlags::SHRINK));
        let map = shm.map().unwrap();
        assert!(rustix::fs::fcntl_get_seals(&probe)
            .unwrap()
            .contains(SealFlags::SHRINK));
        assert!(rustix::fs::ftruncate(&probe, 100).is_err());
        map.write_at(8191, b"!").unwrap();
    }

    /// A memfd that cannot take the seal converts but does not map.
    #[test]
    fn unsealable_memfds_do_not_map() {
        let _g = serial();
        let fd = memfd(MemfdFlags::empty(), 4096);
        let shm = Handle::from(fd).into_shared_memory().unwrap();
        match shm.map() {
            Err(Error::Io { op, source }) => {
                assert_eq!(op, "map shared memory");
                assert!(source.to_string().contains("F_SEAL_SHRINK"), "{source}");
            }
            other => panic!("expected a map error, got {other:?}"),
        }
    }

    /// An empty memfd converts (its size is 0) but has nothing to map.
    #[test]
    fn empty_memfds_do_not_map() {
        let _g = serial();
        let shm = Handle::from(memfd(MemfdFlags::ALLOW_SEALING, 0))
            .into_shared_memory()
            .unwrap();
        assert!(shm.is_empty());
        assert!(shm.map().is_err());
    }
}
