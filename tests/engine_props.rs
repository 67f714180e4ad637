//! Property tests of the matching engine, run in CI: the same properties as
//! the `engine` fuzz target (one oracle, `fuzz/common/engine_check.rs`, serves
//! both), over random configurations and random sequences of requests,
//! garbage, retransmits, clock steps and expiry turns.
//!
//! Checked after every step (see the oracle for the exact assertions):
//! - no panic; pairs held (waiting and remembered) never above capacity;
//! - an invalid datagram (wrong size, self-pair), a request from an unserved
//!   family, and one from a source that cannot be a peer are dropped with
//!   the right reason;
//! - every reply goes to an address that sent a valid request;
//! - a match pairs the newest live registration of the other side, in the
//!   same family; its two replies are complementary, the ports distinct,
//!   inside the configured range, and survive the wire format;
//! - a live counterpart is never missed, a live registration is refreshed
//!   and never refused; a new one is refused only at capacity or when the
//!   engine's estimate of one of its prefixes reached that level's limit
//!   (estimates are checked never to be below the live count), is never
//!   accepted over a limit, and takes a live pair's slot only when the table
//!   is full, saying whose;
//! - a retransmit from the same source within the replay lifetime gets the
//!   identical reply, unless the pair was registered afresh or its slot taken;
//! - the engine's counters agree with the outcomes it returned.
//!
//! And separately: the batch path gives, in order, exactly the outcomes and
//! counters of handling the same datagrams one by one.

use proptest::prelude::*;
use psync::engine::{DropReason, Evicted, Level, SourceLimits};
use psync::wire::v2;
use psync::{EngineConfig, Outcome};

#[path = "../fuzz/common/engine_check.rs"]
mod engine_check;

use engine_check::{request, source, v2_request, Checker, Op, SOURCES, V4_SOURCES};

const NEW: Outcome = Outcome::Registered { evicted: None };

/// Small, valid configurations: tiny tables so they fill, port ranges down
/// to two ports, one or both families, per-source limits of 1 to 3 or off at
/// each level.
fn config() -> impl Strategy<Value = EngineConfig> {
    (
        1usize..=8,
        1u32..=3000,
        1u32..=3000,
        (1u16..=65534).prop_flat_map(|lo| (Just(lo), prop_oneof![Just(lo + 1), lo + 1..=65535])),
        any::<u64>(),
        prop_oneof![Just((true, true)), Just((true, false)), Just((false, true))],
        prop_oneof![
            Just(SourceLimits::OFF),
            (0u32..=3, 0u32..=4, 0u32..=4, 0u32..=5).prop_map(|(per_ip, v4_24, v6_56, v6_48)| {
                SourceLimits {
                    per_ip,
                    v4_24,
                    v6_56,
                    v6_48,
                }
            }),
        ],
    )
        .prop_map(
            |(capacity, ttl_ms, replay_ttl_ms, (port_lo, port_hi), seed, (ipv4, ipv6), limits)| {
                EngineConfig {
                    capacity,
                    ttl_ms,
                    replay_ttl_ms,
                    port_lo,
                    port_hi,
                    seed: Some(seed),
                    ipv4,
                    ipv6,
                    limits,
                }
            },
        )
}

/// Clock steps: often none, usually short, sometimes past every lifetime.
fn dt() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(0u64), 6 => 0u64..300, 1 => 0u64..10_000]
}

/// An admitted v2 request among four 64-bit IDs (two of them equal to seed
/// IDs in their low bytes, so a v2 pair and a seed pair look alike), with
/// any client info and up to four candidates.
fn v2_op() -> impl Strategy<Value = Op> {
    const IDS: [u64; 4] = [0, 1, 1 << 32 | 1, u64::MAX];
    (
        0usize..4,
        0usize..4,
        any::<u8>(),
        0usize..=4,
        0..SOURCES.len(),
        dt(),
    )
        .prop_map(|(a, b, info, n, src, dt)| {
            let list: Vec<v2::Candidate> = (0..n)
                .map(|i| v2::Candidate {
                    kind: v2::CandidateKind(i as u8),
                    addr: source((src + i) % 5),
                })
                .collect();
            let candidates = v2::Candidates::from_slice(&list).expect("at most four");
            Op::V2 {
                request: v2_request(v2::Pair::new(IDS[a], IDS[b]), info, candidates),
                src,
                dt,
            }
        })
}

