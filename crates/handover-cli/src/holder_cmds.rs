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
/// arguments are anything else, a request for help, or wrong (then the full
/// parser runs, and reports), or if HANDOVER_LOG asks for logging.
pub fn quick() -> Option<Result<()>> {
    fn parse<A: clap::Args + clap::FromArgMatches>(
        name: &'static str,
        args: impl Iterator<Item = OsString>,
    ) -> Option<A> {
        let matches = A::augment_args(clap::Command::new(name).no_binary_name(true))
            .try_get_matches_from(args)
            .ok()?;
        A::from_arg_matches(&matches).ok()
    }
    if std::env::var_os("HANDOVER_LOG").is_some() {
        return None;
    }
    let mut args = std::env::args_os().skip(1);
    match args.next()?.to_str()? {
        "put" => Some(put(parse::<PutArgs>("put", args)?)),
        "get" => Some(get(parse::<GetArgs>("get", args)?)),
        _ => None,
    }
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
