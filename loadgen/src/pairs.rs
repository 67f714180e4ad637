//! Pair bookkeeping: which socket pairs are busy, and what each reply means.
//!
//! A synthetic pair is two requests, `(x, y)` from socket `lo` and `(y, x)`
//! from socket `hi`, with IDs fresh to this pair. Replies carry no IDs, so a
//! reply is tied to its pair by where it arrived and whom it names: the
//! receiving socket and the partner address inside the reply pick one
//! *socket pair* (`{lo, hi}`, unordered), and a socket pair carries at most
//! one synthetic pair at a time.
//!
//! A socket pair is reused only when nothing more can arrive for its last
//! pair: at once when both replies (and any replay we provoked) are in; if
//! the pair timed out, only after it has also rested for `grace`, so that a
//! reply arriving after the timeout is counted as *late* instead of being
//! taken for the next pair's.
//!
//! This module does no I/O and reads no clock: callers pass socket indices,
//! reply ports and `now` in nanoseconds. Every slot is allocated in
//! [`Pairs::new`]; nothing allocates afterwards.

use psync::wire::{PeerId, Request};

/// Nanoseconds since the run started.
pub type Nanos = u64;

const NIL: u32 = u32::MAX;

/// The two ports of one reply.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Ports {
    /// The port the peer should send from.
    pub src: u16,
    /// The port on the partner the peer should send to.
    pub dst: u16,
}

/// Why a reply was wrong. Every kind is a server bug (or something that is
/// not our server answering), never a symptom of load.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wrong {
    /// Not a valid reply: wrong length, family field, padding or ports.
    Malformed,
    /// A reply of the other address family (20 bytes to an IPv6 peer, or 32 to IPv4).
    Family,
    /// The partner address is not one of our sockets.
    NotOurs,
    /// The partner address is the receiving socket itself.
    SelfPartner,
    /// A reply for a socket pair that never carried a pair.
    NeverSent,
    /// A reply beyond those the pair should get (no retransmit asked for it).
    Extra,
    /// A second reply to one side that differs from the first.
    Changed,
    /// The two replies' ports are not each other's mirror image.
    NotComplementary,
    /// A port outside `--port-range`.
    OutOfRange,
}

impl Wrong {
    /// Every kind, in report order.
    pub const ALL: [Wrong; 9] = [
        Wrong::Malformed,
        Wrong::Family,
        Wrong::NotOurs,
        Wrong::SelfPartner,
        Wrong::NeverSent,
        Wrong::Extra,
        Wrong::Changed,
        Wrong::NotComplementary,
        Wrong::OutOfRange,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Wrong::Malformed => "malformed",
            Wrong::Family => "wrong_family",
            Wrong::NotOurs => "partner_not_ours",
            Wrong::SelfPartner => "partner_is_self",
            Wrong::NeverSent => "never_sent",
            Wrong::Extra => "extra_reply",
            Wrong::Changed => "changed_reply",
            Wrong::NotComplementary => "ports_not_complementary",
            Wrong::OutOfRange => "port_out_of_range",
        }
    }
}

/// Counts of wrong replies, by kind.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct WrongCounts(pub [u64; Wrong::ALL.len()]);

impl WrongCounts {
    /// Counts one.
    pub fn add(&mut self, w: Wrong) {
        self.0[w as usize] += 1;
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The count of one kind.
    pub fn get(&self, w: Wrong) -> u64 {
        self.0[w as usize]
    }
}

/// Event counts for a set of pairs (all of them, or those measured).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Pairs whose requests were sent.
    pub issued: u64,
    /// Pairs whose two replies arrived in time and agreed.
    pub completed: u64,
    /// Pairs not complete at their timeout.
    pub lost: u64,
    /// Replies that arrived after their pair's timeout.
    pub late: u64,
    /// Replayed replies received for our retransmits.
    pub replayed: u64,
    /// Retransmits whose replayed reply did not come back in time.
    pub replay_missing: u64,
    /// Pairs that got a wrong reply.
    pub wrong_pairs: u64,
}

