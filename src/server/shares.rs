//! Per-source limits across workers: each worker enforces a *share* of every
//! limit, and a coordinator moves shares to where a source's traffic lands.
//!
//! `--rate-limit`/`--burst` and `--max-pending-per-*` must hold for a source
//! as a whole, yet each worker only sees the datagrams the kernel steers to
//! it (by pair, not by source), and nothing on the packet path may be shared
//! between workers. So:
//!
//! 1. **Default shares.** Each of `N` workers allows every source
//!    `ceil(limit / N)` of each limit (rate, burst, pending per prefix). A
//!    source that sprays pairs over all workers gets at most the limit
//!    (within `N - 1` of rounding), with no communication at all. That is
//!    the common case: random pair IDs spread evenly.
//! 2. **Asking for more.** A worker that refuses a source only because of
//!    its share (its share is below the whole limit, and for pending counts
//!    the source holds less than the whole limit here) sends a *want* note
//!    for that prefix to the coordinator, after the batch, through a bounded
//!    channel with `try_send` (a full channel drops the note), and at most
//!    once per prefix per [`NOTE_INTERVAL_MS`]. The refused datagram is
//!    dropped; the client's retransmit (250 ms to 2 s later) meets the new
//!    share.
//! 3. **A round.** The coordinator (this module, run by the server's control
//!    thread) asks every worker to measure the prefix: for a pending limit,
//!    the registrations it holds, and the worker *freezes* its share at that
//!    number on the spot, so nothing grows while the round is out; for a
//!    rate, the datagrams the source sent it since the last measure. When
//!    all have answered it sets new shares whose sum is the whole limit:
//!    - pending: every worker keeps what it holds, and the rest of the limit
//!      goes to the worker that asked;
//!    - rate: the rate and the burst are split in proportion to what each
//!      worker saw (so a source whose pairs all land on one worker gets the
//!      whole limit there, and one that sprays gets an even split).
//! 4. **Back to default.** Every [`REFRESH_MS`] a prefix with shares of its
//!    own is measured again: if every worker is within its default share the
//!    overrides are removed, otherwise the shares are recomputed (pending:
//!    the rest split evenly). A round whose answers do not all arrive within
//!    [`ROUND_TIMEOUT_MS`] ends the same way, back to the defaults.
//!
//! At most [`MAX_LEDGER`] prefixes have shares of their own at once (each
//! worker's tables are bounded alike); beyond that, a source keeps its
//! default share, which is what random pair IDs need anyway.
//!
//! Why not something simpler: a lock or atomic counter per source is shared
//! mutable state on the packet path; steering by source instead of by pair
//! would separate the halves of a pair; fixed shares alone starve a source
//! whose pairs all land on one worker; and gossiping every source's counts
//! costs work for every source, where this costs work only for the few
//! sources that meet their share.
//!
//! This module is the coordinator's state machine: pure, with the time
//! passed in (milliseconds); the server carries its orders to the workers.

use std::collections::HashMap;

use super::ratelimit::{Demand, Rate};
use crate::engine::source::{Prefix, SourceLimits, MAX_OVERRIDES};

/// Most prefixes with shares of their own at once.
pub const MAX_LEDGER: usize = MAX_OVERRIDES;
/// A worker sends a want note for one prefix at most this often.
pub const NOTE_INTERVAL_MS: u64 = 100;
/// How often a prefix with shares of its own is measured again: long enough
/// that a client retransmitting every 2 s finds its grant, short enough that
/// shares go back to the defaults soon after a source calms down.
pub const REFRESH_MS: u64 = 5_000;
/// A round with answers missing after this long ends in the defaults.
pub const ROUND_TIMEOUT_MS: u64 = 1_000;
/// Demand is measured over at least this window, so that a worker that
/// just met a source does not report a huge rate from a few datagrams.
const MIN_WINDOW_MS: u64 = 250;

/// A limit of one source prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limited {
    /// The datagram rate of an IPv4 address or IPv6 /64.
    Rate(Prefix),
    /// The pending registrations of a prefix at its level.
    Pending(Prefix),
}

/// One worker's share of a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// A rate and a burst.
    Rate(Rate),
    /// Most registrations held pending.
    Pending(u32),
}

/// What a worker measured of a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// Registrations held (its share is now frozen at this).
    Held(u32),
    /// Datagrams seen, over how long.
    Demand(Demand),
}

