//! The held entries: names, owners, expiry, and the limits on how many.
//!
//! Pure bookkeeping: the store owns the handles, and every handle that
//! leaves it (removed, replaced, expired) is returned to the caller, which
//! drops (closes) or sends it. Nothing here waits or does I/O except
//! describing a handle when it is stored.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use handover::holder::protocol::ErrorCode;
use handover::holder::{kind_name, Entry};
use handover::{Handle, HandleKind};

/// How many entries may be held.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_entries: usize,
    pub max_per_uid: usize,
}

/// One held handle.
#[derive(Debug)]
pub struct Held {
    pub handle: Handle,
    pub entry: Entry,
    pub deadline: Option<Instant>,
    /// Tells this entry from a later one of the same name in the expiry
    /// queue.
    id: u64,
}

impl Held {
    /// A handle just stored by `uid`/`gid`, described from what the OS
    /// says it is.
    pub fn new(name: String, handle: Handle, uid: u32, gid: u32, ttl: Option<Duration>) -> Held {
        let (kind, address) = describe(&handle);
        let now = Instant::now();
        let stored = unix_ms(SystemTime::now());
        Held {
            handle,
            entry: Entry {
                name,
                kind,
                address,
                owner_uid: uid,
                owner_gid: gid,
                stored_unix_ms: stored,
                expires_unix_ms: ttl.map(|t| stored.saturating_add(ms(t))),
            },
            deadline: ttl.and_then(|t| now.checked_add(t)),
            id: 0,
        }
    }

    /// An entry received from the holder being replaced, with what was
    /// left of its TTL.
    pub fn taken_over(entry: Entry, handle: Handle, ttl_left: Option<Duration>) -> Held {
        Held {
            handle,
            deadline: ttl_left.and_then(|t| Instant::now().checked_add(t)),
            entry,
            id: 0,
        }
    }

    /// What is left of the TTL, for a takeover.
    pub fn ttl_left(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(now))
    }
}

/// A refusal, with its reply code and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: String) -> Refusal {
    Refusal { code, message }
}

#[derive(Debug)]
pub struct Store {
    entries: BTreeMap<String, Held>,
    per_uid: HashMap<u32, usize>,
    expiry: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_id: u64,
    limits: Limits,
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        Store {
            entries: BTreeMap::new(),
            per_uid: HashMap::new(),
            expiry: BinaryHeap::new(),
            next_id: 1,
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `name` is held (and not past its expiry).
    pub fn contains(&self, name: &str, now: Instant) -> bool {
        self.get(name, now).is_some()
    }

    /// The live entry `name`.
    pub fn get(&self, name: &str, now: Instant) -> Option<&Held> {
        self.entries
            .get(name)
            .filter(|h| h.deadline.is_none_or(|d| d > now))
    }

    /// Adds an entry. An existing one of the same name is refused unless
    /// `replace`, in which case it is returned (to be closed). Limits are
    /// checked as if the replaced entry were already gone.
    pub fn insert(
        &mut self,
        mut held: Held,
        replace: bool,
        now: Instant,
    ) -> Result<Option<Held>, Refusal> {
        let name = held.entry.name.clone();
        let uid = held.entry.owner_uid;
        let existing = self.get(&name, now).map(|h| h.entry.owner_uid);
        if existing.is_some() && !replace {
            return Err(refuse(
                ErrorCode::Exists,
                format!("{name:?} is already held (store with replace to replace it)"),
            ));
        }
        // An expired entry not yet reaped counts as gone too.
        let stale = self.entries.get(&name).map(|h| h.entry.owner_uid);
        let count = self.entries.len() - usize::from(stale.is_some());
        if count >= self.limits.max_entries {
            return Err(refuse(
                ErrorCode::EntriesLimit,
                format!(
                    "the holder already holds {count} entries, its limit (--max-entries {})",
                    self.limits.max_entries
                ),
            ));
        }
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0) - usize::from(stale == Some(uid));
        if mine >= self.limits.max_per_uid {
            return Err(refuse(
                ErrorCode::UidLimit,
                format!(
                    "uid {uid} already holds {mine} entries, the limit per uid (--max-per-uid {})",
                    self.limits.max_per_uid
                ),
            ));
        }
        let old = self.take_entry(&name);
        held.id = self.next_id;
        self.next_id += 1;
        if let Some(deadline) = held.deadline {
            self.expiry.push(Reverse((deadline, held.id, name.clone())));
        }
        *self.per_uid.entry(uid).or_default() += 1;
        self.entries.insert(name, held);
        Ok(old)
    }

    /// Adds an entry handed over by the holder this one replaces, whatever
    /// the limits: nothing held may be lost in a takeover.
    pub fn adopt(&mut self, mut held: Held) {
        let name = held.entry.name.clone();
        drop(self.take_entry(&name));
        held.id = self.next_id;
        self.next_id += 1;
        if let Some(deadline) = held.deadline {
            self.expiry.push(Reverse((deadline, held.id, name.clone())));
        }
        *self.per_uid.entry(held.entry.owner_uid).or_default() += 1;
        self.entries.insert(name, held);
    }