/// Mostly requests among four IDs (so pairs match, collide and self-pair),
/// seed and v2, some garbage of every length class, retransmits and expiry
/// turns.
fn op() -> impl Strategy<Value = Op> {
    let src = 0..SOURCES.len();
    prop_oneof![
        10 => (0u32..4, 0u32..4, src.clone(), dt())
            .prop_map(|(a, b, src, dt)| Op::Datagram { datagram: request(a, b), src, dt }),
        5 => v2_op(),
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
            // Sources that can be peers: 0..5 are IPv4, 6..10 IPv6.
            (0..5usize, 0..5usize),
            (6..10usize, 6..10usize),
        ],
        gap in 0u64..1000,
        later in 0u64..3000,
    ) {
        let v4 = source(wsrc).is_ipv4();
        // The pair's family is served and its sources may register.
        let cfg = EngineConfig {
            ipv4: cfg.ipv4 || v4,
            ipv6: cfg.ipv6 || !v4,
            limits: SourceLimits::OFF,
            ..cfg
        };
        let mut checker = Checker::new(&cfg, start);
        let gap = gap % u64::from(cfg.ttl_ms);
        prop_assert_eq!(checker.handle(&request(a, b), source(wsrc)), NEW);
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
        prop_assert_eq!(checker.engine.counters().matched, 1);
    }
}

proptest! {
    // An eighth of the cases: each is up to 12 batches of up to 300.
    #![proptest_config(ProptestConfig::with_cases(cases().div_ceil(8)))]

    /// The batch path ([`psync::Engine::handle_batch`], which classifies and
    /// fetches ahead before it handles) gives exactly the outcomes, in
    /// order, and the counters of handling the same datagrams one by one:
    /// over random batches (up to 300 datagrams, so several scratch chunks)
    /// of requests among four IDs from every source, garbage, duplicates in
    /// one batch, pairs completed within their batch, and expiry turns
    /// between batches.
    #[test]
    fn batches_agree_with_one_by_one(
        cfg in config(),
        start in start(),
        batches in proptest::collection::vec(
            (
                proptest::collection::vec(
                    prop_oneof![
                        8 => (0u32..4, 0u32..4).prop_map(|(a, b)| request(a, b)),
                        1 => proptest::collection::vec(any::<u8>(), 0..12),
                    ]
                    .prop_flat_map(|d| (Just(d), 0..SOURCES.len())),
                    0..300,
                ),
                dt(),
            ),
            1..12,
        ),
    ) {
        let mut one = psync::Engine::new(&cfg).unwrap();
        let mut many = psync::Engine::new(&cfg).unwrap();
        let mut now = start;
        for (batch, dt) in &batches {
            now += dt;
            let mut want = Vec::new();
            for (d, src) in batch {
                want.push(one.handle(d, source(*src), now));
            }
            let mut got = Vec::new();
            many.handle_batch(
                batch.len(),
                |k| Some((&batch[k].0[..], source(batch[k].1))),
                now,
                |k, o| got.push((k, *o)),
            );
            let got_outcomes: Vec<Outcome> = got.iter().map(|(_, o)| *o).collect();
            prop_assert!(got.iter().enumerate().all(|(i, (k, _))| i == *k));
            prop_assert_eq!(got_outcomes, want);
            prop_assert_eq!(one.expire(now), many.expire(now));
        }
        prop_assert_eq!(one.counters(), many.counters());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// The lean path (IPv4 seed requests in their common cases, on the
    /// slot's raw bytes) gives exactly the outcomes, counters, source
    /// estimates and waiting times of the general path it stands in for:
    /// two engines, one with the lean path off, handle the same run of
    /// requests among four IDs from every source (registrations, refreshes
    /// from the same and another address, matches, replays, restarts from
    /// another address, expired entries, full tables, refusals at each
    /// limit, and prefixes with limits of their own), some relayed by a
    /// cluster member, garbage, clock steps and expiry turns.
    #[test]
    fn lean_path_agrees_with_general(
        cfg in config(),
        start in start(),
        steps in proptest::collection::vec(
            (
                prop_oneof![
                    12 => (0u32..4, 0u32..4).prop_map(|(a, b)| Some(request(a, b))),
                    1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Some),
                    1 => Just(None),
                ],
                0..SOURCES.len(),
                prop_oneof![6 => Just(0u8), 1 => 1u8..=2],
                dt(),
                prop_oneof![
                    20 => Just(None),
                    1 => (0usize..2, prop_oneof![Just(None), (0u32..=2).prop_map(Some)])
                        .prop_map(Some),
                ],
            ),
            1..400,
        ),
    ) {
        let mut lean = psync::Engine::new(&cfg).unwrap();
        let mut general = psync::Engine::new(&cfg).unwrap();
        general.general_path_only();
        let mut now = start;
        for (datagram, src, via, dt, own_limit) in &steps {
            now += dt;
            // Now and then a prefix of the source gets a limit of its own
            // (or back its level's), as a server's workers do: the lean
            // path then leaves registrations to the general one.
            if let Some((level, limit)) = own_limit {
                let (ps, n) = psync::engine::source::prefixes(source(*src).ip());
                let p = ps[(*level).min(n - 1)];
                prop_assert_eq!(lean.set_source_limit(p, *limit), general.set_source_limit(p, *limit));
            }
            match (datagram, via) {
                (Some(d), 0) => prop_assert_eq!(
                    lean.handle(d, source(*src), now),
                    general.handle(d, source(*src), now)
                ),
                // Relayed by a cluster member: always the general path, but
                // it leaves relays in slots that the lean path then meets.
                (Some(d), via) => prop_assert_eq!(
                    lean.handle_relayed(d, source(*src), *via, now),
                    general.handle_relayed(d, source(*src), *via, now)
                ),
                (None, _) => prop_assert_eq!(lean.expire(now), general.expire(now)),
            }
            prop_assert_eq!(lean.counters(), general.counters());
            prop_assert_eq!(
                lean.source_estimate(source(*src).ip()),
                general.source_estimate(source(*src).ip())
            );
        }
        prop_assert_eq!(
            lean.wait().buckets().collect::<Vec<_>>(),
            general.wait().buckets().collect::<Vec<_>>()
        );
    }
}

