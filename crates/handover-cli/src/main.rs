//! `handover`: the command-line tool.

// On Linux with glibc the C `main` below is the entry point instead of
// std's (see `start`); std::env::args still works there, as glibc hands
// argc/argv to std's own initialiser.
#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

mod adopt;
mod demo;
#[cfg(unix)]
mod demo_reload;
mod dispatch;
#[cfg(unix)]
mod hold;
#[cfg(unix)]
mod holder_cmds;
/// The HTTP demo server, built in so that `handover demo` needs nothing else.
#[cfg(unix)]
#[path = "../examples/http_demo.rs"]
mod http_demo;
mod run;
mod status;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "handover",
    version,
    about = "Hand sockets and other handles between processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show handover at work. On Linux: an HTTP server under `handover
    /// run`, reloaded every two seconds while four clients load it; it
    /// prints requests served, failed and reloads. With --channel (and on
    /// Windows): a listener handed over a channel to a second process,
    /// which serves a real HTTP request through it.
    Demo {
        /// The channel demo instead of the reload demo.
        #[arg(long)]
        channel: bool,
    },
    /// The HTTP server of `handover demo` (internal).
    #[cfg(unix)]
    #[command(hide = true)]
    DemoHttp,
    /// Bind sockets and run PROGRAM on them by the socket-activation
    /// protocol (LISTEN_FDS), staying as its supervisor.
    Run(Box<run::RunArgs>),
    /// Accept connections on the activation sockets (LISTEN_FDS) and hand
    /// each one to one of N worker processes over a channel; no byte is
    /// proxied. `handover run --workers N` runs it for you.
    Dispatch(Box<dispatch::DispatchArgs>),
    /// Reload the program under a running `handover run`: start a new
    /// generation on the same sockets, and once it is ready stop the old
    /// one. Prints the new pid; exits 1 with the reason if it was rolled
    /// back.
    Reload {
        /// The control socket of the `handover run` to reload.
        #[arg(long, value_name = "PATH")]
        control: Option<std::path::PathBuf>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        timeout: String,
    },
    /// Show a running `handover run`: generations, sockets, the fd store,
    /// restarts and the last reload.
    Status {
        /// The control socket of the `handover run` to ask.
        #[arg(long, value_name = "PATH")]
        control: Option<std::path::PathBuf>,
        /// Print the JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the holder: a daemon that keeps named sockets and other handles
    /// for unrelated processes, with access rules (docs/protocol.md §17).
    #[cfg(unix)]
    Hold(Box<hold::HoldArgs>),
    /// Store a descriptor (or a socket bound from a spec) in the holder.
    #[cfg(unix)]
    Put(holder_cmds::PutArgs),
    /// Start PROGRAM with entries from the holder at descriptors 3, 4, …
    /// (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), or on its stdin.
    #[cfg(unix)]
    Get(holder_cmds::GetArgs),
    /// List the holder's entries: name, kind, address, owner, times.
    #[cfg(unix)]
    Ls(holder_cmds::LsArgs),
    /// Remove an entry from the holder, closing its descriptor.
    #[cfg(unix)]
    Rm(holder_cmds::RmArgs),
    /// Wait until the holder has an entry of this name.
    #[cfg(unix)]
    Wait(holder_cmds::WaitArgs),
    /// Take sockets out of a running process (`--fd N`, or all its
    /// `--listeners`) and start PROGRAM on them by socket activation
    /// (names NAME, NAME.1, …), or put them into the holder (`--hold`).
    Adopt(Box<adopt::AdoptArgs>),
    /// The second process of `handover demo` (internal).
    #[command(hide = true)]
    DemoServer {
        /// The channel name to fetch the listener from.
        #[arg(long)]
        channel: String,
    },
}

