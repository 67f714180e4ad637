//! One oracle for the matching engine, shared by the `engine` fuzz target
//! (`fuzz/fuzz_targets/engine.rs`) and the CI property test
//! (`tests/engine_props.rs`), so both check exactly the same properties.
//!
//! [`Checker`] drives a [`psync::Engine`] through a sequence of [`Op`]s and,
//! after every call, compares what the engine did with a small reference
//! model kept in `HashMap`s: which side of which pair waits where and since
//! when, and which reply each side of a pair's latest match was given. It
//! uses the engine's public API only. Every violation panics with a message,
//! which is what both libFuzzer and proptest catch.
//!
//! The rules it holds the engine to are PROTOCOL.md's, written here from the
//! documentation, not from the engine's code: one slot per pair `{A, B}` in
//! one family, waiting or remembered; a match, a refresh and a replay are
//! never refused; a new registration is refused only for a source limit
//! (when the engine's estimate of a prefix's count reached the limit, an
//! estimate never below the truth) or a full table, and may take the slot of
//! a waiting registration or a remembered match only when the table is full
//! and then says whose.
//!
//! The model's clock is `u64` and never wraps; the engine keeps wrapping
//! 32-bit milliseconds. Drivers start the clock anywhere (near `u32::MAX`
//! too) and keep a run's span far below 2^31 ms, where the two must agree.
#![allow(dead_code)] // each driver uses a different part of it

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use psync::engine::{DropReason, Evicted, Level, Transmit};
use psync::wire::{PeerId, WireError, REQUEST_LEN};
use psync::{Engine, EngineConfig, Outcome, Request};

/// The sources a run draws from: a handful, so that IDs collide, pairs
/// match, and the same address and networks come back. IPv4 first
/// ([`V4_SOURCES`] of them), then IPv6: equal IPs with different ports, two
/// addresses of one IPv4 /24, two /64s of one IPv6 /56, and sources that
/// cannot be a peer (port 0 and the unspecified address, a v4-mapped IPv6
/// address), which a spoofed datagram can carry.
pub const SOURCES: [&str; 11] = [
    "192.0.2.1:1000",
    "192.0.2.1:1001",
    "192.0.2.77:7",
    "198.51.100.2:2000",
    "203.0.113.3:65535",
    "0.0.0.0:0",
    "[2001:db8::1]:1000",
    "[2001:db8::2]:1",
    "[2001:db8:0:1::9]:99",
    "[2001:db8:1::1]:5",
    "[::ffff:192.0.2.1]:1000",
];

/// `SOURCES[..V4_SOURCES]` are IPv4, the rest IPv6.
pub const V4_SOURCES: usize = 6;

/// The source address numbered `i` (taken modulo the set's size).
pub fn source(i: usize) -> SocketAddr {
    SOURCES[i % SOURCES.len()].parse().unwrap()
}

/// Longest total clock advance of one run: far below the 2^31 ms where the
/// engine's wrapping clock becomes ambiguous.
pub const MAX_SPAN_MS: u64 = 1 << 30;

/// One step of a run.
#[derive(Clone, Debug)]
pub enum Op {
    /// Advance the clock by `dt` ms, then hand `datagram` from source `src`.
    Datagram {
        /// Bytes of the datagram (any length).
        datagram: Vec<u8>,
        /// Index into [`SOURCES`].
        src: usize,
        /// Clock advance before this step, in ms.
        dt: u64,
    },
    /// Advance the clock, then resend the request that completed the last
    /// match (`waiter == false`) or the one that waited (`waiter == true`),
    /// from the address that sent it.
    Retransmit {
        /// Which side of the last match resends.
        waiter: bool,
        /// Clock advance before this step, in ms.
        dt: u64,
    },
    /// Advance the clock, then run one turn of [`Engine::expire`].
    Expire {
        /// Clock advance before this step, in ms.
        dt: u64,
    },
}

/// A source that cannot be a peer, by the documented rule: port 0;
/// unspecified, broadcast or multicast; an IPv6 address standing for an
/// IPv4 one (v4-mapped `::ffff:0:0/96`, v4-compatible `::/96` other than
/// `::` and `::1`).
fn bogus(a: SocketAddr) -> bool {
    if a.port() == 0 {
        return true;
    }
    match a.ip() {
        IpAddr::V4(ip) => ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast(),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let mapped = o[..10] == [0; 10] && o[10..12] == [0xff, 0xff];
            let compatible =
                o[..12] == [0; 12] && u32::from_be_bytes([o[12], o[13], o[14], o[15]]) > 1;
            ip.is_unspecified() || ip.is_multicast() || mapped || compatible
        }
    }
}

