//! The dispatch protocol's messages (docs/protocol.md §18), encoded and
//! decoded by pure code that never panics. Both ends use it: the worker
//! library in this crate and the dispatcher in `handover run --workers`.
//!
//! Every message is one channel message. Its bytes are a JSON object on
//! one line, ended by `\n`; a connection message is followed by the bytes
//! the dispatcher peeked, raw, exactly as many as its `peeked` field says,
//! and carries the connection as its one handle. What a worker has taken
//! and finished is not sent: it is counted in the state page (`state.rs`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The protocol version a worker announces in `ready`.
pub const VERSION: u32 = 2;

/// The most bytes a dispatcher may pass as peeked: a worker refuses more.
pub const MAX_PEEKED: usize = 64 * 1024;

/// What the dispatcher sends a worker: one connection, with what is known
/// about it. The connection itself is the message's handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// 1 for the first connection on a worker's channel, then one more for
    /// each: what the state page's `taken` counts in.
    pub id: u64,
    /// The activation name of the listening socket it arrived on.
    pub listener: String,
    /// The client's address as text (`IP:PORT`, `[IPv6]:PORT`), or empty
    /// for a Unix socket peer without a name.
    pub peer: String,
    /// The bytes the dispatcher peeked (routing by SNI or Host). They are
    /// still unread on the connection: the worker reads from byte 0.
    #[serde(skip)]
    pub peeked: Vec<u8>,
}

/// Borrowed where the JSON has no escapes, owned where it has (a name
/// with a quote, or another encoder's `\u00e9` or `\/`).
#[derive(Serialize, Deserialize)]
struct DeliveryHeader<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
    id: u64,
    #[serde(borrow)]
    listener: Cow<'a, str>,
    #[serde(borrow)]
    peer: Cow<'a, str>,
    peeked: usize,
}

/// What a worker sends its dispatcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// The worker is ready to take connections (sent once, when it first
    /// asks for one), with the protocol version it speaks. The only report:
    /// taking and finishing connections are counted in the state page.
    Ready { version: u32 },
}

#[derive(Serialize, Deserialize)]
struct ReportWire {
    t: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dispatch protocol: {0}")]
pub struct ProtocolError(pub String);

fn bad(why: impl Into<String>) -> ProtocolError {
    ProtocolError(why.into())
}

/// Splits a message into its JSON line and what follows.
fn split_line(bytes: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("no end of line after the JSON header"))?;
    Ok((&bytes[..end], &bytes[end + 1..]))
}

/// A delivery's message bytes, written over `out` (a buffer reused for
/// every connection) from borrowed parts.
pub fn encode_delivery(id: u64, listener: &str, peer: &str, peeked: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let header = DeliveryHeader {
        t: Cow::Borrowed("conn"),
        id,
        listener: Cow::Borrowed(listener),
        peer: Cow::Borrowed(peer),
        peeked: peeked.len(),
    };
    // Serializing plain strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &header);
    out.push(b'\n');
    out.extend_from_slice(peeked);
}