/// What one reply meant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// The first of the pair's two replies.
    Partial,
    /// The second reply: the pair is complete and correct.
    Completed {
        /// From the pair's scheduled send time to this reply.
        latency: Nanos,
        /// Scheduled inside the measurement window.
        measured: bool,
    },
    /// The replay of a reply, answering our retransmit.
    Replayed,
    /// A reply for a pair that had already timed out.
    Late,
    /// A reply that fails a check.
    Wrong(Wrong),
    /// The second reply of a pair already judged wrong: not judged again.
    Spoiled,
}

/// What [`Pairs::on_reply`] decided.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Verdict {
    /// What the reply meant.
    pub outcome: Outcome,
    /// Retransmit this side's request now (it was chosen for a retransmit,
    /// and sending it after the reply makes the server replay, not refresh).
    pub resend: Option<Request>,
}

impl Verdict {
    fn just(outcome: Outcome) -> Verdict {
        Verdict {
            outcome,
            resend: None,
        }
    }
}

/// The two requests of a freshly issued pair, in the order to send them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Issue {
    /// The socket pair carrying it.
    pub slot: u32,
    /// Socket index and request sent first.
    pub first: (usize, Request),
    /// Socket index and request sent second.
    pub second: (usize, Request),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// On the free list (or never used).
    Idle,
    /// Awaiting replies (or the replay of a retransmit); on the timer list.
    InFlight,
    /// Timed out; resting on the quarantine list until `deadline`.
    Resting,
}

#[derive(Clone, Copy)]
struct Slot {
    sockets: [u16; 2],
    state: State,
    /// Bit `s`: the reply at `sockets[s]` is in.
    got: u8,
    /// Bit `s`: retransmit side `s` once its reply is in.
    retransmit: u8,
    /// Bit `s`: a retransmit from side `s` awaits its replayed reply.
    want_replay: u8,
    used: bool,
    complete: bool,
    bad: bool,
    measured: bool,
    ports: [Ports; 2],
    pair: u32,
    sched: Nanos,
    /// While in flight: the timeout. While resting: when it may be reused.
    deadline: Nanos,
    prev: u32,
    next: u32,
}

/// An intrusive FIFO of slot indices (the links live in the slots).
#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };

    fn push_back(&mut self, slots: &mut [Slot], i: u32) {
        slots[i as usize].prev = self.tail;
        slots[i as usize].next = NIL;
        if self.tail == NIL {
            self.head = i;
        } else {
            slots[self.tail as usize].next = i;
        }
        self.tail = i;
        self.len += 1;
    }

    fn unlink(&mut self, slots: &mut [Slot], i: u32) {
        let Slot { prev, next, .. } = slots[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            slots[next as usize].prev = prev;
        }
        slots[i as usize].prev = NIL;
        slots[i as usize].next = NIL;
        self.len -= 1;
    }

    fn pop_front(&mut self, slots: &mut [Slot]) -> Option<u32> {
        let i = self.head;
        if i == NIL {
            return None;
        }
        self.unlink(slots, i);
        Some(i)
    }
}

/// Settings of the pair table.
#[derive(Clone, Copy, Debug)]
pub struct PairsConfig {
    /// Sockets simulating peers (at least 2).
    pub sockets: usize,
    /// How long a pair may take before it counts as lost.
    pub timeout: Nanos,
    /// How long a timed-out socket pair rests before reuse.
    pub grace: Nanos,
    /// Ports the server may hand out, inclusive, when checked.
    pub port_range: Option<(u16, u16)>,
    /// First pair ID; pair `n` uses IDs `id_base + 2n` and `id_base + 2n + 1`.
    pub id_base: u32,
}

