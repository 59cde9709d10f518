//! Starting children on Windows: exact inheritance through
//! PROC_THREAD_ATTRIBUTE_HANDLE_LIST, stdin/stdout pipes with a correct
//! end of input, waiting and killing, and socket activation through the
//! pipe bootstrap and systemfd's protocol. Run under Wine by
//! scripts/windows-test.sh.
//!
//! Children are this test binary again, run with `--exact TEST` and a role
//! in the environment. A child proves it ran its part by printing a
//! marker: a filtered-out test also exits 0, so the exit code alone could
//! not fail.

#![cfg(windows)]

mod windows_common;

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::time::Duration;

use handover::windows::CommandExt;
use handover::{Channel, Command, Error, Handle};
use windows_common::*;
use windows_sys::Win32::Foundation::{
    GetHandleInformation, SetHandleInformation, HANDLE_FLAG_INHERIT,
};
use windows_sys::Win32::Storage::FileSystem::{
    GetFileInformationByHandle, BY_HANDLE_FILE_INFORMATION,
};

const WAIT: Duration = Duration::from_secs(20);
const ROLE: &str = "HANDOVER_TEST_ROLE";

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// This test binary, to run test `test` in the given role.
fn child_command(test: &str, role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    cmd
}

/// A pipe whose write end goes to a child's stdout; the read end stays.
fn stdout_pipe(cmd: &mut Command) -> File {
    let (r, w) = anonymous_pipe();
    cmd.stdout(Handle::from(OwnedHandle::from(w)));
    r
}

/// Everything a child wrote to the pipe, once it has exited.
fn read_all(mut r: File) -> String {
    let mut out = String::new();
    r.read_to_string(&mut out).unwrap();
    out
}

/// The volume serial number and file index: which file a handle is.
fn file_identity(h: RawHandle) -> Option<(u32, u32, u32)> {
    // SAFETY: plain data, filled by the call.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: only asks about a handle value; `info` is live.
    let ok = unsafe { GetFileInformationByHandle(h as _, &mut info) } != 0;
    ok.then_some((
        info.dwVolumeSerialNumber,
        info.nFileIndexHigh,
        info.nFileIndexLow,
    ))
}

fn identity_text(id: (u32, u32, u32)) -> String {
    format!("{}:{}:{}", id.0, id.1, id.2)
}

// --- exact inheritance ------------------------------------------------

/// The child's part: the listed handle is there, at the same value, and
/// is the listed file; the unlisted (yet inheritable) one is not.
fn child_checks_its_handles() {
    let listed: usize = std::env::var("LISTED").unwrap().parse().unwrap();
    let unlisted: usize = std::env::var("UNLISTED").unwrap().parse().unwrap();
    let unlisted_id = std::env::var("UNLISTED_ID").unwrap();
    let mut flags = 0;
    // SAFETY: asks about a handle value only.
    assert_ne!(
        unsafe { GetHandleInformation(listed as _, &mut flags) },
        0,
        "the listed handle is not there"
    );
    // SAFETY: the parent handed us this handle at this value; this
    // process owns its inherited copy.
    let mut file = File::from(unsafe { OwnedHandle::from_raw_handle(listed as RawHandle) });
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    assert_eq!(text, "listed");
    // The unlisted handle's value is either not a handle here or some
    // other object, never the parent's unlisted file.
    let found = file_identity(unlisted as RawHandle).map(identity_text);
    assert_ne!(
        found.as_deref(),
        Some(unlisted_id.as_str()),
        "the unlisted handle was inherited"
    );
    println!("<<checked: unlisted handle absent>>");
}

