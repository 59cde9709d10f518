//! Naming a fresh connection from its first bytes: the server name of a TLS
//! ClientHello (SNI) or the Host of an HTTP/1 request head.
//!
//! Pure code: the dispatcher peeks (MSG_PEEK) at a connection it accepted
//! and calls these functions again each time more bytes arrived, so they
//! take the whole prefix seen so far, consume nothing, keep no state, and
//! answer [`Peek::NeedMore`] until the bytes decide. None of them panics on
//! any input, reads past a length the data gives, or allocates more than
//! the input's size, because the input comes from anyone who can connect.
//!
//! A verdict, once given, does not change when more bytes follow: a hello
//! is judged once its whole handshake message is there, and a request once
//! its whole head is, so what comes after (more records, a body) is never
//! looked at. Malformed data is [`Peek::Invalid`] as soon as a complete
//! part of it is wrong, so that garbage does not hold the dispatcher until
//! its limit.
//!
//! Names are given as routes compare them: ASCII lower case, without the
//! trailing dot of a fully qualified name, made of letters, digits, `-`
//! and `_` in dot-separated labels of 1 to 63 bytes (253 in all); an
//! IPv6 literal from a Host is given without its brackets, in RFC 5952
//! canonical text. Anything else
//! (percent-encoding, other URI sub-delimiters, non-ASCII bytes) is
//! Invalid rather than guessed at, since a route could only ever match
//! such a name by accident.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The name was found (lower-cased, without a trailing dot; for Host,
    /// without the port, and an IPv6 literal without its brackets and in
    /// its canonical text: `[::1]:8080` and `[0:0::01]` give `::1`).
    Name(String),
    /// More bytes are needed to decide.
    NeedMore,
    /// This protocol, but no name in it (a ClientHello without SNI; an
    /// HTTP/1 request without Host, or with an empty one).
    NoName,
    /// Not this protocol, or malformed.
    Invalid,
}

// ---------------------------------------------------------------- TLS --

/// TLS record content type of handshake messages (RFC 8446 §5.1).
const RECORD_HANDSHAKE: u8 = 22;
/// Record header: type (1), legacy_record_version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Largest plaintext fragment a record may carry (RFC 8446 §5.1: 2^14).
const MAX_FRAGMENT_LEN: usize = 1 << 14;
/// Handshake message type of a ClientHello (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Handshake header: msg_type (1), length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Extension type of server_name (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// NameType of a host_name in a ServerNameList (RFC 6066 §3).
const NAME_TYPE_HOST_NAME: u8 = 0;

/// TLS: a ClientHello's server_name (RFC 6066 host_name), across several
/// TLS records if the handshake message is fragmented (record type 22,
/// handshake type 1).
///
/// NeedMore until the whole ClientHello is there; then the whole message
/// is checked, not just the path to the extension, so that a hello the
/// server would refuse as malformed is Invalid here too. Records after the
/// one that completes the hello are not looked at.
pub fn tls_sni(buf: &[u8]) -> Peek {
    match client_hello(buf) {
        Ok(body) => match parse_client_hello(&body) {
            Ok(Some(name)) => Peek::Name(name),
            Ok(None) => Peek::NoName,
            Err(Malformed) => Peek::Invalid,
        },
        Err(verdict) => verdict,
    }
}

/// Which of the two parsers to try for these first bytes: a TLS handshake
/// record (`0x16 0x03 ..`) or anything else. One byte is enough to choose
/// (no HTTP method starts with 0x16), and an empty buffer is not TLS; the
/// chosen parser then says whether the rest agrees.
pub fn looks_like_tls(buf: &[u8]) -> bool {
    match buf {
        [] => false,
        [first] => *first == RECORD_HANDSHAKE,
        [first, major, ..] => *first == RECORD_HANDSHAKE && *major == 3,
    }
}

/// The one error of the parsers below: the data is not what it claims.
#[derive(Debug)]
struct Malformed;

/// One record at the start of `buf`, as far as it goes.
enum Record<'a> {
    /// A whole record: its fragment, and the bytes after it.
    Whole(&'a [u8], &'a [u8]),
    /// A sound header (or the start of one) whose fragment is not all
    /// there yet: the part of the fragment that is.
    Partial(&'a [u8]),
    /// Not a handshake record, or a length no sender may use.
    Bad,
}

fn next_record(buf: &[u8]) -> Record<'_> {
    // Check each header byte as soon as it is there, so that a stream that
    // is not TLS is refused at its first byte rather than at its fifth.
    if buf.first().is_some_and(|&t| t != RECORD_HANDSHAKE) {
        return Record::Bad;
    }
    // Every TLS version's records say major version 3; the minor one
    // varies (the first ClientHello often says 0x0301) and is not checked.
    if buf.get(1).is_some_and(|&major| major != 3) {
        return Record::Bad;
    }
    let Some(header) = buf.get(..RECORD_HEADER_LEN) else {
        return Record::Partial(&[]);
    };
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    // Zero-length handshake fragments and fragments over 2^14 are
    // forbidden (RFC 8446 §5.1); refusing them also bounds the number of
    // records a hello can take to its length.
    if len == 0 || len > MAX_FRAGMENT_LEN {
        return Record::Bad;
    }
    let rest = &buf[RECORD_HEADER_LEN..];
    match (rest.get(..len), rest.get(len..)) {
        (Some(fragment), Some(after)) => Record::Whole(fragment, after),
        _ => Record::Partial(rest),
    }
}

