use super::*;

/// A small engine's settings (also for `tests_v2`).
pub(super) fn cfg(capacity: usize) -> EngineConfig {
    EngineConfig {
        capacity,
        ttl_ms: 1000,
        replay_ttl_ms: 500,
        port_lo: 2000,
        port_hi: 2001,
        seed: Some(1),
        limits: SourceLimits::OFF,
        ..EngineConfig::default()
    }
}

pub(super) fn engine(capacity: usize) -> Engine {
    Engine::new(&cfg(capacity)).unwrap()
}

fn req(a: u32, b: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(a),
        peer_id: PeerId::from_u32(b),
    }
    .emit()
}

pub(super) const A: &str = "192.0.2.1:1000";
pub(super) const B: &str = "198.51.100.2:2000";
const NEW: Outcome = Outcome::Registered { evicted: None };

pub(super) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Outcome {
    fn is_match(&self) -> bool {
        matches!(self, Outcome::Matched { .. })
    }
}

#[test]
fn match_assigns_ports_to_waiting_and_completing() {
    let mut e = engine(16);
    assert_eq!(e.handle(&req(1, 2), addr(A), 0), NEW);
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
    assert_eq!(e.replay_entries(), 1);
    // A retransmit from either side gets its reply again.
    assert_eq!(
        e.handle(&req(1, 2), addr(A), 20),
        Outcome::Replayed(waiting)
    );
    assert_eq!(
        e.handle(&req(2, 1), addr(B), 20),
        Outcome::Replayed(completing)
    );
    // After the replay lifetime the retransmit registers again.
    assert_eq!(e.handle(&req(2, 1), addr(B), 600), NEW);
    assert!(e.handle(&req(1, 2), addr(A), 601).is_match());
}

#[test]
fn the_same_request_from_elsewhere_after_a_match_starts_afresh() {
    let mut e = engine(16);
    e.handle(&req(1, 2), addr(A), 0);
    assert!(e.handle(&req(2, 1), addr(B), 1).is_match());
    // A moved (or retried from a new socket): it waits again, the old
    // replies are forgotten, and B's next request is a new match.
    assert_eq!(e.handle(&req(1, 2), addr("192.0.2.9:1"), 20), NEW);
    assert_eq!(e.pending(), 1);
    assert_eq!(e.replay_entries(), 0);
    let Outcome::Matched { waiting, .. } = e.handle(&req(2, 1), addr(B), 30) else {
        panic!("B's retransmit should match the new registration")
    };
    assert_eq!(waiting.to, addr("192.0.2.9:1"));
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
    assert_eq!(e.counters().refreshed, 1);
}

#[test]
fn expired_registration_does_not_match() {
    let mut e = engine(16);
    e.handle(&req(1, 2), addr(A), 0);
    assert_eq!(e.handle(&req(2, 1), addr(B), 1000), NEW);
    assert_eq!(e.counters().expired, 1);
    assert_eq!(e.pending(), 1);
}

#[test]
fn families_do_not_match_each_other() {
    let mut e = engine(16);
    e.handle(&req(1, 2), addr(A), 0);
    assert_eq!(e.handle(&req(2, 1), addr("[2001:db8::2]:5"), 0), NEW);
    assert_eq!(e.pending(), 2);
    // Both complete in their own family.
    assert!(e.handle(&req(1, 2), addr("[2001:db8::1]:5"), 1).is_match());
    assert!(e.handle(&req(2, 1), addr(B), 1).is_match());
}

#[test]
fn ipv6_matches_replay_and_free_their_records() {
    let mut e = engine(16);
    let (a, b) = (addr("[2001:db8::1]:7"), addr("[2001:db8:1::1]:8"));
    e.handle(&req(5, 6), a, 0);
    let Outcome::Matched {
        waiting,
        completing,
    } = e.handle(&req(6, 5), b, 1)
    else {
        panic!("no match")
    };
    assert_eq!((waiting.reply.peer, completing.reply.peer), (b, a));
    assert_eq!(e.handle(&req(5, 6), a, 2), Outcome::Replayed(waiting));
    assert_eq!(e.books.v6.held(), 1);
    e.expire(100);
    e.expire(600);
    e.expire(1200);
    assert_eq!(e.replay_entries(), 0);
    assert_eq!(e.books.v6.held(), 0);
}

