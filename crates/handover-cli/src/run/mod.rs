//! `handover run`: bind sockets, start a program on them by the socket
//! activation protocol, and stay as its supervisor.
//!
//! Everything that can fail for a reason the user can fix (a bad spec, an
//! unknown user, a missing program, a port in use, a low port without
//! privileges) fails before the program starts, and whatever was bound by
//! then is closed again, socket files removed.

mod accept;
pub mod control;
mod fdstore;
mod signals;
mod supervise;
mod users;
mod watch;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::listen::{self, Bound, ListenOptions, ListenSpec};
use handover::unix::CommandExt;
use handover::{Command, Handle};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Listen on SPEC, passed to the program as the next descriptor from 3
    /// on. SPEC: 127.0.0.1:8080, [::]:443, :8080 (every address; port 0
    /// lets the kernel pick), udp:HOST:PORT, a path or unix:PATH (Unix
    /// stream), unix-dgram:PATH, unix-seqpacket:PATH, @NAME (Linux abstract).
    /// NAME goes into LISTEN_FDNAMES.
    #[arg(short = 'l', long = "listen", value_name = "SPEC[=NAME]")]
    listen: Vec<String>,

    /// Pass on descriptor N, which handover itself inherited (from systemd
    /// or another activator), after the --listen sockets.
    #[arg(long = "fd", value_name = "N=NAME")]
    fds: Vec<String>,

    /// listen(2) backlog of stream sockets.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    backlog: i32,

    /// File mode of Unix socket files, in octal (e.g. 660).
    #[arg(long, value_name = "OCTAL")]
    socket_mode: Option<String>,

    /// Owner of Unix socket files.
    #[arg(long, value_name = "USER[:GROUP]")]
    socket_owner: Option<String>,

    /// Run the program as this user (name or uid), with its groups: bind as
    /// root, serve unprivileged.
    #[arg(long)]
    user: Option<String>,

    /// Run the program with this group (name or gid).
    #[arg(long)]
    group: Option<String>,

    /// Accept connections here and start one PROGRAM per connection, with
    /// the connection at descriptor 3 (LISTEN_FDS=1, LISTEN_FDNAMES=connection,
    /// REMOTE_ADDR, REMOTE_PORT).
    #[arg(long)]
    accept: bool,

    /// Like --accept, with the connection on stdin and stdout (inetd style).
    #[arg(long)]
    inetd: bool,

    /// With --accept/--inetd: at most N programs at once; more connections
    /// wait in the listen backlog, they are not refused.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// How a new generation tells it is ready: `notify` (READY=1 on
    /// NOTIFY_SOCKET), `exec:CMD` (a check command, run with `sh -c` until
    /// it exits 0; HANDOVER_PID is the generation's pid), or
    /// `delay:DURATION`. READY=1 also counts, except with `exec:`.
    #[arg(long, default_value = "delay:1s", value_name = "HOW")]
    ready: String,

    /// A reload whose new generation is not ready in this time is rolled
    /// back.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    ready_timeout: String,

    /// The signal that tells an old generation to finish and exit.
    #[arg(long, default_value = "TERM", value_name = "SIGNAL")]
    stop_signal: String,

    /// How long an old generation may drain before SIGKILL.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    stop_timeout: String,

    /// Start the program again when it exits on its own: `no`,
    /// `on-failure` (a non-zero exit or a signal), `always`. Backoff
    /// doubles from 100ms up to --restart-max-delay; the sockets stay open
    /// meanwhile, so clients wait instead of being refused.
    #[arg(long, default_value = "no", value_name = "WHEN")]
    restart: String,

    /// The longest wait before a restart.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    restart_max_delay: String,

    /// The most descriptors the fd store keeps (FDSTORE=1); more are
    /// refused and closed.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    fdstore_max: usize,

    /// Reload when anything under PATH changes (debounced), for the
    /// edit-compile-reload loop.
    #[arg(long, value_name = "PATH", num_args = 1)]
    watch: Vec<PathBuf>,

    /// The control socket for `handover reload` and `handover status`
    /// (default: $HANDOVER_CONTROL, $XDG_RUNTIME_DIR/handover.sock or
    /// /tmp/handover-UID.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM [ARGS]..."
    )]
    command: Vec<OsString>,
}

