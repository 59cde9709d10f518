//! `handover run` on Windows: bind sockets, start a program on them, and
//! exit as it exits.
//!
//! The program fetches its sockets through the activation bootstrap
//! (`handover::activation::take`) or, for programs written against the
//! `listenfd` crate, through systemfd's protocol, which is served too
//! unless `--no-systemfd` is given. Everything the user can fix (a bad
//! spec, a missing program, a port in use) fails before the program
//! starts.
//!
//! Not on Windows yet: --accept/--inetd, --user/--group, --fd, and the
//! notify socket; the Linux supervisor has them (src/run/).

use std::ffi::OsString;
use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use handover::listen::{self, Bound, ListenOptions, ListenSpec};
use handover::windows::CommandExt;
use handover::Command;

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
    let mut cmd = Command::new(&args.command[0]);
    // If handover is killed, the program goes too, rather than keep the
    // ports as an orphan.
    cmd.args(&args.command[1..])
        .systemfd(!args.no_systemfd)
        .end_with_parent(true);
    // A missing program is reported before anything is bound.
    let path = cmd
        .resolved_program()
        .with_context(|| format!("cannot run {:?}", args.command[0].to_string_lossy()))?;
    cmd.program_path(&path);
    let options = ListenOptions {
        backlog: args.backlog,
        ..ListenOptions::default()
    };
    let bound: Vec<Bound> = specs
        .iter()
        .map(|spec| listen::bind(spec, &options))
        .collect::<Result<_, _>>()?;

    let mut stdout = std::io::stdout().lock();
    for (i, b) in bound.iter().enumerate() {
        writeln!(stdout, "handover: listening on {b} as socket {i}")?;
        tracing::info!(socket = %b, "listening");
    }
    stdout.flush()?;
    drop(stdout);

    for b in &bound {
        cmd.activation(b.try_clone_handle()?)?;
    }
    let mut child = cmd.spawn()?;
    tracing::info!(pid = child.id(), program = %path.display(), "started");
    // The sockets stay open here while the program runs; connections
    // queue in the backlog even while it is starting.
    let status = child.wait()?;
    tracing::info!(%status, "the program exited");
    drop(bound);
    std::process::exit(status.code().unwrap_or(1));
}
