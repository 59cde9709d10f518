//! The async subject: [`handover::tokio::AsyncChannel`]. Each end runs on
//! its own thread in its own current-thread tokio runtime, the async
//! counterpart of the blocking subjects' two threads.

use std::future::Future;
use std::os::fd::OwnedFd;

use anyhow::{bail, ensure, Context, Result};
use handover::tokio::AsyncChannel;
use handover::{Channel, Handle};

use super::{time_round_trips, time_throughput, Sample, Timing};

fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("tokio runtime")?
        .block_on(f)
}

fn handles(fds: &[OwnedFd]) -> Result<Vec<Handle>> {
    fds.iter()
        .map(|fd| Ok(Handle::from(fd.try_clone()?)))
        .collect()
}

/// Handles per second, `fds` in every message.
pub fn throughput(fds: &[OwnedFd], n: usize, t: Timing) -> Result<Sample> {
    let handles = handles(fds)?;
    let (tx, rx) = Channel::pair()?;
    time_throughput(
        n,
        t,
        move |shared| {
            block_on(async move {
                let tx = AsyncChannel::try_from(tx)?;
                let mut sent = 0u64;
                while !shared.stopped() {
                    tx.send(&[], &handles).await?;
                    sent += 1;
                }
                Ok(sent)
            })
        },
        move |shared| {
            block_on(async move {
                let rx = AsyncChannel::try_from(rx)?;
                let mut got = 0u64;
                while let Some(m) = rx.recv().await? {
                    let k = m.handles.len();
                    ensure!(k == n, "message {got} brought {k} handles, not {n}");
                    drop(m);
                    got += 1;
                    shared.count(got);
                }
                Ok(got)
            })
        },
    )
}

/// Microseconds per round trip of one handle.
pub fn round_trip(fa: &[OwnedFd], fb: &[OwnedFd], t: Timing) -> Result<f64> {
    let (ha, hb) = (handles(fa)?, handles(fb)?);
    let (a, b) = Channel::pair()?;
    time_round_trips(
        t,
        move |laps| {
            block_on(async move {
                let a = AsyncChannel::try_from(a)?;
                while laps.next() {
                    a.send(&[], &ha).await?;
                    match a.recv().await? {
                        Some(m) if m.handles.len() == 1 => {}
                        Some(m) => bail!("the echo brought {} handles, not 1", m.handles.len()),
                        None => bail!("the echoing side hung up"),
                    }
                }
                Ok(())
            })
        },
        move || {
            block_on(async move {
                let b = AsyncChannel::try_from(b)?;
                let mut echoed = 0u64;
                while let Some(m) = b.recv().await? {
                    let k = m.handles.len();
                    ensure!(k == 1, "round trip {echoed} brought {k} handles, not 1");
                    drop(m);
                    b.send(&[], &hb).await?;
                    echoed += 1;
                }
                Ok(echoed)
            })
        },
    )
}