#[test]
fn capacity_counts_waiting_and_remembered_pairs() {
    let mut e = engine(2);
    assert_eq!(e.handle(&req(1, 2), addr(A), 0), NEW);
    assert_eq!(e.handle(&req(3, 4), addr("[2001:db8::2]:5"), 0), NEW);
    // Without per-source counts there is no fairness: first come, first served.
    assert_eq!(
        e.handle(&req(5, 6), addr(A), 0),
        Outcome::Dropped(DropReason::TableFull)
    );
    // A refresh and a match still work when full.
    assert_eq!(e.handle(&req(1, 2), addr(A), 1), Outcome::Refreshed);
    assert!(e.handle(&req(2, 1), addr(B), 1).is_match());
    // The remembered match gives its slot to a new registration.
    assert_eq!(
        e.handle(&req(5, 6), addr(A), 2),
        Outcome::Registered {
            evicted: Some(Evicted::Replay {
                request: Some(Request::parse(&req(1, 2)).unwrap()),
                ipv6: false,
            })
        }
    );
    let c = e.counters();
    assert_eq!((c.table_full, c.replay_full), (1, 1));
}

/// Remembered matches give way once the table is crowded (three quarters of
/// the capacity), so that they never pack it full; waiting registrations
/// still fill it to the capacity.
#[test]
fn remembered_matches_give_way_before_the_table_fills() {
    let capacity = 64;
    let crowded = capacity - capacity / CROWDED_DEN;
    let from = |i: u32| SocketAddr::from(([10, 0, 0, i as u8], 1000));
    // Waiting registrations alone: all the way to the capacity.
    let mut e = engine(capacity);
    for i in 0..capacity as u32 {
        assert_eq!(e.handle(&req(2 * i + 1, 2 * i + 2), from(i), 0), NEW);
    }
    assert_eq!(
        e.handle(&req(1001, 1002), from(1), 0),
        Outcome::Dropped(DropReason::TableFull)
    );
    // Remembered matches: up to three quarters, then the oldest sampled one
    // gives its slot to each new registration.
    let mut e = engine(capacity);
    for i in 0..crowded as u32 {
        let (a, b) = (2 * i + 1, 2 * i + 2);
        assert_eq!(e.handle(&req(a, b), from(i), 0), NEW);
        assert!(e.handle(&req(b, a), addr(B), 0).is_match());
    }
    assert_eq!(e.replay_entries(), crowded);
    for k in 0..10u32 {
        let o = e.handle(&req(5001 + 2 * k, 5002 + 2 * k), from(k), 1);
        assert!(
            matches!(
                o,
                Outcome::Registered {
                    evicted: Some(Evicted::Replay { .. })
                }
            ),
            "{o:?}"
        );
    }
    assert_eq!(e.pending() + e.replay_entries(), crowded);
    assert_eq!(e.counters().replay_full, 10);
}

#[test]
fn bad_input_is_counted_and_dropped() {
    let mut e = engine(16);
    assert_eq!(
        e.handle(&[0; 7], addr(A), 0),
        Outcome::Dropped(DropReason::BadSize)
    );
    assert_eq!(
        e.handle(&req(3, 3), addr(A), 0),
        Outcome::Dropped(DropReason::SelfPair)
    );
    for bad in ["0.0.0.0:5", "192.0.2.1:0", "[::ffff:192.0.2.1]:5", "[::]:5"] {
        assert_eq!(
            e.handle(&req(3, 4), addr(bad), 0),
            Outcome::Dropped(DropReason::BadSource),
            "{bad}"
        );
    }
    let c = e.counters();
    assert_eq!((c.bad_size, c.self_pair, c.bad_source), (1, 1, 4));
    assert_eq!(c.received, 6);
    assert_eq!(e.pending(), 0);
}

