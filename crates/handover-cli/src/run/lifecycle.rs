//! The options of `handover run` that shape the program's life on every
//! platform: readiness, stopping, restarts, the fd store's limit and the
//! control socket.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{duration, supervise};

#[derive(Debug, Args)]
pub struct Lifecycle {
    /// How a new generation tells it is ready: `notify` (READY=1 on
    /// NOTIFY_SOCKET), `exec:CMD` (a check command, run with `sh -c`, or
    /// `cmd /C` on Windows, until it exits 0; HANDOVER_PID is the
    /// generation's pid), or `delay:DURATION`. READY=1 also counts, except
    /// with `exec:`.
    #[arg(long, default_value = "delay:1s", value_name = "HOW")]
    pub ready: String,

    /// A reload whose new generation is not ready in this time is rolled
    /// back.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub ready_timeout: String,

    /// The signal that tells an old generation to finish and exit. On
    /// Windows: `event` (the default; TERM means the same), which sets the
    /// event named in the program's HANDOVER_STOP_EVENT, or `kill`.
    #[arg(long, default_value = "TERM", value_name = "SIGNAL")]
    pub stop_signal: String,

    /// How long an old generation may drain before it is killed.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub stop_timeout: String,

    /// Start the program again when it exits on its own: `no`,
    /// `on-failure` (a non-zero exit or a signal), `always`. Backoff
    /// doubles from 100ms up to --restart-max-delay; the sockets stay open
    /// meanwhile, so clients wait instead of being refused.
    #[arg(long, default_value = "no", value_name = "WHEN")]
    pub restart: String,

    /// The longest wait before a restart.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub restart_max_delay: String,

    /// The most descriptors the fd store keeps (FDSTORE=1); more are
    /// refused and closed.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub fdstore_max: usize,

    /// The control socket for `handover reload` and `handover status`
    /// (default: $HANDOVER_CONTROL, $XDG_RUNTIME_DIR/handover.sock or
    /// /tmp/handover-UID.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

impl Lifecycle {
    /// The supervisor's options, with the `--watch` paths (inotify on
    /// Linux, polled on Windows).
    pub fn options(&self, watch: Vec<PathBuf>) -> Result<supervise::Options> {
        let args = self;
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
            stop_signal: supervise::parse_stop_signal(&args.stop_signal)
                .with_context(|| format!("--stop-signal {:?}", args.stop_signal))?,
            stop_timeout: duration(&args.stop_timeout).context("--stop-timeout")?,
            restart,
            restart_max_delay: duration(&args.restart_max_delay).context("--restart-max-delay")?,
            fdstore_max: args.fdstore_max,
            watch,
            control: args.control.clone(),
        })
    }
}
