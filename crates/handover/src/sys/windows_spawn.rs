//! Windows: starting a child that inherits exactly the listed handles.
//!
//! CreateProcessW with bInheritHandles set hands a child *every*
//! inheritable handle of the parent, unless the start-up information
//! carries PROC_THREAD_ATTRIBUTE_HANDLE_LIST: then only the handles in
//! that list are inherited. Every handover child is started with a list.
//! A listed handle must itself be inheritable, so the handles handed over
//! are marked inheritable for the duration of CreateProcessW and unmarked
//! right after, under a lock that serialises handover's own spawns. (A
//! `std::process::Command` spawned by another thread inside that window
//! could still inherit them: std takes a lock of its own that we cannot
//! share. Documented in `windows::CommandExt`.)
//!
//! Sockets are never inherited: Winsock sockets cannot be relied on as
//! inheritable handles (Layered Service Providers), so they travel over
//! the activation bootstrap as WSAPROTOCOL_INFOW instead (`bootstrap.rs`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsRawHandle, AsRawSocket, FromRawHandle, OwnedHandle, RawHandle};
use std::os::windows::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Mutex;

use windows_sys::Win32::Foundation::{
    DuplicateHandle, SetHandleInformation, DUPLICATE_SAME_ACCESS, HANDLE, HANDLE_FLAG_INHERIT,
    INVALID_HANDLE_VALUE, WAIT_OBJECT_0, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    WSADuplicateSocketW, WSAGetLastError, WSAPROTOCOL_INFOW,
};
use windows_sys::Win32::Security::Cryptography::{
    BCryptGenRandom, BCRYPT_USE_SYSTEM_PREFERRED_RNG,
};
use windows_sys::Win32::System::Console::{
    GetStdHandle, STD_ERROR_HANDLE, STD_INPUT_HANDLE, STD_OUTPUT_HANDLE,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation,
    SetInformationJobObject, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use windows_sys::Win32::System::Threading::{
    CreateProcessW, DeleteProcThreadAttributeList, GetCurrentProcess, GetExitCodeProcess,
    InitializeProcThreadAttributeList, ResumeThread, TerminateProcess, UpdateProcThreadAttribute,
    WaitForSingleObject, CREATE_SUSPENDED, CREATE_UNICODE_ENVIRONMENT,
    EXTENDED_STARTUPINFO_PRESENT, INFINITE, LPPROC_THREAD_ATTRIBUTE_LIST, PROCESS_INFORMATION,
    PROC_THREAD_ATTRIBUTE_HANDLE_LIST, STARTF_USESTDHANDLES, STARTUPINFOEXW,
};

use super::OwnedRaw;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::spawn::Command;

/// A started child: its pid and a handle to its process.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub process: OwnedHandle,
    /// The job that ends the child when its last handle closes, when the
    /// command asked for that (`end_with_parent`).
    _job: Option<OwnedHandle>,
}