#[test]
fn ports_are_distinct_and_in_range() {
    for (lo, hi) in [
        (1024u16, 1025u16),
        (1024, 1026),
        (1024, 1033),
        (1024, 1123),
        (1024, 65535),
        (65534, 65535),
    ] {
        let mut e = Engine::new(&EngineConfig {
            port_lo: lo,
            port_hi: hi,
            ..cfg(4)
        })
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            let (a, b) = e.pick_ports();
            assert_ne!(a, b);
            assert!((lo..=hi).contains(&a) && (lo..=hi).contains(&b));
            seen.insert((a, b));
        }
        // In a small range every ordered pair of distinct ports comes up
        // (each about 55 times in 5,000 draws for 10 ports).
        let span = usize::from(hi - lo) + 1;
        if span <= 10 {
            assert_eq!(seen.len(), span * (span - 1), "{lo}-{hi}");
        }
    }
}

#[test]
fn one_source_cannot_fill_the_table() {
    let mut e = Engine::new(&EngineConfig {
        capacity: 100,
        limits: SourceLimits {
            per_ip: 3,
            ..SourceLimits::default()
        },
        seed: Some(2),
        ..EngineConfig::default()
    })
    .unwrap();
    for i in 0..3 {
        assert_eq!(e.handle(&req(i, 1000 + i), addr(A), 0), NEW);
    }
    assert_eq!(
        e.handle(&req(9, 1009), addr("192.0.2.1:9999"), 0),
        Outcome::Dropped(DropReason::SourceLimit(Level::V4Host)),
        "another port of the same address is the same source"
    );
    assert_eq!(e.handle(&req(0, 1000), addr(A), 1), Outcome::Refreshed);
    assert_eq!(e.handle(&req(9, 1009), addr(B), 1), NEW);
    // A match frees a place.
    assert!(e.handle(&req(1000, 0), addr(B), 2).is_match());
    assert_eq!(e.handle(&req(7, 1007), addr(A), 3), NEW);
    assert_eq!(e.counters().per_ip_limit, 1);
    assert_eq!(e.wait().count(), 1);
}

#[test]
fn a_full_table_makes_room_for_a_lighter_source() {
    // One network fills the table; a newcomer from elsewhere takes the slot
    // of one of its registrations, and the network cannot take it back.
    let mut e = Engine::new(&EngineConfig {
        capacity: 64,
        limits: SourceLimits::default(),
        ..cfg(64)
    })
    .unwrap();
    for i in 0..64 {
        let a = addr(&format!("203.0.113.{}:1000", i % 4 + 1));
        assert_eq!(e.handle(&req(100 + i, 10_000 + i), a, 0), NEW);
    }
    let Outcome::Registered {
        evicted: Some(Evicted::Pending { from, request }),
    } = e.handle(&req(1, 2), addr(A), 1)
    else {
        panic!("the newcomer should have taken a slot")
    };
    assert!(from.to_string().starts_with("203.0.113."));
    assert!(request.is_some());
    assert_eq!(e.pending(), 64);
    assert_eq!(e.counters().evicted, 1);
    // A new address of the heavy network takes room only from its own
    // network (from its heaviest address), never the newcomer's slot.
    for k in 0..20 {
        let o = e.handle(&req(600 + k, 700 + k), addr("203.0.113.9:1"), 2);
        if let Outcome::Registered {
            evicted: Some(Evicted::Pending { from, .. }),
        } = o
        {
            assert!(from.to_string().starts_with("203.0.113."), "{from}");
        }
    }
    // The newcomer's pair completes.
    assert!(e.handle(&req(2, 1), addr(B), 3).is_match());
}

