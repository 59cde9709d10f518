//! The holder's requests and replies (docs/protocol.md §17): pure encoding
//! and decoding of the JSON payloads that travel in channel messages.
//!
//! Nothing here touches a handle or the OS. `decode_*` never panics,
//! whatever the bytes: every defect is a [`ProtocolError`] that says what
//! was wrong, which the daemon sends back as a `malformed` reply.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest name, in bytes (systemd's limit for LISTEN_FDNAMES names).
pub const MAX_NAME_LEN: usize = 255;

/// The most names one retrieve request may ask for.
pub const MAX_RETRIEVE_NAMES: usize = 64;

/// The longest TTL or wait timeout a request may give: ten years, so
/// that deadlines computed from it never overflow.
pub const MAX_DURATION_MS: u64 = 10 * 365 * 86_400 * 1000;

/// The most bytes a request may have; the daemon refuses longer ones
/// before reading them (a channel limit).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Checks a name: 1 to 255 bytes of ASCII letters, digits and
/// `. _ - / @ + =`. Names go into LISTEN_FDNAMES, whose separator is `:`,
/// and into glob rules, whose wildcards are `*` and `?`, so neither may
/// appear in one.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {:?}… is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            prefix(name, 40),
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !name_char(*c)) {
        return Err(format!(
            "name {name:?} contains {c:?}; names are made of ASCII letters, digits and . _ - / @ + ="
        ));
    }
    Ok(())
}

/// Whether `c` may appear in a name.
pub fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | '@' | '+' | '=')
}

fn prefix(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A request from a client: one message, JSON object, with exactly one
/// handle for `store` and none otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep the handle that comes with the request under `name`.
    Store {
        name: String,
        /// When the entry expires (and its descriptor is closed).
        ttl: Option<Duration>,
        /// Replace an entry of the same name instead of failing.
        replace: bool,
    },
    /// Hand out duplicates of the named entries, all or none, in order;
    /// with `remove`, hand out the entries themselves and forget them.
    Retrieve { names: Vec<String>, remove: bool },
    /// Forget an entry, closing its descriptor.
    Remove { name: String },
    /// Describe the entries this client may list.
    List,
    /// Answer once `name` is present, or when `timeout` has passed.
    Wait {
        name: String,
        timeout: Option<Duration>,
    },
    /// From a new holder to the running one: hand everything over.
    Takeover,
}

impl Request {
    /// The request's operation, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Store { .. } => "store",
            Request::Retrieve { .. } => "retrieve",
            Request::Remove { .. } => "remove",
            Request::List => "list",
            Request::Wait { .. } => "wait",
            Request::Takeover => "takeover",
        }
    }

    /// How many handles the request's message must carry.
    pub fn handles(&self) -> usize {
        match self {
            Request::Store { .. } => 1,
            _ => 0,
        }
    }
}

/// What was wrong with a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn bad(why: impl Into<String>) -> ProtocolError {
    ProtocolError(why.into())
}

/// The request as JSON, before its fields are checked against its op.
#[derive(Deserialize, Serialize, Default)]
struct RawRequest {
    op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replace: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remove: Option<bool>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes a request's payload.
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut raw = RawRequest {
        op: request.op().to_owned(),
        ..RawRequest::default()
    };
    match request {
        Request::Store { name, ttl, replace } => {
            raw.name = Some(name.clone());
            // A TTL under a millisecond would be sent as 0, which is
            // invalid: round up.
            raw.ttl_ms = ttl.map(|t| millis(t).max(1));
            raw.replace = Some(*replace);
        }
        Request::Retrieve { names, remove } => {
            raw.names = Some(names.clone());
            raw.remove = Some(*remove);
        }
        Request::Remove { name } => raw.name = Some(name.clone()),
        Request::List | Request::Takeover => {}
        Request::Wait { name, timeout } => {
            raw.name = Some(name.clone());
            raw.timeout_ms = timeout.map(millis);
        }
    }
    serde_json::to_vec(&raw).unwrap_or_default()
}

/// An error of a request for which the op is known, so that the reply can
/// say which operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not a request at all: not JSON, not an object, no op, wrong types.
    Malformed(String),
    /// A well-formed request for an operation this holder does not have.
    UnknownOp(String),
    /// A name that breaks the naming rules.
    BadName(String),
}

impl RequestError {
    /// The reply's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::Malformed(_) => ErrorCode::Malformed,
            RequestError::UnknownOp(_) => ErrorCode::UnknownOp,
            RequestError::BadName(_) => ErrorCode::BadName,
        }
    }

    /// The reply's message.
    pub fn message(&self) -> &str {
        match self {
            RequestError::Malformed(m) | RequestError::UnknownOp(m) | RequestError::BadName(m) => m,
        }
    }
}