/// The prefixes a source counts against, as documented: an IPv4 address and
/// its /24; an IPv6 /64, /56 and /48. As `(level, family, prefix bits)`.
fn prefixes(a: SocketAddr) -> Vec<(Level, u128)> {
    match a.ip() {
        IpAddr::V4(ip) => {
            let x = u128::from(u32::from(ip));
            vec![(Level::V4Host, x), (Level::V4Net24, x >> 8)]
        }
        IpAddr::V6(ip) => {
            let x = u128::from(ip);
            vec![
                (Level::V6Net64, x >> 64),
                (Level::V6Net56, x >> 72),
                (Level::V6Net48, x >> 80),
            ]
        }
    }
}

fn limit(cfg: &EngineConfig, level: Level) -> u32 {
    cfg.limits.at(level)
}

/// A pair: its family and its two IDs in byte order.
type PairKey = (bool, [u8; 4], [u8; 4]);

fn pair_of(req: &Request, src: SocketAddr) -> (PairKey, bool) {
    let (s, p) = (req.self_id.0, req.peer_id.0);
    let lo = s < p;
    let key = if lo {
        (src.is_ipv6(), s, p)
    } else {
        (src.is_ipv6(), p, s)
    };
    (key, lo)
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The waiting side is the lower ID.
    lo: bool,
    addr: SocketAddr,
    since: u64,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    /// `(asker, what it was told)` for the lower and the higher ID.
    lo: (SocketAddr, Transmit),
    hi: (SocketAddr, Transmit),
    at: u64,
}

/// The last match, so that [`Op::Retransmit`] can resend either side.
#[derive(Clone, Copy, Debug)]
struct LastMatch {
    waiter: (Request, SocketAddr),
    completer: (Request, SocketAddr),
}

/// Tallies of outcomes, compared with the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    received: u64,
    bad_size: u64,
    self_pair: u64,
    bad_family: u64,
    bad_source: u64,
    registered: u64,
    refreshed: u64,
    matched: u64,
    replayed: u64,
    table_full: u64,
    evicted: u64,
    per_ip_limit: u64,
    per_prefix_limit: u64,
}

/// The engine under test and the reference model beside it.
pub struct Checker {
    /// The engine under test.
    pub engine: Engine,
    cfg: EngineConfig,
    now: u64,
    start: u64,
    pending: HashMap<PairKey, Pending>,
    replay: HashMap<PairKey, Remembered>,
    last_match: Option<LastMatch>,
    tally: Tally,
    /// Every address that has sent a valid request from a served family.
    valid_senders: Vec<SocketAddr>,
    /// How many times a retransmit was checked to get the identical reply
    /// (lets a driver see that the property was exercised).
    pub replays_checked: u64,
    /// Matches seen.
    pub matches: u64,
    /// Registrations that took a live pair's slot.
    pub evictions: u64,
}

impl Checker {
    /// An engine for `cfg` (which must be valid) with its clock at `start`.
    pub fn new(cfg: &EngineConfig, start: u64) -> Checker {
        Checker {
            engine: Engine::new(cfg).expect("the driver builds valid configs"),
            cfg: cfg.clone(),
            now: start,
            start,
            pending: HashMap::new(),
            replay: HashMap::new(),
            last_match: None,
            tally: Tally::default(),
            valid_senders: Vec::new(),
            replays_checked: 0,
            matches: 0,
            evictions: 0,
        }
    }

    /// Runs every op, checking after each one.
    pub fn run(&mut self, ops: &[Op]) {
        for op in ops {
            self.step(op);
        }
    }

    fn advance(&mut self, dt: u64) {
        // Clamp, so a driver cannot push a run past the unambiguous span.
        let left = (self.start + MAX_SPAN_MS).saturating_sub(self.now);
        self.now += dt.min(left);
    }

