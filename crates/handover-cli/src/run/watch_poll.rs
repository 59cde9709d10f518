//! `--watch PATH…` on Windows: a change under any of the paths (debounced)
//! asks for a reload, for the edit-compile-reload loop.
//!
//! Windows' change notifications would need a thread or overlapped I/O per
//! directory; this watcher polls instead. It keeps a snapshot of every file
//! and directory under the paths (path, modified time, length), recursively
//! and without following symbolic links or junctions below the paths
//! themselves, and the supervisor's loop asks it to rescan (`scan`) at
//! every tick: it does so at most every SCAN_INTERVAL. Any difference
//! (something added, removed, or with another modified time or length)
//! starts the debounce; the reload comes once a later scan, at least
//! DEBOUNCE after the last change seen, finds nothing new, so that a file
//! still being written (a binary being linked) does not reload half-done.
//! Unlike the Linux watcher nothing is skipped (hidden directories,
//! `target`): watch source directories, not build output.
//!
//! A scan is bounded: more than MAX_ENTRIES files and directories are
//! refused when handover starts, and ignored (with a warning) if the tree
//! grows past that later. Anything that cannot be read during a rescan (a
//! path removed meanwhile, a directory without permission) is simply absent
//! from the new snapshot, which counts as a change when it was there
//! before: a scan never fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};

/// How long the paths must stay quiet before the reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the paths are scanned, at most.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// The most files and directories a snapshot holds.
pub const MAX_ENTRIES: usize = 100_000;

/// What is compared of each file and directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    dir: bool,
}

type Snapshot = HashMap<PathBuf, Stamp>;

/// The snapshot would hold more than the limit.
#[derive(Debug)]
struct TooMany;

pub struct Watcher {
    paths: Vec<PathBuf>,
    limit: usize,
    snapshot: Snapshot,
    /// No scan before this.
    next_scan: Instant,
    /// When a scan last saw a change, until it is reported.
    changed_at: Option<Instant>,
    /// When a scan found nothing new, at least DEBOUNCE after `changed_at`.
    quiet_at: Option<Instant>,
    /// The tree has grown past the limit (warned once).
    overflowed: bool,
}

impl Watcher {
    pub fn new(paths: &[PathBuf]) -> Result<Watcher> {
        Watcher::with_limit(paths, MAX_ENTRIES)
    }

    fn with_limit(paths: &[PathBuf], limit: usize) -> Result<Watcher> {
        for p in paths {
            if let Err(e) = std::fs::metadata(p) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    bail!("--watch {}: no such file or directory", p.display());
                }
                bail!("--watch {}: {e}", p.display());
            }
        }
        let Ok(snapshot) = snapshot(paths, limit) else {
            bail!(
                "--watch {}: more than {limit} files and directories to poll; \
                 watch fewer or smaller directories",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        };
        tracing::debug!(
            entries = snapshot.len(),
            "watch: polling every {SCAN_INTERVAL:?}"
        );
        Ok(Watcher {
            paths: paths.to_vec(),
            limit,
            snapshot,
            next_scan: Instant::now() + SCAN_INTERVAL,
            changed_at: None,
            quiet_at: None,
            overflowed: false,
        })
    }

    /// Rescans the paths if SCAN_INTERVAL has passed since the last scan; a
    /// change starts (or restarts) the debounce.
    pub fn scan(&mut self, now: Instant) {
        if now < self.next_scan {
            return;
        }
        self.next_scan = now + SCAN_INTERVAL;
        let new = match snapshot(&self.paths, self.limit) {
            Ok(new) => {
                self.overflowed = false;
                new
            }
            Err(TooMany) => {
                if !self.overflowed {
                    self.overflowed = true;
                    tracing::warn!(
                        limit = self.limit,
                        "watch: too many files and directories under the watched paths; \
                         changes are ignored until there are fewer"
                    );
                }
                return;
            }
        };
        if new != self.snapshot {
            if let Some(path) = first_difference(&self.snapshot, &new) {
                tracing::debug!(path = %path.display(), "watch: changed");
            }
            self.snapshot = new;
            self.changed_at = Some(now);
            self.quiet_at = None;
        } else if self.changed_at.is_some_and(|c| now >= c + DEBOUNCE) {
            self.quiet_at.get_or_insert(now);
        }
    }

    /// When the pending change becomes due, if one is pending: DEBOUNCE
    /// after it was seen, or at the scan that finds the paths quiet, if
    /// that is later.
    pub fn due(&self) -> Option<Instant> {
        let changed = self.changed_at?;
        let quiet = self.quiet_at.unwrap_or(self.next_scan);
        Some(quiet.max(changed + DEBOUNCE))
    }

    /// True once, when a change has been quiet for the debounce interval
    /// (as a scan found); the snapshot taken then is what later scans
    /// compare with.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.quiet_at.is_some() && self.due().is_some_and(|d| d <= now) {
            self.changed_at = None;
            self.quiet_at = None;
            return true;
        }
        false
    }
}

