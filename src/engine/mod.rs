//! The matching engine: pairs waiting and matched, replay, fair admission,
//! port choice.
//!
//! [`Engine::handle`] takes one datagram, its source address and the time,
//! and says what to send; [`Engine::handle_batch`] does the same for a
//! received batch, first fetching into cache every slot the batch will touch
//! so that their cache misses overlap instead of queueing. The engine owns no
//! socket and reads no clock, so it is tested and benchmarked without a
//! network. It never allocates after [`Engine::new`].
//!
//! Rules (PROTOCOL.md is the contract):
//! - a request `(A, B)` waits until `(B, A)` arrives from the same address
//!   family;
//! - the match picks two distinct ports `P1 != P2` from the port range; the
//!   peer that waited gets `{src: P1, dst: P2, peer: completer}`, the
//!   completer gets `{src: P2, dst: P1, peer: waiter}`;
//! - after a match both replies are remembered for the replay lifetime: the
//!   same request from the same address gets the same reply again; the same
//!   request from another address starts the pair afresh (it waits again, and
//!   the old replies are forgotten);
//! - a repeated request while pending refreshes its expiry and takes the
//!   newest source address;
//! - at most `capacity` pairs are held, waiting or remembered. From three
//!   quarters of that on, a new registration takes the slot of a remembered
//!   match if it samples one (its replay is cut short: `replay_full`), so
//!   that matches never fill the table. When the table is full, a new
//!   registration first takes the slot of a remembered match, then, by
//!   fairness, the slot of
//!   a waiting registration whose network (IPv4 /24, IPv6 /48) holds more
//!   than the newcomer's would, or within one network whose address holds
//!   more (`evicted`); otherwise it is refused (`table_full`). See
//!   [`source`] for the per-source limits that apply before any of this.
//!
//! Every pair has one slot (`engine/pair.rs`) from registration to the end of its
//! replay, so every request costs one table probe; per-source counts cost one
//! more probe per prefix, and only for registrations. Seed requests from
//! IPv4 addresses, in their common cases, take a lean path on the slot's
//! raw bytes (`engine/lean.rs`); everything else takes
//! [`Engine::process`], and a property test holds the two to the same
//! outcomes.
//!
//! **Protocol v2** ([`Engine::handle_v2`], [`Engine::handle_batch_v2`]) takes
//! requests already parsed and *admitted* (their token verified: the loop's
//! admission gate does that, the engine knows no keys) and follows the same
//! rules in the same table, under the same capacity and per-source limits.
//! A v2 pair's key is a keyed SipHash-1-3 of its two 64-bit IDs (96 bits kept,
//! so two pairs share a key with probability about 2^-96 per pair of pairs)
//! with the v2 bit set, so a v2 request never meets a seed request. Its
//! replies are [`v2::Reply`]s: each peer is told its own public address
//! (`your_addr`) and its partner's client-info bits 0-3 (the slot keeps four
//! bits per side). The slot has no room for candidate addresses, so the
//! server stores none: the *waiter's* reply carries the candidates of the
//! request that completes the pair (it is in hand at the match), the
//! completer's reply carries none, and a replay carries none (the waiter's
//! replay is its first reply without the candidates; the completer's is its
//! first reply, byte for byte).

mod lean;
mod pair;
pub mod source;

use std::net::{IpAddr, SocketAddr};

use rand_xoshiro::rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use siphasher::sip128::SipHasher13;

use crate::stats::{EngineCounters, WaitHistogram};
use crate::table::{AllocError, Load, Table};
use crate::wire::v2;
use crate::wire::{PeerId, Reply, Request, WireError};
use pair::{Addr, Match, Millis, PairEntry, PairKey, Side, State, V6Matches, KIND_V2, KIND_V6};
pub use source::{Level, SourceLimits};
use source::{Packed, SourceCounts, Weight};

/// How the engine is sized and behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most pairs held at once (waiting, or matched and remembered for
    /// replay), both families together.
    pub capacity: usize,
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
    /// Serve IPv4 peers.
    pub ipv4: bool,
    /// Serve IPv6 peers (reserves the IPv6 match store).
    pub ipv6: bool,
    /// Most registrations pending per source prefix ([`SourceLimits::OFF`]:
    /// no counting, and no fair admission).
    pub limits: SourceLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            capacity: 1 << 20,
            ttl_ms: 30_000,
            replay_ttl_ms: 5_000,
            port_lo: 1024,
            port_hi: 65535,
            seed: None,
            ipv4: true,
            ipv6: true,
            limits: SourceLimits::default(),
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

/// Largest `capacity`: 2^31 pairs (the IPv6 match store counts in `u32`,
/// and at about 60 bytes a pair this is already 128 GiB).
pub const MAX_CAPACITY: usize = 1 << 31;

/// Why a datagram got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a request of any known size.
    BadSize,
    /// `self_id == peer_id`.
    SelfPair,
    /// The source address cannot be a peer (port 0, unspecified, multicast,
    /// broadcast, IPv4-mapped or -compatible IPv6).
    BadSource,
    /// The source's address family is not served.
    Family,
    /// The table is full and no slot could be taken by fairness.
    TableFull,
    /// A source prefix at this level already holds its limit.
    SourceLimit(Level),
}

/// One reply and where it goes: a seed-format [`Reply`] (the default), or a
/// [`v2::Reply`] for protocol v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit<R = Reply> {
    /// The peer's public address, the source of its request.
    pub to: SocketAddr,
    /// The relay it came through: 0 when it came straight to this server.
    pub via: u8,
    /// What it is told.
    pub reply: R,
}

/// A pair that gave up its slot to a new registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evicted {
    /// A waiting registration (its source held more than its fair share).
    Pending {
        /// Where it waited.
        from: SocketAddr,
        /// Its request, for the seed format.
        request: Option<Request>,
    },
    /// A remembered match, whose replay was cut short.
    Replay {
        /// One side's request of the pair, for the seed format.
        request: Option<Request>,
        /// The pair's family.
        ipv6: bool,
    },
}

/// What handling one datagram produced. `Outcome` (with seed-format
/// replies) for [`Engine::handle`], `Outcome<v2::Reply>` for
/// [`Engine::handle_v2`]: the replies of a v2 request are v2 replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<R = Reply> {
    /// Dropped without a reply.
    Dropped(DropReason),
    /// A new pending registration, which may have taken another pair's slot.
    Registered {
        /// The pair whose slot it took, if the table was full.
        evicted: Option<Evicted>,
    },
    /// A pending registration was refreshed (and took the newest address).
    Refreshed,
    /// A retransmit after a match: the same reply again.
    Replayed(Transmit<R>),
    /// The partner was waiting: a reply to each.
    Matched {
        /// The reply to the peer that was waiting.
        waiting: Transmit<R>,
        /// The reply to the peer whose request completed the pair.
        completing: Transmit<R>,
    },
}