/// Names one case of [`random_runs_exercise_matches_replays_and_full_tables`]
/// to replay: the seed its failure printed.
const SEED_VAR: &str = "PSYNC_PROPS_SEED";

/// The cases of the random runs: a configuration, a start and a run of 100
/// to 300 ops.
fn random_case() -> impl Strategy<Value = (EngineConfig, u64, Vec<Op>)> {
    (config(), start(), proptest::collection::vec(op(), 100..300))
}

/// The case that `seed` names, as a proptest value tree (so it can shrink).
fn case_tree(
    seed: u64,
) -> impl proptest::strategy::ValueTree<Value = (EngineConfig, u64, Vec<Op>)> {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    random_case().new_tree(&mut runner).unwrap()
}

/// Runs one case; the oracle's panic message if it failed.
fn failure(cfg: &EngineConfig, start: u64, ops: &[Op]) -> Option<String> {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Checker::new(cfg, start).run(ops);
    }));
    let e = run.err()?;
    Some(
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    )
}

/// The smallest run that still fails like `seed`'s case (with the same
/// message up to its first digit, so that shrinking does not wander to
/// another failure): proptest's shrinking, then dropping ops one at a time
/// below the strategy's minimum length.
fn shrink(seed: u64) -> Option<(EngineConfig, u64, Vec<Op>, String)> {
    use proptest::strategy::ValueTree;
    let kind = |m: &str| {
        m.split(|c: char| c.is_ascii_digit())
            .next()
            .unwrap_or("")
            .to_string()
    };
    let mut tree = case_tree(seed);
    let (cfg, start, ops) = tree.current();
    let first = failure(&cfg, start, &ops)?;
    let same = |c: &(EngineConfig, u64, Vec<Op>)| {
        failure(&c.0, c.1, &c.2).filter(|m| kind(m) == kind(&first))
    };
    let mut best = (tree.current(), first.clone());
    if tree.simplify() {
        loop {
            let c = tree.current();
            if let Some(m) = same(&c) {
                best = (c, m);
                if !tree.simplify() {
                    break;
                }
            } else if !tree.complicate() {
                break;
            }
        }
    }
    let ((cfg, start, mut ops), mut message) = best;
    let mut i = 0;
    while i < ops.len() {
        let mut fewer = ops.clone();
        fewer.remove(i);
        match same(&(cfg.clone(), start, fewer.clone())) {
            Some(m) => (ops, message) = (fewer, m),
            None => i += 1,
        }
    }
    Some((cfg, start, ops, message))
}

