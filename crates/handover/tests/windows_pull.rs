//! `handover::pull` on Windows, like tests/pull.rs on Linux: this test
//! binary run again as a target that opens a TCP listener, a file, an
//! anonymous pipe and a section (shared memory) and prints their handle
//! values; the test pulls each by (pid, value) and uses it. Errors: a pid
//! that does not exist, a process that has exited, values that are not
//! open handles there (never a panic, nothing left open), and a target
//! whose DACL refuses PROCESS_DUP_HANDLE. Handle counts are checked
//! around every call.
//!
//! Every wait is bounded, and every target is killed when its test ends,
//! failed or not: an orphaned Windows process makes `wine` wait forever.
//!
//! Run under Wine by scripts/windows-test.sh.

#![cfg(windows)]

mod windows_common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::windows::io::{AsRawHandle, AsRawSocket};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use handover::windows::HandleExt;
use handover::{HandleKind, PullError, SocketFamily, SocketInfo, SocketType};
use windows_common::*;
use windows_sys::Win32::Foundation::{GetHandleInformation, HANDLE_FLAG_INHERIT};

const WAIT: Duration = Duration::from_secs(20);
const ROLE: &str = "HANDOVER_TEST_ROLE";
const FILE_TEXT: &[u8] = b"written by the target into its file";
const PIPE_TEXT: &[u8] = b"through the target's pipe";
const SHM_TEXT: &[u8] = b"in the target's memory";

// --- the target process ------------------------------------------------

/// What a target printed once its handles were open; killed when dropped.
struct Target {
    child: Child,
    pid: u32,
    listener: u32,
    file: u32,
    pipe_read: u32,
    pipe_write: u32,
    section: u32,
    port: u16,
}

impl Target {
    /// Starts this binary as `role` and waits (bounded) for its `ready`
    /// line.
    fn start(role: &str) -> Target {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the target");
        let out = child.stdout.take().unwrap();
        let pid = child.id();
        // The target is killed by `Guard` if it never says ready.
        let guard = Guard(Some(child));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            loop {
                line.clear();
                if out.read_line(&mut line).unwrap_or(0) == 0 {
                    let _ = tx.send(None);
                    return;
                }
                // The harness's `test child_entry ... ` may come first.
                if let Some(at) = line.find("ready ") {
                    let _ = tx.send(Some(line[at + 6..].trim().to_owned()));
                    break;
                }
            }
            // Keep reading until the target ends, so that it never blocks
            // on a full stdout. Not `read_to_end`: std reads a child's
            // (overlapped) pipe synchronously there, which aborts the
            // process when the read is pending.
            let mut buf = [0u8; 512];
            while matches!(out.read(&mut buf), Ok(n) if n > 0) {}
        });
        let ready = rx
            .recv_timeout(WAIT)
            .expect("the target did not say ready in time")
            .expect("the target exited before it was ready");
        let n: Vec<u32> = ready.split(' ').map(|n| n.parse().unwrap()).collect();
        Target {
            child: guard.take(),
            pid,
            listener: n[0],
            file: n[1],
            pipe_read: n[2],
            pipe_write: n[3],
            section: n[4],
            port: n[5] as u16,
        }
    }

    /// Kills the target and waits for it to end, keeping its process
    /// handle (so the pid is not reused while this value lives).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a child not yet handed on.
struct Guard(Option<Child>);

impl Guard {
    fn take(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The roles this binary is started in.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "target" => target(false),
        "guarded" => target(true),
        other => panic!("unknown role {other}"),
    }
}

/// Opens a listener, a file with text in it, a pipe with text in it and
/// a section with text in it; prints `ready LISTENER FILE PIPE_R PIPE_W
/// SECTION PORT` and waits for end of input (or at most a minute: the
/// test kills it anyway). With `guarded`, first gives its own process an
/// empty DACL, so that no one may open it for PROCESS_DUP_HANDLE.
fn target(guarded: bool) {
    if guarded {
        deny_everyone();
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let file = temp_file(FILE_TEXT);
    let (r, mut w) = anonymous_pipe();
    w.write_all(PIPE_TEXT).unwrap();
    let shm = handover::SharedMemory::create("pulled", 4096).unwrap();
    let map = shm.map().unwrap();
    map.write_at(0, SHM_TEXT).unwrap();
    let shm = handover::Handle::from(shm);
    println!(
        "ready {} {} {} {} {} {}",
        listener.as_raw_socket(),
        file.as_raw_handle() as usize,
        r.as_raw_handle() as usize,
        w.as_raw_handle() as usize,
        shm.as_handle().unwrap().as_raw_handle() as usize,
        listener.local_addr().unwrap().port()
    );
    std::io::stdout().flush().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(60));
    drop((listener, file, r, w, shm, map));
}

