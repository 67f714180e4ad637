//! [`ClientError`]: why [`connect`](super::connect) or a session failed,
//! with messages a user can act on and the CLI's exit status.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::PeerId;

/// Why [`connect`](super::connect) or [`Connection::pipe`](super::Connection::pipe)
/// failed. [`ClientError::exit_code`] maps each to the CLI's exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (exit 2).
    #[error("{0}")]
    Config(String),
    /// The server never answered (exit 3).
    #[error(
        "no reply from the rendezvous server {server} in {} ms: is it running, and did peer {peer} register with it?{last_error}",
        waited.as_millis()
    )]
    NoReply {
        /// The server asked.
        server: SocketAddr,
        /// The partner that was expected.
        peer: PeerId,
        /// How long the client waited.
        waited: Duration,
        /// The last send error, if any, as ` (last send error: ...)`.
        last_error: String,
    },
    /// Nothing listens at the server's port: every registration for
    /// [`REFUSED_GRACE`](super::registration::REFUSED_GRACE) was refused by
    /// the kernel there (exit 3).
    #[error(
        "the rendezvous server {server} refused the registration: nothing listens on that UDP port \
         (is psync-server running there, and is the port right?)"
    )]
    Refused {
        /// The server asked.
        server: SocketAddr,
    },
    /// The server (or something at its address) sent a malformed reply (exit 1).
    #[error("bad reply from the rendezvous server {server}: {reason}")]
    BadReply {
        /// Where it came from.
        server: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// Rendezvous worked but no path could be punched (exit 4).
    #[error("rendezvous worked but no path could be punched after {attempts} attempt(s) (tried: {tried}; our NAT: {nat}): {reason}")]
    Punch {
        /// Registrations made.
        attempts: u32,
        /// The strategies tried, comma-separated.
        tried: String,
        /// Our NAT's classification, in words.
        nat: String,
        /// What was seen and the likely cause.
        reason: String,
    },
    /// The partner stopped answering during a pipe session (exit 1).
    #[error("the peer at {peer} went silent for {} s", silence.as_secs_f64())]
    PeerSilent {
        /// The partner.
        peer: SocketAddr,
        /// How long nothing arrived.
        silence: Duration,
    },
    /// A local I/O error (exit 1).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl ClientError {
    /// The exit status the CLI uses: 2 bad usage, 3 no server reply (or a
    /// refusing port), 4 no path,
    /// 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Config(_) => 2,
            ClientError::NoReply { .. } | ClientError::Refused { .. } => 3,
            ClientError::Punch { .. } => 4,
            ClientError::BadReply { .. }
            | ClientError::PeerSilent { .. }
            | ClientError::Io { .. } => 1,
        }
    }
}

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}
