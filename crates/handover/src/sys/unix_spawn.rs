//! Linux: starting a child with exactly the chosen descriptors.
//!
//! The child is made with clone(CLONE_VM | CLONE_VFORK), the technique
//! glibc's posix_spawn uses: no page tables are copied, so spawning costs
//! the same however large the parent is. Everything the child needs is
//! prepared in the parent first ([`Plan`]); between clone and execve the
//! child only makes system calls and writes into memory set aside for it —
//! no allocation, no locks, no panics. Because parent and child share
//! memory until execve, the child reports a failure by storing an errno and
//! a stage in the plan, which the parent reads once it resumes.
//!
//! No handler of the parent's may run in the child while it shares the
//! parent's memory. The parent blocks every signal before the clone, and
//! the child unblocks them only just before execve, once no disposition
//! but SIG_DFL and SIG_IGN is left: on x86-64 the clone is clone3 with
//! CLONE_CLEAR_SIGHAND (Linux 5.5), which resets the handlers as part of
//! the clone, and the child resets only what the parent found not at
//! SIG_DFL (the ignored signals, which survive execve, and a handful of
//! handlers again); elsewhere, or where the kernel refuses clone3, it is
//! clone, and the child resets every signal itself.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};

/// Why a child could not be started, as the child saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Dup,
    CloseOthers,
    Groups,
    Gid,
    Uid,
    Chdir,
    Exec,
    Setsid,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            1 => Stage::Dup,
            2 => Stage::CloseOthers,
            3 => Stage::Groups,
            4 => Stage::Gid,
            5 => Stage::Uid,
            6 => Stage::Chdir,
            8 => Stage::Setsid,
            _ => Stage::Exec,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Stage::Dup => 1,
            Stage::CloseOthers => 2,
            Stage::Groups => 3,
            Stage::Gid => 4,
            Stage::Uid => 5,
            Stage::Chdir => 6,
            Stage::Exec => 7,
            Stage::Setsid => 8,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stage::Dup => "placing descriptors (dup2)",
            Stage::CloseOthers => "closing other descriptors",
            Stage::Groups => "setting supplementary groups",
            Stage::Gid => "setting the group id",
            Stage::Uid => "setting the user id",
            Stage::Chdir => "changing directory",
            Stage::Exec => "executing the program",
            Stage::Setsid => "setting the session, process group or parent-death signal",
        }
    }
}

/// An environment entry whose value the child writes after clone.
struct Slot {
    /// Index of the entry in `envp`.
    index: usize,
    /// "NAME=" followed by room for a decimal u64 and its NUL.
    buf: Box<[u8]>,
    prefix: usize,
}

impl Slot {
    fn new(name: &str, index: usize) -> Slot {
        let mut buf = Vec::with_capacity(name.len() + 1 + 21);
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        let prefix = buf.len();
        buf.resize(prefix + 21, 0);
        Slot {
            index,
            buf: buf.into_boxed_slice(),
            prefix,
        }
    }
}

/// Everything the child does, decided in the parent.
pub(crate) struct Plan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    listen_pid: Option<Slot>,
    listen_pidfdid: Option<Slot>,
    /// (source, target) pairs; sources are first moved above every target.
    moves: Vec<(RawFd, RawFd)>,
    temps: Vec<RawFd>,
    /// Ranges of descriptor numbers to close, inclusive, after the moves.
    close: Vec<(u32, u32)>,
    /// Mark those ranges close-on-exec instead of closing them (an exec in
    /// place: the process keeps working if execve fails).
    cloexec_others: bool,
    groups: Option<Vec<libc::gid_t>>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    cwd: Option<CString>,
    setsid: bool,
    process_group: bool,
    parent_death_signal: Option<c_int>,
    parent_pid: libc::pid_t,
    /// Signals the child sets to SIG_DFL, bit `n - 1` for signal `n`;
    /// decided by [`spawn`] for each clone.
    reset: u64,
    failed_errno: AtomicI32,
    failed_stage: AtomicU8,
}

