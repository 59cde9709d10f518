//! `handover::pull` against real processes: this test binary run again as
//! a target that opens a TCP listener, a pipe and a memfd and prints their
//! numbers; the test pulls each and uses it. Errors: a reaped pid, a
//! descriptor that is not open, and ptrace refusals seen by a puller
//! running as uid 65534 (against a root target, and against a target of
//! its own uid that made itself non-dumpable). Descriptor counts are
//! checked around every call.
#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

use common::{child_command, child_role, no_leak, serial};
use handover::{HandleKind, PullError, SocketFamily, SocketInfo, SocketType};

const ENTRY: &str = "child_entry";
const NOBODY: u32 = 65534;

/// What a target prints once its descriptors are open.
struct Target {
    child: Child,
    pid: u32,
    listener: u32,
    pipe: u32,
    memfd: u32,
    port: u16,
    _out: BufReader<ChildStdout>,
}

impl Target {
    /// Starts this binary as `role` and reads its `ready …` line.
    fn start(role: &str, uid: Option<u32>) -> Target {
        let mut cmd = child_command(ENTRY, role);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("starting the target");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let ready = loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the target exited before it was ready"
            );
            // The harness's `test child_entry ... ` may come first.
            if let Some(at) = line.find("ready ") {
                break line[at + 6..].trim().to_owned();
            }
        };
        let n: Vec<u32> = ready.split(' ').map(|n| n.parse().unwrap()).collect();
        Target {
            pid: child.id(),
            child,
            listener: n[0],
            pipe: n[1],
            memfd: n[2],
            port: n[3] as u16,
            _out: out,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // Closing its stdin ends the target.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The roles this binary is started in.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    match role.as_str() {
        "target" => target(false),
        "nondumpable" => target(true),
        "puller" => {
            let pid = std::env::var("PULL_PID").unwrap().parse().unwrap();
            let fd = std::env::var("PULL_FD").unwrap().parse().unwrap();
            match handover::pull(pid, fd) {
                Ok(h) => println!("pulled {}", h.kind()),
                Err(e) => println!("error: {e}"),
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// Opens a listener, a pipe with bytes in it and a memfd with bytes in
/// it, prints `ready LISTENER PIPE MEMFD PORT`, and waits for end of
/// input.
fn target(nondumpable: bool) {
    if nondumpable {
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (r, w) = rustix::pipe::pipe().unwrap();
    rustix::io::write(&w, b"through the pipe").unwrap();
    let memfd = rustix::fs::memfd_create(
        "pulled",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::io::write(&memfd, b"in memory").unwrap();
    println!(
        "ready {} {} {} {}",
        listener.as_raw_fd(),
        r.as_raw_fd(),
        memfd.as_raw_fd(),
        listener.local_addr().unwrap().port()
    );
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop((listener, r, w, memfd));
}

#[test]
fn a_listener_a_pipe_and_a_memfd_are_pulled_and_used() {
    let _guard = serial();
    let t = Target::start("target", None);

    // The listener: the target never accepts, so the connection made
    // here can only be accepted through the pulled copy.
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
        let listener = h.into_tcp_listener().unwrap();
        assert_eq!(listener.local_addr().unwrap().port(), t.port);
        let mut client = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"accepted by the puller").unwrap();
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "accepted by the puller");
    });

    // The pipe's read end: what the target wrote is read here.
    no_leak("pulling and reading a pipe", || {
        let h = handover::pull(t.pid, t.pipe).unwrap();
        assert_eq!(h.kind(), HandleKind::Pipe);
        let fd = OwnedFd::from(h);
        let mut buf = [0u8; 64];
        let n = rustix::io::read(&fd, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"through the pipe");
    });

    // The memfd: shared memory, mapped here, written there.
    no_leak("pulling and mapping a memfd", || {
        let h = handover::pull(t.pid, t.memfd).unwrap();
        assert_eq!(h.kind(), HandleKind::SharedMemory);
        let shm = h.into_shared_memory().unwrap();
        let map = shm.map().unwrap();
        let mut buf = [0u8; 9];
        map.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"in memory");
    });

    // The pulled descriptor is close-on-exec, like every handle made here.
    let h = handover::pull(t.pid, t.pipe).unwrap();
    let fd = OwnedFd::from(h);
    let flags = rustix::io::fcntl_getfd(&fd).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
}