/// What the coordinator tells a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Measure `what` and answer with the round's number (pending: freeze
    /// the share at what is held).
    Measure {
        /// The round.
        round: u64,
        /// The prefix and limit.
        what: Limited,
    },
    /// Use this share of `what` (`None`: the default).
    Set {
        /// The prefix and limit.
        what: Limited,
        /// The share, or back to the default.
        share: Option<Share>,
    },
}

struct Round {
    id: u64,
    /// The worker that asked, if it is not a refresh.
    requester: Option<usize>,
    answers: Vec<Option<Measure>>,
    deadline: u64,
}

struct Entry {
    round: Option<Round>,
    /// When to measure again (no round out).
    refresh_at: u64,
}

/// The coordinator: which prefixes have shares of their own, and the rounds
/// in progress. See the module docs.
pub struct Coordinator {
    workers: usize,
    rate: Option<Rate>,
    pending: SourceLimits,
    ledger: HashMap<Limited, Entry>,
    next_round: u64,
}

impl Coordinator {
    /// A coordinator for `workers` workers sharing the whole limits `rate`
    /// (`None`: no rate limit) and `pending`.
    pub fn new(workers: usize, rate: Option<Rate>, pending: SourceLimits) -> Coordinator {
        Coordinator {
            workers: workers.max(1),
            rate,
            pending,
            ledger: HashMap::new(),
            next_round: 1,
        }
    }