#[test]
fn a_child_inherits_exactly_the_listed_handles() {
    if role().as_deref() == Some("inherit") {
        child_checks_its_handles();
        return;
    }
    let _g = serial();
    let listed = temp_file(b"listed");
    let unlisted = temp_file(b"secret");
    let unlisted_raw = unlisted.as_raw_handle();
    // Inheritable, as a careless library might leave it: a child started
    // with bInheritHandles would get it, unless a handle list keeps it out.
    // SAFETY: the handle is open and ours.
    assert_ne!(
        unsafe {
            SetHandleInformation(unlisted_raw as _, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT)
        },
        0
    );
    let listed_value = listed.as_raw_handle() as usize;
    let mut cmd = child_command("a_child_inherits_exactly_the_listed_handles", "inherit");
    cmd.env("LISTED", listed_value.to_string())
        .env("UNLISTED", (unlisted_raw as usize).to_string())
        .env(
            "UNLISTED_ID",
            identity_text(file_identity(unlisted_raw).unwrap()),
        );
    cmd.inherit(Handle::from(OwnedHandle::from(listed)))
        .unwrap();
    let out = stdout_pipe(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let text = read_all(out);
    assert!(child.wait().unwrap().success(), "child said: {text}");
    assert!(
        text.contains("<<checked: unlisted handle absent>>"),
        "{text}"
    );
    // The handle list did not leave our own copy inheritable either way.
    let mut flags = 0;
    // SAFETY: asks about our own open handle.
    unsafe { GetHandleInformation(unlisted_raw as _, &mut flags) };
    assert_eq!(flags & HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT);
}

#[test]
fn sockets_are_not_inherited_but_refused_with_a_reason() {
    let mut cmd = Command::new("cmd.exe");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = cmd.inherit(Handle::from(l)).unwrap_err();
    assert!(err.to_string().contains("activation"), "{err}");
}

#[test]
fn spawning_leaks_no_handle() {
    if role().as_deref() == Some("quiet") {
        println!("<<quiet child>>");
        return;
    }
    let _g = serial();
    no_leak("spawn with stdout pipe and an inherited file", || {
        let mut cmd = child_command("spawning_leaks_no_handle", "quiet");
        cmd.inherit(Handle::from(OwnedHandle::from(temp_file(b"x"))))
            .unwrap();
        let out = stdout_pipe(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let text = read_all(out);
        assert!(child.wait().unwrap().success());
        assert!(text.contains("<<quiet child>>"), "{text}");
    });
}

// --- stdin and stdout ---------------------------------------------------

/// The child's part: read stdin to its end, answer with it upper-cased
/// between markers, and exit with code 3.
fn child_upper_cases_stdin() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).unwrap();
    let mut out = std::io::stdout().lock();
    write!(out, "<<").unwrap();
    out.write_all(&input.to_ascii_uppercase()).unwrap();
    write!(out, ">>").unwrap();
    out.flush().unwrap();
    std::process::exit(3);
}