/// What to build a plan from.
pub(crate) struct PlanSpec<'a> {
    pub path: &'a OsStr,
    pub argv: &'a [OsString],
    /// Complete environment, LISTEN_PID and LISTEN_PIDFDID excluded.
    pub env: Vec<OsString>,
    /// Add LISTEN_PID (and LISTEN_PIDFDID where pidfds have inodes).
    pub activation: bool,
    /// (source, target) descriptor placements.
    pub fds: Vec<(RawFd, RawFd)>,
    pub groups: Option<Vec<u32>>,
    pub gid: Option<u32>,
    pub uid: Option<u32>,
    pub cwd: Option<&'a OsStr>,
    pub setsid: bool,
    pub process_group: bool,
    pub parent_death_signal: Option<c_int>,
}

fn cstring(s: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

impl Plan {
    pub fn new(spec: PlanSpec<'_>) -> io::Result<Plan> {
        let path = cstring(spec.path, "the program path")?;
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| cstring(a, "an argument"))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        // The entries' own buffers become the C strings (no copies).
        let env: Vec<CString> = spec
            .env
            .into_iter()
            .map(|e| {
                CString::new(e.into_vec()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "an environment variable contains a NUL byte",
                    )
                })
            })
            .collect::<io::Result<_>>()?;
        let mut envp_ptrs: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
        // The slots go last, LISTEN_PIDFDID at the very end, so that the
        // child can drop it by ending the array early.
        let (listen_pid, listen_pidfdid) = if spec.activation {
            let pid = Slot::new("LISTEN_PID", envp_ptrs.len());
            envp_ptrs.push(pid.buf.as_ptr().cast());
            let id = Slot::new("LISTEN_PIDFDID", envp_ptrs.len());
            envp_ptrs.push(id.buf.as_ptr().cast());
            (Some(pid), Some(id))
        } else {
            (None, None)
        };
        envp_ptrs.push(std::ptr::null());

        let highest = spec.fds.iter().map(|&(_, t)| t).max().unwrap_or(2).max(2);
        let mut targets: Vec<RawFd> = spec.fds.iter().map(|&(_, t)| t).collect();
        targets.sort_unstable();
        let mut close = Vec::new();
        let mut next = 3;
        for &t in targets.iter().filter(|&&t| t >= 3) {
            if t > next {
                close.push((next as u32, (t - 1) as u32));
            }
            next = next.max(t + 1);
        }
        close.push(((highest + 1) as u32, u32::MAX));

        Ok(Plan {
            path,
            _argv: argv,
            argv_ptrs,
            _env: env,
            envp_ptrs,
            listen_pid,
            listen_pidfdid,
            temps: vec![-1; spec.fds.len()],
            moves: spec.fds,
            close,
            cloexec_others: false,
            groups: spec.groups,
            gid: spec.gid,
            uid: spec.uid,
            cwd: spec.cwd.map(|c| cstring(c, "the directory")).transpose()?,
            setsid: spec.setsid,
            process_group: spec.process_group,
            parent_death_signal: spec.parent_death_signal,
            parent_pid: std::process::id() as libc::pid_t,
            reset: ALL_SIGNALS,
            failed_errno: AtomicI32::new(0),
            failed_stage: AtomicU8::new(0),
        })
    }
}

/// A started child: its pid, and a pidfd where the kernel gives one.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub pidfd: Option<OwnedFd>,
}

/// Starts the child described by `plan`. On failure nothing is left
/// running: a child that failed before execve has exited and is reaped.
pub(crate) fn spawn(plan: &mut Plan) -> Result<Spawned, (Stage, io::Error)> {
    #[cfg(target_arch = "x86_64")]
    let clone3 = CLONE3_USABLE.load(Ordering::Relaxed);
    #[cfg(not(target_arch = "x86_64"))]
    let clone3 = false;
    spawn_with(plan, clone3)
}

/// The child's stack.
const STACK: usize = 64 * 1024;

