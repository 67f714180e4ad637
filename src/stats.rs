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
    /// Dropped: the source exceeded its rate limit.
    pub rate_limited: u64,
    /// Dropped: the source already holds `--max-pending-per-ip` registrations.
    pub per_ip_limit: u64,
    /// Replies handed to the kernel.
    pub sent: u64,
    /// Replies the kernel refused with an error other than "try again".
    pub send_errors: u64,
    /// Replies dropped because the send queue was full.
    pub send_dropped: u64,
    /// Receive calls that failed with an unexpected error.
    pub recv_errors: u64,
    /// STUN Binding requests answered (on the main port or `--stun-port`).
    pub stun_answered: u64,
    /// Dropped: STUN that is not a Binding request psync answers (responses,
    /// indications, malformed, bad FINGERPRINT, unknown required attributes),
    /// and anything that is not STUN on `--stun-port`.
    pub stun_refused: u64,
    /// Gauge: pending registrations held now.
    pub pending: u64,
}

impl Counters {
    /// Every counter with its name, in a stable order (for printing and metrics).
    pub fn fields(&self) -> [(&'static str, u64); 20] {
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
            ("rate_limited", self.rate_limited),
            ("per_ip_limit", self.per_ip_limit),
            ("sent", self.sent),
            ("send_errors", self.send_errors),
            ("send_dropped", self.send_dropped),
            ("recv_errors", self.recv_errors),
            ("stun_answered", self.stun_answered),
            ("stun_refused", self.stun_refused),
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

/// Upper bounds (ms) of the pair-wait histogram's buckets; one more bucket
/// holds everything longer.
pub const WAIT_BUCKETS_MS: [u32; 13] = [
    1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000,
];

/// How long the first peer of each pair waited for the second: a fixed
/// bucket histogram, recorded without allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitHistogram {
    counts: [u64; WAIT_BUCKETS_MS.len() + 1],
    sum_ms: u64,
}

impl WaitHistogram {
    /// Records one wait of `ms` milliseconds.
    #[inline]
    pub fn record(&mut self, ms: u32) {
        let i = WAIT_BUCKETS_MS.partition_point(|&le| le < ms);
        self.counts[i] += 1;
        self.sum_ms += u64::from(ms);
    }

    /// `(upper bound in ms, count)` per bucket, not cumulative; the last
    /// bucket's bound is `None` (infinity).
    pub fn buckets(&self) -> impl Iterator<Item = (Option<u32>, u64)> + '_ {
        WAIT_BUCKETS_MS
            .iter()
            .map(|&le| Some(le))
            .chain(std::iter::once(None))
            .zip(self.counts.iter().copied())
    }

    /// Total of all recorded waits, in ms.
    pub fn sum_ms(&self) -> u64 {
        self.sum_ms
    }

    /// Waits recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_buckets_are_upper_bounds() {
        let mut h = WaitHistogram::default();
        for ms in [0, 1, 2, 60_000, 60_001] {
            h.record(ms);
        }
        let b: Vec<_> = h.buckets().collect();
        assert_eq!(b[0], (Some(1), 2));
        assert_eq!(b[1], (Some(5), 1));
        assert_eq!(b[12], (Some(60_000), 1));
        assert_eq!(b[13], (None, 1));
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_ms(), 120_004);
    }
}