    /// Runs one op and checks the engine against the model.
    pub fn step(&mut self, op: &Op) {
        match op {
            Op::Datagram { datagram, src, dt } => {
                self.advance(*dt);
                self.handle(datagram, source(*src));
            }
            Op::Retransmit { waiter, dt } => {
                self.advance(*dt);
                if let Some(m) = self.last_match {
                    let (req, from) = if *waiter { m.waiter } else { m.completer };
                    self.handle(&req.emit(), from);
                }
            }
            Op::Expire { dt } => {
                self.advance(*dt);
                self.engine.expire(self.now);
                self.check_capacity();
            }
        }
    }

    fn live(&self, since: u64, lifetime: u32) -> bool {
        self.now - since < u64::from(lifetime)
    }

    fn held(&self) -> usize {
        self.engine.pending() + self.engine.replay_entries()
    }

    fn check_capacity(&self) {
        assert!(
            self.held() <= self.engine.capacity(),
            "{} pending and {} remembered above capacity {}",
            self.engine.pending(),
            self.engine.replay_entries(),
            self.engine.capacity()
        );
    }

    fn served(&self, a: SocketAddr) -> bool {
        if a.is_ipv4() {
            self.cfg.ipv4
        } else {
            self.cfg.ipv6
        }
    }

    fn check_ports(&self, s: &Transmit) {
        let (lo, hi) = (self.cfg.port_lo, self.cfg.port_hi);
        let r = &s.reply;
        assert!(
            (lo..=hi).contains(&r.src_port) && (lo..=hi).contains(&r.dst_port),
            "ports {}/{} outside {lo}-{hi}",
            r.src_port,
            r.dst_port
        );
        assert_ne!(r.src_port, r.dst_port, "equal ports in {s:?}");
        assert_eq!(s.via, 0, "a direct request answered through a relay");
        // A reply must survive its own wire format: what a client parses is
        // what the engine meant (flowinfo and scope are not carried).
        let mut buf = [0u8; psync::wire::MAX_REPLY_LEN];
        let n = r.emit(&mut buf);
        assert_eq!(
            psync::Reply::parse(&buf[..n]),
            Ok(*r),
            "reply does not round-trip"
        );
    }

    /// Live registrations the model says each of `src`'s prefixes holds.
    fn live_held(&self, src: SocketAddr) -> Vec<(Level, usize)> {
        prefixes(src)
            .into_iter()
            .map(|(level, bits)| {
                let n = self
                    .pending
                    .values()
                    .filter(|p| self.live(p.since, self.cfg.ttl_ms))
                    .filter(|p| prefixes(p.addr).contains(&(level, bits)))
                    .count();
                (level, n)
            })
            .collect()
    }

    /// The engine's estimates must never be below the model's live counts.
    fn check_estimates(&self, src: SocketAddr) -> Option<Vec<(Level, u32)>> {
        let est = self.engine.source_estimate(src.ip())?;
        for ((level, truth), (elevel, e)) in self.live_held(src).into_iter().zip(&est) {
            assert_eq!(level, *elevel);
            assert!(
                *e as usize >= truth,
                "{src}: estimate {e} at {level:?} below the {truth} live registrations"
            );
        }
        Some(est)
    }