/// Every file and directory under `paths` (each path itself included; a
/// path that is a link is followed, links below it are not). What cannot
/// be read is left out.
fn snapshot(paths: &[PathBuf], limit: usize) -> Result<Snapshot, TooMany> {
    let mut out = Snapshot::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        let Ok(meta) = std::fs::metadata(p) else {
            continue;
        };
        if meta.is_dir() {
            dirs.push(p.clone());
        }
        insert(&mut out, p.clone(), &meta, limit)?;
    }
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // Not following links: on Windows the entry's own metadata,
            // from the directory listing.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let path = entry.path();
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            insert(&mut out, path, &meta, limit)?;
        }
    }
    Ok(out)
}

fn insert(
    out: &mut Snapshot,
    path: PathBuf,
    meta: &std::fs::Metadata,
    limit: usize,
) -> Result<(), TooMany> {
    let stamp = Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        dir: meta.is_dir(),
    };
    out.insert(path, stamp);
    if out.len() > limit {
        return Err(TooMany);
    }
    Ok(())
}

/// A path that differs between two snapshots (for the log).
fn first_difference<'a>(old: &'a Snapshot, new: &'a Snapshot) -> Option<&'a Path> {
    new.iter()
        .find(|(path, stamp)| old.get(*path) != Some(stamp))
        .map(|(path, _)| path.as_path())
        .or_else(|| {
            old.keys()
                .find(|path| !new.contains_key(*path))
                .map(PathBuf::as_path)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own: DIR/a.txt and DIR/sub/b.txt.
    fn tree(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("handover-watch-poll-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.txt"), "a").unwrap();
        std::fs::write(dir.join("sub").join("b.txt"), "b").unwrap();
        dir
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Scans at `t0 + at` for each of `times` (ms); the times at which
    /// `take_due` said true.
    fn run(w: &mut Watcher, t0: Instant, times: &[u64]) -> Vec<u64> {
        let mut fired = Vec::new();
        for &at in times {
            let now = t0 + ms(at);
            w.scan(now);
            if w.take_due(now) {
                fired.push(at);
            }
        }
        fired
    }

    /// Every 20 ms (the Windows loop's tick) from `from` to `to`.
    fn ticks(from: u64, to: u64) -> Vec<u64> {
        (from..=to).step_by(20).collect()
    }

    #[test]
    fn a_change_in_a_nested_file_is_due_once_after_the_debounce() {
        let dir = tree("nested");
        let mut w = Watcher::new(&[dir.clone()]).unwrap();
        let t0 = Instant::now();
        assert_eq!(w.due(), None);
        std::fs::write(dir.join("sub").join("b.txt"), "changed, longer").unwrap();
        let fired = run(&mut w, t0, &ticks(0, 3000));
        assert_eq!(fired.len(), 1, "due once: {fired:?}");
        // Seen at the first scan (by 500 ms), due no sooner than DEBOUNCE
        // after that, and found quiet by the next scan.
        assert!((500..=1600).contains(&fired[0]), "{fired:?}");
        assert_eq!(w.due(), None);
        // Rearmed: the next change is seen again.
        std::fs::write(dir.join("a.txt"), "a, changed").unwrap();
        let fired = run(&mut w, t0, &ticks(3020, 6000));
        assert_eq!(fired.len(), 1, "due once more: {fired:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn changes_that_go_on_put_the_reload_off() {
        let dir = tree("ongoing");
        let mut w = Watcher::new(&[dir.clone()]).unwrap();
        let t0 = Instant::now();
        // A new write before each of three scans (every 500 ms from 600):
        // no reload in between.
        let mut fired = Vec::new();
        for (i, at) in [600u64, 1100, 1600].into_iter().enumerate() {
            std::fs::write(dir.join("sub").join("b.txt"), "x".repeat(i + 2)).unwrap();
            fired.extend(run(&mut w, t0, &ticks(at, at + 400)));
        }
        assert!(fired.is_empty(), "{fired:?}");
        assert_eq!(run(&mut w, t0, &ticks(2100, 4000)).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_change_is_never_due() {
        let dir = tree("quiet");
        let mut w = Watcher::new(&[dir.clone(), dir.join("a.txt")]).unwrap();
        let t0 = Instant::now();
        assert!(run(&mut w, t0, &ticks(0, 5000)).is_empty());
        assert_eq!(w.due(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_file_counts() {
        let dir = tree("removed");
        let mut w = Watcher::new(&[dir.clone()]).unwrap();
        let t0 = Instant::now();
        std::fs::remove_file(dir.join("sub").join("b.txt")).unwrap();
        assert_eq!(run(&mut w, t0, &ticks(0, 3000)).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_watched_path_that_vanishes_counts() {
        let dir = tree("vanished");
        let mut w = Watcher::new(&[dir.clone()]).unwrap();
        let t0 = Instant::now();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(run(&mut w, t0, &ticks(0, 3000)).len(), 1);
        // Still gone: nothing more.
        assert!(run(&mut w, t0, &ticks(3020, 5000)).is_empty());
    }

    #[test]
    fn a_missing_path_is_refused_by_name() {
        let missing = std::env::temp_dir().join("handover-watch-poll-no-such-path");
        let err = Watcher::new(&[missing.clone()]).err().unwrap().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("no such file or directory"), "{err}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let dir = tree("limit");
        // DIR, a.txt, sub, sub/b.txt: four entries.
        assert!(Watcher::with_limit(&[dir.clone()], 4).is_ok());
        let err = Watcher::with_limit(&[dir.clone()], 3)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("more than 3 files and directories"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