/// Why an [`EngineConfig`] cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `capacity` is zero or above [`MAX_CAPACITY`].
    #[error("--capacity must be between 1 and {MAX_CAPACITY}, got {0}")]
    Capacity(usize),
    /// The port range has fewer than two ports or starts at zero.
    #[error("--port-range {0}-{1} must hold at least two ports, none of them 0")]
    PortRange(u16, u16),
    /// A lifetime is zero or longer than [`MAX_LIFETIME_MS`].
    #[error("--{0} must be between 1ms and 24h")]
    Lifetime(&'static str),
    /// Neither family enabled.
    #[error("no address family enabled")]
    NoFamily,
    /// The tables cannot be allocated.
    #[error("--capacity {capacity} needs {} of memory, which cannot be allocated", bytes_text(*.bytes))]
    Memory {
        /// The capacity asked for.
        capacity: usize,
        /// Bytes needed, when that number fits a `usize`.
        bytes: Option<usize>,
    },
}

fn bytes_text(bytes: Option<usize>) -> String {
    match bytes {
        Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{} MiB", b.div_ceil(1 << 20)),
        None => "more bytes than this machine can address".into(),
    }
}

impl EngineConfig {
    /// Checks every field; what [`Engine::new`] does before it allocates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(ConfigError::Capacity(self.capacity));
        }
        if self.port_lo == 0 || self.port_hi <= self.port_lo {
            return Err(ConfigError::PortRange(self.port_lo, self.port_hi));
        }
        if self.ttl_ms == 0 || self.ttl_ms > MAX_LIFETIME_MS {
            return Err(ConfigError::Lifetime("ttl"));
        }
        if self.replay_ttl_ms == 0 || self.replay_ttl_ms > MAX_LIFETIME_MS {
            return Err(ConfigError::Lifetime("replay-ttl"));
        }
        if !self.ipv4 && !self.ipv6 {
            return Err(ConfigError::NoFamily);
        }
        Ok(())
    }

    /// Bytes the engine allocates and writes at start (the pair table and
    /// the source counts), or `None` when that overflows. The IPv6 match
    /// store comes on top as it is used: see [`EngineConfig::ipv6_store_bytes`].
    pub fn memory(&self) -> Option<usize> {
        let pairs = Table::<PairEntry>::bytes_for(self.capacity, Load::DEFAULT)?;
        let sources = if self.limits.is_off() {
            0
        } else {
            SourceCounts::bytes_for(self.capacity)?
        };
        pairs.checked_add(sources)
    }

    /// Address space reserved for IPv6 matches: 36 bytes per unit of
    /// capacity, resident only as far as IPv6 matches are held for replay.
    pub fn ipv6_store_bytes(&self) -> Option<usize> {
        if self.ipv6 {
            self.capacity.checked_mul(36)
        } else {
            Some(0)
        }
    }
}

/// How expiry keeps pace: the sweep walks the table once per quarter of the
/// longer lifetime (the clock's share), and besides that a full pass per
/// `capacity / SWEEP_SHARE` registrations (the registrations' share), or
/// once per quarter of the shorter lifetime while the table is three
/// quarters full.
///
/// Why: expired entries matter in two ways. An expired waiting registration
/// still counts against its source until it is reclaimed, which the clock's
/// share bounds by a quarter of `--ttl`, as it always did. An expired
/// remembered match only holds a slot: what matters is how many of them pile
/// up, and they pile up as fast as pairs register. With a full pass per
/// `capacity / SWEEP_SHARE` registrations, the expired entries not yet
/// reclaimed stay near an eighth of the capacity at any match rate, and the
/// sweep costs a fixed number of slots per registration (about 9) instead
/// of a fixed number per second.
///
/// What it replaced: a clock-driven fast pace (the whole table per 1.25 s)
/// once remembered matches held an eighth of the capacity. That fixed a
/// collapse (at the slow pace alone, 5-s matches at a sustained 130k pairs/s
/// packed the slots ahead of the cursor into one cluster, every removal
/// walked it, and the server fell to 2k pairs/s), but below saturation it
/// walked the whole table every 1.25 s whatever the rate: a fifth of the
/// engine bench's time at its simulated 20k pairs/s. The registrations'
/// share keeps the fix (at 130k registrations/s it sweeps the same 1.2M
/// slots/s) and costs less the fewer pairs there are.
struct Pace {
    /// Slots to examine per millisecond, in 1/1024ths, for the clock.
    slow_x1024: u64,
    /// The same while the table is three quarters full.
    fast_x1024: u64,
    /// Slots to examine per registration, in 1/1024ths.
    per_registration_x1024: u64,
    /// The `registered` counter at the last call.
    registered: u64,
    /// Slots owed, in 1/1024ths.
    debt_x1024: u64,
    last: Option<Millis>,
}

/// The registrations' share of the sweep: a full pass per
/// `capacity / SWEEP_SHARE` registrations.
const SWEEP_SHARE: u64 = 8;

/// Most slots one [`Engine::expire`] call examines, so one loop turn stays short.
pub const MAX_SWEEP_PER_CALL: usize = 2048;
/// Most entries one [`Engine::expire`] call removes, so a turn stays short
/// where a million entries expire together (`cargo bench --bench expiry`:
/// 15 µs a turn on average, 46 µs at worst); what is not removed now is
/// removed by the next calls (every 1 ms while work is owed), and a lookup
/// treats an expired entry as absent meanwhile. 256 per call is 256k
/// removals a second, well above the match rate one loop sustains.
pub const MAX_REMOVALS_PER_CALL: usize = 256;
/// A table is crowded (see `Engine::crowded`) from `capacity - capacity /
/// CROWDED_DEN` pairs held: three quarters of the capacity, 66% of the
/// slots at the default load.
pub const CROWDED_DEN: usize = 4;
/// Slots a full table sweeps for expired entries before it takes a live one.
const FULL_SWEEP: usize = 32;
/// Slots sampled to choose whose slot a new registration takes when the
/// table is full. More samples find the heaviest source and the oldest
/// remembered match more surely and cost more: at 16, a source holding a
/// tenth of the table is among them 81% of the time, and the oldest of 16
/// remembered matches is older than 94% of them.
const EVICTION_SAMPLES: usize = 16;

/// The bookkeeping beside the pair table: what leaves it must be uncounted.
struct Books {
    v6: V6Matches,
    sources: Option<SourceCounts>,
    pending: usize,
    remembered: usize,
    counters: EngineCounters,
}

/// Why a pair leaves the table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Its time is up (registration or replay).
    Expired,
    /// Its slot was taken by a new registration.
    Evicted,
}