/// Every socket pair's state, and the counts of what happened.
pub struct Pairs {
    slots: Box<[Slot]>,
    free: List,
    timers: List,
    resting: List,
    cfg: PairsConfig,
    next_pair: u32,
    /// Pairs not yet complete.
    outstanding: usize,
    /// Counts over every pair, warmup included.
    pub all: Tally,
    /// Counts over the pairs scheduled in the measurement window.
    pub measured: Tally,
    /// Wrong replies by kind, whenever they came.
    pub wrong: WrongCounts,
}

/// The slot of the unordered socket pair `{a, b}`, `a != b`.
fn slot_index(a: usize, b: usize) -> usize {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    hi * (hi - 1) / 2 + lo
}

/// How many socket pairs `sockets` sockets make.
pub fn socket_pairs(sockets: usize) -> usize {
    sockets * sockets.saturating_sub(1) / 2
}

impl Pairs {
    /// Allocates a slot for every socket pair, all free, in an order that
    /// spreads consecutive pairs over all sockets.
    ///
    /// # Panics
    /// If `cfg.sockets` is below 2 or above 65535 (the caller validates).
    pub fn new(cfg: PairsConfig) -> Pairs {
        let n = cfg.sockets;
        assert!((2..=usize::from(u16::MAX)).contains(&n), "bad socket count");
        let blank = Slot {
            sockets: [0, 0],
            state: State::Idle,
            got: 0,
            retransmit: 0,
            want_replay: 0,
            used: false,
            complete: false,
            bad: false,
            measured: false,
            ports: [Ports::default(); 2],
            pair: 0,
            sched: 0,
            deadline: 0,
            prev: NIL,
            next: NIL,
        };
        let mut slots = vec![blank; socket_pairs(n)].into_boxed_slice();
        let mut free = List::EMPTY;
        // Walk the pairs by distance d = 1, 2, …: each round of d touches
        // every socket twice, so the free list never bunches on a few sockets.
        for d in 1..=n / 2 {
            for i in 0..n {
                let j = (i + d) % n;
                if 2 * d == n && i >= j {
                    continue; // the pairs at distance n/2 appear twice
                }
                let k = slot_index(i, j);
                slots[k].sockets = [i.min(j) as u16, i.max(j) as u16];
                free.push_back(&mut slots, k as u32);
            }
        }
        debug_assert_eq!(free.len, slots.len());
        Pairs {
            slots,
            free,
            timers: List::EMPTY,
            resting: List::EMPTY,
            cfg,
            next_pair: 0,
            outstanding: 0,
            all: Tally::default(),
            measured: Tally::default(),
            wrong: WrongCounts::default(),
        }
    }

    /// Pairs sent and not yet complete.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Socket pairs still waiting for something (replies or replays).
    pub fn busy(&self) -> usize {
        self.timers.len
    }

    /// Socket pairs free for a new pair now.
    pub fn free(&self) -> usize {
        self.free.len
    }

    /// The request socket `side` of pair number `pair` sends.
    fn request(&self, pair: u32, side: usize) -> Request {
        let x = self.cfg.id_base.wrapping_add(pair.wrapping_mul(2));
        let y = x.wrapping_add(1);
        let (s, p) = if side == 0 { (x, y) } else { (y, x) };
        Request {
            self_id: PeerId::from_u32(s),
            peer_id: PeerId::from_u32(p),
        }
    }

    /// Takes the next free socket pair and starts a pair on it: `sched` is its
    /// scheduled send time (latency counts from there), `now` the real one
    /// (the timeout counts from there). `retransmit` bit `s` asks for side
    /// `s`'s request to be sent again once its reply is in. `None` when no
    /// socket pair is free.
    pub fn issue(
        &mut self,
        sched: Nanos,
        now: Nanos,
        measured: bool,
        retransmit: u8,
    ) -> Option<Issue> {
        let i = self.free.pop_front(&mut self.slots)?;
        let pair = self.next_pair;
        self.next_pair = self.next_pair.wrapping_add(1);
        let deadline = now.saturating_add(self.cfg.timeout);
        let s = &mut self.slots[i as usize];
        *s = Slot {
            state: State::InFlight,
            got: 0,
            retransmit: retransmit & 3,
            want_replay: 0,
            used: true,
            complete: false,
            bad: false,
            measured,
            ports: [Ports::default(); 2],
            pair,
            sched,
            deadline,
            ..*s
        };
        let sockets = s.sockets;
        self.timers.push_back(&mut self.slots, i);
        self.outstanding += 1;
        self.all.issued += 1;
        if measured {
            self.measured.issued += 1;
        }
        // Alternate which side registers first, so both the waiting and the
        // completing role are exercised on every socket.
        let first = (pair & 1) as usize;
        let second = first ^ 1;
        Some(Issue {
            slot: i,
            first: (usize::from(sockets[first]), self.request(pair, first)),
            second: (usize::from(sockets[second]), self.request(pair, second)),
        })
    }

