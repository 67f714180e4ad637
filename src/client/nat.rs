//! NAT classification: does our NAT keep one public port for every
//! destination, or pick a new one per destination?
//!
//! [`Classifier`] asks "what is my address?" (a STUN Binding request) from one
//! socket to the server's port and to its `--stun-port`. The same mapped port
//! from both means endpoint-independent mapping ([`NatType::Easy`], which
//! includes no NAT at all); two different ports mean the mapping depends on
//! the destination ([`NatType::Hard`], what `masquerade random`, carrier-grade
//! NATs and many enterprise firewalls do). Without an answer from both ports
//! the type stays [`NatType::Unknown`]. The answer from the main port also
//! gives the public address the server will see when we register from the
//! same socket, which is the port a router mapping must open.
//!
//! [`roles`] turns our type (and the partner's, once protocol v2 carries it)
//! into what this side does in birthday probing.
//!
//! Sans-IO like the punch: datagrams and `now` in, datagrams out, no socket
//! and no clock.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::stun::{self, TransactionId};

/// Retransmit interval for the classification's STUN requests. Fixed rather
/// than doubling: the whole wait is short ([`super::DEFAULT_CLASSIFY_WAIT`]),
/// and under 10% loss each way a request and its answer both arrive 81% of
/// the time, so ten tries in a second fail together once in 10^7.
pub const CLASSIFY_INTERVAL: Duration = Duration::from_millis(100);
/// Once the main port has answered, how long to keep asking the second port
/// before deciding it does not answer (the server may lack `--stun-port`).
/// Seven tries at [`CLASSIFY_INTERVAL`]: under 10% loss each way all fail
/// together about once in 10^5 (0.19^7). It was 400 ms, four or five tries,
/// and in the NAT lab's lossy both-hard case one client in about 2,000 was
/// left `unknown` (0.19^5 is 1 in 4,000), which also cost it its birthday
/// role and the right failure message.
pub const SECOND_ANSWER_WAIT: Duration = Duration::from_millis(700);

/// What this side knows about its NAT, in the one byte protocol v2 relays to
/// the partner (see [`NatType::to_byte`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatType {
    /// Not classified (no second STUN port, no answers, or turned off).
    Unknown,
    /// One public port for every destination (or no NAT): reachable at the
    /// address the server saw, once our own packets opened the filter.
    Easy,
    /// A new public port per destination: the partner must guess it.
    Hard,
    /// Hard, but the router mapped the port the server saw to our socket
    /// (NAT-PMP, PCP or UPnP): reachable there from anywhere.
    HardMapped,
}

impl NatType {
    /// Short name for output: `unknown`, `easy`, `hard`, `hard-mapped`.
    pub fn name(self) -> &'static str {
        match self {
            NatType::Unknown => "unknown",
            NatType::Easy => "easy",
            NatType::Hard => "hard",
            NatType::HardMapped => "hard-mapped",
        }
    }

    /// The "client info" byte for protocol v2: bits 0-1 the mapping
    /// (0 unknown, 1 easy, 2 hard), bit 2 set when a router mapping makes a
    /// hard NAT reachable. Other bits are zero and ignored when read.
    pub fn to_byte(self) -> u8 {
        match self {
            NatType::Unknown => 0,
            NatType::Easy => 1,
            NatType::Hard => 2,
            NatType::HardMapped => 2 | 4,
        }
    }

    /// Reads [`NatType::to_byte`]'s encoding.
    pub fn from_byte(b: u8) -> NatType {
        match (b & 3, b & 4 != 0) {
            (1, _) => NatType::Easy,
            (2, false) => NatType::Hard,
            (2, true) => NatType::HardMapped,
            _ => NatType::Unknown,
        }
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The classification's findings, for decisions and for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReport {
    /// Our socket's local address (port meaningful; IP may be the wildcard).
    pub local: Option<SocketAddr>,
    /// Our public address as the server's main port saw it.
    pub public: Option<SocketAddr>,
    /// Our public address as the server's STUN port saw it.
    pub public_second: Option<SocketAddr>,
    /// Whether classification ran at all.
    pub attempted: bool,
}

impl NatReport {
    /// The mapping behaviour the two answers show.
    pub fn nat_type(&self) -> NatType {
        match (self.public, self.public_second) {
            (Some(a), Some(b)) if a == b => NatType::Easy,
            (Some(_), Some(_)) => NatType::Hard,
            _ => NatType::Unknown,
        }
    }

    /// Whether the NAT kept our local port (`None` if unknown).
    pub fn port_preserved(&self) -> Option<bool> {
        Some(self.public?.port() == self.local?.port())
    }
}

/// What birthday probing asks of this side (see [`roles`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Open many sockets toward the partner and wait to be found.
    pub hard: bool,
    /// Probe random ports of the partner's address, starting this long after
    /// punching starts.
    pub easy: Option<Duration>,
    /// Both sides are hard and unmapped: no strategy can work.
    pub hopeless: bool,
}

