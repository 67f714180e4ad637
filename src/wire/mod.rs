//! The psync wire formats: every datagram's bytes, and nothing else.
//!
//! This module owns the byte layouts psync puts on the wire. It does no I/O,
//! keeps no state and never allocates. Every parser checks the length before
//! it reads a byte; nothing here panics on untrusted input.
//!
//! - [`seed`]: the original C psync's request and replies, which must stay
//!   byte-for-byte compatible with it (re-exported here).
//! - [`peer`]: the handshake two clients send each other once introduced.
//! - [`v2`]: the authenticated protocol beside it: a token-carrying request,
//!   a match reply with room for candidate addresses, and a cookie reply for
//!   address validation; no reply is longer than its request.
//! - [`stun`]: STUN Binding (RFC 8489), which the server answers and the
//!   client uses to classify its NAT.
//! - [`cluster`]: what the members of a cluster send each other: forwarded
//!   requests, replies on their way back, heartbeats.
//!
//! `PROTOCOL.md` at the repository root has the full byte tables.

pub mod cluster;
pub mod peer;
pub mod seed;
pub mod stun;
pub mod v2;

pub use seed::*;
