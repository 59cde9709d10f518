//! The frame format of a channel, as pure code: no system calls, no handles.
//!
//! docs/protocol.md is the normative description; this module is its
//! implementation, and the constants here are the numbers that document
//! quotes. Everything is fixed-width little-endian so that 32-bit and 64-bit
//! peers, and peers in other languages, produce identical bytes.
//!
//! A logical message is split into one or more frames. Each frame is one
//! transport datagram (one SOCK_SEQPACKET record, one message-mode pipe
//! message) with the handles attached to it.

use crate::handle::{HandleKind, SocketFamily, SocketInfo, SocketType};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"HNDV";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// The only frame type defined by version 1: a piece of a message.
pub const FRAME_MESSAGE: u8 = 1;
/// Windows only: an acknowledgement. The receiver of a frame whose
/// handles it pulled out of the sender's process (records without
/// platform data) tells the sender it may close its transfer copies.
/// The header's `seq` is the message's, `total_handles` the number of
/// pulled records in the frame, every other field zero. Never part of a
/// message; Linux peers never send one (and reject one as a bad type).
pub const FRAME_ACK: u8 = 2;

/// Frame flag: this frame starts a logical message.
pub const FLAG_FIRST: u16 = 1 << 0;
/// Frame flag: this frame ends a logical message.
pub const FLAG_LAST: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_FIRST | FLAG_LAST;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 28;
/// Size of the fixed part of a handle record.
pub const RECORD_LEN: usize = 16;
/// Largest frame, header and records included. A receiver needs a buffer of
/// this size and no more.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Most handles one frame may carry: Linux's SCM_MAX_FD, so that one frame
/// is always one sendmsg(2).
pub const MAX_FRAME_HANDLES: usize = 253;
/// Longest handle name, in bytes of UTF-8 (systemd's FDNAME limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest platform-specific blob in a record (a WSAPROTOCOL_INFOW is 628 bytes).
pub const MAX_EXTRA_LEN: usize = 1024;

/// The fixed header at the start of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub flags: u16,
    pub seq: u32,
    pub total_handles: u32,
    pub total_bytes: u32,
    pub frame_handles: u32,
    pub frame_bytes: u32,
}

impl FrameHeader {
    pub fn is_first(&self) -> bool {
        self.flags & FLAG_FIRST != 0
    }

    pub fn is_last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// The header's 28 bytes.
    pub(crate) fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&MAGIC);
        head[4] = VERSION;
        head[5] = FRAME_MESSAGE;
        head[6..8].copy_from_slice(&self.flags.to_le_bytes());
        let fields = [
            self.seq,
            self.total_handles,
            self.total_bytes,
            self.frame_handles,
            self.frame_bytes,
        ];
        for (i, field) in fields.iter().enumerate() {
            head[8 + 4 * i..12 + 4 * i].copy_from_slice(&field.to_le_bytes());
        }
        head
    }
}

/// An acknowledgement frame ([`FRAME_ACK`]) for `pulled` records of
/// message `seq`.
pub fn encode_ack(seq: u32, pulled: u32) -> [u8; HEADER_LEN] {
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&MAGIC);
    head[4] = VERSION;
    head[5] = FRAME_ACK;
    head[8..12].copy_from_slice(&seq.to_le_bytes());
    head[12..16].copy_from_slice(&pulled.to_le_bytes());
    head
}

/// `(seq, pulled)` when `buf` is exactly a well-formed acknowledgement
/// frame; `None` for anything else (which then goes the message way).
pub fn decode_ack(buf: &[u8]) -> Option<(u32, u32)> {
    let head: &[u8; HEADER_LEN] = buf.try_into().ok()?;
    let zero = head[6..8].iter().chain(&head[16..]).all(|&b| b == 0);
    (head[..4] == MAGIC && head[4] == VERSION && head[5] == FRAME_ACK && zero)
        .then(|| (u32_at(head, 8), u32_at(head, 12)))
}

/// One handle's description inside a frame. On Unix the handle itself rides
/// in SCM_RIGHTS, in record order; on Windows `value` and `extra` carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: HandleKind,
    pub name: Option<&'a str>,
    pub value: u32,
    pub extra: &'a [u8],
}

