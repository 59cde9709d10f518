//! Reassembly of frames into messages, all-or-nothing.
//!
//! Pure code, generic over the handle type, so that it can be driven by a
//! fuzzer or a test with plain values. Every path that rejects a frame drops
//! the handles that came with it, and every path that abandons a message
//! drops the handles gathered for it: dropping an owned handle closes it, so
//! nothing leaks, whatever the peer sends.
//!
//! Handles arrive already in the form they are delivered in (for a channel,
//! [`crate::Handle`]s without name or kind yet) and are only given their
//! records' kinds and names once their frame has passed: a message of one
//! frame is delivered in the very vector its handles arrived in.

use crate::error::Error;
use crate::wire::{self, FrameHeader, KindCodes};

/// What this side is willing to receive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub accept_handles: bool,
    pub max_handles: usize,
    pub max_bytes: usize,
}

/// A received handle as the assembler keeps it: it arrives without name or
/// kind, and takes those of its record once its frame has passed.
pub(crate) trait Slot {
    fn set_record(&mut self, kind: KindCodes, name: Option<&str>);

    /// [`set_record`](Slot::set_record) for a record without a name, on a
    /// handle that has none yet.
    fn set_kind(&mut self, kind: KindCodes) {
        self.set_record(kind, None);
    }
}

/// One frame as it came off the transport.
pub(crate) struct Arrival<'a, T> {
    pub frame: &'a [u8],
    /// Emptied by `push` on every path: moved into the message, or dropped.
    pub handles: &'a mut Vec<T>,
    /// The kernel cut the control data (MSG_CTRUNC).
    pub control_truncated: bool,
    /// The frame did not fit the receive buffer (MSG_TRUNC).
    pub frame_truncated: bool,
}

/// A complete message.
pub(crate) struct Assembled<T> {
    pub bytes: Vec<u8>,
    pub handles: Vec<T>,
}

struct Partial<T> {
    seq: u32,
    total_handles: usize,
    total_bytes: usize,
    message: Assembled<T>,
}

enum State<T> {
    Idle,
    Building(Partial<T>),
    /// The start of message `seq` was rejected: drop the rest of it quietly,
    /// so that one bad message is one error, not one error per frame.
    Skipping {
        seq: u32,
    },
}

pub(crate) struct Assembler<T> {
    limits: Limits,
    state: State<T>,
    /// A message completed by the same frame that revealed an abandoned one;
    /// the error goes out first, this on the next call.
    ready: Option<Assembled<T>>,
}

/// Clears the borrowed handle buffer when dropped, closing whatever no
/// path has taken.
struct Dropper<'a, T>(&'a mut Vec<T>);

impl<T> Drop for Dropper<'_, T> {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// Never preallocate more than this on a peer's say-so.
const PREALLOC_LIMIT: usize = 64 * 1024;

impl<T: Slot> Assembler<T> {
    pub fn new(limits: Limits) -> Self {
        Assembler {
            limits,
            state: State::Idle,
            ready: None,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A message that is complete and waiting; check before reading more.
    pub fn take_ready(&mut self) -> Option<Assembled<T>> {
        self.ready.take()
    }

    /// The transport reached end of file.
    pub fn end_of_stream(&mut self) -> Result<(), Error> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Building(p) => Err(Error::PeerClosedMidMessage {
                handles: p.message.handles.len(),
                bytes: p.message.bytes.len(),
            }),
            State::Idle | State::Skipping { .. } => Ok(()),
        }
    }

