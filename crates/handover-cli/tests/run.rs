//! `handover run`, tested with real processes and sockets: real servers
//! written for socket activation (the listenfd crate's protocol, git
//! daemon in inetd mode), real signals, a fake service manager listening
//! on a NOTIFY_SOCKET, and real privilege dropping.
//!
//! Every wait has a deadline, and a handover still running when a test
//! fails is stopped (see common::Running), so that nothing hangs.

#![cfg(target_os = "linux")]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The pid in a listenfd_server response, `hello from pid PID on ADDR`.
fn served_by(response: &str) -> (i32, String) {
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "not a 200 response: {response:?}"
    );
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no body in {response:?}"));
    let rest = body
        .strip_prefix("hello from pid ")
        .unwrap_or_else(|| panic!("unexpected body {body:?}"));
    let (pid, addr) = rest.trim_end().split_once(" on ").unwrap();
    (pid.parse().unwrap(), addr.to_owned())
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

// 1. A server written against the listenfd crate runs unchanged.

#[test]
fn listenfd_example_serves_through_the_socket_handover_bound() {
    let server = example("listenfd_server");

    // On its own, with no socket passed, the example refuses to start:
    // whatever it serves below, it serves on handover's socket.
    let alone = run_with_timeout(
        Command::new(&server)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID"),
        TIMEOUT,
    );
    assert_eq!(alone.status.code(), Some(2), "{alone:?}");
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("no socket was passed"),
        "{alone:?}"
    );

    let mut h = Running::spawn(handover(["run", "-l", "127.0.0.1:0=http", "--"]).arg(&server));
    let l = h.listening(1).remove(0);
    assert_eq!(l.name.as_deref(), Some("http"), "{}", h.report());
    assert_eq!(l.fd, Some(3), "{}", h.report());
    let addr = l.tcp();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0, "the real port is printed, not 0");

    let mut pids = HashSet::new();
    for _ in 0..3 {
        let (pid, served_on) = served_by(&http_get(addr));
        // The server's own getsockname() is the printed address: the
        // socket it accepted on is the one handover bound and printed.
        assert_eq!(served_on, addr.to_string());
        // Served by handover's child, not by handover itself.
        assert_ne!(pid, h.pid());
        assert_eq!(parent_of(pid), h.pid(), "the server is handover's child");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 1, "one long-running server: {pids:?}");
    assert!(h.exited().is_none(), "{}", h.report());

    // The example has no TERM handler: it dies of the forwarded TERM, and
    // so does handover, which closes the socket.
    h.signal(libc::SIGTERM);
    let status = h.wait(TIMEOUT);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{}", describe(status));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err(),
        "still listening after handover exited"
    );
    let server_pid = *pids.iter().next().unwrap();
    assert!(!process_alive(server_pid), "the server outlived handover");
}

// 2. git daemon in inetd mode.

fn git(dir: &Path, args: &[&str]) -> String {
    let out = run_with_timeout(
        Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .args(args),
        TIMEOUT,
    );
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn git_daemon_inetd_answers_ls_remote() {
    let dir = TempDir::new("git");
    git(dir.path(), &["init", "-q", "work"]);
    git(
        &dir.join("work"),
        &[
            "-c",
            "user.email=test@example.com",
            "-c",
            "user.name=Test",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "first",
        ],
    );
    git(dir.path(), &["clone", "-q", "--bare", "work", "repo.git"]);
    let head = git(&dir.join("repo.git"), &["rev-parse", "HEAD"])
        .trim()
        .to_owned();
    assert_eq!(head.len(), 40, "{head:?}");

    let mut h = Running::spawn(
        handover(["run", "--inetd", "-l", "127.0.0.1:0", "--"])
            .args(["git", "daemon", "--inetd", "--export-all"])
            .arg(format!("--base-path={}", dir.path().display())),
    );
    let l = h.listening(1).remove(0);
    assert_eq!(l.fd, None, "accept mode prints no fd: {}", h.report());
    let addr = l.tcp();

    // Two clients, one git daemon each.
    for _ in 0..2 {
        let url = format!("git://{addr}/repo.git");
        let refs = git(dir.path(), &["ls-remote", &url]);
        assert!(
            refs.lines().any(|l| l == format!("{head}\tHEAD")),
            "ls-remote {url}: {refs:?}\n{}",
            h.report()
        );
    }
    // A repository that does not exist is an error from git daemon, not a
    // hang or a dead handover.
    let out = run_with_timeout(
        Command::new("git")
            .current_dir(dir.path())
            .args(["ls-remote", &format!("git://{addr}/nope.git")]),
        TIMEOUT,
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(h.exited().is_none(), "{}", h.report());
}

// 3. The socket listens before the program starts: no refusal window.

#[test]
fn connections_made_before_the_program_serves_are_queued_not_refused() {
    let server = example("listenfd_server");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(r#"sleep 1; exec "$0""#))
            .arg(&server),
    );
    let addr = h.tcp_addr();
    let printed = Instant::now();
    // Connect and send the requests at once, while the program is still
    // sleeping: the kernel queues them in the listen backlog.
    let conns: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            s
        })
        .collect();
    let connected = printed.elapsed();
    assert!(
        connected < Duration::from_millis(700),
        "connecting took {connected:?}: was it refused and retried?"
    );
    let mut pids = HashSet::new();
    for s in conns {
        let (pid, on) = served_by(&read_all(s));
        assert_eq!(on, addr.to_string());
        pids.insert(pid);
    }
    // The program really was not serving yet when we connected.
    assert!(
        printed.elapsed() >= Duration::from_millis(800),
        "served after only {:?}: the program did not sleep first?",
        printed.elapsed()
    );
    assert_eq!(pids.len(), 1);
    assert!(h.exited().is_none(), "{}", h.report());
}