/// What every start of the program shares.
pub struct Program {
    pub argv: Vec<OsString>,
    /// Where the program was found, once: not looked for again at every
    /// start (a program per connection in accept mode).
    pub path: PathBuf,
    pub identity: Option<users::Identity>,
}

impl Program {
    pub fn name(&self) -> String {
        self.argv[0].to_string_lossy().into_owned()
    }

    /// Where the program is now: looked for again at each reload, so that
    /// a new binary installed under the same name is picked up.
    pub fn resolve(&self) -> Result<PathBuf> {
        Command::new(&self.argv[0])
            .resolved_program()
            .with_context(|| format!("cannot run {:?}", self.name()))
    }

    /// A command for one start, with privileges dropped as asked.
    pub fn command(&self) -> Command {
        self.command_at(&self.path)
    }

    /// A command for one start of the program found at `path`.
    pub fn command_at(&self, path: &std::path::Path) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.program_path(path).args(&self.argv[1..]);
        // Signals for the program reach it through us; its own process
        // group lets us clean up whatever it leaves behind, and if we are
        // killed outright it is told.
        cmd.process_group(true)
            .parent_death_signal(Some(libc::SIGTERM));
        if let Some(id) = &self.identity {
            cmd.uid(id.uid).gid(id.gid).groups(&id.groups);
            if let Some(name) = &id.name {
                cmd.env("USER", name).env("LOGNAME", name);
            }
            if let Some(home) = &id.home {
                cmd.env("HOME", home);
            }
        }
        cmd
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    // Inherited descriptors first, before this process opens anything that
    // could take their numbers.
    let inherited = take_inherited(&args.fds)?;
    let specs: Vec<ListenSpec> = args
        .listen
        .iter()
        .map(|s| s.parse::<ListenSpec>())
        .collect::<Result<_, _>>()?;
    if specs.is_empty() && inherited.is_empty() {
        bail!("nothing to hand over: give at least one --listen SPEC or --fd N=NAME");
    }
    let identity = users::resolve(args.user.as_deref(), args.group.as_deref())?;
    let options = ListenOptions {
        backlog: args.backlog,
        socket_mode: args
            .socket_mode
            .as_deref()
            .map(|m| {
                u32::from_str_radix(m, 8)
                    .with_context(|| format!("--socket-mode {m:?} is not octal"))
            })
            .transpose()?,
        socket_owner: args.socket_owner.as_deref().map(socket_owner).transpose()?,
    };
    // A missing program is reported before anything is bound.
    let path = Command::new(&args.command[0])
        .resolved_program()
        .with_context(|| format!("cannot run {:?}", args.command[0].to_string_lossy()))?;
    let program = Program {
        argv: args.command.clone(),
        path,
        identity,
    };

    let options_for_restarts = supervise_options(&args)?;
    let accept_mode = args.accept || args.inetd;
    if accept_mode {
        if !inherited.is_empty() {
            bail!("--fd cannot be combined with --accept or --inetd");
        }
        accept::check(&specs, args.max_connections)?;
    } else if args.max_connections.is_some() {
        bail!("--max-connections needs --accept or --inetd");
    }

    let bound: Vec<Bound> = specs
        .iter()
        .map(|spec| listen::bind(spec, &options))
        .collect::<Result<_, _>>()?;

    let mut stdout = std::io::stdout().lock();
    for (i, b) in bound.iter().enumerate() {
        if accept_mode {
            writeln!(stdout, "handover: listening on {b}")?;
        } else {
            writeln!(stdout, "handover: listening on {b} as fd {}", 3 + i)?;
        }
        tracing::info!(socket = %b, "listening");
    }
    stdout.flush()?;
    drop(stdout);

