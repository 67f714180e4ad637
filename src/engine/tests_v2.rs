//! Protocol v2 through the engine: keys, replies, replay, and how v2 and the
//! seed format share the table without ever meeting.

use super::*;
use crate::wire::v2::{Candidate, CandidateKind, Candidates, ClientInfo, Mapping, Pair};

use super::tests::{addr, cfg, engine, A, B};

const A6: &str = "[2001:db8::1]:1000";
const B6: &str = "[2001:db8:1::2]:2000";

fn candidates(list: &[&str]) -> Candidates {
    let list: Vec<Candidate> = list
        .iter()
        .map(|a| Candidate {
            kind: CandidateKind::HOST,
            addr: addr(a),
        })
        .collect();
    Candidates::from_slice(&list).unwrap()
}

/// An admitted request (the token's MAC is not looked at by the engine).
fn req(a: u64, b: u64, info: u8, cands: &[&str]) -> v2::Request {
    v2::Request {
        token: v2::Token {
            pair: Pair::new(a, b),
            key_id: 1,
            expiry: 0,
            mac: [0; v2::MAC_LEN],
        },
        cookie: None,
        info: ClientInfo(info),
        candidates: candidates(cands),
    }
}

const NEW: Outcome<v2::Reply> = Outcome::Registered { evicted: None };
const BIG: u64 = 0x51f0_c2a9_e4d3_b817;
const SMALL: u64 = 0x0bd1_e5a2_c4f6_a390;

#[test]
fn match_tells_each_side_its_partner_itself_and_the_partners_info() {
    for (wa, ca) in [(A, B), (A6, B6)] {
        let mut e = engine(16);
        let waiter = req(BIG, SMALL, 0x05, &["10.0.0.1:4000"]);
        let completer = req(SMALL, BIG, 0x02, &["10.0.0.2:5000", "[fd00::2]:5001"]);
        assert_eq!(e.handle_v2(&waiter, addr(wa), 0), NEW);
        let Outcome::Matched {
            waiting,
            completing,
        } = e.handle_v2(&completer, addr(ca), 10)
        else {
            panic!("no match")
        };
        let (w, c) = (waiting.reply, completing.reply);
        assert_eq!((waiting.to, completing.to), (addr(wa), addr(ca)));
        assert_eq!(w.pair, Pair::new(BIG, SMALL));
        assert_eq!(c.pair, Pair::new(SMALL, BIG));
        assert_eq!((w.peer, w.your_addr), (addr(ca), addr(wa)));
        assert_eq!((c.peer, c.your_addr), (addr(wa), addr(ca)));
        assert_eq!((w.src_port, w.dst_port), (c.dst_port, c.src_port));
        assert_ne!(w.src_port, w.dst_port);
        assert_eq!(w.peer_info, ClientInfo(0x02));
        assert_eq!(c.peer_info, ClientInfo(0x05));
        assert_eq!(c.peer_info.mapping(), Mapping::EndpointIndependent);
        // The waiter gets the completer's candidates (in hand at the
        // match); the completer gets none (the server stores none).
        assert_eq!(w.peer_candidates, completer.candidates);
        assert!(c.peer_candidates.is_empty());
        // Both survive the wire format.
        assert_eq!(v2::Reply::parse(&w.to_bytes()), Ok(w));
        assert_eq!(v2::Reply::parse(&c.to_bytes()), Ok(c));
        assert_eq!(e.counters().matched, 1);
        assert_eq!(e.pending(), 0);
        assert_eq!(e.replay_entries(), 1);
    }
}