impl Books {
    fn forget(&mut self, e: &PairEntry, why: Leave) {
        if e.is_matched() {
            if let Some(i) = e.v6_index() {
                self.v6.free(i);
            }
            self.remembered -= 1;
            if why == Leave::Evicted {
                self.counters.replay_full += 1;
            }
        } else {
            if let State::Pending { addr, .. } = e.state(&self.v6) {
                if let Some(s) = self.sources.as_mut() {
                    s.remove_counted(addr.ip(), e.counted_at());
                }
            }
            self.pending -= 1;
            match why {
                Leave::Expired => self.counters.expired += 1,
                Leave::Evicted => self.counters.evicted += 1,
            }
        }
    }
}

/// The rendezvous state machine. See the module docs for its rules.
pub struct Engine {
    pairs: Table<PairEntry>,
    books: Books,
    capacity: usize,
    ttl: u32,
    replay_ttl: u32,
    port_lo: u16,
    port_span: u32,
    rng: Xoshiro256PlusPlus,
    ipv4: bool,
    ipv6: bool,
    pace: Pace,
    wait: WaitHistogram,
    /// One chunk of a batch, classified: see [`Engine::handle_batch`].
    scratch: Box<[Option<Classified>]>,
    /// Keyed hash of a v2 pair's two IDs into its 96-bit key.
    v2_hasher: SipHasher13,
    /// Whether IPv4 seed requests take the lean path ([`lean`]); off only
    /// in tests ([`Engine::general_path_only`]).
    lean: bool,
}

/// A datagram of a batch, classified: its pair key or why it is dropped,
/// and its source.
type Classified = (Result<PairKey, DropReason>, SocketAddr);

/// Requests [`Engine::handle_batch`] fetches ahead of the one it handles.
const AHEAD: usize = 16;
/// Requests before it handles one that it looks at the slot of (see
/// [`Engine::handle_batch`]).
const PEEK: usize = 8;

/// Requests [`Engine::handle_batch`] classifies ahead at most (a batch of
/// more is handled in chunks of this many).
const SCRATCH: usize = 256;