/// Replaces this process's DACL by an empty one: every access not
/// implied by ownership is denied, PROCESS_DUP_HANDLE included.
fn deny_everyone() {
    use windows_sys::Win32::Security::Authorization::{SetSecurityInfo, SE_KERNEL_OBJECT};
    use windows_sys::Win32::Security::{
        InitializeAcl, ACL, ACL_REVISION, DACL_SECURITY_INFORMATION,
    };
    use windows_sys::Win32::System::Threading::GetCurrentProcess;
    // SAFETY: plain data, initialised by InitializeAcl.
    let mut acl: ACL = unsafe { std::mem::zeroed() };
    // SAFETY: `acl` is live and as large as the size given.
    let ok = unsafe { InitializeAcl(&mut acl, std::mem::size_of::<ACL>() as u32, ACL_REVISION) };
    assert_ne!(ok, 0, "InitializeAcl: {}", std::io::Error::last_os_error());
    // SAFETY: the pseudo-handle of this process; `acl` lives for the call.
    let rc = unsafe {
        SetSecurityInfo(
            GetCurrentProcess(),
            SE_KERNEL_OBJECT,
            DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &acl,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "SetSecurityInfo: error {rc}");
}

/// Whether a handle of this process is marked inheritable.
fn inheritable(raw: usize) -> bool {
    let mut flags = 0;
    // SAFETY: only asks about a value; `flags` is live.
    let ok = unsafe { GetHandleInformation(raw as _, &mut flags) };
    assert_ne!(
        ok,
        0,
        "GetHandleInformation: {}",
        std::io::Error::last_os_error()
    );
    flags & HANDLE_FLAG_INHERIT != 0
}

// --- pulling and using -------------------------------------------------

#[test]
fn a_listener_is_pulled_and_accepts_a_connection() {
    let _guard = serial();
    let t = Target::start("target");
    // The target never accepts, so the connection made here can only be
    // accepted through the pulled copy.
    no_leak("pulling and using a listener", || {
        let h = handover::pull(t.pid, t.listener).unwrap();
        assert_eq!(
            h.kind(),
            HandleKind::Socket(SocketInfo {
                family: SocketFamily::Ipv4,
                socket_type: SocketType::Stream,
                listening: true,
            })
        );
        assert!(h.name().is_none());
        assert!(!inheritable(
            h.as_socket().expect("pulled as a socket").as_raw_socket() as usize
        ));
        let listener = h.into_tcp_listener().unwrap();
        assert_eq!(listener.local_addr().unwrap().port(), t.port);
        let mut client =
            TcpStream::connect_timeout(&([127, 0, 0, 1], t.port).into(), WAIT).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        // A bounded accept: non-blocking, polled.
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let (mut server, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no connection accepted"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept through the pulled listener: {e}"),
            }
        };
        assert_eq!(peer, client.local_addr().unwrap());
        server.set_nonblocking(false).unwrap();
        server.set_read_timeout(Some(WAIT)).unwrap();
        client.write_all(b"to the puller").unwrap();
        let mut buf = [0u8; 13];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to the puller");
        server.write_all(b"accepted by the puller").unwrap();
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "accepted by the puller");
    });
}

#[test]
fn a_file_is_pulled_and_read() {
    let _guard = serial();
    let t = Target::start("target");
    no_leak("pulling and reading a file", || {
        let h = handover::pull(t.pid, t.file).unwrap();
        assert_eq!(h.kind(), HandleKind::File);
        assert!(!inheritable(
            h.as_handle().expect("pulled as a handle").as_raw_handle() as usize
        ));
        let mut f = h.into_file().unwrap();
        // The same open file: its position is the target's, at 0.
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, FILE_TEXT);
        // Written here, read back through a second pull.
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"WRITTEN").unwrap();
        drop(f);
        let mut again = handover::pull(t.pid, t.file).unwrap().into_file().unwrap();
        again.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        again.read_to_end(&mut got).unwrap();
        assert!(got.starts_with(b"WRITTEN by the target"), "{got:?}");
    });
}

#[test]
fn both_ends_of_a_pipe_are_pulled_and_carry_bytes() {
    let _guard = serial();
    let t = Target::start("target");
    no_leak("pulling and using a pipe", || {
        let r = handover::pull(t.pid, t.pipe_read).unwrap();
        assert_eq!(r.kind(), HandleKind::Pipe);
        let w = handover::pull(t.pid, t.pipe_write).unwrap();
        assert_eq!(w.kind(), HandleKind::Pipe);
        let mut r = std::fs::File::from(r.into_owned_handle().unwrap());
        let mut w = std::fs::File::from(w.into_owned_handle().unwrap());
        // What the target wrote before it said ready (the pipe's buffer
        // holds it; reading exactly that much never blocks).
        let mut buf = vec![0u8; PIPE_TEXT.len()];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(buf, PIPE_TEXT);
        // Bytes written through the pulled write end come out of the
        // pulled read end.
        w.write_all(b"from the puller").unwrap();
        let mut buf = [0u8; 15];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from the puller");
    });
}

#[test]
fn a_section_is_pulled_and_mapped() {
    let _guard = serial();
    let t = Target::start("target");
    no_leak("pulling and mapping a section", || {
        let h = handover::pull(t.pid, t.section).unwrap();
        // Sections are not told apart from other kernel objects: Windows
        // says FILE_TYPE_UNKNOWN (kind Other); Wine says FILE_TYPE_DISK.
        assert!(
            matches!(h.kind(), HandleKind::Other | HandleKind::File),
            "{:?}",
            h.kind()
        );
        let shm = h.into_shared_memory().unwrap();
        assert_eq!(shm.len(), 4096);
        let map = shm.map().unwrap();
        let mut buf = vec![0u8; SHM_TEXT.len()];
        map.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, SHM_TEXT);
    });
}