#[test]
fn equals_do_not_evict_each_other() {
    // Every source holds one: a newcomer would hold as much, so no slot is
    // taken (first come, first served among equals).
    let mut e = Engine::new(&EngineConfig {
        limits: SourceLimits::default(),
        ..cfg(8)
    })
    .unwrap();
    for i in 0..8u32 {
        let a = addr(&format!("10.{i}.0.1:1000"));
        assert_eq!(e.handle(&req(100 + i, 200 + i), a, 0), NEW);
    }
    assert_eq!(
        e.handle(&req(1, 2), addr(A), 1),
        Outcome::Dropped(DropReason::TableFull)
    );
}

#[test]
fn batch_outcomes_equal_one_by_one() {
    // Duplicates in one batch, a pair completed within the batch, and a
    // refresh and a match of the same key in one batch.
    let batch: Vec<([u8; 8], SocketAddr)> = vec![
        (req(1, 2), addr(A)),
        (req(1, 2), addr(A)),
        (req(2, 1), addr(B)),
        (req(2, 1), addr(B)),
        (req(3, 4), addr(A)),
        (req(3, 4), addr("192.0.2.1:7")),
        (req(4, 3), addr(B)),
        ([7; 8], addr(A)),
        (req(5, 6), addr("[2001:db8::1]:4")),
        (req(6, 5), addr("[2001:db8::2]:4")),
    ];
    let mut one = engine(64);
    let mut want = Vec::new();
    for (d, a) in &batch {
        match one.handle(d, *a, 5) {
            Outcome::Matched {
                waiting,
                completing,
            } => want.extend([waiting, completing]),
            Outcome::Replayed(t) => want.push(t),
            _ => {}
        }
    }
    let mut many = engine(64);
    let mut got = Vec::new();
    many.handle_batch(
        batch.len(),
        |k| Some((&batch[k].0[..], batch[k].1)),
        5,
        |_, o| match *o {
            Outcome::Matched {
                waiting,
                completing,
            } => got.extend([waiting, completing]),
            Outcome::Replayed(t) => got.push(t),
            _ => {}
        },
    );
    assert_eq!(got, want);
    assert_eq!(got.len(), 7);
    assert_eq!(one.counters(), many.counters());
}

#[test]
fn memory_is_checked_before_allocation() {
    for capacity in [0, MAX_CAPACITY + 1, usize::MAX] {
        assert!(matches!(
            Engine::new(&cfg(capacity)),
            Err(ConfigError::Capacity(_))
        ));
    }
    let e = ConfigError::Memory {
        capacity: MAX_CAPACITY,
        bytes: cfg(MAX_CAPACITY).memory(),
    };
    assert!(e.to_string().contains("84.6 GiB"), "{e}");
    let c = EngineConfig::default();
    let per_unit = c.memory().unwrap() as f64 / c.capacity as f64;
    assert!(per_unit < 64.0, "{per_unit} bytes per unit of capacity");
}

#[test]
fn a_source_prefix_can_be_given_its_own_limit() {
    let mut c = cfg(64);
    c.limits = SourceLimits {
        per_ip: 2,
        ..SourceLimits::OFF
    };
    let mut e = Engine::new(&c).unwrap();
    let host = source::prefixes(addr(A).ip()).0[0];
    assert_eq!(e.source_limit(host), Some(2));
    assert_eq!(e.handle(&req(1, 2), addr(A), 0), NEW);
    assert_eq!(e.handle(&req(3, 4), addr(A), 0), NEW);
    assert_eq!(e.source_held(host), 2);
    let refused = Outcome::Dropped(DropReason::SourceLimit(Level::V4Host));
    assert_eq!(e.handle(&req(5, 6), addr(A), 0), refused);
    // Raised here: one more fits, then the new limit holds.
    assert!(e.set_source_limit(host, Some(3)));
    assert_eq!(e.source_limit(host), Some(3));
    assert_eq!(e.handle(&req(5, 6), addr(A), 0), NEW);
    assert_eq!(e.handle(&req(7, 8), addr(A), 0), refused);
    // Lowered below what it holds: nothing new, nothing dropped; a refresh
    // and a match still work.
    assert!(e.set_source_limit(host, Some(0)));
    assert_eq!(e.handle(&req(9, 10), addr(A), 0), refused);
    assert_eq!(e.handle(&req(1, 2), addr(A), 1), Outcome::Refreshed);
    assert!(e.handle(&req(2, 1), addr(B), 2).is_match());
    assert_eq!(e.source_held(host), 2);
    // Back to the configured limit.
    assert!(e.set_source_limit(host, None));
    assert_eq!(e.source_limit(host), Some(2));
    assert_eq!(e.handle(&req(9, 10), addr(A), 3), refused);
    // Without per-source counting there is nothing to set.
    let mut off = engine(16);
    assert!(!off.set_source_limit(host, Some(1)));
    assert_eq!((off.source_held(host), off.source_limit(host)), (0, None));
}

