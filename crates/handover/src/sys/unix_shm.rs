//! Linux shared memory: memfds, mapped MAP_SHARED.
//!
//! A mapping of a file that shrinks under it turns every access past the
//! new end into SIGBUS, and a peer holding the same memfd could shrink it
//! at any time. So nothing is mapped unless the file carries
//! F_SEAL_SHRINK, which no one can ever remove: memfds made here are
//! sealed against shrinking and growing as they are made, and a received
//! memfd that lacks the seal gets it before it is mapped.

use std::io;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::handle::HandleKind;

/// A new memfd of `len` bytes (zeroes), sealed at that size.
pub(crate) fn create_shared_memory(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(fd)
}

/// The size of shared memory, or what the handle is instead.
pub(crate) fn shared_memory_len(fd: &OwnedFd) -> Result<usize, Result<HandleKind, io::ErrorKind>> {
    let kind = super::detect_kind(fd).map_err(|e| Err(e.kind()))?;
    if kind != HandleKind::SharedMemory {
        return Err(Ok(kind));
    }
    size(fd).map_err(|e| Err(e.kind()))
}

fn size(fd: &OwnedFd) -> io::Result<usize> {
    let size = rustix::fs::fstat(fd)?.st_size;
    usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// A read-write view of shared memory, unmapped on drop.
#[derive(Debug)]
pub(crate) struct View {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the view is plain memory owned by this value; every access goes
// through raw pointers, never through references that assume exclusivity.
unsafe impl Send for View {}
// SAFETY: as above.
unsafe impl Sync for View {}

impl View {
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned, unmapped once, here.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Maps the first `len` bytes of a memfd, read-write and shared.
pub(crate) fn map_shared_memory(fd: &OwnedFd, len: usize) -> io::Result<View> {
    let seals = rustix::fs::fcntl_get_seals(fd)?;
    if !seals.contains(SealFlags::SHRINK) {
        rustix::fs::fcntl_add_seals(fd, SealFlags::SHRINK).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "mapping needs the shared memory sealed against shrinking \
                     (F_SEAL_SHRINK), and adding the seal failed: {e}"
                ),
            )
        })?;
    }
    // Sealed now, so this size can only grow from here on.
    if size(fd)? < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the shared memory shrank before it could be sealed",
        ));
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing, so
    // nothing existing is replaced; the file cannot shrink below `len`.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )?
    };
    let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    Ok(View { ptr, len })
}
