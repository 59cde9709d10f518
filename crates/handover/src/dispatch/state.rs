//! The state page a worker shares with its dispatcher (docs/protocol.md
//! §18.3): two counters the worker writes and the dispatcher reads. Taking
//! a connection and finishing one then cost the worker an atomic store,
//! not a message, and the dispatcher reads them when it next looks, never
//! woken for them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Mapping, Result, SharedMemory};

/// The activation name of the state page among a worker's handles.
pub const STATE_NAME: &str = "handover-dispatch-state";

/// The size the dispatcher makes the page: one page of memory. A worker
/// accepts any page of at least [`STATE_MIN_LEN`] bytes.
pub const STATE_LEN: usize = 4096;

/// The bytes the counters take.
pub const STATE_MIN_LEN: usize = 16;

/// Offset of `taken`: the id of the last connection the worker has taken.
const TAKEN: usize = 0;
/// Offset of `done`: how many connections the worker has finished.
const DONE: usize = 8;

/// A mapped state page, as either end sees it.
#[derive(Debug)]
pub struct StatePage {
    map: Mapping,
}

impl StatePage {
    /// The dispatcher's side: a new zeroed page, mapped, and the memory to
    /// hand the worker.
    pub fn create() -> Result<(StatePage, SharedMemory)> {
        let memory = SharedMemory::create(STATE_NAME, STATE_LEN)?;
        let page = StatePage::open(&memory)?;
        Ok((page, memory))
    }

    /// Maps a page received from the other end.
    pub fn open(memory: &SharedMemory) -> Result<StatePage> {
        if memory.len() < STATE_MIN_LEN {
            return Err(Error::Dispatch(format!(
                "the state page is {} bytes; at least {STATE_MIN_LEN} are needed",
                memory.len()
            )));
        }
        Ok(StatePage { map: memory.map()? })
    }

    fn counter(&self, offset: usize) -> &AtomicU64 {
        match self.map.atomic_u64(offset) {
            Ok(c) => c,
            Err(_) => unreachable!("the page holds both counters, checked in open"),
        }
    }

    /// The id of the last connection the worker took (0: none yet).
    pub fn taken(&self) -> u64 {
        self.counter(TAKEN).load(Ordering::Acquire)
    }

    /// How many connections the worker has finished.
    pub fn done(&self) -> u64 {
        self.counter(DONE).load(Ordering::Acquire)
    }

    /// The worker took connection `id`, and every one before it.
    pub fn set_taken(&self, id: u64) {
        self.counter(TAKEN).store(id, Ordering::Release);
    }

    /// The worker finished one more connection.
    pub fn add_done(&self) {
        self.counter(DONE).fetch_add(1, Ordering::Release);
    }
}
