//! The pending table against `std::collections::HashMap`, operation by
//! operation, at 10^3, 10^5 and 10^6 entries (10^7 with `PSYNC_BENCH_HUGE=1`).
//!
//! Both maps hold the same random `u64` keys, an IPv4-sized value (4 address
//! bytes and 2 port bytes, as the engine stores) and a `u32` expiry, and both
//! check the expiry on a read, so they do the same work. The psync table is
//! built for exactly N entries (its 7/8 load factor at capacity, the worst
//! case); the HashMap with `with_capacity(N)`. The HashMap uses std's default
//! SipHash-1-3 `RandomState`, which is what a plain implementation gets.
//!
//! One iteration is a batch of K operations on keys in random order, so
//! cache misses at 10^6 are real. Operations that change the table (insert,
//! remove) run under `iter_batched_ref`: the untimed setup undoes the previous
//! batch, so every timed batch sees a table of the same size.
//!
//! Before the timings it prints the bytes each map allocates per pending
//! entry, for IPv4 and IPv6 values. Run with `cargo bench --bench table`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::mem::size_of;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use psync::table::{Entry, Load, Table};

type Millis = u32;

fn is_expired(expires: Millis, now: Millis) -> bool {
    (now.wrapping_sub(expires) as i32) >= 0
}

/// An IPv4 pending entry's value, laid out as the engine's.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct V4 {
    _ip: [u8; 4],
    _port: [u8; 2],
}

/// An IPv6 pending entry's value, laid out as the engine's.
#[derive(Clone, Copy, Default)]
struct V6 {
    _ip: [u8; 16],
    _port: [u8; 2],
}

const NOW: Millis = 1_000;
const EXPIRES: Millis = NOW + 30_000;
/// Operations per timed batch, at most: large enough that the timer's own
/// cost vanishes, small against every table size above 10^3.
const MAX_BATCH: usize = 1024;

/// The operations both maps offer, with the pending table's semantics.
trait Pending {
    fn insert(&mut self, key: u64, value: V4, expires: Millis, now: Millis) -> bool;
    fn get(&mut self, key: u64, now: Millis) -> Option<V4>;
    fn remove(&mut self, key: u64, now: Millis) -> Option<V4>;
}

/// An entry as a table of pending registrations stores it: key, expiry and
/// value packed at alignment 1.
#[derive(Clone, Copy, Default)]
struct Slot<V> {
    key: [u8; 8],
    expires: [u8; 4],
    value: V,
}

impl<V: Copy> Entry for Slot<V> {
    #[inline]
    fn hash_input(&self) -> u64 {
        u64::from_ne_bytes(self.key)
    }
}

fn new_table<V: Copy + Default>(n: usize, seed: [u64; 2]) -> Table<Slot<V>> {
    Table::try_new(n, Load::DEFAULT, seed, Slot::default()).expect("table allocates")
}

impl Pending for Table<Slot<V4>> {
    #[inline]
    fn insert(&mut self, key: u64, value: V4, expires: Millis, now: Millis) -> bool {
        let h = self.hash(key);
        let k = key.to_ne_bytes();
        let slot = Slot {
            key: k,
            expires: expires.to_ne_bytes(),
            value,
        };
        match self.find(h, |e| e.key == k) {
            Ok(i) => {
                let _ = now;
                *self.get_mut(i) = slot;
                true
            }
            Err(_) if self.len() >= self.capacity() => false,
            Err(i) => {
                self.insert_at(i, h, slot);
                true
            }
        }
    }
    #[inline]
    fn get(&mut self, key: u64, now: Millis) -> Option<V4> {
        let k = key.to_ne_bytes();
        let i = self.find(self.hash(key), |e| e.key == k).ok()?;
        let e = Table::get(self, i);
        (!is_expired(u32::from_ne_bytes(e.expires), now)).then_some(e.value)
    }
    #[inline]
    fn remove(&mut self, key: u64, now: Millis) -> Option<V4> {
        let k = key.to_ne_bytes();
        let i = self.find(self.hash(key), |e| e.key == k).ok()?;
        let e = self.remove_at(i);
        (!is_expired(u32::from_ne_bytes(e.expires), now)).then_some(e.value)
    }
}