thread_local! {
    /// The stack of this thread's children, kept from one spawn to the
    /// next. It is taken out while a spawn uses it, so that anything that
    /// spawns meanwhile on this thread (a signal handler) gets its own.
    static CHILD_STACK: Cell<Option<Box<[MaybeUninit<u8>]>>> = const { Cell::new(None) };
}

/// [`spawn`], with clone3 tried first or not.
fn spawn_with(plan: &mut Plan, try_clone3: bool) -> Result<Spawned, (Stage, io::Error)> {
    // Left uninitialised: the child writes its frames before it reads them.
    let mut stack = CHILD_STACK
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(|| Box::new_uninit_slice(STACK));
    let result = spawn_on(plan, &mut stack, try_clone3);
    let _ = CHILD_STACK.try_with(|s| s.set(Some(stack)));
    result
}

fn spawn_on(
    plan: &mut Plan,
    stack: &mut [MaybeUninit<u8>],
    try_clone3: bool,
) -> Result<Spawned, (Stage, io::Error)> {
    let base = stack.as_mut_ptr() as usize;
    // The stack grows down on every architecture Linux runs Rust on here.
    let top = (base + stack.len()) & !15;
    plan.failed_errno.store(0, Ordering::Relaxed);
    plan.failed_stage.store(0, Ordering::Relaxed);

    let mut pidfd: c_int = -1;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = try_clone3;
    #[cfg(target_arch = "x86_64")]
    if try_clone3 {
        // The kernel resets every caught signal for the child
        // (CLONE_CLEAR_SIGHAND), atomically with the clone, so no handler
        // of ours can run in it. What it leaves are ignored signals, which
        // execve keeps too: the child resets those it is told of here.
        plan.reset = non_default_signals();
        let args = clone3::CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD) as u64
                | clone3::CLONE_CLEAR_SIGHAND,
            pidfd: &mut pidfd as *mut c_int as u64,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: base as u64,
            stack_size: (top - base) as u64,
            tls: 0,
        };
        let arg = (plan as *mut Plan).cast::<c_void>();
        // SAFETY: as for clone below; the stack is `top - base` bytes from
        // `base`, its top 16-byte aligned, and `pidfd` is a live c_int for
        // CLONE_PIDFD to fill.
        let ret = with_signals_blocked(|| unsafe { clone3::clone3(&args, child_main, arg) });
        let (ret, err) = match c_int::try_from(ret) {
            Ok(pid) if pid >= 0 => (pid, io::Error::from_raw_os_error(0)),
            _ => (-1, io::Error::from_raw_os_error(-ret as c_int)),
        };
        let unusable = matches!(
            err.raw_os_error(),
            // No clone3 (before Linux 5.3, or refused by a seccomp filter,
            // which some container runtimes make EPERM), or no
            // CLONE_CLEAR_SIGHAND (5.3 and 5.4): clone below does.
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
        );
        if ret >= 0 || !unusable {
            return finish(plan, ret, err, pidfd);
        }
        CLONE3_USABLE.store(false, Ordering::Relaxed);
    }

    // Every signal: the child cannot tell which ones have handlers of ours
    // without asking for each, and with clone (unlike clone3) they are the
    // parent's until it resets them.
    plan.reset = ALL_SIGNALS;
    let (ret, err) = with_signals_blocked(|| {
        let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
        loop {
            // SAFETY: `child_main` only reads `plan`, writes its atomics and
            // slots, and makes system calls; the stack is ours (borrowed for
            // this call), 16-byte aligned at the top, and outlives the child's use of it
            // because CLONE_VFORK suspends us until the child execs or
            // exits. `pidfd` is a live c_int for CLONE_PIDFD to fill.
            let ret = unsafe {
                libc::clone(
                    child_main,
                    top as *mut c_void,
                    flags,
                    (plan as *mut Plan).cast::<c_void>(),
                    &mut pidfd as *mut c_int,
                )
            };
            let err = io::Error::last_os_error();
            if ret < 0 && err.raw_os_error() == Some(libc::EINVAL) && flags & libc::CLONE_PIDFD != 0
            {
                // Kernels before 5.2 have no CLONE_PIDFD.
                flags &= !libc::CLONE_PIDFD;
                continue;
            }
            return (ret, err);
        }
    });
    finish(plan, ret, err, pidfd)
}

