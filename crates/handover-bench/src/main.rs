//! handover's benchmark program. Each scenario is a subcommand and a
//! module; all of them report through [`report`], as a table of figures
//! side by side with a baseline, or as one JSON object (`--json`).
//!
//! ```text
//! cargo run --release -p handover-bench -- channel [--json]
//! cargo build --release -p handover-cli && cargo run --release -p handover-bench -- accept [--json]
//! cargo build --release -p handover-cli && cargo run --release -p handover-bench -- restart [--json]
//! cargo build --release -p handover-cli && cargo run --release -p handover-bench -- holder [--json]
//! cargo build --release -p handover-cli && cargo run --release -p handover-bench -- dispatch [--json]
//! ```

mod accept;
mod channel;
mod dispatch;
mod holder;
mod report;
mod restart;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "handover's benchmarks: every figure side by side with its baseline")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Handles per second over one connection at 1, 16 and 253 handles per
    /// message, and one handle's round trip, against a plain sendmsg loop,
    /// sendfd and passfd.
    Channel(channel::Args),
    /// Connections per second with one process spawned per connection
    /// (inetd style, /bin/echo): `handover run --inetd` against
    /// systemd-socket-activate --inetd. Needs target/release/handover
    /// (`cargo build --release -p handover-cli`).
    Accept(accept::Args),
    /// Failed requests and latency while the HTTP demo server is reloaded
    /// under load: `handover reload` against a naive restart (stop, then
    /// start). Needs target/release/handover (`cargo build --release -p
    /// handover-cli`).
    Restart(restart::Args),
    /// Store + retrieve round trips per second through `handover hold`:
    /// the library client against a bare channel, and the CLI (put + get)
    /// against s6-fdholder-store + s6-fdholder-retrieve (Debian's s6).
    /// Needs target/release/handover (`cargo build --release -p
    /// handover-cli`).
    Holder(holder::Args),
    /// Short requests/s and p99 through `handover run --workers N` against
    /// SO_REUSEPORT workers and a single process, and 10 MiB responses
    /// against a byte-copying proxy. Needs target/release/handover
    /// (`cargo build --release -p handover-cli`).
    Dispatch(dispatch::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile_limit();
    match &cli.scenario {
        Scenario::Channel(args) => channel::run(args),
        Scenario::Accept(args) => accept::run(args),
        Scenario::Restart(args) => restart::run(args),
        Scenario::Holder(args) => holder::run(args),
        Scenario::Dispatch(args) => dispatch::run(args),
    }
}

/// Raises the soft limit on open descriptors to the hard limit: descriptors
/// in flight count against it, and so does a burst of received ones.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        eprintln!("warning: could not raise RLIMIT_NOFILE to the hard limit: {e}");
    }
}
