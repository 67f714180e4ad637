//! Event counters: plain integers bumped on the hot path, formatted elsewhere.
//!
//! The engine counts what it decides ([`EngineCounters`]); the I/O loop
//! counts what happens on its sockets ([`IoCounters`]). Neither writes the
//! other's. [`Counters`] puts both together for printing (`-v` stats lines,
//! the final counters) and for `/metrics`.

use std::fmt;

/// Defines a counter struct with its fields' docs and a `fields()` listing
/// them by name, in declaration order.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: u64,)*
        }

        impl $name {
            /// Every counter with its name, in a stable order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field),)*]
            }

            /// Adds another set to this one, field by field.
            pub fn add(&mut self, other: &Self) {
                $(self.$field += other.$field;)*
            }
        }
    };
}

counters! {
    /// What the engine decided. All are totals since start except the gauges
    /// `pending` and `remembered`.
    EngineCounters {
        /// Datagrams handed to the engine.
        received,
        /// Dropped: not a request of any known size.
        bad_size,
        /// Dropped: `self_id == peer_id`.
        self_pair,
        /// Dropped: from an address family this server does not serve.
        bad_family,
        /// Dropped: from an address that cannot be a peer (port 0,
        /// unspecified, multicast, broadcast, IPv4-mapped IPv6).
        bad_source,
        /// New pending registrations.
        registered,
        /// Pending registrations refreshed by a repeated request.
        refreshed,
        /// Pairs matched (each sends two replies).
        matched,
        /// Replies resent to a retransmitted request after its match.
        replayed,
        /// Pending registrations that expired unmatched.
        expired,
        /// Dropped: the table was full and no slot could be taken.
        table_full,
        /// Pending registrations that gave their slot to a registration from
        /// a lighter source (fair admission).
        evicted,
        /// Matches whose replay was cut short to make room for a new
        /// registration (a retransmit after that registers afresh).
        replay_full,
        /// Dropped: the address (IPv4) or /64 (IPv6) holds `--max-pending-per-ip`.
        per_ip_limit,
        /// Dropped: the IPv4 /24 or the IPv6 /56 or /48 holds its limit.
        per_prefix_limit,
        /// Gauge: registrations waiting now.
        pending,
        /// Gauge: matched pairs remembered for replay now.
        remembered,
    }
}

counters! {
    /// What happened on the sockets.
    IoCounters {
        /// Dropped before the engine: the source exceeded its rate limit.
        rate_limited,
        /// Replies handed to the kernel.
        sent,
        /// Replies the kernel refused with an error other than "try again".
        send_errors,
        /// Replies dropped because the send queue was full.
        send_dropped,
        /// Receive calls that failed with an unexpected error.
        recv_errors,
        /// Datagrams the kernel dropped because a socket's receive buffer was
        /// full (read from the kernel's per-socket drop count).
        kernel_drops,
        /// STUN Binding requests answered (on the main port or `--stun-port`).
        stun_answered,
        /// Dropped: STUN that is not a Binding request psync answers
        /// (responses, indications, malformed, bad FINGERPRINT, unknown
        /// required attributes), and anything that is not STUN on `--stun-port`.
        stun_refused,
        /// Dropped by the admission gate: a seed-format request under
        /// `--require-auth`.
        seed_refused,
        /// Dropped by the gate: a datagram of a v2 request's length that is
        /// not a valid v2 request (header, reserved bytes, IDs, candidates).
        v2_malformed,
        /// Dropped by the gate: a v2 request from an address that cannot be
        /// a peer (port 0, unspecified, multicast, broadcast, v4-mapped IPv6).
        v2_bad_source,
        /// Dropped by the gate: a v2 token naming a key that is not loaded.
        auth_failed_unknown_key,
        /// Dropped by the gate: a v2 token past its expiry (plus the skew).
        auth_failed_expired,
        /// Dropped by the gate: a v2 token whose MAC is wrong (forged,
        /// another pair, the other direction).
        auth_failed_bad_mac,
        /// v2 requests with a valid token, handed to the engine.
        v2_admitted,
        /// Cookie replies sent: v2 requests without a valid cookie from a
        /// source over its rate.
        cookie_sent,
        /// v2 requests from a source over its rate let through by a valid
        /// cookie (charged to the validated budget); also in `v2_admitted`
        /// or an `auth_failed_*`.
        cookie_validated,
        /// Cluster: client requests forwarded to the member that owns their pair.
        forwarded_out,
        /// Cluster: requests other members forwarded here (handled by the engine).
        forwarded_in,
        /// Cluster: datagrams from the cluster socket refused (malformed,
        /// unknown sender, stale, bad MAC, replayed).
        forward_rejected,
    }
}

/// Every count the server keeps: the engine's and the sockets'. `received`
/// counts every datagram read: those the rate limiter dropped, the STUN
/// requests answered or refused, those the admission gate dropped or
/// answered with a cookie, those forwarded to the cluster member that owns
/// their pair, and those handed to the engine (which include requests other
/// members forwarded here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received.
    pub received: u64,
    /// The engine's counters (its `received` is what it was handed).
    pub engine: EngineCounters,
    /// The sockets' counters.
    pub io: IoCounters,
}

impl Counters {
    /// The two sets together.
    pub fn new(engine: EngineCounters, io: IoCounters) -> Counters {
        Counters {
            received: engine.received
                + io.rate_limited
                + io.stun_answered
                + io.stun_refused
                + io.seed_refused
                + io.v2_malformed
                + io.v2_bad_source
                + io.auth_failed_unknown_key
                + io.auth_failed_expired
                + io.auth_failed_bad_mac
                + io.cookie_sent
                + io.forwarded_out,
            engine,
            io,
        }
    }

    /// Adds another set (another worker's) to this one.
    pub fn add(&mut self, other: &Counters) {
        self.engine.add(&other.engine);
        self.io.add(&other.io);
        self.received += other.received;
    }

    /// Every counter with its name, in a stable order (for printing and
    /// metrics): `received`, then the engine's, then the sockets'.
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        let mut v = vec![("received", self.received)];
        v.extend(self.engine.fields().into_iter().skip(1));
        v.extend(self.io.fields());
        v
    }

    /// The value of the counter `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.fields()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
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

    /// Adds another histogram's waits (another worker's) to this one.
    pub fn add(&mut self, other: &WaitHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum_ms += other.sum_ms;
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
        let mut twice = h;
        twice.add(&h);
        assert_eq!((twice.count(), twice.sum_ms()), (10, 240_008));
        assert_eq!(twice.buckets().nth(13), Some((None, 2)));
    }
}