/// The random runs do reach the interesting states: matches, replays, full
/// tables, wrong sizes. A generator that silently stopped producing them
/// would leave the properties above unexercised.
///
/// Each of its 200 cases comes from its own seed (consecutive from a random
/// base), which a failure prints; `PSYNC_PROPS_SEED=<seed>` runs that case
/// alone, shrinks it to the fewest ops that still fail the same way and
/// prints them.
#[test]
fn random_runs_exercise_matches_replays_and_full_tables() {
    use proptest::strategy::ValueTree;
    use std::hash::{BuildHasher, Hasher};

    assert!((0..SOURCES.len()).all(|i| source(i).is_ipv4() == (i < V4_SOURCES)));
    if let Ok(seed) = std::env::var(SEED_VAR) {
        let seed: u64 = seed
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={seed:?} is not a u64"));
        // Quiet while shrinking: every try that fails panics.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let small = shrink(seed);
        std::panic::set_hook(hook);
        let Some((cfg, start, ops, message)) = small else {
            eprintln!("{SEED_VAR}={seed}: the case passes");
            return;
        };
        eprintln!("{SEED_VAR}={seed} fails with {message:?}; shrunk to");
        eprintln!("cfg: {cfg:?}\nstart: {start}\n{} ops:", ops.len());
        for op in &ops {
            eprintln!("  {op:?}");
        }
        // The smallest case again, failing the test with the oracle's
        // message.
        Checker::new(&cfg, start).run(&ops);
        unreachable!("the shrunk case passed the second time");
    }
    let base = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let (mut matches, mut replays, mut full, mut bad) = (0, 0, 0, 0);
    let (mut evictions, mut limited, mut bogus, mut v2_matches) = (0, 0, 0, 0);
    for i in 0..200 {
        let seed = base.wrapping_add(i);
        let (cfg, start, ops) = case_tree(seed).current();
        let mut checker = Checker::new(&cfg, start);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker.run(&ops)));
        if let Err(e) = run {
            eprintln!("failed case: {SEED_VAR}={seed} replays it alone and shrinks it");
            std::panic::resume_unwind(e);
        }
        matches += checker.matches;
        v2_matches += checker.v2_matches;
        replays += checker.replays_checked;
        let c = checker.engine.counters();
        full += c.table_full;
        bad += c.bad_size;
        evictions += checker.evictions;
        limited += c.per_ip_limit + c.per_prefix_limit;
        bogus += c.bad_source;
    }
    assert!(matches > 100, "only {matches} matches");
    assert!(v2_matches > 30, "only {v2_matches} v2 matches");
    assert!(evictions > 10, "only {evictions} slots taken");
    assert!(limited > 10, "only {limited} source-limit drops");
    assert!(bogus > 10, "only {bogus} bad sources");
    assert!(replays > 100, "only {replays} replays checked");
    assert!(full > 10, "only {full} table_full drops");
    assert!(bad > 100, "only {bad} bad sizes");
}

