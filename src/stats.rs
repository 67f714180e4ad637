//! Event counters: plain integers bumped on the hot path, formatted elsewhere.
//!
//! The engine and the I/O loop each increment their own fields of one
//! [`Counters`]; the server prints it every `--stats-interval` and at exit.

use std::fmt;

/// Every count the server keeps. All are totals since start except `pending`,
/// a gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received.
    pub received: u64,
    /// Dropped: not exactly 8 bytes.
    pub bad_size: u64,
    /// Dropped: `self_id == peer_id`.
    pub self_pair: u64,
    /// Dropped: from an address family this server does not serve.
    pub bad_family: u64,
    /// New pending registrations.
    pub registered: u64,
    /// Pending registrations refreshed by a repeated request.
    pub refreshed: u64,
    /// Pairs matched (each sends two replies).
    pub matched: u64,
    /// Replies resent to a retransmitted request after its match.
    pub replayed: u64,
    /// Pending registrations that expired unmatched.
    pub expired: u64,
    /// Dropped: the pending table was full.
    pub table_full: u64,
    /// Matches that could not be remembered for replay (replay cache full).
    pub replay_full: u64,
    /// Replies handed to the kernel.
    pub sent: u64,
    /// Replies the kernel refused with an error other than "try again".
    pub send_errors: u64,
    /// Replies dropped because the send queue was full.
    pub send_dropped: u64,
    /// Receive calls that failed with an unexpected error.
    pub recv_errors: u64,
    /// Gauge: pending registrations held now.
    pub pending: u64,
}

impl Counters {
    /// Every counter with its name, in a stable order (for printing and metrics).
    pub fn fields(&self) -> [(&'static str, u64); 16] {
        [
            ("received", self.received),
            ("bad_size", self.bad_size),
            ("self_pair", self.self_pair),
            ("bad_family", self.bad_family),
            ("registered", self.registered),
            ("refreshed", self.refreshed),
            ("matched", self.matched),
            ("replayed", self.replayed),
            ("expired", self.expired),
            ("table_full", self.table_full),
            ("replay_full", self.replay_full),
            ("sent", self.sent),
            ("send_errors", self.send_errors),
            ("send_dropped", self.send_dropped),
            ("recv_errors", self.recv_errors),
            ("pending", self.pending),
        ]
    }
}

impl fmt::Display for Counters {
    /// `name=value` pairs separated by spaces, one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.fields().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}