impl Record<'_> {
    pub fn encoded_len(&self) -> usize {
        RECORD_LEN + self.name.map_or(0, str::len) + self.extra.len()
    }

    /// Appends the record. The caller has checked the name with
    /// [`check_name`] and the extra blob against [`MAX_EXTRA_LEN`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        let name = self.name.unwrap_or("");
        out.reserve(self.encoded_len());
        out.extend_from_slice(&record_fixed(
            KindCodes::of(self.kind),
            name.len() as u16,
            self.extra.len() as u16,
            self.value,
        ));
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(self.extra);
    }
}

/// The fixed 16-byte part of a record: the kind's four code bytes, the two
/// lengths, the value and the zero reserved field.
#[inline]
pub(crate) fn record_fixed(
    kind: KindCodes,
    name_len: u16,
    extra_len: u16,
    value: u32,
) -> [u8; RECORD_LEN] {
    let low = u64::from(kind.0) | u64::from(name_len) << 32 | u64::from(extra_len) << 48;
    // The reserved field, the high half of the second word, stays zero.
    (u128::from(low) | u128::from(value) << 64).to_le_bytes()
}

/// Why a frame could not be decoded. Each names the first rule it broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error("bad magic {0:02x?}: not a handover frame")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame type {0}")]
    FrameType(u8),
    #[error("unknown flag bits {0:#06x}")]
    Flags(u16),
    #[error("frame announces {0} handles, more than the {MAX_FRAME_HANDLES} a frame may carry")]
    TooManyFrameHandles(u32),
    #[error("handle record {index} is cut off by the end of the frame")]
    ShortRecord { index: usize },
    #[error("handle record {index} has unknown {field} value {value}")]
    BadRecordField {
        index: usize,
        field: &'static str,
        value: u8,
    },
    #[error("handle record {index} has non-zero reserved bits")]
    RecordReserved { index: usize },
    #[error("handle record {index} has a name of {len} bytes (limit {MAX_NAME_LEN})")]
    NameTooLong { index: usize, len: usize },
    #[error("handle record {index} has a name that is not valid UTF-8 or contains NUL")]
    BadName { index: usize },
    #[error("handle record {index} has {len} bytes of platform data (limit {MAX_EXTRA_LEN})")]
    ExtraTooLong { index: usize, len: usize },
    #[error("frame header says {announced} payload bytes but {actual} bytes follow the records")]
    PayloadLength { announced: u32, actual: usize },
    #[error("frame of {0} bytes is larger than the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLong(usize),
}

/// A decoded frame, borrowing from the receive buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// The handle records, already validated by [`decode`].
    records: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// When no record of this frame has a name or extra (each is exactly
    /// its fixed part), the records' kind codes, in order; `None` for any
    /// other frame. The fast case of [`records`](Self::records).
    pub(crate) fn fixed_only_kinds(
        &self,
    ) -> Option<impl ExactSizeIterator<Item = KindCodes> + use<'a>> {
        if self.records.len() != RECORD_LEN * self.header.frame_handles as usize {
            return None;
        }
        // [`decode`] checked every record, so these are valid codes.
        Some(self.records.chunks_exact(RECORD_LEN).map(|r| {
            r.first_chunk::<4>()
                .map_or(KindCodes::OTHER, |c| KindCodes(u32::from_le_bytes(*c)))
        }))
    }

    /// The handle records, in order. [`decode`] checked every one, so this
    /// yields exactly `header.frame_handles` of them without allocating.
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: self.records,
            index: 0,
            count: self.header.frame_handles as usize,
        }
    }
}

/// An iterator over a validated frame's records.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    rest: &'a [u8],
    index: usize,
    count: usize,
}

impl<'a> Records<'a> {
    /// The next record's kind codes and name: all that the receiving side
    /// keeps of a record on Unix.
    // Always inlined: called once per handle received, where a call costs
    // more than the work.
    #[inline(always)]
    pub(crate) fn next_codes(&mut self) -> Option<(KindCodes, Option<&'a str>)> {
        self.next_parts()
            .map(|(fixed, name, _)| (KindCodes(fixed.codes), name))
    }