    /// Prefixes with shares of their own now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ledger.len()
    }

    /// True when no prefix has shares of its own.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ledger.is_empty()
    }

    /// The earliest time [`Coordinator::tick`] has work.
    pub fn next_deadline(&self) -> Option<u64> {
        self.ledger
            .values()
            .map(|e| e.round.as_ref().map_or(e.refresh_at, |r| r.deadline))
            .min()
    }

    /// Worker `worker` refused `what` because of its share: start a round
    /// that gives it more, unless one is out for that prefix already (or the
    /// ledger is full). Orders go to `out` as `(worker, order)`.
    pub fn want(&mut self, worker: usize, what: Limited, now: u64, out: &mut Vec<(usize, Order)>) {
        let unlimited = match what {
            Limited::Pending(p) => self.pending.at(p.level) == 0,
            Limited::Rate(_) => self.rate.is_none(),
        };
        if worker >= self.workers || unlimited {
            return;
        }
        if !self.ledger.contains_key(&what) && self.ledger.len() >= MAX_LEDGER {
            return;
        }
        let entry = self.ledger.entry(what).or_insert(Entry {
            round: None,
            refresh_at: now + REFRESH_MS,
        });
        if entry.round.is_some() {
            return;
        }
        let id = self.next_round;
        self.next_round += 1;
        entry.round = Some(Round {
            id,
            requester: Some(worker),
            answers: vec![None; self.workers],
            deadline: now + ROUND_TIMEOUT_MS,
        });
        for w in 0..self.workers {
            out.push((w, Order::Measure { round: id, what }));
        }
    }

    /// Worker `worker` answered round `round` about `what`.
    pub fn measured(
        &mut self,
        worker: usize,
        round: u64,
        what: Limited,
        value: Measure,
        now: u64,
        out: &mut Vec<(usize, Order)>,
    ) {
        let Some(entry) = self.ledger.get_mut(&what) else {
            return;
        };
        let Some(r) = entry.round.as_mut().filter(|r| r.id == round) else {
            return;
        };
        if let Some(slot) = r.answers.get_mut(worker) {
            *slot = Some(value);
        }
        if r.answers.iter().any(Option::is_none) {
            return;
        }
        let answers: Vec<Measure> = r.answers.iter().flatten().copied().collect();
        let requester = r.requester;
        entry.round = None;
        entry.refresh_at = now + REFRESH_MS;
        match self.shares(what, &answers, requester) {
            Some(shares) => {
                for (w, share) in shares.into_iter().enumerate() {
                    out.push((
                        w,
                        Order::Set {
                            what,
                            share: Some(share),
                        },
                    ));
                }
            }
            None => self.release(what, out),
        }
    }

    /// Starts the refresh rounds that are due and ends the rounds that
    /// timed out.
    pub fn tick(&mut self, now: u64, out: &mut Vec<(usize, Order)>) {
        let mut expired = Vec::new();
        for (what, e) in self.ledger.iter_mut() {
            match &e.round {
                Some(r) if now >= r.deadline => expired.push(*what),
                Some(_) => {}
                None if now >= e.refresh_at => {
                    let id = self.next_round;
                    self.next_round += 1;
                    e.round = Some(Round {
                        id,
                        requester: None,
                        answers: vec![None; self.workers],
                        deadline: now + ROUND_TIMEOUT_MS,
                    });
                    for w in 0..self.workers {
                        out.push((
                            w,
                            Order::Measure {
                                round: id,
                                what: *what,
                            },
                        ));
                    }
                }
                None => {}
            }
        }
        for what in expired {
            self.release(what, out);
        }
    }

    /// Back to the default shares everywhere.
    fn release(&mut self, what: Limited, out: &mut Vec<(usize, Order)>) {
        self.ledger.remove(&what);
        for w in 0..self.workers {
            out.push((w, Order::Set { what, share: None }));
        }
    }

    /// New shares from the answers, or `None` for the defaults.
    fn shares(
        &self,
        what: Limited,
        answers: &[Measure],
        requester: Option<usize>,
    ) -> Option<Vec<Share>> {
        let n = self.workers as u64;
        match what {
            Limited::Pending(p) => {
                let whole = u64::from(self.pending.at(p.level));
                if whole == 0 {
                    return None;
                }
                let held: Vec<u64> = answers
                    .iter()
                    .map(|m| match m {
                        Measure::Held(h) => u64::from(*h),
                        Measure::Demand(_) => whole,
                    })
                    .collect();
                let default = whole.div_ceil(n);
                let slack = whole.saturating_sub(held.iter().sum());
                let shares = match requester {
                    Some(k) => held
                        .iter()
                        .enumerate()
                        .map(|(w, &h)| if w == k { h + slack } else { h })
                        .collect::<Vec<_>>(),
                    None if held.iter().all(|&h| h <= default) => return None,
                    None => held
                        .iter()
                        .enumerate()
                        .map(|(w, &h)| h + slack / n + u64::from((w as u64) < slack % n))
                        .collect(),
                };
                Some(
                    shares
                        .into_iter()
                        .map(|s| Share::Pending(s.min(u64::from(u32::MAX)) as u32))
                        .collect(),
                )
            }
            Limited::Rate(_) => {
                let whole = self.rate?;
                // Datagrams per second each worker saw.
                let mut demand: Vec<u64> = answers
                    .iter()
                    .map(|m| match m {
                        Measure::Demand(d) if d.over_ms > 0 => {
                            u64::from(d.seen) * 1000 / u64::from(d.over_ms).max(MIN_WINDOW_MS)
                        }
                        _ => 0,
                    })
                    .collect();
                if let Some(k) = requester {
                    // It asked: it needs more than its default share.
                    let floor = u64::from(whole.per_second.div_ceil(self.workers as u32)) + 1;
                    demand[k] = demand[k].max(floor);
                } else {
                    let default = u64::from(whole.per_second.div_ceil(self.workers as u32));
                    if demand.iter().all(|&d| d <= default) {
                        return None;
                    }
                }
                let total: u64 = demand.iter().sum();
                if total == 0 {
                    return None;
                }
                let part = |limit: u32, d: u64| -> u32 {
                    let s = (u64::from(limit) * d / total) as u32;
                    if d > 0 {
                        s.max(1)
                    } else {
                        s
                    }
                };
                Some(
                    demand
                        .iter()
                        .map(|&d| {
                            Share::Rate(Rate {
                                per_second: part(whole.per_second, d),
                                burst: part(whole.burst, d),
                            })
                        })
                        .collect(),
                )
            }
        }
    }
}

/// A worker's memory of the want notes it sent lately, so that a source
/// refused a thousand times sends one note per [`NOTE_INTERVAL_MS`]: a
/// small direct-mapped table (a collision only lets a note through early).
pub struct NoteFilter {
    slots: [(u64, u64); 64],
}

impl Default for NoteFilter {
    fn default() -> Self {
        NoteFilter {
            slots: [(0, 0); 64],
        }
    }
}

