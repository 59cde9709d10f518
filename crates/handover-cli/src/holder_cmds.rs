//! The holder's client commands: `handover put`, `get`, `ls`, `rm` and
//! `wait` (the daemon is `handover hold`, in hold/).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::holder::{self, Client, Entry, ErrorCode, StoreOptions};
use handover::listen::{self, ListenAddr, ListenOptions, ListenSpec};
use handover::Command;

/// `handover put …` and `handover get …` without the rest of the command
/// line's parser and without logging (they log nothing): None if the
/// arguments are anything else, a request for help, or anything the
/// parsing below does not take as plainly valid (then the full parser
/// runs, and decides or reports), or if HANDOVER_LOG asks for logging.
pub fn quick() -> Option<Result<()>> {
    if std::env::var_os("HANDOVER_LOG").is_some() {
        return None;
    }
    let mut args = std::env::args_os().skip(1);
    match args.next()?.to_str()? {
        "put" => Some(put(quick_put(args)?)),
        "get" => Some(get(quick_get(args)?)),
        _ => None,
    }
}

/// Before anything is allocated, for `put` and `get`: the heap grows by
/// what is asked and no more (glibc's M_TOP_PAD, 128 KiB by default). These
/// commands live for a millisecond; their largest allocation is the
/// channel's 64 KiB receive buffer, which is zeroed: carved from a heap
/// grown ahead of time, it is cleared page by page (16 page faults), while
/// from memory the heap has just been given it is known to be zero and is
/// not touched until a reply is written into it.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
pub fn small_heap() {
    // SAFETY: mallopt only sets a malloc parameter; nothing else runs yet.
    unsafe { libc::mallopt(libc::M_TOP_PAD, 0) };
}

/// `put`'s arguments as clap would take them, for the plain forms only:
/// one NAME; `--fd N` or `--listen SPEC`; `--ttl`, `--replace`, `--socket`
/// at most once each; `--opt VALUE` or `--opt=VALUE`, the value not empty
/// and not starting with `-`. Anything else (help, `--`, an unknown or
/// repeated option, text that is not UTF-8) is left to clap.
fn quick_put(mut args: impl Iterator<Item = OsString>) -> Option<PutArgs> {
    let mut name = None;
    let mut fd = None;
    let mut listen = None;
    let mut ttl = None;
    let mut replace = false;
    let mut socket = None;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().ok()?;
        let Some((option, inline)) = quick_option(&arg) else {
            once(&mut name, arg)?;
            continue;
        };
        match option {
            "--fd" => once(&mut fd, quick_text(inline, &mut args)?.parse::<i32>().ok()?)?,
            "--listen" => once(&mut listen, quick_text(inline, &mut args)?)?,
            "--ttl" => once(&mut ttl, quick_text(inline, &mut args)?)?,
            "--socket" => once(&mut socket, quick_value(inline, &mut args)?.into())?,
            "--replace" if inline.is_none() && !replace => replace = true,
            _ => return None,
        }
    }
    if fd.is_some() == listen.is_some() {
        return None;
    }
    Some(PutArgs {
        name: name?,
        fd,
        listen,
        ttl,
        replace,
        socket: Socket { socket },
    })
}

/// `get`'s arguments as clap would take them, for the plain forms only:
/// NAME…, `--remove`, `--stdin`, `--socket PATH` (each at most once), then
/// `--` and the program, as in `quick_put`.
fn quick_get(mut args: impl Iterator<Item = OsString>) -> Option<GetArgs> {
    let mut names = Vec::new();
    let mut remove = false;
    let mut stdin = false;
    let mut socket = None;
    loop {
        let arg = args.next()?;
        if arg == "--" {
            break;
        }
        let arg = arg.into_string().ok()?;
        let Some((option, inline)) = quick_option(&arg) else {
            names.push(arg);
            continue;
        };
        match option {
            "--remove" if inline.is_none() && !remove => remove = true,
            "--stdin" if inline.is_none() && !stdin => stdin = true,
            "--socket" => once(&mut socket, quick_value(inline, &mut args)?.into())?,
            _ => return None,
        }
    }
    let program: Vec<OsString> = args.collect();
    if names.is_empty() || program.is_empty() {
        return None;
    }
    Some(GetArgs {
        names,
        remove,
        stdin,
        socket: Socket { socket },
        program,
    })
}

/// `--opt` or `--opt=VALUE` as (`--opt`, VALUE); None for an operand
/// (`-` alone is one). Short options (`-h`) are options too, unknown here.
fn quick_option(arg: &str) -> Option<(&str, Option<&str>)> {
    if !arg.starts_with('-') || arg == "-" {
        return None;
    }
    Some(match arg.split_once('=') {
        Some((option, value)) if option.starts_with("--") => (option, Some(value)),
        _ => (arg, None),
    })
}

/// An option's value: after `=`, or the next argument; None if missing,
/// empty, or starting with `-` (clap's rules for those are left to clap).
fn quick_value(
    inline: Option<&str>,
    args: &mut impl Iterator<Item = OsString>,
) -> Option<OsString> {
    let value = match inline {
        Some(v) => OsString::from(v),
        None => args.next()?,
    };
    let bytes = value.as_encoded_bytes();
    (!bytes.is_empty() && bytes[0] != b'-').then_some(value)
}