impl Pending for HashMap<u64, (V4, Millis)> {
    #[inline]
    fn insert(&mut self, key: u64, value: V4, expires: Millis, _now: Millis) -> bool {
        HashMap::insert(self, key, (value, expires));
        true
    }
    #[inline]
    fn get(&mut self, key: u64, now: Millis) -> Option<V4> {
        match HashMap::get(self, &key) {
            Some(&(v, e)) if !is_expired(e, now) => Some(v),
            _ => None,
        }
    }
    #[inline]
    fn remove(&mut self, key: u64, now: Millis) -> Option<V4> {
        match HashMap::remove(self, &key) {
            Some((v, e)) if !is_expired(e, now) => Some(v),
            _ => None,
        }
    }
}

/// A deterministic stream of distinct-looking keys (splitmix64).
fn keys(seed: u64, n: usize) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .collect()
}

/// One size's key sets: `base` fills the map, `fresh` are never in it.
struct Keys {
    base: Vec<u64>,
    fresh: Vec<u64>,
    batch: usize,
}

impl Keys {
    fn new(n: usize) -> Keys {
        let batch = (n / 8).clamp(1, MAX_BATCH);
        // Enough fresh batches that consecutive batches touch unrelated
        // cache lines, but no more than the table holds.
        let fresh = n.clamp(batch, 64 * batch);
        Keys {
            base: keys(1, n),
            fresh: keys(2, fresh),
            batch,
        }
    }
    fn batches(&self, set: &[u64]) -> usize {
        set.len() / self.batch
    }
    fn batch<'a>(&self, set: &'a [u64], i: usize) -> &'a [u64] {
        &set[i * self.batch..(i + 1) * self.batch]
    }
}

/// Runs the five operations on `map`, which must hold exactly `keys.base`
/// minus its last batch (the insert benchmark's room).
fn operations<M: Pending>(
    c: &mut Criterion,
    name: &str,
    n: usize,
    keys: &Keys,
    map: M,
    sample_size: usize,
) {
    let v = V4::default();
    let mut group = c.benchmark_group("table");
    let id = |op: &str| BenchmarkId::new(format!("{op}/{name}"), n);
    group.throughput(Throughput::Elements(keys.batch as u64));
    group.sample_size(sample_size);
    let room = keys.batch(&keys.base, keys.batches(&keys.base) - 1);
    let map = RefCell::new(map);

    // insert: N - K entries, K new keys in; the setup removes the batch the
    // previous iteration inserted (a different one), so N is never exceeded.
    {
        let last: RefCell<Option<usize>> = RefCell::new(None);
        let mut next = 0;
        let fresh_batches = keys.batches(&keys.fresh);
        group.bench_function(id("insert"), |b| {
            b.iter_batched_ref(
                || {
                    let mut m = map.borrow_mut();
                    if let Some(i) = last.borrow_mut().take() {
                        for &k in keys.batch(&keys.fresh, i) {
                            m.remove(k, NOW);
                        }
                    }
                    next = (next + 1) % fresh_batches;
                    *last.borrow_mut() = Some(next);
                    next
                },
                |&mut i| {
                    let mut m = map.borrow_mut();
                    for &k in keys.batch(&keys.fresh, i) {
                        black_box(m.insert(black_box(k), v, EXPIRES, NOW));
                    }
                },
                BatchSize::PerIteration,
            )
        });
        let undo = last.borrow_mut().take();
        if let Some(i) = undo {
            let mut m = map.borrow_mut();
            for &k in keys.batch(&keys.fresh, i) {
                m.remove(k, NOW);
            }
        }
    }

    // The other operations run on a map holding all N base keys.
    for &k in room {
        assert!(map.borrow_mut().insert(k, v, EXPIRES, NOW));
    }
    let base_batches = keys.batches(&keys.base);

    let mut next = 0;
    group.bench_function(id("lookup_hit"), |b| {
        let mut m = map.borrow_mut();
        b.iter(|| {
            next = (next + 1) % base_batches;
            for &k in keys.batch(&keys.base, next) {
                black_box(m.get(black_box(k), NOW));
            }
        })
    });

    let fresh_batches = keys.batches(&keys.fresh);
    group.bench_function(id("lookup_miss"), |b| {
        let mut m = map.borrow_mut();
        b.iter(|| {
            next = (next + 1) % fresh_batches;
            for &k in keys.batch(&keys.fresh, next) {
                black_box(m.get(black_box(k), NOW));
            }
        })
    });

    // remove: the setup puts back the batch the previous iteration removed.
    {
        let last: RefCell<Option<usize>> = RefCell::new(None);
        group.bench_function(id("remove"), |b| {
            b.iter_batched_ref(
                || {
                    let mut m = map.borrow_mut();
                    if let Some(i) = last.borrow_mut().take() {
                        for &k in keys.batch(&keys.base, i) {
                            m.insert(k, v, EXPIRES, NOW);
                        }
                    }
                    next = (next + 1) % base_batches;
                    *last.borrow_mut() = Some(next);
                    next
                },
                |&mut i| {
                    let mut m = map.borrow_mut();
                    for &k in keys.batch(&keys.base, i) {
                        black_box(m.remove(black_box(k), NOW));
                    }
                },
                BatchSize::PerIteration,
            )
        });
        let undo = last.borrow_mut().take();
        if let Some(i) = undo {
            let mut m = map.borrow_mut();
            for &k in keys.batch(&keys.base, i) {
                m.insert(k, v, EXPIRES, NOW);
            }
        }
    }

    // refresh: a repeated request, the same key with a later expiry.
    let mut later = EXPIRES;
    group.bench_function(id("refresh"), |b| {
        let mut m = map.borrow_mut();
        b.iter(|| {
            next = (next + 1) % base_batches;
            later = later.wrapping_add(1);
            for &k in keys.batch(&keys.base, next) {
                black_box(m.insert(black_box(k), v, later, NOW));
            }
        })
    });
    group.finish();
}

