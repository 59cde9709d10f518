//! Cutting an outgoing message into frames. Shared by the blocking and the
//! async channel, which differ only in how they wait for the transport.

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::sys;
use crate::wire::{self, FrameHeader, FrameSpan, FLAG_FIRST, FLAG_LAST};

/// Per-channel send state. Frames of one message must not interleave with
/// another's, so a sender holds this for a whole message.
#[derive(Default)]
pub(crate) struct Outbox {
    pub seq: u32,
    pub scratch: Vec<u8>,
}

/// The frames of one message, encoded one at a time into a scratch buffer.
pub(crate) struct Frames<'a> {
    bytes: &'a [u8],
    handles: &'a [Handle],
    spans: Spans,
    next: usize,
    seq: u32,
    /// Whether any handle has a name (when none has, records are all
    /// [`wire::RECORD_LEN`] long).
    named: bool,
}

/// Almost every message is one frame; only large ones pay for a plan.
enum Spans {
    One(FrameSpan),
    Many(Vec<FrameSpan>),
}

impl Spans {
    fn get(&self, i: usize) -> Option<&FrameSpan> {
        match self {
            Spans::One(s) => (i == 0).then_some(s),
            Spans::Many(v) => v.get(i),
        }
    }

    fn len(&self) -> usize {
        match self {
            Spans::One(_) => 1,
            Spans::Many(v) => v.len(),
        }
    }
}

impl<'a> Frames<'a> {
    /// Checks the message and takes the next sequence number from `seq`.
    #[inline]
    pub fn new(seq: &mut u32, bytes: &'a [u8], handles: &'a [Handle]) -> Result<Frames<'a>> {
        let too_large = |what, got| Error::TooLargeToSend {
            what,
            limit: u32::MAX as usize,
            got,
        };
        if u32::try_from(handles.len()).is_err() {
            return Err(too_large("handles", handles.len()));
        }
        if u32::try_from(bytes.len()).is_err() {
            return Err(too_large("bytes", bytes.len()));
        }
        // Names are checked here, once per message, so that a bad one is
        // refused before any frame goes out.
        let mut names = 0;
        let mut named = false;
        for h in handles {
            if let Some(name) = h.name() {
                wire::check_name(name).map_err(|why| Error::InvalidName {
                    name: name.to_owned(),
                    why,
                })?;
                names += name.len();
                named = true;
            }
        }
        // Platform data in records (a WSAPROTOCOL_INFOW per socket on
        // Windows; nothing on Unix) counts towards the frame size too.
        let extras: usize = if cfg!(windows) {
            handles.iter().map(|h| sys::extra_len(&h.raw)).sum()
        } else {
            0
        };
        let single_len = wire::RECORD_LEN
            .saturating_mul(handles.len())
            .saturating_add(wire::HEADER_LEN + names + extras)
            .saturating_add(bytes.len());
        let spans = if handles.len() <= wire::MAX_FRAME_HANDLES && single_len <= wire::MAX_FRAME_LEN
        {
            Spans::One(FrameSpan {
                handles: 0..handles.len(),
                bytes: 0..bytes.len(),
            })
        } else {
            Spans::Many(wire::plan_frames(handles.len(), bytes.len(), |i| {
                record_len(&handles[i])
            }))
        };
        let this = *seq;
        *seq = seq.wrapping_add(1);
        Ok(Frames {
            bytes,
            handles,
            spans,
            next: 0,
            seq: this,
            named,
        })
    }

    /// Writes the next frame's header and records into `scratch` and returns
    /// the payload and handles that go with it.
    #[inline]
    pub fn encode_next(&mut self, scratch: &mut Vec<u8>) -> Option<(&'a [u8], &'a [Handle])> {
        let span = self.spans.get(self.next)?.clone();
        let mut flags = 0;
        if self.next == 0 {
            flags |= FLAG_FIRST;
        }
        if self.next + 1 == self.spans.len() {
            flags |= FLAG_LAST;
        }
        self.next += 1;
        let handles = &self.handles[span.handles];
        let payload = &self.bytes[span.bytes];
        let header = FrameHeader {
            flags,
            seq: self.seq,
            total_handles: self.handles.len() as u32,
            total_bytes: self.bytes.len() as u32,
            frame_handles: handles.len() as u32,
            frame_bytes: payload.len() as u32,
        };
        if !self.named {
            // Every record is its 16 fixed bytes, so the head has a known
            // length: size the buffer to it (zeroing only what it has never
            // held) and overwrite every byte of it.
            let len = wire::HEADER_LEN + wire::RECORD_LEN * handles.len();
            scratch.truncate(len);
            scratch.resize(len, 0);
            let (head, records) = scratch.split_at_mut(wire::HEADER_LEN);
            head.copy_from_slice(&header.to_bytes());
            for (record, h) in records.chunks_exact_mut(wire::RECORD_LEN).zip(handles) {
                record.copy_from_slice(&wire::record_fixed(h.kind_codes(), 0, 0, 0));
            }
            return Some((payload, handles));
        }
        // One reservation for the whole head, so that the loop below only
        // copies the fixed parts and the names.
        let names: usize = handles.iter().map(|h| h.name().map_or(0, str::len)).sum();
        scratch.clear();
        scratch.reserve(wire::HEADER_LEN + wire::RECORD_LEN * handles.len() + names);
        scratch.extend_from_slice(&header.to_bytes());
        for h in handles {
            let name = h.name();
            let name_len = name.map_or(0, str::len) as u16;
            scratch.extend_from_slice(&wire::record_fixed(h.kind_codes(), name_len, 0, 0));
            if let Some(name) = name {
                scratch.extend_from_slice(name.as_bytes());
            }
        }
        Some((payload, handles))
    }
}

