//! `handover`: the command-line tool.

mod demo;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "handover", version, about = "Hand sockets and other handles between processes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a handover: this process binds a TCP listener, hands it over a
    /// channel to a second process, and that process serves a real HTTP
    /// request through it.
    Demo,
    /// The second process of `handover demo` (internal).
    #[command(hide = true)]
    DemoServer {
        /// The channel name to fetch the listener from.
        #[arg(long)]
        channel: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANDOVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::DemoServer { channel } => demo::serve(&channel),
    }
}