/// Bytes std's HashMap allocates for `capacity()` (hashbrown: a power-of-two
/// bucket count at most 7/8 full, one control byte per bucket plus one group).
fn hashmap_alloc_bytes(capacity: usize, entry: usize) -> usize {
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

fn print_memory(sizes: &[usize]) {
    println!("bytes per pending entry, table built for N and holding N:");
    println!(
        "{:>10} {:>9} {:>9} {:>14} {:>14} {:>14} {:>14}",
        "N", "psync v4", "psync v6", "HashMap v4 est", "HashMap v4", "HashMap v6 est", "HashMap v6"
    );
    for &n in sizes {
        let t4: Table<Slot<V4>> = new_table(n, [1, 2]);
        let t6: Table<Slot<V6>> = new_table(n, [1, 2]);
        let cap = HashMap::<u64, (V4, Millis)>::with_capacity(n).capacity();
        let e4 = size_of::<(u64, (V4, Millis))>();
        let e6 = size_of::<(u64, (V6, Millis))>();
        let per = |bytes: usize| bytes as f64 / n as f64;
        println!(
            "{:>10} {:>9.1} {:>9.1} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
            n,
            per(t4.allocated_bytes()),
            per(t6.allocated_bytes()),
            // The estimate asked for: capacity() * (key + value + 1 control byte).
            per(cap * (e4 + 1)),
            // What hashbrown really allocates for that capacity.
            per(hashmap_alloc_bytes(cap, e4)),
            per(cap * (e6 + 1)),
            per(hashmap_alloc_bytes(cap, e6)),
        );
    }
}

fn sizes() -> Vec<usize> {
    let mut sizes = vec![1_000, 100_000, 1_000_000];
    if std::env::var_os("PSYNC_BENCH_HUGE").is_some_and(|v| v != "0") {
        sizes.push(10_000_000);
    }
    sizes
}

fn table(c: &mut Criterion) {
    let sizes = sizes();
    print_memory(&sizes);
    for &n in &sizes {
        let keys = Keys::new(n);
        let fill = &keys.base[..keys.base.len() - keys.batch];
        // Fewer samples for the big maps: their batches are slower and
        // steadier, and the full run must stay short.
        let samples = if n >= 1_000_000 { 20 } else { 30 };

        let mut t: Table<Slot<V4>> = new_table(n, [0x5eed, 0xfeed]);
        for &k in fill {
            assert!(Pending::insert(&mut t, k, V4::default(), EXPIRES, NOW));
        }
        operations(c, "psync", n, &keys, t, samples);

        let mut h: HashMap<u64, (V4, Millis)> = HashMap::with_capacity(n);
        for &k in fill {
            h.insert(k, (V4::default(), EXPIRES));
        }
        operations(c, "hashmap", n, &keys, h, samples);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    targets = table
}
criterion_main!(benches);