    if accept_mode {
        return accept::serve(&program, &bound, args.inetd, args.max_connections);
    }
    let mut handles = Vec::new();
    for b in &bound {
        handles.push(b.try_clone_handle()?);
    }
    handles.extend(inherited);
    supervise::run(&program, handles, bound, options_for_restarts)
}

fn supervise_options(args: &RunArgs) -> Result<supervise::Options> {
    use supervise::{Ready, Restart};
    let ready = match args.ready.split_once(':') {
        _ if args.ready == "notify" => Ready::Notify,
        Some(("exec", cmd)) if !cmd.trim().is_empty() => Ready::Exec(cmd.to_owned()),
        Some(("delay", d)) => Ready::Delay(duration(d).context("--ready delay:")?),
        _ => bail!(
            "--ready {:?}: expected notify, exec:CMD or delay:DURATION",
            args.ready
        ),
    };
    let restart = match args.restart.as_str() {
        "no" => Restart::No,
        "on-failure" => Restart::OnFailure,
        "always" => Restart::Always,
        other => bail!("--restart {other:?}: expected no, on-failure or always"),
    };
    if args.fdstore_max > 65_536 {
        bail!("--fdstore-max {} is more than 65536", args.fdstore_max);
    }
    Ok(supervise::Options {
        ready,
        ready_timeout: duration(&args.ready_timeout).context("--ready-timeout")?,
        stop_signal: signals::parse(&args.stop_signal)
            .with_context(|| format!("--stop-signal {:?}", args.stop_signal))?,
        stop_timeout: duration(&args.stop_timeout).context("--stop-timeout")?,
        restart,
        restart_max_delay: duration(&args.restart_max_delay).context("--restart-max-delay")?,
        fdstore_max: args.fdstore_max,
        watch: args.watch.clone(),
        control: args.control.clone(),
    })
}

/// `500ms`, `2s`, `1.5s`, `3m`, `1h`, or a plain number of seconds.
pub fn duration(text: &str) -> Result<std::time::Duration> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => t.split_at(at),
        None => (t, "s"),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("{text:?} is not a duration (500ms, 2s, 3m, 1h)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (ms, s, m, h)"),
    };
    if secs > 365.0 * 86_400.0 {
        bail!("{text:?} is too long");
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn socket_owner(spec: &str) -> Result<(Option<u32>, Option<u32>)> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = if user.is_empty() {
        None
    } else {
        Some(
            users::resolve(Some(user), None)?
                .map(|i| i.uid)
                .context("no such user")?,
        )
    };
    let gid = group
        .filter(|g| !g.is_empty())
        .map(users::group)
        .transpose()?;
    Ok((uid, gid))
}

fn take_inherited(fds: &[String]) -> Result<Vec<Handle>> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for spec in fds {
        let (n, name) = spec
            .split_once('=')
            .with_context(|| format!("--fd {spec:?}: expected N=NAME"))?;
        let n: i32 = n
            .parse()
            .ok()
            .filter(|n| *n >= 3)
            .with_context(|| format!("--fd {spec:?}: N is a descriptor number, 3 or more"))?;
        handover::activation::check_name(name).with_context(|| format!("--fd {spec:?}"))?;
        if seen.contains(&n) {
            bail!("--fd {n} is given twice");
        }
        seen.push(n);
        // SAFETY: nothing in this process has opened a descriptor yet
        // except the standard ones, so descriptor `n` (≥ 3), if open, was
        // inherited and is owned by nothing else; each number is taken once.
        let handle =
            unsafe { handover::unix::take_inherited(n) }.with_context(|| format!("--fd {n}"))?;
        out.push(handle.with_name(name));
    }
    Ok(out)
}