impl Engine {
    /// Checks `cfg` and allocates every table.
    pub fn new(cfg: &EngineConfig) -> Result<Engine, ConfigError> {
        cfg.validate()?;
        let memory_error = || ConfigError::Memory {
            capacity: cfg.capacity,
            bytes: cfg.memory(),
        };
        cfg.memory().ok_or_else(memory_error)?;
        let mut rng = match cfg.seed {
            Some(seed) => Xoshiro256PlusPlus::seed_from_u64(seed),
            None => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).expect("the OS random source failed");
                Xoshiro256PlusPlus::from_seed(seed)
            }
        };
        let mut seed = || [rng.next_u64(), rng.next_u64()];
        let (pair_seed, source_seed) = (seed(), seed());
        // The v2 key's hash is keyed from the table's seed (secret alike),
        // so that adding it drew nothing more from `rng`.
        let v2_hasher = SipHasher13::new_with_keys(
            splitmix64(pair_seed[0] ^ V2_KEY_DOMAIN),
            splitmix64(pair_seed[1] ^ V2_KEY_DOMAIN),
        );
        // The IPv6 store first (address space only), then the smaller table,
        // then the larger: what cannot be had fails before much is written.
        let v6 =
            V6Matches::try_new(if cfg.ipv6 { cfg.capacity } else { 0 }).ok_or_else(memory_error)?;
        let sources = if cfg.limits.is_off() {
            None
        } else {
            Some(
                SourceCounts::try_new(cfg.capacity, cfg.limits, source_seed)
                    .map_err(|_| memory_error())?,
            )
        };
        let pairs = Table::try_new(cfg.capacity, Load::DEFAULT, pair_seed, PairEntry::default())
            .map_err(|_: AllocError| memory_error())?;
        let rate = |lifetime: u32| {
            let period = u64::from((lifetime / 4).max(1));
            (pairs.slots() as u64 * 1024).div_ceil(period)
        };
        let slow_x1024 = rate(cfg.ttl_ms.max(cfg.replay_ttl_ms));
        let fast_x1024 = rate(cfg.ttl_ms.min(cfg.replay_ttl_ms));
        let per_registration_x1024 =
            (pairs.slots() as u64 * 1024 * SWEEP_SHARE).div_ceil(cfg.capacity.max(1) as u64);
        Ok(Engine {
            pairs,
            books: Books {
                v6,
                sources,
                pending: 0,
                remembered: 0,
                counters: EngineCounters::default(),
            },
            capacity: cfg.capacity,
            ttl: cfg.ttl_ms,
            replay_ttl: cfg.replay_ttl_ms,
            port_lo: cfg.port_lo,
            port_span: u32::from(cfg.port_hi - cfg.port_lo) + 1,
            rng,
            ipv4: cfg.ipv4,
            ipv6: cfg.ipv6,
            pace: Pace {
                slow_x1024,
                fast_x1024,
                per_registration_x1024,
                registered: 0,
                debt_x1024: 0,
                last: None,
            },
            wait: WaitHistogram::default(),
            scratch: vec![None; SCRATCH].into_boxed_slice(),
            v2_hasher,
            lean: true,
        })
    }

    /// Registrations waiting for their partner (including expired ones not
    /// yet reclaimed).
    pub fn pending(&self) -> usize {
        self.books.pending
    }

    /// Matched pairs remembered for replay.
    pub fn replay_entries(&self) -> usize {
        self.books.remembered
    }

    /// The most pairs held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The engine's counters, gauges refreshed.
    pub fn counters(&self) -> EngineCounters {
        let mut c = self.books.counters;
        c.pending = self.books.pending as u64;
        c.remembered = self.books.remembered as u64;
        c
    }

    /// How long the first peer of each matched pair waited (since its last
    /// registration or refresh).
    pub fn wait(&self) -> &WaitHistogram {
        &self.wait
    }

    /// Bytes allocated and written at start by the tables.
    pub fn allocated_bytes(&self) -> usize {
        self.pairs.allocated_bytes()
            + self
                .books
                .sources
                .as_ref()
                .map_or(0, |s| s.allocated_bytes())
    }

    /// What the per-source counts say `ip`'s prefixes hold (estimates, never
    /// below the truth), finest first; `None` when limits are off. For tests
    /// and diagnostics.
    pub fn source_estimate(&self, ip: IpAddr) -> Option<Vec<(Level, u32)>> {
        let s = self.books.sources.as_ref()?;
        let (ps, n) = source::prefixes(ip);
        Some(ps[..n].iter().map(|p| (p.level, s.held(*p))).collect())
    }

    /// Registrations `prefix` holds pending here: an estimate never below
    /// the truth (see [`source`]); 0 when per-source limits are off.
    pub fn source_held(&self, prefix: source::Prefix) -> u32 {
        self.books.sources.as_ref().map_or(0, |s| s.held(prefix))
    }

    /// The most registrations `prefix` may hold pending here: its own limit
    /// if [`Engine::set_source_limit`] gave it one, else its level's from
    /// [`EngineConfig::limits`]; `None` when there is no limit.
    pub fn source_limit(&self, prefix: source::Prefix) -> Option<u32> {
        self.books.sources.as_ref().and_then(|s| s.limit(prefix))
    }

    /// Gives one source prefix a pending limit of its own on this engine
    /// (`Some(0)`: no new registration), or back its level's (`None`). A
    /// server with several workers uses it to share a source's limit among
    /// their engines. Registrations already held are never dropped for it.
    /// False, and nothing changed, when per-source limits are off or
    /// [`source::MAX_OVERRIDES`] prefixes already have their own.
    pub fn set_source_limit(&mut self, prefix: source::Prefix, limit: Option<u32>) -> bool {
        match self.books.sources.as_mut() {
            Some(s) => s.set_limit(prefix, limit),
            None => false,
        }
    }

    /// Bytes of the IPv6 match store written so far (its high-water mark).
    pub fn ipv6_store_touched(&self) -> usize {
        self.books.v6.touched_bytes()
    }

    /// Checks one datagram and turns it into a pair key, or says why not.
    #[inline]
    fn classify(&self, datagram: &[u8], src: SocketAddr) -> Result<PairKey, DropReason> {
        let req = match Request::parse(datagram) {
            Ok(req) => req,
            Err(WireError::SelfPair) => return Err(DropReason::SelfPair),
            Err(_) => return Err(DropReason::BadSize),
        };
        let served = match src {
            SocketAddr::V4(_) => self.ipv4,
            SocketAddr::V6(_) => self.ipv6,
        };
        if !served {
            return Err(DropReason::Family);
        }
        if source::is_bogus(src) {
            return Err(DropReason::BadSource);
        }
        Ok(self.seed_key(&req, src.is_ipv6()))
    }

    /// Handles one datagram from `src` received at `now` (milliseconds on the
    /// caller's monotonic clock).
    pub fn handle(&mut self, datagram: &[u8], src: SocketAddr, now: u64) -> Outcome {
        let key = self.classify(datagram, src);
        let mut outcome = Outcome::Refreshed;
        self.handle_direct(&key, src, now as Millis, 0, &mut |_, o| outcome = *o);
        outcome
    }

    /// Counts and handles a classified seed request that came straight to
    /// this server, the `k`-th of its batch, and calls `done(k, outcome)`:
    /// by the lean path ([`lean`]) where it applies, else by
    /// [`Engine::process`].
    #[inline(always)]
    fn handle_direct(
        &mut self,
        key: &Result<PairKey, DropReason>,
        src: SocketAddr,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        if let (Ok(key), SocketAddr::V4(v4), true) = (key, src, self.lean) {
            self.books.counters.received += 1;
            return self.process_v4(key, v4, now, k, done);
        }
        done(k, &self.handle_classified(key, src, 0, 0, now));
    }

    /// Turns the lean path off, so that every request takes the general
    /// one: for tests that hold the two to the same outcomes.
    #[doc(hidden)]
    pub fn general_path_only(&mut self) {
        self.lean = false;
    }

    /// Handles a request that another member of a cluster received from
    /// `src` and forwarded here; `via` (never 0) names that member. Its side
    /// of the pair remembers `via`, so every reply to it (the match, and
    /// replays) carries it in [`Transmit::via`] and goes back the same way.
    /// Otherwise the same as [`Engine::handle`].
    pub fn handle_relayed(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        via: u8,
        now: u64,
    ) -> Outcome {
        let key = self.classify(datagram, src);
        self.handle_classified(&key, src, via, 0, now as Millis)
    }

    /// Counts a datagram already classified, and handles it if valid.
    #[inline]
    fn handle_classified(
        &mut self,
        key: &Result<PairKey, DropReason>,
        src: SocketAddr,
        via: u8,
        info: u8,
        now: Millis,
    ) -> Outcome {
        let c = &mut self.books.counters;
        c.received += 1;
        match key {
            Ok(key) => self.process(key, src, via, info, now),
            Err(why) => {
                match why {
                    DropReason::BadSize => c.bad_size += 1,
                    DropReason::SelfPair => c.self_pair += 1,
                    DropReason::Family => c.bad_family += 1,
                    _ => c.bad_source += 1,
                }
                Outcome::Dropped(*why)
            }
        }
    }

    /// Handles a received batch of `n` datagrams (`get(k)` gives the k-th,
    /// or `None` to skip it), calling `done(k, outcome)` for each handled,
    /// in order. The replies to send are in the outcomes.
    ///
    /// The same outcomes as calling [`Engine::handle`] on each in turn. The
    /// batch is handled in three passes, so that its cache misses overlap
    /// instead of queueing: the first fetches each request's slot, the
    /// second looks at each slot (now in cache) and fetches the source
    /// counts the request will touch (a waiting partner's it will match, or
    /// its own if it will register), the third handles the requests in
    /// order. The first two only read.
    pub fn handle_batch<'d>(
        &mut self,
        n: usize,
        get: impl Fn(usize) -> Option<(&'d [u8], SocketAddr)>,
        now: u64,
        mut done: impl FnMut(usize, &Outcome),
    ) {
        let now = now as Millis;
        self.pipeline(
            n,
            |e, k| get(k).map(|(d, src)| (e.classify(d, src), src)),
            |e, k, (key, src)| e.handle_direct(key, *src, now, k, &mut done),
        );
    }

    /// The pipeline of [`Engine::handle_batch`] and
    /// [`Engine::handle_batch_v2`] over `n` requests, in chunks of at most
    /// [`SCRATCH`]: request i is classified (`classify(self, i)`, `None` to
    /// skip it) and its slot fetched; request i - (AHEAD - PEEK), whose slot
    /// has arrived by then, is looked at to fetch the counts it will touch
    /// ([`Engine::prefetch_counts`]); request i - AHEAD is handled
    /// (`handle`). So about
    /// AHEAD requests' misses are in flight at once: enough to hide memory
    /// latency, few enough for the CPU's miss queues (fetching a whole batch
    /// ahead made the prefetches themselves stall).
    #[inline]
    fn pipeline(
        &mut self,
        n: usize,
        classify: impl Fn(&Self, usize) -> Option<Classified>,
        mut handle: impl FnMut(&mut Self, usize, &Classified),
    ) {
        // Out of `self` for the walk (taking a boxed slice allocates
        // nothing), so that requests are handled where they lie, not copied
        // out first.
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut base = 0;
        while base < n {
            let m = (n - base).min(SCRATCH);
            for i in 0..m + AHEAD {
                if i < m {
                    let c = &mut scratch[i];
                    *c = classify(self, base + i);
                    if let Some((Ok(key), _)) = c {
                        self.pairs.prefetch(key.hash);
                    }
                }
                if let Some(j) = (i + PEEK).checked_sub(AHEAD).filter(|&j| j < m) {
                    if let Some((Ok(key), src)) = &scratch[j] {
                        self.prefetch_counts(key, src.ip());
                    }
                }
                if let Some(j) = i.checked_sub(AHEAD).filter(|&j| j < m) {
                    if let Some(c) = &scratch[j] {
                        handle(self, base + j, c);
                    }
                }
            }
            base += m;
        }
        self.scratch = scratch;
    }

    /// Fetches the source counts a request for `key` from `ip` will most
    /// likely touch: a waiting partner's, which its match uncounts, if
    /// `key`'s slot holds one; else, when no entry holds the key, the
    /// request's own, which its registration checks and adds to. Nothing
    /// when the slot holds the request's own side: a refresh or a replay
    /// from the same address touches no counts. The rarer cases that do
    /// count the request's own source (an expired entry registered afresh in
    /// its slot, a refresh or a remembered pair asked for from another
    /// address) go unfetched: a hint, never a condition. Looking first
    /// spares a match the hashing and the lines of counts it never uses.
    #[inline]
    fn prefetch_counts(&self, key: &PairKey, ip: IpAddr) {
        let Some(s) = self.books.sources.as_ref() else {
            return;
        };
        match self.pairs.find(key.hash, |e| e.is_key(key)) {
            Ok(i) => {
                let e = self.pairs.get(i);
                if let Some(addr) = e.waiter_other_than(key.side) {
                    s.prefetch_counted(addr.ip(), e.counted_at());
                }
            }
            Err(_) => s.prefetch(ip),
        }
    }

    /// The pair key of an admitted v2 request from `src`, or why it is dropped.
    #[inline]
    fn classify_v2(&self, req: &v2::Request, src: SocketAddr) -> Result<PairKey, DropReason> {
        let pair = req.pair();
        if pair.is_self_pair() {
            return Err(DropReason::SelfPair);
        }
        let served = match src {
            SocketAddr::V4(_) => self.ipv4,
            SocketAddr::V6(_) => self.ipv6,
        };
        if !served {
            return Err(DropReason::Family);
        }
        if source::is_bogus(src) {
            return Err(DropReason::BadSource);
        }
        Ok(self.v2_key(pair, src.is_ipv6()))
    }

    /// `key` with its table hash: every key the engine builds goes through
    /// here, so a key is never handled without it.
    #[inline]
    fn hashed(&self, mut key: PairKey) -> PairKey {
        key.hash = self.pairs.hash(key.hash_input());
        key
    }

    /// The pair key of a seed request: the two 4-byte IDs in byte order.
    #[inline]
    fn seed_key(&self, req: &Request, v6: bool) -> PairKey {
        let (s, p) = (req.self_id.0, req.peer_id.0);
        let (lo, hi, side) = if s < p {
            (s, p, Side::Lo)
        } else {
            (p, s, Side::Hi)
        };
        let mut tag = [0u8; 8];
        tag[..4].copy_from_slice(&lo);
        tag[4..].copy_from_slice(&hi);
        self.hashed(PairKey {
            tag: u64::from_ne_bytes(tag),
            check: 0,
            kind: if v6 { KIND_V6 } else { 0 },
            side,
            hash: 0,
        })
    }

    /// A v2 pair's key: 96 bits of a keyed hash of `(min, max)` of its IDs,
    /// the v2 kind bit (so it never meets a seed-format pair), the family,
    /// and the side the request comes from.
    #[inline]
    fn v2_key(&self, pair: v2::Pair, v6: bool) -> PairKey {
        let (lo, hi) = pair.unordered();
        let mut ids = [0u8; 16];
        ids[..8].copy_from_slice(&lo.to_be_bytes());
        ids[8..].copy_from_slice(&hi.to_be_bytes());
        let (tag, check) = self.v2_hasher.hash(&ids).as_u64();
        self.hashed(PairKey {
            tag,
            check: check as u32,
            kind: KIND_V2 | if v6 { KIND_V6 } else { 0 },
            side: if pair.self_id < pair.peer_id {
                Side::Lo
            } else {
                Side::Hi
            },
            hash: 0,
        })
    }

    /// Handles one protocol v2 request from `src` at `now` (milliseconds on
    /// the caller's monotonic clock), under the same rules as
    /// [`Engine::handle`]; its replies are v2 replies.
    ///
    /// The request must already be *admitted*: parsed, and its token
    /// verified for its pair by [`crate::auth::KeySet::verify`] (the
    /// server's admission gate does both). The engine matches whatever it is
    /// given; it knows no keys.
    pub fn handle_v2(
        &mut self,
        req: &v2::Request,
        src: SocketAddr,
        now: u64,
    ) -> Outcome<v2::Reply> {
        let key = self.classify_v2(req, src);
        self.handle_classified_v2(&key, req, src, 0, now as Millis)
    }

    /// [`Engine::handle_relayed`] for an admitted v2 request: forwarded by
    /// the cluster member that `via` (never 0) names, which its replies go
    /// back through.
    pub fn handle_relayed_v2(
        &mut self,
        req: &v2::Request,
        src: SocketAddr,
        via: u8,
        now: u64,
    ) -> Outcome<v2::Reply> {
        let key = self.classify_v2(req, src);
        self.handle_classified_v2(&key, req, src, via, now as Millis)
    }

    /// Handles a batch of `n` admitted v2 requests (`get(k)` gives the k-th,
    /// or `None` to skip it), calling `done(k, outcome)` for each handled, in
    /// order: the same outcomes as [`Engine::handle_v2`] on each in turn,
    /// with the cache misses of the batch overlapped as in
    /// [`Engine::handle_batch`].
    pub fn handle_batch_v2<'r>(
        &mut self,
        n: usize,
        get: impl Fn(usize) -> Option<(&'r v2::Request, SocketAddr)>,
        now: u64,
        mut done: impl FnMut(usize, &Outcome<v2::Reply>),
    ) {
        let now = now as Millis;
        self.pipeline(
            n,
            |e, k| get(k).map(|(req, src)| (e.classify_v2(req, src), src)),
            |e, k, (key, src)| {
                if let Some((req, _)) = get(k) {
                    let outcome = e.handle_classified_v2(key, req, *src, 0, now);
                    done(k, &outcome);
                }
            },
        );
    }

    /// Counts and handles a classified v2 request, and turns the seed-shaped
    /// outcome of the shared core into v2 replies.
    fn handle_classified_v2(
        &mut self,
        key: &Result<PairKey, DropReason>,
        req: &v2::Request,
        src: SocketAddr,
        via: u8,
        now: Millis,
    ) -> Outcome<v2::Reply> {
        let info = req.info.0 & INFO_BITS;
        let outcome = self.handle_classified(key, src, via, info, now);
        let pair = req.pair();
        // The partner's info is in the pair's slot, now matched.
        let partner_info = |engine: &Engine| key.as_ref().map_or(0, |k| engine.partner_info(k));
        match outcome {
            Outcome::Dropped(why) => Outcome::Dropped(why),
            Outcome::Registered { evicted } => Outcome::Registered { evicted },
            Outcome::Refreshed => Outcome::Refreshed,
            Outcome::Matched {
                waiting,
                completing,
            } => Outcome::Matched {
                waiting: v2_transmit(waiting, pair.counterpart(), info, req.candidates),
                completing: v2_transmit(
                    completing,
                    pair,
                    partner_info(self),
                    v2::Candidates::EMPTY,
                ),
            },
            Outcome::Replayed(t) => Outcome::Replayed(v2_transmit(
                t,
                pair,
                partner_info(self),
                v2::Candidates::EMPTY,
            )),
        }
    }

    /// The client-info bits the partner of `key.side` gave, read from the
    /// pair's slot after a match or for a replay (the slot is in cache).
    fn partner_info(&self, key: &PairKey) -> u8 {
        let h = key.hash;
        let Ok(i) = self.pairs.find(h, |e| e.is_key(key)) else {
            return 0;
        };
        match self.pairs.get(i).state(&self.books.v6) {
            State::Matched(m) => m.side(key.side.other()).2,
            State::Pending { .. } => 0,
        }
    }

    /// The core: one valid request for `key` from `src`.
    fn process(
        &mut self,
        key: &PairKey,
        src: SocketAddr,
        via: u8,
        info: u8,
        now: Millis,
    ) -> Outcome {
        let me = Addr::from_socket(src);
        let h = key.hash;
        let at;
        match self.pairs.find(h, |e| e.is_key(key)) {
            Err(slot) => at = At::Empty(slot),
            Ok(i) => {
                let e = *self.pairs.get(i);
                if is_expired(e.expires(), now) {
                    // Dead: forget it, and register afresh in its very slot
                    // (same key, same probe path: no entry moves).
                    self.books.forget(&e, Leave::Expired);
                    at = At::Dead(i);
                } else {
                    match e.state(&self.books.v6) {
                        State::Pending {
                            waiter,
                            addr,
                            via: wvia,
                            info: winfo,
                        } => {
                            if waiter == key.side {
                                return self.refresh(i, key, addr, me, via, info, now);
                            }
                            let waiter_expires = e.expires();
                            return self.complete(
                                i,
                                key,
                                (addr, wvia, winfo, waiter_expires, e.counted_at()),
                                (me, via, info),
                                now,
                            );
                        }
                        State::Matched(m) => {
                            let (addr, svia, _) = m.side(key.side);
                            if addr == me && svia == via {
                                self.books.counters.replayed += 1;
                                let other = match key.side {
                                    Side::Lo => Side::Hi,
                                    Side::Hi => Side::Lo,
                                };
                                let (peer, _, _) = m.side(other);
                                let (src_port, dst_port) = m.ports(key.side);
                                return Outcome::Replayed(Transmit {
                                    to: src,
                                    via,
                                    reply: Reply {
                                        src_port,
                                        dst_port,
                                        peer: peer.to_socket(),
                                    },
                                });
                            }
                            return self.restart(i, key, me, via, info, now);
                        }
                    }
                }
            }
        }
        self.register(key, me, via, info, now, (h, at))
    }

    /// The same request as a remembered match's from another address: the
    /// pair starts afresh from this address, if its source may. Rare, and
    /// kept out of [`Engine::process`]'s body.
    #[cold]
    #[inline(never)]
    fn restart(
        &mut self,
        i: usize,
        key: &PairKey,
        me: Addr,
        via: u8,
        info: u8,
        now: Millis,
    ) -> Outcome {
        if let Err(level) = self.source_check(me.ip()) {
            return self.refuse(level);
        }
        if let Some(v6) = self.pairs.get(i).v6_index() {
            self.books.v6.free(v6);
        }
        self.books.remembered -= 1;
        self.books.pending += 1;
        let counted = self.count_source(me.ip());
        let expires = now.wrapping_add(self.ttl);
        self.pairs
            .get_mut(i)
            .set_pending(key.side, me, via, info, expires, counted);
        self.books.counters.registered += 1;
        Outcome::Registered { evicted: None }
    }

    #[cold]
    fn refuse(&mut self, level: Level) -> Outcome {
        match level {
            Level::V4Host | Level::V6Net64 => self.books.counters.per_ip_limit += 1,
            _ => self.books.counters.per_prefix_limit += 1,
        }
        Outcome::Dropped(DropReason::SourceLimit(level))
    }

    /// Counts a registration from `ip` (if per-source limits are on), and
    /// says where its counters are, for its slot.
    fn count_source(&mut self, ip: IpAddr) -> Packed {
        let Some(s) = self.books.sources.as_mut() else {
            return Packed::default();
        };
        let at = s.locate(ip);
        s.add_located(&at);
        at.packed().unwrap_or_default()
    }

    fn source_check(&self, ip: IpAddr) -> Result<(), Level> {
        match self.books.sources.as_ref() {
            Some(s) => s.check(ip),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        i: usize,
        key: &PairKey,
        old: Addr,
        me: Addr,
        via: u8,
        info: u8,
        now: Millis,
    ) -> Outcome {
        // A refresh is never refused; a move to another source is counted
        // there even if that source is at its limit.
        let mut counted = self.pairs.get(i).counted_at();
        if old.ip() != me.ip() {
            if let Some(s) = self.books.sources.as_mut() {
                s.remove_counted(old.ip(), counted);
            }
            counted = Some(self.count_source(me.ip()));
        }
        let expires = now.wrapping_add(self.ttl);
        self.pairs.get_mut(i).set_pending(
            key.side,
            me,
            via,
            info,
            expires,
            counted.unwrap_or_default(),
        );
        self.books.counters.refreshed += 1;
        Outcome::Refreshed
    }

    fn complete(
        &mut self,
        i: usize,
        key: &PairKey,
        waiter: (Addr, u8, u8, Millis, Option<Packed>),
        me: (Addr, u8, u8),
        now: Millis,
    ) -> Outcome {
        let (waddr, wvia, winfo, wexpires, wcounted) = waiter;
        let (maddr, mvia, minfo) = me;
        let (p1, p2) = self.pick_ports();
        self.wait
            .record(now.wrapping_sub(wexpires.wrapping_sub(self.ttl)));
        if let Some(s) = self.books.sources.as_mut() {
            s.remove_counted(waddr.ip(), wcounted);
        }
        // The waiter gets (P1, P2), the completer (P2, P1).
        let (lo, hi) = match key.side {
            Side::Lo => (
                (maddr, mvia, minfo, (p2, p1)),
                (waddr, wvia, winfo, (p1, p2)),
            ),
            Side::Hi => (
                (waddr, wvia, winfo, (p1, p2)),
                (maddr, mvia, minfo, (p2, p1)),
            ),
        };
        let m = Match {
            lo: lo.0,
            hi: hi.0,
            lo_via: lo.1,
            hi_via: hi.1,
            lo_info: lo.2,
            hi_info: hi.2,
            lo_ports: lo.3,
        };
        let index = if key.kind & KIND_V6 != 0 {
            // Never fails: the store has a record for every slot.
            self.books.v6.alloc().unwrap_or(0)
        } else {
            0
        };
        let expires = now.wrapping_add(self.replay_ttl);
        let books = &mut self.books;
        self.pairs
            .get_mut(i)
            .set_matched(&m, expires, &mut books.v6, index);
        books.pending -= 1;
        books.remembered += 1;
        books.counters.matched += 1;
        let waiting = Transmit {
            to: waddr.to_socket(),
            via: wvia,
            reply: Reply {
                src_port: p1,
                dst_port: p2,
                peer: maddr.to_socket(),
            },
        };
        let completing = Transmit {
            to: maddr.to_socket(),
            via: mvia,
            reply: Reply {
                src_port: p2,
                dst_port: p1,
                peer: waddr.to_socket(),
            },
        };
        Outcome::Matched {
            waiting,
            completing,
        }
    }

    /// A new registration: within the source's limits, and with room made
    /// if the table is full.
    /// `at` is the key's hash and where the lookup that found no live entry
    /// ended, if the table has not changed since.
    fn register(
        &mut self,
        key: &PairKey,
        me: Addr,
        via: u8,
        info: u8,
        now: Millis,
        at: (u64, At),
    ) -> Outcome {
        let (h, at) = at;
        let located = self.books.sources.as_ref().map(|s| s.locate(me.ip()));
        if let Some(Err(level)) = self
            .books
            .sources
            .as_ref()
            .zip(located.as_ref())
            .map(|(s, l)| s.check_located(l))
        {
            if let At::Dead(i) = at {
                // Already forgotten: it must not stay for the sweep to
                // forget again.
                self.pairs.remove_at(i);
            }
            return self.refuse(level);
        }
        let expires = now.wrapping_add(self.ttl);
        let counted = located.and_then(|l| l.packed()).unwrap_or_default();
        let entry = PairEntry::pending(key, me, via, info, expires, counted);
        let mut evicted = None;
        match at {
            At::Dead(i) => *self.pairs.get_mut(i) = entry,
            At::Empty(slot) if !self.crowded() => self.pairs.insert_at(slot, h, entry),
            At::Empty(_) => {
                match self.make_room(me.ip(), now) {
                    Ok(e) => evicted = e,
                    Err(()) => {
                        self.books.counters.table_full += 1;
                        return Outcome::Dropped(DropReason::TableFull);
                    }
                }
                let slot = match self.pairs.find(h, |e| e.is_key(key)) {
                    Err(slot) => slot,
                    Ok(_) => unreachable!("a registered key was absent a moment ago"),
                };
                self.pairs.insert_at(slot, h, entry);
            }
        }
        if let (Some(s), Some(l)) = (self.books.sources.as_mut(), located) {
            s.add_located(&l);
        }
        self.books.pending += 1;
        self.books.counters.registered += 1;
        Outcome::Registered { evicted }
    }

    /// True when a new registration must first make room: the table holds
    /// `capacity` pairs, or it holds three quarters of that ([`CROWDED_DEN`])
    /// and some of them are remembered matches, whose replays are then cut
    /// short (oldest sampled first, counted in `replay_full`) rather than let
    /// the table fill. Waiting registrations still fill it to the capacity.
    ///
    /// Why: remembered matches, 5 s each, are what fills the table at a high
    /// match rate, and the slots just ahead of the expiry sweep hold them
    /// densest. With no such bound, at 120-140k pairs/s and the default
    /// capacity they packed the table just under its capacity into runs of
    /// hundreds of thousands of slots that every removal walked, and the
    /// server fell to 1-2k pairs/s for good; bounded at seven eighths it
    /// still fell after a minute; at three quarters it held sixteen 5-s
    /// rounds in a row at 123k-168k pairs/s (replays cut short only above
    /// about 157k pairs/s, where 5 s of matches exceed three quarters of the
    /// default capacity).
    #[inline]
    fn crowded(&self) -> bool {
        let len = self.pairs.len();
        len >= self.capacity
            || (len >= self.capacity - self.capacity / CROWDED_DEN && self.books.remembered > 0)
    }

    /// Frees a slot for a registration from `ip`: reclaims expired slots
    /// first, then takes a remembered match's slot, then a waiting
    /// registration's whose source is heavier than the newcomer's (see
    /// [`Weight::heavier_than`]), which only a full table does (a crowded one
    /// that samples no remembered match has room). `Ok(None)`: room made
    /// without taking a live pair's slot; `Err`: nothing may be taken. Takes
    /// at most one live slot.
    fn make_room(&mut self, ip: IpAddr, now: Millis) -> Result<Option<Evicted>, ()> {
        let books = &mut self.books;
        let reclaimed = self.pairs.sweep(FULL_SWEEP, FULL_SWEEP, |e| {
            let dead = is_expired(e.expires(), now);
            if dead {
                books.forget(e, Leave::Expired);
            }
            dead
        });
        if reclaimed.removed > 0 {
            return Ok(None);
        }
        // Only a full table takes a waiting registration's slot; a crowded
        // one takes only a remembered match's, and need not weigh sources.
        let full = self.pairs.len() >= self.capacity;
        // Sample slots; keep the oldest remembered match and (when full) the
        // heaviest, then oldest, waiting registration among them. Fetch them
        // all first, so that their cache misses overlap.
        let mut oldest_match: Option<(usize, Millis)> = None;
        let mut heaviest: Option<(usize, Weight, Millis)> = None;
        let slots = self.pairs.slots() as u64;
        let mut samples = [0usize; EVICTION_SAMPLES];
        for s in samples.iter_mut() {
            *s = ((u64::from(self.rng.next_u32()) * slots) >> 32) as usize;
            self.pairs.prefetch_slot(*s);
        }
        for start in samples {
            let Some(i) = self.pairs.next_full(start) else {
                break;
            };
            let e = *self.pairs.get(i);
            if is_expired(e.expires(), now) {
                self.pairs.remove_at(i);
                self.books.forget(&e, Leave::Expired);
                return Ok(None);
            }
            if e.is_matched() {
                let older_than_kept = match oldest_match {
                    None => true,
                    Some((_, t)) => older(e.expires(), t),
                };
                if older_than_kept {
                    oldest_match = Some((i, e.expires()));
                }
                continue;
            }
            if !full {
                continue;
            }
            let (Some(s), State::Pending { addr, .. }) =
                (self.books.sources.as_ref(), e.state(&self.books.v6))
            else {
                continue;
            };
            let w = s.weight(addr.ip());
            let better = match heaviest {
                None => true,
                Some((_, hw, ht)) => {
                    w.rank() > hw.rank() || (w.rank() == hw.rank() && older(e.expires(), ht))
                }
            };
            if better {
                heaviest = Some((i, w, e.expires()));
            }
        }
        if let Some((i, _)) = oldest_match {
            return Ok(Some(self.evict_match(i)));
        }
        if !full {
            // Crowded, and no remembered match sampled: there is room.
            return Ok(None);
        }
        let (i, w, _) = heaviest.ok_or(())?;
        let newcomer = self.books.sources.as_ref().ok_or(())?.weight(ip);
        if !w.heavier_than(&newcomer) {
            return Err(());
        }
        let e = self.pairs.remove_at(i);
        let State::Pending { waiter, addr, .. } = e.state(&self.books.v6) else {
            unreachable!("sampled as pending")
        };
        self.books.forget(&e, Leave::Evicted);
        Ok(Some(Evicted::Pending {
            from: addr.to_socket(),
            request: seed_request(&e, waiter),
        }))
    }

    /// Takes the slot of the remembered match at `i`: its replay ends now.
    fn evict_match(&mut self, i: usize) -> Evicted {
        let e = self.pairs.remove_at(i);
        self.books.forget(&e, Leave::Evicted);
        Evicted::Replay {
            request: seed_request(&e, Side::Lo),
            ipv6: e.is_v6(),
        }
    }

    fn pick_ports(&mut self) -> (u16, u16) {
        // Two 32-bit draws from one 64-bit one (every bit of xoshiro256++'s
        // output is good), each reduced by multiply-shift: the bias is below
        // span / 2^32, under 0.002% here. The second port is the first plus
        // 1 to span - 1, wrapped by one subtraction (the sum stays below
        // twice the span), never a division.
        let span = self.port_span;
        let draw = self.rng.next_u64();
        let below = |x: u64, n: u32| (((x & 0xffff_ffff) * u64::from(n)) >> 32) as u32;
        let a = below(draw, span);
        let mut b = a + 1 + below(draw >> 32, span - 1);
        if b >= span {
            b -= span;
        }
        (self.port_lo + a as u16, self.port_lo + b as u16)
    }

    /// One turn of incremental expiry: examines as many slots as the time
    /// and the registrations since the last call earn (see `Pace`), at most
    /// [`MAX_SWEEP_PER_CALL`].
    /// Returns true when work is still owed, so the caller should call again
    /// soon rather than sleep.
    pub fn expire(&mut self, now: u64) -> bool {
        let now = now as Millis;
        let elapsed = match self.pace.last {
            Some(last) => u64::from(now.wrapping_sub(last).min(1 << 31)),
            None => 0,
        };
        self.pace.last = Some(now);
        let registered = self.books.counters.registered;
        let new = registered.wrapping_sub(self.pace.registered);
        self.pace.registered = registered;
        if self.pairs.is_empty() {
            self.pace.debt_x1024 = 0;
            return false;
        }
        let rate = if self.pairs.len() > self.capacity / 4 * 3 {
            self.pace.fast_x1024
        } else {
            self.pace.slow_x1024
        };
        let owed = self
            .pace
            .debt_x1024
            .saturating_add(elapsed.saturating_mul(rate))
            .saturating_add(new.saturating_mul(self.pace.per_registration_x1024));
        // Never owe more than one full pass: catching up further is pointless.
        let owed = owed.min(self.pairs.slots() as u64 * 1024);
        let slots = ((owed / 1024) as usize).min(MAX_SWEEP_PER_CALL);
        let books = &mut self.books;
        let swept = self.pairs.sweep(slots, MAX_REMOVALS_PER_CALL, |e| {
            let dead = is_expired(e.expires(), now);
            if dead {
                books.forget(e, Leave::Expired);
            }
            dead
        });
        // Slots not passed (out of removals) stay owed.
        self.pace.debt_x1024 = owed - swept.passed as u64 * 1024;
        !self.pairs.is_empty() && self.pace.debt_x1024 >= 1024
    }
}