// 4. Accept mode.

#[test]
fn accept_mode_starts_one_program_per_connection_with_its_environment() {
    let mut h = Running::spawn(
        handover(["run", "--accept", "-l", "127.0.0.1:0=echo", "--"]).args(sh(
            r#"echo "$LISTEN_FDS $LISTEN_FDNAMES $REMOTE_ADDR $REMOTE_PORT $LISTEN_PID $$" >&3"#,
        )),
    );
    let l = h.listening(1).remove(0);
    assert_eq!(l.name.as_deref(), Some("echo"));
    assert_eq!(l.fd, None, "accept mode prints no fd: {}", h.report());
    let addr = l.tcp();

    let mut pids = HashSet::new();
    for _ in 0..4 {
        let s = connect(addr);
        let local = s.local_addr().unwrap();
        let out = read_all(s);
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.len(), 6, "{out:?}\n{}", h.report());
        assert_eq!(
            f[..4],
            ["1", "connection", "127.0.0.1", &local.port().to_string()],
            "{out:?}"
        );
        assert_eq!(f[4], f[5], "LISTEN_PID is the handler's own pid: {out:?}");
        assert_ne!(f[5], h.pid().to_string());
        pids.insert(f[5].to_owned());
    }
    assert_eq!(pids.len(), 4, "one program per connection: {pids:?}");
    assert!(h.exited().is_none(), "{}", h.report());
}

#[test]
fn accept_mode_reports_ipv4_clients_of_a_dual_stack_socket_as_ipv4() {
    // `:0` listens on [::] (dual-stack), or on 0.0.0.0 without IPv6.
    let h = Running::spawn(
        handover(["run", "--accept", "-l", ":0", "--"])
            .args(sh(r#"echo "$REMOTE_ADDR $REMOTE_PORT" >&3"#)),
    );
    let port = h.listening(1)[0]
        .addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("{}", h.report()));
    let s = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    let local = s.local_addr().unwrap();
    assert_eq!(
        read_all(s).trim(),
        format!("127.0.0.1 {}", local.port()),
        "{}",
        h.report()
    );
}

#[test]
fn accept_mode_stops_on_term_after_its_handlers() {
    let mut h = Running::spawn(
        handover(["run", "--accept", "-l", "127.0.0.1:0", "--"]).args(sh(
            r#"trap 'echo bye >&3; exit 0' TERM; echo hi >&3; while :; do sleep 0.05; done"#,
        )),
    );
    let addr = h.tcp_addr();
    let s = connect(addr);
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line, "hi\n");
    // The handler runs; TERM reaches it, and handover exits after it.
    h.signal(libc::SIGTERM);
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line, "bye\n", "{}", h.report());
    let status = h.wait(TIMEOUT);
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    // And the socket is closed: nobody listens any more.
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    assert!(refused.is_err(), "still listening after handover exited");
}

#[test]
fn max_connections_queues_clients_instead_of_refusing_or_overlapping() {
    const CLIENTS: usize = 4;
    let dir = TempDir::new("maxconn");
    let log = dir.join("log");
    let mut h = Running::spawn(
        handover([
            "run",
            "--accept",
            "--max-connections",
            "1",
            "-l",
            "127.0.0.1:0",
            "--",
        ])
        .args(sh(
            r#"echo "start $$" >> "$0"; sleep 0.25; echo "end $$" >> "$0"; echo "served $$" >&3"#,
        ))
        .arg(&log),
    );
    let addr = h.tcp_addr();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || read_all(connect(addr))))
        .collect();
    let mut served = HashSet::new();
    for c in clients {
        let out = c.join().expect("a client failed (refused or timed out)");
        let pid = out
            .trim()
            .strip_prefix("served ")
            .unwrap_or_else(|| panic!("unexpected answer {out:?}"))
            .to_owned();
        served.insert(pid);
    }
    assert_eq!(served.len(), CLIENTS, "every client got its own handler");
    assert!(
        started.elapsed() >= Duration::from_millis(250 * CLIENTS as u64 - 50),
        "{CLIENTS} handlers of 250 ms each finished in {:?}: they overlapped",
        started.elapsed()
    );
    // The handlers' own record: each ended before the next started.
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2 * CLIENTS, "{log}");
    for pair in lines.chunks(2) {
        let start = pair[0].strip_prefix("start ");
        let end = pair[1].strip_prefix("end ");
        assert!(
            start.is_some() && start == end,
            "more than one handler at a time:\n{log}"
        );
    }
    assert!(h.exited().is_none(), "{}", h.report());
}