#[test]
fn replays_are_the_first_replies_without_candidates() {
    let mut e = engine(16);
    let waiter = req(1, 2, 0x01, &["10.0.0.1:4000"]);
    let completer = req(2, 1, 0x06, &["10.0.0.2:5000"]);
    e.handle_v2(&waiter, addr(A), 0);
    let Outcome::Matched {
        waiting,
        completing,
    } = e.handle_v2(&completer, addr(B), 1)
    else {
        panic!("no match")
    };
    // The completer's replay is byte for byte its first reply.
    let Outcome::Replayed(again) = e.handle_v2(&completer, addr(B), 100) else {
        panic!("no replay")
    };
    assert_eq!(again, completing);
    assert_eq!(again.reply.to_bytes(), completing.reply.to_bytes());
    // The waiter's replay is its first reply without the candidates.
    let Outcome::Replayed(again) = e.handle_v2(&waiter, addr(A), 200) else {
        panic!("no replay")
    };
    let mut want = waiting;
    want.reply.peer_candidates = Candidates::EMPTY;
    assert_eq!(again, want);
    assert_eq!(e.counters().replayed, 2);
    // After the replay lifetime the request registers afresh.
    assert_eq!(e.handle_v2(&waiter, addr(A), 800), NEW);
}

#[test]
fn only_the_low_four_info_bits_are_relayed() {
    let mut e = engine(16);
    e.handle_v2(&req(1, 2, 0xf7, &[]), addr(A), 0);
    let Outcome::Matched {
        waiting,
        completing,
    } = e.handle_v2(&req(2, 1, 0xa9, &[]), addr(B), 1)
    else {
        panic!("no match")
    };
    assert_eq!(waiting.reply.peer_info, ClientInfo(0x09));
    assert_eq!(completing.reply.peer_info, ClientInfo(0x07));
}

#[test]
fn a_refresh_takes_the_newest_address_and_info() {
    let mut e = engine(16);
    assert_eq!(e.handle_v2(&req(1, 2, 0x01, &[]), addr(A), 0), NEW);
    assert_eq!(
        e.handle_v2(&req(1, 2, 0x06, &[]), addr("192.0.2.1:1001"), 10),
        Outcome::Refreshed
    );
    let Outcome::Matched { waiting, .. } = e.handle_v2(&req(2, 1, 0, &[]), addr(B), 20) else {
        panic!("no match")
    };
    assert_eq!(waiting.to, addr("192.0.2.1:1001"));
    assert_eq!(waiting.reply.your_addr, addr("192.0.2.1:1001"));
    let Outcome::Replayed(c) = e.handle_v2(&req(2, 1, 0, &[]), addr(B), 30) else {
        panic!("no replay")
    };
    assert_eq!(c.reply.peer_info, ClientInfo(0x06));
}

#[test]
fn v2_and_seed_requests_never_meet() {
    let mut e = engine(16);
    // Seed (1, 2) waits; v2 (2, 1) is another pair, and so is v2 (1, 2).
    let seed = |a: u32, b: u32| {
        Request {
            self_id: PeerId::from_u32(a),
            peer_id: PeerId::from_u32(b),
        }
        .emit()
    };
    assert_eq!(
        e.handle(&seed(1, 2), addr(A), 0),
        Outcome::Registered { evicted: None }
    );
    assert_eq!(e.handle_v2(&req(2, 1, 0, &[]), addr(B), 1), NEW);
    assert!(e.handle_v2(&req(1, 2, 0, &[]), addr(A), 2).is_v2_match());
    assert_eq!(e.pending(), 1);
    assert!(matches!(
        e.handle(&seed(2, 1), addr(B), 3),
        Outcome::Matched { .. }
    ));
    assert_eq!(e.pending(), 0);
    assert_eq!(e.replay_entries(), 2);
}

impl Outcome<v2::Reply> {
    fn is_v2_match(&self) -> bool {
        matches!(self, Outcome::Matched { .. })
    }
}