/// Serialises the mark-inheritable / CreateProcessW / unmark window of
/// handover's own spawns, so that one child never picks up another's
/// handles.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn spawn_child(
    cmd: &Command,
    path: &Path,
    argv: &[OsString],
    env: Vec<OsString>,
) -> Result<Spawned> {
    let application = wide_nul(path.as_os_str());
    let mut command_line = command_line(argv)?;
    let env_block = environment_block(env)?;
    let cwd = cmd.cwd().map(|d| wide_nul(d.as_os_str()));

    let _serial = SPAWN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut inherited = Inherited::default();
    let stdio = [STD_INPUT_HANDLE, STD_OUTPUT_HANDLE, STD_ERROR_HANDLE]
        .iter()
        .zip(&cmd.windows.stdio)
        .map(|(&which, given)| match given {
            Some(handle) => inherited.mark(kernel_handle(handle, "a standard handle")?),
            // Not chosen: the child gets a copy of ours, as std does.
            // SAFETY: GetStdHandle only reads this process's parameters.
            None => inherited.copy(unsafe { GetStdHandle(which) }),
        })
        .collect::<Result<Vec<HANDLE>>>()?;
    for handle in &cmd.windows.inherit {
        inherited.mark(kernel_handle(handle, "an inherited handle")?)?;
    }

    let list = inherited.values();
    let mut attributes = AttributeList::with_handles(&list)?;
    // SAFETY: STARTUPINFOEXW is plain data; zeroes are its defaults.
    let mut si: STARTUPINFOEXW = unsafe { std::mem::zeroed() };
    si.StartupInfo.cb = std::mem::size_of::<STARTUPINFOEXW>() as u32;
    si.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
    si.StartupInfo.hStdInput = stdio[0];
    si.StartupInfo.hStdOutput = stdio[1];
    si.StartupInfo.hStdError = stdio[2];
    si.lpAttributeList = attributes.as_ptr();
    // SAFETY: PROCESS_INFORMATION is plain data, filled by CreateProcessW.
    let mut pi: PROCESS_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: every string is NUL-terminated UTF-16 that outlives the
    // call; the command line is a mutable buffer as CreateProcessW needs;
    // the environment block is double-NUL-terminated UTF-16 (flagged as
    // such); `si` carries a live attribute list whose handle list refers
    // to `list`, which outlives the call.
    let ok = unsafe {
        CreateProcessW(
            application.as_ptr(),
            command_line.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            (!list.is_empty()) as i32,
            EXTENDED_STARTUPINFO_PRESENT
                | CREATE_UNICODE_ENVIRONMENT
                | if cmd.windows.end_with_parent {
                    CREATE_SUSPENDED
                } else {
                    0
                }
                | cmd.windows.creation_flags,
            env_block.as_ptr().cast(),
            cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            &si.StartupInfo,
            &mut pi,
        )
    } != 0;
    let spawn_error = (!ok).then(io::Error::last_os_error);
    drop(attributes);
    // Unmark and close copies before anything else can spawn.
    drop(inherited);
    drop(_serial);
    if let Some(e) = spawn_error {
        return Err(Error::Spawn {
            program: argv[0].to_string_lossy().into_owned(),
            stage: "CreateProcessW",
            source: e,
        });
    }
    // SAFETY: CreateProcessW succeeded: both handles are open and ours.
    let (process, thread) = unsafe {
        (
            OwnedHandle::from_raw_handle(pi.hProcess as RawHandle),
            OwnedHandle::from_raw_handle(pi.hThread as RawHandle),
        )
    };
    let job = if cmd.windows.end_with_parent {
        // The child was started suspended, so it runs no code outside the
        // job; if the job cannot be made, it never runs at all.
        match job_ending_with_us(&process) {
            Ok(job) => Some(job),
            Err(e) => {
                // SAFETY: our own suspended child's process handle.
                unsafe { TerminateProcess(process.as_raw_handle() as HANDLE, 1) };
                return Err(Error::Spawn {
                    program: argv[0].to_string_lossy().into_owned(),
                    stage: "putting the process in a job (end_with_parent)",
                    source: e,
                });
            }
        }
    } else {
        None
    };
    if job.is_some() {
        // SAFETY: the child's main thread, started suspended above.
        if unsafe { ResumeThread(thread.as_raw_handle() as HANDLE) } == u32::MAX {
            let e = io::Error::last_os_error();
            // SAFETY: our own child's process handle.
            unsafe { TerminateProcess(process.as_raw_handle() as HANDLE, 1) };
            return Err(Error::Spawn {
                program: argv[0].to_string_lossy().into_owned(),
                stage: "ResumeThread",
                source: e,
            });
        }
    }
    Ok(Spawned {
        pid: pi.dwProcessId,
        process,
        _job: job,
    })
}

