//! Property tests of the matching engine, run in CI: the same properties as
//! the `engine` fuzz target (one oracle, `fuzz/common/engine_check.rs`, serves
//! both), over random configurations and random sequences of requests,
//! garbage, retransmits, clock steps and expiry turns.
//!
//! Checked after every step (see the oracle for the exact assertions):
//! - no panic; pending registrations never above capacity;
//! - an invalid datagram (wrong size, self-pair) is `Outcome::Dropped` with
//!   the right reason, and a request from an unserved family too;
//! - every reply goes to an address that sent a valid request;
//! - a match pairs the newest live registration of the counterpart, in the
//!   same family; its two replies are complementary (each is told the other's
//!   address, `waiting.src == completing.dst` and the reverse), the ports are
//!   distinct, inside the configured range, and survive the wire format;
//! - a live counterpart is never missed, a live registration is refreshed and
//!   never refused for room, a new one is refused only at capacity or when
//!   its source (IPv4 address, IPv6 /64) made at least `max_pending_per_source`
//!   registrations within the last two lifetimes (so an expired registration
//!   stops counting within one more lifetime), and is never accepted from a
//!   source that already holds that many live ones;
//! - a retransmit from the same source within the replay lifetime gets the
//!   identical reply;
//! - the engine's counters agree with the outcomes it returned.

use proptest::prelude::*;
use psync::wire::PeerId;
use psync::{EngineConfig, Outcome, Request};

#[path = "../fuzz/common/engine_check.rs"]
mod engine_check;

use engine_check::{source, Checker, Op, SOURCES};

/// `SOURCES[..V4_SOURCES]` are IPv4, the rest IPv6.
const V4_SOURCES: usize = 5;

fn request(a: u32, b: u32) -> Vec<u8> {
    Request {
        self_id: PeerId::from_u32(a),
        peer_id: PeerId::from_u32(b),
    }
    .emit()
    .to_vec()
}

/// Small, valid configurations: tiny tables so they fill, port ranges down
/// to two ports, one or both families, a per-source limit of 1 to 3 or off,
/// and sometimes a replay cache too small to remember every match.
fn config() -> impl Strategy<Value = EngineConfig> {
    (
        1usize..=8,
        prop_oneof![1usize..=4, Just(4096)],
        1u32..=3000,
        1u32..=3000,
        (1u16..=65534).prop_flat_map(|lo| (Just(lo), prop_oneof![Just(lo + 1), lo + 1..=65535])),
        any::<u64>(),
        prop_oneof![Just((true, true)), Just((true, false)), Just((false, true))],
        0u32..=3,
    )
        .prop_map(
            |(
                capacity,
                replay_capacity,
                ttl_ms,
                replay_ttl_ms,
                (port_lo, port_hi),
                seed,
                (ipv4, ipv6),
                max_pending_per_source,
            )| {
                EngineConfig {
                    capacity,
                    replay_capacity,
                    ttl_ms,
                    replay_ttl_ms,
                    port_lo,
                    port_hi,
                    seed: Some(seed),
                    ipv4,
                    ipv6,
                    max_pending_per_source,
                }
            },
        )
}

/// Clock steps: often none, usually short, sometimes past every lifetime.
fn dt() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(0u64), 6 => 0u64..300, 1 => 0u64..10_000]
}

/// Mostly requests among four IDs (so pairs match, collide and self-pair),
/// some garbage of every length class, retransmits and expiry turns.
fn op() -> impl Strategy<Value = Op> {
    let src = 0..SOURCES.len();
    prop_oneof![
        10 => (0u32..4, 0u32..4, src.clone(), dt())
            .prop_map(|(a, b, src, dt)| Op::Datagram { datagram: request(a, b), src, dt }),
        2 => (proptest::collection::vec(any::<u8>(), 0..40), src.clone(), dt())
            .prop_map(|(datagram, src, dt)| Op::Datagram { datagram, src, dt }),
        1 => (proptest::collection::vec(any::<u8>(), 8), src, dt())
            .prop_map(|(datagram, src, dt)| Op::Datagram { datagram, src, dt }),
        3 => (any::<bool>(), dt()).prop_map(|(waiter, dt)| Op::Retransmit { waiter, dt }),
        1 => dt().prop_map(|dt| Op::Expire { dt }),
    ]
}

/// Where the clock starts: zero, just below the 32-bit wrap, or anywhere.
fn start() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        (0u64..10_000).prop_map(|d| u64::from(u32::MAX) - d),
        any::<u32>().prop_map(u64::from),
    ]
}