/// Every way a registration is counted and leaves, in both families: a
/// match, a refresh from the same address and from another, a remembered
/// pair registered afresh from elsewhere, expiry found by a lookup and
/// expiry swept. Once all have left, every source counter is zero again (a
/// pending IPv4 slot uncounts by the counters' places it keeps; a wrong
/// place would leave one counter high and take one from another).
#[test]
fn source_counts_return_to_zero_whatever_way_registrations_leave() {
    let mut c = cfg(64);
    c.limits = SourceLimits::default();
    c.ipv6 = true;
    let mut e = Engine::new(&c).unwrap();
    let (a2, c4) = (addr("192.0.2.7:1000"), addr("203.0.113.9:3000"));
    let (v6a, v6b) = (addr("[2001:db8::1]:1000"), addr("[2001:db8:0:1::1]:1000"));
    assert_eq!(e.handle(&req(1, 2), addr(A), 0), NEW);
    assert_eq!(e.handle(&req(1, 2), addr(A), 1), Outcome::Refreshed);
    assert_eq!(e.handle(&req(1, 2), a2, 2), Outcome::Refreshed);
    assert!(e.handle(&req(2, 1), addr(B), 3).is_match());
    // The same request from elsewhere: pending afresh, then matched.
    assert_eq!(e.handle(&req(2, 1), c4, 4), NEW);
    assert!(e.handle(&req(1, 2), addr(A), 5).is_match());
    assert_eq!(e.handle(&req(5, 6), v6a, 5), NEW);
    assert_eq!(e.handle(&req(5, 6), v6b, 6), Outcome::Refreshed);
    assert!(e.handle(&req(6, 5), v6a, 7).is_match());
    assert_eq!(e.handle(&req(7, 8), v6b, 7), NEW);
    assert_eq!(e.handle(&req(9, 10), addr(A), 8), NEW);
    // Expired, found by its own lookup, registered again.
    assert_eq!(e.handle(&req(11, 12), a2, 8), NEW);
    assert_eq!(e.handle(&req(11, 12), c4, 2000), NEW);
    let sources = |e: &Engine| e.books.sources.as_ref().unwrap().is_zero();
    assert!(!sources(&e));
    let end = 10_000;
    while e.expire(end) {}
    assert_eq!((e.pending(), e.replay_entries()), (0, 0));
    assert!(sources(&e), "a source counter stayed above zero");
}