    /// Hands one datagram to the engine and checks the outcome.
    pub fn handle(&mut self, datagram: &[u8], src: SocketAddr) -> Outcome {
        let now = self.now;
        let held_before = self.held();
        let outcome = self.engine.handle(datagram, src, now);
        self.tally.received += 1;
        self.check_capacity();

        let req = match Request::parse(datagram) {
            Ok(req) => req,
            Err(e) => {
                // No reply to invalid input, and the reason is the right one.
                let want = match e {
                    WireError::SelfPair => DropReason::SelfPair,
                    _ => DropReason::BadSize,
                };
                assert_eq!(
                    datagram.len() == REQUEST_LEN,
                    want == DropReason::SelfPair,
                    "parse error {e:?} for {} bytes",
                    datagram.len()
                );
                assert_eq!(
                    outcome,
                    Outcome::Dropped(want),
                    "invalid datagram {datagram:?} from {src}"
                );
                match want {
                    DropReason::SelfPair => self.tally.self_pair += 1,
                    _ => self.tally.bad_size += 1,
                }
                self.check_tally();
                return outcome;
            }
        };
        if !self.served(src) {
            assert_eq!(
                outcome,
                Outcome::Dropped(DropReason::Family),
                "unserved {src}"
            );
            self.tally.bad_family += 1;
            self.check_tally();
            return outcome;
        }
        if bogus(src) {
            assert_eq!(
                outcome,
                Outcome::Dropped(DropReason::BadSource),
                "{src} cannot be a peer"
            );
            self.tally.bad_source += 1;
            self.check_tally();
            return outcome;
        }
        if !self.valid_senders.contains(&src) {
            self.valid_senders.push(src);
        }

        let (key, lo) = pair_of(&req, src);
        let waiting = self
            .pending
            .get(&key)
            .copied()
            .filter(|p| self.live(p.since, self.cfg.ttl_ms));
        let remembered = self
            .replay
            .get(&key)
            .copied()
            .filter(|r| self.live(r.at, self.cfg.replay_ttl_ms));
        let asked_before = remembered.filter(|r| {
            let (asker, _) = if lo { r.lo } else { r.hi };
            asker == src
        });

        // Whatever happened, a reply only goes to an address that sent a
        // valid request.
        for t in sends(&outcome) {
            assert!(
                self.valid_senders.contains(&t.to),
                "reply to {} which never sent a valid request",
                t.to
            );
        }

        match outcome {
            Outcome::Refreshed => {
                let p = waiting.expect("refreshed with nothing waiting");
                assert_eq!(p.lo, lo, "refreshed the other side's registration");
                self.pending.insert(
                    key,
                    Pending {
                        lo,
                        addr: src,
                        since: now,
                    },
                );
                self.tally.refreshed += 1;
            }
            Outcome::Matched {
                waiting: w,
                completing: c,
            } => {
                let p = waiting.unwrap_or_else(|| {
                    panic!("matched {src} with no live registration of the counterpart")
                });
                assert_ne!(p.lo, lo, "matched a request with its own side");
                assert_eq!(w.to, p.addr, "waiting reply not to the newest registrant");
                assert_eq!(c.to, src, "completing reply not to the sender");
                assert_eq!(w.reply.peer, src, "waiter not told the completer");
                assert_eq!(c.reply.peer, w.to, "completer not told the waiter");
                assert_eq!(
                    w.reply.src_port, c.reply.dst_port,
                    "ports not complementary"
                );
                assert_eq!(
                    w.reply.dst_port, c.reply.src_port,
                    "ports not complementary"
                );
                self.check_ports(&w);
                self.check_ports(&c);
                self.pending.remove(&key);
                let (mine, theirs) = ((src, c), (w.to, w));
                let (lo_side, hi_side) = if lo { (mine, theirs) } else { (theirs, mine) };
                self.replay.insert(
                    key,
                    Remembered {
                        lo: lo_side,
                        hi: hi_side,
                        at: now,
                    },
                );
                self.last_match = Some(LastMatch {
                    waiter: (req.counterpart(), w.to),
                    completer: (req, src),
                });
                self.tally.matched += 1;
                self.matches += 1;
            }
            Outcome::Replayed(sent) => {
                assert!(waiting.is_none(), "replayed although a side waits");
                let r = asked_before.unwrap_or_else(|| {
                    panic!("replayed {sent:?} to {src} with no live match it asked for")
                });
                let (_, want) = if lo { r.lo } else { r.hi };
                assert_eq!(sent, want, "a retransmit got a different reply");
                self.replays_checked += 1;
                self.tally.replayed += 1;
            }
            Outcome::Registered { .. }
            | Outcome::Dropped(DropReason::TableFull | DropReason::SourceLimit(_)) => {
                assert!(
                    waiting.is_none(),
                    "{outcome:?} although a side of the pair waits: {waiting:?}"
                );
                assert!(
                    asked_before.is_none(),
                    "{outcome:?} although a retransmit should have been replayed"
                );
                self.new_registration(key, lo, src, outcome, held_before);
            }
            Outcome::Dropped(why) => panic!("valid request from {src} dropped as {why:?}"),
        }
        self.check_estimates(src);
        self.check_tally();
        outcome
    }