impl NoteFilter {
    /// True when a note for `what` may go at `now` (and remembers it).
    pub fn admit(&mut self, what: Limited, now: u64) -> bool {
        let (kind, p) = match what {
            Limited::Rate(p) => (1u64, p),
            Limited::Pending(p) => (2u64, p),
        };
        let key = (p.bits ^ (u64::from(p.level as u8) << 56) ^ (kind << 62))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            | 1;
        let slot = &mut self.slots[(key >> 58) as usize];
        if slot.0 == key && now < slot.1 + NOTE_INTERVAL_MS {
            return false;
        }
        *slot = (key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::source::{prefixes, Level};

    fn host(s: &str) -> Prefix {
        prefixes(s.parse().unwrap()).0[0]
    }

    /// Runs the orders against simulated workers: `held[w]` registrations
    /// per worker, `shares[w]` the share each enforces (`None`: default).
    struct Sim {
        held: Vec<u32>,
        shares: Vec<Option<Share>>,
        demand: Vec<Demand>,
    }

    impl Sim {
        fn new(n: usize) -> Sim {
            Sim {
                held: vec![0; n],
                shares: vec![None; n],
                demand: vec![Demand::default(); n],
            }
        }

        /// Delivers orders; answers measures at once.
        fn run(&mut self, c: &mut Coordinator, mut out: Vec<(usize, Order)>, now: u64) {
            while !out.is_empty() {
                let mut next = Vec::new();
                for (w, order) in out {
                    match order {
                        Order::Measure { round, what } => {
                            let m = match what {
                                Limited::Pending(_) => {
                                    self.shares[w] = Some(Share::Pending(self.held[w]));
                                    Measure::Held(self.held[w])
                                }
                                Limited::Rate(_) => Measure::Demand(self.demand[w]),
                            };
                            c.measured(w, round, what, m, now, &mut next);
                        }
                        Order::Set { share, .. } => self.shares[w] = share,
                    }
                }
                out = next;
            }
        }

        fn pending_sum(&self, default: u32) -> u32 {
            self.shares
                .iter()
                .map(|s| match s {
                    Some(Share::Pending(x)) => *x,
                    _ => default,
                })
                .sum()
        }
    }

    fn limits(per_ip: u32) -> SourceLimits {
        SourceLimits {
            per_ip,
            ..SourceLimits::OFF
        }
    }

    #[test]
    fn a_source_on_one_worker_gets_the_whole_pending_limit() {
        let mut c = Coordinator::new(4, None, limits(16));
        let mut sim = Sim::new(4);
        let p = Limited::Pending(host("192.0.2.1"));
        sim.held[0] = 4; // its default share, full
        let mut out = Vec::new();
        c.want(0, p, 0, &mut out);
        sim.run(&mut c, out, 0);
        assert_eq!(sim.shares[0], Some(Share::Pending(16)));
        for w in 1..4 {
            assert_eq!(sim.shares[w], Some(Share::Pending(0)));
        }
        assert_eq!(sim.pending_sum(4), 16);
        // Later it holds 16 there: a refresh keeps the shares; once it
        // holds its default share or less, the defaults come back.
        sim.held[0] = 16;
        let mut out = Vec::new();
        c.tick(REFRESH_MS, &mut out);
        sim.run(&mut c, out, REFRESH_MS);
        assert_eq!(sim.shares[0], Some(Share::Pending(16)));
        sim.held[0] = 3;
        let mut out = Vec::new();
        c.tick(2 * REFRESH_MS, &mut out);
        sim.run(&mut c, out, 2 * REFRESH_MS);
        assert!(sim.shares.iter().all(Option::is_none), "{:?}", sim.shares);
        assert!(c.is_empty());
    }

    #[test]
    fn shares_never_sum_past_the_limit() {
        // A source spread over the workers asks from each in turn: whoever
        // asks gets the rest, and the sum is the limit every time.
        let mut c = Coordinator::new(4, None, limits(10));
        let mut sim = Sim::new(4);
        sim.held = vec![3, 2, 3, 1];
        let p = Limited::Pending(host("192.0.2.1"));
        for (t, w) in [0usize, 1, 2, 3, 0, 2].into_iter().enumerate() {
            let mut out = Vec::new();
            c.want(w, p, t as u64, &mut out);
            sim.run(&mut c, out, t as u64);
            assert_eq!(sim.pending_sum(3), 10);
            assert_eq!(sim.shares[w], Some(Share::Pending(sim.held[w] + 1)));
        }
        // A refresh while above the defaults splits the rest evenly.
        sim.held = vec![5, 0, 0, 1];
        let mut out = Vec::new();
        c.tick(REFRESH_MS + 10, &mut out);
        sim.run(&mut c, out, REFRESH_MS + 10);
        assert_eq!(
            sim.shares,
            vec![
                Some(Share::Pending(6)),
                Some(Share::Pending(1)),
                Some(Share::Pending(1)),
                Some(Share::Pending(2)),
            ]
        );
    }

    #[test]
    fn one_round_at_a_time_and_a_lost_answer_ends_in_defaults() {
        let mut c = Coordinator::new(3, None, limits(9));
        let p = Limited::Pending(host("192.0.2.1"));
        let mut out = Vec::new();
        c.want(1, p, 0, &mut out);
        assert_eq!(out.len(), 3);
        let mut again = Vec::new();
        c.want(2, p, 1, &mut again);
        assert!(again.is_empty(), "a round is out already");
        // Two answer, one never does.
        let round = match out[0].1 {
            Order::Measure { round, .. } => round,
            _ => unreachable!(),
        };
        let mut set = Vec::new();
        c.measured(0, round, p, Measure::Held(1), 2, &mut set);
        c.measured(1, round, p, Measure::Held(3), 2, &mut set);
        // A stale round's answer is ignored.
        c.measured(2, round + 7, p, Measure::Held(0), 2, &mut set);
        assert!(set.is_empty());
        assert_eq!(c.next_deadline(), Some(ROUND_TIMEOUT_MS));
        c.tick(ROUND_TIMEOUT_MS, &mut set);
        assert_eq!(set.len(), 3);
        assert!(set
            .iter()
            .all(|(_, o)| matches!(o, Order::Set { share: None, .. })));
        assert!(c.is_empty());
    }

    #[test]
    fn rate_shares_follow_the_traffic() {
        let whole = Rate {
            per_second: 100,
            burst: 200,
        };
        let mut c = Coordinator::new(4, Some(whole), SourceLimits::OFF);
        let mut sim = Sim::new(4);
        let p = Limited::Rate(host("192.0.2.1"));
        // All of it at worker 2.
        sim.demand[2] = Demand {
            seen: 80,
            over_ms: 1000,
        };
        let mut out = Vec::new();
        c.want(2, p, 0, &mut out);
        sim.run(&mut c, out, 0);
        assert_eq!(sim.shares[2], Some(Share::Rate(whole)));
        assert_eq!(
            sim.shares[0],
            Some(Share::Rate(Rate {
                per_second: 0,
                burst: 0
            }))
        );
        // Then it sprays: an even split.
        sim.demand = vec![
            Demand {
                seen: 50,
                over_ms: 1000
            };
            4
        ];
        let mut out = Vec::new();
        c.want(0, p, 10, &mut out);
        sim.run(&mut c, out, 10);
        let quarter = Some(Share::Rate(Rate {
            per_second: 25,
            burst: 50,
        }));
        assert!(sim.shares.iter().all(|s| *s == quarter), "{:?}", sim.shares);
        // Quiet: back to the defaults at the next refresh.
        sim.demand = vec![Demand::default(); 4];
        let mut out = Vec::new();
        c.tick(10 + REFRESH_MS, &mut out);
        sim.run(&mut c, out, 10 + REFRESH_MS);
        assert!(sim.shares.iter().all(Option::is_none));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let mut c = Coordinator::new(2, None, limits(4));
        let mut out = Vec::new();
        for i in 0..MAX_LEDGER as u64 + 10 {
            let p = Prefix {
                bits: i,
                level: Level::V4Host,
            };
            c.want(0, Limited::Pending(p), 0, &mut out);
        }
        assert_eq!(c.len(), MAX_LEDGER);
        // No limit at a level: nothing to share.
        let net = Prefix {
            bits: 1,
            level: Level::V4Net24,
        };
        let mut none = Vec::new();
        Coordinator::new(2, None, limits(4)).want(0, Limited::Pending(net), 0, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn notes_are_rate_limited_per_prefix() {
        let mut f = NoteFilter::default();
        let a = Limited::Pending(host("192.0.2.1"));
        let b = Limited::Rate(host("192.0.2.1"));
        assert!(f.admit(a, 1000));
        assert!(!f.admit(a, 1050));
        assert!(f.admit(b, 1050), "another limit of the same source");
        assert!(f.admit(a, 1000 + NOTE_INTERVAL_MS));
    }
}