/// The body of the ClientHello (after its 4-byte handshake header),
/// reassembled from as many handshake records as it spans: borrowed when
/// one record holds it, else copied once it is complete, into a buffer the
/// size of the message, which is never more than the input.
fn client_hello(buf: &[u8]) -> Result<Cow<'_, [u8]>, Peek> {
    // The handshake header may itself be split across records, so its
    // bytes are gathered here as the fragments go by.
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut seen = 0usize; // fragment bytes in whole records so far
    let mut rest = buf;
    let mut first_fragment: Option<&[u8]> = None;
    let end = loop {
        let (fragment, whole, after) = match next_record(rest) {
            Record::Whole(fragment, after) => (fragment, true, after),
            Record::Partial(fragment) => (fragment, false, &[][..]),
            Record::Bad => return Err(Peek::Invalid),
        };
        // Fill the header from this fragment, even a partial one, so that
        // a message that is not a ClientHello is refused early.
        let mut at = seen;
        for &byte in fragment {
            if at >= HANDSHAKE_HEADER_LEN {
                break;
            }
            header[at] = byte;
            at += 1;
        }
        if at > 0 && header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(Peek::Invalid);
        }
        if !whole {
            return Err(Peek::NeedMore);
        }
        first_fragment.get_or_insert(fragment);
        seen += fragment.len();
        rest = after;
        if seen >= HANDSHAKE_HEADER_LEN {
            let body_len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            let end = HANDSHAKE_HEADER_LEN + body_len;
            if seen >= end {
                break end;
            }
        }
    };
    if let Some(body) = first_fragment.and_then(|f| f.get(HANDSHAKE_HEADER_LEN..end)) {
        return Ok(Cow::Borrowed(body));
    }
    // Walk the same records again, now known to be whole and sound, and
    // copy the message's bytes out of them.
    let mut message = Vec::with_capacity(end);
    let mut rest = buf;
    while message.len() < end {
        let Record::Whole(fragment, after) = next_record(rest) else {
            // Unreachable: the first walk saw these records whole.
            return Err(Peek::Invalid);
        };
        let wanted = (end - message.len()).min(fragment.len());
        message.extend_from_slice(&fragment[..wanted]);
        rest = after;
    }
    message.drain(..HANDSHAKE_HEADER_LEN);
    Ok(Cow::Owned(message))
}

/// A reader over a slice that fails rather than reading past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (taken, rest) = self.rest.split_at_checked(n).ok_or(Malformed)?;
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 1-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a 2-byte length prefix.
    fn vec16(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// The host_name of a ClientHello's body (RFC 8446 §4.1.2, which TLS 1.0
/// to 1.2 hellos also fit), None if it has no server_name extension or no
/// host_name in it.
fn parse_client_hello(body: &[u8]) -> Result<Option<String>, Malformed> {
    let mut r = Reader::new(body);
    let [major, _minor] = r.take(2)?.try_into().map_err(|_| Malformed)?;
    if major != 3 {
        return Err(Malformed);
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(Malformed); // legacy_session_id<0..32>
    }
    let suites = r.vec16()?;
    if suites.len() < 2 || suites.len() % 2 != 0 {
        return Err(Malformed); // cipher_suites<2..2^16-2>, two bytes each
    }
    if r.vec8()?.is_empty() {
        return Err(Malformed); // legacy_compression_methods<1..2^8-1>
    }
    // Before TLS 1.2 the extensions could be left out altogether.
    if r.is_empty() {
        return Ok(None);
    }
    let extensions = r.vec16()?;
    // The extensions end the message; anything after them is malformed.
    if !r.is_empty() {
        return Err(Malformed);
    }
    let mut extensions = Reader::new(extensions);
    let mut server_name: Option<Option<String>> = None;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == EXT_SERVER_NAME {
            // Two server_name extensions could name two servers; RFC 8446
            // §4.2 forbids repeating an extension, and so does this.
            if server_name.is_some() {
                return Err(Malformed);
            }
            server_name = Some(parse_server_name(data)?);
        }
    }
    Ok(server_name.flatten())
}

/// The host_name of a server_name extension's data (RFC 6066 §3).
fn parse_server_name(data: &[u8]) -> Result<Option<String>, Malformed> {
    let mut r = Reader::new(data);
    let list = r.vec16()?;
    if list.is_empty() || !r.is_empty() {
        return Err(Malformed); // server_name_list<1..2^16-1>, alone
    }
    let mut list = Reader::new(list);
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        // RFC 6066 defines only host_name; other types are read with the
        // same opaque<1..2^16-1> shape (as RFC 3546 had it) and skipped.
        let name = list.vec16()?;
        if name.is_empty() {
            return Err(Malformed);
        }
        if name_type == NAME_TYPE_HOST_NAME {
            // "MUST NOT contain more than one name of the same name_type."
            if host_name.is_some() {
                return Err(Malformed);
            }
            host_name = Some(dns_name(name)?);
        }
    }
    Ok(host_name)
}

/// A host name as routes compare it: lower case, without the trailing
/// dot, each label 1 to 63 bytes of letters, digits, `-` or `_`
/// (underscores are not in DNS host names, but do occur in SNI and Host
/// and harm nothing here), 253 bytes in all.
fn dns_name(name: &[u8]) -> Result<String, Malformed> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(Malformed);
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 {
            return Err(Malformed);
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Malformed);
        }
    }
    // All ASCII, checked above, so this never replaces anything.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

// --------------------------------------------------------------- HTTP --

/// HTTP/1.x: the Host of the request head (RFC 9112), or the authority of
/// an absolute-form target, which wins over Host (RFC 9112 §3.2.2).
///
/// The request line must be `METHOD SP target SP HTTP/1.d`, with single
/// spaces; header names are matched without regard to case; the head ends
/// at its empty line, and NeedMore is the answer until then. Lines end in
/// CRLF, and a bare LF is accepted as a line end too (RFC 9112 §2.2 allows
/// it): a backend that is stricter refuses such a request itself, while
/// one that accepts it reads the same lines as this parser, so the two can
/// never see different Host headers. A bare CR anywhere, whitespace before
/// the first header or before a colon, and obs-fold continuation lines
/// are Invalid, as RFC 9112 §2.2, §5.1 and §5.2 let a server do, because
/// other parsers disagree about them. Two Host headers are Invalid
/// (RFC 9112 §3.2), even next to an absolute-form target. No Host, or an
/// empty one, is NoName for HTTP/1.0 and HTTP/1.1 alike: the dispatcher,
/// not this parser, decides what an unnamed request gets. Leading empty
/// lines are Invalid: a fresh connection has no previous message for them
/// to trail.
pub fn http_host(buf: &[u8]) -> Peek {
    match parse_head(buf) {
        Ok(Some(name)) => Peek::Name(name),
        Ok(None) => Peek::NoName,
        Err(Incomplete::NeedMore) => Peek::NeedMore,
        Err(Incomplete::Invalid) => Peek::Invalid,
    }
}

/// Why `parse_head` gave no answer.
enum Incomplete {
    NeedMore,
    Invalid,
}

impl From<Malformed> for Incomplete {
    fn from(_: Malformed) -> Self {
        Incomplete::Invalid
    }
}

/// One line at the start of `buf`.
enum Line<'a> {
    /// A whole line without its line end, and the bytes after it.
    Whole(&'a [u8], &'a [u8]),
    /// The start of a line, up to the end of the input (a CR that ends
    /// the input may be the first half of a CRLF and is left in).
    Partial(&'a [u8]),
}

