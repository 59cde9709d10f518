//! `handover dispatch`: accept connections on the activation sockets and
//! hand each one to a worker process over a channel (docs/protocol.md
//! §18). No byte is proxied: the worker talks to the client directly.
//!
//! It is a socket-activated program itself, so it runs under `handover run
//! --workers N` (which starts it as each generation's program: reloads
//! then start a new dispatcher with new workers, switch once they are all
//! ready, and drain the old ones), under systemd, or under anything that
//! speaks LISTEN_FDS.
//!
//! One thread, one event loop, per platform: on Unix a poll over the
//! signalfd, the listening sockets, the connections being peeked for
//! routing, and every worker's channel (`unix.rs`); on Windows a WSAPoll
//! over the sockets, with the channels, the workers' exits and the stop
//! event looked at every few milliseconds (`windows.rs`). What they share
//! is here: the arguments, the start, and what each round does once the
//! events are read ([`Core::settle`]). Delivery is acknowledged
//! (`pool.rs`); routing is in `routes.rs`.

mod pool;
mod routes;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
use unix as event;
#[cfg(windows)]
use windows as event;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

pub use pool::Policy;
use pool::Pool;
use routes::Routes;

#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// How many worker processes run PROGRAM.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub workers: usize,

    /// Which worker gets the next connection.
    #[arg(long, value_enum, default_value = "least-busy")]
    pub policy: Policy,

    /// Route connections to named pools of workers by TLS SNI or HTTP Host
    /// (a TOML file; see docs/protocol.md §18).
    #[arg(long, value_name = "FILE")]
    pub routes: Option<PathBuf>,

    /// The worker program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM [ARGS]..."
    )]
    pub command: Vec<OsString>,
}

/// The most connections accepted and not yet taken by a worker; beyond
/// it the dispatcher stops accepting and clients wait in the kernel's
/// backlog, where a successor dispatcher can take them.
const MAX_WAITING: usize = 1024;
/// How many connections one listener gives per round, so that one busy
/// listener does not starve the rest of the loop.
const ACCEPT_BURST: usize = 64;
/// How long a taken connection may wait to be seen in its worker's state
/// page (and the dispatcher's copy of it to be closed) when nothing wakes
/// the loop sooner. While looks find nothing new taken (a worker busy with
/// a long request, or hung) the wait doubles, up to `LAZY_STATE_MAX`, so a
/// stuck worker does not keep the loop spinning.
const LAZY_STATE: Duration = Duration::from_millis(1);
const LAZY_STATE_MAX: Duration = Duration::from_millis(64);

/// A listening socket and its activation name.
struct Listening {
    name: std::rc::Rc<str>,
    socket: event::Listener,
}

/// What every platform's loop holds besides its events: the pools, the
/// routes, and where the drain and readiness stand.
struct Core {
    pools: Vec<Pool>,
    routes: Routes,
    draining: bool,
    ready_sent: bool,
    /// The current wait between looks at the state pages (see LAZY_STATE).
    lazy: Duration,
}

pub fn run(args: DispatchArgs) -> Result<()> {
    if !(1..=1024).contains(&args.workers) {
        bail!("--workers must be 1 to 1024");
    }
    let routes = match &args.routes {
        Some(path) => Routes::load(path)?,
        None => Routes::none(),
    };
    let listeners = take_listeners()?;
    // Before any worker starts: what the platform's loop takes from the
    // environment (the stop event on Windows) is not theirs.
    let os = event::Os::install()?;
    let mut pools = vec![Pool::new(
        "default",
        args.command.clone(),
        args.workers,
        args.policy,
    )?];
    for spec in &routes.pools {
        let argv = spec.command.clone().unwrap_or_else(|| args.command.clone());
        pools.push(Pool::new(&spec.name, argv, spec.workers, args.policy)?);
    }
    // The first start fails loudly: nothing would serve.
    for pool in &mut pools {
        for slot in pool.slots() {
            pool.start(slot)?;
        }
    }
    let core = Core {
        pools,
        routes,
        draining: false,
        ready_sent: false,
        lazy: LAZY_STATE,
    };
    event::serve(core, listeners, os)
}

/// `handover run`'s dispatch options, the same on every platform.
#[derive(Debug, clap::Args)]
pub struct RunDispatch {
    /// Dispatch: handover accepts and hands each connection to one of N
    /// worker processes running PROGRAM, which take them with
    /// `handover::dispatch::incoming()` (docs/protocol.md §18). Reloads
    /// start N new workers and switch once all are ready.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// With --workers: which worker gets the next connection.
    #[arg(long = "dispatch", value_enum, requires = "workers")]
    pub policy: Option<Policy>,