    #[inline(always)]
    fn next_parts(&mut self) -> Option<(Fixed, Option<&'a str>, &'a [u8])> {
        if self.index == self.count {
            return None;
        }
        // [`decode`] has checked every rule already, so this only takes the
        // record apart again. Nothing here can fail for a frame that
        // passed; were it to, the iterator would end early, not panic.
        let (fixed, rest) = self.rest.split_first_chunk::<RECORD_LEN>()?;
        let fixed = Fixed::parse(fixed);
        let (name, rest) = rest.split_at_checked(fixed.name_len)?;
        let (extra, rest) = rest.split_at_checked(fixed.extra_len)?;
        let name = match fixed.name_len {
            0 => None,
            _ => Some(std::str::from_utf8(name).ok()?),
        };
        self.rest = rest;
        self.index += 1;
        Some((fixed, name, extra))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    #[inline]
    fn next(&mut self) -> Option<Record<'a>> {
        let (fixed, name, extra) = self.next_parts()?;
        Some(Record {
            kind: kind_from_checked_codes(fixed.codes),
            name,
            value: fixed.value,
            extra,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.index;
        (left, Some(left))
    }
}

/// Decodes one frame. Never panics, whatever the bytes.
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, DecodeError> {
    decode_with_header(buf, decode_header(buf))
}

/// [`decode`], for a caller that has already run [`decode_header`] on
/// `buf` and passes its result: the header is not decoded twice.
pub(crate) fn decode_with_header(
    buf: &[u8],
    header: Result<FrameHeader, DecodeError>,
) -> Result<Frame<'_>, DecodeError> {
    if buf.len() > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLong(buf.len()));
    }
    let header = header?;
    let all = buf.get(HEADER_LEN..).unwrap_or_default();
    let count = header.frame_handles as usize;
    // The common frame first: every record without name or extra (as every
    // Linux record of a handle without a name is), so that the records are
    // exactly `16 * count` bytes and each is checked on its own. Any other
    // frame, valid or not, takes the record-by-record walk below.
    let fixed_only = RECORD_LEN * count;
    if all.len().checked_sub(fixed_only) == Some(header.frame_bytes as usize) {
        let (records, payload) = all.split_at(fixed_only);
        let valid = records.chunks_exact(RECORD_LEN).fold(true, |valid, r| {
            valid
                & r.first_chunk::<RECORD_LEN>()
                    .is_some_and(is_valid_fixed_only)
        });
        if valid {
            return Ok(Frame {
                header,
                records,
                payload,
            });
        }
    }
    let mut rest = all;
    for index in 0..count {
        rest = check_record(rest, index)?;
    }
    if rest.len() != header.frame_bytes as usize {
        return Err(DecodeError::PayloadLength {
            announced: header.frame_bytes,
            actual: rest.len(),
        });
    }
    let (records, payload) = all.split_at(all.len() - rest.len());
    Ok(Frame {
        header,
        records,
        payload,
    })
}

/// Decodes only the fixed header, for deciding what to skip when the rest
/// of a frame is broken.
pub fn decode_header(buf: &[u8]) -> Result<FrameHeader, DecodeError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Err(DecodeError::ShortHeader(buf.len()));
    };
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if head[4] != VERSION {
        return Err(DecodeError::Version(head[4]));
    }
    if head[5] != FRAME_MESSAGE {
        return Err(DecodeError::FrameType(head[5]));
    }
    let flags = u16_at(head, 6);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Flags(flags));
    }
    let header = FrameHeader {
        flags,
        seq: u32_at(head, 8),
        total_handles: u32_at(head, 12),
        total_bytes: u32_at(head, 16),
        frame_handles: u32_at(head, 20),
        frame_bytes: u32_at(head, 24),
    };
    if header.frame_handles as usize > MAX_FRAME_HANDLES {
        return Err(DecodeError::TooManyFrameHandles(header.frame_handles));
    }
    Ok(header)
}

/// Checks one record and returns what follows it. A valid record is
/// recognised from its fixed part and lengths alone; anything else goes to
/// [`decode_record`], which names the first rule broken.
#[inline]
fn check_record(buf: &[u8], index: usize) -> Result<&[u8], DecodeError> {
    if let Some((fixed, rest)) = buf.split_first_chunk::<RECORD_LEN>() {
        let fixed = Fixed::parse(fixed);
        if fixed.is_valid() {
            if fixed.name_len == 0 && fixed.extra_len == 0 {
                return Ok(rest);
            }
            if let Some((name, rest)) = rest.split_at_checked(fixed.name_len) {
                if let Some(rest) = rest.get(fixed.extra_len..) {
                    if name_is_valid(name) {
                        return Ok(rest);
                    }
                }
            }
        }
    }
    check_record_slowly(buf, index)
}

#[cold]
#[inline(never)]
fn check_record_slowly(buf: &[u8], index: usize) -> Result<&[u8], DecodeError> {
    decode_record(buf, index).map(|(_, rest)| rest)
}

