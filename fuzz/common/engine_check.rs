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
//! a waiting registration only when the table is full, or of a remembered
//! match only when it holds three quarters of the capacity or more
//! ([`psync::engine::CROWDED_DEN`]), and then says whose.
//!
//! Protocol v2 requests ([`Op::V2`], handed to [`Engine::handle_v2`] as
//! admitted requests) share the table, the capacity and the source limits
//! with seed requests under the same rules, and never meet them (a v2 pair is
//! its own pair even when its IDs equal a seed pair's). Their replies also
//! say: the asker's own pair and address, the partner's client-info bits 0-3
//! from its latest request, and, in the waiter's reply only, the candidates
//! of the request that completed the pair; a replay carries no candidates.
//!
//! The model's clock is `u64` and never wraps; the engine keeps wrapping
//! 32-bit milliseconds. Drivers start the clock anywhere (near `u32::MAX`
//! too) and keep a run's span far below 2^31 ms, where the two must agree.
#![allow(dead_code)] // each driver uses a different part of it

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use psync::engine::{DropReason, Evicted, Level, Transmit};
use psync::wire::v2;
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
    /// Advance the clock by `dt` ms, then hand the admitted v2 request
    /// `request` from source `src` to [`Engine::handle_v2`].
    V2 {
        /// The request (its token is not looked at).
        request: v2::Request,
        /// Index into [`SOURCES`].
        src: usize,
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

/// A pair: its format, its family and its two IDs, lower first (bytewise
/// for the seed format's 4-byte IDs, numerically for v2's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PairKey {
    Seed(bool, [u8; 4], [u8; 4]),
    V2(bool, u64, u64),
}

fn pair_of(req: &Request, src: SocketAddr) -> (PairKey, bool) {
    let (s, p) = (req.self_id.0, req.peer_id.0);
    let lo = s < p;
    let key = if lo {
        PairKey::Seed(src.is_ipv6(), s, p)
    } else {
        PairKey::Seed(src.is_ipv6(), p, s)
    };
    (key, lo)
}

fn v2_pair_of(pair: v2::Pair, src: SocketAddr) -> (PairKey, bool) {
    let (a, b) = pair.unordered();
    (
        PairKey::V2(src.is_ipv6(), a, b),
        pair.self_id < pair.peer_id,
    )
}

/// A request of either format, as the model remembers it.
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)] // the model's, off the hot path
enum AnyRequest {
    Seed(Request),
    V2(v2::Request),
}

/// A reply of either format, with where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // the model's, off the hot path
pub enum AnyTransmit {
    /// A seed-format reply.
    Seed(Transmit),
    /// A v2 reply.
    V2(Transmit<v2::Reply>),
}

/// What the oracle needs of a reply of either format.
pub trait Told: Copy + PartialEq + std::fmt::Debug {
    /// `(src_port, dst_port)`.
    fn ports(&self) -> (u16, u16);
    /// The partner's address.
    fn peer(&self) -> SocketAddr;
    /// Emits and parses the reply again.
    fn round_trip(&self) -> Option<Self>;
    /// The transmit, remembered.
    fn remember(t: Transmit<Self>) -> AnyTransmit;
}

impl Told for psync::Reply {
    fn ports(&self) -> (u16, u16) {
        (self.src_port, self.dst_port)
    }
    fn peer(&self) -> SocketAddr {
        self.peer
    }
    fn round_trip(&self) -> Option<Self> {
        let mut buf = [0u8; psync::wire::MAX_REPLY_LEN];
        let n = self.emit(&mut buf);
        psync::Reply::parse(&buf[..n]).ok()
    }
    fn remember(t: Transmit<Self>) -> AnyTransmit {
        AnyTransmit::Seed(t)
    }
}

