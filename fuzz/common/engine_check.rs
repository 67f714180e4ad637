//! One oracle for the matching engine, shared by the `engine` fuzz target
//! (`fuzz/fuzz_targets/engine.rs`) and the CI property test
//! (`tests/engine_props.rs`), so both check exactly the same properties.
//!
//! [`Checker`] drives a [`psync::Engine`] through a sequence of [`Op`]s and,
//! after every call, compares what the engine did with a small reference
//! model kept in `HashMap`s: who is pending under which key and since when,
//! and which reply each side of the latest match of a key was given. It uses
//! the engine's public API only. Every violation panics with a message, which
//! is what both libFuzzer and proptest catch.
//!
//! The model's clock is `u64` and never wraps; the engine keeps wrapping
//! 32-bit milliseconds. Drivers start the clock anywhere (near `u32::MAX`
//! too) and keep a run's span far below 2^31 ms, where the two must agree.
#![allow(dead_code)] // each driver uses a different part of it

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use psync::engine::{Drop, Send};
use psync::wire::{WireError, REQUEST_LEN};
use psync::{Engine, EngineConfig, Outcome, Request};

/// The sources a run draws from: a handful, so that IDs collide, pairs
/// match, and the same address comes back. IPv4 and IPv6 (a v4-mapped one
/// too, which is IPv6 to the engine), equal IPs with different ports, and
/// port 0, which a spoofed datagram can carry.
pub const SOURCES: [&str; 8] = [
    "192.0.2.1:1000",
    "192.0.2.1:1001",
    "198.51.100.2:2000",
    "203.0.113.3:65535",
    "0.0.0.0:0",
    "[2001:db8::1]:1000",
    "[2001:db8::2]:1",
    "[::ffff:192.0.2.1]:1000",
];

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

/// Which table family an address lands in: the engine keeps IPv4 and IPv6
/// apart, and a request never matches across them.
fn family(a: SocketAddr) -> bool {
    a.is_ipv6()
}

/// What `max_pending_per_source` counts against: the IPv4 address, or the
/// IPv6 /64 (written here from the documented rule, not from the engine).
fn source_of(a: SocketAddr) -> (bool, u64) {
    match a.ip() {
        IpAddr::V4(ip) => (false, u64::from(u32::from(ip))),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            (
                true,
                u64::from_be_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]),
            )
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    addr: SocketAddr,
    since: u64,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    asker: SocketAddr,
    sent: Send,
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
    registered: u64,
    refreshed: u64,
    matched: u64,
    replayed: u64,
    table_full: u64,
    per_ip_limit: u64,
}

/// The engine under test and the reference model beside it.
pub struct Checker {
    /// The engine under test.
    pub engine: Engine,
    cfg: EngineConfig,
    now: u64,
    start: u64,
    pending: HashMap<(bool, u64), Pending>,
    replay: HashMap<(bool, u64), Remembered>,
    last_match: Option<LastMatch>,
    tally: Tally,
    /// Every address that has sent a valid request from a served family.
    valid_senders: Vec<SocketAddr>,
    /// Every registration and refresh: its source and time.
    counted: Vec<((bool, u64), u64)>,
    /// How many times a retransmit was checked to get the identical reply
    /// (lets a driver see that the property was exercised).
    pub replays_checked: u64,
    /// Matches seen.
    pub matches: u64,
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
            counted: Vec::new(),
            replays_checked: 0,
            matches: 0,
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