/// The client-info bits a slot keeps per side, and so the bits a v2 reply
/// relays: 0-1 the NAT mapping, 2 port-mapped, 3 reserved (relayed
/// unread); bits 4-7 are not kept and reach the partner as zero.
const INFO_BITS: u8 = 0x0f;

/// Domain separation for the v2 key hash's keys, drawn from the table seed.
const V2_KEY_DOMAIN: u64 = 0x7073_796e_6332_6b79; // "psync2ky"

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A v2 reply from the seed-shaped one the core made: the asker's `pair`,
/// its own address (where the reply goes), the partner's info bits and the
/// candidates it gets.
fn v2_transmit(
    t: Transmit,
    pair: v2::Pair,
    peer_info: u8,
    candidates: v2::Candidates,
) -> Transmit<v2::Reply> {
    Transmit {
        to: t.to,
        via: t.via,
        reply: v2::Reply {
            pair,
            src_port: t.reply.src_port,
            dst_port: t.reply.dst_port,
            peer: t.reply.peer,
            your_addr: t.to,
            peer_info: v2::ClientInfo(peer_info & INFO_BITS),
            peer_candidates: candidates,
        },
    }
}

/// True when an entry that expires at `expires` is dead at `now`. Times are
/// `u32` milliseconds compared with wrapping arithmetic; lifetimes stay far
/// below 2^31 ms (24 days) and the sweep visits every entry long before.
#[inline]
fn is_expired(expires: Millis, now: Millis) -> bool {
    (now.wrapping_sub(expires) as i32) >= 0
}

/// Where a lookup for a key that has no live entry ended.
#[derive(Clone, Copy)]
enum At {
    /// On this empty slot, where the key goes if there is room.
    Empty(usize),
    /// On this slot, holding the key's expired (and forgotten) entry, which
    /// a new registration replaces in place.
    Dead(usize),
}

/// True when `a` is earlier than `b` on the wrapping clock.
fn older(a: Millis, b: Millis) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The request `side` of a seed-format pair sends.
fn seed_request(e: &PairEntry, side: Side) -> Option<Request> {
    if e.kind() & pair::KIND_V2 != 0 {
        return None;
    }
    let tag = e.tag().to_ne_bytes();
    let lo = PeerId([tag[0], tag[1], tag[2], tag[3]]);
    let hi = PeerId([tag[4], tag[5], tag[6], tag[7]]);
    Some(match side {
        Side::Lo => Request {
            self_id: lo,
            peer_id: hi,
        },
        Side::Hi => Request {
            self_id: hi,
            peer_id: lo,
        },
    })
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_v2;