/// After the clone: the child has exec'd, or failed and exited.
fn finish(
    plan: &Plan,
    ret: c_int,
    err: io::Error,
    pidfd: c_int,
) -> Result<Spawned, (Stage, io::Error)> {
    if ret < 0 {
        return Err((Stage::Exec, err));
    }
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: CLONE_PIDFD stored a new descriptor that only we own.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    });
    let errno = plan.failed_errno.load(Ordering::Acquire);
    if errno != 0 {
        let stage = Stage::from_u8(plan.failed_stage.load(Ordering::Relaxed));
        reap(ret);
        return Err((stage, io::Error::from_raw_os_error(errno)));
    }
    Ok(Spawned {
        pid: ret as u32,
        pidfd,
    })
}

fn reap(pid: c_int) {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// clone3 itself: libc has no wrapper that runs a function in the child.
#[cfg(target_arch = "x86_64")]
mod clone3 {
    use std::ffi::{c_int, c_long, c_void};

    /// Resets the child's caught signals to SIG_DFL (Linux 5.5).
    pub const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

    /// The kernel's struct clone_args, as of Linux 5.3 (CLONE_ARGS_SIZE_VER0).
    #[repr(C)]
    pub struct CloneArgs {
        pub flags: u64,
        pub pidfd: u64,
        pub child_tid: u64,
        pub parent_tid: u64,
        pub exit_signal: u64,
        pub stack: u64,
        pub stack_size: u64,
        pub tls: u64,
    }

    /// clone3(`args`), the child calling `f(arg)` on the stack `args`
    /// gives and exiting with what it returns. Returns the child's pid to
    /// the parent, or a negated errno.
    ///
    /// # Safety
    ///
    /// As for clone(2) with the same flags: `args.stack` and
    /// `args.stack_size` describe memory the child may use as its stack,
    /// 16-byte aligned at the top, and `f` must be safe to run there, in
    /// the child, with `arg`.
    pub unsafe fn clone3(
        args: &CloneArgs,
        f: extern "C" fn(*mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_long {
        let ret: c_long;
        // SAFETY: the caller's contract. The parent side is a plain system
        // call (rcx and r11 clobbered, rax the result). The child starts
        // after the `syscall` with rax 0, every other register as the
        // parent's, and rsp at the top of its own stack: it clears the
        // frame pointer, calls f(arg) with the stack aligned as the ABI
        // wants, and exits without ever returning into the parent's code.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r13",
                "call r12",
                "mov edi, eax",
                "mov eax, {exit}",
                "syscall",
                "ud2",
                "2:",
                exit = const libc::SYS_exit,
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") args as *const CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") f,
                in("r13") arg,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

/// Runs `f` with every signal blocked in this thread, so that no handler of
/// ours runs in the child while it shares our memory.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask get
    // valid pointers to live sets.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let out = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        out
    }
}

/// The child, between clone and execve. Only system calls and writes into
/// the plan: no allocation, no locks, nothing that can unwind.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the plan the parent passed, alive and not otherwise
    // used while the parent is suspended by CLONE_VFORK.
    let plan = unsafe { &mut *arg.cast::<Plan>() };
    // SAFETY: each call below is a plain system call on plan data that was
    // prepared for exactly this use.
    unsafe {
        // Every signal stays blocked (the parent blocked them all before
        // the clone) until just before execve.
        reset_dispositions(plan.reset);
        if let Err((stage, errno)) = child_setup(plan) {
            plan.failed_stage.store(stage.to_u8(), Ordering::Relaxed);
            plan.failed_errno.store(errno, Ordering::Release);
            libc::_exit(127);
        }
        unblock_signals();
        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        plan.failed_stage
            .store(Stage::Exec.to_u8(), Ordering::Relaxed);
        plan.failed_errno.store(errno(), Ordering::Release);
        libc::_exit(127)
    }
}

fn errno() -> c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Every signal but SIGKILL and SIGSTOP, as a [`Plan::reset`] set.
const ALL_SIGNALS: u64 = !(1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1));