impl Told for v2::Reply {
    fn ports(&self) -> (u16, u16) {
        (self.src_port, self.dst_port)
    }
    fn peer(&self) -> SocketAddr {
        self.peer
    }
    fn round_trip(&self) -> Option<Self> {
        v2::Reply::parse(&self.to_bytes()).ok()
    }
    fn remember(t: Transmit<Self>) -> AnyTransmit {
        AnyTransmit::V2(t)
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The waiting side is the lower ID.
    lo: bool,
    addr: SocketAddr,
    since: u64,
    /// The waiter's client-info byte (v2; 0 for the seed format).
    info: u8,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    /// `(asker, what a retransmit of it must be told)` for the lower and the
    /// higher ID.
    lo: (SocketAddr, AnyTransmit),
    hi: (SocketAddr, AnyTransmit),
    at: u64,
}

/// The last match, so that [`Op::Retransmit`] can resend either side.
#[derive(Clone, Copy, Debug)]
struct LastMatch {
    waiter: (AnyRequest, SocketAddr),
    completer: (AnyRequest, SocketAddr),
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
    /// v2 registrations and matches that may or may not have lost their
    /// slot: an eviction of a v2 pair names only its source (the engine
    /// keeps a hash of its IDs, not the IDs), so when several candidates
    /// fit, the model learns which from the next request for each.
    uncertain_pending: HashMap<PairKey, Pending>,
    uncertain_replay: HashMap<PairKey, Remembered>,
    last_match: Option<LastMatch>,
    tally: Tally,
    /// Every address that has sent a valid request from a served family.
    valid_senders: Vec<SocketAddr>,
    /// How many times a retransmit was checked to get the identical reply
    /// (lets a driver see that the property was exercised).
    pub replays_checked: u64,
    /// Matches seen.
    pub matches: u64,
    /// Of them, v2 matches.
    pub v2_matches: u64,
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
            uncertain_pending: HashMap::new(),
            uncertain_replay: HashMap::new(),
            last_match: None,
            tally: Tally::default(),
            valid_senders: Vec::new(),
            replays_checked: 0,
            matches: 0,
            v2_matches: 0,
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
                    match req {
                        AnyRequest::Seed(req) => {
                            self.handle(&req.emit(), from);
                        }
                        AnyRequest::V2(req) => {
                            self.handle_v2(&req, from);
                        }
                    }
                }
            }
            Op::Expire { dt } => {
                self.advance(*dt);
                self.engine.expire(self.now);
                self.check_capacity();
            }
            Op::V2 { request, src, dt } => {
                self.advance(*dt);
                self.handle_v2(request, source(*src));
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

    fn check_ports<R: Told>(&self, s: &Transmit<R>) {
        let (lo, hi) = (self.cfg.port_lo, self.cfg.port_hi);
        let (src_port, dst_port) = s.reply.ports();
        assert!(
            (lo..=hi).contains(&src_port) && (lo..=hi).contains(&dst_port),
            "ports {src_port}/{dst_port} outside {lo}-{hi}",
        );
        assert_ne!(src_port, dst_port, "equal ports in {s:?}");
        assert_eq!(s.via, 0, "a direct request answered through a relay");
        // A reply must survive its own wire format: what a client parses is
        // what the engine meant (flowinfo and scope are not carried).
        assert_eq!(
            s.reply.round_trip(),
            Some(s.reply),
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
        let held_before = (self.held(), self.engine.replay_entries());
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
        let (key, lo) = pair_of(&req, src);
        self.judge(
            outcome,
            key,
            lo,
            AnyRequest::Seed(req),
            src,
            held_before,
            |_, _| {},
        )
    }

    /// Hands one admitted v2 request to the engine and checks the outcome:
    /// everything [`Checker::handle`] checks, and what v2 replies say.
    pub fn handle_v2(&mut self, req: &v2::Request, src: SocketAddr) -> Outcome<v2::Reply> {
        let now = self.now;
        let held_before = (self.held(), self.engine.replay_entries());
        let outcome = self.engine.handle_v2(req, src, now);
        self.tally.received += 1;
        self.check_capacity();
        if req.pair().is_self_pair() {
            assert_eq!(outcome, Outcome::Dropped(DropReason::SelfPair), "self pair");
            self.tally.self_pair += 1;
            self.check_tally();
            return outcome;
        }
        let (key, lo) = v2_pair_of(req.pair(), src);
        let info = req.info.0 & 0x0f;
        let candidates = req.candidates;
        let pair = req.pair();
        // What v2 replies say beyond the seed's: checked at a match, given
        // the waiter's registration.
        let v2_check = move |outcome: &Outcome<v2::Reply>, waiter: Option<Pending>| {
            let Outcome::Matched {
                waiting,
                completing,
            } = outcome
            else {
                return;
            };
            let (w, c) = (&waiting.reply, &completing.reply);
            assert_eq!(w.pair, pair.counterpart(), "waiter told another pair");
            assert_eq!(c.pair, pair, "completer told another pair");
            assert_eq!(w.your_addr, waiting.to, "waiter told a wrong own address");
            assert_eq!(
                c.your_addr, completing.to,
                "completer told a wrong own address"
            );
            assert_eq!(
                w.peer_info.0, info,
                "waiter not told the completer's info bits"
            );
            let winfo = waiter.map_or(0, |p| p.info & 0x0f);
            assert_eq!(
                c.peer_info.0, winfo,
                "completer not told the waiter's info bits"
            );
            assert_eq!(
                w.peer_candidates, candidates,
                "waiter not given the candidates"
            );
            assert!(c.peer_candidates.is_empty(), "completer given candidates");
        };
        self.judge(
            outcome,
            key,
            lo,
            AnyRequest::V2(*req),
            src,
            held_before,
            v2_check,
        )
    }

    /// Checks `outcome`, the engine's answer to a well-formed request for
    /// `key` (from the `lo` side) from `src`, against the model.
    #[allow(clippy::too_many_arguments)]
    fn judge<R: Told>(
        &mut self,
        outcome: Outcome<R>,
        key: PairKey,
        lo: bool,
        req: AnyRequest,
        src: SocketAddr,
        held_before: (usize, usize),
        extra: impl Fn(&Outcome<R>, Option<Pending>),
    ) -> Outcome<R> {
        let now = self.now;
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
        let info = match req {
            AnyRequest::Seed(_) => 0,
            AnyRequest::V2(r) => r.info.0,
        };
        // A pair whose eviction was uncertain: the outcome says whether it
        // still held its slot.
        if let Some(p) = self.uncertain_pending.remove(&key) {
            if matches!(outcome, Outcome::Matched { .. } | Outcome::Refreshed) {
                self.pending.insert(key, p);
            }
        }
        if let Some(r) = self.uncertain_replay.remove(&key) {
            if matches!(outcome, Outcome::Replayed(_)) {
                self.replay.insert(key, r);
            }
        }
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
        for to in destinations(&outcome) {
            assert!(
                self.valid_senders.contains(&to),
                "reply to {to} which never sent a valid request",
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
                        info,
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
                assert_eq!(w.reply.peer(), src, "waiter not told the completer");
                assert_eq!(c.reply.peer(), w.to, "completer not told the waiter");
                let (ws, wd) = w.reply.ports();
                let (cs, cd) = c.reply.ports();
                assert_eq!((ws, wd), (cd, cs), "ports not complementary");
                self.check_ports(&w);
                self.check_ports(&c);
                extra(&outcome, Some(p));
                self.pending.remove(&key);
                let (mine, theirs) = ((src, R::remember(c)), (w.to, replayed_as(R::remember(w))));
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
                    waiter: (counterpart(req, p.info), w.to),
                    completer: (req, src),
                });
                self.tally.matched += 1;
                self.matches += 1;
                if let AnyRequest::V2(_) = req {
                    self.v2_matches += 1;
                }
            }
            Outcome::Replayed(sent) => {
                assert!(waiting.is_none(), "replayed although a side waits");
                let r = asked_before.unwrap_or_else(|| {
                    panic!("replayed {sent:?} to {src} with no live match it asked for")
                });
                let (_, want) = if lo { r.lo } else { r.hi };
                assert_eq!(
                    R::remember(sent),
                    want,
                    "a retransmit got a different reply"
                );
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
                self.new_registration(key, lo, src, info, outcome, held_before);
            }
            Outcome::Dropped(why) => panic!("valid request from {src} dropped as {why:?}"),
        }
        self.check_estimates(src);
        self.check_tally();
        outcome
    }

    fn new_registration<R: Told>(
        &mut self,
        key: PairKey,
        lo: bool,
        src: SocketAddr,
        info: u8,
        outcome: Outcome<R>,
        held_before: (usize, usize),
    ) {
        let (held_before, remembered_before) = held_before;
        let capacity = self.engine.capacity();
        let full = held_before >= capacity;
        // Crowded: remembered matches give way from there on.
        let crowded = full
            || (held_before >= capacity - capacity / psync::engine::CROWDED_DEN
                && remembered_before > 0);
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
                        match e {
                            Evicted::Replay { .. } => crowded,
                            Evicted::Pending { .. } => full,
                        },
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
                        info,
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
    ///
    /// A v2 pair's eviction does not say which pair (the engine keeps a hash
    /// of its IDs, not the IDs): when several live v2 pairs fit, the model
    /// keeps them all as maybe gone (`uncertain_*`) until a request for each
    /// tells. The candidates of a later eviction include those maybe gone:
    /// the engine may take one that the model still keeps as maybe there, and
    /// leave the one registration the model was sure of.
    fn evicted(&mut self, e: Evicted) {
        self.evictions += 1;
        match e {
            Evicted::Pending { from, request } => {
                let key = match request {
                    Some(req) => {
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
                        Some(key)
                    }
                    // Some live v2 registration from `from` was waiting.
                    None => {
                        let fits = |m: &HashMap<PairKey, Pending>| -> Vec<PairKey> {
                            m.iter()
                                .filter(|(k, p)| {
                                    matches!(k, PairKey::V2(..))
                                        && p.addr == from
                                        && self.live(p.since, self.cfg.ttl_ms)
                                })
                                .map(|(k, _)| *k)
                                .collect()
                        };
                        let (sure, maybe) = (fits(&self.pending), fits(&self.uncertain_pending));
                        match (&sure[..], &maybe[..]) {
                            ([], []) => {
                                panic!("evicted a v2 registration from {from}, none was waiting")
                            }
                            ([key], []) => Some(*key),
                            ([], [key]) => {
                                self.uncertain_pending.remove(key);
                                None
                            }
                            _ => {
                                for k in sure {
                                    let p = self.pending.remove(&k).expect("listed");
                                    self.uncertain_pending.insert(k, p);
                                }
                                None
                            }
                        }
                    }
                };
                assert!(
                    self.engine.source_estimate(from.ip()).is_some(),
                    "fair eviction without per-source counts"
                );
                if let Some(key) = key {
                    self.pending.remove(&key);
                }
                self.tally.evicted += 1;
            }
            Evicted::Replay { request, ipv6 } => {
                let key = match request {
                    Some(req) => {
                        let (s, p) = (req.self_id.0, req.peer_id.0);
                        let key = if s < p {
                            PairKey::Seed(ipv6, s, p)
                        } else {
                            PairKey::Seed(ipv6, p, s)
                        };
                        assert!(
                            self.replay
                                .get(&key)
                                .is_some_and(|r| self.live(r.at, self.cfg.replay_ttl_ms)),
                            "evicted the replay of {req:?}, which was not remembered"
                        );
                        key
                    }
                    // Some live v2 match of that family was remembered.
                    None => {
                        let fits = |m: &HashMap<PairKey, Remembered>| -> Vec<PairKey> {
                            m.iter()
                                .filter(|(k, r)| {
                                    matches!(k, PairKey::V2(v6, ..) if *v6 == ipv6)
                                        && self.live(r.at, self.cfg.replay_ttl_ms)
                                })
                                .map(|(k, _)| *k)
                                .collect()
                        };
                        let (sure, maybe) = (fits(&self.replay), fits(&self.uncertain_replay));
                        match (&sure[..], &maybe[..]) {
                            ([], []) => panic!("evicted a v2 replay, none was remembered"),
                            ([key], []) => *key,
                            ([], [key]) => {
                                self.uncertain_replay.remove(key);
                                return;
                            }
                            _ => {
                                for k in sure {
                                    let r = self.replay.remove(&k).expect("listed");
                                    self.uncertain_replay.insert(k, r);
                                }
                                return;
                            }
                        }
                    }
                };
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
pub fn sends<R: Copy>(outcome: &Outcome<R>) -> Vec<Transmit<R>> {
    match *outcome {
        Outcome::Replayed(s) => vec![s],
        Outcome::Matched {
            waiting,
            completing,
        } => vec![waiting, completing],
        _ => Vec::new(),
    }
}

/// Where an outcome's replies go.
fn destinations<R: Copy>(outcome: &Outcome<R>) -> Vec<SocketAddr> {
    sends(outcome).into_iter().map(|t| t.to).collect()
}

/// What a retransmit of the waiter gets after a match: its first reply, and
/// for v2 without the candidates (the server does not keep them).
fn replayed_as(t: AnyTransmit) -> AnyTransmit {
    match t {
        AnyTransmit::V2(mut t) => {
            t.reply.peer_candidates = v2::Candidates::EMPTY;
            AnyTransmit::V2(t)
        }
        seed => seed,
    }
}

/// The request the waiter of a pair sent, rebuilt from the one that
/// completed it (for v2 with the waiter's info and no candidates).
fn counterpart(req: AnyRequest, waiter_info: u8) -> AnyRequest {
    match req {
        AnyRequest::Seed(r) => AnyRequest::Seed(r.counterpart()),
        AnyRequest::V2(r) => AnyRequest::V2(v2_request(
            r.pair().counterpart(),
            waiter_info,
            v2::Candidates::EMPTY,
        )),
    }
}

/// An admitted v2 request for `pair` (the engine does not look at the token).
pub fn v2_request(pair: v2::Pair, info: u8, candidates: v2::Candidates) -> v2::Request {
    v2::Request {
        token: v2::Token {
            pair,
            key_id: 0,
            expiry: 0,
            mac: [0; v2::MAC_LEN],
        },
        cookie: None,
        info: v2::ClientInfo(info),
        candidates,
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