    /// Counts a wrong reply that could not be tied to a pair.
    pub fn count_wrong(&mut self, w: Wrong) {
        self.wrong.add(w);
    }

    fn wrong_pair(&mut self, i: usize, w: Wrong) -> Verdict {
        self.wrong.add(w);
        let s = &mut self.slots[i];
        if !s.bad {
            s.bad = true;
            self.all.wrong_pairs += 1;
            if s.measured {
                self.measured.wrong_pairs += 1;
            }
        }
        Verdict::just(Outcome::Wrong(w))
    }

    /// Judges a reply that arrived at socket `at` naming socket `partner` as
    /// the peer, with `ports`. The caller has already checked the bytes
    /// (`Reply::parse`) and mapped the partner address to a socket index.
    pub fn on_reply(&mut self, at: usize, partner: usize, ports: Ports, now: Nanos) -> Verdict {
        if at == partner {
            self.wrong.add(Wrong::SelfPartner);
            return Verdict::just(Outcome::Wrong(Wrong::SelfPartner));
        }
        let i = slot_index(at, partner);
        let side = usize::from(at > partner);
        let bit = 1u8 << side;
        let s = self.slots[i];
        if let Some((lo, hi)) = self.cfg.port_range {
            let inside = |p: u16| (lo..=hi).contains(&p);
            if !inside(ports.src) || !inside(ports.dst) {
                return match s.state {
                    State::Idle => {
                        self.wrong.add(Wrong::OutOfRange);
                        Verdict::just(Outcome::Wrong(Wrong::OutOfRange))
                    }
                    _ => self.wrong_pair(i, Wrong::OutOfRange),
                };
            }
        }
        match s.state {
            State::Idle => {
                // Nothing is expected here: the last pair got every reply it
                // asked for, or the socket pair was never used.
                let w = if s.used {
                    Wrong::Extra
                } else {
                    Wrong::NeverSent
                };
                self.wrong.add(w);
                Verdict::just(Outcome::Wrong(w))
            }
            State::Resting => {
                if s.got & bit != 0 {
                    if s.ports[side] != ports {
                        return self.wrong_pair(i, Wrong::Changed);
                    }
                } else {
                    self.slots[i].ports[side] = ports;
                    self.slots[i].got |= bit;
                    if s.got & (bit ^ 3) != 0 && !complementary(self.slots[i].ports) {
                        return self.wrong_pair(i, Wrong::NotComplementary);
                    }
                }
                self.all.late += 1;
                if s.measured {
                    self.measured.late += 1;
                }
                Verdict::just(Outcome::Late)
            }
            State::InFlight => {
                if s.got & bit != 0 {
                    if s.ports[side] != ports {
                        return self.wrong_pair(i, Wrong::Changed);
                    }
                    if s.want_replay & bit == 0 {
                        return self.wrong_pair(i, Wrong::Extra);
                    }
                    self.slots[i].want_replay &= !bit;
                    self.all.replayed += 1;
                    if s.measured {
                        self.measured.replayed += 1;
                    }
                    self.release_if_done(i);
                    return Verdict::just(Outcome::Replayed);
                }
                let resend = (s.retransmit & bit != 0).then(|| self.request(s.pair, side));
                {
                    let s = &mut self.slots[i];
                    s.ports[side] = ports;
                    s.got |= bit;
                    if resend.is_some() {
                        s.retransmit &= !bit;
                        s.want_replay |= bit;
                    }
                }
                if s.got & (bit ^ 3) == 0 {
                    return Verdict {
                        outcome: Outcome::Partial,
                        resend,
                    };
                }
                // Both replies are in.
                self.slots[i].complete = true;
                self.outstanding -= 1;
                let outcome = if !complementary(self.slots[i].ports) {
                    self.wrong_pair(i, Wrong::NotComplementary).outcome
                } else if s.bad {
                    Outcome::Spoiled
                } else {
                    self.all.completed += 1;
                    if s.measured {
                        self.measured.completed += 1;
                    }
                    Outcome::Completed {
                        latency: now.saturating_sub(s.sched),
                        measured: s.measured,
                    }
                };
                self.release_if_done(i);
                Verdict { outcome, resend }
            }
        }
    }

