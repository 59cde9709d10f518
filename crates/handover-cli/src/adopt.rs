//! `handover adopt`: take sockets out of a running process (by descriptor
//! number, or all its listeners, found through /proc on Linux and by
//! trying each of its handles on Windows) with
//! `handover::pull`, then start a program on them by the activation
//! protocol or put them into the holder. A server started without
//! handover can so be replaced by one that runs under it, without a
//! refused connection: both accept from the same sockets until the old
//! one is told to stop.
//!
//! Names: the sockets are called NAME, NAME.1, NAME.2, … in the order of
//! their descriptor numbers in the process (NAME is `--name`, default
//! `adopted`, or the holder entry's `--hold NAME`). Each is printed as
//! `handover: adopted fd N of process P: WHAT as NAME`.

use std::ffi::OsString;

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::{Command, Handle};

#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// The process to take the sockets from.
    #[arg(long, value_name = "PID")]
    pid: u32,
    /// Take descriptor N of that process (on Windows: handle value N,
    /// decimal or 0x-hex). Repeat, or separate with commas.
    #[arg(
        long = "fd",
        value_name = "N",
        value_delimiter = ',',
        value_parser = parse_number,
        required_unless_present = "listeners",
        conflicts_with = "listeners"
    )]
    fds: Vec<u32>,
    /// Take every listening socket of that process: TCP listeners, bound
    /// UDP sockets and listening Unix stream and seqpacket sockets (Linux,
    /// from /proc/PID/fd and /proc/PID/net; on Windows TCP listeners and
    /// bound UDP sockets, found by pulling each of its handles); a socket
    /// open under several numbers is taken once.
    #[arg(long)]
    listeners: bool,
    /// Put the sockets into the holder as NAME, NAME.1, NAME.2, … instead
    /// of starting a program, then exit.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "program",
        conflicts_with_all = ["program", "name"]
    )]
    hold: Option<String>,
    /// With --hold: replace entries of the same names.
    #[arg(long, requires = "hold")]
    replace: bool,
    /// The names of the sockets in LISTEN_FDNAMES: NAME, NAME.1, NAME.2, …
    #[arg(long, value_name = "NAME", default_value = "adopted")]
    name: String,
    /// The holder's socket (with --hold). Default: $HANDOVER_HOLDER.
    #[cfg(unix)]
    #[command(flatten)]
    socket: crate::holder_cmds::Socket,
    /// The program to start on the sockets, and its arguments, after `--`.
    #[arg(last = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

/// A number in decimal, or hexadecimal after `0x` (Windows handle values
/// are usually shown so).
fn parse_number(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a descriptor or handle number"))
}

/// The name of the `index`th socket: `base`, `base.1`, `base.2`, …
fn nth_name(base: &str, index: usize) -> String {
    match index {
        0 => base.to_owned(),
        n => format!("{base}.{n}"),
    }
}

/// A socket to take: its number in the process, and what it is if known.
struct Wanted {
    number: u32,
    what: Option<String>,
}

pub fn run(args: AdoptArgs) -> Result<()> {
    let wanted = if args.listeners {
        listeners(args.pid)?
    } else {
        args.fds
            .iter()
            .map(|&number| Wanted { number, what: None })
            .collect()
    };
    let base = args.hold.as_deref().unwrap_or(&args.name);
    let names: Vec<String> = (0..wanted.len()).map(|i| nth_name(base, i)).collect();
    match &args.hold {
        Some(_) => hold(&args, &wanted, &names),
        None => start(&args, &wanted, &names),
    }
}

/// Pulls one socket, saying what it is.
fn take(pid: u32, w: &Wanted, name: &str) -> Result<Handle> {
    let handle = handover::pull(pid, w.number)
        .with_context(|| format!("taking fd {} of process {pid}", w.number))?;
    let what = match &w.what {
        Some(what) => what.clone(),
        None => handle.kind().to_string(),
    };
    println!(
        "handover: adopted fd {} of process {pid}: {what} as {name}",
        w.number
    );
    Ok(handle.with_name(name))
}

#[cfg(unix)]
fn hold(args: &AdoptArgs, wanted: &[Wanted], names: &[String]) -> Result<()> {
    use handover::holder::{self, StoreOptions};
    for name in names {
        holder::check_name(name).map_err(|why| anyhow::anyhow!("--hold: {why}"))?;
    }
    let mut client = args.socket.connect()?;
    let options = StoreOptions::new().replace(args.replace);
    for (w, name) in wanted.iter().zip(names) {
        let handle = take(args.pid, w, name)?;
        client
            .store(name, &handle, options.clone())
            .with_context(|| format!("storing {name:?}"))?;
    }
    Ok(())
}