/// Whether clone3 with CLONE_CLEAR_SIGHAND has not failed yet. Once the
/// kernel refuses it, it keeps refusing: every later spawn uses clone.
#[cfg(target_arch = "x86_64")]
static CLONE3_USABLE: AtomicBool = AtomicBool::new(true);

/// The signals whose disposition is not SIG_DFL in this process (ignored,
/// or with a handler), as a [`Plan::reset`] set. Asked for every spawn:
/// any thread may change a disposition at any time. (A change made while
/// this runs is seen or not, as if made after the spawn or before it.)
#[cfg(target_arch = "x86_64")]
fn non_default_signals() -> u64 {
    let mut set = 0;
    for sig in 1..65 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: rt_sigaction with no new action only writes the current
        // one into `old`, a live struct of the kernel's layout.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        // A signal that cannot be asked about is reset all the same.
        if r != 0 || old.handler != libc::SIG_DFL {
            set |= 1 << (sig - 1);
        }
    }
    set
}

/// Default dispositions for the signals in `set` (bit `n - 1` for signal
/// `n`), as a freshly started service gets from systemd: Rust's runtime
/// ignores SIGPIPE, for one, and ignored signals survive execve.
unsafe fn reset_dispositions(mut set: u64) {
    while set != 0 {
        let sig = set.trailing_zeros() as c_int + 1;
        set &= set - 1;
        set_default_disposition(sig);
    }
}

/// The empty mask the program starts with, set last: until then no
/// signal at all is delivered to the child.
unsafe fn unblock_signals() {
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::syscall(
        libc::SYS_rt_sigprocmask,
        libc::SIG_SETMASK,
        &empty as *const libc::sigset_t,
        std::ptr::null_mut::<libc::sigset_t>(),
        8usize,
    );
}

/// The kernel's struct sigaction on these architectures.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// SIG_DFL through the raw system call: libc's signal() refuses the
/// signals it reserves for itself (32 and 33), which a parent may still
/// have left ignored.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn set_default_disposition(sig: c_int) {
    let act = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    libc::syscall(
        libc::SYS_rt_sigaction,
        sig,
        &act as *const KernelSigaction,
        std::ptr::null_mut::<KernelSigaction>(),
        8usize,
    );
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn set_default_disposition(sig: c_int) {
    libc::signal(sig, libc::SIG_DFL);
}