    /// With --workers: route connections to named pools by TLS SNI or HTTP
    /// Host (a TOML file, docs/protocol.md §18).
    #[arg(long, value_name = "FILE", requires = "workers")]
    pub routes: Option<PathBuf>,
}

/// The command line of the `handover dispatch` that `handover run
/// --workers N` starts as each generation's program: this very binary
/// (its path, and the whole argv). A bad routes file fails here, before
/// anything is bound; the dispatcher reads it again at each reload.
pub fn command_line(
    workers: usize,
    policy: Option<Policy>,
    routes: Option<&std::path::Path>,
    command: &[OsString],
) -> Result<(PathBuf, Vec<OsString>)> {
    if !(1..=1024).contains(&workers) {
        bail!("--workers must be 1 to 1024");
    }
    let me = std::env::current_exe().context("finding the handover binary")?;
    let mut argv: Vec<OsString> = vec![
        me.clone().into(),
        "dispatch".into(),
        "--workers".into(),
        workers.to_string().into(),
    ];
    if let Some(policy) = policy {
        use clap::ValueEnum;
        if let Some(v) = policy.to_possible_value() {
            argv.extend(["--policy".into(), v.get_name().into()]);
        }
    }
    if let Some(routes) = routes {
        Routes::load(routes)?;
        let abs = std::path::absolute(routes).context("--routes")?;
        argv.extend(["--routes".into(), abs.into()]);
    }
    argv.push("--".into());
    argv.extend(command.iter().cloned());
    Ok((me, argv))
}

/// The activation sockets: each must be a listening stream socket (of a
/// kind the platform's loop can accept on).
fn take_listeners() -> Result<Vec<Listening>> {
    let activation = handover::activation::take()?;
    let names = activation.names().to_vec();
    let handles = activation.into_handles();
    if handles.is_empty() {
        bail!(
            "no sockets to accept on: start `handover dispatch` by socket activation \
             (LISTEN_FDS), e.g. under `handover run -l ADDR --workers N`"
        );
    }
    let mut out = Vec::new();
    for (handle, name) in handles.into_iter().zip(names) {
        let socket =
            event::listener(handle).with_context(|| format!("activation socket {name:?}"))?;
        out.push(Listening {
            name: name.into(),
            socket,
        });
    }
    Ok(out)
}

impl Core {
    /// Connections accepted and not yet taken, besides those being peeked.
    fn pending(&self) -> usize {
        self.pools.iter().map(Pool::pending).sum::<usize>()
    }

    /// The nearest of `deadline` and what the pools wait for: a restart,
    /// or the next look at the state pages while a delivery waits to be
    /// taken.
    fn deadline(&self, mut deadline: Option<Instant>) -> Option<Instant> {
        for p in &self.pools {
            // Deliveries not yet taken are looked for at least this often.
            let lazy = p.outstanding().then(|| Instant::now() + self.lazy);
            for t in [p.next_restart(), lazy] {
                deadline = match (deadline, t) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        deadline
    }

    /// The end of every round, once its events are read: restarts that
    /// are due, the state pages, deliveries, the drain, and readiness.
    fn settle(&mut self) {
        let now = Instant::now();
        let mut fresh = false;
        for pool in &mut self.pools {
            if !self.draining || !pool.queue.is_empty() {
                pool.restart_due(now);
            }
            // Taken connections free room and close our copies; finished
            // ones count for least-busy.
            fresh |= pool.observe();
            fresh |= pool.deliver();
            if self.draining {
                pool.end_idle();
            }
        }
        self.lazy = if fresh {
            LAZY_STATE
        } else {
            (self.lazy * 2).min(LAZY_STATE_MAX)
        };
        if !self.ready_sent && self.pools.iter().all(Pool::ready) {
            self.ready_sent = true;
            tracing::info!("every worker is ready");
            if let Err(e) = handover::notify::notify("READY=1") {
                tracing::warn!(error = %e, "telling our supervisor we are ready failed");
            }
        }
    }

    /// Draining and every worker gone: the dispatcher's work is done.
    fn finished(&self) -> bool {
        if self.draining && self.pools.iter().all(Pool::all_exited) {
            tracing::info!("every worker has exited");
            return true;
        }
        false
    }
}