#[cfg(windows)]
fn hold(_: &AdoptArgs, _: &[Wanted], _: &[String]) -> Result<()> {
    bail!("--hold: the holder is not available on Windows yet; start a program with -- PROGRAM")
}

fn start(args: &AdoptArgs, wanted: &[Wanted], names: &[String]) -> Result<()> {
    let mut cmd = Command::new(&args.program[0]);
    cmd.args(&args.program[1..]);
    // A missing program is found before anything is taken.
    let path = cmd.resolved_program()?;
    cmd.program_path(path);
    for (w, name) in wanted.iter().zip(names) {
        cmd.activation(take(args.pid, w, name)?)?;
    }
    run_program(cmd)
}

/// The program takes this process's place, as with `handover get`: it
/// keeps our pid (LISTEN_PID), gets the signals sent to us, and exits
/// with its own status.
#[cfg(unix)]
fn run_program(cmd: Command) -> Result<()> {
    Err(cmd.exec()).context("starting the program")
}

/// The program runs as our child (the activation handles are fetched from
/// us); we exit with its exit code.
#[cfg(windows)]
fn run_program(cmd: Command) -> Result<()> {
    let mut child = cmd.spawn()?;
    let status = child.wait()?;
    drop(cmd);
    std::process::exit(status.code().unwrap_or(1))
}

/// The listening sockets of `pid`, in handle order, each once: TCP
/// listeners and bound UDP sockets. Windows has no /proc: every handle the
/// process has open (`handover::handle_numbers`) is pulled and asked what
/// it is, and dropped again. A socket open under several handle values is
/// taken once (the same kind and local address).
#[cfg(windows)]
fn listeners(pid: u32) -> Result<Vec<Wanted>> {
    use handover::{HandleKind, PullError, SocketType};
    use std::collections::BTreeSet;

    let numbers = handover::handle_numbers(pid)
        .with_context(|| format!("listing the handles of process {pid}"))?;
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut sockets = 0;
    for number in numbers {
        let handle = match handover::pull(pid, number) {
            Ok(handle) => handle,
            // Closed since it was listed.
            Err(PullError::NoSuchHandle { .. }) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("taking handle {number} of process {pid}"))
            }
        };
        let HandleKind::Socket(info) = handle.kind() else {
            continue;
        };
        sockets += 1;
        let what = match (info.socket_type, info.listening) {
            (SocketType::Stream, true) => match handle.into_tcp_listener() {
                Ok(l) => l.local_addr().ok().map(|a| format!("tcp {a}")),
                Err(_) => None,
            },
            (SocketType::Datagram, _) => match handle.into_udp_socket() {
                Ok(u) => u
                    .local_addr()
                    .ok()
                    .filter(|a| a.port() != 0 && u.peer_addr().is_err())
                    .map(|a| format!("udp {a}")),
                Err(_) => None,
            },
            _ => None,
        };
        if let Some(what) = what {
            if seen.insert(what.clone()) {
                found.push(Wanted {
                    number,
                    what: Some(what),
                });
            }
        }
    }
    if found.is_empty() {
        bail!(
            "process {pid} has no listening sockets ({sockets} of its handles are sockets, none \
             listening or bound)"
        );
    }
    Ok(found)
}

/// The listening sockets of `pid`, in descriptor order, each once.
#[cfg(unix)]
fn listeners(pid: u32) -> Result<Vec<Wanted>> {
    use std::collections::BTreeSet;

    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no process {pid}: it does not exist or has exited")
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot list the descriptors of process {pid} in {dir} (reading it needs \
                     the same ptrace access as taking them)"
                )
            })
        }
    };
    let mut sockets: Vec<(u32, u64)> = Vec::new();
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Closed meanwhile, or not a socket: skipped.
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let inode = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse().ok());
        if let Some(inode) = inode {
            sockets.push((fd, inode));
        }
    }
    sockets.sort_unstable();
    let table = proc_net::listening(pid)?;
    let mut seen = BTreeSet::new();
    let found: Vec<Wanted> = sockets
        .iter()
        .filter_map(|&(number, inode)| {
            let what = table.get(&inode)?;
            seen.insert(inode).then(|| Wanted {
                number,
                what: Some(what.clone()),
            })
        })
        .collect();
    if found.is_empty() {
        bail!(
            "process {pid} has no listening sockets ({} of its descriptors are sockets, none \
             listening or bound)",
            sockets.len()
        );
    }
    Ok(found)
}

/// The kernel's socket tables of a process's network namespace
/// (/proc/PID/net/{tcp,tcp6,udp,udp6,unix}).
#[cfg(unix)]
mod proc_net {
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use anyhow::{Context, Result};