unsafe fn child_setup(plan: &mut Plan) -> Result<(), (Stage, c_int)> {
    let fail = |stage| (stage, errno());
    if plan.setsid && libc::setsid() < 0 {
        return Err(fail(Stage::Setsid));
    }
    if plan.process_group && !plan.setsid && libc::setpgid(0, 0) < 0 {
        return Err(fail(Stage::Setsid));
    }

    // Move every source above every target first, so that placing one
    // descriptor can never overwrite another that is still to be placed.
    let floor = plan.moves.iter().map(|&(_, t)| t).max().unwrap_or(2) + 1;
    for (i, &(src, _)) in plan.moves.iter().enumerate() {
        let t = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, floor);
        if t < 0 {
            return Err(fail(Stage::Dup));
        }
        plan.temps[i] = t;
    }
    for (i, &(_, dst)) in plan.moves.iter().enumerate() {
        // dup2 leaves close-on-exec clear on the target: exactly these
        // descriptors survive execve.
        if libc::dup2(plan.temps[i], dst) < 0 {
            return Err(fail(Stage::Dup));
        }
    }
    let flags = if plan.cloexec_others {
        CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    for &(lo, hi) in &plan.close {
        if libc::syscall(libc::SYS_close_range, lo, hi, flags) < 0 {
            let e = errno();
            // EINVAL: CLOSE_RANGE_CLOEXEC is newer (Linux 5.11) than
            // close_range; closing does as well right before execve.
            if e != libc::ENOSYS && !(e == libc::EINVAL && flags != 0) {
                return Err(fail(Stage::CloseOthers));
            }
            // Before Linux 5.9: close one by one up to the limit.
            let mut lim: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            let end = (hi as u64).min(lim.rlim_cur.saturating_sub(1));
            let mut fd = lo as u64;
            while fd <= end {
                libc::close(fd as c_int);
                fd += 1;
            }
        }
    }

    if let Some(groups) = &plan.groups {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0 {
            return Err(fail(Stage::Groups));
        }
    }
    // Raw system calls, not libc's wrappers: glibc's setuid family signals
    // every thread of the process, and our threads are the parent's.
    if let Some(gid) = plan.gid {
        if libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0 {
            return Err(fail(Stage::Gid));
        }
    }
    if let Some(uid) = plan.uid {
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0 {
            return Err(fail(Stage::Uid));
        }
    }
    // After the credentials change, which clears the parent-death signal.
    if let Some(sig) = plan.parent_death_signal {
        if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) < 0 {
            return Err(fail(Stage::Setsid));
        }
        // The parent may have died before the prctl took effect.
        if libc::getppid() != plan.parent_pid {
            libc::_exit(1);
        }
    }
    if let Some(cwd) = &plan.cwd {
        if libc::chdir(cwd.as_ptr()) < 0 {
            return Err(fail(Stage::Chdir));
        }
    }

    let pid = libc::syscall(libc::SYS_getpid) as u64;
    if let Some(slot) = &mut plan.listen_pid {
        write_decimal(&mut slot.buf[slot.prefix..], pid);
    }
    if let Some(slot) = &mut plan.listen_pidfdid {
        match own_pidfd_inode(pid) {
            Some(ino) => write_decimal(&mut slot.buf[slot.prefix..], ino),
            // No pidfs: end the environment before this entry.
            None => plan.envp_ptrs[slot.index] = std::ptr::null(),
        }
    }
    Ok(())
}

/// The inode number of a pidfd for ourselves, where pidfds have unique
/// inodes (pidfs, Linux 6.9+); what LISTEN_PIDFDID carries.
unsafe fn own_pidfd_inode(pid: u64) -> Option<u64> {
    let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as c_int;
    if fd < 0 {
        return None;
    }
    let mut st: libc::stat = std::mem::zeroed();
    let mut fs: libc::statfs = std::mem::zeroed();
    let ok = libc::fstat(fd, &mut st) == 0 && libc::fstatfs(fd, &mut fs) == 0;
    libc::close(fd);
    // Before pidfs every pidfd shared one anonymous inode, which names
    // nothing; only a pidfs inode identifies the process.
    (ok && fs.f_type as i64 == PIDFS_MAGIC).then_some(st.st_ino)
}

/// The pidfs inode of this process, for checking LISTEN_PIDFDID; None
/// where the kernel has no pidfs.
pub(crate) fn own_pidfd_inode_id() -> Option<u64> {
    // SAFETY: pidfd_open, fstat, fstatfs and close on a descriptor this
    // function opens and closes itself.
    unsafe { own_pidfd_inode(std::process::id() as u64) }
}

/// statfs(2) f_type of pidfs.
pub(crate) const PIDFS_MAGIC: i64 = 0x5049_4446;

/// Writes `n` in decimal followed by NUL into `out` (21 bytes suffice).
fn write_decimal(out: &mut [u8], mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    out[len] = 0;
}

/// close_range(2)'s flag that marks instead of closing (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Starts `cmd`: builds its plan, then clones.
pub(crate) fn spawn_child(
    cmd: &crate::spawn::Command,
    path: &std::path::Path,
    argv: &[OsString],
    env: Vec<OsString>,
) -> crate::Result<Spawned> {
    let mut plan = plan_for(cmd, path, argv, env)?;
    spawn(&mut plan).map_err(|(stage, source)| spawn_error(cmd, stage, source))
}

