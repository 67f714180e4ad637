//! Per-source rate limiting: a token bucket per source, in a fixed table.
//! This is the server loop's first check on every datagram; the engine's
//! pending counts per source are a different thing (`engine::source`).
//!
//! A public rendezvous port meets floods. [`RateLimiter::allow`] is asked
//! about every datagram before anything else is done with it; a source over
//! its rate is dropped and counted (`rate_limited`). Sources are IPv4
//! addresses and IPv6 /64 prefixes (one IPv6 host usually owns a whole /64,
//! so limiting single addresses would limit nothing).
//!
//! The table is set-associative (4 ways) and allocated once: it tracks a
//! fixed number of sources, and a new source evicts the way that was idle
//! longest. Eviction only ever *forgets* a source, which then starts again
//! with a full bucket; a source that sends steadily is never forgotten while
//! less active ones remain in its set. Keys are hashed with a secret seed so a
//! sender cannot aim many sources at one set.
//!
//! With several workers (`--workers`), each worker has its own limiter and
//! enforces a *share* of the limit ([`RateLimiter::shared_by`]); the server
//! moves shares to where a source's traffic goes (`server/shares.rs`) with
//! [`RateLimiter::set_share`], after asking each worker what the source
//! asked of it lately ([`RateLimiter::measure`]).
//!
//! No clock, no I/O, no allocation after [`RateLimiter::new`].

use std::net::IpAddr;

use crate::engine::source::{prefixes, Overrides, Prefix, MAX_OVERRIDES};
use crate::table::keyed_hash;

/// Ways per set: a new source can evict only the least recently seen of these.
const WAYS: usize = 4;
/// Tokens are kept in thousandths so that rates below one per millisecond work.
const SCALE: u64 = 1000;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// The source's prefix bits (an IPv4 address or an IPv6 /64).
    bits: u64,
    /// Thousandths of a token.
    tokens: u64,
    /// Last time this bucket was refilled, in ms.
    last: u32,
    /// Datagrams seen (allowed or not) since `since`: what the source asks
    /// of this limiter, for [`RateLimiter::measure`].
    seen: u32,
    /// When `seen` started counting, in ms.
    since: u32,
    /// The prefix's level (`Level as u8`); 0 marks an unused way. With the
    /// bits, a key that cannot collide with another source's.
    level: u8,
}

/// One set of ways: 128 bytes, aligned to two whole cache lines, both of
/// which [`RateLimiter::prefetch`] fetches.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Set([Bucket; WAYS]);

const _: () = assert!(std::mem::size_of::<Set>() == 128);

/// A sustained rate and a burst: a whole limit or one worker's share of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Datagrams per second.
    pub per_second: u32,
    /// Datagrams at once after being idle.
    pub burst: u32,
}

/// What one source asked of a limiter since the last [`RateLimiter::measure`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Datagrams seen, allowed or not.
    pub seen: u32,
    /// Over how many milliseconds (0 when the limiter does not know the source).
    pub over_ms: u32,
}

/// How the limiter is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained datagrams per second allowed per source; 0 turns limiting off.
    pub per_second: u32,
    /// Datagrams a source may send at once after being idle.
    pub burst: u32,
    /// Sources tracked at once (rounded up to a multiple of 4).
    pub sources: usize,
}

impl RateLimit {
    /// Limiting off.
    pub const OFF: RateLimit = RateLimit {
        per_second: 0,
        burst: 0,
        sources: 0,
    };
}

impl Default for RateLimit {
    /// The public-server defaults: 100 datagrams/s per source with bursts of
    /// 200, tracking 65,536 sources (1.5 MiB). A peer needs a handful of
    /// datagrams per rendezvous, so only floods (or thousands of peers behind
    /// one address) meet this limit.
    fn default() -> Self {
        RateLimit {
            per_second: 100,
            burst: 200,
            sources: 1 << 16,
        }
    }
}

/// The source a datagram is rate limited as: its IPv4 address or IPv6 /64.
pub fn source(ip: IpAddr) -> Prefix {
    prefixes(ip).0[0]
}

/// Token buckets for a fixed number of sources.
pub struct RateLimiter {
    sets: Box<[Set]>,
    /// The limit as configured, for the whole server.
    whole: Rate,
    /// What this limiter allows a source without a share of its own.
    share: Rate,
    /// Sources with a share of their own.
    overrides: Overrides<Rate>,
    seed: [u64; 2],
}