// 5. Signals and exit status.

#[test]
fn term_is_forwarded_and_the_programs_exit_code_is_handovers() {
    let dir = TempDir::new("term");
    let ready = dir.join("ready");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(
                r#"trap 'exit 7' TERM; : > "$0"; while :; do sleep 0.05; done"#,
            ))
            .arg(&ready),
    );
    h.listening(1);
    wait_for("the program to start", TIMEOUT, || {
        ready.exists().then_some(())
    });
    h.signal(libc::SIGTERM);
    let status = h.wait(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(7),
        "{}\n{}",
        describe(status),
        h.report()
    );
}

#[test]
fn usr1_usr2_int_quit_are_forwarded_and_handover_stays() {
    let dir = TempDir::new("hup");
    let log = dir.join("log");
    let script = r#"
        for s in HUP USR1 USR2 INT QUIT; do trap "echo $s >> '$0'" $s; done
        # (HUP is handover's reload: it must not reach the program.)
        trap 'exit 3' TERM
        echo ready >> "$0"
        while :; do sleep 0.05; done"#;
    let mut cmd = handover(["run", "-l", "127.0.0.1:0", "--"]);
    cmd.args(sh(script)).arg(&log);
    // As `nohup handover run … &` in a script starts it: HUP, INT and QUIT
    // ignored. handover forwards them all the same.
    // SAFETY: signal(2) only, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let mut h = Running::spawn(&mut cmd);
    h.listening(1);
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l == what)
    };
    wait_for("the program to start", TIMEOUT, || {
        logged("ready").then_some(())
    });
    for (sig, name) in [
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
    ] {
        h.signal(sig);
        wait_for(&format!("the program to get SIG{name}"), TIMEOUT, || {
            logged(name).then_some(())
        });
        assert!(
            h.exited().is_none(),
            "handover exited on SIG{name}\n{}",
            h.report()
        );
    }
    h.signal(libc::SIGTERM);
    let status = h.wait(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(3),
        "{}\n{}",
        describe(status),
        h.report()
    );
}

#[test]
fn a_program_killed_by_a_signal_makes_handover_die_of_it() {
    // TERM and USR1 are signals handover itself blocks and forwards; KILL
    // cannot be caught at all.
    for (sig, name) in [
        (libc::SIGTERM, "TERM"),
        (libc::SIGUSR1, "USR1"),
        (libc::SIGKILL, "KILL"),
    ] {
        let mut h = Running::spawn(
            handover(["run", "-l", "127.0.0.1:0", "--"]).args(sh(&format!("kill -{name} $$"))),
        );
        let status = h.wait(TIMEOUT);
        assert_eq!(
            status.signal(),
            Some(sig),
            "SIG{name}: handover ended with {}\n{}",
            describe(status),
            h.report()
        );
    }
}

#[test]
fn background_grandchildren_do_not_outlive_handover() {
    let dir = TempDir::new("orphan");
    // The program exits on its own, leaving `sleep 1000` behind.
    let pidfile = dir.join("pid");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(r#"sleep 1000 & echo $! > "$0"; exit 0"#))
            .arg(&pidfile),
    );
    let status = h.wait(TIMEOUT);
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !process_alive(pid),
        "the grandchild {pid} still runs after handover exited\n{}",
        h.report()
    );

    // A double fork: the subshell exits at once, its `sleep` is orphaned
    // while the program still runs.
    let pidfile = dir.join("pid-double");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(r#"(sleep 1000 & echo $! > "$0"); sleep 0.2; exit 4"#))
            .arg(&pidfile),
    );
    let status = h.wait(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(4),
        "{}\n{}",
        describe(status),
        h.report()
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !process_alive(pid),
        "the orphaned grandchild {pid} still runs after handover exited\n{}",
        h.report()
    );

    // The program is stopped by a signal while its grandchild runs.
    let pidfile = dir.join("pid2");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(
                r#"sleep 1000 & echo $! > "$0.tmp"; mv "$0.tmp" "$0"; wait"#,
            ))
            .arg(&pidfile),
    );
    let pid: i32 = wait_for("the grandchild's pid", TIMEOUT, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    assert!(process_alive(pid));
    h.signal(libc::SIGTERM);
    let status = h.wait(TIMEOUT);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{}", describe(status));
    assert!(
        !process_alive(pid),
        "the grandchild {pid} still runs after handover exited\n{}",
        h.report()
    );
}

