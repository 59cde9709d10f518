//! The holder's client for async code, on tokio (cargo feature `tokio`):
//! the same operations and the same reconnect rule as [`Client`].
//!
//! [`Client`]: super::Client

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::{encode_request, Reply, Request};
use super::{checked, done, socket_path, unexpected, Entry, Result};
use super::{gave_up, judge, Attempt, StoreOptions, ATTEMPTS};
use crate::tokio::AsyncChannel;
use crate::Handle;

/// A connection to a holder, for async code.
#[derive(Debug)]
pub struct AsyncClient {
    path: PathBuf,
    channel: Option<AsyncChannel>,
    timeout: Duration,
}

impl AsyncClient {
    /// Connects to the holder listening at `path`. Must be called within a
    /// tokio runtime.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient> {
        let mut client = AsyncClient {
            path: path.as_ref().to_owned(),
            channel: None,
            timeout: Duration::from_secs(30),
        };
        client.channel = Some(client.open().await?);
        Ok(client)
    }

    /// Connects to the holder named by $HANDOVER_HOLDER.
    pub async fn from_env() -> Result<AsyncClient> {
        AsyncClient::connect(socket_path(None)?).await
    }

    /// See [`Client::set_timeout`](super::Client::set_timeout).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// See [`Client::store`](super::Client::store).
    pub async fn store(
        &mut self,
        name: &str,
        handle: &Handle,
        options: StoreOptions,
    ) -> Result<Entry> {
        let request = Request::Store {
            name: checked(name)?,
            ttl: options.ttl,
            replace: options.replace,
        };
        let (reply, _) = self
            .call(|| request.clone(), std::slice::from_ref(handle), None)
            .await?;
        match reply {
            Reply::Stored(entry) => Ok(entry),
            other => Err(unexpected("store", &other)),
        }
    }

    /// See [`Client::retrieve`](super::Client::retrieve).
    pub async fn retrieve(&mut self, name: &str) -> Result<Handle> {
        Ok(self.retrieve_many(&[name], false).await?.remove(0).1)
    }

    /// See [`Client::take`](super::Client::take).
    pub async fn take(&mut self, name: &str) -> Result<Handle> {
        Ok(self.retrieve_many(&[name], true).await?.remove(0).1)
    }

    /// See [`Client::retrieve_many`](super::Client::retrieve_many).
    pub async fn retrieve_many(
        &mut self,
        names: &[&str],
        remove: bool,
    ) -> Result<Vec<(Entry, Handle)>> {
        let names = super::retrieve_names(names)?;
        let count = names.len();
        let request = Request::Retrieve { names, remove };
        let (reply, handles) = self.call(|| request.clone(), &[], None).await?;
        super::retrieved(count, reply, handles)
    }

    /// See [`Client::remove`](super::Client::remove).
    pub async fn remove(&mut self, name: &str) -> Result<()> {
        let request = Request::Remove {
            name: checked(name)?,
        };
        let (reply, _) = self.call(|| request.clone(), &[], None).await?;
        done("remove", reply)
    }

    /// See [`Client::list`](super::Client::list).
    pub async fn list(&mut self) -> Result<Vec<Entry>> {
        match self.call(|| Request::List, &[], None).await?.0 {
            Reply::Entries(entries) => Ok(entries),
            other => Err(unexpected("list", &other)),
        }
    }

    /// See [`Client::wait`](super::Client::wait).
    pub async fn wait(&mut self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let name = checked(name)?;
        let timeout =
            timeout.map(|t| t.min(Duration::from_millis(super::protocol::MAX_DURATION_MS)));
        let deadline = timeout.map(|t| Instant::now() + t);
        let (reply, _) = self
            .call(
                || Request::Wait {
                    name: name.clone(),
                    timeout: deadline.map(|d| {
                        d.saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(1))
                    }),
                },
                &[],
                Some(timeout),
            )
            .await?;
        done("wait", reply)
    }

    async fn open(&self) -> Result<AsyncChannel> {
        match ::tokio::time::timeout(self.timeout, AsyncChannel::connect(&self.path)).await {
            Ok(ch) => Ok(ch?),
            Err(_) => Err(crate::Error::TimedOut {
                op: "connect",
                timeout: self.timeout,
            }
            .into()),
        }
    }

    /// See `Client::call_with`.
    async fn call(
        &mut self,
        request: impl Fn() -> Request,
        handles: &[Handle],
        wait: Option<Option<Duration>>,
    ) -> Result<(Reply, Vec<Handle>)> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let ch = match self.channel.take() {
                Some(ch) => ch,
                None => self.open().await?,
            };
            let bytes = encode_request(&request());
            match ::tokio::time::timeout(self.timeout, ch.send(&bytes, handles)).await {
                Ok(Ok(())) => {}
                Ok(Err(crate::Error::Disconnected)) => {
                    last = Some("the holder closed the connection".to_owned());
                    continue;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(crate::Error::TimedOut {
                        op: "send",
                        timeout: self.timeout,
                    }
                    .into())
                }
            }
            let limit = match wait {
                None => Some(self.timeout),
                Some(None) => None,
                Some(Some(t)) => Some(t.saturating_add(self.timeout)),
            };
            let answer = match limit {
                None => ch.recv().await,
                Some(limit) => match ::tokio::time::timeout(limit, ch.recv()).await {
                    Ok(answer) => answer,
                    Err(_) => Err(crate::Error::TimedOut {
                        op: "receive",
                        timeout: limit,
                    }),
                },
            };
            match judge(answer) {
                Attempt::Again(why) => last = Some(why),
                Attempt::Answered(result) => {
                    self.channel = Some(ch);
                    return result;
                }
                Attempt::Broken(e) => return Err(e),
            }
        }
        Err(gave_up(last))
    }
}