/// A record's fixed part, taken apart.
#[derive(Clone, Copy)]
struct Fixed {
    /// `kind | family << 8 | socket_type << 16 | record_flags << 24`.
    codes: u32,
    name_len: usize,
    extra_len: usize,
    value: u32,
    reserved: u32,
}

impl Fixed {
    /// Reads the 16 bytes as two little-endian words.
    #[inline]
    fn parse(fixed: &[u8; RECORD_LEN]) -> Fixed {
        let [b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15] = *fixed;
        let low = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        let high = u64::from_le_bytes([b8, b9, b10, b11, b12, b13, b14, b15]);
        Fixed {
            codes: low as u32,
            name_len: usize::from((low >> 32) as u16),
            extra_len: usize::from((low >> 48) as u16),
            value: high as u32,
            reserved: (high >> 32) as u32,
        }
    }

    /// Whether the fixed part breaks no rule: exactly the records that
    /// [`decode_record`] accepts, as far as the fixed part decides it (a
    /// test holds the two to agreeing).
    #[inline]
    fn is_valid(&self) -> bool {
        codes_are_valid(self.codes)
            & (self.reserved == 0)
            & (self.name_len <= MAX_NAME_LEN)
            & (self.extra_len <= MAX_EXTRA_LEN)
    }
}

/// Whether `kind | family << 8 | socket_type << 16 | record_flags << 24`
/// is a combination [`kind_from_wire`] accepts: a socket with family and
/// socket type at most 3 and no flag but LISTENING, or another kind with
/// the other three all zero.
#[inline]
fn codes_are_valid(codes: u32) -> bool {
    (codes & 0xFEFC_FCFF == KIND_SOCKET as u32) | (codes <= u32::from(KIND_MAX))
}

/// Whether a record is valid and has neither name nor extra: the kind
/// codes valid, and the lengths (the high half of the first word) and the
/// reserved field (the high half of the second) all zero.
#[inline]
fn is_valid_fixed_only(fixed: &[u8; RECORD_LEN]) -> bool {
    let [b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15] = *fixed;
    let low = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let high = u64::from_le_bytes([b8, b9, b10, b11, b12, b13, b14, b15]);
    codes_are_valid(low as u32) & (low >> 32 == 0) & (high >> 32 == 0)
}

/// Whether a received name is acceptable: empty (no name), or UTF-8 without NUL.
#[inline]
fn name_is_valid(name: &[u8]) -> bool {
    name.is_empty() || (!name.contains(&0) && std::str::from_utf8(name).is_ok())
}

fn decode_record(buf: &[u8], index: usize) -> Result<(Record<'_>, &[u8]), DecodeError> {
    let short = DecodeError::ShortRecord { index };
    let fixed = buf.get(..RECORD_LEN).ok_or(short.clone())?;
    let kind = kind_from_wire(index, fixed[0], fixed[1], fixed[2], fixed[3])?;
    let name_len = u16_at(fixed, 4) as usize;
    let extra_len = u16_at(fixed, 6) as usize;
    let value = u32_at(fixed, 8);
    if u32_at(fixed, 12) != 0 {
        return Err(DecodeError::RecordReserved { index });
    }
    if name_len > MAX_NAME_LEN {
        return Err(DecodeError::NameTooLong {
            index,
            len: name_len,
        });
    }
    if extra_len > MAX_EXTRA_LEN {
        return Err(DecodeError::ExtraTooLong {
            index,
            len: extra_len,
        });
    }
    let rest = &buf[RECORD_LEN..];
    if rest.len() < name_len + extra_len {
        return Err(short);
    }
    let (name_bytes, rest) = rest.split_at(name_len);
    let (extra, rest) = rest.split_at(extra_len);
    let name = if name_len == 0 {
        None
    } else {
        match std::str::from_utf8(name_bytes) {
            Ok(s) if !s.contains('\0') => Some(s),
            _ => return Err(DecodeError::BadName { index }),
        }
    };
    Ok((
        Record {
            kind,
            name,
            value,
            extra,
        },
        rest,
    ))
}

/// Checks a name a caller wants to send: what [`decode`] would refuse must
/// never be sent.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("a name must not be empty (use no name instead)");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("a name is at most 255 bytes of UTF-8");
    }
    if name.contains('\0') {
        return Err("a name must not contain NUL");
    }
    Ok(())
}

