//! Starting children with exactly the chosen descriptors, and taking
//! activation sockets — including from systemd-socket-activate.

#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use handover::activation::{self, ActivationEnv};
use handover::unix::CommandExt;
use handover::{Command, Error, Handle};

/// Runs `sh -c script` with the handles placed as given and returns stdout.
fn sh_output(cmd: &mut Command, script: &str) -> String {
    let (r, w) = pipe();
    cmd.arg("-c").arg(script);
    cmd.fd(1, Handle::from(w));
    let mut child = cmd.spawn().unwrap();
    // Drop the command's copy of the write end so that EOF can arrive.
    cmd.fd(1, Handle::from(std::fs::File::open("/dev/null").unwrap()));
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "{script}: {out}");
    out
}

#[test]
fn a_child_sees_exactly_its_descriptors() {
    let _g = serial();
    raise_fd_limit();
    // Hundreds of descriptors without close-on-exec in the parent.
    let (r, _w) = pipe();
    let leaky: Vec<OwnedFd> = (0..300).map(|_| rustix::io::dup(&r).unwrap()).collect();
    assert!(leaky.iter().all(|fd| !rustix::io::fcntl_getfd(fd)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)));
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    // The child lists its own open descriptors with fcntl, which opens
    // nothing itself (a shell or ls would show their own).
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("HANDOVER_TEST_ROLE", "list-fds");
    cmd.activation(Handle::from(l1).with_name("http")).unwrap();
    cmd.activation(Handle::from(u).with_name("dns")).unwrap();
    let (r, w) = pipe();
    cmd.fd(1, Handle::from(w));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "{out}");
    // libtest prints "test child_entry ... " on the same line first.
    let line = out
        .lines()
        .find_map(|l| l.split_once("open: "))
        .map(|(_, fds)| fds);
    assert_eq!(line, Some("0 1 2 3 4"), "{out}");
    drop(leaky);
}

#[test]
fn activation_variables_name_the_child_itself() {
    let _g = serial();
    let mut cmd = Command::new("sh");
    cmd.env("LISTEN_PID", "1").env("KEEP", "yes");
    cmd.activation(Handle::from(TcpListener::bind("127.0.0.1:0").unwrap()).with_name("a"))
        .unwrap();
    cmd.activation(Handle::from(TcpListener::bind("127.0.0.1:0").unwrap()))
        .unwrap();
    let out = sh_output(
        &mut cmd,
        "echo \"$$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES $KEEP ${LISTEN_PIDFDID:-none}\"",
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f[0], f[1], "LISTEN_PID is the child's own pid: {out}");
    assert_eq!(&f[2..5], ["2", "a:unknown", "yes"]);
    // On kernels with pidfs, LISTEN_PIDFDID is the child's pidfd inode.
    if f[5] != "none" {
        assert!(f[5].parse::<u64>().unwrap() > 1);
    }
}

#[test]
fn placement_is_collision_safe() {
    let _g = serial();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let (n1, n2) = (w1.as_raw_fd(), w2.as_raw_fd());
    // Each write end goes to the number the other one has here.
    let mut cmd = Command::new("sh");
    cmd.fd(n2, Handle::from(w1)).fd(n1, Handle::from(w2));
    cmd.arg("-c")
        .arg(format!("echo one >&{n2}; echo two >&{n1}"));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    assert!(child.wait().unwrap().success());
    let mut s = String::new();
    std::fs::File::from(r1).read_to_string(&mut s).unwrap();
    assert_eq!(s, "one\n");
    s.clear();
    std::fs::File::from(r2).read_to_string(&mut s).unwrap();
    assert_eq!(s, "two\n");
}