// --- errors ------------------------------------------------------------

/// The pid of a process that has ended and whose last handle is closed.
fn gone_pid() -> u32 {
    let mut gone = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--test-threads=1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = gone.id();
    let _ = gone.kill();
    gone.wait().unwrap();
    drop(gone);
    pid
}

#[test]
fn a_pid_that_does_not_exist_is_named() {
    let _guard = serial();
    let gone = gone_pid();
    no_leak("pulling from no process", || {
        for pid in [gone, 0xffff_fff0] {
            let e = handover::pull(pid, 4).unwrap_err();
            assert!(
                matches!(e, PullError::NoSuchProcess { pid: p } if p == pid),
                "{pid}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("no process {pid}: it does not exist or has exited")
            );
        }
    });
}

#[test]
fn an_exited_process_is_named() {
    let _guard = serial();
    let mut t = Target::start("target");
    // The process object lives on (this test holds its handle), but its
    // handle table is gone.
    t.kill();
    no_leak("pulling from an exited process", || {
        let e = handover::pull(t.pid, t.listener).unwrap_err();
        assert!(
            matches!(e, PullError::NoSuchProcess { pid } if pid == t.pid),
            "{e:?}"
        );
    });
}

#[test]
fn values_that_are_not_open_handles_are_named() {
    let _guard = serial();
    let t = Target::start("target");
    no_leak("pulling values that are not handles", || {
        // 0, values far above any table, the pseudo-handles cut to 32 bits
        // (-1 the process, -2 the thread, -4 the process token), the high
        // bit, and values whose low two bits are set: the kernel ignores
        // those bits, so listener + 1 would silently be the listener.
        for number in [
            0,
            0x00ff_fffc,
            0x3fff_fffc,
            u32::MAX,
            u32::MAX - 1,
            u32::MAX - 3,
            0x8000_0000,
            t.listener + 1,
            t.file + 2,
            t.pipe_read + 3,
        ] {
            let e = handover::pull(t.pid, number).unwrap_err();
            assert!(
                matches!(e, PullError::NoSuchHandle { pid, number: n } if pid == t.pid && n == number),
                "{number:#x}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("process {} has no open handle {number}", t.pid)
            );
        }
    });
    // The target still has its listener.
    TcpStream::connect_timeout(&([127, 0, 0, 1], t.port).into(), WAIT).unwrap();
}

#[test]
fn closing_a_pulled_copy_leaves_the_target_its_handle() {
    let _guard = serial();
    let t = Target::start("target");
    // The copy is closed here; the target's handle is still there to be
    // pulled again.
    no_leak("pulling, closing, pulling again", || {
        let first = handover::pull(t.pid, t.file).unwrap();
        drop(first);
        let mut f = handover::pull(t.pid, t.file).unwrap().into_file().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got.ends_with(b"by the target into its file"), "{got:?}");
    });
}

#[test]
fn a_target_that_denies_process_dup_handle_is_refused_by_name() {
    let _guard = serial();
    let t = Target::start("guarded");
    no_leak("pulling from a guarded process", || {
        let e = handover::pull(t.pid, t.listener).unwrap_err();
        match &e {
            PullError::PermissionDenied {
                pid, permission, ..
            } => {
                assert_eq!(*pid, t.pid);
                assert_eq!(*permission, "PROCESS_DUP_HANDLE");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let said = e.to_string();
        assert!(
            said.starts_with(&format!(
                "PROCESS_DUP_HANDLE access to process {} denied: ",
                t.pid
            )),
            "{said}"
        );
    });
}

#[test]
fn this_process_can_pull_its_own_handles() {
    let _guard = serial();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    no_leak("pulling from this process", || {
        let h = handover::pull(std::process::id(), l.as_raw_socket() as u32).unwrap();
        let copy = h.into_tcp_listener().unwrap();
        assert_eq!(copy.local_addr().unwrap(), l.local_addr().unwrap());
    });
}

#[test]
fn handle_numbers_lists_a_targets_handles() {
    let _guard = serial();
    let mut t = Target::start("target");
    no_leak("listing", || {
        let numbers = handover::handle_numbers(t.pid).unwrap();
        for h in [t.listener, t.file, t.pipe_read, t.pipe_write, t.section] {
            assert!(numbers.contains(&h), "{h:#x} not in {numbers:?}");
        }
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert!(numbers.iter().all(|n| n % 4 == 0), "{numbers:?}");
    });
    // Exited, its process object still held by this test: no handles.
    t.kill();
    let e = handover::handle_numbers(t.pid).unwrap_err();
    assert!(
        matches!(e, PullError::NoSuchProcess { pid } if pid == t.pid),
        "{e:?}"
    );
    let e = handover::handle_numbers(gone_pid()).unwrap_err();
    assert!(matches!(e, PullError::NoSuchProcess { .. }), "{e:?}");
}