// Record kind codes. Part of the wire format: never renumber.
const KIND_OTHER: u8 = 0;
const KIND_SOCKET: u8 = 1;
const KIND_FILE: u8 = 2;
const KIND_PIPE: u8 = 3;
const KIND_SHARED_MEMORY: u8 = 4;
const KIND_DIRECTORY: u8 = 5;
const KIND_CHAR_DEVICE: u8 = 6;
/// The highest kind code.
const KIND_MAX: u8 = KIND_CHAR_DEVICE;

const RECORD_FLAG_LISTENING: u8 = 1 << 0;

#[inline]
fn kind_to_wire(kind: HandleKind) -> [u8; 4] {
    match kind {
        HandleKind::Other => [KIND_OTHER, 0, 0, 0],
        HandleKind::File => [KIND_FILE, 0, 0, 0],
        HandleKind::Pipe => [KIND_PIPE, 0, 0, 0],
        HandleKind::SharedMemory => [KIND_SHARED_MEMORY, 0, 0, 0],
        HandleKind::Directory => [KIND_DIRECTORY, 0, 0, 0],
        HandleKind::CharDevice => [KIND_CHAR_DEVICE, 0, 0, 0],
        HandleKind::Socket(info) => {
            let family = match info.family {
                SocketFamily::Other => 0,
                SocketFamily::Unix => 1,
                SocketFamily::Ipv4 => 2,
                SocketFamily::Ipv6 => 3,
            };
            let socket_type = match info.socket_type {
                SocketType::Other => 0,
                SocketType::Stream => 1,
                SocketType::Datagram => 2,
                SocketType::SeqPacket => 3,
            };
            let flags = if info.listening {
                RECORD_FLAG_LISTENING
            } else {
                0
            };
            [KIND_SOCKET, family, socket_type, flags]
        }
    }
}

fn kind_from_wire(
    index: usize,
    kind: u8,
    family: u8,
    socket_type: u8,
    flags: u8,
) -> Result<HandleKind, DecodeError> {
    let bad = |field, value| DecodeError::BadRecordField {
        index,
        field,
        value,
    };
    let plain = |k: HandleKind| {
        if family != 0 || socket_type != 0 || flags != 0 {
            Err(DecodeError::RecordReserved { index })
        } else {
            Ok(k)
        }
    };
    match kind {
        KIND_OTHER => plain(HandleKind::Other),
        KIND_FILE => plain(HandleKind::File),
        KIND_PIPE => plain(HandleKind::Pipe),
        KIND_SHARED_MEMORY => plain(HandleKind::SharedMemory),
        KIND_DIRECTORY => plain(HandleKind::Directory),
        KIND_CHAR_DEVICE => plain(HandleKind::CharDevice),
        KIND_SOCKET => {
            let family = match family {
                0 => SocketFamily::Other,
                1 => SocketFamily::Unix,
                2 => SocketFamily::Ipv4,
                3 => SocketFamily::Ipv6,
                v => return Err(bad("family", v)),
            };
            let socket_type = match socket_type {
                0 => SocketType::Other,
                1 => SocketType::Stream,
                2 => SocketType::Datagram,
                3 => SocketType::SeqPacket,
                v => return Err(bad("socket type", v)),
            };
            if flags & !RECORD_FLAG_LISTENING != 0 {
                return Err(DecodeError::RecordReserved { index });
            }
            Ok(HandleKind::Socket(SocketInfo {
                family,
                socket_type,
                listening: flags & RECORD_FLAG_LISTENING != 0,
            }))
        }
        v => Err(bad("kind", v)),
    }
}

/// A handle kind as it travels: a record's four code bytes (kind, family,
/// socket type, record flags) as one little-endian word. It only ever holds
/// a combination that [`decode`] accepts, being made either from a
/// [`HandleKind`] or from a record that passed, so a [`crate::Handle`] keeps
/// its kind in this form and neither sending nor receiving converts it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct KindCodes(u32);

impl KindCodes {
    /// [`HandleKind::Other`].
    pub(crate) const OTHER: KindCodes = KindCodes(KIND_OTHER as u32);

    pub(crate) fn of(kind: HandleKind) -> KindCodes {
        KindCodes(u32::from_le_bytes(kind_to_wire(kind)))
    }

    /// The kind these codes stand for.
    #[inline]
    pub(crate) fn kind(self) -> HandleKind {
        kind_from_checked_codes(self.0)
    }
}