/// The scenario of the seed on inheritable SOCKETs: the parent writes,
/// signals the end of input by closing its end, and reads until the
/// child is done. More than a pipe buffer goes each way.
#[test]
fn stdin_and_stdout_pipes_carry_data_and_end_of_input() {
    if role().as_deref() == Some("upper") {
        child_upper_cases_stdin();
        return;
    }
    let _g = serial();
    let input: Vec<u8> = b"hello, handover\n".repeat(16 * 1024);
    let (stdin_r, mut stdin_w) = anonymous_pipe();
    let mut cmd = child_command(
        "stdin_and_stdout_pipes_carry_data_and_end_of_input",
        "upper",
    );
    cmd.stdin(Handle::from(OwnedHandle::from(stdin_r)));
    let out = stdout_pipe(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    // The command held the child's ends; without dropping it the child
    // would never see the end of its input, nor we the end of its output.
    drop(cmd);
    let writer = std::thread::spawn(move || {
        stdin_w.write_all(&input).unwrap();
        // Dropping the write end is the end of input.
    });
    let text = read_all(out);
    writer.join().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let start = text.find("<<").expect("the child's answer");
    let answer = &text[start + 2..text.rfind(">>").unwrap()];
    assert_eq!(
        answer.as_bytes(),
        b"HELLO, HANDOVER\n".repeat(16 * 1024).as_slice()
    );
}

// --- waiting and killing ------------------------------------------------

#[test]
fn a_child_can_be_waited_for_and_killed() {
    if role().as_deref() == Some("sleep") {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let mut child = child_command("a_child_can_be_waited_for_and_killed", "sleep")
        .spawn()
        .unwrap();
    assert!(child.id() > 0);
    assert_eq!(child.try_wait().unwrap(), None);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(status.code(), Some(1));
    // Killing an exited child is not an error.
    child.kill().unwrap();
}

#[test]
fn a_missing_program_is_reported_by_name() {
    let err = Command::new("no-such-program-handover")
        .spawn()
        .unwrap_err();
    assert!(matches!(err, Error::ProgramNotFound { .. }), "{err}");
    let err = Command::new(r"C:\no\such\dir\prog.exe")
        .spawn()
        .unwrap_err();
    assert!(matches!(err, Error::ProgramNotFound { .. }), "{err}");
}

#[test]
fn programs_are_found_on_path_without_their_extension() {
    let mut cmd = Command::new("cmd");
    cmd.args(["/c", "exit 5"]);
    let found = cmd.resolved_program().unwrap();
    assert!(
        found
            .to_string_lossy()
            .to_ascii_lowercase()
            .ends_with("cmd.exe"),
        "{}",
        found.display()
    );
    assert_eq!(cmd.spawn().unwrap().wait().unwrap().code(), Some(5));
}

// --- activation -----------------------------------------------------------

/// The child's part: take the activation sockets by name and serve one
/// connection on each.
fn child_takes_activation_sockets() {
    let mut sockets = handover::activation::take().unwrap();
    assert_eq!(sockets.len(), 2);
    assert_eq!(sockets.names(), ["http", "admin"]);
    for name in ["http", "admin"] {
        let listener = sockets
            .take_named(name)
            .unwrap()
            .into_tcp_listener()
            .unwrap();
        let (mut s, _) = listener.accept().unwrap();
        write!(s, "{name} served by {}", std::process::id()).unwrap();
    }
    println!("<<served>>");
}

fn fetch(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn activation_sockets_reach_the_child_through_the_bootstrap() {
    if role().as_deref() == Some("activated") {
        child_takes_activation_sockets();
        return;
    }
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (http_addr, admin_addr) = (http.local_addr().unwrap(), admin.local_addr().unwrap());
    let mut cmd = child_command(
        "activation_sockets_reach_the_child_through_the_bootstrap",
        "activated",
    );
    cmd.activation(Handle::from(http).with_name("http"))
        .unwrap()
        .activation(Handle::from(admin).with_name("admin"))
        .unwrap();
    let out = stdout_pipe(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    assert_eq!(fetch(http_addr), format!("http served by {pid}"));
    assert_eq!(fetch(admin_addr), format!("admin served by {pid}"));
    drop(cmd);
    let text = read_all(out);
    assert!(child.wait().unwrap().success(), "{text}");
    assert!(text.contains("<<served>>"), "{text}");
}

/// Another process that finds the pipe name (here: the test itself) is
/// refused, and the real child still gets its sockets afterwards.
#[test]
fn the_bootstrap_refuses_other_processes_and_keeps_serving() {
    if role().as_deref() == Some("late") {
        // Tell the parent where the pipe is, and wait until it has tried.
        let pipe = std::env::var("HANDOVER_ACTIVATION_PIPE").unwrap();
        println!("<<pipe {pipe}>>");
        std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
        let mut sockets = handover::activation::take().unwrap();
        let l = sockets.take(0).unwrap().into_tcp_listener().unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"late child served").unwrap();
        println!("<<served>>");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = child_command(
        "the_bootstrap_refuses_other_processes_and_keeps_serving",
        "late",
    );
    cmd.activation(Handle::from(listener)).unwrap();
    let (stdin_r, stdin_w) = anonymous_pipe();
    cmd.stdin(Handle::from(OwnedHandle::from(stdin_r)));
    let mut out = std::io::BufReader::new(stdout_pipe(&mut cmd));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut seen = String::new();
    let pipe = loop {
        let mut line = String::new();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "no pipe name: {seen}");
        seen.push_str(&line);
        if let Some(at) = line.find("<<pipe ") {
            let rest = &line[at + 7..];
            break rest[..rest.find(">>").unwrap()].to_owned();
        }
    };
    for _ in 0..2 {
        let ch = Channel::connect_name_timeout(&pipe, WAIT).unwrap();
        let msg = ch.recv_timeout(WAIT).unwrap().unwrap();
        assert!(msg.bytes.starts_with(b"REFUSED "), "{:?}", msg.bytes);
        assert!(msg.handles.is_empty());
    }
    drop(stdin_w);
    assert_eq!(fetch(addr), "late child served");
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    assert!(child.wait().unwrap().success(), "{text}");
    assert!(text.contains("<<served>>"), "{text}");
}

// --- systemfd's protocol ----------------------------------------------------

/// A listenfd-style client of systemfd's protocol, written from its
/// description: `SECRET|PID`, shut down writing, read WSAPROTOCOL_INFOWs.
fn systemfd_request(request: &str) -> Vec<u8> {
    let addr = std::env::var("SYSTEMFD_SOCKET_SERVER").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    reply
}

fn child_asks_systemfd() {
    let secret = std::env::var("SYSTEMFD_SOCKET_SECRET").unwrap();
    let me = std::process::id();
    // Hostile and malformed requests get nothing, and the server goes on.
    assert!(systemfd_request(&format!("00000000-0000-4000-8000-000000000000|{me}")).is_empty());
    assert!(systemfd_request("garbage").is_empty());
    assert!(systemfd_request(&"x".repeat(5000)).is_empty());
    let reply = systemfd_request(&format!("{secret}|{me}"));
    assert_eq!(reply.len(), 628, "one WSAPROTOCOL_INFOW");
    println!("<<systemfd ok>>");
}

#[test]
fn systemfd_protocol_serves_the_right_secret_only() {
    if role().as_deref() == Some("systemfd") {
        child_asks_systemfd();
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = child_command("systemfd_protocol_serves_the_right_secret_only", "systemfd");
    cmd.activation(Handle::from(listener))
        .unwrap()
        .systemfd(true);
    let out = stdout_pipe(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let text = read_all(out);
    assert!(child.wait().unwrap().success(), "{text}");
    assert!(text.contains("<<systemfd ok>>"), "{text}");
}