#[test]
fn families_do_not_mix_and_bad_sources_are_dropped() {
    let mut e = engine(16);
    assert_eq!(e.handle_v2(&req(1, 2, 0, &[]), addr(A), 0), NEW);
    assert_eq!(e.handle_v2(&req(2, 1, 0, &[]), addr(A6), 1), NEW);
    assert_eq!(e.pending(), 2);
    for bad in [
        "192.0.2.9:0",
        "0.0.0.0:5",
        "[::ffff:192.0.2.1]:5",
        "[ff02::1]:5",
    ] {
        assert_eq!(
            e.handle_v2(&req(2, 1, 0, &[]), addr(bad), 2),
            Outcome::Dropped(DropReason::BadSource),
            "{bad}"
        );
    }
    // A self-pair (which the wire parser refuses anyway) is dropped too.
    assert_eq!(
        e.handle_v2(&req(3, 3, 0, &[]), addr(A), 3),
        Outcome::Dropped(DropReason::SelfPair)
    );
    let c = e.counters();
    assert_eq!((c.received, c.bad_source, c.self_pair), (7, 4, 1));
    let only_v4 = Engine::new(&EngineConfig {
        ipv6: false,
        ..cfg(4)
    });
    assert_eq!(
        only_v4.unwrap().handle_v2(&req(1, 2, 0, &[]), addr(A6), 0),
        Outcome::Dropped(DropReason::Family)
    );
}

#[test]
fn ids_that_differ_anywhere_are_different_pairs() {
    // Pairs that share one ID, or whose IDs differ in one bit only, or that
    // the seed format's byte-order key would confuse, never match.
    let mut e = engine(64);
    let pairs = [
        (1u64, 2u64),
        (1, 3),
        (1 << 32 | 1, 2),
        (1, 2 | 1 << 63),
        (2 << 32, 1 << 32),
        (u64::MAX, 0),
        (u64::MAX - 1, 0),
    ];
    for (i, (a, b)) in pairs.iter().enumerate() {
        assert_eq!(
            e.handle_v2(&req(*a, *b, 0, &[]), addr(A), i as u64),
            NEW,
            "{a:x} {b:x}"
        );
    }
    assert_eq!(e.pending(), pairs.len());
    // Keys: 96 bits differ between all of them (no two share tag and check).
    let mut keys: Vec<(u64, u32)> = pairs
        .iter()
        .map(|(a, b)| {
            let k = e.v2_key(Pair::new(*a, *b), false);
            (k.tag, k.check)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), pairs.len());
    // Both halves of a pair share a key, on opposite sides.
    let (k1, k2) = (
        e.v2_key(Pair::new(7, 9), true),
        e.v2_key(Pair::new(9, 7), true),
    );
    assert_eq!((k1.tag, k1.check, k1.kind), (k2.tag, k2.check, k2.kind));
    assert_eq!((k1.side, k2.side), (Side::Lo, Side::Hi));
    assert_eq!(k1.kind, KIND_V2 | KIND_V6);
}

#[test]
fn a_batch_does_what_one_at_a_time_does() {
    let reqs: Vec<(v2::Request, SocketAddr)> = (0..600u64)
        .map(|i| {
            let (a, b) = (i / 3, 1000 + i / 3);
            let r = if i % 3 == 1 {
                req(b, a, (i % 16) as u8, &["10.0.0.1:9"])
            } else {
                req(a, b, (i % 16) as u8, &[])
            };
            let src = if i % 2 == 0 { A } else { B };
            (r, addr(src))
        })
        .collect();
    let mut batch = engine(128);
    let mut got = Vec::new();
    batch.handle_batch_v2(
        reqs.len(),
        |k| (k % 7 != 3).then(|| (&reqs[k].0, reqs[k].1)),
        5,
        |k, o| got.push((k, *o)),
    );
    let mut one = engine(128);
    let want: Vec<(usize, Outcome<v2::Reply>)> = reqs
        .iter()
        .enumerate()
        .filter(|(k, _)| k % 7 != 3)
        .map(|(k, (r, s))| (k, one.handle_v2(r, *s, 5)))
        .collect();
    assert_eq!(got, want);
    assert!(got
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Matched { .. })));
    assert!(got.iter().any(|(_, o)| matches!(o, Outcome::Replayed(_))));
    assert_eq!(batch.counters(), one.counters());
}
