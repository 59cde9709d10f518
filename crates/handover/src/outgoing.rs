//! Cutting an outgoing message into frames. Shared by the blocking and the
//! async channel, which differ only in how they wait for the transport.

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::wire::{self, FrameHeader, FrameSpan, Record, FLAG_FIRST, FLAG_LAST};

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
        let mut single_len = wire::HEADER_LEN + bytes.len();
        for h in handles {
            if let Some(name) = h.name() {
                wire::check_name(name).map_err(|why| Error::InvalidName {
                    name: name.to_owned(),
                    why,
                })?;
            }
            single_len += record_len(h);
        }
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
        })
    }

    /// Writes the next frame's header and records into `scratch` and returns
    /// the payload and handles that go with it.
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
        scratch.clear();
        FrameHeader {
            flags,
            seq: self.seq,
            total_handles: self.handles.len() as u32,
            total_bytes: self.bytes.len() as u32,
            frame_handles: handles.len() as u32,
            frame_bytes: payload.len() as u32,
        }
        .encode(scratch);
        for h in handles {
            Record {
                kind: h.kind(),
                name: h.name(),
                value: 0,
                extra: &[],
            }
            .encode(scratch);
        }
        Some((payload, handles))
    }
}

fn record_len(h: &Handle) -> usize {
    wire::RECORD_LEN + h.name().map_or(0, str::len)
}