#[test]
fn accept_mode_handlers_leave_nothing_behind() {
    let mut h = Running::spawn(
        handover(["run", "--accept", "-l", "127.0.0.1:0", "--"]).args(sh(
            "sleep 1000 </dev/null >/dev/null 2>&1 3>&- & echo $! >&3",
        )),
    );
    let out = read_all(connect(h.tcp_addr()));
    let pid: i32 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}\n{}", h.report()));
    h.signal(libc::SIGTERM);
    let status = h.wait(TIMEOUT);
    let alive = process_alive(pid);
    if alive {
        // SAFETY: kill(2) on the orphan we just saw alive.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    assert!(
        !alive,
        "the handler's background process {pid} outlived handover"
    );
}

/// Starts `handover run ARGS -- sh -c 'echo pid $$; exec sleep 60'`,
/// SIGKILLs handover once the program runs, and tells whether the program
/// was stopped (by its parent-death signal) within five seconds. The
/// program is killed here when it was not.
fn program_stops_when_handover_is_killed(args: &[&str]) -> bool {
    let mut h = Running::spawn(
        handover(["run"])
            .args(args)
            .args(["-l", "127.0.0.1:0", "--"])
            .args(sh("echo pid $$; exec sleep 60")),
    );
    let pid: i32 = h.line_matching("the program's pid", |l| {
        l.strip_prefix("pid ").and_then(|p| p.parse().ok())
    });
    // Until `sleep` runs, the program is still the shell.
    wait_for("the program to exec sleep", TIMEOUT, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .filter(|c| c.trim() == "sleep")
    });
    h.signal(libc::SIGKILL);
    h.wait(TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on the orphan we just saw alive.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    false
}

#[test]
fn the_program_is_stopped_when_handover_is_killed() {
    assert!(
        program_stops_when_handover_is_killed(&[]),
        "the program outlived a SIGKILLed handover"
    );
}

#[test]
fn a_user_program_is_stopped_when_handover_is_killed() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: --user needs root");
        return;
    }
    assert!(
        program_stops_when_handover_is_killed(&["--user", "nobody"]),
        "the program, run as nobody, outlived a SIGKILLed handover"
    );
}

#[test]
fn descendants_in_another_process_group_do_not_outlive_handover() {
    let dir = TempDir::new("setsid");
    let pidfile = dir.join("pid");
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(
                r#"setsid sleep 1000 & echo $! > "$0.tmp"; mv "$0.tmp" "$0"; sleep 0.2; exit 0"#,
            ))
            .arg(&pidfile),
    );
    let status = h.wait(TIMEOUT);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = process_alive(pid);
    if alive {
        // Do not leave it behind ourselves.
        // SAFETY: kill(2); the pid was alive a moment ago and is not reused
        // this fast.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    assert!(
        !alive,
        "the grandchild {pid} (own session) still runs after handover exited"
    );
}

#[test]
fn the_program_starts_with_default_signal_handling() {
    // handover blocks the signals it forwards, and Rust ignores SIGPIPE;
    // here handover is also started with SIGINT and SIGQUIT ignored, as a
    // shell starts a background job. None of it may reach the program
    // (seen here by its child, grep).
    let mut cmd = handover(["run", "-l", "127.0.0.1:0", "--"]);
    // SAFETY: signal(2) only, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
    let h = Running::spawn(cmd.args(sh("grep -E '^Sig(Blk|Ign):' /proc/self/status")));
    let blk = h.line_matching("SigBlk", |l| {
        l.strip_prefix("SigBlk:").map(|v| v.trim().to_owned())
    });
    let ign = h.line_matching("SigIgn", |l| {
        l.strip_prefix("SigIgn:").map(|v| v.trim().to_owned())
    });
    let blk = u64::from_str_radix(&blk, 16).unwrap();
    let ign = u64::from_str_radix(&ign, 16).unwrap();
    assert_eq!(blk, 0, "blocked signals in the program: {blk:#x}");
    // The classic signals 1 to 31. (glibc reserves 32 and 33: its signal()
    // cannot reset them, and glibc installs its own handlers for them in
    // every program it starts.)
    assert_eq!(
        ign & 0x7fff_ffff,
        0,
        "ignored signals in the program: {ign:#x}"
    );
}

// 6. sd_notify, both ways.

/// Receives datagrams on `sock` until `want` returns true for the fields
/// seen so far; fails after TIMEOUT.
fn receive_until(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    want: impl Fn(&[String]) -> bool,
    h: &Running,
) {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 4096];
    while !want(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "notifications so far: {seen:?}\n{}",
            h.report()
        );
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => seen.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            ),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

