//! The fd store: descriptors a program leaves with handover over
//! NOTIFY_SOCKET (FDSTORE=1), kept across generations and passed to each
//! new one after the listening sockets, named in LISTEN_FDNAMES, as
//! systemd does.
//!
//! The hang-up watch (FDPOLL) is Unix-only: Windows handles cannot be
//! polled for hang-up, so there an entry stays until it is removed
//! (FDSTOREREMOVE=1) or handover exits.

use std::time::SystemTime;

use handover::notify::{FdStoreRequest, StoreReply};
use handover::Handle;
#[cfg(unix)]
use rustix::event::{PollFd, PollFlags};

/// One stored descriptor.
pub struct Entry {
    pub handle: Handle,
    /// Dropped when it reports hang-up (unless FDPOLL=0 was given).
    pub poll: bool,
    pub stored_at: SystemTime,
    /// Which generation stored it.
    pub generation: u64,
}

impl Entry {
    pub fn name(&self) -> &str {
        self.handle.name().unwrap_or("stored")
    }
}

pub struct FdStore {
    entries: Vec<Entry>,
    max: usize,
}

impl FdStore {
    pub fn new(max: usize) -> FdStore {
        FdStore {
            entries: Vec::new(),
            max,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Applies a request; the outcome is what the sender is told (when it
    /// asked). A store over the limit is refused as a whole, and its
    /// descriptors are closed when the request is dropped.
    pub fn apply(&mut self, req: FdStoreRequest, generation: u64) -> StoreReply {
        if req.remove {
            let before = self.entries.len();
            self.entries.retain(|e| e.name() != req.name);
            tracing::info!(
                name = %req.name,
                removed = before - self.entries.len(),
                "fd store: removed"
            );
            return StoreReply::Removed;
        }
        let room = self.max.saturating_sub(self.entries.len());
        if req.handles.len() > room {
            let why = format!(
                "the fd store is full: {} stored, limit {} (--fdstore-max); {} more refused",
                self.entries.len(),
                self.max,
                req.handles.len()
            );
            tracing::warn!(name = %req.name, "fd store: {why}");
            return StoreReply::Refused(why);
        }
        let now = SystemTime::now();
        for handle in req.handles {
            tracing::info!(name = %req.name, kind = ?handle.kind(), "fd store: stored");
            self.entries.push(Entry {
                handle: handle.with_name(req.name.clone()),
                poll: req.poll,
                stored_at: now,
                generation,
            });
        }
        StoreReply::Stored
    }

    /// Duplicates of every entry, named, in order: for the next generation.
    pub fn handles(&self) -> Vec<Handle> {
        self.entries
            .iter()
            .filter_map(|e| match e.handle.try_clone() {
                Ok(h) => Some(h),
                Err(err) => {
                    tracing::warn!(name = e.name(), error = %err, "fd store: cannot duplicate");
                    None
                }
            })
            .collect()
    }

    #[cfg(unix)]
    /// Poll entries for the entries that are watched for hang-up; their
    /// indices come back with [`FdStore::drop_hung_up`].
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        self.entries
            .iter()
            .filter(|e| e.poll)
            .map(|e| PollFd::new(&e.handle, PollFlags::empty()))
            .collect()
    }

    #[cfg(unix)]
    /// Drops the watched entries whose poll result reported hang-up or an
    /// error; `revents` is in the order of [`FdStore::poll_fds`].
    pub fn drop_hung_up(&mut self, revents: &[PollFlags]) {
        let mut watched = 0;
        let mut hung = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if !e.poll {
                continue;
            }
            if revents
                .get(watched)
                .is_some_and(|r| r.intersects(PollFlags::HUP | PollFlags::ERR))
            {
                hung.push(i);
            }
            watched += 1;
        }
        for i in hung.into_iter().rev() {
            let e = self.entries.remove(i);
            tracing::info!(name = e.name(), "fd store: dropped after hang-up");
        }
    }
}