/// The process's entry point, called by the C runtime, in place of std's:
/// std's start-up (`lang_start`) also reads /proc/self/maps to find the
/// main thread's stack and installs an alternate signal stack with SIGSEGV
/// and SIGBUS handlers, to report a stack overflow by name: about 3 % of
/// a `handover put` or `get`, which are started once per handle
/// (docs/benchmarks.md, the holder scenario). What the rest of the
/// command relies on is kept: the
/// standard descriptors are open (on /dev/null if they were closed),
/// SIGPIPE is ignored (a closed pipe is an EPIPE error) and is reset in
/// the programs started, a panic prints its message and exits with 101,
/// and stdout is flushed on exit. A stack overflow is a plain SIGSEGV.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[no_mangle]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    // SAFETY: the C runtime passes argc valid C strings in argv.
    let command = (argc > 1).then(|| unsafe { std::ffi::CStr::from_ptr(*argv.add(1)) });
    if let Some(b"put" | b"get") = command.map(std::ffi::CStr::to_bytes) {
        holder_cmds::small_heap();
    }
    start();
    let code = std::panic::catch_unwind(run).unwrap_or(101);
    // Flushes stdout, as returning from std's main does.
    std::process::exit(code)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(test))))]
fn main() {
    std::process::exit(run())
}

/// What std's start-up does on Unix before `main` and that this program
/// needs: descriptors 0, 1 and 2 open, so that nothing opened later takes
/// their place, and SIGPIPE ignored.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
fn start() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: plain system calls on this process's own descriptors and
    // signal dispositions, before any other thread exists.
    unsafe {
        let polled = loop {
            match libc::poll(fds.as_mut_ptr(), 3, 0) {
                -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
                }
                n => break n,
            }
        };
        for pfd in &fds {
            let closed = if polled == -1 {
                libc::fcntl(pfd.fd, libc::F_GETFD) == -1
            } else {
                pfd.revents & libc::POLLNVAL != 0
            };
            if closed && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) == -1 {
                libc::abort();
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The command; its exit status.
fn run() -> i32 {
    if let Err(e) = real_main() {
        // Each cause once: library errors already quote their OS error.
        let mut message = String::new();
        for cause in e.chain() {
            let cause = cause.to_string();
            if !message.ends_with(&cause) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&cause);
            }
        }
        eprintln!("handover: error: {message}");
        return 1;
    }
    0
}

/// Logs go to stderr, filtered by HANDOVER_LOG: a level (`debug`), or
/// targets with levels (`warn,handover::run=debug`). `info` when unset; a
/// value that does not parse is reported and `info` used.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let (filter, bad) = match std::env::var("HANDOVER_LOG") {
        Ok(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                default(),
                Some(format!(
                    "HANDOVER_LOG={v:?} is not understood ({e}); logging at info"
                )),
            ),
        },
        Err(std::env::VarError::NotPresent) => (default(), None),
        Err(std::env::VarError::NotUnicode(v)) => (
            default(),
            Some(format!("HANDOVER_LOG={v:?} is not UTF-8; logging at info")),
        ),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    if let Some(bad) = bad {
        tracing::warn!("{bad}");
    }
}

fn real_main() -> Result<()> {
    // `put` and `get` are run often and briefly (one per handle, from
    // scripts), and log nothing: they skip the logging set-up and parse
    // only their own arguments (anything else goes the long way below).
    #[cfg(unix)]
    if let Some(done) = holder_cmds::quick() {
        return done;
    }
    init_logging();
    match Cli::parse().command {
        #[cfg(unix)]
        Command::Demo { channel: false } => demo_reload::run(),
        Command::Demo { .. } => demo::run(),
        #[cfg(unix)]
        Command::DemoHttp => {
            http_demo::main();
            Ok(())
        }
        Command::DemoServer { channel } => demo::serve(&channel),
        Command::Run(args) => run::run(*args),
        Command::Dispatch(args) => dispatch::run(*args),
        Command::Adopt(args) => adopt::run(*args),
        Command::Reload { control, timeout } => status::reload(control.as_deref(), &timeout),
        Command::Status { control, json } => status::status(control.as_deref(), json),
        #[cfg(unix)]
        Command::Hold(args) => hold::run(*args),
        #[cfg(unix)]
        Command::Put(args) => holder_cmds::put(args),
        #[cfg(unix)]
        Command::Get(args) => holder_cmds::get(args),
        #[cfg(unix)]
        Command::Ls(args) => holder_cmds::ls(args),
        #[cfg(unix)]
        Command::Rm(args) => holder_cmds::rm(args),
        #[cfg(unix)]
        Command::Wait(args) => holder_cmds::wait(args),
    }
}