/// Cases per property: 512 in CI (about a second in a debug build), more
/// with `PROPTEST_CASES=N` for a longer search.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Every property of the oracle, after every step of a random run.
    #[test]
    fn engine_agrees_with_model(
        cfg in config(),
        start in start(),
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        let mut checker = Checker::new(&cfg, start);
        checker.run(&ops);
    }

    /// A pair made from any two served sources, then each side retransmitting
    /// within the replay lifetime: both get their first reply again, byte for
    /// byte, and nothing else changes.
    #[test]
    fn retransmit_after_match_gets_identical_reply(
        cfg in config(),
        start in start(),
        (a, b) in (any::<u32>(), any::<u32>()).prop_filter("distinct IDs", |(a, b)| a != b),
        (wsrc, csrc) in prop_oneof![
            (0..V4_SOURCES, 0..V4_SOURCES),
            (V4_SOURCES..SOURCES.len(), V4_SOURCES..SOURCES.len()),
        ],
        gap in 0u64..1000,
        later in 0u64..3000,
    ) {
        let v4 = source(wsrc).is_ipv4();
        // The pair's family is served; each match takes two replay entries,
        // so a one-slot replay cache could remember only one side.
        let cfg = EngineConfig {
            replay_capacity: cfg.replay_capacity.max(2),
            ipv4: cfg.ipv4 || v4,
            ipv6: cfg.ipv6 || !v4,
            ..cfg
        };
        let mut checker = Checker::new(&cfg, start);
        let gap = gap % u64::from(cfg.ttl_ms);
        prop_assert_eq!(checker.handle(&request(a, b), source(wsrc)), Outcome::Registered);
        checker.step(&Op::Expire { dt: gap });
        let Outcome::Matched { waiting, completing } = checker.handle(&request(b, a), source(csrc))
        else {
            panic!("no match within the ttl");
        };
        let later = later % u64::from(cfg.replay_ttl_ms);
        checker.step(&Op::Expire { dt: later });
        prop_assert_eq!(checker.handle(&request(a, b), source(wsrc)), Outcome::Replayed(waiting));
        prop_assert_eq!(checker.handle(&request(b, a), source(csrc)), Outcome::Replayed(completing));
        prop_assert_eq!(checker.engine.pending(), 0);
        prop_assert_eq!(checker.engine.counters.matched, 1);
    }
}

/// The random runs do reach the interesting states: matches, identical
/// replays, full tables, wrong sizes. A generator that silently stopped
/// producing them would leave the properties above unexercised.
#[test]
fn random_runs_exercise_matches_replays_and_full_tables() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    assert!((0..SOURCES.len()).all(|i| source(i).is_ipv4() == (i < V4_SOURCES)));
    let mut runner = TestRunner::new(Config::default());
    let (mut matches, mut replays, mut full, mut bad) = (0, 0, 0, 0);
    for _ in 0..200 {
        let cfg = config().new_tree(&mut runner).unwrap().current();
        let start = start().new_tree(&mut runner).unwrap().current();
        let ops = proptest::collection::vec(op(), 100..300)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut checker = Checker::new(&cfg, start);
        checker.run(&ops);
        matches += checker.matches;
        replays += checker.replays_checked;
        full += checker.engine.counters.table_full;
        bad += checker.engine.counters.bad_size;
    }
    assert!(matches > 100, "only {matches} matches");
    assert!(replays > 100, "only {replays} replays checked");
    assert!(full > 10, "only {full} table_full drops");
    assert!(bad > 100, "only {bad} bad sizes");
}

/// Regression: the per-source limit must still hold after other sources came
/// and went. With a window table no larger than the pending capacity, and
/// windows outliving the registrations they counted, a new source's window
/// could not be stored and its registrations went uncounted.
#[test]
fn per_source_limit_holds_after_many_sources() {
    let cfg = EngineConfig {
        capacity: 2,
        max_pending_per_source: 1,
        seed: Some(1),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, 0);
    let (a, b, c) = (source(0), source(2), source(3));
    assert_eq!(checker.handle(&request(1, 2), a), Outcome::Registered);
    assert!(matches!(
        checker.handle(&request(2, 1), b),
        Outcome::Matched { .. }
    ));
    assert_eq!(checker.handle(&request(3, 4), b), Outcome::Registered);
    assert_eq!(checker.handle(&request(5, 6), c), Outcome::Registered);
    assert!(matches!(
        checker.handle(&request(4, 3), a),
        Outcome::Matched { .. }
    ));
    // `c` holds one registration, its maximum: a second is refused (the
    // checker also asserts that the engine never accepts it).
    assert_eq!(
        checker.handle(&request(7, 8), c),
        Outcome::Dropped(psync::engine::Drop::PerSourceLimit)
    );
}

/// Regression: the per-source limit must hold across the engine's 32-bit
/// millisecond clock wrap (every 49.7 days of uptime). Window slots were
/// numbered `now / slot_ms`, which jumps back to 0 at the wrap, so every
/// source's count was forgotten there.
#[test]
fn per_source_limit_holds_across_the_clock_wrap() {
    let cfg = EngineConfig {
        capacity: 16,
        ttl_ms: 1343,
        max_pending_per_source: 2,
        seed: Some(0),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, u64::from(u32::MAX) - 96);
    let a = source(5);
    assert_eq!(checker.handle(&request(2, 0), a), Outcome::Registered);
    assert_eq!(checker.handle(&request(2, 1), a), Outcome::Registered);
    checker.step(&Op::Expire { dt: 97 });
    assert_eq!(
        checker.handle(&request(0, 1), a),
        Outcome::Dropped(psync::engine::Drop::PerSourceLimit)
    );
}

/// Regression: an expired registration stops counting against its source
/// within one more lifetime. With power-of-two slots the eight-slot window
/// could span more than twice the lifetime, and a window kept alive by a
/// newer registration went on counting one that had expired a lifetime ago.
#[test]
fn per_source_limit_forgets_expired_registrations() {
    let cfg = EngineConfig {
        capacity: 16,
        max_pending_per_source: 2,
        seed: Some(1),
        ..EngineConfig::default()
    };
    let ttl = u64::from(cfg.ttl_ms);
    let mut checker = Checker::new(&cfg, 0);
    let a = source(0);
    assert_eq!(checker.handle(&request(1, 2), a), Outcome::Registered);
    checker.step(&Op::Expire { dt: ttl });
    assert_eq!(checker.handle(&request(3, 4), a), Outcome::Registered);
    // The first expired a whole lifetime ago (plus a second): `a` holds one
    // live registration of its two.
    checker.step(&Op::Expire { dt: ttl + 1000 });
    assert_eq!(checker.handle(&request(5, 6), a), Outcome::Registered);
}