    /// Removes the live entry `name`.
    pub fn remove(&mut self, name: &str, now: Instant) -> Option<Held> {
        self.get(name, now)?;
        self.take_entry(name)
    }

    fn take_entry(&mut self, name: &str) -> Option<Held> {
        let held = self.entries.remove(name)?;
        let uid = held.entry.owner_uid;
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
        Some(held)
    }

    /// Takes out every entry whose time has come.
    pub fn expire(&mut self, now: Instant) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, id, _))) = self.expiry.peek() {
            if *deadline > now {
                break;
            }
            let id = *id;
            let Some(Reverse((_, _, name))) = self.expiry.pop() else {
                break;
            };
            // Only if the entry of that name is still the one queued.
            if self.entries.get(&name).is_some_and(|h| h.id == id) {
                out.extend(self.take_entry(&name));
            }
        }
        out
    }

    /// When the next entry expires.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        // Drop queue items of entries that were removed or replaced.
        while let Some(Reverse((_, id, name))) = self.expiry.peek() {
            if self.entries.get(name).is_some_and(|h| h.id == *id) {
                break;
            }
            self.expiry.pop();
        }
        self.expiry.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Every live entry, by name.
    pub fn iter(&self, now: Instant) -> impl Iterator<Item = &Held> {
        self.entries
            .values()
            .filter(move |h| h.deadline.is_none_or(|d| d > now))
    }

    /// Takes every entry out (for a holder that is stopping).
    pub fn drain(&mut self) -> Vec<Held> {
        self.per_uid.clear();
        self.expiry.clear();
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(ms).unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The kind and address the holder reports for a handle, asked of the OS.
pub fn describe(handle: &Handle) -> (String, Option<String>) {
    let kind = handle.detect_kind().unwrap_or(HandleKind::Other);
    let address = match kind {
        HandleKind::Socket(_) => socket_address(handle),
        _ => std::fs::read_link(format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd()))
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
    };
    (kind_name(kind).to_owned(), address)
}

fn socket_address(handle: &Handle) -> Option<String> {
    let addr = rustix::net::getsockname(handle).ok()?;
    if let Ok(a) = std::net::SocketAddr::try_from(addr.clone()) {
        return Some(a.to_string());
    }
    let unix = rustix::net::SocketAddrUnix::try_from(addr).ok()?;
    if let Some(p) = unix.path_bytes() {
        return Some(String::from_utf8_lossy(p).into_owned());
    }
    if let Some(n) = unix.abstract_name() {
        return Some(format!("@{}", String::from_utf8_lossy(n)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(name: &str, uid: u32, ttl: Option<Duration>) -> Held {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        Held::new(name.into(), Handle::from(r), uid, uid, ttl)
    }

    fn store(max_entries: usize, max_per_uid: usize) -> Store {
        Store::new(Limits {
            max_entries,
            max_per_uid,
        })
    }

    #[test]
    fn insert_replace_remove() {
        let now = Instant::now();
        let mut s = store(10, 10);
        assert!(s.insert(held("a", 1, None), false, now).unwrap().is_none());
        assert_eq!(s.get("a", now).unwrap().entry.kind, "pipe");
        let e = s.insert(held("a", 1, None), false, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        assert!(s.insert(held("a", 2, None), true, now).unwrap().is_some());
        assert_eq!(s.get("a", now).unwrap().entry.owner_uid, 2);
        assert_eq!(s.per_uid.get(&1), None);
        assert!(s.remove("a", now).is_some());
        assert!(s.remove("a", now).is_none());
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn limits() {
        let now = Instant::now();
        let mut s = store(3, 2);
        s.insert(held("a", 1, None), false, now).unwrap();
        s.insert(held("b", 1, None), false, now).unwrap();
        let e = s.insert(held("c", 1, None), false, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::UidLimit);
        assert!(e.message.contains("--max-per-uid 2"), "{}", e.message);
        // Replacing one's own entry is within the limit.
        s.insert(held("b", 1, None), true, now).unwrap();
        s.insert(held("c", 2, None), false, now).unwrap();
        let e = s.insert(held("d", 3, None), false, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::EntriesLimit);
        assert!(e.message.contains("--max-entries 3"), "{}", e.message);
        s.insert(held("c", 3, None), true, now).unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn expiry() {
        let now = Instant::now();
        let mut s = store(10, 10);
        s.insert(held("short", 1, Some(Duration::from_secs(1))), false, now)
            .unwrap();
        s.insert(held("long", 1, Some(Duration::from_secs(100))), false, now)
            .unwrap();
        s.insert(held("never", 1, None), false, now).unwrap();
        // Replaced before it expired: the new one keeps no deadline.
        s.insert(held("gone", 1, Some(Duration::from_secs(1))), false, now)
            .unwrap();
        s.insert(held("gone", 1, None), true, now).unwrap();
        assert!(s.next_deadline().unwrap() <= now + Duration::from_secs(2));
        let later = now + Duration::from_secs(5);
        assert!(!s.contains("short", later));
        let expired = s.expire(later);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].entry.name, "short");
        assert!(s.contains("gone", later) && s.contains("never", later));
        assert!(s.next_deadline().unwrap() > later);
        assert_eq!(s.iter(later).count(), 3);
    }
}
