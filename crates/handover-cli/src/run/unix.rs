//! `handover run` on Unix: its command line, and the start: inherited
//! descriptors, users, binding, then the supervisor (or accept mode).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::listen::{self, Bound, ListenOptions, ListenSpec};
use handover::{Command, Handle};

use super::{accept, lifecycle, supervise, users, Program};

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

    #[command(flatten)]
    dispatch: crate::dispatch::RunDispatch,

    #[command(flatten)]
    lifecycle: lifecycle::Lifecycle,

    /// Reload when anything under PATH changes (debounced), for the
    /// edit-compile-reload loop.
    #[arg(long, value_name = "PATH", num_args = 1)]
    watch: Vec<PathBuf>,

    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM [ARGS]..."
    )]
    command: Vec<OsString>,
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
    let accept_mode = args.accept || args.inetd;
    let (program, ready_from_dispatcher) = match args.dispatch.workers {
        Some(n) => {
            if accept_mode {
                bail!("--workers cannot be combined with --accept or --inetd");
            }
            (dispatch_program(&args, n, identity)?, true)
        }
        None => {
            let argv = args.command.clone();
            (
                Program {
                    argv,
                    path,
                    identity,
                },
                false,
            )
        }
    };

    let mut options_for_restarts = args.lifecycle.options(args.watch.clone())?;
    if ready_from_dispatcher {
        // The dispatcher says READY=1 once every worker asked for its
        // first connection: that is what a reload switches on.
        options_for_restarts.ready = supervise::Ready::Notify;
    }
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

/// With --workers, each generation's program is `handover dispatch`,
/// which starts the workers and hands them the connections.
fn dispatch_program(
    args: &RunArgs,
    workers: usize,
    identity: Option<users::Identity>,
) -> Result<Program> {
    let (path, argv) = crate::dispatch::command_line(
        workers,
        args.dispatch.policy,
        args.dispatch.routes.as_deref(),
        &args.command,
    )?;
    Ok(Program {
        argv,
        path,
        identity,
    })
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