    /// Takes one frame. `Ok(None)` means "read another frame".
    pub fn push(&mut self, arrival: Arrival<'_, T>) -> Result<Option<Assembled<T>>, Error> {
        let Arrival {
            frame,
            handles,
            control_truncated,
            frame_truncated,
        } = arrival;
        let received = handles.len();
        // Whatever happens below, no handle stays behind in the caller's
        // buffer: each path either moves them into the message or drops
        // (closes) them here.
        let mut handles = Dropper(handles);
        let handles = &mut handles;
        // The header alone, for deciding what to skip when the rest is bad.
        let head = wire::decode_header(frame);
        let guess = head.as_ref().ok().copied();

        // The rest of a message already rejected goes quietly, whatever is
        // wrong with it, so that one bad message is one error.
        if let State::Skipping { seq } = self.state {
            match guess {
                Some(h) if !h.is_first() && h.seq == seq => {
                    handles.0.clear();
                    if h.is_last() {
                        self.state = State::Idle;
                    }
                    return Ok(None);
                }
                _ => self.state = State::Idle,
            }
        }

        if !self.limits.accept_handles && (control_truncated || received > 0) {
            let announced = guess.map_or(0, |h| h.total_handles as usize);
            handles.0.clear();
            return self.fail(
                guess,
                Error::HandlesRefused {
                    count: announced.max(received).max(1),
                },
            );
        }
        if frame_truncated {
            handles.0.clear();
            return self.fail(guess, Error::FrameTooLarge { closed: received });
        }
        if control_truncated {
            handles.0.clear();
            return self.fail(guess, Error::ControlTruncated { closed: received });
        }
        let decoded = match wire::decode_with_header(frame, head) {
            Ok(f) => f,
            Err(e) => {
                handles.0.clear();
                return self.fail(guess, Error::Malformed(e));
            }
        };
        let header = decoded.header;

        if !self.limits.accept_handles && header.frame_handles > 0 {
            return self.fail(
                Some(header),
                Error::HandlesRefused {
                    count: header.total_handles as usize,
                },
            );
        }
        let announced = header.frame_handles as usize;
        if received != announced {
            handles.0.clear();
            let err = if announced == 0 {
                Error::UnannouncedHandles { received }
            } else {
                Error::HandleCountMismatch {
                    announced,
                    received,
                }
            };
            return self.fail(Some(header), err);
        }

        // The common case on its own: a whole message in one frame, with
        // nothing under way, within the limits and adding up. It builds the
        // message directly; every other frame takes the general path below,
        // which also names what is wrong.
        if header.is_first()
            && header.is_last()
            && matches!(self.state, State::Idle)
            && header.total_handles == header.frame_handles
            && header.total_bytes == header.frame_bytes
            && self.check_limits(&header).is_ok()
        {
            // The arrival's own vector becomes the message's (unless there
            // is nothing in it: then it keeps its room for the next frame).
            let mut parts = if handles.0.is_empty() {
                Vec::new()
            } else {
                std::mem::take(handles.0)
            };
            set_records(&mut parts, &decoded);
            return Ok(Some(Assembled {
                bytes: decoded.payload.to_vec(),
                handles: parts,
            }));
        }

        let mut abandoned = None;
        if header.is_first() {
            if let State::Building(old) = std::mem::replace(&mut self.state, State::Idle) {
                abandoned = Some(Error::Sequence(format!(
                    "message {} was abandoned after {} of {} handles and {} of {} bytes, when message {} began",
                    old.seq,
                    old.message.handles.len(),
                    old.total_handles,
                    old.message.bytes.len(),
                    old.total_bytes,
                    header.seq
                )));
            }
            if let Err(e) = self.check_limits(&header) {
                return self.fail(Some(header), abandoned.unwrap_or(e));
            }
            self.state = State::Building(Partial {
                seq: header.seq,
                total_handles: header.total_handles as usize,
                total_bytes: header.total_bytes as usize,
                message: Assembled {
                    bytes: Vec::with_capacity((header.total_bytes as usize).min(PREALLOC_LIMIT)),
                    handles: Vec::with_capacity(
                        (header.total_handles as usize).min(wire::MAX_FRAME_HANDLES),
                    ),
                },
            });
        }

        let partial = match &mut self.state {
            State::Building(p) if p.seq == header.seq => p,
            State::Building(p) => {
                let why = format!(
                    "a frame of message {} arrived while message {} was incomplete",
                    header.seq, p.seq
                );
                return self.fail(Some(header), Error::Sequence(why));
            }
            _ => {
                let why = format!(
                    "a continuation frame of message {} arrived without its first frame",
                    header.seq
                );
                return self.fail(Some(header), Error::Sequence(why));
            }
        };
        if header.total_handles as usize != partial.total_handles
            || header.total_bytes as usize != partial.total_bytes
        {
            let why = format!(
                "message {} changed its announced totals between frames",
                header.seq
            );
            return self.fail(Some(header), Error::Sequence(why));
        }
        let have_handles = partial.message.handles.len() + announced;
        let have_bytes = partial.message.bytes.len() + decoded.payload.len();
        if have_handles > partial.total_handles || have_bytes > partial.total_bytes {
            let why = format!(
                "message {} carries more than the {} handles and {} bytes it announced",
                header.seq, partial.total_handles, partial.total_bytes
            );
            return self.fail(Some(header), Error::Sequence(why));
        }
        if header.is_last()
            && (have_handles != partial.total_handles || have_bytes != partial.total_bytes)
        {
            let why = format!(
                "message {} ended with {} of {} handles and {} of {} bytes",
                header.seq, have_handles, partial.total_handles, have_bytes, partial.total_bytes
            );
            return self.fail(Some(header), Error::Sequence(why));
        }

        partial.message.bytes.extend_from_slice(decoded.payload);
        let parts = &mut partial.message.handles;
        let start = parts.len();
        parts.append(handles.0);
        set_records(&mut parts[start..], &decoded);

        if !header.is_last() {
            return match abandoned {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let State::Building(done) = std::mem::replace(&mut self.state, State::Idle) else {
            unreachable!("the match above left the state Building")
        };
        match abandoned {
            Some(e) => {
                self.ready = Some(done.message);
                Err(e)
            }
            None => Ok(Some(done.message)),
        }
    }

    fn check_limits(&self, header: &FrameHeader) -> Result<(), Error> {
        let handles = header.total_handles as usize;
        let bytes = header.total_bytes as usize;
        if handles > self.limits.max_handles {
            return Err(Error::LimitExceeded {
                what: "handles",
                limit: self.limits.max_handles,
                got: handles,
            });
        }
        if bytes > self.limits.max_bytes {
            return Err(Error::LimitExceeded {
                what: "bytes",
                limit: self.limits.max_bytes,
                got: bytes,
            });
        }
        Ok(())
    }

    /// Abandons whatever was being built and, unless the failing frame ended
    /// its message, skips the rest of that message.
    fn fail(
        &mut self,
        header: Option<FrameHeader>,
        err: Error,
    ) -> Result<Option<Assembled<T>>, Error> {
        self.state = match header {
            Some(h) if !h.is_last() => State::Skipping { seq: h.seq },
            _ => State::Idle,
        };
        Err(err)
    }
}

/// Gives a frame's handles (exactly as many as it has records, which the
/// caller has checked) their records' kinds and names.
#[inline]
fn set_records<T: Slot>(parts: &mut [T], frame: &wire::Frame<'_>) {
    if let Some(kinds) = frame.fixed_only_kinds() {
        // No names: the kinds alone.
        for (part, kind) in parts.iter_mut().zip(kinds) {
            part.set_kind(kind);
        }
        return;
    }
    let mut records = frame.records();
    for part in parts {
        let Some((kind, name)) = records.next_codes() else {
            break;
        };
        part.set_record(kind, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::HandleKind;
    use crate::wire::{Record, FLAG_FIRST, FLAG_LAST};
    use std::rc::Rc;

    /// A handle that counts how many of its kind are alive, and keeps the
    /// record it was given.
    struct Tracked(
        #[allow(dead_code)] Rc<()>,
        Option<(HandleKind, Option<String>)>,
    );

    impl Slot for Tracked {
        fn set_record(&mut self, kind: KindCodes, name: Option<&str>) {
            self.1 = Some((kind.kind(), name.map(str::to_owned)));
        }
    }

    fn limits() -> Limits {
        Limits {
            accept_handles: true,
            max_handles: 100,
            max_bytes: 1000,
        }
    }

    fn frame(flags: u16, seq: u32, totals: (u32, u32), handles: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader {
            flags,
            seq,
            total_handles: totals.0,
            total_bytes: totals.1,
            frame_handles: handles,
            frame_bytes: payload.len() as u32,
        }
        .encode(&mut out);
        for _ in 0..handles {
            Record {
                kind: HandleKind::Pipe,
                name: Some("p"),
                value: 0,
                extra: &[],
            }
            .encode(&mut out);
        }
        out.extend_from_slice(payload);
        out
    }

    fn arrive<'a>(frame: &'a [u8], n: usize, alive: &Rc<()>) -> Arrival<'a, Tracked> {
        // Leaked on purpose: a test-only buffer that must outlive the call.
        let handles = Box::leak(Box::new(
            (0..n)
                .map(|_| Tracked(alive.clone(), None))
                .collect::<Vec<_>>(),
        ));
        Arrival {
            frame,
            handles,
            control_truncated: false,
            frame_truncated: false,
        }
    }

    #[test]
    fn reassembles_chunks() {
        let alive = Rc::new(());
        let mut a = Assembler::new(limits());
        let f1 = frame(FLAG_FIRST, 3, (3, 4), 2, b"ab");
        let f2 = frame(FLAG_LAST, 3, (3, 4), 1, b"cd");
        assert!(a.push(arrive(&f1, 2, &alive)).unwrap().is_none());
        let m = a.push(arrive(&f2, 1, &alive)).unwrap().unwrap();
        assert_eq!(m.bytes, b"abcd");
        assert_eq!(m.handles.len(), 3);
        for h in &m.handles {
            assert_eq!(h.1, Some((HandleKind::Pipe, Some("p".to_owned()))));
        }
        assert_eq!(Rc::strong_count(&alive), 4);
        drop(m);
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn a_one_frame_message_gives_each_handle_its_record() {
        let alive = Rc::new(());
        let mut a = Assembler::new(limits());
        let kinds = [HandleKind::File, HandleKind::Pipe, HandleKind::Other];
        let mut f = Vec::new();
        FrameHeader {
            flags: FLAG_FIRST | FLAG_LAST,
            seq: 1,
            total_handles: 3,
            total_bytes: 1,
            frame_handles: 3,
            frame_bytes: 1,
        }
        .encode(&mut f);
        for kind in kinds {
            Record {
                kind,
                name: None,
                value: 0,
                extra: &[],
            }
            .encode(&mut f);
        }
        f.push(b'z');
        let m = a.push(arrive(&f, 3, &alive)).unwrap().unwrap();
        assert_eq!(m.bytes, b"z");
        let got: Vec<_> = m.handles.iter().map(|h| h.1.clone()).collect();
        assert_eq!(got, kinds.map(|k| Some((k, None))));
        drop(m);
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn every_failure_drops_every_handle() {
        let alive = Rc::new(());
        let mut a = Assembler::new(limits());
        let both = FLAG_FIRST | FLAG_LAST;
        // Count mismatch, unannounced handles, truncations, limits, garbage.
        let cases: Vec<(Vec<u8>, usize, bool)> = vec![
            (frame(both, 1, (2, 0), 2, b""), 1, false),
            (frame(both, 1, (0, 0), 0, b""), 3, false),
            (frame(both, 1, (1, 0), 1, b""), 1, true),
            (frame(both, 1, (101, 0), 0, b""), 0, false),
            (b"garbage that is not a frame at all".to_vec(), 4, false),
            (frame(FLAG_LAST, 9, (1, 0), 1, b""), 1, false),
        ];
        for (f, n, ctrunc) in &cases {
            let mut arr = arrive(f, *n, &alive);
            arr.control_truncated = *ctrunc;
            assert!(a.push(arr).is_err());
            assert_eq!(Rc::strong_count(&alive), 1);
        }
        // A message abandoned midway, then the peer disappears.
        let f1 = frame(FLAG_FIRST, 5, (4, 0), 2, b"");
        assert!(a.push(arrive(&f1, 2, &alive)).unwrap().is_none());
        assert!(matches!(
            a.end_of_stream(),
            Err(Error::PeerClosedMidMessage { handles: 2, .. })
        ));
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn a_rejected_first_frame_skips_its_message_quietly() {
        let alive = Rc::new(());
        let mut a = Assembler::new(limits());
        let f1 = frame(FLAG_FIRST, 8, (200, 0), 2, b"");
        let f2 = frame(0, 8, (200, 0), 2, b"");
        let f3 = frame(FLAG_LAST, 8, (200, 0), 2, b"");
        let next = frame(FLAG_FIRST | FLAG_LAST, 9, (0, 2), 0, b"ok");
        assert!(matches!(
            a.push(arrive(&f1, 2, &alive)),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(a.push(arrive(&f2, 2, &alive)).unwrap().is_none());
        assert!(a.push(arrive(&f3, 2, &alive)).unwrap().is_none());
        assert_eq!(
            a.push(arrive(&next, 0, &alive)).unwrap().unwrap().bytes,
            b"ok"
        );
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn an_abandoned_message_is_reported_and_the_next_one_kept() {
        let alive = Rc::new(());
        let mut a = Assembler::new(limits());
        let f1 = frame(FLAG_FIRST, 1, (4, 0), 2, b"");
        let next = frame(FLAG_FIRST | FLAG_LAST, 2, (1, 1), 1, b"x");
        assert!(a.push(arrive(&f1, 2, &alive)).unwrap().is_none());
        assert!(matches!(
            a.push(arrive(&next, 1, &alive)),
            Err(Error::Sequence(_))
        ));
        let m = a.take_ready().unwrap();
        assert_eq!((m.bytes.as_slice(), m.handles.len()), (&b"x"[..], 1));
        drop(m);
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn bytes_only_refuses_and_closes() {
        let alive = Rc::new(());
        let mut a = Assembler::new(Limits {
            accept_handles: false,
            ..limits()
        });
        let f = frame(FLAG_FIRST | FLAG_LAST, 1, (2, 1), 2, b"x");
        let mut arr = arrive(&f, 0, &alive);
        arr.control_truncated = true;
        assert!(matches!(
            a.push(arr),
            Err(Error::HandlesRefused { count: 2 })
        ));
        // A refused message of several frames is one error, not one a frame.
        let f1 = frame(FLAG_FIRST, 3, (300, 0), 253, b"");
        let f2 = frame(FLAG_LAST, 3, (300, 0), 47, b"");
        let mut arr = arrive(&f1, 0, &alive);
        arr.control_truncated = true;
        assert!(matches!(
            a.push(arr),
            Err(Error::HandlesRefused { count: 300 })
        ));
        let mut arr = arrive(&f2, 0, &alive);
        arr.control_truncated = true;
        assert!(a.push(arr).unwrap().is_none());
        let plain = frame(FLAG_FIRST | FLAG_LAST, 2, (0, 1), 0, b"y");
        assert_eq!(
            a.push(arrive(&plain, 0, &alive)).unwrap().unwrap().bytes,
            b"y"
        );
    }
}