/// A job object that kills every process in it when its last handle
/// closes (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE), with `process` in it. The
/// handle is not inheritable, so only this process keeps the job alive.
fn job_ending_with_us(process: &OwnedHandle) -> io::Result<OwnedHandle> {
    // SAFETY: an unnamed job with default security.
    let raw = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
    if raw.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that nothing else owns.
    let job = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
    // SAFETY: plain data; zeroes are "no limits".
    let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = unsafe { std::mem::zeroed() };
    limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    // SAFETY: the job is open; `limits` is live and of the size given.
    let ok = unsafe {
        SetInformationJobObject(
            raw,
            JobObjectExtendedLimitInformation,
            (&limits as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
            std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
        )
    } != 0;
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both handles are open.
    if unsafe { AssignProcessToJobObject(raw, process.as_raw_handle() as HANDLE) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(job)
}

fn kernel_handle(handle: &Handle, what: &str) -> Result<HANDLE> {
    match &handle.raw {
        OwnedRaw::Handle(h) => Ok(h.as_raw_handle() as HANDLE),
        OwnedRaw::Socket(_) => Err(Error::InvalidInput {
            what: "spawn",
            why: format!(
                "a socket cannot be {what} on Windows (Winsock does not promise that \
                 inherited sockets work); pass it with Command::activation instead"
            ),
        }),
    }
}

/// The handles one spawn hands to the child, marked inheritable until drop.
#[derive(Default)]
struct Inherited {
    /// Handles the command owns, marked inheritable for the spawn.
    marked: Vec<HANDLE>,
    /// Inheritable copies of our own standard handles, closed after.
    copies: Vec<OwnedHandle>,
}

impl Inherited {
    fn mark(&mut self, h: HANDLE) -> Result<HANDLE> {
        if self.marked.contains(&h) {
            return Ok(h);
        }
        // SAFETY: `h` is an open handle owned by the command.
        let ok = unsafe { SetHandleInformation(h, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT) } != 0;
        if !ok {
            return Err(Error::io("SetHandleInformation")(io::Error::last_os_error()));
        }
        self.marked.push(h);
        Ok(h)
    }

    /// An inheritable duplicate of `h`; a null or invalid `h` (no such
    /// standard handle) stays null.
    fn copy(&mut self, h: HANDLE) -> Result<HANDLE> {
        if h.is_null() || h == INVALID_HANDLE_VALUE {
            return Ok(std::ptr::null_mut());
        }
        let mut copy: HANDLE = std::ptr::null_mut();
        // SAFETY: duplicates a handle of this process into this process;
        // `copy` receives a new handle that we own.
        let ok = unsafe {
            let me = GetCurrentProcess();
            DuplicateHandle(me, h, me, &mut copy, 0, 1, DUPLICATE_SAME_ACCESS)
        } != 0;
        if !ok {
            // A standard handle that cannot be duplicated (a detached
            // console, say): the child starts without it.
            return Ok(std::ptr::null_mut());
        }
        // SAFETY: DuplicateHandle succeeded; the copy is ours alone.
        self.copies
            .push(unsafe { OwnedHandle::from_raw_handle(copy as RawHandle) });
        Ok(copy)
    }

    fn values(&self) -> Vec<HANDLE> {
        let copies = self.copies.iter().map(|c| c.as_raw_handle() as HANDLE);
        self.marked.iter().copied().chain(copies).collect()
    }
}

impl Drop for Inherited {
    fn drop(&mut self) {
        for &h in &self.marked {
            // SAFETY: the command still owns `h`; this clears the flag set
            // in `mark`.
            unsafe { SetHandleInformation(h, HANDLE_FLAG_INHERIT, 0) };
        }
    }
}

/// A PROC_THREAD_ATTRIBUTE_LIST with one attribute, the handle list.
struct AttributeList {
    /// u64 units keep the opaque list suitably aligned.
    buf: Vec<u64>,
    initialized: bool,
}

impl AttributeList {
    fn with_handles(handles: &[HANDLE]) -> Result<AttributeList> {
        let mut list = AttributeList {
            buf: Vec::new(),
            initialized: false,
        };
        if handles.is_empty() {
            return Ok(list);
        }
        let mut size = 0usize;
        // SAFETY: a null list asks only for the size needed.
        unsafe { InitializeProcThreadAttributeList(std::ptr::null_mut(), 1, 0, &mut size) };
        list.buf = vec![0u64; size.div_ceil(8)];
        // SAFETY: `buf` holds at least `size` bytes, aligned to 8.
        let ok = unsafe { InitializeProcThreadAttributeList(list.as_ptr(), 1, 0, &mut size) } != 0;
        if !ok {
            return Err(Error::io("InitializeProcThreadAttributeList")(
                io::Error::last_os_error(),
            ));
        }
        list.initialized = true;
        // SAFETY: the list is initialised; `handles` outlives the list's
        // use by CreateProcessW (the caller keeps it until after the call).
        let ok = unsafe {
            UpdateProcThreadAttribute(
                list.as_ptr(),
                0,
                PROC_THREAD_ATTRIBUTE_HANDLE_LIST as usize,
                handles.as_ptr().cast(),
                std::mem::size_of_val(handles),
                std::ptr::null_mut(),
                std::ptr::null(),
            )
        } != 0;
        if !ok {
            return Err(Error::io("UpdateProcThreadAttribute")(
                io::Error::last_os_error(),
            ));
        }
        Ok(list)
    }

    fn as_ptr(&mut self) -> LPPROC_THREAD_ATTRIBUTE_LIST {
        if self.buf.is_empty() {
            std::ptr::null_mut()
        } else {
            self.buf.as_mut_ptr().cast()
        }
    }
}

impl Drop for AttributeList {
    fn drop(&mut self) {
        if self.initialized {
            // SAFETY: initialised above and not used after this.
            unsafe { DeleteProcThreadAttributeList(self.buf.as_mut_ptr().cast()) };
        }
    }
}

fn wide_nul(s: &OsStr) -> Vec<u16> {
    s.encode_wide().chain(Some(0)).collect()
}

fn invalid(why: String) -> Error {
    Error::InvalidInput { what: "spawn", why }
}

/// The command line, quoted so that the C runtime's (and
/// CommandLineToArgvW's) parser gives the child back exactly `argv`.
fn command_line(argv: &[OsString]) -> Result<Vec<u16>> {
    let mut line: Vec<u16> = Vec::new();
    for (i, arg) in argv.iter().enumerate() {
        let arg: Vec<u16> = arg.encode_wide().collect();
        if arg.contains(&0) {
            return Err(invalid("an argument contains a NUL character".into()));
        }
        if i > 0 {
            line.push(b' ' as u16);
        }
        if i == 0 {
            // The program name is parsed by different rules: no escapes,
            // quotes only group. It cannot contain a quote at all.
            if arg.contains(&(b'"' as u16)) {
                return Err(invalid("the program name contains '\"'".into()));
            }
            line.push(b'"' as u16);
            line.extend_from_slice(&arg);
            line.push(b'"' as u16);
            continue;
        }
        quote_arg(&arg, &mut line);
    }
    line.push(0);
    Ok(line)
}

fn quote_arg(arg: &[u16], line: &mut Vec<u16>) {
    let needs_quotes = arg.is_empty()
        || arg
            .iter()
            .any(|&c| c == b' ' as u16 || c == b'\t' as u16 || c == b'"' as u16);
    if !needs_quotes {
        line.extend_from_slice(arg);
        return;
    }
    line.push(b'"' as u16);
    let mut backslashes = 0;
    for &c in arg {
        if c == b'\\' as u16 {
            backslashes += 1;
            continue;
        }
        // Backslashes are literal unless they precede a quote: then each
        // is doubled, and the quote itself escaped.
        let n = if c == b'"' as u16 {
            backslashes * 2 + 1
        } else {
            backslashes
        };
        line.extend(std::iter::repeat_n(b'\\' as u16, n));
        line.push(c);
        backslashes = 0;
    }
    // Before the closing quote, trailing backslashes are doubled too.
    line.extend(std::iter::repeat_n(b'\\' as u16, backslashes * 2));
    line.push(b'"' as u16);
}

/// `KEY=VALUE\0…\0\0`, sorted by key without regard to case, as
/// CreateProcessW documents.
fn environment_block(env: Vec<OsString>) -> Result<Vec<u16>> {
    let mut vars: Vec<Vec<u16>> = env
        .iter()
        .map(|kv| kv.encode_wide().collect::<Vec<u16>>())
        .collect();
    if vars.iter().any(|kv| kv.contains(&0)) {
        return Err(invalid(
            "an environment variable contains a NUL character".into(),
        ));
    }
    let upper_key = |kv: &Vec<u16>| -> Vec<u16> {
        kv.iter()
            .take_while(|&&c| c != b'=' as u16)
            .map(|&c| {
                if (b'a' as u16..=b'z' as u16).contains(&c) {
                    c - 32
                } else {
                    c
                }
            })
            .collect()
    };
    vars.sort_by_key(upper_key);
    let mut block: Vec<u16> = Vec::new();
    for kv in vars {
        block.extend_from_slice(&kv);
        block.push(0);
    }
    if block.is_empty() {
        block.push(0);
    }
    block.push(0);
    Ok(block)
}

/// Whether `path` names a file that CreateProcessW could start.
pub(crate) fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// The names a program may have on disk: as given, and with `.exe` when it
/// has no extension (as CreateProcessW itself searches).
pub(crate) fn program_candidates(path: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![path.to_owned()];
    if path.extension().is_none() {
        out.push(path.with_extension("exe"));
    }
    out
}

/// Waits for the child; `hang` false only looks (None while it runs).
pub(crate) fn wait_child(child: &Spawned, hang: bool) -> io::Result<Option<ExitStatus>> {
    let timeout = if hang { INFINITE } else { 0 };
    // SAFETY: the process handle is open for the child's lifetime.
    match unsafe { WaitForSingleObject(child.process.as_raw_handle() as HANDLE, timeout) } {
        WAIT_OBJECT_0 => {}
        WAIT_TIMEOUT => return Ok(None),
        _ => return Err(io::Error::last_os_error()),
    }
    let mut code = 0u32;
    // SAFETY: as above; `code` is live.
    if unsafe { GetExitCodeProcess(child.process.as_raw_handle() as HANDLE, &mut code) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(ExitStatus::from_raw(code)))
}

/// Ends the child with exit code 1 (TerminateProcess).
pub(crate) fn kill_child(child: &Spawned) -> io::Result<()> {
    // SAFETY: the process handle is open and has PROCESS_TERMINATE.
    if unsafe { TerminateProcess(child.process.as_raw_handle() as HANDLE, 1) } != 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // Terminating a process that has already exited is refused; that is
    // the outcome asked for.
    match wait_child(child, false) {
        Ok(Some(_)) => Ok(()),
        _ => Err(e),
    }
}

/// Tells, from a second handle to a child's process, whether it has
/// exited (for a thread that serves the child while the parent owns it).
#[derive(Debug)]
pub(crate) struct ExitWatch(OwnedHandle);

impl Spawned {
    pub(crate) fn exit_watch(&self) -> io::Result<ExitWatch> {
        Ok(ExitWatch(self.process.try_clone()?))
    }
}

impl ExitWatch {
    pub(crate) fn has_exited(&self) -> bool {
        // SAFETY: the handle is open; a zero timeout only looks.
        unsafe { WaitForSingleObject(self.0.as_raw_handle() as HANDLE, 0) == WAIT_OBJECT_0 }
    }
}

/// Random bytes from the system's preferred generator (BCryptGenRandom),
/// for names and secrets that other processes must not guess.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: `out` is live and writable for N bytes; no algorithm handle
    // is needed with BCRYPT_USE_SYSTEM_PREFERRED_RNG.
    let status = unsafe {
        BCryptGenRandom(
            std::ptr::null_mut(),
            out.as_mut_ptr(),
            N as u32,
            BCRYPT_USE_SYSTEM_PREFERRED_RNG,
        )
    };
    if status < 0 {
        return Err(Error::io("BCryptGenRandom")(io::Error::other(format!(
            "NTSTATUS {status:#x}"
        ))));
    }
    Ok(out)
}

/// A WSAPROTOCOL_INFOW for process `pid` to rebuild `handle`'s socket
/// from (WSADuplicateSocketW), as raw bytes: systemfd's wire format.
pub(crate) fn socket_protocol_info_for(handle: &Handle, pid: u32) -> io::Result<Vec<u8>> {
    let OwnedRaw::Socket(s) = &handle.raw else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
    };
    // SAFETY: WSAPROTOCOL_INFOW is plain data; all zeroes is a valid value.
    let mut info: WSAPROTOCOL_INFOW = unsafe { std::mem::zeroed() };
    // SAFETY: the socket is open; `info` is live and writable.
    if unsafe { WSADuplicateSocketW(s.as_raw_socket() as usize, pid, &mut info) } != 0 {
        // SAFETY: reads this thread's last Winsock error.
        return Err(io::Error::from_raw_os_error(unsafe { WSAGetLastError() }));
    }
    // SAFETY: WSAPROTOCOL_INFOW is plain data of exactly this size.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&info as *const WSAPROTOCOL_INFOW).cast::<u8>(),
            std::mem::size_of::<WSAPROTOCOL_INFOW>(),
        )
    };
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> String {
        let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        let mut w = command_line(&argv).unwrap();
        w.pop();
        String::from_utf16(&w).unwrap()
    }

    #[test]
    fn quoting_follows_the_c_runtime_rules() {
        assert_eq!(line(&["p", "a", "b c"]), r#""p" a "b c""#);
        assert_eq!(line(&["p", ""]), r#""p" """#);
        assert_eq!(line(&["p", r#"say "hi""#]), r#""p" "say \"hi\"""#);
        assert_eq!(line(&["p", r"C:\dir\"]), r#""p" C:\dir\"#);
        assert_eq!(line(&["p", r"C:\my dir\"]), r#""p" "C:\my dir\\""#);
        assert_eq!(line(&["p", r#"a\"b"#]), r#""p" "a\\\"b""#);
        assert!(command_line(&["p\"q".into()]).is_err());
    }

    #[test]
    fn environment_blocks_are_sorted_and_double_terminated() {
        let block = environment_block(vec!["b=2".into(), "A=1".into()]).unwrap();
        assert_eq!(String::from_utf16(&block).unwrap(), "A=1\0b=2\0\0");
        assert_eq!(environment_block(Vec::new()).unwrap(), vec![0, 0]);
    }
}