    /// TCP_LISTEN in the `st` column.
    const TCP_LISTEN: &str = "0A";
    /// __SO_ACCEPTCON in the unix table's `Flags` column.
    const SO_ACCEPTCON: u32 = 0x1_0000;

    /// Listening or bound sockets by inode, each described (`tcp
    /// 127.0.0.1:8080`, `unix /run/x.sock`).
    pub fn listening(pid: u32) -> Result<BTreeMap<u64, String>> {
        let mut out = BTreeMap::new();
        for (file, proto) in [
            ("tcp", "tcp"),
            ("tcp6", "tcp"),
            ("udp", "udp"),
            ("udp6", "udp"),
        ] {
            let path = format!("/proc/{pid}/net/{file}");
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // No IPv6 in this kernel, say.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {path}")),
            };
            for line in text.lines().skip(1) {
                if let Some((inode, addr)) = inet_line(line, proto) {
                    out.insert(inode, format!("{proto} {addr}"));
                }
            }
        }
        let path = format!("/proc/{pid}/net/unix");
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().skip(1) {
                if let Some((inode, what)) = unix_line(line) {
                    out.insert(inode, what);
                }
            }
        }
        Ok(out)
    }

    /// A TCP listener or a bound, unconnected UDP socket:
    /// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode …`.
    pub fn inet_line(line: &str, proto: &str) -> Option<(u64, SocketAddr)> {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local = address(cols.get(1)?)?;
        let remote = address(cols.get(2)?)?;
        let state = *cols.get(3)?;
        let inode: u64 = cols.get(9)?.parse().ok()?;
        let wanted = match proto {
            "tcp" => state == TCP_LISTEN,
            _ => local.port() != 0 && remote.port() == 0 && remote.ip().is_unspecified(),
        };
        (wanted && inode != 0).then_some((inode, local))
    }

    /// `0100007F:1F90` or 32 hex digits and a port: each 32-bit word of
    /// the address printed as a native-endian number.
    fn address(text: &str) -> Option<SocketAddr> {
        let (ip, port) = text.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let word = |i: usize| -> Option<[u8; 4]> {
            Some(
                u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                    .ok()?
                    .to_ne_bytes(),
            )
        };
        match ip.len() {
            8 => Some(SocketAddr::new(Ipv4Addr::from(word(0)?).into(), port)),
            32 => {
                let mut bytes = [0u8; 16];
                for i in 0..4 {
                    bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
                }
                Some(SocketAddr::new(Ipv6Addr::from(bytes).into(), port))
            }
            _ => None,
        }
    }

    /// A listening Unix stream or seqpacket socket:
    /// `Num RefCount Protocol Flags Type St Inode [Path]`.
    pub fn unix_line(line: &str) -> Option<(u64, String)> {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(cols.get(3)?, 16).ok()?;
        let ty = u32::from_str_radix(cols.get(4)?, 16).ok()?;
        let inode: u64 = cols.get(6)?.parse().ok()?;
        if flags & SO_ACCEPTCON == 0 || !matches!(ty, 1 | 5) {
            return None;
        }
        let kind = if ty == 1 { "unix" } else { "unix-seqpacket" };
        let path = cols.get(7).copied().unwrap_or("(unnamed)");
        Some((inode, format!("{kind} {path}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tables() {
            let tcp = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
            let (inode, addr) = inet_line(tcp, "tcp").unwrap();
            assert_eq!((inode, addr.to_string()), (12345, "127.0.0.1:8080".into()));
            let established = tcp.replace(" 0A ", " 01 ");
            assert!(inet_line(&established, "tcp").is_none());
            let tcp6 = "   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
            assert_eq!(inet_line(tcp6, "tcp").unwrap().1.to_string(), "[::1]:80");
            let udp = "  5: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 999 2 0000000000000000 0";
            assert_eq!(
                inet_line(udp, "udp").unwrap(),
                (999, "0.0.0.0:53".parse().unwrap())
            );
            let connected = "  5: 0100007F:9C40 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 998 2 0000000000000000 0";
            assert!(inet_line(connected, "udp").is_none());
            let unix = "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/x.sock";
            assert_eq!(unix_line(unix).unwrap(), (4242, "unix /run/x.sock".into()));
            let unlistening = "0000000000000000: 00000002 00000000 00000000 0001 03 4243";
            assert!(unix_line(unlistening).is_none());
            let abstract_seq = "0000000000000000: 00000002 00000000 00010000 0005 01 4244 @name";
            assert_eq!(unix_line(abstract_seq).unwrap().1, "unix-seqpacket @name");
        }
    }
}
