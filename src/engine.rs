//! The matching engine: pending registrations, the replay cache, port choice.
//!
//! [`Engine::handle`] takes one datagram, its source address and the time, and
//! says what to send. It owns no socket and reads no clock, so it is tested and
//! benchmarked without a network. It never allocates after [`Engine::new`].
//!
//! Rules (PROTOCOL.md is the contract):
//! - a request `(A, B)` waits until `(B, A)` arrives from the same address family;
//! - the match picks two distinct ports `P1 != P2` from the port range; the peer
//!   that waited gets `{src: P1, dst: P2, peer: completer}`, the completer gets
//!   `{src: P2, dst: P1, peer: waiter}`;
//! - after a match both replies are remembered for the replay lifetime: the same
//!   request from the same address gets the same reply again;
//! - a repeated request while pending refreshes its expiry and takes the newest
//!   source address;
//! - at capacity a new registration is refused, never a live one evicted.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use rand_xoshiro::rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::limit::{source_key, PendingPerSource};
use crate::stats::{Counters, WaitHistogram};
use crate::table::{Inserted, Millis, Table};
use crate::wire::{Reply, Request, WireError};

/// How the engine is sized and behaves.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most pending registrations held at once, both families together.
    pub capacity: usize,
    /// Most matched requests remembered for replay, per family.
    pub replay_capacity: usize,
    /// How long a registration waits for its partner, in milliseconds.
    pub ttl_ms: u32,
    /// How long a match's replies are replayed to retransmits, in milliseconds.
    pub replay_ttl_ms: u32,
    /// Lowest port handed out.
    pub port_lo: u16,
    /// Highest port handed out (at least `port_lo + 1`).
    pub port_hi: u16,
    /// Seed for ports and the table hash; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Serve IPv4 peers (allocates the IPv4 tables).
    pub ipv4: bool,
    /// Serve IPv6 peers (allocates the IPv6 tables).
    pub ipv6: bool,
    /// Most registrations one source (IPv4 address or IPv6 /64) may hold
    /// pending; 0 for no limit. At most 65,535.
    pub max_pending_per_source: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            capacity: 1 << 20,
            replay_capacity: 1 << 20,
            ttl_ms: 30_000,
            replay_ttl_ms: 10_000,
            port_lo: 1024,
            port_hi: 65535,
            seed: None,
            ipv4: true,
            ipv6: true,
            max_pending_per_source: 1000,
        }
    }
}

/// Parses a port range written `LO-HI` (inclusive), as `--port-range` takes
/// it: at least two ports, none of them 0. The error says what is wrong.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not LO-HI"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("'{p}' is not a port number"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || hi <= lo {
        return Err(format!(
            "{lo}-{hi} must hold at least two ports, none of them 0"
        ));
    }
    Ok((lo, hi))
}

/// Longest lifetime the engine accepts: the table's clock compares with
/// wrapping 32-bit milliseconds and needs lifetimes far below 2^31 ms.
pub const MAX_LIFETIME_MS: u32 = 24 * 3600 * 1000;

/// Why a datagram got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Not exactly 8 bytes.
    BadSize,
    /// `self_id == peer_id`.
    SelfPair,
    /// The pending table is at capacity.
    TableFull,
    /// The source's address family is not served.
    Family,
    /// The source already holds its maximum of pending registrations.
    PerSourceLimit,
}

/// One reply and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Send {
    /// The peer's public address, the source of its request.
    pub to: SocketAddr,
    /// What it is told.
    pub reply: Reply,
}

/// What handling one datagram produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Dropped without a reply.
    Dropped(Drop),
    /// A new pending registration.
    Registered,
    /// A pending registration was refreshed (and took the newest address).
    Refreshed,
    /// A retransmit after a match: the same reply again.
    Replayed(Send),
    /// The partner was waiting: a reply to each.
    Matched {
        /// The reply to the peer that was waiting.
        waiting: Send,
        /// The reply to the peer whose request completed the pair.
        completing: Send,
    },
}