fn quick_text(inline: Option<&str>, args: &mut impl Iterator<Item = OsString>) -> Option<String> {
    quick_value(inline, args)?.into_string().ok()
}

/// Sets `slot` if it is empty; None (leave it to clap) if it was set.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// `--socket PATH`, else $HANDOVER_HOLDER.
#[derive(Debug, Args)]
pub struct Socket {
    /// The holder's socket. Default: $HANDOVER_HOLDER.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl Socket {
    pub(crate) fn connect(&self) -> Result<Client> {
        let path = holder::socket_path(self.socket.as_deref())
            .map_err(|_| anyhow::anyhow!("no holder: give --socket PATH or set HANDOVER_HOLDER"))?;
        Client::connect(&path)
            .with_context(|| format!("cannot reach the holder at {}", path.display()))
    }
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The entry's name: letters, digits and . _ - / @ + =
    name: String,
    /// Store descriptor N, inherited from the caller (`3<file`, `--fd 0`).
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    fd: Option<i32>,
    /// Bind SPEC (as `handover run -l`: 127.0.0.1:8080, udp::53, unix:/path,
    /// …) and store the socket; its address is printed.
    #[arg(long, value_name = "SPEC")]
    listen: Option<String>,
    /// Expire (and close) the entry after DURATION (500ms, 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Replace an entry of the same name.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    socket: Socket,
}