fn next_line(buf: &[u8]) -> Result<Line<'_>, Malformed> {
    let (line, after, whole) = match buf.iter().position(|&b| b == b'\n') {
        Some(lf) => (&buf[..lf], &buf[lf + 1..], true),
        None => (buf, &[][..], false),
    };
    // A CR is allowed only right before the LF (or, until that arrives,
    // as the last byte seen).
    let content = line.strip_suffix(b"\r").unwrap_or(line);
    if content.contains(&b'\r') {
        return Err(Malformed);
    }
    Ok(if whole {
        Line::Whole(content, after)
    } else {
        Line::Partial(line)
    })
}

/// The name from a request head: Ok(None) for none, NeedMore while the
/// head is incomplete and nothing in it is wrong yet.
fn parse_head(buf: &[u8]) -> Result<Option<String>, Incomplete> {
    let (request_line, mut rest) = match next_line(buf)? {
        Line::Whole(line, after) => (line, after),
        Line::Partial(line) => {
            return Err(match line.strip_suffix(b"\r") {
                // The line's content is all there, only its LF is not.
                Some(line) if parse_request_line(line).is_err() => Incomplete::Invalid,
                Some(_) => Incomplete::NeedMore,
                None if request_line_prefix(line) => Incomplete::NeedMore,
                None => Incomplete::Invalid,
            });
        }
    };
    let target_authority = parse_request_line(request_line)?;
    let mut host: Option<&[u8]> = None;
    loop {
        let line = match next_line(rest)? {
            Line::Whole(line, after) => {
                rest = after;
                line
            }
            Line::Partial(line) => {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                return Err(if field_line_prefix(line) {
                    Incomplete::NeedMore
                } else {
                    Incomplete::Invalid
                });
            }
        };
        if line.is_empty() {
            break; // the end of the head
        }
        let (name, value) = parse_field_line(line)?;
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err(Incomplete::Invalid);
            }
            host = Some(value);
        }
    }
    // A malformed Host is refused even when the target's authority is the
    // one used: a server must answer it with 400 (RFC 9112 §3.2).
    let host = match host {
        Some(value) => parse_authority(value)?,
        None => None,
    };
    match target_authority {
        Some(authority) => Ok(parse_authority(authority)?),
        None => Ok(host),
    }
}

/// tchar (RFC 9110 §5.6.2): what methods and header names are made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte of a request target: anything visible. Bytes over 0x7F are not
/// in the URI grammar but are sent raw by some clients in paths, which
/// do not matter here; an authority is checked on its own, strictly.
fn is_target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

const VERSION_PREFIX: &[u8] = b"HTTP/1.";

/// A whole request line's target authority, if its target is in absolute
/// form (`scheme://authority...`).
fn parse_request_line(line: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed);
    };
    let method_ok = !method.is_empty() && method.iter().all(|&b| is_tchar(b));
    let target_ok = !target.is_empty() && target.iter().all(|&b| is_target_byte(b));
    let version_ok = version.len() == VERSION_PREFIX.len() + 1
        && version.starts_with(VERSION_PREFIX)
        && version[VERSION_PREFIX.len()].is_ascii_digit();
    if !(method_ok && target_ok && version_ok) {
        return Err(Malformed);
    }
    Ok(absolute_form_authority(target))
}

/// Whether `line` (no line end yet) can still grow into a request line.
fn request_line_prefix(line: &[u8]) -> bool {
    let method_len = line.iter().take_while(|&&b| is_tchar(b)).count();
    let Some(after_method) = line.get(method_len..).filter(|r| !r.is_empty()) else {
        return true; // only method bytes so far, or nothing
    };
    if method_len == 0 || after_method[0] != b' ' {
        return false;
    }
    let rest = &after_method[1..];
    let target_len = rest.iter().take_while(|&&b| is_target_byte(b)).count();
    let Some(after_target) = rest.get(target_len..).filter(|r| !r.is_empty()) else {
        return true;
    };
    if target_len == 0 || after_target[0] != b' ' {
        return false;
    }
    let version = &after_target[1..];
    match version.get(VERSION_PREFIX.len()..) {
        None => VERSION_PREFIX.starts_with(version),
        Some(digit) => {
            version.starts_with(VERSION_PREFIX)
                && digit.len() <= 1
                && digit.iter().all(u8::is_ascii_digit)
        }
    }
}

/// The authority of an absolute-form target: after `scheme://`, up to the
/// path, query or fragment. Any scheme counts; a target without `://`
/// after a scheme is origin-, asterisk- or authority-form (CONNECT's
/// `host:port`, whose Host header names the same thing), none of which
/// overrides Host.
fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let scheme_len = target
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        .count();
    if scheme_len == 0 || !target[0].is_ascii_alphabetic() {
        return None;
    }
    let after = target[scheme_len..].strip_prefix(b"://")?;
    let len = after
        .iter()
        .position(|&b| b"/?#".contains(&b))
        .unwrap_or(after.len());
    Some(&after[..len])
}

/// A whole header line's name and value (without surrounding whitespace).
fn parse_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let colon = line.iter().position(|&b| b == b':').ok_or(Malformed)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // An empty name also covers obs-fold and whitespace before a colon,
    // since neither SP nor HTAB is a tchar.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Malformed);
    }
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(Malformed);
    }
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    Ok((name, &value[start..end]))
}

/// Whether `line` (no line end yet) can still grow into a header line.
fn field_line_prefix(line: &[u8]) -> bool {
    if line.contains(&b':') {
        // The name is whole; the value may still grow.
        parse_field_line(line).is_ok()
    } else {
        line.iter().all(|&b| is_tchar(b))
    }
}

/// A byte of a field value (RFC 9110 §5.5): visible, obs-text, SP, HTAB.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

/// The host of an authority, `host[:port]` (RFC 3986 §3.2, without
/// userinfo, which RFC 9110 §4.2.4 deprecates): Ok(None) when empty.
fn parse_authority(authority: &[u8]) -> Result<Option<String>, Malformed> {
    if authority.is_empty() {
        return Ok(None);
    }
    let (host, port) = if let Some(literal) = authority.strip_prefix(b"[") {
        let close = literal.iter().position(|&b| b == b']').ok_or(Malformed)?;
        let (address, after) = (&literal[..close], &literal[close + 1..]);
        // An IPv6 address, given in its canonical text (RFC 5952: lower
        // case, zeros compressed) so that every spelling of one address
        // meets the same route. IPvFuture and zone identifiers are refused.
        let address = std::str::from_utf8(address).map_err(|_| Malformed)?;
        let address: Ipv6Addr = address.parse().map_err(|_| Malformed)?;
        (Some(address.to_string()), after)
    } else {
        let colon = authority.iter().position(|&b| b == b':');
        let (host, after) = authority.split_at(colon.unwrap_or(authority.len()));
        (Some(dns_name(host)?), after)
    };
    match port {
        [] => {}
        [b':', digits @ ..] => {
            // port = *DIGIT; an empty port is allowed, a big one is not.
            let ok = digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
                    <= 65535;
            if !ok {
                return Err(Malformed);
            }
        }
        _ => return Err(Malformed),
    }
    Ok(host)
}