/// An address stored in a table entry: the compact form of one family.
trait PeerAddr: Copy + Default + PartialEq {
    fn from_socket(addr: SocketAddr) -> Option<Self>;
    fn to_socket(self) -> SocketAddr;
    /// The source this address counts against for per-source limits.
    fn source(self) -> u64 {
        source_key(self.to_socket().ip())
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct V4 {
    ip: [u8; 4],
    port: [u8; 2],
}

impl PeerAddr for V4 {
    fn from_socket(addr: SocketAddr) -> Option<V4> {
        match addr {
            SocketAddr::V4(a) => Some(V4 {
                ip: a.ip().octets(),
                port: a.port().to_ne_bytes(),
            }),
            SocketAddr::V6(_) => None,
        }
    }
    fn to_socket(self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(self.ip),
            u16::from_ne_bytes(self.port),
        ))
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct V6 {
    ip: [u8; 16],
    port: [u8; 2],
}

impl PeerAddr for V6 {
    fn from_socket(addr: SocketAddr) -> Option<V6> {
        match addr {
            SocketAddr::V6(a) => Some(V6 {
                ip: a.ip().octets(),
                port: a.port().to_ne_bytes(),
            }),
            SocketAddr::V4(_) => None,
        }
    }
    fn to_socket(self) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(self.ip),
            u16::from_ne_bytes(self.port),
            0,
            0,
        ))
    }
}

/// A remembered match, from one side: who asked, and what they were told.
#[derive(Clone, Copy, Default)]
struct Matched<A> {
    asker: A,
    partner: A,
    src_port: u16,
    dst_port: u16,
}

/// The tables of one address family.
struct Family<A: PeerAddr> {
    pending: Table<A>,
    replay: Table<Matched<A>>,
}

impl<A: PeerAddr> Family<A> {
    fn new(cfg: &EngineConfig, enabled: bool, seeds: [u64; 4]) -> Family<A> {
        let (cap, replay_cap) = if enabled {
            (cfg.capacity, cfg.replay_capacity)
        } else {
            (0, 0)
        };
        Family {
            pending: Table::new(cap, [seeds[0], seeds[1]], sweep_period(cfg.ttl_ms)),
            replay: Table::new(
                replay_cap,
                [seeds[2], seeds[3]],
                sweep_period(cfg.replay_ttl_ms),
            ),
        }
    }
}

/// A full sweep every quarter lifetime: expired entries linger at most that long.
fn sweep_period(lifetime_ms: u32) -> u32 {
    (lifetime_ms / 4).max(1)
}

/// The rendezvous state machine. See the module docs for its rules.
pub struct Engine {
    v4: Family<V4>,
    v6: Family<V6>,
    capacity: usize,
    ttl: u32,
    replay_ttl: u32,
    port_lo: u16,
    port_span: u32,
    rng: Xoshiro256PlusPlus,
    per_source: Option<PendingPerSource>,
    /// Event counts; the I/O layer adds its own (`sent`, `send_errors`, …).
    pub counters: Counters,
    /// How long the first peer of each matched pair waited (since its last
    /// registration or refresh).
    pub wait: WaitHistogram,
}

/// Why an [`EngineConfig`] cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `capacity` is zero.
    #[error("--capacity must be at least 1")]
    ZeroCapacity,
    /// The port range has fewer than two ports or starts at zero.
    #[error("--port-range {0}-{1} must hold at least two ports, none of them 0")]
    PortRange(u16, u16),
    /// A lifetime is zero or longer than [`MAX_LIFETIME_MS`].
    #[error("--{0} must be between 1 ms and 24 hours")]
    Lifetime(&'static str),
    /// Neither family enabled.
    #[error("no address family enabled")]
    NoFamily,
    /// `max_pending_per_source` above 65,535.
    #[error("--max-pending-per-ip must be at most 65535 (0 turns the limit off)")]
    PerSource,
}