    /// Frees an in-flight slot whose pair is complete and owes no replay.
    fn release_if_done(&mut self, i: usize) {
        let s = &self.slots[i];
        if s.complete && s.want_replay == 0 {
            self.timers.unlink(&mut self.slots, i as u32);
            self.slots[i].state = State::Idle;
            self.free.push_back(&mut self.slots, i as u32);
        }
    }

    /// Times out pairs whose deadline has passed and frees socket pairs that
    /// have rested long enough. Bounded by the number of state changes.
    pub fn expire(&mut self, now: Nanos) {
        while self.timers.head != NIL {
            let i = self.timers.head as usize;
            if self.slots[i].deadline > now {
                break;
            }
            self.timers.unlink(&mut self.slots, i as u32);
            let s = &mut self.slots[i];
            let measured = s.measured;
            if !s.complete {
                s.complete = true;
                self.outstanding -= 1;
                if !s.bad {
                    self.all.lost += 1;
                    if measured {
                        self.measured.lost += 1;
                    }
                }
            } else if s.want_replay != 0 {
                let missing = u64::from(s.want_replay.count_ones());
                self.all.replay_missing += missing;
                if measured {
                    self.measured.replay_missing += missing;
                }
            }
            // Deadlines are set in send order and the grace is constant, so
            // the resting list stays sorted by release time.
            s.retransmit = 0;
            s.want_replay = 0;
            s.state = State::Resting;
            s.deadline = s.deadline.saturating_add(self.cfg.grace);
            self.resting.push_back(&mut self.slots, i as u32);
        }
        while self.resting.head != NIL {
            let i = self.resting.head as usize;
            if self.slots[i].deadline > now {
                break;
            }
            self.resting.unlink(&mut self.slots, i as u32);
            // A pair that got one reply keeps it: a late second reply can
            // still be checked against it. But the slot is free again.
            self.slots[i].state = State::Idle;
            self.free.push_back(&mut self.slots, i as u32);
        }
    }