// ------------------------------------------------------------- routes --

/// Whether `name` matches a route pattern: exact (without regard to ASCII
/// case), a leading `*.` wildcard standing for one or more labels
/// (`*.example.com` matches `a.example.com` and `a.b.example.com` but not
/// `example.com`), or `*` alone, which matches everything. A trailing dot
/// on either side is ignored, so that a pattern written as a fully
/// qualified name still matches. A `*` anywhere else is an ordinary
/// character, which no name from this module contains.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    // Bytes, not str slices: an index inside a multi-byte character would
    // panic, and these strings come from configuration and peers.
    let pattern = pattern.as_bytes();
    let name = name.as_bytes();
    let pattern = pattern.strip_suffix(b".").unwrap_or(pattern);
    let name = name.strip_suffix(b".").unwrap_or(name);
    match pattern.strip_prefix(b"*") {
        Some(suffix) if suffix.starts_with(b".") => {
            let Some(split) = name.len().checked_sub(suffix.len()) else {
                return false;
            };
            let (labels, tail) = name.split_at(split);
            // The wildcard's part must be whole, non-empty labels.
            suffix.len() > 1
                && tail.eq_ignore_ascii_case(suffix)
                && !labels.is_empty()
                && !labels.starts_with(b".")
                && !labels.ends_with(b".")
                && !labels.windows(2).any(|w| w == b"..")
        }
        _ => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real ClientHellos, captured on Debian 12 (OpenSSL 3.0.19, curl 7.88.1)
    // by a python3 listener on 127.0.0.1 that accepted one connection,
    // read whatever arrived within one second and wrote it to a file:
    //
    //   s = socket.socket(); s.bind(("127.0.0.1", PORT)); s.listen(1)
    //   c, _ = s.accept(); c.settimeout(1.0); data = b""
    //   try:
    //       while (d := c.recv(65536)): data += d
    //   except socket.timeout: pass
    //   open(OUT, "wb").write(data)
    //
    // with the clients
    //
    //   openssl s_client -servername api.example.com -connect 127.0.0.1:PORT
    //   curl https://www.example.test:PORT/ --resolve www.example.test:PORT:127.0.0.1
    //   openssl s_client -noservername -connect 127.0.0.1:PORT
    //   curl http://www.example.test:PORT/path?q=1 --resolve www.example.test:PORT:127.0.0.1
    //   curl -0 -H 'Host:' http://127.0.0.1:PORT/
    //
    // and dumped with `xxd -p`. Each TLS capture is one record.

    /// `openssl s_client -servername api.example.com`: 321 bytes.
    const OPENSSL_HELLO: &str = "\
        160301013c010001380303b9c6993e5ef89aa7f8fe9a4033ffd8077f112d1773a451d3c9b391c6111169262062d710d7\
        0b4ae03becc6ee0a55fbc434c10baa2b5ab2c52594dd43c76860ca5a003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000b1\
        00000014001200000f6170692e6578616d706c652e636f6d000b000403000102000a00160014001d0017001e00190018\
        01000101010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b08040805\
        0806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d00\
        20fb20661744f5cbd9d03cc0cb1670926819a5e1efba029401558afd091cdbb55d";

    /// `curl https://www.example.test:PORT/`: 517 bytes (padded, with ALPN).
    const CURL_HELLO: &str = "\
        1603010200010001fc0303a17888edbc7b5c192cd962224a20acbbef2442ac806fa52e7c3ac8366cdb83c4202a2add20\
        cebe9734d59ad8353e01f2858cd39c1024209fa7eacb1eeef59d7759003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000175\
        0000001500130000107777772e6578616d706c652e74657374000b000403000102000a00160014001d0017001e001900\
        18010001010102010301040010000e000c02683208687474702f312e31001600000017000000310000000d002a002804\
        0305030603080708080809080a080b080408050806040105010601030303010302040205020602002b00090803040303\
        03020301002d00020101003300260024001d0020504abe32555f7ceb2ba50ee27dd837a772f7dfbc316f6ef01a9761aa\
        49133279001500ad00000000000000000000000000000000000000000000000000000000000000000000000000000000\
        000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        00000000000000000000000000000000000000000000000000000000000000000000000000";

    /// `openssl s_client -noservername`: 297 bytes, no server_name.
    const OPENSSL_HELLO_NO_SNI: &str = "\
        1603010124010001200303b8ad5c7368da3260d5c3021384d5cc0fd6c137a78ed07dd87cc2d37877808e70200f04d198\
        96ac1d04f61c0024c7634fc672f54fe517075364e757f5bff3affe24003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000099\
        000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d\
        002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009\
        080304030303020301002d00020101003300260024001d0020792fa19ac39c1923c6fd94c2b12e4434a67a04debd6186\
        3575f7f198aac6b327";

    /// `curl http://www.example.test:PORT/path?q=1`: the whole request.
    const CURL_REQUEST: &[u8] = b"GET /path?q=1 HTTP/1.1\r\nHost: www.example.test:47003\r\n\
        User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";

    /// `curl -0 -H 'Host:' http://127.0.0.1:PORT/`: HTTP/1.0 without Host.
    const CURL_REQUEST_10_NO_HOST: &[u8] =
        b"GET / HTTP/1.0\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";

    fn unhex(hex: &str) -> Vec<u8> {
        let digits: Vec<u8> = hex
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| (b as char).to_digit(16).unwrap() as u8)
            .collect();
        digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
    }

    fn name(s: &str) -> Peek {
        Peek::Name(s.to_owned())
    }

    /// The handshake message (header included) of a one-record capture.
    fn message_of(record: &[u8]) -> Vec<u8> {
        record[RECORD_HEADER_LEN..].to_vec()
    }

    /// `message` cut into handshake records of the given fragment sizes
    /// (the last takes what is left).
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        let mut sizes = sizes.iter();
        while !rest.is_empty() {
            let n = sizes.next().map_or(rest.len(), |&n| n.min(rest.len()));
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }

    fn vec16(data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    /// A server_name extension's data with these (name_type, name) entries.
    fn sni_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend(vec16(name));
        }
        vec16(&list)
    }

    /// A minimal ClientHello's body with these extensions (None: no
    /// extensions block at all).
    fn hello_body(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]); // random
        body.push(0); // session id
        body.extend(vec16(&[0x13, 0x01])); // cipher suites
        body.extend([1, 0]); // compression methods: null
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend(kind.to_be_bytes());
                block.extend(vec16(data));
            }
            body.extend(vec16(&block));
        }
        body
    }

    /// A handshake message of type `kind` with this body.
    fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = body.len() as u32;
        let mut out = vec![kind, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        out.extend_from_slice(body);
        out
    }

    /// A one-record ClientHello with these extensions.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        records(&handshake(1, &hello_body(Some(extensions))), &[])
    }

    fn hello_naming(host: &[u8]) -> Vec<u8> {
        hello(&[(EXT_SERVER_NAME, sni_data(&[(0, host)]))])
    }

    /// Every proper prefix is NeedMore, the whole input is `verdict`.
    fn assert_prefixes(parse: fn(&[u8]) -> Peek, input: &[u8], verdict: Peek) {
        for end in 0..input.len() {
            assert_eq!(
                parse(&input[..end]),
                Peek::NeedMore,
                "prefix of {end} bytes"
            );
        }
        assert_eq!(parse(input), verdict);
    }

    // ---------------------------------------------------------- TLS --

    #[test]
    fn captured_hellos() {
        assert_eq!(tls_sni(&unhex(OPENSSL_HELLO)), name("api.example.com"));
        assert_eq!(tls_sni(&unhex(CURL_HELLO)), name("www.example.test"));
        assert_eq!(tls_sni(&unhex(OPENSSL_HELLO_NO_SNI)), Peek::NoName);
        for capture in [OPENSSL_HELLO, CURL_HELLO, OPENSSL_HELLO_NO_SNI] {
            assert!(looks_like_tls(&unhex(capture)));
        }
    }

    #[test]
    fn every_prefix_of_a_captured_hello_needs_more() {
        assert_prefixes(tls_sni, &unhex(OPENSSL_HELLO), name("api.example.com"));
        assert_prefixes(tls_sni, &unhex(CURL_HELLO), name("www.example.test"));
        assert_prefixes(tls_sni, &unhex(OPENSSL_HELLO_NO_SNI), Peek::NoName);
    }

    #[test]
    fn what_follows_a_hello_is_not_looked_at() {
        for tail in [
            &b"\x14\x03\x03\x00\x01\x01"[..],
            b"garbage",
            &[0x16, 3, 3, 0, 0],
        ] {
            let mut input = unhex(CURL_HELLO);
            input.extend_from_slice(tail);
            assert_eq!(tls_sni(&input), name("www.example.test"));
        }
    }

    #[test]
    fn a_hello_split_into_two_records() {
        let message = message_of(&unhex(OPENSSL_HELLO));
        // At every place, the handshake header's own bytes included.
        for cut in 1..message.len() {
            let input = records(&message, &[cut]);
            assert_eq!(tls_sni(&input), name("api.example.com"), "cut at {cut}");
        }
        // Every prefix of one such pair, cut inside the server_name.
        let input = records(&message, &[60]);
        assert_prefixes(tls_sni, &input, name("api.example.com"));
        // And the last record may carry more than the hello.
        let mut input = records(&message, &[100]);
        input.truncate(input.len() - 10);
        let tail = &message[message.len() - 10..];
        input.extend(records(&[tail, &b"next message"[..]].concat(), &[]));
        assert_eq!(tls_sni(&input), name("api.example.com"));
    }

    #[test]
    fn a_hello_in_one_byte_records() {
        let message = message_of(&unhex(CURL_HELLO));
        let input = records(&message, &vec![1; message.len()]);
        assert_prefixes(tls_sni, &input, name("www.example.test"));
        // A little over six times the input size, copied only once whole.
        assert_eq!(input.len(), message.len() * 6);
    }

    #[test]
    fn interleaved_or_bad_records() {
        let message = message_of(&unhex(OPENSSL_HELLO));
        let mut split = records(&message, &[100]);
        // A ChangeCipherSpec between the two fragments.
        let second = 5 + 100;
        let mut interleaved = split[..second].to_vec();
        interleaved.extend([20, 3, 3, 0, 1, 1]);
        interleaved.extend_from_slice(&split[second..]);
        assert_eq!(tls_sni(&interleaved), Peek::Invalid);
        // The second record's header with a wrong major version.
        split[second + 1] = 2;
        assert_eq!(tls_sni(&split), Peek::Invalid);
        // Zero-length and oversized fragments.
        assert_eq!(tls_sni(&[22, 3, 1, 0, 0]), Peek::Invalid);
        assert_eq!(tls_sni(&[22, 3, 1, 0x40, 0x01, 1]), Peek::Invalid);
        let big = records(&handshake(1, &vec![0; 20_000]), &[16384]);
        assert_eq!(tls_sni(&big[..16384 + 5]), Peek::NeedMore); // 2^14 is allowed
    }

    #[test]
    fn not_tls_is_refused_at_once() {
        assert_eq!(tls_sni(b""), Peek::NeedMore);
        assert_eq!(tls_sni(&[22]), Peek::NeedMore);
        assert_eq!(tls_sni(&[22, 3]), Peek::NeedMore);
        assert_eq!(tls_sni(b"G"), Peek::Invalid);
        assert_eq!(tls_sni(CURL_REQUEST), Peek::Invalid);
        assert_eq!(tls_sni(&[22, 2]), Peek::Invalid); // SSL 2
        assert_eq!(tls_sni(&[0x80, 0x2e, 1, 0, 2]), Peek::Invalid); // SSL 2 hello
        assert_eq!(tls_sni(&[23, 3, 3, 0, 10]), Peek::Invalid); // application data
                                                                // A ServerHello, refused at its first fragment byte.
        assert_eq!(tls_sni(&[22, 3, 3, 0, 80, 2]), Peek::Invalid);
        assert_eq!(tls_sni(&[22, 3, 3, 0, 80, 1]), Peek::NeedMore);
    }

    #[test]
    fn no_server_name() {
        assert_eq!(tls_sni(&hello(&[])), Peek::NoName);
        assert_eq!(tls_sni(&hello(&[(0x10, vec16(b"\x02h2"))])), Peek::NoName);
        // A hello without any extensions block (TLS 1.0 era).
        let bare = records(&handshake(1, &hello_body(None)), &[]);
        assert_eq!(tls_sni(&bare), Peek::NoName);
        // A server_name extension naming only an unknown name type.
        let other = hello(&[(EXT_SERVER_NAME, sni_data(&[(7, b"x")]))]);
        assert_eq!(tls_sni(&other), Peek::NoName);
    }

    #[test]
    fn names_are_normalised_and_checked() {
        assert_eq!(
            tls_sni(&hello_naming(b"API.Example.COM.")),
            name("api.example.com")
        );
        assert_eq!(
            tls_sni(&hello_naming(b"_acme.x-y.example")),
            name("_acme.x-y.example")
        );
        let long_label = [b'a'; 63];
        assert_eq!(
            tls_sni(&hello_naming(&long_label)),
            name(std::str::from_utf8(&long_label).unwrap())
        );
        let mut longest = b"a.".repeat(126);
        longest.push(b'b'); // 253 bytes
        assert!(matches!(tls_sni(&hello_naming(&longest)), Peek::Name(_)));
        longest.extend(b"b"); // 254
        assert_eq!(tls_sni(&hello_naming(&longest)), Peek::Invalid);
        for bad in [
            &b"."[..],
            b"..",
            b"a..b",
            b".a",
            b"a b",
            b"a\0b",
            b"*.example.com",
            b"[::1]",
            b"h\xc3\xa9.example",
            b"example.com:443",
            &[b'a'; 64],
        ] {
            assert_eq!(tls_sni(&hello_naming(bad)), Peek::Invalid, "{bad:?}");
        }
        // Unknown name types are skipped, host_name is still found.
        let mixed = sni_data(&[(7, b"whatever"), (0, b"a.example")]);
        assert_eq!(tls_sni(&hello(&[(0, mixed)])), name("a.example"));
    }

    #[test]
    fn repeated_or_empty_server_names() {
        let one = sni_data(&[(0, b"a.example")]);
        let twice = hello(&[(0, one.clone()), (0x10, vec![]), (0, one)]);
        assert_eq!(tls_sni(&twice), Peek::Invalid);
        let two_names = sni_data(&[(0, b"a.example"), (0, b"b.example")]);
        assert_eq!(tls_sni(&hello(&[(0, two_names)])), Peek::Invalid);
        assert_eq!(tls_sni(&hello(&[(0, vec![])])), Peek::Invalid);
        assert_eq!(tls_sni(&hello(&[(0, vec![0, 0])])), Peek::Invalid);
        assert_eq!(
            tls_sni(&hello(&[(0, sni_data(&[(0, b"")]))])),
            Peek::Invalid
        );
    }

    #[test]
    fn lengths_that_do_not_add_up() {
        // Offsets in OPENSSL_HELLO's handshake body (after record and
        // handshake headers, 9 bytes).
        let original = unhex(OPENSSL_HELLO);
        let at = |body_offset: usize| 9 + body_offset;
        let session_len = at(34);
        let suites_len = session_len + 1 + 32;
        let compression_len = suites_len + 2 + 0x3e;
        let extensions_len = compression_len + 2;
        let sni_ext = extensions_len + 2;
        let cases: &[(usize, &[u8])] = &[
            (at(0), &[2]),                // legacy_version major 2
            (session_len, &[33]),         // session id over 32
            (session_len, &[0xff]),       // past the end
            (suites_len, &[0, 0]),        // no cipher suites
            (suites_len, &[0, 0x3d]),     // odd
            (suites_len, &[0xff, 0xfe]),  // past the end
            (compression_len, &[0]),      // no compression methods
            (compression_len, &[0xff]),   // past the end
            (extensions_len, &[0, 0xb0]), // one byte short: trailing byte
            (extensions_len, &[0, 0xb2]), // one byte long
            (extensions_len, &[0xff, 0xff]),
            (sni_ext + 2, &[0, 0x15]),    // extension data past the block
            (sni_ext + 2, &[0xff, 0xff]), // far past
            (sni_ext + 4, &[0, 0x13]),    // name list past its extension
            (sni_ext + 4, &[0, 0x11]),    // name list short of it
            (sni_ext + 7, &[0, 0x10]),    // host name past its list
            (sni_ext + 7, &[0, 0x0e]),    // host name short of it
            (sni_ext + 7, &[0xff, 0xff]), // far past
        ];
        assert_eq!(&original[sni_ext..sni_ext + 2], &[0, 0]);
        for (offset, bytes) in cases {
            let mut input = original.clone();
            input[*offset..offset + bytes.len()].copy_from_slice(bytes);
            assert_eq!(tls_sni(&input), Peek::Invalid, "{bytes:?} at {offset}");
        }
        // A handshake length beyond the record: the rest may still come.
        let mut longer = original.clone();
        longer[8] += 1;
        assert_eq!(tls_sni(&longer), Peek::NeedMore);
        longer.extend(records(&[0], &[]));
        assert_eq!(tls_sni(&longer), Peek::Invalid); // a trailing byte
                                                     // A handshake length short of the record: a hello with its tail
                                                     // cut off, and then another message.
        let mut shorter = original;
        shorter[8] -= 1;
        assert_eq!(tls_sni(&shorter), Peek::Invalid);
        // The biggest lengths a header can say, with nothing behind them.
        assert_eq!(
            tls_sni(&[22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]),
            Peek::NeedMore
        );
        assert_eq!(
            tls_sni(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Peek::NeedMore
        );
        assert_eq!(tls_sni(&[22, 3, 1, 0, 4, 1, 0, 0, 0]), Peek::Invalid);
    }

    /// A small xorshift generator, so the noise is the same on every run.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// What any verdict must satisfy, whatever the input.
    fn check_verdict(input: &[u8], verdict: &Peek) {
        if let Peek::Name(name) = verdict {
            assert!(!name.is_empty() && name.len() <= input.len());
            assert!(!name.ends_with('.'));
            assert_eq!(*name, name.to_ascii_lowercase());
        }
    }

    /// A verdict other than NeedMore stays when more bytes follow.
    fn check_stable(parse: fn(&[u8]) -> Peek, input: &[u8], rng: &mut XorShift) {
        let whole = parse(input);
        check_verdict(input, &whole);
        let prefix = &input[..rng.below(input.len() + 1)];
        let early = parse(prefix);
        check_verdict(prefix, &early);
        if early != Peek::NeedMore {
            assert_eq!(early, whole, "{prefix:?} then {input:?}");
        }
    }

    /// `seed` with a few random changes: bytes overwritten (often with
    /// 0x00 or 0xff, which make lengths empty or huge), cut, or repeated.
    fn mutate(seed: &[u8], rng: &mut XorShift) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..=rng.below(4) {
            match rng.below(6) {
                0 | 1 if !out.is_empty() => {
                    let at = rng.below(out.len());
                    out[at] = rng.byte();
                }
                2 if !out.is_empty() => {
                    let at = rng.below(out.len());
                    out[at] = [0, 0xff, 1, b'\n', b':', b' '][rng.below(6)];
                }
                3 => out.truncate(rng.below(out.len() + 1)),
                4 if !out.is_empty() => {
                    let at = rng.below(out.len());
                    let len = rng.below(out.len() - at + 1).min(64);
                    let copy = out[at..at + len].to_vec();
                    out.splice(at..at, copy);
                }
                _ => out.push(rng.byte()),
            }
        }
        out
    }

    #[test]
    fn a_million_noisy_inputs_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let tls_seeds = [
            unhex(OPENSSL_HELLO),
            unhex(CURL_HELLO),
            unhex(OPENSSL_HELLO_NO_SNI),
            records(&message_of(&unhex(OPENSSL_HELLO)), &[3, 50, 7]),
        ];
        let http_seeds = [
            CURL_REQUEST.to_vec(),
            CURL_REQUEST_10_NO_HOST.to_vec(),
            b"GET http://[::1]:80/ HTTP/1.1\r\nHost: a\nX: y\r\n\r\n".to_vec(),
        ];
        let mut noise = Vec::new();
        for i in 0..1_000_000 {
            let input = match i % 4 {
                // Pure noise, sometimes behind a plausible start.
                0 => {
                    noise.clear();
                    match rng.below(3) {
                        0 => noise.extend([22, 3, 1]),
                        1 => noise.extend(b"GET / HTTP/1.1\r\n"),
                        _ => {}
                    }
                    for _ in 0..rng.below(600) {
                        noise.push(rng.byte());
                    }
                    noise.clone()
                }
                1 | 2 => mutate(&tls_seeds[rng.below(tls_seeds.len())], &mut rng),
                _ => mutate(&http_seeds[rng.below(http_seeds.len())], &mut rng),
            };
            check_stable(tls_sni, &input, &mut rng);
            check_stable(http_host, &input, &mut rng);
            let _ = looks_like_tls(&input);
            let (a, b) = input.split_at(input.len() / 2);
            let _ = name_matches(&String::from_utf8_lossy(a), &String::from_utf8_lossy(b));
        }
    }

    // --------------------------------------------------------- HTTP --

    #[test]
    fn captured_requests() {
        assert_eq!(http_host(CURL_REQUEST), name("www.example.test"));
        assert_eq!(http_host(CURL_REQUEST_10_NO_HOST), Peek::NoName);
        assert!(!looks_like_tls(CURL_REQUEST));
        assert_prefixes(http_host, CURL_REQUEST, name("www.example.test"));
        assert_prefixes(http_host, CURL_REQUEST_10_NO_HOST, Peek::NoName);
    }

    #[test]
    fn the_body_is_not_looked_at() {
        let mut input =
            b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 9\r\n\r\n".to_vec();
        input.extend(b"\0\r\n\r\nHost: b");
        assert_eq!(http_host(&input), name("a.example"));
    }

    #[test]
    fn host_forms() {
        let host =
            |value: &str| http_host(format!("GET / HTTP/1.1\r\nHost:{value}\r\n\r\n").as_bytes());
        assert_eq!(host(" www.Example.TEST:8080"), name("www.example.test"));
        assert_eq!(host("www.example.test."), name("www.example.test"));
        assert_eq!(host("www.example.test.:443"), name("www.example.test"));
        assert_eq!(host("example.com:"), name("example.com")); // port = *DIGIT
        assert_eq!(host(" \t example.com \t "), name("example.com"));
        assert_eq!(host("[::1]"), name("::1"));
        assert_eq!(host("[::1]:8080"), name("::1"));
        assert_eq!(host("[2001:DB8::A]:443"), name("2001:db8::a"));
        assert_eq!(host("[2001:0db8:0:0:0:0:0:a]"), name("2001:db8::a"));
        assert_eq!(host("[::ffff:192.0.2.1]"), name("::ffff:192.0.2.1"));
        assert_eq!(host("[0:0:0:0:0:0:0:1]"), name("::1"));
        assert_eq!(host("192.0.2.1:80"), name("192.0.2.1"));
        assert_eq!(host(""), Peek::NoName);
        assert_eq!(host("   "), Peek::NoName);
        for bad in [
            ":80",
            "a b",
            "a,b",
            "a.example, b.example",
            "user@a.example",
            "a.example:8x",
            "a.example:65536",
            "a.example:123456",
            "a.example:80:80",
            "a%2eexample",
            "[::1",
            "[::1]x",
            "[1:.]",
            "[::1::]",
            "[12345::]",
            "[]",
            "[1.2.3.4]",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "::1",
            "a..example",
            ".",
            "h\u{e9}.example",
        ] {
            assert_eq!(host(bad), Peek::Invalid, "{bad:?}");
        }
        // "[::1]:" has an empty port, which the grammar allows.
        assert_eq!(host("[::1]:"), name("::1"));
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let head = b"GET http://Other.Example:8080/x?y HTTP/1.1\r\nHost: www.example.test\r\n\r\n";
        assert_eq!(http_host(head), name("other.example"));
        assert_prefixes(http_host, head, name("other.example"));
        let cases: &[(&[u8], Peek)] = &[
            (b"GET https://[::1]/ HTTP/1.1\r\n\r\n", name("::1")),
            (b"GET HTTP://a.example HTTP/1.1\r\n\r\n", name("a.example")),
            (
                b"GET http://a.example?q HTTP/1.0\r\n\r\n",
                name("a.example"),
            ),
            (
                b"GET http:///x HTTP/1.1\r\nHost: b.example\r\n\r\n",
                Peek::NoName,
            ),
            (b"GET http://u@a.example/ HTTP/1.1\r\n\r\n", Peek::Invalid),
            // Host is still checked: a bad or repeated one is refused.
            (
                b"GET http://a.example/ HTTP/1.1\r\nHost: a b\r\n\r\n",
                Peek::Invalid,
            ),
            (
                b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                Peek::Invalid,
            ),
            // Not absolute-form: the Host names the server.
            (
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
                name("a.example"),
            ),
            (
                b"OPTIONS * HTTP/1.1\r\nHost: b.example\r\n\r\n",
                name("b.example"),
            ),
            (
                b"GET /http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
                name("b.example"),
            ),
            (
                b"GET 1http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
                name("b.example"),
            ),
        ];
        for (head, verdict) in cases {
            assert_eq!(
                &http_host(head),
                verdict,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn missing_or_repeated_host() {
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Peek::NoName);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            Peek::NoName
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nX-Host: a\r\nHosts: b\r\n\r\n"),
            Peek::NoName
        );
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHOST: a\r\nAccept: */*\r\nhOsT:\r\n\r\n",
        ] {
            assert_eq!(http_host(head), Peek::Invalid);
        }
        // Refused as soon as the second is whole, before the head ends.
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n"),
            Peek::Invalid
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b"),
            Peek::NeedMore
        );
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nhost: A\r\n\r\n"), name("a"));
    }

    #[test]
    fn bare_lf_is_a_line_end_bare_cr_is_not() {
        let lf = b"GET / HTTP/1.1\nHost: a.example\nAccept: */*\n\n";
        assert_prefixes(http_host, lf, name("a.example"));
        let mixed = b"GET / HTTP/1.1\r\nHost: a.example\nX: y\r\n\n";
        assert_prefixes(http_host, mixed, name("a.example"));
        assert_eq!(http_host(b"GET / HTTP/1.1\nHost: a\r\n\r\n"), name("a"));
        for head in [
            &b"GET / HTTP/1.1\rHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\rHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
            b"GET / HTTP/1.1\r\nX: \r\r\n",
            b"GET / HTTP/1.1\r\nX: \rA",
            b"GET /\rA",
        ] {
            assert_eq!(
                http_host(head),
                Peek::Invalid,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn malformed_heads() {
        for head in [
            // Request lines.
            &b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET\t/ HTTP/1.1\r\n",
            b"GET / http/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.10\r\n",
            b"GET / HTTP/1.\r\n",
            b"GET /\r\n",
            b"GET\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"GET /\x7f HTTP/1.1\r\n",
            b"GET /\0 HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", // the HTTP/2 preface
            // Header lines.
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", // whitespace before the first
            b"GET / HTTP/1.1\r\nX: y\r\n Host: a\r\n\r\n", // obs-fold
            b"GET / HTTP/1.1\r\nHost: a\r\n\tb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo(st: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0b\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x7fb\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(
                http_host(head),
                Peek::Invalid,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // Field values may hold obs-text and tabs.
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nX: \xe9\ta\r\nHost: a\r\n\r\n"),
            name("a")
        );
        // Raw UTF-8 in an origin-form path is let through.
        assert_eq!(
            http_host("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes()),
            name("a")
        );
    }

    #[test]
    fn not_http_is_refused_early() {
        assert_eq!(http_host(b""), Peek::NeedMore);
        assert_eq!(http_host(b"G"), Peek::NeedMore);
        assert_eq!(http_host(b"GET /index.html HTTP/1"), Peek::NeedMore);
        assert_eq!(http_host(b"GET /index.html HTTP/1.1\r"), Peek::NeedMore);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost"), Peek::NeedMore);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost: a\r"), Peek::NeedMore);
        assert_eq!(http_host(&unhex(OPENSSL_HELLO)), Peek::Invalid);
        assert_eq!(http_host(&[22]), Peek::Invalid);
        assert_eq!(http_host(b"\0"), Peek::Invalid);
        assert_eq!(http_host(b"GET  "), Peek::Invalid);
        assert_eq!(http_host(b"GET / "), Peek::NeedMore);
        assert_eq!(http_host(b"GET / X"), Peek::Invalid);
        assert_eq!(http_host(b"GET / HTTP/1.1x"), Peek::Invalid);
        assert_eq!(http_host(b"GET / HTTP/2"), Peek::Invalid);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\n "), Peek::Invalid);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHo st"), Peek::Invalid);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost: a\0"), Peek::Invalid);
        assert_eq!(http_host(b"SSH-2.0-OpenSSH_9.2\r\n"), Peek::Invalid);
        // Whole lines are judged before the head ends.
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a\r\nBad Line\r\n"),
            Peek::Invalid
        );
    }

    // ------------------------------------------------------- routes --

    #[test]
    fn route_patterns() {
        let yes = [
            ("*", "anything.example"),
            ("*", "::1"),
            ("*", ""),
            ("example.com", "example.com"),
            ("Example.COM", "example.com"),
            ("example.com", "EXAMPLE.com"),
            ("example.com.", "example.com"),
            ("example.com", "example.com."),
            ("*.example.com", "a.example.com"),
            ("*.example.com", "a.b.example.com"),
            ("*.Example.com", "A.EXAMPLE.COM"),
            ("*.example.com.", "a.example.com"),
            ("::1", "::1"),
        ];
        let no = [
            ("*.example.com", "example.com"),
            ("*.example.com", ".example.com"),
            ("*.example.com", "a..example.com"),
            ("*.example.com", ".a.example.com"),
            ("*.example.com", "aexample.com"),
            ("*.example.com", "a.example.com.evil"),
            ("*.example.com", "a.example.org"),
            ("*.", "a"),
            ("*.", "a."),
            ("*x", "ax"),
            ("a.*.com", "a.b.com"),
            ("**", "x"),
            ("example.com", "a.example.com"),
            ("example.com", "example.co"),
            ("", "example.com"),
            ("*.é.com", "a.É.com"), // ASCII case only
            ("*.é", "é"),           // no panic inside a character
            ("*.ab", "é"),
        ];
        for (pattern, name) in yes {
            assert!(name_matches(pattern, name), "{pattern} should match {name}");
        }
        for (pattern, name) in no {
            assert!(
                !name_matches(pattern, name),
                "{pattern} should not match {name}"
            );
        }
    }

    #[test]
    fn tls_or_not() {
        assert!(!looks_like_tls(b""));
        assert!(looks_like_tls(&[22]));
        assert!(looks_like_tls(&[22, 3]));
        assert!(looks_like_tls(&[22, 3, 1, 2, 0]));
        assert!(!looks_like_tls(&[22, 2]));
        assert!(!looks_like_tls(&[23, 3]));
        assert!(!looks_like_tls(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_tls(&[0x80, 0x2e]));
    }
}