fn spawn_error(cmd: &crate::spawn::Command, stage: Stage, source: io::Error) -> crate::Error {
    crate::Error::Spawn {
        program: cmd.program().to_string_lossy().into_owned(),
        stage: stage.describe(),
        source,
    }
}

/// Replaces this process with `cmd`'s program, its descriptors placed and
/// its environment set exactly as [`spawn_child`] does for a child
/// (LISTEN_PID is this process's pid, which execve keeps); every other
/// descriptor is marked close-on-exec rather than closed. Returns only if
/// that failed, with the stage: descriptors may have been placed by then.
pub(crate) fn exec_in_place(
    cmd: &crate::spawn::Command,
    path: &std::path::Path,
    argv: &[OsString],
    env: Vec<OsString>,
) -> crate::Error {
    let mut plan = match plan_for(cmd, path, argv, env) {
        Ok(plan) => plan,
        Err(e) => return e,
    };
    plan.cloexec_others = true;
    // A parent-death signal then concerns our own parent.
    // SAFETY: getppid has no memory effects.
    plan.parent_pid = unsafe { libc::getppid() };
    #[cfg(target_arch = "x86_64")]
    let reset = non_default_signals();
    #[cfg(not(target_arch = "x86_64"))]
    let reset = ALL_SIGNALS;
    // SAFETY: the same steps as a child's between clone and execve, here in
    // this process: placing descriptors the plan names (`cmd` owns the
    // sources and keeps them open throughout), marking the others
    // close-on-exec, and signal dispositions, all through plain system
    // calls on data prepared for them. Every signal stays blocked until
    // just before execve, so no handler runs once its disposition is reset.
    let (stage, errno) = with_signals_blocked(|| unsafe {
        if let Err(failed) = child_setup(&mut plan) {
            return failed;
        }
        reset_dispositions(reset);
        unblock_signals();
        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        (Stage::Exec, errno())
    });
    spawn_error(cmd, stage, io::Error::from_raw_os_error(errno))
}

/// The plan that starts `cmd`.
fn plan_for(
    cmd: &crate::spawn::Command,
    path: &std::path::Path,
    argv: &[OsString],
    env: Vec<OsString>,
) -> crate::Result<Plan> {
    use std::os::fd::AsFd;
    let mut fds: Vec<(RawFd, RawFd)> = Vec::new();
    for (handle, target) in cmd.activation_fds() {
        fds.push((handle.as_fd().as_raw_fd(), target));
    }
    for (target, handle) in &cmd.unix.placed {
        fds.push((handle.as_fd().as_raw_fd(), *target));
    }
    let mut targets: Vec<RawFd> = fds.iter().map(|&(_, t)| t).collect();
    targets.sort_unstable();
    if let Some(w) = targets.windows(2).find(|w| w[0] == w[1]) {
        return Err(crate::Error::InvalidInput {
            what: "descriptor placement",
            why: format!("two handles are placed at descriptor {}", w[0]),
        });
    }
    let activation = cmd.activation_fds().next().is_some();
    Plan::new(PlanSpec {
        path: path.as_os_str(),
        argv,
        env,
        activation,
        fds,
        groups: cmd.unix.groups.clone(),
        gid: cmd.unix.gid,
        uid: cmd.unix.uid,
        cwd: cmd.cwd().map(|p| p.as_os_str()),
        setsid: cmd.unix.setsid,
        process_group: cmd.unix.process_group,
        parent_death_signal: cmd.unix.parent_death_signal,
    })
    .map_err(|e| crate::Error::InvalidInput {
        what: "command",
        why: e.to_string(),
    })
}

pub(crate) fn is_executable(path: &std::path::Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok() && path.is_file()
}