impl std::fmt::Debug for KindCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.kind().fmt(f)
    }
}

/// The kind of a record whose codes [`Fixed::is_valid`] accepted, by table.
/// Total, so that it cannot panic, but meaningful only for accepted codes.
#[inline]
fn kind_from_checked_codes(codes: u32) -> HandleKind {
    // Kinds other than socket, by kind code (1, the socket, is not used).
    const PLAIN: [HandleKind; 8] = [
        HandleKind::Other,
        HandleKind::Other,
        HandleKind::File,
        HandleKind::Pipe,
        HandleKind::SharedMemory,
        HandleKind::Directory,
        HandleKind::CharDevice,
        HandleKind::Other,
    ];
    // Sockets, by family | socket type << 2 | listening << 4.
    const SOCKETS: [HandleKind; 32] = {
        const FAMILIES: [SocketFamily; 4] = [
            SocketFamily::Other,
            SocketFamily::Unix,
            SocketFamily::Ipv4,
            SocketFamily::Ipv6,
        ];
        const TYPES: [SocketType; 4] = [
            SocketType::Other,
            SocketType::Stream,
            SocketType::Datagram,
            SocketType::SeqPacket,
        ];
        let mut table = [HandleKind::Other; 32];
        let mut i = 0;
        while i < table.len() {
            table[i] = HandleKind::Socket(SocketInfo {
                family: FAMILIES[i & 3],
                socket_type: TYPES[(i >> 2) & 3],
                listening: i & 16 != 0,
            });
            i += 1;
        }
        table
    };
    if codes as u8 == KIND_SOCKET {
        let family = (codes >> 8) & 0b11;
        let socket_type = (codes >> 14) & 0b1100;
        let listening = (codes >> 20) & 0b1_0000;
        SOCKETS[(family | socket_type | listening) as usize]
    } else {
        PLAIN[(codes & 7) as usize]
    }
}

#[inline]
fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

#[inline]
fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// How a message is cut into frames: which handles and which payload bytes
/// each frame carries. Pure arithmetic, shared by every transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpan {
    pub handles: std::ops::Range<usize>,
    pub bytes: std::ops::Range<usize>,
}

