//! `--watch PATH…`: a change under any of the paths (debounced) asks for a
//! reload, for the edit-compile-reload loop.
//!
//! inotify watches each path; a directory is watched with every
//! subdirectory found when handover starts (and those created later),
//! except hidden ones and `target` (build output would trigger reloads of
//! its own). Events are drained and coalesced: the reload comes once the
//! paths have been quiet for the debounce interval.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

pub const DEBOUNCE: Duration = Duration::from_millis(300);

pub struct Watcher {
    fd: OwnedFd,
    /// Directories by watch descriptor, to watch new subdirectories.
    dirs: Vec<(i32, PathBuf)>,
    /// When the last change was seen, until it is reported.
    changed_at: Option<Instant>,
}

fn mask() -> WatchFlags {
    WatchFlags::CLOSE_WRITE
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
}

fn skipped(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') || n == "target")
}

impl Watcher {
    pub fn new(paths: &[PathBuf]) -> Result<Watcher> {
        let fd =
            inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).context("inotify_init1")?;
        let mut w = Watcher {
            fd,
            dirs: Vec::new(),
            changed_at: None,
        };
        for p in paths {
            if !p.exists() {
                anyhow::bail!("--watch {}: no such file or directory", p.display());
            }
            w.add(p)
                .with_context(|| format!("--watch {}", p.display()))?;
        }
        Ok(w)
    }

    fn add(&mut self, path: &Path) -> Result<()> {
        let wd = inotify::add_watch(&self.fd, path, mask())
            .with_context(|| format!("inotify_add_watch {}", path.display()))?;
        if path.is_dir() {
            self.dirs.push((wd, path.to_owned()));
            for entry in std::fs::read_dir(path)?.flatten() {
                let sub = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && !skipped(&sub) {
                    self.add(&sub)?;
                }
            }
        }
        Ok(())
    }

    /// Reads what is queued; a change starts (or restarts) the debounce.
    pub fn drain(&mut self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut new_dirs = Vec::new();
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        while let Ok(event) = reader.next() {
            if event.events().contains(ReadFlags::IGNORED) {
                continue;
            }
            if event.events().contains(ReadFlags::ISDIR)
                && event
                    .events()
                    .intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO)
            {
                if let (Some((_, dir)), Some(name)) = (
                    self.dirs.iter().find(|(wd, _)| *wd == event.wd()),
                    event.file_name(),
                ) {
                    new_dirs.push(dir.join(name.to_string_lossy().as_ref()));
                }
            }
            self.changed_at = Some(Instant::now());
        }
        for dir in new_dirs {
            if !skipped(&dir) {
                if let Err(e) = self.add(&dir) {
                    tracing::warn!(error = %e, "watch: a new directory cannot be watched");
                }
            }
        }
    }

    /// When the pending change becomes due, if one is pending.
    pub fn due(&self) -> Option<Instant> {
        self.changed_at.map(|t| t + DEBOUNCE)
    }

    /// True once, when a change has been quiet for the debounce interval.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.due().is_some_and(|d| d <= now) {
            self.changed_at = None;
            return true;
        }
        false
    }
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
