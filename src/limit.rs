//! Per-source rate limiting: a token bucket per source, in a fixed table.
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
//! No clock, no I/O, no allocation after [`RateLimiter::new`].

use std::net::IpAddr;

use crate::table::{keyed_hash, Millis, Table};

/// Ways per set: a new source can evict only the least recently seen of these.
const WAYS: usize = 4;
/// Tokens are kept in thousandths so that rates below one per millisecond work.
const SCALE: u64 = 1000;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Source key with the top bit set; 0 marks an unused way.
    key: u64,
    /// Thousandths of a token.
    tokens: u64,
    /// Last time this bucket was refilled, in ms.
    last: u32,
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

/// Token buckets for a fixed number of sources.
pub struct RateLimiter {
    sets: Box<[[Bucket; WAYS]]>,
    /// Thousandths of a token earned per millisecond.
    refill_per_ms: u64,
    burst: u64,
    seed: [u64; 2],
}

impl RateLimiter {
    /// Allocates the table; `None` when `cfg.per_second` is 0 (no limit).
    pub fn new(cfg: RateLimit, seed: [u64; 2]) -> Option<RateLimiter> {
        if cfg.per_second == 0 {
            return None;
        }
        let sets = cfg.sources.div_ceil(WAYS).max(1);
        Some(RateLimiter {
            sets: vec![[Bucket::default(); WAYS]; sets].into_boxed_slice(),
            // per_second tokens per 1000 ms, in thousandths: per_second per ms.
            refill_per_ms: u64::from(cfg.per_second),
            burst: u64::from(cfg.burst.max(1)) * SCALE,
            seed: [seed[0], seed[1] | 1],
        })
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.sets)
    }

    /// Takes one token for `ip` at `now` (ms); false when the source is over
    /// its rate and the datagram should be dropped.
    #[inline]
    pub fn allow(&mut self, ip: IpAddr, now: u32) -> bool {
        let key = source_key(ip) | (1 << 63);
        let h = keyed_hash(key, self.seed);
        let set = &mut self.sets[((u128::from(h) * self.sets.len() as u128) >> 64) as usize];
        let way = match set.iter().position(|b| b.key == key) {
            Some(w) => w,
            None => {
                // Evict the way idle longest (an unused way has key 0 and is
                // taken first).
                let w = (0..WAYS)
                    .max_by_key(|&w| {
                        if set[w].key == 0 {
                            u32::MAX
                        } else {
                            now.wrapping_sub(set[w].last)
                        }
                    })
                    .unwrap_or(0);
                set[w] = Bucket {
                    key,
                    tokens: self.burst,
                    last: now,
                };
                w
            }
        };
        let b = &mut set[way];
        let elapsed = u64::from(now.wrapping_sub(b.last).min(1 << 30));
        b.tokens = (b.tokens + elapsed * self.refill_per_ms).min(self.burst);
        b.last = now;
        if b.tokens >= SCALE {
            b.tokens -= SCALE;
            true
        } else {
            false
        }
    }
}

/// The source an address belongs to: the IPv4 address, or the IPv6 /64.
/// The two families cannot collide: IPv4 keys have bit 62 set, which no
/// routable IPv6 /64 (2000::/3) has.
pub fn source_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => (1 << 62) | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            u64::from_be_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]) & !(3 << 62)
        }
    }
}

/// Slots in a source's sliding window; the window spans the lifetime.
const WINDOW_SLOTS: usize = 8;
/// Windows beyond twice the capacity, so tiny tables have room to turn over.
const WINDOW_SLACK: usize = 64;
/// Most window slots one refused registration may sweep to make room.
const ROOM_SWEEP: usize = 4096;

/// Registrations a source made in each slice of the last lifetime.
#[derive(Clone, Copy, Default)]
struct Window {
    /// Slot number of `counts[head % WINDOW_SLOTS]`, the newest slot.
    head: u32,
    counts: [u16; WINDOW_SLOTS],
}