/// The birthday rule. Each side decides from what it knows, so the two agree
/// without a word: a side whose NAT is hard (and unmapped) takes the hard
/// role, because only it can make its many ports; a side whose NAT is easy,
/// or unknown, takes the easy role, because only its probes leave from the
/// one port the hard side is aiming at. Without the partner's type the easy
/// role waits `delay` first: if the partner is easy too, normal punching has
/// connected by then and no random probe is sent. Knowing the partner's type
/// (protocol v2) only skips steps: no wait when it is hard, no probing when it
/// is reachable, and an immediate verdict when both are hard.
pub fn roles(me: NatType, partner: Option<NatType>, delay: Duration) -> Roles {
    let partner = partner.filter(|p| *p != NatType::Unknown);
    let hopeless = me == NatType::Hard && partner == Some(NatType::Hard);
    let hard = me == NatType::Hard && !hopeless;
    let easy = match (me, partner) {
        (NatType::Easy | NatType::Unknown, None) => Some(delay),
        (NatType::Easy | NatType::Unknown, Some(NatType::Hard)) => Some(Duration::ZERO),
        _ => None,
    };
    Roles {
        hard,
        easy,
        hopeless,
    }
}

/// One outstanding "what is my address?" question.
#[derive(Clone, Copy, Debug)]
struct Question {
    to: SocketAddr,
    tid: TransactionId,
    answer: Option<SocketAddr>,
    next_send: Instant,
    sent: u32,
}

/// Sans-IO classification over one socket; see the module docs.
#[derive(Debug)]
pub struct Classifier {
    questions: [Option<Question>; 2],
    deadline: Instant,
    report: NatReport,
}

/// A STUN request to send.
#[derive(Clone, Copy, Debug)]
pub struct StunTransmit {
    /// Where.
    pub to: SocketAddr,
    /// The request.
    pub bytes: [u8; stun::REQUEST_LEN],
}

impl Classifier {
    /// Starts asking `main` (and `second`, if given) at `now`; gives up at
    /// `now + wait`. `tids` come from the caller's random source.
    pub fn new(
        main: SocketAddr,
        second: Option<SocketAddr>,
        local: Option<SocketAddr>,
        tids: [TransactionId; 2],
        now: Instant,
        wait: Duration,
    ) -> Classifier {
        let q = |to, tid| Question {
            to,
            tid,
            answer: None,
            next_send: now,
            sent: 0,
        };
        Classifier {
            questions: [Some(q(main, tids[0])), second.map(|s| q(s, tids[1]))],
            deadline: now + wait,
            report: NatReport {
                local,
                attempted: true,
                ..NatReport::default()
            },
        }
    }