fn record_len(h: &Handle) -> usize {
    wire::RECORD_LEN + h.name().map_or(0, str::len) + sys::extra_len(&h.raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` handles: /dev/null and a UDP socket in turn, named when asked.
    fn handles(n: usize, named: bool) -> Vec<Handle> {
        let null = std::fs::File::open(if cfg!(windows) { "NUL" } else { "/dev/null" }).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (0..n)
            .map(|i| {
                let h = if i % 2 == 0 {
                    Handle::from(null.try_clone().unwrap())
                } else {
                    Handle::from(udp.try_clone().unwrap())
                };
                if named && i % 3 != 2 {
                    h.with_name(format!("handle-{i}"))
                } else {
                    h
                }
            })
            .collect()
    }

    /// Messages of every shape, one after another through one scratch
    /// buffer (which is reused without clearing when no handle has a
    /// name): every frame decodes to exactly its own records.
    #[test]
    fn every_frame_carries_exactly_its_records() {
        let mut seq = 0;
        let mut scratch = Vec::new();
        let shapes = [
            (3, true),
            (5, false),
            (2, false),
            (4, true),
            (1, false),
            (0, false),
            (253, false),
            (300, false),
            (254, true),
            (16, false),
        ];
        for (n, named) in shapes {
            let hs = handles(n, named);
            let payload = vec![7u8; n % 5];
            let mut frames = Frames::new(&mut seq, &payload, &hs).unwrap();
            let (mut got_handles, mut got_bytes) = (0, 0);
            while let Some((bytes, frame_handles)) = frames.encode_next(&mut scratch) {
                let mut frame = scratch.clone();
                frame.extend_from_slice(bytes);
                let f = wire::decode(&frame).unwrap();
                assert_eq!(f.header.total_handles as usize, n);
                assert_eq!(f.records().count(), frame_handles.len());
                for (r, h) in f.records().zip(frame_handles) {
                    assert_eq!((r.kind, r.name), (h.kind(), h.name()));
                }
                assert_eq!(f.payload, bytes);
                got_handles += frame_handles.len();
                got_bytes += bytes.len();
            }
            assert_eq!((got_handles, got_bytes), (n, payload.len()));
        }
    }
}