/// Sustained load well below what the table holds: the sweep must reclaim
/// expired matches about as fast as pairs come (a full pass per eighth of
/// the capacity in registrations), so the table never fills. (At the slow
/// pace alone, a quarter of the 30 s `--ttl`, the remembered matches piled
/// up to the table's capacity, packed the slots ahead of the sweep into one
/// cluster, and the server collapsed.)
#[test]
fn sustained_matches_are_reclaimed_as_fast_as_they_come() {
    let capacity = 1 << 14;
    let mut e = Engine::new(&EngineConfig {
        capacity,
        seed: Some(1),
        limits: SourceLimits::OFF,
        ..EngineConfig::default()
    })
    .unwrap();
    let replay = u64::from(EngineConfig::default().replay_ttl_ms);
    // 3 pairs every 2 ms: 1500 pairs/s, which live 5 s: 7500 slots, and at
    // most an eighth of the capacity more, expired and not yet reclaimed:
    // 58% of the capacity. (The slow pace alone lets 12.5 s of them pile up,
    // more than the capacity.)
    let per_sec = 1500u64;
    let bound = (per_sec * replay / 1000 + capacity as u64 / 8) * 11 / 10;
    let (mut most, mut next_expiry, mut id) = (0, 0, 1u32);
    for now in 0..60_000u64 {
        for _ in 0..(now % 2 + 1) {
            let (a, b) = (id, id + 1);
            id += 2;
            let [_, x, y, z] = a.to_be_bytes();
            let wait = SocketAddr::from(([10, x, y, z], 1000));
            let come = SocketAddr::from(([172, x, y, z], 1000));
            assert_eq!(
                e.handle(&req(a, b), wait, now),
                Outcome::Registered { evicted: None }
            );
            assert!(e.handle(&req(b, a), come, now).is_match());
        }
        if now >= next_expiry {
            let owed = e.expire(now);
            next_expiry = now + if owed { 1 } else { 10 };
        }
        most = most.max(e.counters().remembered);
    }
    let c = e.counters();
    assert_eq!(c.replay_full, 0, "{c:?}");
    assert!(
        most <= bound,
        "{most} matches held at once, more than {bound}"
    );
}

/// A run of 700 waiting pairs on one home, swept twice: the first sweep
/// removes its first entry and moves the 699 after it back (more than the
/// table's list of holes holds, so the list is compacted), the second
/// removes one in its middle. Every other pair must still be found (its
/// counterpart matches it) and every source count must come back to zero:
/// the engine-level effects of the table's long runs, which the random
/// property tests, at capacities under 9, never build. (With the holes list
/// left dirty by the first run, as before `b130969`, the second overwrote a
/// live entry.)
#[test]
fn long_runs_swept_twice_lose_no_pair_and_no_count() {
    let mut c = cfg(2048);
    c.limits = SourceLimits::default();
    let mut e = Engine::new(&c).unwrap();
    let home = |e: &Engine, a: u32, b: u32| {
        let r = Request::parse(&req(a, b)).unwrap();
        e.pairs.home_of(e.seed_key(&r, false).hash)
    };
    let h0 = home(&e, 1, 2);
    let ids: Vec<u32> = (0..)
        .map(|n: u32| 2 * n + 1)
        .filter(|&a| home(&e, a, a + 1) == h0)
        .take(700)
        .collect();
    // Each pair waits from an address of its own /24.
    let from = |i: usize| SocketAddr::from(([10, (i / 256) as u8, (i % 256) as u8, 1], 1000));
    let to = |i: usize| SocketAddr::from(([172, 16 + (i / 256) as u8, (i % 256) as u8, 1], 1000));
    for (i, &a) in ids.iter().enumerate() {
        assert_eq!(e.handle(&req(a, a + 1), from(i), 0), NEW);
    }
    // ttl 1000: the first pair expires at 1000, the middle one at 1500,
    // the others at 1900.
    for (i, &a) in ids.iter().enumerate() {
        if i != 0 {
            assert_eq!(e.handle(&req(a, a + 1), from(i), 500), Outcome::Refreshed);
        }
        if i != 0 && i != 350 {
            assert_eq!(e.handle(&req(a, a + 1), from(i), 900), Outcome::Refreshed);
        }
    }
    while e.expire(1001) {}
    assert_eq!(e.pending(), 699);
    while e.expire(1501) {}
    assert_eq!(e.pending(), 698);
    for (i, &a) in ids.iter().enumerate() {
        let got = e.handle(&req(a + 1, a), to(i), 1502);
        if i == 0 || i == 350 {
            assert_eq!(got, NEW, "pair {i} expired");
        } else {
            assert!(got.is_match(), "pair {i}: {got:?}");
        }
    }
    while e.expire(10_000) {}
    assert_eq!((e.pending(), e.replay_entries()), (0, 0));
    assert!(
        e.books.sources.as_ref().unwrap().is_zero(),
        "a source counter stayed above zero"
    );
}
