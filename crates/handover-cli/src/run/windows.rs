//! `handover run` on Windows: its command line, and the start: binding,
//! then the supervisor, with reloads, readiness, restarts and the fd store
//! as on Unix.
//!
//! The program fetches its sockets through the activation bootstrap
//! (`handover::activation::take`) or, for programs written against the
//! `listenfd` crate, through systemfd's protocol, which is served too
//! unless `--no-systemfd` is given. Everything the user can fix (a bad
//! spec, a missing program, a port in use) fails before the program
//! starts.
//!
//! `--watch` polls the paths every 500 ms (`watch_poll.rs`) where Linux
//! has inotify.
//!
//! With `--workers N` each generation's program is `handover dispatch`
//! (`dispatch/windows.rs`), as on Unix.
//!
//! Not on Windows yet: --accept/--inetd, --user/--group and --fd; the Unix
//! command has them (`unix.rs`).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::listen::{self, Bound, ListenOptions, ListenSpec};
use handover::{Command, Handle};

use super::{lifecycle, supervise, Program};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Listen on SPEC and pass the socket to the program, in order.
    /// SPEC: 127.0.0.1:8080, [::]:443, :8080 (every address; port 0 lets
    /// the system pick), udp:HOST:PORT. NAME goes into LISTEN_FDNAMES.
    #[arg(short = 'l', long = "listen", value_name = "SPEC[=NAME]")]
    listen: Vec<String>,

    /// listen() backlog of stream sockets.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    backlog: i32,

    /// Do not serve systemfd's protocol (SYSTEMFD_SOCKET_SERVER) next to
    /// handover's own activation pipe.
    #[arg(long)]
    no_systemfd: bool,

    #[command(flatten)]
    dispatch: crate::dispatch::RunDispatch,

    #[command(flatten)]
    lifecycle: lifecycle::Lifecycle,

    /// Reload when anything under PATH changes (debounced), for the
    /// edit-compile-reload loop. On Windows the paths are polled every
    /// 500 ms.
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
    let specs: Vec<ListenSpec> = args
        .listen
        .iter()
        .map(|s| s.parse::<ListenSpec>())
        .collect::<Result<_, _>>()?;
    if specs.is_empty() {
        bail!("nothing to hand over: give at least one --listen SPEC");
    }
    let mut options = args.lifecycle.options(args.watch.clone())?;
    // A missing program is reported before anything is bound.
    let path = Command::new(&args.command[0])
        .resolved_program()
        .with_context(|| format!("cannot run {:?}", args.command[0].to_string_lossy()))?;
    let program = match args.dispatch.workers {
        // Each generation's program is `handover dispatch`, which starts
        // the workers and hands them the connections; it says READY=1
        // once every worker asked for its first connection, which is what
        // a reload switches on.
        Some(n) => {
            let (path, argv) = crate::dispatch::command_line(
                n,
                args.dispatch.policy,
                args.dispatch.routes.as_deref(),
                &args.command,
            )?;
            options.ready = supervise::Ready::Notify;
            Program {
                argv,
                path,
                systemfd: false,
            }
        }
        None => Program {
            argv: args.command.clone(),
            path,
            systemfd: !args.no_systemfd,
        },
    };
    let listen_options = ListenOptions {
        backlog: args.backlog,
        ..ListenOptions::default()
    };
    let bound: Vec<Bound> = specs
        .iter()
        .map(|spec| listen::bind(spec, &listen_options))
        .collect::<Result<_, _>>()?;

    let mut stdout = std::io::stdout().lock();
    for (i, b) in bound.iter().enumerate() {
        writeln!(stdout, "handover: listening on {b} as socket {i}")?;
        tracing::info!(socket = %b, "listening");
    }
    stdout.flush()?;
    drop(stdout);

    let handles = bound
        .iter()
        .map(Bound::try_clone_handle)
        .collect::<Result<Vec<Handle>, _>>()?;
    // The sockets stay open here for the whole run; connections queue in
    // the backlog even while a generation is starting.
    supervise::run(&program, handles, bound, options)
}