impl Engine {
    /// Checks `cfg` and allocates every table.
    pub fn new(cfg: &EngineConfig) -> Result<Engine, ConfigError> {
        if cfg.capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        if cfg.port_lo == 0 || cfg.port_hi <= cfg.port_lo {
            return Err(ConfigError::PortRange(cfg.port_lo, cfg.port_hi));
        }
        if cfg.ttl_ms == 0 || cfg.ttl_ms > MAX_LIFETIME_MS {
            return Err(ConfigError::Lifetime("ttl"));
        }
        if cfg.replay_ttl_ms == 0 || cfg.replay_ttl_ms > MAX_LIFETIME_MS {
            return Err(ConfigError::Lifetime("replay-ttl"));
        }
        if !cfg.ipv4 && !cfg.ipv6 {
            return Err(ConfigError::NoFamily);
        }
        let max_per_source =
            u16::try_from(cfg.max_pending_per_source).map_err(|_| ConfigError::PerSource)?;
        let mut rng = match cfg.seed {
            Some(seed) => Xoshiro256PlusPlus::seed_from_u64(seed),
            None => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).expect("the OS random source failed");
                Xoshiro256PlusPlus::from_seed(seed)
            }
        };
        let mut seeds = || std::array::from_fn(|_| rng.next_u64());
        let v4 = Family::new(cfg, cfg.ipv4, seeds());
        let v6 = Family::new(cfg, cfg.ipv6, seeds());
        let per_source = (max_per_source > 0).then(|| {
            let s: [u64; 4] = seeds();
            PendingPerSource::new(cfg.capacity, max_per_source, cfg.ttl_ms, [s[0], s[1]])
        });
        Ok(Engine {
            v4,
            v6,
            capacity: cfg.capacity,
            ttl: cfg.ttl_ms,
            replay_ttl: cfg.replay_ttl_ms,
            port_lo: cfg.port_lo,
            port_span: u32::from(cfg.port_hi - cfg.port_lo) + 1,
            rng,
            per_source,
            counters: Counters::default(),
            wait: WaitHistogram::default(),
        })
    }

    /// Pending registrations held (including expired ones not yet reclaimed).
    pub fn pending(&self) -> usize {
        self.v4.pending.len() + self.v6.pending.len()
    }

    /// Matches remembered for replay.
    pub fn replay_entries(&self) -> usize {
        self.v4.replay.len() + self.v6.replay.len()
    }

    /// The most pending registrations held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated by all tables.
    pub fn allocated_bytes(&self) -> usize {
        self.per_source.as_ref().map_or(0, |p| p.allocated_bytes())
            + self.v4.pending.allocated_bytes()
            + self.v4.replay.allocated_bytes()
            + self.v6.pending.allocated_bytes()
            + self.v6.replay.allocated_bytes()
    }

    /// Handles one datagram from `src` received at `now` (milliseconds on the
    /// caller's monotonic clock). Updates the counters.
    pub fn handle(&mut self, datagram: &[u8], src: SocketAddr, now: u64) -> Outcome {
        let now = now as Millis;
        self.counters.received += 1;
        let req = match Request::parse(datagram) {
            Ok(req) => req,
            Err(WireError::SelfPair) => {
                self.counters.self_pair += 1;
                return Outcome::Dropped(Drop::SelfPair);
            }
            Err(_) => {
                self.counters.bad_size += 1;
                return Outcome::Dropped(Drop::BadSize);
            }
        };
        let mut cx = Context {
            full: self.pending() >= self.capacity,
            t: Times {
                now,
                ttl: self.ttl,
                replay_ttl: self.replay_ttl,
            },
            ports: PortPicker {
                rng: &mut self.rng,
                lo: self.port_lo,
                span: self.port_span,
            },
            counters: &mut self.counters,
            wait: &mut self.wait,
            per_source: self.per_source.as_mut(),
        };
        let outcome = match src {
            SocketAddr::V4(_) if self.v4.pending.capacity() > 0 => handle_family(
                &mut self.v4,
                &mut cx,
                req,
                V4::from_socket(src).unwrap_or_default(),
            ),
            SocketAddr::V6(_) if self.v6.pending.capacity() > 0 => handle_family(
                &mut self.v6,
                &mut cx,
                req,
                V6::from_socket(src).unwrap_or_default(),
            ),
            _ => {
                cx.counters.bad_family += 1;
                Outcome::Dropped(Drop::Family)
            }
        };
        self.counters.expired = self.v4.pending.expired_total() + self.v6.pending.expired_total();
        outcome
    }

    /// One turn of incremental expiry over every table; bounded work. Returns
    /// true when more expiry work is owed, so the caller should come back soon.
    pub fn expire(&mut self, now: u64) -> bool {
        let now = now as Millis;
        let a = self.v4.pending.expire(now);
        let b = self.v6.pending.expire(now);
        let c = self.v4.replay.expire(now);
        let d = self.v6.replay.expire(now);
        let e = match self.per_source.as_mut() {
            Some(ps) => ps.expire(now),
            None => false,
        };
        self.counters.expired = self.v4.pending.expired_total() + self.v6.pending.expired_total();
        self.counters.pending = self.pending() as u64;
        a || b || c || d || e
    }

    /// Refreshes the gauges in [`Engine::counters`].
    pub fn update_gauges(&mut self) {
        self.counters.pending = self.pending() as u64;
        self.counters.expired = self.v4.pending.expired_total() + self.v6.pending.expired_total();
    }
}