    fn check_capacity(&self) {
        assert!(
            self.engine.pending() <= self.engine.capacity(),
            "pending {} above capacity {}",
            self.engine.pending(),
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

    fn check_ports(&self, s: &Send) {
        let (lo, hi) = (self.cfg.port_lo, self.cfg.port_hi);
        let r = &s.reply;
        assert!(
            (lo..=hi).contains(&r.src_port) && (lo..=hi).contains(&r.dst_port),
            "ports {}/{} outside {lo}-{hi}",
            r.src_port,
            r.dst_port
        );
        assert_ne!(r.src_port, r.dst_port, "equal ports in {s:?}");
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

    /// Hands one datagram to the engine and checks the outcome.
    pub fn handle(&mut self, datagram: &[u8], src: SocketAddr) -> Outcome {
        let now = self.now;
        let pending_before = self.engine.pending();
        let replay_ever_full = self.engine.counters.replay_full > 0;
        let outcome = self.engine.handle(datagram, src, now);
        self.tally.received += 1;
        self.check_capacity();

        let req = match Request::parse(datagram) {
            Ok(req) => req,
            Err(e) => {
                // No reply to invalid input, and the reason is the right one.
                let want = match e {
                    WireError::SelfPair => Drop::SelfPair,
                    _ => Drop::BadSize,
                };
                assert_eq!(
                    datagram.len() == REQUEST_LEN,
                    want == Drop::SelfPair,
                    "parse error {e:?} for {} bytes",
                    datagram.len()
                );
                assert_eq!(
                    outcome,
                    Outcome::Dropped(want),
                    "invalid datagram {datagram:?} from {src}"
                );
                match want {
                    Drop::SelfPair => self.tally.self_pair += 1,
                    _ => self.tally.bad_size += 1,
                }
                self.check_tally();
                return outcome;
            }
        };
        if !self.served(src) {
            assert_eq!(outcome, Outcome::Dropped(Drop::Family), "unserved {src}");
            self.tally.bad_family += 1;
            self.check_tally();
            return outcome;
        }
        if !self.valid_senders.contains(&src) {
            self.valid_senders.push(src);
        }

        let fam = family(src);
        let key = (fam, req.key());
        let other = (fam, req.counterpart().key());
        let replay_ttl = self.cfg.replay_ttl_ms;
        let remembered = self
            .replay
            .get(&key)
            .copied()
            .filter(|r| r.asker == src && self.live(r.at, replay_ttl));
        let waiting = self
            .pending
            .get(&other)
            .copied()
            .filter(|p| self.live(p.since, self.cfg.ttl_ms));
        let mine = self
            .pending
            .get(&key)
            .copied()
            .filter(|p| self.live(p.since, self.cfg.ttl_ms));

        // Whatever happened, a reply only goes to an address that sent a
        // valid request.
        for to in sends(&outcome) {
            assert!(
                self.valid_senders.contains(&to.to),
                "reply to {} which never sent a valid request",
                to.to
            );
        }

        match outcome {
            Outcome::Replayed(sent) => {
                assert_eq!(sent.to, src, "replay sent elsewhere");
                self.check_ports(&sent);
                if !replay_ever_full {
                    let r = remembered.unwrap_or_else(|| {
                        panic!("replayed {sent:?} to {src} with no live match remembered")
                    });
                    assert_eq!(sent, r.sent, "a retransmit got a different reply");
                    self.replays_checked += 1;
                }
                self.tally.replayed += 1;
            }
            Outcome::Matched {
                waiting: w,
                completing: c,
            } => {
                if !replay_ever_full {
                    assert!(
                        remembered.is_none(),
                        "matched although a retransmit should have been replayed"
                    );
                }
                let p = waiting.unwrap_or_else(|| {
                    panic!("matched {src} with no live registration of the counterpart")
                });
                assert_eq!(w.to, p.addr, "waiting reply not to the newest registrant");
                assert_eq!(c.to, src, "completing reply not to the sender");
                assert_eq!(w.reply.peer, src, "waiter not told the completer");
                assert_eq!(c.reply.peer, w.to, "completer not told the waiter");
                assert_eq!(family(w.to), fam, "matched across families");
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
                self.pending.remove(&other);
                self.replay.insert(
                    key,
                    Remembered {
                        asker: src,
                        sent: c,
                        at: now,
                    },
                );
                self.replay.insert(
                    other,
                    Remembered {
                        asker: w.to,
                        sent: w,
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
            Outcome::Registered
            | Outcome::Refreshed
            | Outcome::Dropped(Drop::TableFull | Drop::PerSourceLimit) => {
                if !replay_ever_full {
                    assert!(
                        remembered.is_none(),
                        "{outcome:?} although a retransmit should have been replayed"
                    );
                }
                assert!(
                    waiting.is_none(),
                    "{outcome:?} although the counterpart was live: {waiting:?}"
                );
                let full = pending_before >= self.engine.capacity();
                let max = self.cfg.max_pending_per_source;
                let source = source_of(src);
                match outcome {
                    Outcome::Refreshed => {
                        assert!(mine.is_some(), "refreshed with nothing live");
                        self.tally.refreshed += 1;
                    }
                    Outcome::Registered => {
                        assert!(mine.is_none(), "registered over a live entry");
                        assert!(!full, "registered when full");
                        // The engine may overcount a source, never undercount.
                        let held = self.live_held(source);
                        assert!(
                            max == 0 || held < max as usize,
                            "registered from {src} which already holds {held} of {max}"
                        );
                        self.tally.registered += 1;
                    }
                    Outcome::Dropped(Drop::TableFull) => {
                        assert!(mine.is_none(), "a refresh was refused for room");
                        assert!(
                            full,
                            "table_full with {pending_before} of {} pending",
                            self.engine.capacity()
                        );
                        self.tally.table_full += 1;
                    }
                    _ => {
                        assert!(mine.is_none(), "a refresh was refused by the source limit");
                        assert!(!full, "per-source limit reported for a full table");
                        assert!(max > 0, "per-source limit while it is off");
                        // Overcounting is bounded: an expired registration
                        // may go on counting, but for at most one more
                        // lifetime (16 ms of slack for rounding).
                        let horizon = 2 * u64::from(self.cfg.ttl_ms) + 16;
                        let recent = self
                            .counted
                            .iter()
                            .filter(|&&(s, t)| s == source && now - t < horizon)
                            .count();
                        assert!(
                            recent >= max as usize,
                            "{src} refused at limit {max} after {recent} recent registrations"
                        );
                        self.tally.per_ip_limit += 1;
                    }
                }
                if matches!(outcome, Outcome::Registered | Outcome::Refreshed) {
                    self.counted.push((source, now));
                    self.pending.insert(
                        key,
                        Pending {
                            addr: src,
                            since: now,
                        },
                    );
                }
            }
            Outcome::Dropped(why) => panic!("valid request from {src} dropped as {why:?}"),
        }
        self.check_tally();
        outcome
    }

    /// Live registrations held by addresses of `source`, per the model.
    fn live_held(&self, source: (bool, u64)) -> usize {
        self.pending
            .values()
            .filter(|p| source_of(p.addr) == source && self.live(p.since, self.cfg.ttl_ms))
            .count()
    }

    fn check_tally(&self) {
        let c = &self.engine.counters;
        let got = Tally {
            received: c.received,
            bad_size: c.bad_size,
            self_pair: c.self_pair,
            bad_family: c.bad_family,
            registered: c.registered,
            refreshed: c.refreshed,
            matched: c.matched,
            replayed: c.replayed,
            table_full: c.table_full,
            per_ip_limit: c.per_ip_limit,
        };
        assert_eq!(got, self.tally, "counters disagree with the outcomes");
    }
}

/// The replies an outcome sends.
pub fn sends(outcome: &Outcome) -> Vec<Send> {
    match *outcome {
        Outcome::Replayed(s) => vec![s],
        Outcome::Matched {
            waiting,
            completing,
        } => vec![waiting, completing],
        _ => Vec::new(),
    }
}