#[test]
fn notify_socket_readiness_status_and_stopping_are_passed_up() {
    let dir = TempDir::new("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let go = dir.join("go");
    // The program reports readiness only when told to (the file "go"),
    // then stopping when told again ("go.stop"), and exits 5.
    let script = r#"
        echo "program NOTIFY_SOCKET=$NOTIFY_SOCKET"
        while [ ! -e "$0" ]; do sleep 0.02; done
        systemd-notify --ready --status=hi || exit 90
        while [ ! -e "$0.stop" ]; do sleep 0.02; done
        systemd-notify STOPPING=1 || exit 91
        exit 5"#;
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--"])
            .args(sh(script))
            .arg(&go)
            .env("NOTIFY_SOCKET", &sock_path),
    );
    h.listening(1);
    // The program has a NOTIFY_SOCKET of its own: handover's, not ours.
    let theirs = h.line_matching("the program's NOTIFY_SOCKET", |l| {
        l.strip_prefix("program NOTIFY_SOCKET=").map(str::to_owned)
    });
    assert!(!theirs.is_empty(), "the program has no NOTIFY_SOCKET");
    assert_ne!(Path::new(&theirs), sock_path.as_path());

    // Not ready before the program says so.
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => panic!(
            "handover reported {:?} before the program was ready",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "recv: {e}"
        ),
    }

    std::fs::write(&go, "").unwrap();
    let mut seen = Vec::new();
    receive_until(
        &sock,
        &mut seen,
        |s| s.iter().any(|l| l == "READY=1") && s.iter().any(|l| l == "STATUS=hi"),
        &h,
    );
    assert!(!seen.iter().any(|l| l == "STOPPING=1"), "{seen:?}");

    std::fs::write(dir.join("go.stop"), "").unwrap();
    receive_until(
        &sock,
        &mut seen,
        |s| s.iter().any(|l| l == "STOPPING=1"),
        &h,
    );
    let status = h.wait(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(5),
        "{}\n{}",
        describe(status),
        h.report()
    );
}

#[test]
fn notify_mainpid_moves_who_may_notify() {
    let dir = TempDir::new("mainpid");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // Sends $1 to NOTIFY_SOCKET from this python process, after the file
    // $2 exists when given.
    let send = r#"
import os, socket, sys, time
while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
a = os.environ["NOTIFY_SOCKET"]
if a.startswith("@"):
    a = "\0" + a[1:]
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), a)
"#;
    // A process other than the program is not listened to; once the
    // program names another process as the main one, that one is.
    let script = r#"
        py=$1; send=$2; go=$0
        "$py" -c "$send" STATUS=intruder || exit 90
        "$py" -c "$send" STATUS=from-main "$go" &
        systemd-notify MAINPID=$! || exit 91
        systemd-notify --status=handed-over || exit 92
        : > "$go"
        wait"#;
    let mut h = Running::spawn(
        handover(["run", "-l", "127.0.0.1:0", "--", "sh", "-c", script])
            .arg(dir.join("go"))
            .arg(python3())
            .arg(send)
            .env("NOTIFY_SOCKET", &sock_path),
    );
    let mut seen = Vec::new();
    receive_until(
        &sock,
        &mut seen,
        |s| s.iter().any(|l| l == "STATUS=from-main"),
        &h,
    );
    assert!(
        !seen.iter().any(|l| l == "STATUS=intruder"),
        "a notification from another process was passed up: {seen:?}"
    );
    assert!(seen.iter().any(|l| l == "STATUS=handed-over"), "{seen:?}");
    let status = h.wait(TIMEOUT);
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    assert!(
        h.stderr().contains("ignoring a notification"),
        "{}",
        h.report()
    );
}

// 7. Errors: a clear message, a failure exit, nothing left bound.

/// Runs handover to completion and checks that it failed cleanly: exit
/// code 1, `expect` on stderr, no socket left at `sock`, the program not
/// started (it would create `mark`).
fn fails_cleanly(cmd: &mut Command, expect: &[&str], sock: &Path, mark: &Path) -> String {
    let out = run_with_timeout(cmd, TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{cmd:?}: {}\nstdout: {stdout}\nstderr: {stderr}",
        describe(out.status)
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("handover: error: "),
        "{cmd:?}: the last line of stderr is not the error: {stderr}"
    );
    for e in expect {
        assert!(
            last.to_lowercase().contains(&e.to_lowercase()),
            "{cmd:?}: {e:?} not in the error: {stderr}"
        );
    }
    assert!(
        !sock.exists(),
        "{cmd:?}: the socket file {} was left behind\n{stderr}",
        sock.display()
    );
    assert!(!mark.exists(), "{cmd:?}: the program was started\n{stderr}");
    stderr
}