pub(crate) fn wait_child(
    child: &Spawned,
    hang: bool,
) -> io::Result<Option<std::process::ExitStatus>> {
    wait(child.pid, hang)
}

pub(crate) fn kill_child(child: &Spawned) -> io::Result<()> {
    signal(child, libc::SIGKILL)
}

/// Waits for a child; `hang` false polls (None while it runs).
pub(crate) fn wait(pid: u32, hang: bool) -> io::Result<Option<std::process::ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    let flags = if hang { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitpid with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        return Ok(Some(std::process::ExitStatus::from_raw(status)));
    }
}

/// Sends a signal, through the pidfd when there is one so that a reused
/// pid can never be hit.
pub(crate) fn signal(child: &Spawned, sig: c_int) -> io::Result<()> {
    // SAFETY: plain system calls with integer arguments.
    let r = unsafe {
        match &child.pidfd {
            Some(fd) => libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ),
            None => libc::kill(child.pid as libc::pid_t, sig) as libc::c_long,
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        let mut b = [0xffu8; 21];
        write_decimal(&mut b, 0);
        assert_eq!(&b[..2], b"0\0");
        write_decimal(&mut b, u64::MAX);
        assert_eq!(&b[..21], b"18446744073709551615\0");
    }

    /// What /proc says of a child's signals: (SigBlk, SigIgn).
    fn child_signals(try_clone3: bool) -> (u64, u64) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let argv = [OsString::from("cat"), OsString::from("/proc/self/status")];
        let mut plan = Plan::new(PlanSpec {
            path: OsStr::new("/bin/cat"),
            argv: &argv,
            env: vec![],
            activation: false,
            fds: vec![(w.as_raw_fd(), 1)],
            groups: None,
            gid: None,
            uid: None,
            cwd: None,
            setsid: false,
            process_group: false,
            parent_death_signal: None,
        })
        .unwrap();
        let child = spawn_with(&mut plan, try_clone3).unwrap();
        drop(w);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        wait(child.pid, true).unwrap();
        let field = |name: &str| {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        (field("SigBlk:"), field("SigIgn:"))
    }

    #[test]
    fn children_start_with_default_signal_handling_however_cloned() {
        extern "C" fn handler(_: c_int) {}
        // SAFETY: setting dispositions of signals nothing in these tests
        // sends, and blocking one in this thread only.
        unsafe {
            libc::signal(
                libc::SIGUSR1,
                handler as extern "C" fn(c_int) as libc::sighandler_t,
            );
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            libc::signal(libc::SIGWINCH, libc::SIG_IGN);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        #[cfg(target_arch = "x86_64")]
        {
            let found = non_default_signals();
            for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH, libc::SIGPIPE] {
                assert_ne!(found & 1 << (sig - 1), 0, "signal {sig} in {found:#x}");
            }
        }
        for try_clone3 in [true, false] {
            let (blocked, ignored) = child_signals(try_clone3);
            assert_eq!(blocked, 0, "clone3 {try_clone3}: blocked {blocked:#x}");
            assert_eq!(ignored, 0, "clone3 {try_clone3}: ignored {ignored:#x}");
        }
    }

    #[test]
    fn close_plan_skips_targets() {
        let spec = |fds: Vec<(RawFd, RawFd)>| PlanSpec {
            path: OsStr::new("/bin/true"),
            argv: &[],
            env: vec![],
            activation: false,
            fds,
            groups: None,
            gid: None,
            uid: None,
            cwd: None,
            setsid: false,
            process_group: false,
            parent_death_signal: None,
        };
        let p = Plan::new(spec(vec![(10, 3), (11, 7)])).unwrap();
        assert_eq!(p.close, vec![(4, 6), (8, u32::MAX)]);
        let p = Plan::new(spec(vec![])).unwrap();
        assert_eq!(p.close, vec![(3, u32::MAX)]);
        let p = Plan::new(spec(vec![(5, 0), (6, 1)])).unwrap();
        assert_eq!(p.close, vec![(3, u32::MAX)]);
    }
}
