//! The crate's error type. Every variant says what happened and, where a
//! peer misbehaved, how; none of them is ever a panic.

use std::io;
use std::time::Duration;

use crate::handle::{HandleKind, WrongType};
use crate::wire::DecodeError;

/// Everything that can go wrong while moving handles.
///
/// Whenever a receive fails, every handle that had arrived for the failed
/// message has already been closed: an error never leaks a descriptor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The deadline passed before the operation could finish.
    #[error("timed out after {timeout:?} waiting to {op}")]
    TimedOut { op: &'static str, timeout: Duration },

    /// The peer closed its end; nothing more can be sent.
    #[error("the peer has closed the channel")]
    Disconnected,

    /// The peer closed its end after sending part of a message. The
    /// handles of that part were closed.
    #[error("the peer closed the channel in the middle of a message ({handles} handles and {bytes} bytes of it had arrived and were discarded)")]
    PeerClosedMidMessage { handles: usize, bytes: usize },

    /// A frame broke the wire format.
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),

    /// The kernel cut the control data short (MSG_CTRUNC): more handles
    /// were attached than a frame may carry, or this process ran out of
    /// descriptors. The handles that did arrive were closed.
    #[error("the handles attached to a frame did not fit (MSG_CTRUNC); the {closed} that arrived were closed")]
    ControlTruncated { closed: usize },

    /// A frame was larger than the protocol allows and was cut short.
    #[error("a frame was larger than the protocol's limit and was cut short; its {closed} handles were closed")]
    FrameTooLarge { closed: usize },

    /// A frame's header and the handles attached to it disagree.
    #[error("a frame announced {announced} handles but {received} were attached; all were closed")]
    HandleCountMismatch { announced: usize, received: usize },

    /// Handles arrived on a frame that announced none.
    #[error("{received} handles were attached to a frame that announced none; they were closed")]
    UnannouncedHandles { received: usize },

    /// The frames of a message did not fit together.
    #[error("broken message sequence: {0}")]
    Sequence(String),

    /// This channel takes bytes only, and the peer sent handles anyway.
    #[error("this channel accepts bytes only; the peer sent {count} handles, which were closed and the message dropped")]
    HandlesRefused { count: usize },

    /// The peer's channel takes bytes only (SO_PASSRIGHTS is off there).
    #[error("the peer does not accept handles on this channel")]
    PeerRefusesHandles,

    /// A message exceeded one of this channel's limits.
    #[error("a message with {got} {what} exceeds this channel's limit of {limit}; it was dropped and its handles closed")]
    LimitExceeded {
        what: &'static str,
        limit: usize,
        got: usize,
    },

    /// A message is too large for the wire format to describe.
    #[error("cannot send {got} {what}: the wire format allows at most {limit}")]
    TooLargeToSend {
        what: &'static str,
        limit: usize,
        got: usize,
    },

    /// A handle name that cannot be sent.
    #[error("handle name {name:?} cannot be sent: {why}")]
    InvalidName { name: String, why: &'static str },

    /// A typed conversion found another kind of handle.
    #[error("expected {expected}, found {}", describe(found))]
    WrongType {
        expected: &'static str,
        found: Result<HandleKind, io::ErrorKind>,
    },

    /// A socket could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The program to start was not found, or is not executable.
    #[error("program {program:?} not found (or not executable) on PATH")]
    ProgramNotFound { program: String },

    /// A child could not be started.
    #[error("starting {program:?} failed while {stage}: {source}")]
    Spawn {
        program: String,
        stage: &'static str,
        #[source]
        source: io::Error,
    },

    /// The socket-activation environment is inconsistent.
    #[error("bad socket-activation environment: {0}")]
    Activation(String),

    /// A dispatcher or worker broke the dispatch protocol
    /// (docs/protocol.md §18); the message's handles were closed.
    #[error("dispatch protocol: {0}")]
    Dispatch(String),

    /// A bad argument, such as a name that is not a valid address.
    #[error("invalid {what}: {why}")]
    InvalidInput { what: &'static str, why: String },
}

fn describe(found: &Result<HandleKind, io::ErrorKind>) -> String {
    match found {
        Ok(kind) => kind.to_string(),
        Err(e) => format!("a handle that could not be inspected ({e})"),
    }
}

impl From<WrongType> for Error {
    fn from(e: WrongType) -> Error {
        Error::WrongType {
            expected: e.expected,
            found: e.found,
        }
    }
}

impl Error {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