#[test]
fn errors_are_clear_and_leave_nothing_bound() {
    let dir = TempDir::new("errors");
    let sock = dir.join("first.sock");
    let mark = dir.join("started");
    let unix = format!("unix:{}", sock.display());
    let program = |extra: &[&str]| {
        let mut cmd = handover(["run"]);
        cmd.args(["-l", &unix]).args(extra);
        cmd
    };
    let marker = [
        "--".to_owned(),
        "sh".into(),
        "-c".into(),
        format!(": > '{}'", mark.display()),
    ];

    // Address in use: the Unix socket bound before it is removed again.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    fails_cleanly(
        program(&["-l", &busy_addr]).args(&marker),
        &[&busy_addr, "address already in use"],
        &sock,
        &mark,
    );
    // The busy listener was not disturbed.
    let _ = TcpStream::connect(busy.local_addr().unwrap()).unwrap();
    busy.accept().unwrap();

    // Bad specs.
    for bad in [
        "localhost:80",
        "8080",
        ":99999",
        "unix:",
        "127.0.0.1:80=a:b",
    ] {
        fails_cleanly(
            program(&["-l", bad]).args(&marker),
            &["listen spec", bad],
            &sock,
            &mark,
        );
    }

    // No such program, by path and on PATH.
    for missing in ["/nonexistent/program", "handover-test-no-such-program"] {
        fails_cleanly(
            &mut program(&["--", missing]),
            &["cannot run", missing],
            &sock,
            &mark,
        );
    }

    // Not executable.
    let not_exec = dir.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n: > \"$0.started\"\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails_cleanly(
        program(&["--"]).arg(&not_exec),
        &[&not_exec.display().to_string()],
        &sock,
        &dir.join("not-executable.started"),
    );

    // No such user.
    fails_cleanly(
        program(&["--user", "handover-test-no-such-user"]).args(&marker),
        &["no such user"],
        &sock,
        &mark,
    );

    // A Unix socket in a directory that does not exist.
    let nowhere = dir.join("no/such/dir.sock");
    fails_cleanly(
        program(&["-l", &format!("unix:{}", nowhere.display())]).args(&marker),
        &[&nowhere.display().to_string()],
        &sock,
        &mark,
    );
}