/// Regression: the per-source limit must still hold after other sources came
/// and went (the first design's window table lost count of new sources).
#[test]
fn per_source_limit_holds_after_many_sources() {
    let cfg = EngineConfig {
        capacity: 2,
        limits: SourceLimits {
            per_ip: 1,
            ..SourceLimits::OFF
        },
        seed: Some(1),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, 0);
    let (a, b, c) = (source(0), source(3), source(4));
    assert_eq!(checker.handle(&request(1, 2), a), NEW);
    assert!(matches!(
        checker.handle(&request(2, 1), b),
        Outcome::Matched { .. }
    ));
    assert!(matches!(
        checker.handle(&request(3, 4), b),
        Outcome::Registered { .. }
    ));
    assert!(matches!(
        checker.handle(&request(5, 6), c),
        Outcome::Registered { .. }
    ));
    assert!(matches!(
        checker.handle(&request(4, 3), a),
        Outcome::Matched { .. }
    ));
    // `c` holds one registration, its maximum: a second is refused (the
    // checker also asserts that the engine never accepts it).
    assert_eq!(
        checker.handle(&request(7, 8), c),
        Outcome::Dropped(DropReason::SourceLimit(Level::V4Host))
    );
}

/// The per-source limit holds across the engine's 32-bit millisecond clock
/// wrap (every 49.7 days of uptime).
#[test]
fn per_source_limit_holds_across_the_clock_wrap() {
    let cfg = EngineConfig {
        capacity: 16,
        ttl_ms: 1343,
        limits: SourceLimits {
            per_ip: 2,
            ..SourceLimits::OFF
        },
        seed: Some(0),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, u64::from(u32::MAX) - 96);
    let a = source(6);
    assert_eq!(checker.handle(&request(2, 0), a), NEW);
    assert_eq!(checker.handle(&request(2, 1), a), NEW);
    checker.step(&Op::Expire { dt: 97 });
    assert_eq!(
        checker.handle(&request(0, 1), a),
        Outcome::Dropped(DropReason::SourceLimit(Level::V6Net64))
    );
}

/// An expired registration stops counting against its source once the
/// sweep has reclaimed it: within a sweep period (a quarter of `--ttl` while
/// the table is not crowded; see the engine's `Pace`) of expiry turns.
#[test]
fn per_source_limit_forgets_expired_registrations() {
    let cfg = EngineConfig {
        capacity: 16,
        limits: SourceLimits {
            per_ip: 2,
            ..SourceLimits::OFF
        },
        seed: Some(1),
        ..EngineConfig::default()
    };
    let ttl = u64::from(cfg.ttl_ms);
    let mut checker = Checker::new(&cfg, 0);
    let a = source(0);
    assert_eq!(checker.handle(&request(1, 2), a), NEW);
    assert_eq!(checker.handle(&request(3, 4), a), NEW);
    checker.step(&Op::Expire { dt: ttl });
    let period = u64::from(cfg.ttl_ms / 4);
    for _ in 0..period / 10 + 1 {
        checker.step(&Op::Expire { dt: 10 });
    }
    assert_eq!(checker.handle(&request(5, 6), a), NEW);
}

/// Fair admission: one network holding the whole table gives way to a
/// newcomer from another, one slot per newcomer, and the newcomers' pairs
/// complete.
#[test]
fn a_full_table_admits_lighter_sources() {
    let cfg = EngineConfig {
        capacity: 6,
        limits: SourceLimits::default(),
        seed: Some(3),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, 0);
    // 192.0.2.0/24 (sources 0..=2) fills the table.
    for i in 0..6 {
        assert_eq!(
            checker.handle(&request(100 + i, 200 + i), source(i as usize % 3)),
            NEW
        );
    }
    let o = checker.handle(&request(1, 2), source(3));
    assert!(
        matches!(o, Outcome::Registered { evicted: Some(_) }),
        "{o:?}"
    );
    assert!(matches!(
        checker.handle(&request(2, 1), source(4)),
        Outcome::Matched { .. } | Outcome::Registered { .. }
    ));
}