/// Counts the pending registrations each source holds, to enforce
/// `--max-pending-per-ip` (at most 65,535).
///
/// A registration is counted in the time slot of its (last) registration;
/// slots older than the lifetime fall out of the window, which is how expired
/// registrations stop counting without any work at expiry. A match or a
/// refresh takes its registration out of its slot, and a window whose counts
/// are all zero is dropped. The count is exact except that an expired
/// registration still counts until its slot leaves the window: at most two
/// slots (a slot is lifetime / 7 rounded up to a power of two milliseconds)
/// late, erring on the safe side.
///
/// The window table holds twice the pending capacity (plus a little): every
/// window counts at least one registration that is pending or expired less
/// than two slots ago, and at most `capacity` registrations are pending, so
/// even a table turning over at full speed needs about 1.6 times capacity.
/// Should it still fill, a bounded sweep makes room, and failing that a new
/// source is refused rather than left uncounted: the limit fails closed.
pub struct PendingPerSource {
    windows: Table<Window>,
    max: u16,
    ttl: u32,
    /// A slot is `1 << shift` ms: a power of two, so that slot numbers stay
    /// continuous when the 32-bit clock wraps (mod `mask + 1`).
    shift: u32,
    mask: u32,
    /// Slots that can hold a live registration: the newest plus enough older
    /// ones to cover the lifetime (at most `WINDOW_SLOTS`).
    span: u32,
}

impl PendingPerSource {
    /// Room for `sources` sources (the pending capacity: every registration
    /// has one source), `max` registrations each, lifetime `ttl_ms`.
    pub fn new(sources: usize, max: u16, ttl_ms: u32, seed: [u64; 2]) -> PendingPerSource {
        // The newest slot plus seven older ones must span the lifetime.
        let shift = ttl_ms
            .div_ceil(WINDOW_SLOTS as u32 - 1)
            .max(1)
            .next_power_of_two()
            .trailing_zeros();
        PendingPerSource {
            windows: Table::new(2 * sources + WINDOW_SLACK, seed, (ttl_ms / 4).max(1)),
            max,
            ttl: ttl_ms,
            shift,
            mask: u32::MAX >> shift,
            span: ttl_ms.div_ceil(1 << shift) + 1,
        }
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.windows.allocated_bytes()
    }

    /// One bounded turn of reclaiming windows whose registrations have all
    /// expired (see [`Table::expire`]). True when work is still owed.
    pub fn expire(&mut self, now: Millis) -> bool {
        self.windows.expire(now)
    }

    /// Sources with a window held (including stale ones not yet reclaimed).
    pub fn sources(&self) -> usize {
        self.windows.len()
    }

    fn slot(&self, t: Millis) -> u32 {
        t >> self.shift
    }

    /// Slots from `older` to `newer`, across the clock's wrap.
    fn age(&self, newer: u32, older: u32) -> u32 {
        newer.wrapping_sub(older) & self.mask
    }

    /// How long a window must be kept after its newest registration.
    fn keep(&self) -> u32 {
        self.ttl + (1 << self.shift)
    }

    /// Registrations `source` holds now (never less than the truth), or
    /// `None` when it has no window.
    fn held(&mut self, source: u64, now: Millis) -> Option<u32> {
        let slot = self.slot(now);
        let (mask, span) = (self.mask, self.span);
        let w = self.windows.get(source, now)?;
        Some(
            live(w, slot, mask, span)
                .iter()
                .map(|&c| u32::from(c))
                .sum(),
        )
    }

    /// Registrations `source` holds now (never less than the truth).
    pub fn count(&mut self, source: u64, now: Millis) -> u32 {
        self.held(source, now).unwrap_or(0)
    }

    /// True when `source` may add one more registration: it is under the
    /// limit, and its registration can be counted.
    pub fn allows(&mut self, source: u64, now: Millis) -> bool {
        match self.held(source, now) {
            Some(n) => n < u32::from(self.max),
            None => {
                if self.windows.len() >= self.windows.capacity() {
                    self.windows.sweep(now, ROOM_SWEEP);
                }
                self.windows.len() < self.windows.capacity()
            }
        }
    }

    /// Counts a registration made by `source` at `now`.
    pub fn add(&mut self, source: u64, now: Millis) {
        let slot = self.slot(now);
        let mut w = self.windows.get(source, now).copied().unwrap_or_default();
        w.counts = live(&w, slot, self.mask, self.span);
        w.head = slot;
        let c = &mut w.counts[slot as usize % WINDOW_SLOTS];
        *c = c.saturating_add(1);
        // Keep the window as long as its newest registration can live.
        let expires = now.wrapping_add(self.keep());
        self.windows.insert(source, w, expires, now);
    }

    /// Uncounts a registration of `source` that was made at `registered`
    /// (its expiry minus the lifetime) and has left the table.
    pub fn remove(&mut self, source: u64, registered: Millis, now: Millis) {
        let slot = self.slot(now);
        let reg_slot = self.slot(registered);
        let Some(&old) = self.windows.get(source, now) else {
            return;
        };
        let mut w = Window {
            head: slot,
            counts: live(&old, slot, self.mask, self.span),
        };
        if self.age(slot, reg_slot) < self.span {
            let c = &mut w.counts[reg_slot as usize % WINDOW_SLOTS];
            *c = c.saturating_sub(1);
        }
        if w.counts.iter().all(|&c| c == 0) {
            // Nothing left to count: free the window for another source.
            self.windows.remove(source, now);
            return;
        }
        // A live key is replaced in place, never refused. Extending the
        // window's life by a little is harmless: it only ever overcounts.
        let expires = now.wrapping_add(self.keep());
        self.windows.insert(source, w, expires, now);
    }
}

