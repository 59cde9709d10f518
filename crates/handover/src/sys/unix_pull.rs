//! Linux: another process's descriptor through `pidfd_open` +
//! `pidfd_getfd`, and, when the kernel refuses, an account of which part
//! of the ptrace access check failed.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use rustix::io::Errno;
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

use crate::pull::PullError;

/// What pidfd_getfd asks of the caller (ptrace(2), "Ptrace access mode
/// checking").
const PERMISSION: &str = "ptrace (PTRACE_MODE_ATTACH_REALCREDS)";

/// CAP_SYS_PTRACE's bit in the capability sets.
const CAP_SYS_PTRACE: u32 = 19;

pub(crate) fn pull(pid: u32, number: u32) -> Result<OwnedFd, PullError> {
    let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Err(PullError::NoSuchProcess { pid });
    };
    let pidfd = pidfd_open(target, PidfdFlags::empty()).map_err(|e| match e {
        Errno::SRCH => PullError::NoSuchProcess { pid },
        Errno::NOSYS => PullError::Unsupported {
            needs: "pidfd_open (Linux 5.3 or later)",
        },
        // Before Linux 6.9 a pidfd names a whole process only.
        Errno::INVAL => PullError::Io {
            pid,
            op: "pidfd_open (a thread id rather than a process id?)",
            source: e.into(),
        },
        e => PullError::Io {
            pid,
            op: "pidfd_open",
            source: e.into(),
        },
    })?;
    let Ok(fd) = i32::try_from(number) else {
        return Err(PullError::NoSuchHandle { pid, number });
    };
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        Errno::SRCH => PullError::NoSuchProcess { pid },
        // A zombie has no descriptor table left.
        Errno::BADF if is_zombie(pid) => PullError::NoSuchProcess { pid },
        Errno::BADF => PullError::NoSuchHandle { pid, number },
        Errno::PERM => PullError::PermissionDenied {
            pid,
            permission: PERMISSION,
            cause: why_denied(pid),
        },
        Errno::NOSYS => PullError::Unsupported {
            needs: "pidfd_getfd (Linux 5.6 or later)",
        },
        e => PullError::Io {
            pid,
            op: "pidfd_getfd",
            source: e.into(),
        },
    })
}

/// The descriptor numbers process `pid` has open, from /proc/PID/fd
/// (reading it takes ptrace read access, a weaker check than taking).
pub(crate) fn handle_numbers(pid: u32) -> Result<Vec<u32>, PullError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PullError::NoSuchProcess { pid },
        std::io::ErrorKind::PermissionDenied => PullError::PermissionDenied {
            pid,
            permission: "ptrace (PTRACE_MODE_READ_FSCREDS), to list /proc/PID/fd",
            cause: why_denied(pid),
        },
        _ => PullError::Io {
            pid,
            op: "reading /proc/PID/fd",
            source: e,
        },
    })?;
    let mut numbers: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // pid (comm) STATE …: comm may hold spaces and parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
    })
}

/// A `Key:` line of /proc/PID/status as numbers.
fn status_numbers(status: &str, key: &str) -> Option<Vec<u64>> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let line = line.strip_prefix(':')?;
    line.split_whitespace().map(|n| n.parse().ok()).collect()
}

fn has_cap_sys_ptrace() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// Whether this process is an ancestor of `pid` (Yama's scope 1 lets
/// ancestors attach).
fn is_ancestor_of(pid: u32) -> bool {
    let me = std::process::id();
    let mut at = pid;
    for _ in 0..4096 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{at}/status")) else {
            return false;
        };
        match status_numbers(&status, "PPid").and_then(|v| v.first().copied()) {
            Some(parent) if parent as u32 == me => return true,
            Some(parent) if parent > 1 => at = parent as u32,
            _ => return false,
        }
    }
    false
}

/// Which part of the ptrace access check (ptrace(2)) refused this process
/// access to `pid`, as far as /proc tells.
fn why_denied(pid: u32) -> String {
    let mut causes = Vec::new();
    let privileged = has_cap_sys_ptrace();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uids = status_numbers(&status, "Uid").unwrap_or_default();
    let gids = status_numbers(&status, "Gid").unwrap_or_default();
    let my_uid = u64::from(rustix::process::getuid().as_raw());
    let my_gid = u64::from(rustix::process::getgid().as_raw());
    if !privileged {
        for (what, ids, mine) in [("uid", &uids, my_uid), ("gid", &gids, my_gid)] {
            if ids.len() >= 3 && ids[..3].iter().any(|&id| id != mine) {
                causes.push(format!(
                    "process {pid} runs as {what} {} (real {}, saved {}) and this process's real \
                     {what} is {mine}: all must match unless this process has CAP_SYS_PTRACE, \
                     which it lacks",
                    ids[1], ids[0], ids[2]
                ));
            }
        }
        if causes.is_empty() {
            // The files of a process that is not dumpable (its
            // /proc/PID/fd, …) belong to root whatever its uid.
            let root_owned =
                std::fs::metadata(format!("/proc/{pid}/fd")).is_ok_and(|m| m.uid() == 0);
            let euid = uids.get(1).copied();
            if root_owned && euid.is_some_and(|u| u != 0) {
                causes.push(format!(
                    "process {pid} is not dumpable (it called prctl(PR_SET_DUMPABLE, 0), changed \
                     its credentials or runs a set-user-ID program), and only a process with \
                     CAP_SYS_PTRACE, which this one lacks, may attach to it"
                ));
            }
        }
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match scope {
        Some(1) if !privileged && !is_ancestor_of(pid) => causes.push(format!(
            "kernel.yama.ptrace_scope is 1: only an ancestor of process {pid} (or a process it \
             named with PR_SET_PTRACER) may attach without CAP_SYS_PTRACE, and this process is \
             neither"
        )),
        Some(2) if !privileged => causes.push(
            "kernel.yama.ptrace_scope is 2: only processes with CAP_SYS_PTRACE may attach, and \
             this one lacks it"
                .into(),
        ),
        Some(3) => causes.push(
            "kernel.yama.ptrace_scope is 3: attaching is disabled for every process, root \
             included"
                .into(),
        ),
        _ => {}
    }
    if causes.is_empty() {
        causes.push(if privileged {
            "a security module (SELinux, AppArmor, …) refused it".into()
        } else {
            format!(
                "process {pid} is probably not dumpable (prctl(PR_SET_DUMPABLE, 0), changed \
                 credentials or a set-user-ID program), and this process lacks CAP_SYS_PTRACE; \
                 else a security module (SELinux, AppArmor, …) refused it"
            )
        });
    }
    causes.join("; ")
}
