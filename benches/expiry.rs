//! Incremental expiry: what one loop turn costs while a million pending
//! entries expire at once, and the worst single turn.
//!
//! The table is the engine's pending table with its defaults: room for 2^20
//! entries, IPv4-sized values, a 30 s lifetime and so a sweep period of
//! 7.5 s. It holds 10^6 entries registered at the same instant; the loop has
//! been calling [`Table::expire`] every 10 ms (as the server's expiry tick
//! does) while they lived, and then all of them expire together. Each turn
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
use psync::table::{Millis, Table, MAX_SWEEP_PER_CALL};

#[derive(Clone, Copy, Default)]
struct V4 {
    _ip: [u8; 4],
    _port: [u8; 2],
}

const CAPACITY: usize = 1 << 20;
const ENTRIES: usize = 1_000_000;
const TTL: Millis = 30_000;
const SWEEP_PERIOD: u32 = TTL / 4;
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
    table: Table<V4>,
    now: Millis,
    owed: bool,
    keys: Vec<u64>,
}

impl Expiring {
    fn new() -> Expiring {
        let mut s = 7u64;
        let keys = (0..ENTRIES)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let z = (s ^ (s >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            })
            .collect();
        let mut e = Expiring {
            table: Table::new(CAPACITY, [3, 4], SWEEP_PERIOD),
            now: 0,
            owed: false,
            keys,
        };
        e.refill();
        e
    }

    /// Registers every key at time 0 and ticks until they expire (untimed).
    fn refill(&mut self) {
        // The clock keeps running across refills, as a server's would.
        let start = self.now;
        for &k in &self.keys {
            self.table
                .insert(k, V4::default(), start.wrapping_add(TTL), start);
        }
        let mut t = start;
        while t.wrapping_sub(start) < TTL {
            self.table.expire(t);
            t = t.wrapping_add(TICK);
        }
        self.now = start.wrapping_add(TTL);
        self.owed = false;
    }

    /// One timed turn; refills first if everything has expired.
    fn turn(&mut self, cadence: Cadence) -> Duration {
        if self.table.is_empty() {
            self.refill();
        }
        let now = self.now;
        let start = Instant::now();
        let owed = self.table.expire(black_box(now));
        let took = start.elapsed();
        self.owed = owed;
        self.now = now.wrapping_add(cadence.step(owed));
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
        while !e.table.is_empty() {
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
        "expiry: table for {CAPACITY} entries holding {ENTRIES}, {} KiB, \
         sweep period {SWEEP_PERIOD} ms, at most {MAX_SWEEP_PER_CALL} slots per turn",
        e.table.allocated_bytes() >> 10
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