impl RateLimiter {
    /// Allocates the table; `None` when `cfg.per_second` is 0 (no limit).
    pub fn new(cfg: RateLimit, seed: [u64; 2]) -> Option<RateLimiter> {
        if cfg.per_second == 0 {
            return None;
        }
        let sets = cfg.sources.div_ceil(WAYS).max(1);
        let whole = Rate {
            per_second: cfg.per_second,
            burst: cfg.burst.max(1),
        };
        Some(RateLimiter {
            sets: vec![Set::default(); sets].into_boxed_slice(),
            whole,
            share: whole,
            overrides: Overrides::new(MAX_OVERRIDES),
            seed: [seed[0], seed[1] | 1],
        })
    }

    /// Makes this limiter one of `workers` that share every source's limit:
    /// by default it allows each source `ceil(1/workers)` of the rate and of
    /// the burst, so a source spread evenly over all of them gets the whole
    /// limit (within `workers - 1` datagrams of rounding).
    pub fn shared_by(&mut self, workers: u32) {
        let w = workers.max(1);
        self.share = Rate {
            per_second: self.whole.per_second.div_ceil(w),
            burst: self.whole.burst.div_ceil(w),
        };
    }

    /// The limit for the whole server, as configured.
    pub fn whole(&self) -> Rate {
        self.whole
    }

    /// The share of `src` here: its own, or the default.
    #[inline]
    pub fn share_of(&self, src: Prefix) -> Rate {
        self.overrides.get(src).unwrap_or(self.share)
    }

    /// True when `ip`'s share here is less than the whole limit, so that a
    /// refusal here may not be the source's fault.
    pub fn share_limited(&self, ip: IpAddr) -> bool {
        let s = self.share_of(source(ip));
        s.per_second < self.whole.per_second || s.burst < self.whole.burst
    }

    /// Gives `src` a share of its own here (`None`: back to the default).
    /// False, and nothing changed, when [`MAX_OVERRIDES`] sources already
    /// have one and `src` does not.
    pub fn set_share(&mut self, src: Prefix, share: Option<Rate>) -> bool {
        self.overrides.set(src, share)
    }

