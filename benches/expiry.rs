//! Incremental expiry: what one loop turn costs while a million pending
//! entries expire at once, and the worst single turn.
//!
//! The engine with its defaults: room for 2^20 pairs, a 30 s registration
//! lifetime, a 5 s replay lifetime, per-source counts on; with the table more
//! than three quarters full, a sweep period of 1.25 s (a quarter of the
//! shorter lifetime). It holds 10^6 registrations from
//! 10^6 IPv4 addresses, made at the same instant; the loop has been calling
//! [`Engine::expire`] every 10 ms (as the server's expiry tick does) while
//! they lived, and then all of them expire together, each one uncounted from
//! its source as it is reclaimed. Each turn
//! is timed on its own with `Instant`; Criterion reports the mean, and the
//! bench prints the worst turn (see [`worst_turn`] for how preemption by
//! other processes is kept out of it) and a percentile or two.
//!
//! Two cadences:
//! - `tick`: the server's: the next turn 10 ms later, or 1 ms later when
//!   the table says it still owes work;
//! - `budget`: every turn owes more than [`MAX_SWEEP_PER_CALL`] slots (a
//!   loop that fell behind), so each one does the most one turn may.
//!
//! Run with `cargo bench --bench expiry`.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use psync::engine::MAX_SWEEP_PER_CALL;
use psync::{Engine, EngineConfig, PeerId, Request};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

type Millis = u64;

const CAPACITY: usize = 1 << 20;
const ENTRIES: usize = 1_000_000;
const TTL: Millis = 30_000;
/// A quarter of the shorter lifetime (the 5 s replay lifetime): the engine's
/// pace while its table is more than three quarters full, as here.
const SWEEP_PERIOD: Millis = 1_250;
/// The server's expiry tick.
const TICK: Millis = 10;

#[derive(Clone, Copy, Debug)]
enum Cadence {
    Tick,
    Budget,
}

impl Cadence {
    fn name(self) -> &'static str {
        match self {
            Cadence::Tick => "tick",
            Cadence::Budget => "budget",
        }
    }
    /// Milliseconds until the next turn, given what the last one returned.
    fn step(self, owed: bool) -> Millis {
        match self {
            Cadence::Tick if owed => 1,
            Cadence::Tick => TICK,
            // A full sweep period: the table owes a whole pass every turn.
            Cadence::Budget => SWEEP_PERIOD,
        }
    }
}

/// A table with 10^6 entries that all expire at `TTL`, and the time of the
/// next turn (the instant they expire).
struct Expiring {
    engine: Engine,
    now: Millis,
    owed: bool,
}

impl Expiring {
    fn new() -> Expiring {
        let engine = Engine::new(&EngineConfig {
            capacity: CAPACITY,
            ttl_ms: TTL as u32,
            seed: Some(3),
            ..EngineConfig::default()
        })
        .expect("engine config");
        let mut e = Expiring {
            engine,
            now: 0,
            owed: false,
        };
        e.refill();
        e
    }

    fn is_empty(&self) -> bool {
        self.engine.pending() == 0
    }

    /// Registers every pair at one instant and ticks until they expire
    /// (untimed).
    fn refill(&mut self) {
        // The clock keeps running across refills, as a server's would.
        let start = self.now;
        for i in 0..ENTRIES as u32 {
            let req = Request {
                self_id: PeerId::from_u32(2 * i + 1),
                peer_id: PeerId::from_u32(2 * i + 2),
            };
            let from = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 4000));
            self.engine.handle(&req.emit(), from, start);
        }
        assert_eq!(self.engine.pending(), ENTRIES, "every registration held");
        let mut t = start;
        while t - start < TTL {
            self.engine.expire(t);
            t += TICK;
        }
        self.now = start + TTL;
        self.owed = false;
    }

    /// One timed turn; refills first if everything has expired.
    fn turn(&mut self, cadence: Cadence) -> Duration {
        if self.is_empty() {
            self.refill();
        }
        let now = self.now;
        let start = Instant::now();
        let owed = self.engine.expire(black_box(now));
        let took = start.elapsed();
        self.owed = owed;
        self.now = now + cadence.step(owed);
        took
    }
}

/// Passes behind the worst-turn figure: the machine is shared, so any
/// single turn may lose a scheduler slice (milliseconds) to another process.
const PASSES: usize = 5;

/// Expires one full million from start to finish on a fresh table, timing
/// every turn; repeats that [`PASSES`] times from the same start. The passes
/// do identical work turn by turn, so each turn's fastest time is its cost
/// without preemption; the worst of those is the worst turn.
fn worst_turn(cadence: Cadence) {
    let mut best: Vec<Duration> = Vec::new();
    let mut raw_worst = Duration::ZERO;
    for pass in 0..PASSES {
        let mut e = Expiring::new();
        let mut turns = Vec::with_capacity(4096);
        while !e.is_empty() {
            turns.push(e.turn(cadence));
        }
        raw_worst = raw_worst.max(turns.iter().copied().max().unwrap_or_default());
        if pass == 0 {
            best = turns;
        } else {
            assert_eq!(turns.len(), best.len(), "passes must do the same work");
            for (b, t) in best.iter_mut().zip(turns) {
                *b = (*b).min(t);
            }
        }
    }
    let total: Duration = best.iter().sum();
    let n = best.len();
    let mut sorted = best.clone();
    sorted.sort_unstable();
    let pct = |p: f64| sorted[((n - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    println!(
        "expiry/{}: 10^6 entries expired in {n} turns, {:.1} ms of work; per turn (fastest of \
         {PASSES} passes) mean {:.1} us, p50 {:.1} us, p99 {:.1} us, worst {:.1} us \
         (worst raw, preemption included: {:.1} us)",
        cadence.name(),
        total.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e6 / n as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        raw_worst.as_secs_f64() * 1e6,
    );
}

fn expiry(c: &mut Criterion) {
    let mut e = Expiring::new();
    println!(
        "expiry: engine for {CAPACITY} pairs holding {ENTRIES}, {} KiB of tables, \
         sweep period {SWEEP_PERIOD} ms, at most {MAX_SWEEP_PER_CALL} slots per turn",
        e.engine.allocated_bytes() >> 10
    );
    let mut group = c.benchmark_group("expiry");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for cadence in [Cadence::Tick, Cadence::Budget] {
        worst_turn(cadence);
        let worst = Cell::new(Duration::ZERO);
        group.bench_function(BenchmarkId::new("turn", cadence.name()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let took = e.turn(cadence);
                    worst.set(worst.get().max(took));
                    total += took;
                }
                total
            })
        });
        println!(
            "expiry/turn/{}: worst single turn during the Criterion run \
             (preemption included): {:.1} us",
            cadence.name(),
            worst.get().as_secs_f64() * 1e6
        );
    }
    group.finish();
}

criterion_group!(benches, expiry);
criterion_main!(benches);
