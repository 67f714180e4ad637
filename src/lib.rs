//! psync: a rendezvous server that lets two peers behind NAT find each other.
//!
//! Each peer sends the server an 8-byte UDP request `{self_id, peer_id}`. When
//! the counterpart `{peer_id, self_id}` arrives, the server picks two random
//! ports and tells each peer the other's public address and the ports to use;
//! the peers then punch holes in their NATs and talk directly. The wire format
//! is the original C psync's, byte for byte (see `PROTOCOL.md`).
//!
//! Invariants the whole crate keeps:
//! - bad input gets no reply: it is dropped and counted;
//! - the hot path (receive, match, reply) allocates nothing, logs nothing
//!   above `debug`, and formats nothing unless that level is on;
//! - memory is bounded, computed from the configuration before anything is
//!   allocated, and allocated at start: the table holds at most `capacity`
//!   pairs (waiting or remembered for replay); a live registration gives up
//!   its slot only to a registration from a lighter source when the table is
//!   full, and says so in a counter (`evicted`).
//!
//! Modules, from the bytes up:
//! - [`wire`]: request and reply encode/decode (the seed format and v2); no I/O.
//! - [`auth`]: v2 tokens and address-validation cookies: issue and verify; pure.
//! - [`table`]: the open-addressed table (SWAR probing, backward-shift
//!   deletion, prefetch); no I/O, no clock.
//! - [`engine`]: matching, replay, per-source counts, fair admission and port
//!   choice over the table; pure: bytes and `now` in, replies out.
//! - [`stats`]: the counters (the engine's and the sockets') and the
//!   pair-wait histogram.
//! - [`cluster`]: several servers as one: membership, owner choice,
//!   forwarding and its authentication; pure but for the DNS thread.
//! - [`server`]: the process (configuration, sockets, controls), its worker
//!   loop, and the per-source rate limiter the loop applies first
//!   ([`limit`] is [`server::ratelimit`]).
//! - [`metrics`]: the Prometheus endpoint, served from that loop.
//! - [`client`]: the peer side: register, punch, prove the path.
//! - [`cli`]: what the binaries share: flags' parsing, errors, `--version`.
//! - [`sys`]: the only `unsafe`: `recvmmsg`/`sendmmsg` and socket options.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod engine;
pub mod metrics;
pub mod server;
pub mod stats;
pub mod sys;
pub mod table;
pub mod wire;

pub use engine::{Engine, EngineConfig, Outcome};
/// The per-source rate limiter, where it lived before the server became a
/// folder: [`server::ratelimit`].
pub use server::ratelimit as limit;
pub use server::{Server, ServerConfig, ServerError, ShutdownHandle};
pub use stats::Counters;
pub use wire::{PeerId, Reply, Request};