    fn new_registration(
        &mut self,
        key: PairKey,
        lo: bool,
        src: SocketAddr,
        outcome: Outcome,
        held_before: usize,
    ) {
        let full = held_before >= self.engine.capacity();
        match outcome {
            Outcome::Registered { evicted } => {
                // Never over a limit: the model's live counts, with this one,
                // stay within every limit.
                for (level, n) in self.live_held(src) {
                    let max = limit(&self.cfg, level);
                    assert!(
                        max == 0 || n < max as usize,
                        "registered from {src} whose {level:?} already holds {n} of {max}"
                    );
                }
                if let Some(e) = evicted {
                    assert!(
                        full,
                        "took a slot ({e:?}) with {held_before} held of {}",
                        self.engine.capacity()
                    );
                    self.evicted(e);
                }
                self.pending.insert(
                    key,
                    Pending {
                        lo,
                        addr: src,
                        since: self.now,
                    },
                );
                // A registration starts the pair afresh: replies of an
                // earlier match are forgotten.
                self.replay.remove(&key);
                self.tally.registered += 1;
            }
            Outcome::Dropped(DropReason::TableFull) => {
                assert!(
                    full,
                    "table_full with {held_before} held of {}",
                    self.engine.capacity()
                );
                self.tally.table_full += 1;
            }
            Outcome::Dropped(DropReason::SourceLimit(level)) => {
                let max = limit(&self.cfg, level);
                assert!(max > 0, "refused at {level:?} whose limit is off");
                let est = self
                    .check_estimates(src)
                    .expect("a source limit needs the counts");
                let (_, e) = est
                    .iter()
                    .find(|(l, _)| *l == level)
                    .copied()
                    .unwrap_or_else(|| panic!("{level:?} is not a level of {src}"));
                assert!(
                    e >= max,
                    "refused at {level:?} with an estimate of {e} under {max}"
                );
                match level {
                    Level::V4Host | Level::V6Net64 => self.tally.per_ip_limit += 1,
                    _ => self.tally.per_prefix_limit += 1,
                }
            }
            _ => unreachable!(),
        }
    }

    /// A live pair gave its slot: the model must know it, and forgets it.
    fn evicted(&mut self, e: Evicted) {
        self.evictions += 1;
        match e {
            Evicted::Pending { from, request } => {
                let req = request.expect("a seed-format pair reports its request");
                let (key, lo) = pair_of(&req, from);
                let p = self
                    .pending
                    .get(&key)
                    .copied()
                    .filter(|p| self.live(p.since, self.cfg.ttl_ms))
                    .unwrap_or_else(|| {
                        panic!("evicted {req:?} from {from}, which was not waiting")
                    });
                assert_eq!((p.lo, p.addr), (lo, from), "evicted the wrong registration");
                assert!(
                    self.engine.source_estimate(from.ip()).is_some(),
                    "fair eviction without per-source counts"
                );
                self.pending.remove(&key);
                self.tally.evicted += 1;
            }
            Evicted::Replay { request, ipv6 } => {
                let req = request.expect("a seed-format pair reports its request");
                let (s, p) = (req.self_id.0, req.peer_id.0);
                let key = if s < p { (ipv6, s, p) } else { (ipv6, p, s) };
                assert!(
                    self.replay
                        .get(&key)
                        .is_some_and(|r| self.live(r.at, self.cfg.replay_ttl_ms)),
                    "evicted the replay of {req:?}, which was not remembered"
                );
                self.replay.remove(&key);
            }
        }
    }

    fn check_tally(&self) {
        let c = self.engine.counters();
        let got = Tally {
            received: c.received,
            bad_size: c.bad_size,
            self_pair: c.self_pair,
            bad_family: c.bad_family,
            bad_source: c.bad_source,
            registered: c.registered,
            refreshed: c.refreshed,
            matched: c.matched,
            replayed: c.replayed,
            table_full: c.table_full,
            evicted: c.evicted,
            per_ip_limit: c.per_ip_limit,
            per_prefix_limit: c.per_prefix_limit,
        };
        assert_eq!(got, self.tally, "counters disagree with the outcomes");
    }
}

/// The replies an outcome sends.
pub fn sends(outcome: &Outcome) -> Vec<Transmit> {
    match *outcome {
        Outcome::Replayed(s) => vec![s],
        Outcome::Matched {
            waiting,
            completing,
        } => vec![waiting, completing],
        _ => Vec::new(),
    }
}

/// The request `(a, b)` for numeric IDs.
pub fn request(a: u32, b: u32) -> Vec<u8> {
    Request {
        self_id: PeerId::from_u32(a),
        peer_id: PeerId::from_u32(b),
    }
    .emit()
    .to_vec()
}