    /// True when every question is answered, or waiting longer is pointless.
    pub fn is_done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let [main, second] = &self.questions;
        match (main, second) {
            (Some(m), Some(s)) => m.answer.is_some() && s.answer.is_some(),
            (Some(m), None) => m.answer.is_some(),
            _ => true,
        }
    }

    /// The next request due at `now`, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<StunTransmit> {
        if self.is_done(now) {
            return None;
        }
        for q in self.questions.iter_mut().flatten() {
            if q.answer.is_none() && now >= q.next_send {
                q.next_send = now + CLASSIFY_INTERVAL;
                q.sent += 1;
                let mut bytes = [0u8; stun::REQUEST_LEN];
                stun::binding_request(&q.tid, true, &mut bytes);
                return Some(StunTransmit { to: q.to, bytes });
            }
        }
        None
    }

    /// When to call [`Classifier::poll_transmit`] again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.questions.iter().flatten().all(|q| q.answer.is_some()) {
            return None;
        }
        let next = self
            .questions
            .iter()
            .flatten()
            .filter(|q| q.answer.is_none())
            .map(|q| q.next_send)
            .min()?;
        Some(next.min(self.deadline))
    }

    /// Takes a datagram from `from`; true if it was one of our answers.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        let mut main_answered_now = false;
        let mut taken = false;
        for (i, q) in self.questions.iter_mut().enumerate() {
            let Some(q) = q else { continue };
            if from != q.to || q.answer.is_some() {
                continue;
            }
            if let Ok(addr) = stun::parse_success(datagram, &q.tid) {
                q.answer = Some(addr);
                taken = true;
                main_answered_now = i == 0;
                if i == 0 {
                    self.report.public = Some(addr);
                } else {
                    self.report.public_second = Some(addr);
                }
            }
        }
        // The main port answers; a second port that has not answered within
        // a short while is probably not there.
        if main_answered_now && self.questions[1].is_some_and(|q| q.answer.is_none()) {
            self.deadline = self.deadline.min(now + SECOND_ANSWER_WAIT);
        }
        taken
    }

    /// What was learned so far.
    pub fn report(&self) -> NatReport {
        self.report
    }

    /// Requests sent to each destination (main, second).
    pub fn sent(&self) -> (u32, u32) {
        let n = |q: &Option<Question>| q.map_or(0, |q| q.sent);
        (n(&self.questions[0]), n(&self.questions[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn answer(tid: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
        let mut out = [0u8; stun::MAX_ANSWER_LEN];
        let n = stun::write_success(tid, mapped, true, &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn same_port_to_both_is_easy_different_is_hard() {
        let t0 = Instant::now();
        let (main, second) = (addr("198.18.0.2:4949"), addr("198.18.0.2:3478"));
        for (p1, p2, want) in [(40001, 40001, NatType::Easy), (40001, 51234, NatType::Hard)] {
            let mut c = Classifier::new(
                main,
                Some(second),
                Some(addr("0.0.0.0:40001")),
                [[1; 12], [2; 12]],
                t0,
                Duration::from_secs(1),
            );
            let a = c.poll_transmit(t0).unwrap();
            let b = c.poll_transmit(t0).unwrap();
            assert_eq!((a.to, b.to), (main, second));
            assert!(c.poll_transmit(t0).is_none());
            assert_eq!(c.poll_timeout(), Some(t0 + CLASSIFY_INTERVAL));
            let pub1 = SocketAddr::new("203.0.113.9".parse().unwrap(), p1);
            let pub2 = SocketAddr::new("203.0.113.9".parse().unwrap(), p2);
            // A forged answer from elsewhere, or with another transaction, is not taken.
            assert!(!c.handle(t0, addr("192.0.2.1:4949"), &answer(&[1; 12], pub1)));
            assert!(!c.handle(t0, main, &answer(&[9; 12], pub1)));
            assert!(c.handle(t0, main, &answer(&[1; 12], pub1)));
            assert!(!c.is_done(t0));
            assert!(c.handle(t0, second, &answer(&[2; 12], pub2)));
            assert!(c.is_done(t0));
            assert_eq!(c.report().nat_type(), want);
            assert_eq!(c.report().port_preserved(), Some(true));
        }
    }

    #[test]
    fn retransmits_then_gives_up_soon_after_a_lone_main_answer() {
        let t0 = Instant::now();
        let (main, second) = (addr("198.18.0.2:4949"), addr("198.18.0.2:3478"));
        let mut c = Classifier::new(
            main,
            Some(second),
            None,
            [[1; 12], [2; 12]],
            t0,
            Duration::from_secs(1),
        );
        while c.poll_transmit(t0).is_some() {}
        let t1 = t0 + CLASSIFY_INTERVAL;
        assert_eq!(c.poll_transmit(t1).map(|t| t.to), Some(main));
        assert_eq!(c.poll_transmit(t1).map(|t| t.to), Some(second));
        assert!(c.handle(t1, main, &answer(&[1; 12], addr("203.0.113.9:5000"))));
        assert!(!c.is_done(t1));
        assert!(c.is_done(t1 + SECOND_ANSWER_WAIT));
        assert_eq!(c.report().nat_type(), NatType::Unknown);
        assert_eq!(c.report().public, Some(addr("203.0.113.9:5000")));
        assert_eq!(c.sent(), (2, 2));
        // Without a second port, the main answer alone finishes it.
        let mut c = Classifier::new(
            main,
            None,
            None,
            [[1; 12], [2; 12]],
            t0,
            Duration::from_secs(1),
        );
        assert!(c.poll_transmit(t0).is_some());
        assert!(c.handle(t0, main, &answer(&[1; 12], addr("203.0.113.9:5000"))));
        assert!(c.is_done(t0));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn nat_type_byte_round_trips() {
        for t in [
            NatType::Unknown,
            NatType::Easy,
            NatType::Hard,
            NatType::HardMapped,
        ] {
            assert_eq!(NatType::from_byte(t.to_byte()), t);
            assert_eq!(NatType::from_byte(t.to_byte() | 0xf8), t);
        }
        assert_eq!(NatType::from_byte(3), NatType::Unknown);
    }

    #[test]
    fn roles_agree_without_a_word() {
        use NatType::*;
        let d = Duration::from_millis(500);
        let types = [Unknown, Easy, Hard, HardMapped];
        for a in types {
            for b in types {
                // Each side sees only its own type (no v2).
                let (ra, rb) = (roles(a, None, d), roles(b, None, d));
                // Exactly when one side is hard and unmapped and the other
                // can be found at its observed port, one probes and one waits.
                if a == Hard && matches!(b, Easy | Unknown) {
                    assert!(
                        ra.hard && ra.easy.is_none() && rb.easy == Some(d),
                        "{a} {b}"
                    );
                }
                // A hard side never probes random ports; an easy one never opens many.
                assert!(!(ra.hard && ra.easy.is_some()));
                assert!(!ra.hopeless, "no verdict without the partner's type");
                // With the partner's type: same roles, fewer steps.
                let ka = roles(a, Some(b), d);
                assert!(!ka.hard || ra.hard);
                assert!(ka.easy.is_none() || ra.easy.is_some());
                assert_eq!(ka.hopeless, a == Hard && b == Hard, "{a} {b}");
                if a == Easy && b == Hard {
                    assert_eq!(ka.easy, Some(Duration::ZERO));
                }
                if a == Easy && b == Easy {
                    assert_eq!(
                        ka,
                        Roles {
                            hard: false,
                            easy: None,
                            hopeless: false
                        }
                    );
                }
            }
        }
    }
}