#[test]
fn usage_errors_are_found_before_any_socket_is_announced() {
    let dir = TempDir::new("usage");
    let not_exec = dir.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let cases: Vec<Vec<String>> = vec![
        ["--max-connections", "2", "-l", "127.0.0.1:0", "--", "true"]
            .map(String::from)
            .to_vec(),
        [
            "--accept",
            "--max-connections",
            "0",
            "-l",
            "127.0.0.1:0",
            "--",
            "true",
        ]
        .map(String::from)
        .to_vec(),
        ["--accept", "-l", "udp:127.0.0.1:0", "--", "true"]
            .map(String::from)
            .to_vec(),
        ["--accept", "--fd", "7=x", "-l", "127.0.0.1:0", "--", "true"]
            .map(String::from)
            .to_vec(),
        vec![
            "-l".into(),
            "127.0.0.1:0".into(),
            "--".into(),
            not_exec.display().to_string(),
        ],
        vec![
            "-l".into(),
            "127.0.0.1:0".into(),
            "--".into(),
            dir.path().display().to_string(),
        ],
    ];
    let mut wrong = Vec::new();
    for args in cases {
        let mut cmd = handover(["run"]);
        cmd.args(&args);
        // SAFETY: dup2 only, async-signal-safe. (For --fd 7.)
        unsafe {
            cmd.pre_exec(|| {
                if libc::dup2(0, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = run_with_timeout(&mut cmd, TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        if stdout.contains("listening on") {
            wrong.push(format!("{args:?}: {}", stdout.trim()));
        }
    }
    assert!(
        wrong.is_empty(),
        "announced sockets, then failed:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_low_port_without_privileges_is_refused_clearly() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 1 {
        eprintln!("skipped: every port is unprivileged here (ip_unprivileged_port_start={start})");
        return;
    }
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: dropping to another user needs root");
        return;
    }
    // handover itself runs as nobody (setpriv): copy it where nobody can
    // run it, and give nobody a directory for the Unix socket.
    let dir = TempDir::new("lowport");
    let handover_copy = public_copy(Path::new(HANDOVER), &dir);
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = sockets.join("first.sock");
    let mark = sockets.join("started");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(&handover_copy)
    .args(["run", "-l"])
    .arg(format!("unix:{}", sock.display()))
    .args(["-l", "127.0.0.1:1", "--", "sh", "-c"])
    .arg(format!(": > '{}'", mark.display()))
    .env_remove("NOTIFY_SOCKET");
    fails_cleanly(
        &mut cmd,
        &["127.0.0.1:1", "permission denied", "below 1024"],
        &sock,
        &mark,
    );
}

// 8. Dropping privileges in the program.

/// handover serving `server` as nobody, on a free port below 1024 when
/// one is found (bound as root, served unprivileged), else on port 0.
fn serve_as_nobody(server: &Path) -> (Running, SocketAddr) {
    // Another process may take a port between our look and handover's
    // bind: then the next one.
    for p in (900..1000).rev() {
        // std sets SO_REUSEADDR, as handover does.
        if TcpListener::bind(("127.0.0.1", p)).is_err() {
            continue;
        }
        let spec = format!("127.0.0.1:{p}");
        let h =
            Running::spawn(handover(["run", "--user", "nobody", "-l", &spec, "--"]).arg(server));
        let line = h.try_next_line(TIMEOUT);
        if let Some(l) = line.as_deref().and_then(Listening::parse) {
            return (h, l.tcp());
        }
        let mut h = h;
        h.wait(TIMEOUT);
        assert!(h.stderr().contains("already in use"), "{}", h.report());
    }
    let h = Running::spawn(
        handover(["run", "--user", "nobody", "-l", "127.0.0.1:0", "--"]).arg(server),
    );
    let addr = h.tcp_addr();
    (h, addr)
}

#[test]
fn user_nobody_serves_through_the_socket_bound_as_root() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: --user needs root");
        return;
    }
    let dir = TempDir::new("user");
    let server = public_copy(&example("listenfd_server"), &dir);
    let (h, addr) = serve_as_nobody(&server);
    let (pid, on) = served_by(&http_get(addr));
    assert_eq!(on, addr.to_string());
    assert_eq!(proc_ids(pid, "Uid"), [65534; 4], "{}", h.report());
    assert_eq!(proc_ids(pid, "Gid"), [65534; 4], "{}", h.report());
    assert_eq!(
        proc_ids(pid, "Groups"),
        [65534],
        "supplementary groups of nobody, none of root's"
    );
    drop(h);

    // Accept mode: the handler tells who it is through the connection.
    let h = Running::spawn(
        handover([
            "run",
            "--accept",
            "--user",
            "nobody",
            "-l",
            "127.0.0.1:0",
            "--",
        ])
        .args(sh(r#"echo "$(id -u) $(id -g) $(id -G) $USER $HOME" >&3"#)),
    );
    let out = read_all(connect(h.tcp_addr()));
    assert_eq!(
        out.trim(),
        "65534 65534 65534 nobody /nonexistent",
        "{}",
        h.report()
    );
    drop(h);

    // --group alone keeps the user and replaces every group.
    let h = Running::spawn(
        handover([
            "run",
            "--accept",
            "--group",
            "nogroup",
            "-l",
            "127.0.0.1:0",
            "--",
        ])
        .args(sh(r#"echo "$(id -u) $(id -g) $(id -G)" >&3"#)),
    );
    let out = read_all(connect(h.tcp_addr()));
    assert_eq!(out.trim(), "0 65534 65534", "{}", h.report());
}

// 9. Descriptors: exactly the sockets, nothing else, whatever handover
// inherited.

/// Prints the open descriptors of the python process itself, probed with
/// fstat (listing /proc/self/fd would open one more), and for each
/// socket among them its type, local address and peer; then the
/// activation variables, LISTEN_PIDFDID checked against a pidfd of its
/// own where the kernel gives pidfds inode numbers. Writes to stdout.
const PROBE: &str = r#"
import os, socket, resource
limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 16)
fds = []
for fd in range(limit):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
lines = ["fds: " + " ".join(map(str, fds))]
def addr(a):
    return "%s:%d" % a[:2] if isinstance(a, tuple) else a
for fd in fds:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        continue
    try:
        line = "fd %d: %s %s" % (fd, s.type.name, addr(s.getsockname()))
        try:
            line += " peer " + addr(s.getpeername())
        except OSError:
            pass
        lines.append(line)
    finally:
        s.close()
env = os.environ
me, parent = os.pidfd_open(os.getpid()), os.pidfd_open(os.getppid())
pidfs = os.fstat(me).st_ino != os.fstat(parent).st_ino
want = str(os.fstat(me).st_ino) if pidfs else None
pidfdid = "ok" if env.get("LISTEN_PIDFDID") == want else "wrong (%s, %s)" % (env.get("LISTEN_PIDFDID"), want)
if "LISTEN_PID" not in env:
    pidfdid = "ok" if "LISTEN_PIDFDID" not in env else "without LISTEN_PID"
lines.append("env: %s|%s|%s|pidfdid %s" % (
    env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES"),
    env.get("LISTEN_PID") == str(os.getpid()), pidfdid))
os.write(1, ("\n".join(lines) + "\nend\n").encode())
"#;

/// The lines that PROBE printed on handover's stdout.
fn probe_output(h: &Running) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = h.next_line(TIMEOUT);
        if l == "end" {
            return lines;
        }
        if l.starts_with("fds: ") || l.starts_with("fd ") || l.starts_with("env: ") {
            lines.push(l);
        }
    }
}

/// Fills descriptors 10..=400 and 1000 of the child with non-CLOEXEC
/// duplicates of /dev/null and of `sock`, as a careless parent would leave
/// them.
fn leak_descriptors(cmd: &mut Command, sock: &impl AsRawFd) {
    let sock = sock.as_raw_fd();
    // SAFETY: the closure only calls dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for fd in (10..=400).chain([1000]) {
                let src = if fd % 2 == 0 { 0 } else { sock };
                if libc::dup2(src, fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[test]
fn the_program_gets_exactly_stdio_and_the_sockets_in_order() {
    let dir = TempDir::new("fds");
    let sock = dir.join("b.sock");
    let careless = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = handover(["run", "-l", "127.0.0.1:0=a", "-l"]);
    cmd.arg(format!("{}=b", sock.display()))
        .args(["-l", "udp:127.0.0.1:0", "--"])
        .arg(python3())
        .args(["-c", PROBE]);
    leak_descriptors(&mut cmd, &careless);
    let mut h = Running::spawn(&mut cmd);
    let l = h.listening(3);
    assert_eq!(
        l.iter().map(|l| l.fd).collect::<Vec<_>>(),
        [Some(3), Some(4), Some(5)]
    );
    let out = probe_output(&h);
    assert_eq!(
        out,
        [
            "fds: 0 1 2 3 4 5".to_owned(),
            format!("fd 3: SOCK_STREAM {}", l[0].addr),
            format!("fd 4: SOCK_STREAM {}", sock.display()),
            format!(
                "fd 5: SOCK_DGRAM {}",
                l[2].addr.strip_prefix("udp:").unwrap_or(&l[2].addr)
            ),
            "env: 3|a:b:unknown|True|pidfdid ok".to_owned(),
        ],
        "{}",
        h.report()
    );
    let status = h.wait(TIMEOUT);
    assert!(status.success(), "{}\n{}", describe(status), h.report());
    assert!(
        !sock.exists(),
        "the socket file is removed when handover exits"
    );
}

#[test]
fn connection_handlers_get_exactly_stdio_and_the_connection() {
    let careless = TcpListener::bind("127.0.0.1:0").unwrap();

    // --accept: the connection at 3, nothing else.
    let mut cmd = handover(["run", "--accept", "-l", "127.0.0.1:0", "--"]);
    cmd.arg(python3()).args(["-c", PROBE]);
    leak_descriptors(&mut cmd, &careless);
    let h = Running::spawn(&mut cmd);
    let addr = h.tcp_addr();
    let s = connect(addr);
    let client = s.local_addr().unwrap();
    assert_eq!(read_all(s), "", "the probe writes to stdout here");
    let out = probe_output(&h);
    assert_eq!(
        out,
        [
            "fds: 0 1 2 3".to_owned(),
            // The peer of descriptor 3 is this very client.
            format!("fd 3: SOCK_STREAM {addr} peer {client}"),
            "env: 1|connection|True|pidfdid ok".to_owned(),
        ],
        "{}",
        h.report()
    );
    drop(h);

    // --inetd: the connection is stdin and stdout, no descriptor 3.
    let mut cmd = handover(["run", "--inetd", "-l", "127.0.0.1:0", "--"]);
    cmd.arg(python3()).args(["-c", PROBE]);
    leak_descriptors(&mut cmd, &careless);
    let h = Running::spawn(&mut cmd);
    let addr = h.tcp_addr();
    let s = connect(addr);
    let client = s.local_addr().unwrap();
    let out = read_all(s);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "fds: 0 1 2",
            &format!("fd 0: SOCK_STREAM {addr} peer {client}"),
            &format!("fd 1: SOCK_STREAM {addr} peer {client}"),
            "env: None|None|False|pidfdid ok",
            "end"
        ],
        "{}",
        h.report()
    );
}

// --fd: a descriptor handover inherited is passed on.

#[test]
fn an_inherited_descriptor_is_passed_on_with_its_name() {
    let server = example("listenfd_server");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let raw = listener.as_raw_fd();
    let mut cmd = handover(["run", "--fd", "7=inherited", "--"]);
    cmd.arg(&server);
    // SAFETY: dup2 only, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec.
            let rc = if raw == 7 {
                libc::fcntl(7, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 7)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let h = Running::spawn(&mut cmd);
    // Only handover (and its program) hold the socket now.
    drop(listener);
    let (pid, on) = served_by(&http_get(addr));
    assert_eq!(on, addr.to_string(), "{}", h.report());
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.split('\0').any(|v| v == "LISTEN_FDNAMES=inherited"),
        "{environ:?}"
    );
    assert!(
        environ.split('\0').any(|v| v == "LISTEN_FDS=1"),
        "{environ:?}"
    );
}