/// Regression (about one run of the test (200 random cases) in 200 to 400 failed): a v2 registration's
/// eviction names only its source, so when that source had several waiting
/// the model keeps them all as maybe gone; a later eviction from the same
/// source may take one of those rather than the one registration the model
/// still counts as sure. Found by `PSYNC_PROPS_SEED=8306722168239749744`.
#[test]
fn an_eviction_may_take_a_registration_already_maybe_gone() {
    let cfg = EngineConfig {
        capacity: 3,
        limits: SourceLimits::default(),
        seed: Some(1),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, 0);
    let v2 = |a: u64, b: u64| v2_request(v2::Pair::new(a, b), 0, v2::Candidates::EMPTY);
    // 192.0.2.77:7 waits in three v2 pairs and fills the table.
    let (heavy, light, other) = (source(2), source(3), source(4));
    // (10 ms apart: the oldest of a source's registrations gives way first.)
    for peer in [10, 11, 12] {
        checker.step(&Op::Expire { dt: 10 });
        assert_eq!(
            checker.handle_v2(&v2(1, peer), heavy),
            Outcome::Registered { evicted: None }
        );
    }
    // A lighter source takes the oldest's slot; the outcome says only
    // "a v2 registration from 192.0.2.77:7", so the model is unsure of all
    // three.
    assert!(matches!(
        checker.handle(&request(2, 3), light),
        Outcome::Registered {
            evicted: Some(Evicted::Pending { request: None, .. })
        }
    ));
    // That pair matches; the next v2 registration from the heavy source
    // takes the remembered match's slot (the table is crowded).
    assert!(matches!(
        checker.handle(&request(3, 2), other),
        Outcome::Matched { .. }
    ));
    checker.step(&Op::Expire { dt: 10 });
    assert!(matches!(
        checker.handle_v2(&v2(1, 13), heavy),
        Outcome::Registered {
            evicted: Some(Evicted::Replay { .. })
        }
    ));
    // Full again: the lighter source takes the heavy source's oldest slot,
    // one of the two left of the first three, not the newest (1, 13).
    assert!(matches!(
        checker.handle(&request(4, 5), light),
        Outcome::Registered {
            evicted: Some(Evicted::Pending { request: None, .. })
        }
    ));
    // (1, 13) still waits, and matches.
    assert!(matches!(
        checker.handle_v2(&v2(13, 1), other),
        Outcome::Matched { .. }
    ));
}

/// Regression, the same for remembered matches: a v2 match's eviction names
/// only its family, and a later one may take a match the model keeps as
/// maybe gone rather than the one it is sure of, whose retransmit is then
/// still replayed. Found by `PSYNC_PROPS_SEED=2406207883043360810`.
#[test]
fn a_replay_eviction_may_take_a_match_already_maybe_gone() {
    let cfg = EngineConfig {
        capacity: 4,
        limits: SourceLimits::OFF,
        seed: Some(1),
        ..EngineConfig::default()
    };
    let mut checker = Checker::new(&cfg, 0);
    let v2 = |a: u64, b: u64| v2_request(v2::Pair::new(a, b), 0, v2::Candidates::EMPTY);
    let (a, b) = (source(0), source(3));
    // Matches 10 ms apart, so that the oldest remembered one gives way first.
    let pair = |checker: &mut Checker, id: u64| {
        checker.step(&Op::Expire { dt: 10 });
        assert!(matches!(
            checker.handle_v2(&v2(id, id + 100), a),
            Outcome::Registered { .. }
        ));
        assert!(matches!(
            checker.handle_v2(&v2(id + 100, id), b),
            Outcome::Matched { .. }
        ));
    };
    for id in 1..=3 {
        pair(&mut checker, id);
    }
    // Three quarters held, all remembered: a new registration takes the
    // oldest match's slot, and the outcome says only "a v2 match", so the
    // model is unsure of all three.
    let crowded = Outcome::Registered {
        evicted: Some(Evicted::Replay {
            request: None,
            ipv6: false,
        }),
    };
    assert_eq!(checker.handle(&request(7, 8), a), crowded);
    // A fourth v2 match (its registration takes the second's slot), then
    // another registration takes the third's, not the fourth's.
    pair(&mut checker, 4);
    assert_eq!(checker.handle(&request(9, 8), a), crowded);
    // The fourth is still remembered: its completer's retransmit is replayed.
    assert!(matches!(
        checker.handle_v2(&v2(104, 4), b),
        Outcome::Replayed(_)
    ));
}