/// Splits a message into frames that each respect [`MAX_FRAME_HANDLES`] and
/// [`MAX_FRAME_LEN`]. `record_len(i)` is the encoded size of record `i`.
/// Always yields at least one frame, so an empty message is one frame.
pub fn plan_frames(
    handle_count: usize,
    byte_count: usize,
    record_len: impl Fn(usize) -> usize,
) -> Vec<FrameSpan> {
    let mut spans = Vec::new();
    let (mut h, mut b) = (0, 0);
    loop {
        let mut room = MAX_FRAME_LEN - HEADER_LEN;
        let h_start = h;
        while h < handle_count && h - h_start < MAX_FRAME_HANDLES && record_len(h) <= room {
            room -= record_len(h);
            h += 1;
        }
        let b_start = b;
        b += room.min(byte_count - b);
        spans.push(FrameSpan {
            handles: h_start..h,
            bytes: b_start..b,
        });
        if h == handle_count && b == byte_count {
            return spans;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(header: FrameHeader, records: &[Record<'_>], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        header.encode(&mut out);
        for r in records {
            r.encode(&mut out);
        }
        out.extend_from_slice(payload);
        out
    }

    fn header(frame_handles: u32, frame_bytes: u32) -> FrameHeader {
        FrameHeader {
            flags: FLAG_FIRST | FLAG_LAST,
            seq: 7,
            total_handles: frame_handles,
            total_bytes: frame_bytes,
            frame_handles,
            frame_bytes,
        }
    }

    #[test]
    fn ack_frames() {
        let ack = encode_ack(7, 3);
        assert_eq!(decode_ack(&ack), Some((7, 3)));
        assert_eq!(decode(&ack).unwrap_err(), DecodeError::FrameType(FRAME_ACK));
        assert_eq!(decode_ack(&ack[..27]), None);
        let mut longer = ack.to_vec();
        longer.push(0);
        assert_eq!(decode_ack(&longer), None);
        let mut flagged = ack;
        flagged[6] = 1;
        assert_eq!(decode_ack(&flagged), None);
    }

    #[test]
    fn round_trip() {
        let listener = HandleKind::Socket(SocketInfo {
            family: SocketFamily::Ipv6,
            socket_type: SocketType::Stream,
            listening: true,
        });
        let records = [
            Record {
                kind: listener,
                name: Some("http"),
                value: 0,
                extra: &[],
            },
            Record {
                kind: HandleKind::Pipe,
                name: None,
                value: 0x1234,
                extra: b"xyz",
            },
        ];
        let bytes = frame(header(2, 5), &records, b"hello");
        assert_eq!(bytes.len(), HEADER_LEN + 2 * RECORD_LEN + 4 + 3 + 5);
        let f = decode(&bytes).unwrap();
        assert_eq!(f.header, header(2, 5));
        assert_eq!(f.records().collect::<Vec<_>>(), records);
        assert_eq!(f.payload, b"hello");
    }

    #[test]
    fn header_bytes_are_fixed_little_endian() {
        let mut out = Vec::new();
        FrameHeader {
            flags: FLAG_FIRST,
            seq: 0x0403_0201,
            total_handles: 2,
            total_bytes: 0x100,
            frame_handles: 1,
            frame_bytes: 3,
        }
        .encode(&mut out);
        assert_eq!(
            out,
            [
                b'H', b'N', b'D', b'V', 1, 1, 1, 0, 1, 2, 3, 4, 2, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0,
                3, 0, 0, 0
            ]
        );
    }

    #[test]
    fn rejects_each_broken_rule() {
        let good = frame(header(0, 2), &[], b"hi");
        let mutate = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            decode(&b).unwrap_err()
        };
        assert!(matches!(mutate(0, b'X'), DecodeError::BadMagic(_)));
        assert_eq!(mutate(4, 2), DecodeError::Version(2));
        assert_eq!(mutate(5, 9), DecodeError::FrameType(9));
        assert_eq!(mutate(7, 1), DecodeError::Flags(0x0103));
        assert_eq!(
            mutate(24, 3),
            DecodeError::PayloadLength {
                announced: 3,
                actual: 2
            }
        );
        assert_eq!(mutate(20, 254), DecodeError::TooManyFrameHandles(254));
        assert_eq!(mutate(20, 1), DecodeError::ShortRecord { index: 0 });
        assert_eq!(
            decode(&good[..10]).unwrap_err(),
            DecodeError::ShortHeader(10)
        );
    }

    #[test]
    fn rejects_bad_records() {
        let rec = Record {
            kind: HandleKind::File,
            name: Some("ab"),
            value: 0,
            extra: &[],
        };
        let good = frame(header(1, 0), &[rec], b"");
        let mutate = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            decode(&b).unwrap_err()
        };
        let r = HEADER_LEN;
        assert!(matches!(
            mutate(r, 99),
            DecodeError::BadRecordField { field: "kind", .. }
        ));
        assert_eq!(mutate(r + 1, 1), DecodeError::RecordReserved { index: 0 });
        assert_eq!(mutate(r + 12, 1), DecodeError::RecordReserved { index: 0 });
        assert_eq!(mutate(r + 16, 0), DecodeError::BadName { index: 0 });
        assert_eq!(mutate(r + 16, 0xff), DecodeError::BadName { index: 0 });
        assert_eq!(mutate(r + 4, 3), DecodeError::ShortRecord { index: 0 });
    }

    #[test]
    fn decode_never_panics_on_noise() {
        // A small xorshift keeps this deterministic and dependency-free.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = frame(
            header(1, 3),
            &[Record {
                kind: HandleKind::Other,
                name: Some("n"),
                value: 0,
                extra: &[],
            }],
            b"abc",
        );
        for _ in 0..200_000 {
            let mut b = seed.clone();
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            let _ = decode(&b);
        }
    }

    /// The plain record-by-record decoder, which every fast path of
    /// [`decode`] and [`Records`] must agree with.
    fn decode_slowly(buf: &[u8]) -> Result<(FrameHeader, Vec<Record<'_>>, &[u8]), DecodeError> {
        if buf.len() > MAX_FRAME_LEN {
            return Err(DecodeError::FrameTooLong(buf.len()));
        }
        let header = decode_header(buf)?;
        let mut rest = &buf[HEADER_LEN..];
        let mut records = Vec::new();
        for index in 0..header.frame_handles as usize {
            let (record, after) = decode_record(rest, index)?;
            records.push(record);
            rest = after;
        }
        if rest.len() != header.frame_bytes as usize {
            return Err(DecodeError::PayloadLength {
                announced: header.frame_bytes,
                actual: rest.len(),
            });
        }
        Ok((header, records, rest))
    }

    fn decode_fully(buf: &[u8]) -> Result<(FrameHeader, Vec<Record<'_>>, &[u8]), DecodeError> {
        let f = decode(buf)?;
        let records: Vec<Record<'_>> = f.records().collect();
        assert_eq!(records.len(), f.header.frame_handles as usize);
        let mut codes = f.records();
        for r in &records {
            let (kind, name) = codes.next_codes().unwrap();
            assert_eq!((kind.kind(), name), (r.kind, r.name));
        }
        if let Some(kinds) = f.fixed_only_kinds() {
            let kinds: Vec<HandleKind> = kinds.map(KindCodes::kind).collect();
            assert_eq!(kinds, records.iter().map(|r| r.kind).collect::<Vec<_>>());
            assert!(records
                .iter()
                .all(|r| r.name.is_none() && r.extra.is_empty()));
        }
        Ok((f.header, records, f.payload))
    }

    #[test]
    fn fast_paths_agree_with_the_record_by_record_decoder() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let socket = |family, socket_type, listening| {
            HandleKind::Socket(SocketInfo {
                family,
                socket_type,
                listening,
            })
        };
        let unnamed = |kind| Record {
            kind,
            name: None,
            value: 0,
            extra: &[],
        };
        let fixed_only = frame(
            header(4, 2),
            &[
                unnamed(socket(SocketFamily::Ipv6, SocketType::Stream, true)),
                unnamed(HandleKind::File),
                unnamed(socket(SocketFamily::Unix, SocketType::SeqPacket, false)),
                unnamed(HandleKind::Other),
            ],
            b"hi",
        );
        let named = frame(
            header(2, 1),
            &[
                Record {
                    kind: HandleKind::Pipe,
                    name: Some("nm"),
                    value: 0,
                    extra: &[],
                },
                Record {
                    kind: HandleKind::CharDevice,
                    name: None,
                    value: 0,
                    extra: b"x",
                },
            ],
            b"!",
        );
        for seed in [&fixed_only, &named] {
            assert!(decode_fully(seed).is_ok());
            for _ in 0..100_000 {
                let mut b = seed.clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() as usize) % b.len();
                    // Small values often, so that other valid codes and
                    // lengths come up, not only garbage.
                    b[at] = if next() % 2 == 0 {
                        (next() % 8) as u8
                    } else {
                        next() as u8
                    };
                }
                if next() % 8 == 0 {
                    b.truncate((next() as usize) % (b.len() + 1));
                }
                assert_eq!(decode_fully(&b), decode_slowly(&b), "{b:02x?}");
            }
        }
    }

    #[test]
    fn code_checks_match_kind_from_wire() {
        for kind in 0..=255u8 {
            for family in 0..=255u8 {
                for socket_type in [0, 1, 2, 3, 4, 7, 0x80, 0xff] {
                    for flags in [0, 1, 2, 3, 0x80, 0x81, 0xff] {
                        let codes = u32::from_le_bytes([kind, family, socket_type, flags]);
                        let slow = kind_from_wire(0, kind, family, socket_type, flags).ok();
                        assert_eq!(codes_are_valid(codes), slow.is_some(), "{codes:#010x}");
                        if let Some(k) = slow {
                            assert_eq!(kind_from_checked_codes(codes), k);
                            assert_eq!(KindCodes::of(k), KindCodes(codes));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn plan_respects_both_limits() {
        let spans = plan_frames(1000, 10, |_| RECORD_LEN);
        assert_eq!(spans.len(), 4);
        assert_eq!(spans[0].handles, 0..253);
        assert_eq!(spans[3].handles, 759..1000);
        assert_eq!(spans.iter().map(|s| s.bytes.len()).sum::<usize>(), 10);

        let spans = plan_frames(0, 200_000, |_| 0);
        assert_eq!(spans.len(), 4);
        assert!(spans
            .iter()
            .all(|s| HEADER_LEN + s.bytes.len() <= MAX_FRAME_LEN));

        // Long names push records into a second frame before 253 is reached.
        let spans = plan_frames(253, 0, |_| RECORD_LEN + 255);
        assert_eq!(spans.len(), 2);
        assert!(spans
            .iter()
            .all(|s| HEADER_LEN + s.handles.len() * (RECORD_LEN + 255) <= MAX_FRAME_LEN));

        assert_eq!(plan_frames(0, 0, |_| 0).len(), 1);
    }
}