/// Decodes a request's payload and checks every field, names included.
pub fn decode_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let raw: RawRequest = serde_json::from_slice(bytes).map_err(|e| {
        RequestError::Malformed(format!("the request is not a holder request: {e}"))
    })?;
    let malformed = |why: String| RequestError::Malformed(format!("{}: {why}", raw.op));
    let name = |field: &Option<String>| -> Result<String, RequestError> {
        let name = field
            .clone()
            .ok_or_else(|| malformed("\"name\" is missing".into()))?;
        check_name(&name).map_err(RequestError::BadName)?;
        Ok(name)
    };
    let duration =
        |field: &'static str, ms: Option<u64>| -> Result<Option<Duration>, RequestError> {
            match ms {
                None => Ok(None),
                Some(0) => Err(malformed(format!("\"{field}\" must be at least 1"))),
                Some(ms) if ms > MAX_DURATION_MS => Err(malformed(format!(
                    "\"{field}\" is {ms}; at most {MAX_DURATION_MS} (ten years)"
                ))),
                Some(ms) => Ok(Some(Duration::from_millis(ms))),
            }
        };
    match raw.op.as_str() {
        "store" => Ok(Request::Store {
            name: name(&raw.name)?,
            ttl: duration("ttl_ms", raw.ttl_ms)?,
            replace: raw.replace.unwrap_or(false),
        }),
        "retrieve" => {
            let names = raw
                .names
                .clone()
                .ok_or_else(|| malformed("\"names\" is missing".into()))?;
            if names.is_empty() || names.len() > MAX_RETRIEVE_NAMES {
                return Err(malformed(format!(
                    "\"names\" has {} names; 1 to {MAX_RETRIEVE_NAMES} are allowed",
                    names.len()
                )));
            }
            for (i, n) in names.iter().enumerate() {
                check_name(n).map_err(RequestError::BadName)?;
                if names[..i].contains(n) {
                    return Err(malformed(format!("{n:?} is asked for twice")));
                }
            }
            Ok(Request::Retrieve {
                names,
                remove: raw.remove.unwrap_or(false),
            })
        }
        "remove" => Ok(Request::Remove {
            name: name(&raw.name)?,
        }),
        "list" => Ok(Request::List),
        "wait" => Ok(Request::Wait {
            name: name(&raw.name)?,
            timeout: duration("timeout_ms", raw.timeout_ms)?,
        }),
        "takeover" => Ok(Request::Takeover),
        other => Err(RequestError::UnknownOp(format!(
            "unknown operation {:?} (store, retrieve, remove, list, wait)",
            prefix(other, 64)
        ))),
    }
}

/// Why the holder refused a request: the `error` field of a reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The message was not a valid request (or carried the wrong handles).
    Malformed,
    /// The operation is not one this holder knows.
    UnknownOp,
    /// A name breaks the naming rules.
    BadName,
    /// The rules do not grant this client this operation on this name.
    Denied,
    /// No entry of that name.
    NotFound,
    /// An entry of that name exists and `replace` was not asked for.
    Exists,
    /// The holder holds as many entries as it may.
    EntriesLimit,
    /// This uid owns as many entries as one uid may.
    UidLimit,
    /// The holder serves as many clients as it may; try again later.
    ClientsLimit,
    /// A wait ran out of time.
    Timeout,
    /// The holder is closing this connection (idle too long, or being
    /// replaced). A request that was not answered was not carried out; a
    /// client reconnects and sends it again.
    Closing,
    /// The holder could not carry the request out (out of descriptors, …).
    Internal,
    /// A code this library does not know.
    Other(String),
}