    /// The next time [`Pairs::expire`] has work, if any.
    pub fn next_deadline(&self) -> Option<Nanos> {
        let t = (self.timers.head != NIL).then(|| self.slots[self.timers.head as usize].deadline);
        let r = (self.resting.head != NIL).then(|| self.slots[self.resting.head as usize].deadline);
        match (t, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The two replies of a pair mirror each other: one's source port is the
/// other's destination port, and the reverse.
fn complementary(p: [Ports; 2]) -> bool {
    p[0].src == p[1].dst && p[0].dst == p[1].src
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn pairs(sockets: usize) -> Pairs {
        Pairs::new(PairsConfig {
            sockets,
            timeout: 100 * MS,
            grace: 1000 * MS,
            port_range: None,
            id_base: 1000,
        })
    }

    fn ports(src: u16, dst: u16) -> Ports {
        Ports { src, dst }
    }

    #[test]
    fn every_socket_pair_is_free_once_and_spread() {
        for n in [2, 3, 4, 5, 16, 17] {
            let mut p = pairs(n);
            assert_eq!(p.free(), n * (n - 1) / 2);
            let mut seen = std::collections::HashSet::new();
            let mut uses = vec![0; n];
            while let Some(is) = p.issue(0, 0, true, 0) {
                let (a, b) = (is.first.0, is.second.0);
                assert_ne!(a, b);
                assert!(seen.insert((a.min(b), a.max(b))), "{a},{b} twice");
                if seen.len() <= n {
                    uses[a] += 1;
                    uses[b] += 1;
                }
            }
            assert_eq!(seen.len(), n * (n - 1) / 2);
            // The first n pairs touch each socket exactly twice (n >= 3).
            if n >= 3 {
                assert!(uses.iter().all(|&u| u == 2), "{n}: {uses:?}");
            }
        }
    }

    #[test]
    fn requests_are_each_others_counterpart_and_fresh() {
        let mut p = pairs(4);
        let a = p.issue(0, 0, true, 0).unwrap();
        let b = p.issue(0, 0, true, 0).unwrap();
        assert_eq!(a.first.1.counterpart(), a.second.1);
        assert_eq!(b.first.1.counterpart(), b.second.1);
        assert_ne!(a.first.1.key(), b.first.1.key());
        assert_ne!(a.first.1.key(), b.second.1.key());
    }

    #[test]
    fn a_correct_pair_completes_and_frees_its_socket_pair_at_once() {
        let mut p = pairs(2);
        let is = p.issue(5 * MS, 6 * MS, true, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        assert_eq!(p.free(), 0);
        let v = p.on_reply(a, b, ports(4000, 5000), 7 * MS);
        assert_eq!(v.outcome, Outcome::Partial);
        let v = p.on_reply(b, a, ports(5000, 4000), 9 * MS);
        assert_eq!(
            v.outcome,
            Outcome::Completed {
                latency: 4 * MS,
                measured: true
            }
        );
        assert_eq!(p.free(), 1);
        assert_eq!(p.outstanding(), 0);
        assert_eq!(p.measured.completed, 1);
        assert_eq!(p.wrong.total(), 0);
    }

    #[test]
    fn ports_that_do_not_mirror_are_wrong() {
        let mut p = pairs(2);
        let is = p.issue(0, 0, true, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        p.on_reply(a, b, ports(4000, 5000), MS);
        let v = p.on_reply(b, a, ports(5000, 4001), MS);
        assert_eq!(v.outcome, Outcome::Wrong(Wrong::NotComplementary));
        assert_eq!(p.measured.completed, 0);
        assert_eq!(p.measured.wrong_pairs, 1);
        assert_eq!(p.wrong.get(Wrong::NotComplementary), 1);
    }

    #[test]
    fn a_late_reply_after_the_timeout_is_late_not_wrong() {
        let mut p = pairs(2);
        let is = p.issue(0, 0, true, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        p.on_reply(a, b, ports(4000, 5000), MS);
        p.expire(100 * MS);
        assert_eq!(p.measured.lost, 1);
        assert_eq!(p.outstanding(), 0);
        // Resting: not reusable yet, so the late reply cannot be misread.
        assert_eq!(p.free(), 0);
        assert!(p.issue(0, 150 * MS, true, 0).is_none());
        let v = p.on_reply(b, a, ports(5000, 4000), 150 * MS);
        assert_eq!(v.outcome, Outcome::Late);
        assert_eq!(p.measured.late, 1);
        assert_eq!(p.wrong.total(), 0);
        // A late reply that contradicts the first one is still caught.
        let v = p.on_reply(b, a, ports(5000, 4001), 160 * MS);
        assert_eq!(v.outcome, Outcome::Wrong(Wrong::Changed));
        // After the grace period the socket pair is reused.
        assert_eq!(p.next_deadline(), Some(1100 * MS));
        p.expire(1100 * MS);
        assert_eq!(p.free(), 1);
        assert!(p.issue(0, 1100 * MS, true, 0).is_some());
    }

    #[test]
    fn a_late_pair_checks_its_two_late_replies_against_each_other() {
        let mut p = pairs(2);
        let is = p.issue(0, 0, false, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        p.expire(100 * MS);
        assert_eq!(p.all.lost, 1);
        assert_eq!(p.measured.lost, 0);
        assert_eq!(
            p.on_reply(a, b, ports(1, 2), 120 * MS).outcome,
            Outcome::Late
        );
        assert_eq!(
            p.on_reply(b, a, ports(3, 1), 130 * MS).outcome,
            Outcome::Wrong(Wrong::NotComplementary)
        );
    }

    #[test]
    fn retransmits_get_replays_and_hold_the_socket_pair_until_then() {
        let mut p = pairs(2);
        let is = p.issue(0, 0, true, 0b01).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        let side0 = if a < b { a } else { b };
        let side1 = a + b - side0;
        let v = p.on_reply(side0, side1, ports(4000, 5000), MS);
        assert_eq!(v.outcome, Outcome::Partial);
        let req = v.resend.expect("side 0 retransmits after its reply");
        assert!(req == is.first.1 || req == is.second.1);
        let v = p.on_reply(side1, side0, ports(5000, 4000), 2 * MS);
        assert!(matches!(v.outcome, Outcome::Completed { .. }));
        assert_eq!(v.resend, None);
        // Complete, but the replay is owed: the socket pair stays busy.
        assert_eq!(p.free(), 0);
        let v = p.on_reply(side0, side1, ports(4000, 5000), 3 * MS);
        assert_eq!(v.outcome, Outcome::Replayed);
        assert_eq!(p.free(), 1);
        assert_eq!(p.measured.replayed, 1);
        // Any further reply to a finished pair is one too many.
        let v = p.on_reply(side0, side1, ports(4000, 5000), 4 * MS);
        assert_eq!(v.outcome, Outcome::Wrong(Wrong::Extra));
    }

    #[test]
    fn a_missing_replay_is_counted_but_not_lost() {
        let mut p = pairs(2);
        let is = p.issue(0, 0, true, 0b11).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        assert!(p.on_reply(a, b, ports(1, 2), MS).resend.is_some());
        assert!(p.on_reply(b, a, ports(2, 1), MS).resend.is_some());
        assert_eq!(p.on_reply(a, b, ports(1, 2), MS).outcome, Outcome::Replayed);
        p.expire(100 * MS);
        assert_eq!(p.measured.completed, 1);
        assert_eq!(p.measured.lost, 0);
        assert_eq!(p.measured.replay_missing, 1);
    }

    #[test]
    fn unexpected_replies_are_wrong() {
        let mut p = pairs(3);
        assert_eq!(
            p.on_reply(0, 1, ports(1, 2), 0).outcome,
            Outcome::Wrong(Wrong::NeverSent)
        );
        assert_eq!(
            p.on_reply(2, 2, ports(1, 2), 0).outcome,
            Outcome::Wrong(Wrong::SelfPartner)
        );
        let is = p.issue(0, 0, true, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        p.on_reply(a, b, ports(1, 2), 0);
        assert_eq!(
            p.on_reply(a, b, ports(1, 3), 0).outcome,
            Outcome::Wrong(Wrong::Changed)
        );
        assert_eq!(p.wrong.total(), 3);
    }

    #[test]
    fn ports_outside_the_range_are_wrong() {
        let mut p = Pairs::new(PairsConfig {
            port_range: Some((2000, 3000)),
            ..pairs(2).cfg
        });
        let is = p.issue(0, 0, true, 0).unwrap();
        let (a, b) = (is.first.0, is.second.0);
        assert_eq!(
            p.on_reply(a, b, ports(2000, 3001), 0).outcome,
            Outcome::Wrong(Wrong::OutOfRange)
        );
        assert_eq!(
            p.on_reply(b, a, ports(2000, 3000), 0).outcome,
            Outcome::Partial
        );
    }
}