    /// What `src` asked of this limiter since the last call (or since this
    /// limiter first saw it), and starts counting afresh at `now`.
    pub fn measure(&mut self, src: Prefix, now: u32) -> Demand {
        let i = self.set_of(src);
        let level = src.level as u8;
        match self.sets[i]
            .0
            .iter_mut()
            .find(|b| b.level == level && b.bits == src.bits)
        {
            Some(b) => {
                let d = Demand {
                    seen: b.seen,
                    over_ms: now.wrapping_sub(b.since).min(1 << 30),
                };
                b.seen = 0;
                b.since = now;
                d
            }
            None => Demand::default(),
        }
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.sets)
    }

    #[inline]
    fn set_of(&self, p: Prefix) -> usize {
        let h = keyed_hash(p.bits ^ u64::from(p.level as u8) << 56, self.seed);
        ((u128::from(h) * self.sets.len() as u128) >> 64) as usize
    }

    /// Fetches into cache the set `ip`'s bucket lives in.
    #[inline]
    pub fn prefetch(&self, ip: IpAddr) {
        let set: *const Set = &self.sets[self.set_of(source(ip))];
        crate::sys::prefetch(set.cast());
        crate::sys::prefetch(set.cast::<u8>().wrapping_add(64));
    }

    /// Takes one token for `ip` at `now` (ms); false when the source is over
    /// its rate and the datagram should be dropped.
    #[inline]
    pub fn allow(&mut self, ip: IpAddr, now: u32) -> bool {
        let p = source(ip);
        let level = p.level as u8;
        let share = self.share_of(p);
        // per_second tokens per 1000 ms, in thousandths: per_second per ms.
        let refill_per_ms = u64::from(share.per_second);
        let burst = u64::from(share.burst) * SCALE;
        let i = self.set_of(p);
        let set = &mut self.sets[i].0;
        let way = match set
            .iter()
            .position(|b| b.level == level && b.bits == p.bits)
        {
            Some(w) => w,
            None => {
                // Evict the way idle longest (an unused way has level 0 and
                // is taken first).
                let w = (0..WAYS)
                    .max_by_key(|&w| {
                        if set[w].level == 0 {
                            u32::MAX
                        } else {
                            now.wrapping_sub(set[w].last)
                        }
                    })
                    .unwrap_or(0);
                set[w] = Bucket {
                    bits: p.bits,
                    level,
                    tokens: burst,
                    last: now,
                    seen: 0,
                    since: now,
                };
                w
            }
        };
        let b = &mut set[way];
        b.seen = b.seen.saturating_add(1);
        let elapsed = u64::from(now.wrapping_sub(b.last).min(1 << 30));
        b.tokens = (b.tokens + elapsed * refill_per_ms).min(burst);
        b.last = now;
        if b.tokens >= SCALE {
            b.tokens -= SCALE;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32, sources: usize) -> RateLimiter {
        RateLimiter::new(
            RateLimit {
                per_second,
                burst,
                sources,
            },
            [1, 2],
        )
        .unwrap()
    }

    #[test]
    fn off_means_no_table() {
        assert!(RateLimiter::new(RateLimit::OFF, [0, 0]).is_none());
    }

    #[test]
    fn burst_then_steady_rate() {
        let mut l = limiter(100, 10, 64);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..20).filter(|_| l.allow(ip, 0)).count(), 10);
        // 100/s is one per 10 ms.
        assert!(!l.allow(ip, 5));
        assert!(l.allow(ip, 15));
        assert!(!l.allow(ip, 16));
        // Idle until 1000 refills the burst (10); then over one second at
        // twice the rate, half get through: about 10 + 100.
        let allowed = (0..200).filter(|i| l.allow(ip, 1000 + i * 5)).count();
        assert!((108..=111).contains(&allowed), "{allowed}");
    }

    #[test]
    fn sources_are_independent() {
        let mut l = limiter(1, 1, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.allow(a, 0));
        assert!(!l.allow(a, 0));
        assert!(l.allow(b, 0));
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let mut l = limiter(1, 1, 64);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.allow(a, 0));
        assert!(!l.allow(b, 0), "same /64 shares a bucket");
        assert!(l.allow(c, 0));
    }

    #[test]
    fn networks_that_differ_in_their_top_bits_do_not_share_a_bucket() {
        // The old key dropped the top two bits of a /64.
        for (a, b) in [
            ("fd00:1:2:3::1", "3d00:1:2:3::1"),
            ("2001:db8:1:2::1", "6001:db8:1:2::1"),
            ("2001:db8:1:2::1", "a001:db8:1:2::1"),
        ] {
            let mut l = limiter(1, 1, 64);
            assert!(l.allow(a.parse().unwrap(), 0));
            assert!(!l.allow(a.parse().unwrap(), 0));
            assert!(l.allow(b.parse().unwrap(), 0), "{b} shares {a}'s bucket");
        }
    }

    #[test]
    fn shares_split_the_limit_and_move_where_asked() {
        let mut l = limiter(100, 40, 64);
        l.shared_by(4);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let src = source(a);
        assert_eq!(
            l.share_of(src),
            Rate {
                per_second: 25,
                burst: 10
            }
        );
        assert!(l.share_limited(a));
        assert_eq!((0..40).filter(|_| l.allow(a, 0)).count(), 10);
        // 40 seen over the 200 ms since the source was first seen.
        assert_eq!(
            l.measure(src, 200),
            Demand {
                seen: 40,
                over_ms: 200
            }
        );
        assert_eq!(
            l.measure(src, 300),
            Demand {
                seen: 0,
                over_ms: 100
            }
        );
        // Given the whole limit here: the burst refills to 40.
        assert!(l.set_share(src, Some(l.whole())));
        assert!(!l.share_limited(a));
        assert_eq!((0..60).filter(|_| l.allow(a, 10_000)).count(), 40);
        // Another source keeps the default; back to it, so does this one.
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((0..40).filter(|_| l.allow(b, 10_000)).count(), 10);
        assert!(l.set_share(src, None));
        assert_eq!((0..40).filter(|_| l.allow(a, 20_000)).count(), 10);
        // Unknown sources measure as nothing.
        assert_eq!(
            l.measure(source("198.51.100.1".parse().unwrap()), 5),
            Demand::default()
        );
    }

    #[test]
    fn an_active_source_survives_churn_in_its_set() {
        // One set of four ways: the busy source stays while others churn.
        let mut l = limiter(1, 2, 4);
        let busy: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.allow(busy, 0));
        assert!(l.allow(busy, 0));
        for i in 0..100u32 {
            let other = IpAddr::from([198, 51, 100, i as u8]);
            l.allow(other, 1 + i);
            // The busy source keeps sending, so it is never the idlest way.
            assert!(!l.allow(busy, 1 + i), "forgotten at {i}");
        }
    }
}