impl ErrorCode {
    /// The code as on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownOp => "unknown-op",
            ErrorCode::BadName => "bad-name",
            ErrorCode::Denied => "denied",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Exists => "exists",
            ErrorCode::EntriesLimit => "entries-limit",
            ErrorCode::UidLimit => "uid-limit",
            ErrorCode::ClientsLimit => "clients-limit",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Closing => "closing",
            ErrorCode::Internal => "internal",
            ErrorCode::Other(s) => s,
        }
    }

    /// The code for a wire string.
    pub fn parse(s: &str) -> ErrorCode {
        match s {
            "malformed" => ErrorCode::Malformed,
            "unknown-op" => ErrorCode::UnknownOp,
            "bad-name" => ErrorCode::BadName,
            "denied" => ErrorCode::Denied,
            "not-found" => ErrorCode::NotFound,
            "exists" => ErrorCode::Exists,
            "entries-limit" => ErrorCode::EntriesLimit,
            "uid-limit" => ErrorCode::UidLimit,
            "clients-limit" => ErrorCode::ClientsLimit,
            "timeout" => ErrorCode::Timeout,
            "closing" => ErrorCode::Closing,
            "internal" => ErrorCode::Internal,
            other => ErrorCode::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One held entry, as the holder describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// What the handle is, as the holder found it with the OS when it was
    /// stored: `tcp-listener`, `tcp`, `udp`, `unix-listener`, `unix-stream`,
    /// `unix-dgram`, `unix-seqpacket-listener`, `unix-seqpacket`, `socket`,
    /// `file`, `pipe`, `memfd`, `directory`, `char-device` or `other`.
    pub kind: String,
    /// Where a socket is bound (`127.0.0.1:8080`, `[::1]:53`, a path,
    /// `@abstract`), or what a descriptor refers to (a file's path,
    /// `pipe:[1234]`, `/memfd:name (deleted)`); `null` if unknown.
    pub address: Option<String>,
    /// Who stored it (SO_PEERCRED of the storing client).
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub stored_unix_ms: u64,
    /// When it expires, in milliseconds since the Unix epoch; `null`: never.
    pub expires_unix_ms: Option<u64>,
}

/// A reply from the holder: one message, JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `{"ok":true}`: remove, wait, and the takeover's last step.
    Done,
    /// `{"ok":true,"entry":{…}}`: store.
    Stored(Entry),
    /// `{"ok":true,"entries":[…]}`: list, and retrieve (whose handles
    /// come with the message, in the same order).
    Entries(Vec<Entry>),
    /// `{"ok":false,"error":CODE,"message":TEXT}`.
    Failed { code: ErrorCode, message: String },
}

#[derive(Deserialize, Serialize)]
struct RawReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entry: Option<Entry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<Entry>>,
}

/// Encodes a reply's payload.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut raw = RawReply {
        ok: true,
        error: None,
        message: None,
        entry: None,
        entries: None,
    };
    match reply {
        Reply::Done => {}
        Reply::Stored(e) => raw.entry = Some(e.clone()),
        Reply::Entries(list) => raw.entries = Some(list.clone()),
        Reply::Failed { code, message } => {
            raw.ok = false;
            raw.error = Some(code.as_str().to_owned());
            raw.message = Some(message.clone());
        }
    }
    serde_json::to_vec(&raw).unwrap_or_default()
}