#[test]
fn spawn_errors_are_clear_and_leave_nothing() {
    let _g = serial();
    no_leak("spawn errors", || {
        let err = Command::new("no-such-program-handover")
            .spawn()
            .unwrap_err();
        assert!(matches!(err, Error::ProgramNotFound { .. }), "{err}");
        let err = Command::new("/nonexistent/x").spawn().unwrap_err();
        assert!(matches!(err, Error::ProgramNotFound { .. }), "{err}");
        // Not executable at all: found out before anything starts.
        use std::os::unix::fs::PermissionsExt;
        let bogus = std::env::temp_dir().join(format!("handover-bogus-{}", std::process::id()));
        std::fs::write(&bogus, [0u8, 1, 2, 3]).unwrap();
        std::fs::set_permissions(&bogus, PermissionsExt::from_mode(0o644)).unwrap();
        let err = Command::new(&bogus).spawn().unwrap_err();
        assert!(matches!(err, Error::ProgramNotFound { .. }), "{err}");
        // Marked executable but no program: the failure comes from execve,
        // in the child, and is reported with its stage.
        std::fs::set_permissions(&bogus, PermissionsExt::from_mode(0o755)).unwrap();
        let err = Command::new(&bogus).spawn().unwrap_err();
        std::fs::remove_file(&bogus).unwrap();
        assert!(
            matches!(
                err,
                Error::Spawn {
                    stage: "executing the program",
                    ..
                }
            ),
            "{err}"
        );
        let mut cmd = Command::new("true");
        let bad = Handle::from(TcpListener::bind("127.0.0.1:0").unwrap()).with_name("a:b");
        assert!(matches!(
            cmd.activation(bad),
            Err(Error::InvalidName { .. })
        ));
        let (r, _w) = pipe();
        cmd.fd(7, Handle::from(r));
        cmd.current_dir("/nonexistent-dir");
        let err = cmd.spawn().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Spawn {
                    stage: "changing directory",
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
fn take_from_follows_the_rules() {
    let env = |pid: Option<String>, fds: &str, names: Option<&str>| ActivationEnv {
        listen_pid: pid,
        listen_fds: Some(fds.into()),
        listen_fdnames: names.map(Into::into),
        listen_pidfdid: None,
        ..Default::default()
    };
    let ours = Some(std::process::id().to_string());
    // Not for us: another pid, or no LISTEN_PID at all.
    assert!(activation::take_from(&env(Some("1".into()), "2", None))
        .unwrap()
        .is_empty());
    assert!(activation::take_from(&env(None, "2", None))
        .unwrap()
        .is_empty());
    // Malformed values are errors.
    for (fds, names) in [
        ("x", None),
        ("2", Some("a")),
        ("1", Some("a:b")),
        ("-1", None),
    ] {
        let err = activation::take_from(&env(ours.clone(), fds, names)).unwrap_err();
        assert!(
            matches!(err, Error::Activation(_)),
            "{fds} {names:?}: {err}"
        );
    }
    let mut e = env(ours, "1", None);
    e.listen_pidfdid = Some("not-a-number".into());
    assert!(activation::take_from(&e).is_err());
}

/// Child roles: each takes its sockets as a real activated program would.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    if role == "list-fds" {
        let open: Vec<String> = (0..4096)
            // SAFETY: F_GETFD only asks whether a number is open.
            .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
            .map(|fd| fd.to_string())
            .collect();
        println!("\nopen: {}", open.join(" "));
        return;
    }
    let mut sockets = activation::take().expect("activation");
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
    ] {
        assert!(std::env::var_os(var).is_none(), "{var} was left set");
    }
    match role.as_str() {
        "serve-named" => {
            assert_eq!(sockets.names(), ["http", "dns"]);
            // Close-on-exec is set on every descriptor taken.
            let http = sockets.take_named("http").unwrap();
            assert!(rustix::io::fcntl_getfd(http.as_fd())
                .unwrap()
                .contains(rustix::io::FdFlags::CLOEXEC));
            assert!(sockets.take_named("http").is_none(), "taken once only");
            let udp = sockets.take(1).unwrap().into_udp_socket().unwrap();
            drop(udp);
            serve_one(http.into_tcp_listener().unwrap());
        }
        "serve-first" => {
            assert_eq!(sockets.names(), ["web"]);
            let l = sockets
                .take(0)
                .expect("one socket")
                .into_tcp_listener()
                .unwrap();
            serve_one(l);
        }
        "accept-mode" => {
            // In accept mode the descriptor is the connection itself.
            let h = sockets.take(0).expect("the connection");
            let h = h.into_tcp_listener().unwrap_err().into_handle();
            let mut s = h.into_tcp_stream().unwrap();
            s.write_all(b"accepted\n").unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

fn serve_one(l: TcpListener) {
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"hello from an activated child\n").unwrap();
}

fn read_from(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                return out;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to {port}: {e}"),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn handover_spawn_feeds_handover_activation() {
    let _g = serial();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("HANDOVER_TEST_ROLE", "serve-named");
    cmd.activation(Handle::from(l).with_name("http")).unwrap();
    cmd.activation(Handle::from(UdpSocket::bind("127.0.0.1:0").unwrap()).with_name("dns"))
        .unwrap();
    cmd.fd(1, Handle::from(std::fs::File::create("/dev/null").unwrap()));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    assert_eq!(read_from(port), "hello from an activated child\n");
    assert!(child.wait().unwrap().success());
}

fn systemd_socket_activate() -> std::process::Command {
    let path = "/usr/bin/systemd-socket-activate";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: install Debian's systemd package (.ci/run does)"
    );
    std::process::Command::new(path)
}

#[test]
fn takes_sockets_from_systemd_socket_activate() {
    let _g = serial();
    let port = free_port();
    let mut child = systemd_socket_activate()
        // systemd-socket-activate passes on only the variables it is told.
        .args(["-E", "HANDOVER_TEST_ROLE=serve-first"])
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=web"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(read_from(port), "hello from an activated child\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn takes_connections_from_systemd_socket_activate_accept_mode() {
    let _g = serial();
    let port = free_port();
    let mut child = systemd_socket_activate()
        .args(["-E", "HANDOVER_TEST_ROLE=accept-mode"])
        .args(["-a", "-l", &format!("127.0.0.1:{port}")])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(read_from(port), "accepted\n");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