#[test]
fn a_reaped_pid_and_a_closed_descriptor_are_named() {
    let _guard = serial();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let t = Target::start("target", None);
    no_leak("errors", || {
        let e = handover::pull(gone_pid, 0).unwrap_err();
        assert!(
            matches!(e, PullError::NoSuchProcess { pid } if pid == gone_pid),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("no process {gone_pid}: it does not exist or has exited")
        );

        let e = handover::pull(t.pid, 999).unwrap_err();
        assert!(
            matches!(e, PullError::NoSuchHandle { pid, number: 999 } if pid == t.pid),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("process {} has no open handle 999", t.pid)
        );
        let e = handover::pull(t.pid, u32::MAX).unwrap_err();
        assert!(matches!(e, PullError::NoSuchHandle { .. }), "{e:?}");
        let e = handover::pull(0, 0).unwrap_err();
        assert!(matches!(e, PullError::NoSuchProcess { pid: 0 }), "{e:?}");
    });
}

/// Runs this binary as uid 65534 pulling `fd` from `pid`; what it printed.
fn pull_as_nobody(pid: u32, fd: u32) -> String {
    let out = child_command(ENTRY, "puller")
        .uid(NOBODY)
        .gid(NOBODY)
        .env("PULL_PID", pid.to_string())
        .env("PULL_FD", fd.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the puller failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout
        .lines()
        .find_map(|l| {
            l.find("error: ")
                .or_else(|| l.find("pulled "))
                .map(|at| &l[at..])
        })
        .unwrap_or_else(|| panic!("no result from the puller: {stdout}"))
        .to_owned()
}

#[test]
fn a_target_of_another_uid_is_refused_naming_ptrace_and_the_uids() {
    let _guard = serial();
    let t = Target::start("target", None);
    let said = pull_as_nobody(t.pid, t.listener);
    let expected = format!(
        "error: ptrace (PTRACE_MODE_ATTACH_REALCREDS) access to process {} denied: process {} \
         runs as uid 0 (real 0, saved 0) and this process's real uid is {NOBODY}",
        t.pid, t.pid
    );
    assert!(said.starts_with(&expected), "{said}");
    assert!(said.contains("CAP_SYS_PTRACE, which it lacks"), "{said}");
    // The target still has its listener.
    TcpStream::connect_timeout(&([127, 0, 0, 1], t.port).into(), Duration::from_secs(5)).unwrap();
}

#[test]
fn a_nondumpable_target_of_the_same_uid_is_refused_naming_dumpability() {
    let _guard = serial();
    let t = Target::start("nondumpable", Some(NOBODY));
    let said = pull_as_nobody(t.pid, t.pipe);
    let expected = format!(
        "error: ptrace (PTRACE_MODE_ATTACH_REALCREDS) access to process {} denied: process {} \
         is not dumpable",
        t.pid, t.pid
    );
    assert!(said.starts_with(&expected), "{said}");
    assert!(said.contains("CAP_SYS_PTRACE"), "{said}");
    // Root (this test) may still pull from it: CAP_SYS_PTRACE.
    no_leak("pulling from a non-dumpable process as root", || {
        let h = handover::pull(t.pid, t.pipe).unwrap();
        assert_eq!(h.kind(), HandleKind::Pipe);
    });
}

#[test]
fn a_dumpable_target_of_the_same_uid_is_pulled_from_by_nobody() {
    let _guard = serial();
    let t = Target::start("target", Some(NOBODY));
    assert_eq!(
        pull_as_nobody(t.pid, t.listener),
        "pulled a listening IPv4 stream socket"
    );
}

#[test]
fn handle_numbers_lists_a_targets_descriptors() {
    let _guard = serial();
    let t = Target::start("target", None);
    no_leak("listing", || {
        let numbers = handover::handle_numbers(t.pid).unwrap();
        for fd in [0, 1, 2, t.listener, t.pipe, t.memfd] {
            assert!(numbers.contains(&fd), "{fd} not in {numbers:?}");
        }
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        // Every number listed is one `pull` takes.
        let listener = handover::pull(t.pid, t.listener).unwrap();
        assert!(matches!(listener.kind(), handover::HandleKind::Socket(s) if s.listening));
    });
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let e = handover::handle_numbers(gone_pid).unwrap_err();
    assert!(
        matches!(e, PullError::NoSuchProcess { pid } if pid == gone_pid),
        "{e:?}"
    );
}