/// Decodes a reply's payload.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, ProtocolError> {
    let raw: RawReply = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("the holder's reply is not a holder reply: {e}")))?;
    if !raw.ok {
        let code = raw
            .error
            .ok_or_else(|| bad("the holder's reply has \"ok\":false but no \"error\""))?;
        return Ok(Reply::Failed {
            code: ErrorCode::parse(&code),
            message: raw.message.unwrap_or_default(),
        });
    }
    Ok(match (raw.entry, raw.entries) {
        (Some(e), None) => Reply::Stored(e),
        (None, Some(list)) => Reply::Entries(list),
        (None, None) => Reply::Done,
        (Some(_), Some(_)) => {
            return Err(bad("the holder's reply has both \"entry\" and \"entries\""))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.into(),
            kind: "tcp-listener".into(),
            address: Some("127.0.0.1:80".into()),
            owner_uid: 1000,
            owner_gid: 100,
            stored_unix_ms: 1_700_000_000_000,
            expires_unix_ms: None,
        }
    }

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Store {
                name: "web/http".into(),
                ttl: Some(Duration::from_secs(5)),
                replace: true,
            },
            Request::Store {
                name: "a".into(),
                ttl: None,
                replace: false,
            },
            Request::Retrieve {
                names: vec!["a".into(), "b".into()],
                remove: true,
            },
            Request::Remove { name: "x".into() },
            Request::List,
            Request::Wait {
                name: "later".into(),
                timeout: Some(Duration::from_millis(1500)),
            },
            Request::Wait {
                name: "later".into(),
                timeout: None,
            },
            Request::Takeover,
        ];
        for r in all {
            let bytes = encode_request(&r);
            assert_eq!(
                decode_request(&bytes),
                Ok(r.clone()),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn the_documented_examples_decode() {
        let r = decode_request(br#"{"op":"store","name":"http","ttl_ms":60000,"replace":false}"#);
        assert_eq!(
            r,
            Ok(Request::Store {
                name: "http".into(),
                ttl: Some(Duration::from_secs(60)),
                replace: false
            })
        );
        let r = decode_request(br#"{"op":"retrieve","names":["http"]}"#);
        assert_eq!(
            r,
            Ok(Request::Retrieve {
                names: vec!["http".into()],
                remove: false
            })
        );
        // Unknown fields are ignored, for later versions.
        assert_eq!(
            decode_request(br#"{"op":"list","future":1}"#),
            Ok(Request::List)
        );
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let cases: &[(&[u8], ErrorCode)] = &[
            (b"", ErrorCode::Malformed),
            (b"\xff\xfe", ErrorCode::Malformed),
            (b"null", ErrorCode::Malformed),
            (b"[1,2]", ErrorCode::Malformed),
            (b"{}", ErrorCode::Malformed),
            (b"{\"op\":1}", ErrorCode::Malformed),
            (b"{\"op\":\"store\"}", ErrorCode::Malformed),
            (
                b"{\"op\":\"store\",\"name\":\"a\",\"ttl_ms\":0}",
                ErrorCode::Malformed,
            ),
            (
                b"{\"op\":\"store\",\"name\":\"a\",\"ttl_ms\":-1}",
                ErrorCode::Malformed,
            ),
            (
                b"{\"op\":\"store\",\"name\":\"a\",\"ttl_ms\":18446744073709551615}",
                ErrorCode::Malformed,
            ),
            (
                b"{\"op\":\"store\",\"name\":\"a\",\"replace\":\"yes\"}",
                ErrorCode::Malformed,
            ),
            (b"{\"op\":\"store\",\"name\":\"a:b\"}", ErrorCode::BadName),
            (b"{\"op\":\"store\",\"name\":\"\"}", ErrorCode::BadName),
            (b"{\"op\":\"remove\",\"name\":\"a*\"}", ErrorCode::BadName),
            (b"{\"op\":\"retrieve\",\"names\":[]}", ErrorCode::Malformed),
            (
                b"{\"op\":\"retrieve\",\"names\":[\"a\",\"a\"]}",
                ErrorCode::Malformed,
            ),
            (
                b"{\"op\":\"retrieve\",\"name\":\"a\"}",
                ErrorCode::Malformed,
            ),
            (
                b"{\"op\":\"wait\",\"name\":\"a\",\"timeout_ms\":1e3}",
                ErrorCode::Malformed,
            ),
            (b"{\"op\":\"frobnicate\"}", ErrorCode::UnknownOp),
            (b"{\"op\":\"list\"", ErrorCode::Malformed),
        ];
        for (bytes, code) in cases {
            let e = decode_request(bytes).unwrap_err();
            assert_eq!(
                &e.code(),
                code,
                "{:?}: {e:?}",
                String::from_utf8_lossy(bytes)
            );
            assert!(!e.message().is_empty());
        }
        let long = format!("{{\"op\":\"remove\",\"name\":\"{}\"}}", "a".repeat(256));
        assert_eq!(
            decode_request(long.as_bytes()).unwrap_err().code(),
            ErrorCode::BadName
        );
        let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
        let req = serde_json::json!({"op": "retrieve", "names": many}).to_string();
        assert_eq!(
            decode_request(req.as_bytes()).unwrap_err().code(),
            ErrorCode::Malformed
        );
        // Every prefix of a valid request: an error, never a panic.
        let good = encode_request(&Request::Store {
            name: "x".into(),
            ttl: Some(Duration::from_secs(1)),
            replace: true,
        });
        for n in 0..good.len() {
            assert!(decode_request(&good[..n]).is_err());
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "web/http", "A-z_0.9@x+y=z", &"n".repeat(255)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "a:b", "é", "a*", "a?", "a\0", &"n".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let long = "é".repeat(200);
        assert!(check_name(&long).unwrap_err().contains("400 bytes"));
    }

    #[test]
    fn replies_round_trip() {
        let all = [
            Reply::Done,
            Reply::Stored(entry("a")),
            Reply::Entries(vec![]),
            Reply::Entries(vec![entry("a"), entry("b")]),
            Reply::Failed {
                code: ErrorCode::Denied,
                message: "no".into(),
            },
            Reply::Failed {
                code: ErrorCode::Other("from-the-future".into()),
                message: String::new(),
            },
        ];
        for r in all {
            assert_eq!(decode_reply(&encode_reply(&r)), Ok(r.clone()));
        }
        assert!(decode_reply(b"{\"ok\":false}").is_err());
        assert!(decode_reply(b"").is_err());
        assert!(decode_reply(b"{\"ok\":true,\"entries\":[{\"name\":1}]}").is_err());
        assert_eq!(decode_reply(br#"{"ok":true}"#), Ok(Reply::Done));
    }

    #[test]
    fn error_codes_round_trip() {
        for c in [
            ErrorCode::Malformed,
            ErrorCode::UnknownOp,
            ErrorCode::BadName,
            ErrorCode::Denied,
            ErrorCode::NotFound,
            ErrorCode::Exists,
            ErrorCode::EntriesLimit,
            ErrorCode::UidLimit,
            ErrorCode::ClientsLimit,
            ErrorCode::Timeout,
            ErrorCode::Closing,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::parse(c.as_str()), c);
        }
    }
}
