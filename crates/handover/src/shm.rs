//! Shared memory that travels over a channel: a memfd on Linux, a section
//! (file mapping on the paging file) on Windows.

use std::fmt;
use std::io;
#[cfg(target_has_atomic = "64")]
use std::sync::atomic::AtomicU64;

use crate::error::{Error, Result};
use crate::handle::{Handle, HandleKind};
use crate::sys;
use crate::wire::KindCodes;

/// A block of memory that can be mapped by every process holding a handle
/// to it: a memfd on Linux, a section on Windows.
///
/// Send it as a [`Handle`] (`Handle::from(shm)`); the receiver gets it
/// back with [`Handle::into_shared_memory`] and maps it with
/// [`map`](Self::map).
///
/// On Linux, memory made by [`create`](Self::create) is sealed at its size
/// (F_SEAL_SHRINK, F_SEAL_GROW). Any memfd can be received; mapping one
/// seals it against shrinking first, because a peer shrinking it under a
/// mapping would turn reads into SIGBUS. POSIX shared memory (shm_open)
/// and memfds made without MFD_ALLOW_SEALING cannot take that seal, so
/// they convert but do not map.
///
/// ```
/// use handover::{Channel, Handle, SharedMemory};
///
/// let (a, b) = Channel::pair()?;
/// let shm = SharedMemory::create("frames", 4096)?;
/// let mine = shm.map()?;
/// mine.write_at(0, b"hello")?;
/// a.send(b"", &[Handle::from(shm).with_name("frames")])?;
///
/// let mut msg = b.recv()?.expect("the peer is still there");
/// let theirs = msg.take("frames").unwrap().into_shared_memory()?.map()?;
/// let mut buf = [0u8; 5];
/// theirs.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SharedMemory {
    raw: sys::OwnedRaw,
    len: usize,
}

impl SharedMemory {
    /// New shared memory of `len` bytes, all zero, not inherited by child
    /// processes. `name` is for debugging: on Linux it shows in
    /// /proc/PID/fd as `memfd:NAME` (at most 249 bytes, no NUL); on Windows
    /// it is not used, since a named section would be reachable by name
    /// from any process of the session.
    pub fn create(name: &str, len: usize) -> Result<SharedMemory> {
        if len == 0 {
            return Err(Error::InvalidInput {
                what: "shared memory length",
                why: "it must be at least 1 byte".into(),
            });
        }
        let raw =
            sys::create_shared_memory(name, len).map_err(Error::io("create shared memory"))?;
        Ok(SharedMemory { raw, len })
    }

    pub(crate) fn from_raw(raw: sys::OwnedRaw, len: usize) -> SharedMemory {
        SharedMemory { raw, len }
    }

    /// The size in bytes. For shared memory received on Windows this is the
    /// size rounded up to a whole number of pages (4096 bytes): Windows
    /// documents no way to read a section's exact size. The extra bytes
    /// are zero unless written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the size is zero (which only received memory can be).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps all of it, read-write and shared: writes through any mapping,
    /// in any process, show in every other.
    pub fn map(&self) -> Result<Mapping> {
        let view =
            sys::map_shared_memory(&self.raw, self.len).map_err(Error::io("map shared memory"))?;
        Ok(Mapping { view })
    }

    /// Another handle to the same memory.
    pub fn try_clone(&self) -> io::Result<SharedMemory> {
        Ok(SharedMemory {
            raw: sys::duplicate(&self.raw)?,
            len: self.len,
        })
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("raw", &self.raw)
            .field("len", &self.len)
            .finish()
    }
}

impl From<SharedMemory> for Handle {
    /// Declared as shared memory without asking the OS, which on Windows
    /// could not tell a section from other handles.
    fn from(shm: SharedMemory) -> Handle {
        Handle {
            raw: shm.raw,
            name: None,
            kind: KindCodes::of(HandleKind::SharedMemory),
        }
    }
}

/// Shared memory mapped into this process, unmapped when dropped.
///
/// Other processes may write to the memory at any time, so the contents
/// are only ever copied in and out ([`read_at`](Self::read_at),
/// [`write_at`](Self::write_at)); no safe method hands out a `&[u8]` that
/// could change under it. A copy that races with another process's write
/// may see part of each: agree on who writes when (over the channel, for
/// instance).
pub struct Mapping {
    view: sys::View,
}

impl Mapping {
    /// The size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.view.len()
    }

    /// Always false: empty memory cannot be mapped.
    pub fn is_empty(&self) -> bool {
        self.view.len() == 0
    }

    /// The first byte of the mapping, valid for [`len`](Self::len) bytes
    /// until the mapping is dropped.
    pub fn as_ptr(&self) -> *const u8 {
        self.view.ptr()
    }

    /// As [`as_ptr`](Self::as_ptr), for writing.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.view.ptr()
    }

    /// Copies `buf.len()` bytes starting at `offset` into `buf`. Fails
    /// (InvalidInput), copying nothing, if they do not all lie inside the
    /// mapping.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the range lies inside the live mapping (checked above),
        // which cannot alias `buf`, a Rust allocation; only raw pointers
        // touch the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.view.ptr().add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `bytes` into the mapping starting at `offset`. Fails
    /// (InvalidInput), copying nothing, if they do not all fit.
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        self.check(offset, bytes.len())?;
        // SAFETY: as in `read_at`; the mapping is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.view.ptr().add(offset), bytes.len())
        };
        Ok(())
    }

    /// The 8 bytes at `offset` as an atomic integer, for counters and flags
    /// that processes sharing the memory update without a system call.
    /// Fails (InvalidInput) unless they lie inside the mapping and are
    /// aligned for an atomic (mappings start on a page boundary, so any
    /// multiple of 8 is). Every process must use atomic operations on them,
    /// and this process must not also copy those bytes with
    /// [`read_at`](Self::read_at) or [`write_at`](Self::write_at): mixing
    /// plain and atomic access to the same bytes is a data race. The value
    /// is in the machine's byte order.
    #[cfg(target_has_atomic = "64")]
    pub fn atomic_u64(&self, offset: usize) -> io::Result<&AtomicU64> {
        self.check(offset, 8)?;
        let at = self.view.ptr().wrapping_add(offset);
        if (at as usize) % std::mem::align_of::<AtomicU64>() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is not aligned for a 64-bit atomic"),
            ));
        }
        // SAFETY: the 8 bytes lie inside the live mapping (checked above),
        // which outlives the borrow, and are aligned for an AtomicU64
        // (checked above). Other processes may change them at any time,
        // which an atomic allows; only atomic operations reach them through
        // the reference, and the documentation above forbids this
        // process's plain copies of them.
        Ok(unsafe { AtomicU64::from_ptr(at.cast()) })
    }

    /// The whole mapping as a slice.
    ///
    /// # Safety
    ///
    /// For as long as the slice lives, nothing may write to the memory:
    /// not this process (through any mapping of it) and not any other
    /// process holding it. Only use this when the protocol between the
    /// processes guarantees that, for instance memory nobody writes to
    /// after sending it.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live and `len` bytes long for the borrow;
        // the caller promises the bytes do not change meanwhile.
        unsafe { std::slice::from_raw_parts(self.view.ptr(), self.view.len()) }
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at offset {offset} do not fit in a mapping of {} bytes",
                    self.len()
                ),
            )),
        }
    }
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.view.ptr())
            .field("len", &self.view.len())
            .finish()
    }
}