pub fn put(args: PutArgs) -> Result<()> {
    holder::check_name(&args.name).map_err(|why| anyhow::anyhow!("{why}"))?;
    let mut options = StoreOptions::new().replace(args.replace);
    if let Some(ttl) = &args.ttl {
        let ttl = crate::run::duration(ttl).context("--ttl")?;
        if ttl.is_zero() {
            bail!("--ttl must be more than 0");
        }
        options = options.ttl(ttl);
    }
    if let Some(n) = args.fd {
        if n < 0 {
            bail!("--fd {n}: not a descriptor number");
        }
        // SAFETY: this command has opened nothing yet (the holder is not
        // connected), so descriptor `n`, if open, was inherited, and
        // nothing in this process owns it; it is taken once.
        let handle =
            unsafe { handover::unix::take_inherited(n) }.with_context(|| format!("--fd {n}"))?;
        let mut client = args.socket.connect()?;
        client
            .store(&args.name, &handle, options)
            .with_context(|| format!("storing {:?}", args.name))?;
        return Ok(());
    }
    let spec_text = args.listen.as_deref().unwrap_or_default();
    let spec: ListenSpec = spec_text.parse()?;
    let keep_file = matches!(spec.addr, ListenAddr::UnixPath(..));
    let mut client = args.socket.connect()?;
    let bound = listen::bind(&spec, &ListenOptions::default())?;
    client
        .store(&args.name, bound.handle(), options)
        .with_context(|| format!("storing {:?}", args.name))?;
    println!("{}", bound.local());
    if keep_file {
        // The socket now lives in the holder: its file must stay, and
        // `Bound` removes it when dropped. Its descriptor closes when
        // this process exits, in a moment.
        std::mem::forget(bound);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The entries, passed as descriptors 3, 4, … in this order, named in
    /// LISTEN_FDNAMES.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
    /// Take the entries out of the holder instead of duplicates.
    #[arg(long)]
    remove: bool,
    /// Pass the single entry as the program's standard input instead (no
    /// LISTEN_* variables).
    #[arg(long)]
    stdin: bool,
    #[command(flatten)]
    socket: Socket,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

pub fn get(args: GetArgs) -> Result<()> {
    if args.stdin && args.names.len() != 1 {
        bail!(
            "--stdin passes exactly one entry; {} were named",
            args.names.len()
        );
    }
    let mut cmd = Command::new(&args.program[0]);
    cmd.args(&args.program[1..]);
    // A missing program is found before anything is taken out of the
    // holder (with --remove it would be lost).
    let path = cmd.resolved_program()?;
    cmd.program_path(path);
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    let mut client = args.socket.connect()?;
    let got = client
        .retrieve_many(&names, args.remove)
        .with_context(|| format!("retrieving {}", args.names.join(", ")))?;
    drop(client);
    for (entry, handle) in got {
        if args.stdin {
            cmd.stdin(handle);
        } else {
            cmd.activation(handle.with_name(entry.name))?;
        }
    }
    // The program takes this process's place, as s6-fdholder-retrieve
    // does: it keeps our pid (LISTEN_PID), gets signals sent to us and
    // exits with its own status. Nothing else of ours stays open in it.
    Err(cmd.exec()).context("starting the program")
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// A JSON array of entries instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: Socket,
}

pub fn ls(args: LsArgs) -> Result<()> {
    let entries = args.socket.connect()?.list().context("listing")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let now = SystemTime::now();
    let rows: Vec<[String; 6]> = entries.iter().map(|e| row(e, now)).collect();
    let header = ["NAME", "KIND", "ADDRESS", "OWNER", "STORED", "EXPIRES"].map(String::from);
    let mut widths = [0usize; 6];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

fn row(e: &Entry, now: SystemTime) -> [String; 6] {
    let stored = match now.duration_since(e.stored()) {
        Ok(d) => format!("{} ago", short(d)),
        Err(_) => "just now".into(),
    };
    let expires = match e.expires() {
        None => "never".into(),
        Some(t) => match t.duration_since(now) {
            Ok(d) => format!("in {}", short(d)),
            Err(_) => "now".into(),
        },
    };
    [
        e.name.clone(),
        e.kind.clone(),
        e.address.clone().unwrap_or_else(|| "-".into()),
        format!("uid {}", e.owner_uid),
        stored,
        expires,
    ]
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The entry to remove (its descriptor is closed).
    name: String,
    #[command(flatten)]
    socket: Socket,
}

pub fn rm(args: RmArgs) -> Result<()> {
    args.socket
        .connect()?
        .remove(&args.name)
        .with_context(|| format!("removing {:?}", args.name))?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The entry to wait for.
    name: String,
    /// Give up after DURATION (exit status 1). Default: wait for ever.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    #[command(flatten)]
    socket: Socket,
}

pub fn wait(args: WaitArgs) -> Result<()> {
    let timeout = args
        .timeout
        .as_deref()
        .map(crate::run::duration)
        .transpose()
        .context("--timeout")?;
    let mut client = args.socket.connect()?;
    match client.wait(&args.name, timeout) {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&ErrorCode::Timeout) => {
            bail!(
                "{:?} did not appear within {}",
                args.name,
                args.timeout.unwrap_or_default()
            )
        }
        Err(e) => Err(e).with_context(|| format!("waiting for {:?}", args.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    fn clap_parse<A: Args + FromArgMatches>(args: &[&str]) -> Option<A> {
        let matches = A::augment_args(clap::Command::new("t").no_binary_name(true))
            .try_get_matches_from(args)
            .ok()?;
        A::from_arg_matches(&matches).ok()
    }

    fn os(args: &[&str]) -> impl Iterator<Item = OsString> {
        args.iter()
            .map(OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// What the quick parser takes, clap takes the same way; what clap
    /// refuses, the quick parser leaves to clap.
    #[test]
    fn quick_parsing_agrees_with_clap() {
        let puts: &[&[&str]] = &[
            &["cli", "--fd", "0"],
            &["--fd=3", "cli", "--socket", "/s", "--replace"],
            &["x", "--listen", "127.0.0.1:0", "--ttl", "5s"],
            &["x", "--listen=unix:/p", "--socket=/s"],
            &["-", "--fd", "0"],
            &["x"],
            &["x", "y", "--fd", "0"],
            &["x", "--fd", "0", "--fd", "1"],
            &["x", "--fd", "0", "--listen", ":1"],
            &["x", "--fd", "-1"],
            &["x", "--fd", "a"],
            &["x", "--fd="],
            &["x", "--fd"],
            &["x", "--fd", "0", "--replace", "--replace"],
            &["x", "--fd", "0", "--replace=yes"],
            &["x", "--fd", "0", "-h"],
            &["x", "--fd", "0", "--help"],
            &["--", "x", "--fd", "0"],
            &["x", "--fd", "0", "--bogus"],
        ];
        for args in puts {
            let quick = quick_put(os(args)).map(|a| format!("{a:?}"));
            let clap = clap_parse::<PutArgs>(args).map(|a| format!("{a:?}"));
            if quick.is_some() {
                assert_eq!(quick, clap, "put {args:?}");
            }
            if clap.is_none() {
                assert_eq!(quick, None, "put {args:?}");
            }
        }
        let gets: &[&[&str]] = &[
            &[
                "cli",
                "--remove",
                "--stdin",
                "--socket",
                "/s",
                "--",
                "/bin/true",
            ],
            &["a", "b", "--", "prog", "--flag", "--", "x"],
            &["--socket=/s", "a", "--", "p"],
            &["a", "--remove", "b", "--", "p"],
            &["a", "--", "p", "-h"],
            &["a"],
            &["--", "p"],
            &["a", "--"],
            &["a", "--remove", "--remove", "--", "p"],
            &["a", "--stdin=1", "--", "p"],
            &["a", "--socket", "--", "p"],
            &["a", "--help", "--", "p"],
            &["a", "-x", "--", "p"],
        ];
        for args in gets {
            let quick = quick_get(os(args)).map(|a| format!("{a:?}"));
            let clap = clap_parse::<GetArgs>(args).map(|a| format!("{a:?}"));
            if quick.is_some() {
                assert_eq!(quick, clap, "get {args:?}");
            }
            if clap.is_none() {
                assert_eq!(quick, None, "get {args:?}");
            }
        }
        // The plain forms the benchmark and scripts use do take the quick
        // path.
        assert!(quick_put(os(&["cli", "--fd", "0", "--socket", "/s"])).is_some());
        assert!(quick_get(os(&["cli", "--remove", "--stdin", "--", "/bin/true"])).is_some());
    }
}