impl Delivery {
    /// The message bytes (the connection goes as its handle).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_delivery(self.id, &self.listener, &self.peer, &self.peeked, &mut out);
        out
    }

    /// Reads a connection message's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Delivery, ProtocolError> {
        let (line, rest) = split_line(bytes)?;
        let h: DeliveryHeader =
            serde_json::from_slice(line).map_err(|e| bad(format!("bad header: {e}")))?;
        if h.t != "conn" {
            return Err(bad(format!("unknown message type {:?}", h.t)));
        }
        if h.peeked > MAX_PEEKED {
            return Err(bad(format!(
                "{} peeked bytes announced; at most {MAX_PEEKED} are allowed",
                h.peeked
            )));
        }
        if rest.len() != h.peeked {
            return Err(bad(format!(
                "{} peeked bytes announced but {} follow the header",
                h.peeked,
                rest.len()
            )));
        }
        Ok(Delivery {
            id: h.id,
            listener: h.listener.into_owned(),
            peer: h.peer.into_owned(),
            peeked: rest.to_vec(),
        })
    }
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        let wire = match *self {
            Report::Ready { version } => ReportWire {
                t: "ready".into(),
                version: Some(version),
            },
        };
        let mut out = serde_json::to_vec(&wire).unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Report, ProtocolError> {
        let (line, rest) = split_line(bytes)?;
        if !rest.is_empty() {
            return Err(bad("bytes after the JSON line"));
        }
        let w: ReportWire =
            serde_json::from_slice(line).map_err(|e| bad(format!("bad report: {e}")))?;
        match w.t.as_str() {
            "ready" => Ok(Report::Ready {
                version: w.version.ok_or_else(|| bad("ready without a version"))?,
            }),
            other => Err(bad(format!("unknown report type {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_round_trip_keeps_peeked_bytes_raw() {
        let d = Delivery {
            id: 7,
            listener: "https".into(),
            peer: "[::1]:5000".into(),
            peeked: vec![0x16, 0x03, 0x01, b'\n', 0, 255],
        };
        let bytes = d.encode();
        assert!(bytes.starts_with(b"{\"t\":\"conn\",\"id\":7,"));
        assert_eq!(Delivery::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn delivery_strings_with_escapes_round_trip_and_decode_from_other_encoders() {
        let d = Delivery {
            id: 3,
            listener: "a\"b\\c\td\u{e9}".into(),
            peer: "[::1]:5000".into(),
            peeked: Vec::new(),
        };
        assert_eq!(Delivery::decode(&d.encode()).unwrap(), d);
        // As Python's json.dumps writes it (ASCII escapes, an escaped
        // slash from other encoders).
        let other = b"{\"t\": \"conn\", \"id\": 4, \"listener\": \"caf\\u00e9\\/x\", \"peer\": \"\", \"peeked\": 0}\n";
        let got = Delivery::decode(other).unwrap();
        assert_eq!((got.id, got.listener.as_str()), (4, "caf\u{e9}/x"));
    }

    #[test]
    fn delivery_rejects_wrong_lengths_and_types() {
        let ok = br#"{"t":"conn","id":1,"listener":"a","peer":"","peeked":2}"#;
        let mut m = ok.to_vec();
        m.extend_from_slice(b"\nab");
        assert!(Delivery::decode(&m).is_ok());
        m.push(b'c');
        assert!(Delivery::decode(&m).is_err(), "too many peeked bytes");
        m.truncate(m.len() - 2);
        assert!(Delivery::decode(&m).is_err(), "too few peeked bytes");
        assert!(Delivery::decode(ok).is_err(), "no end of line");
        assert!(Delivery::decode(b"{\"t\":\"ack\",\"id\":1}\n").is_err());
        let huge = format!(
            "{{\"t\":\"conn\",\"id\":1,\"listener\":\"a\",\"peer\":\"\",\"peeked\":{}}}\n",
            MAX_PEEKED + 1
        );
        assert!(Delivery::decode(huge.as_bytes()).is_err());
    }

    #[test]
    fn reports_round_trip_and_garbage_is_an_error() {
        for r in [Report::Ready { version: 2 }, Report::Ready { version: 0 }] {
            assert_eq!(Report::decode(&r.encode()).unwrap(), r);
        }
        assert_eq!(
            Report::Ready { version: 2 }.encode(),
            b"{\"t\":\"ready\",\"version\":2}\n"
        );
        for junk in [
            &b""[..],
            b"\n",
            b"{}\n",
            b"{\"t\":\"ack\",\"id\":1}\n",
            b"{\"t\":\"ready\"}\n",
            b"{\"t\":\"nope\",\"id\":1}\n",
            b"{\"t\":\"ready\",\"version\":-1}\n",
            b"{\"t\":\"ready\",\"version\":2}\nextra",
            b"\xff\xfe\n",
        ] {
            assert!(Report::decode(junk).is_err(), "{junk:?}");
        }
    }
}
