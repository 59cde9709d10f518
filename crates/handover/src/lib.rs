//! handover hands sockets and other OS handles from one process to another.
//!
//! The run-time piece is the [`Channel`]: a connected, message-oriented link
//! between two processes in which each message carries bytes and any number
//! of [`Handle`]s, delivered whole or not at all.
//!
//! ```
//! use handover::{Channel, Handle};
//! use std::net::TcpListener;
//!
//! let (a, b) = Channel::pair()?;
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! a.send(b"here is the listener", &[Handle::from(listener).with_name("http")])?;
//!
//! let mut msg = b.recv()?.expect("the peer is still there");
//! let listener = msg.take("http").unwrap().into_tcp_listener()?;
//! assert!(listener.local_addr()?.port() > 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Nothing in the platform-neutral API exposes a raw descriptor. Unix-only
//! conveniences (Unix sockets, descriptors, uid/gid) live in `unix`; Windows
//! ones (`OwnedHandle`, `OwnedSocket`) in `windows`.

pub mod activation;
mod assemble;
#[cfg(windows)]
mod bootstrap;
mod channel;
pub mod dispatch;
mod error;
mod handle;
#[cfg(unix)]
pub mod holder;
pub mod listen;
pub mod notify;
mod outgoing;
mod pull;
mod shm;
mod spawn;
mod sys;
pub mod wire;

#[cfg(all(feature = "tokio", unix))]
pub mod tokio;
#[cfg(unix)]
pub mod unix;
#[cfg(windows)]
pub mod windows;

pub use channel::{Channel, ChannelListener, ChannelOptions, Message, PeerCredentials};
pub use error::{Error, Result};
pub use handle::{Handle, HandleKind, SocketFamily, SocketInfo, SocketType, WrongType};
pub use pull::{handle_numbers, pull, PullError};
pub use shm::{Mapping, SharedMemory};
pub use spawn::{Child, Command};