/// The window's counts as of `slot`: only the `span` newest slots can hold
/// live registrations, the others are zeroed. Slot numbers live modulo
/// `mask + 1`, a multiple of `WINDOW_SLOTS`, so the ring index stays right
/// across the clock's wrap.
fn live(w: &Window, slot: u32, mask: u32, span: u32) -> [u16; WINDOW_SLOTS] {
    let mut counts = w.counts;
    let advance = slot.wrapping_sub(w.head) & mask;
    if advance >= span {
        return [0; WINDOW_SLOTS];
    }
    // Slots from the head up to now start empty; slots older than the span
    // hold only dead registrations.
    for k in 1..=advance {
        counts[(w.head.wrapping_add(k) & mask) as usize % WINDOW_SLOTS] = 0;
    }
    for age in span..WINDOW_SLOTS as u32 {
        counts[(slot.wrapping_sub(age) & mask) as usize % WINDOW_SLOTS] = 0;
    }
    counts
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

    #[test]
    fn pending_per_source_counts_and_forgets() {
        let mut p = PendingPerSource::new(16, 3, 700, [3, 4]);
        let src = source_key("192.0.2.1".parse().unwrap());
        let other = source_key("192.0.2.2".parse().unwrap());
        for t in [0, 10, 20] {
            assert!(p.allows(src, t));
            p.add(src, t);
        }
        assert!(!p.allows(src, 30), "three held, max three");
        assert!(p.allows(other, 30), "other sources unaffected");
        // One matched: room again.
        p.remove(src, 10, 40);
        assert_eq!(p.count(src, 40), 2);
        assert!(p.allows(src, 40));
        // Unmatched ones stop counting once their lifetime has passed, plus
        // at most two slots (a slot is 700 / 7 rounded up to 128 ms).
        assert_eq!(p.count(src, 699), 2);
        assert_eq!(p.sources(), 1);
        assert_eq!(p.count(src, 700 + 2 * 128), 0);
        // The window is dropped once nothing in it can be alive.
        p.expire(1000);
        p.expire(2000);
        assert_eq!(p.sources(), 0);
    }

    #[test]
    fn pending_per_source_moves_with_refreshes() {
        let mut p = PendingPerSource::new(16, 2, 700, [3, 4]);
        let src = source_key("192.0.2.1".parse().unwrap());
        p.add(src, 0);
        // A refresh at 650 keeps the registration alive until 1350: it must
        // still count at 1000.
        p.remove(src, 0, 650);
        p.add(src, 650);
        assert_eq!(p.count(src, 1000), 1);
        assert_eq!(p.count(src, 650 + 700 + 2 * 128), 0);
    }

    #[test]
    fn empty_windows_are_freed_and_a_full_table_fails_closed() {
        // Room for 0 * 2 + 64 windows.
        let mut p = PendingPerSource::new(0, 1, 700, [3, 4]);
        let key = |i: u8| source_key(IpAddr::from([192, 0, 2, i]));
        p.add(key(1), 0);
        p.remove(key(1), 0, 1);
        assert_eq!(p.sources(), 0, "a window counting nothing is dropped");
        for i in 1..=64 {
            assert!(p.allows(key(i), 2));
            p.add(key(i), 2);
        }
        assert!(!p.allows(key(65), 2), "no room to count another source");
        assert!(!p.allows(key(1), 2), "and the first is at its limit");
        p.remove(key(2), 2, 3);
        assert!(p.allows(key(65), 3));
        // Once the registrations are surely dead, the sweep makes room.
        assert!(p.allows(key(66), 2000));
    }

    #[test]
    fn expired_registrations_stop_counting_within_two_slots() {
        // ttl 30 s: slots of 8192 ms, five of them can hold live entries.
        let mut p = PendingPerSource::new(16, 2, 30_000, [3, 4]);
        let src = source_key("192.0.2.1".parse().unwrap());
        p.add(src, 0);
        p.add(src, 30_000);
        // The first expired at 30 000: by 30 000 + 2 slots it no longer counts.
        assert_eq!(p.count(src, 30_000 + 2 * 8192), 1);
        assert!(p.allows(src, 61_000));
    }
}