#[derive(Clone, Copy)]
struct Times {
    now: Millis,
    ttl: u32,
    replay_ttl: u32,
}

struct PortPicker<'a> {
    rng: &'a mut Xoshiro256PlusPlus,
    lo: u16,
    span: u32,
}

impl PortPicker<'_> {
    /// Two distinct uniform ports from the range. Multiply-shift reduction of
    /// a 32-bit draw: the bias is below span / 2^32, under 0.002% here.
    fn pick(&mut self) -> (u16, u16) {
        let below = |rng: &mut Xoshiro256PlusPlus, n: u32| {
            ((u64::from(rng.next_u32()) * u64::from(n)) >> 32) as u32
        };
        let a = below(self.rng, self.span);
        let b = (a + 1 + below(self.rng, self.span - 1)) % self.span;
        (self.lo + a as u16, self.lo + b as u16)
    }
}

/// What one request may touch besides its family's tables.
struct Context<'a> {
    full: bool,
    t: Times,
    ports: PortPicker<'a>,
    counters: &'a mut Counters,
    wait: &'a mut WaitHistogram,
    per_source: Option<&'a mut PendingPerSource>,
}

#[inline]
fn handle_family<A: PeerAddr>(
    fam: &mut Family<A>,
    cx: &mut Context<'_>,
    req: Request,
    src: A,
) -> Outcome {
    let t = cx.t;
    let key = req.key();
    if let Some(m) = fam.replay.get(key, t.now) {
        if m.asker == src {
            cx.counters.replayed += 1;
            return Outcome::Replayed(Send {
                to: src.to_socket(),
                reply: Reply {
                    src_port: m.src_port,
                    dst_port: m.dst_port,
                    peer: m.partner.to_socket(),
                },
            });
        }
    }
    // When a registration was made (or last refreshed), from its expiry.
    let registered = |expires: Millis| expires.wrapping_sub(t.ttl);
    let other = req.counterpart().key();
    if let Some((waiter, waiter_expires)) = fam.pending.take(other, t.now) {
        let (p1, p2) = cx.ports.pick();
        cx.wait
            .record(t.now.wrapping_sub(registered(waiter_expires)));
        if let Some(ps) = cx.per_source.as_deref_mut() {
            ps.remove(waiter.source(), registered(waiter_expires), t.now);
        }
        // If this request was itself pending from elsewhere, it is answered now.
        if let Some((mine, mine_expires)) = fam.pending.take(key, t.now) {
            if let Some(ps) = cx.per_source.as_deref_mut() {
                ps.remove(mine.source(), registered(mine_expires), t.now);
            }
        }
        let replay_until = t.now.wrapping_add(t.replay_ttl);
        let mine = Matched {
            asker: src,
            partner: waiter,
            src_port: p2,
            dst_port: p1,
        };
        let theirs = Matched {
            asker: waiter,
            partner: src,
            src_port: p1,
            dst_port: p2,
        };
        if matches!(
            fam.replay.insert(key, mine, replay_until, t.now),
            Inserted::Full
        ) {
            cx.counters.replay_full += 1;
        }
        if matches!(
            fam.replay.insert(other, theirs, replay_until, t.now),
            Inserted::Full
        ) {
            cx.counters.replay_full += 1;
        }
        cx.counters.matched += 1;
        return Outcome::Matched {
            waiting: Send {
                to: waiter.to_socket(),
                reply: Reply {
                    src_port: p1,
                    dst_port: p2,
                    peer: src.to_socket(),
                },
            },
            completing: Send {
                to: src.to_socket(),
                reply: Reply {
                    src_port: p2,
                    dst_port: p1,
                    peer: waiter.to_socket(),
                },
            },
        };
    }
    // A refresh never needs room; a new entry needs room in the table (both
    // families together) and under its source's limit.
    let source_ok = match cx.per_source.as_deref_mut() {
        Some(ps) => ps.allows(src.source(), t.now),
        None => true,
    };
    let expires = t.now.wrapping_add(t.ttl);
    match fam
        .pending
        .upsert(key, src, expires, t.now, !cx.full && source_ok)
    {
        Inserted::New => {
            if let Some(ps) = cx.per_source.as_deref_mut() {
                ps.add(src.source(), t.now);
            }
            cx.counters.registered += 1;
            Outcome::Registered
        }
        Inserted::Replaced { old, old_expires } => {
            if let Some(ps) = cx.per_source.as_deref_mut() {
                ps.remove(old.source(), registered(old_expires), t.now);
                ps.add(src.source(), t.now);
            }
            cx.counters.refreshed += 1;
            Outcome::Refreshed
        }
        Inserted::Full if !cx.full && !source_ok => {
            cx.counters.per_ip_limit += 1;
            Outcome::Dropped(Drop::PerSourceLimit)
        }
        Inserted::Full => {
            cx.counters.table_full += 1;
            Outcome::Dropped(Drop::TableFull)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(capacity: usize) -> Engine {
        Engine::new(&EngineConfig {
            capacity,
            replay_capacity: 64,
            ttl_ms: 1000,
            replay_ttl_ms: 500,
            port_lo: 2000,
            port_hi: 2001,
            seed: Some(1),
            ..EngineConfig::default()
        })
        .unwrap()
    }

    fn req(a: u32, b: u32) -> [u8; 8] {
        Request {
            self_id: crate::wire::PeerId::from_u32(a),
            peer_id: crate::wire::PeerId::from_u32(b),
        }
        .emit()
    }

    const A: &str = "192.0.2.1:1000";
    const B: &str = "198.51.100.2:2000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn match_assigns_ports_to_waiting_and_completing() {
        let mut e = engine(16);
        assert_eq!(e.handle(&req(1, 2), addr(A), 0), Outcome::Registered);
        let Outcome::Matched {
            waiting,
            completing,
        } = e.handle(&req(2, 1), addr(B), 10)
        else {
            panic!("no match")
        };
        assert_eq!(waiting.to, addr(A));
        assert_eq!(waiting.reply.peer, addr(B));
        assert_eq!(completing.to, addr(B));
        assert_eq!(completing.reply.peer, addr(A));
        assert_eq!(waiting.reply.src_port, completing.reply.dst_port);
        assert_eq!(waiting.reply.dst_port, completing.reply.src_port);
        assert_ne!(waiting.reply.src_port, waiting.reply.dst_port);
        assert_eq!(e.pending(), 0);
        // A retransmit from either side gets its reply again.
        assert_eq!(
            e.handle(&req(1, 2), addr(A), 20),
            Outcome::Replayed(waiting)
        );
        assert_eq!(
            e.handle(&req(2, 1), addr(B), 20),
            Outcome::Replayed(completing)
        );
        // From a different address it is a fresh registration.
        assert_eq!(
            e.handle(&req(1, 2), addr("192.0.2.9:1"), 20),
            Outcome::Registered
        );
        // After the replay lifetime the retransmit registers again.
        assert!(e.handle(&req(2, 1), addr(B), 600).is_match());
    }

    impl Outcome {
        fn is_match(&self) -> bool {
            matches!(self, Outcome::Matched { .. })
        }
    }

    #[test]
    fn refresh_takes_the_newest_address() {
        let mut e = engine(16);
        e.handle(&req(1, 2), addr(A), 0);
        assert_eq!(
            e.handle(&req(1, 2), addr("192.0.2.1:1001"), 900),
            Outcome::Refreshed
        );
        // Still pending after the first expiry would have passed.
        let Outcome::Matched { waiting, .. } = e.handle(&req(2, 1), addr(B), 1500) else {
            panic!("refresh did not extend the expiry")
        };
        assert_eq!(waiting.to, addr("192.0.2.1:1001"));
        assert_eq!(e.counters.refreshed, 1);
    }

    #[test]
    fn expired_registration_does_not_match() {
        let mut e = engine(16);
        e.handle(&req(1, 2), addr(A), 0);
        assert_eq!(e.handle(&req(2, 1), addr(B), 1000), Outcome::Registered);
        assert_eq!(e.counters.expired, 1);
    }

    #[test]
    fn families_do_not_match_each_other() {
        let mut e = engine(16);
        e.handle(&req(1, 2), addr(A), 0);
        assert_eq!(
            e.handle(&req(2, 1), addr("[2001:db8::2]:5"), 0),
            Outcome::Registered
        );
        assert_eq!(e.pending(), 2);
    }

    #[test]
    fn capacity_is_exact_across_families() {
        let mut e = engine(2);
        assert_eq!(e.handle(&req(1, 2), addr(A), 0), Outcome::Registered);
        assert_eq!(
            e.handle(&req(3, 4), addr("[2001:db8::2]:5"), 0),
            Outcome::Registered
        );
        assert_eq!(
            e.handle(&req(5, 6), addr(A), 0),
            Outcome::Dropped(Drop::TableFull)
        );
        // A refresh and a match still work when full.
        assert_eq!(e.handle(&req(1, 2), addr(A), 1), Outcome::Refreshed);
        assert!(e.handle(&req(2, 1), addr(B), 1).is_match());
        assert_eq!(e.counters.table_full, 1);
    }

    #[test]
    fn bad_input_is_counted_and_dropped() {
        let mut e = engine(16);
        assert_eq!(
            e.handle(&[0; 7], addr(A), 0),
            Outcome::Dropped(Drop::BadSize)
        );
        assert_eq!(
            e.handle(&req(3, 3), addr(A), 0),
            Outcome::Dropped(Drop::SelfPair)
        );
        assert_eq!(e.counters.bad_size, 1);
        assert_eq!(e.counters.self_pair, 1);
        assert_eq!(e.counters.received, 2);
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn ports_are_distinct_and_in_range() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for span in [2u32, 3, 100, 64512] {
            let mut p = PortPicker {
                rng: &mut rng,
                lo: 1024,
                span,
            };
            for _ in 0..1000 {
                let (a, b) = p.pick();
                assert_ne!(a, b);
                assert!((1024..1024 + span).contains(&u32::from(a)));
                assert!((1024..1024 + span).contains(&u32::from(b)));
            }
        }
    }

    #[test]
    fn one_source_cannot_fill_the_table() {
        let mut e = Engine::new(&EngineConfig {
            capacity: 100,
            max_pending_per_source: 3,
            seed: Some(2),
            ..EngineConfig::default()
        })
        .unwrap();
        for i in 0..3 {
            assert_eq!(e.handle(&req(i, 1000 + i), addr(A), 0), Outcome::Registered);
        }
        assert_eq!(
            e.handle(&req(9, 1009), addr("192.0.2.1:9999"), 0),
            Outcome::Dropped(Drop::PerSourceLimit),
            "another port of the same address is the same source"
        );
        assert_eq!(e.handle(&req(0, 1000), addr(A), 1), Outcome::Refreshed);
        assert_eq!(e.handle(&req(9, 1009), addr(B), 1), Outcome::Registered);
        // A match frees a place.
        assert!(e.handle(&req(1000, 0), addr(B), 2).is_match());
        assert_eq!(e.handle(&req(7, 1007), addr(A), 3), Outcome::Registered);
        assert_eq!(e.counters.per_ip_limit, 1);
        assert_eq!(e.wait.count(), 1);
    }
}
