//! The engine alone: requests per second from datagram to encoded replies,
//! with no socket, against an empty pending table and against 10^6 pending
//! entries.
//!
//! The stream is peer pairs: a window of 1024 first halves `(a, b)`, each
//! from its own IPv4 address, then the 1024 second halves `(b, a)`, each of
//! which matches and has its two replies encoded into a buffer, as the
//! server would before `sendmmsg`. Every request is handled exactly as
//! [`Engine::handle`] does in the server, including the replay lookup that
//! comes first and the `full` check.
//!
//! Time is simulated: the clock advances 1 ms per 40 requests and
//! [`Engine::expire`] runs every 10 ms of it (every 1 ms while it owes work),
//! as the server's expiry tick does. Each request leaves one replay entry on
//! average (a match remembers two), alive for the 10 s replay lifetime plus
//! up to a sweep period, so the replay cache churns through about 500k
//! entries, half its default capacity of 2^20, as it would at 40k requests/s.
//! The registration lifetime is 24 h so that the 10^6 background entries
//! stay pending however long Criterion runs; all other settings are
//! `EngineConfig::default()` (capacity 2^20, at most 1000 pending per source).
//!
//! A third case, `replay_full`, gives the replay cache the 2^18 entries that
//! were its default before: half of what this rate needs, so it stays full
//! and refuses entries (counted in `replay_full`). The engine must not slow
//! down for that. A fourth, `empty_no_per_source_limit`, turns the
//! per-source pending limit off, to show what its bookkeeping costs.
//!
//! Run with `cargo bench --bench engine`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use psync::engine::MAX_LIFETIME_MS;
use psync::wire::MAX_REPLY_LEN;
use psync::{Engine, EngineConfig, Outcome, PeerId, Request};

/// Pairs per window: this many registrations wait at once.
const WINDOW: usize = 1024;
/// Pairs in the precomputed stream before it repeats; at 40 requests per
/// simulated ms a cycle lasts 26 s, well past the 10 s replay lifetime, so a
/// repeated pair registers afresh.
const CYCLE_PAIRS: usize = 1 << 19;
const REQUESTS_PER_MS: u32 = 40;
const EXPIRY_TICK_MS: u64 = 10;
const BACKGROUND: usize = 1_000_000;

fn request(self_id: u32, peer_id: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(self_id),
        peer_id: PeerId::from_u32(peer_id),
    }
    .emit()
}

fn addr(net: u8, i: u32) -> SocketAddr {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(net, b, c, d),
        1024 + (i % 60_000) as u16,
    ))
}

/// The request stream, in the order the engine sees it.
fn stream() -> Vec<([u8; 8], SocketAddr)> {
    let mut out = Vec::with_capacity(2 * CYCLE_PAIRS);
    for w in (0..CYCLE_PAIRS).step_by(WINDOW) {
        for p in w..w + WINDOW {
            let (a, b) = (2 * p as u32 + 1, 2 * p as u32 + 2);
            out.push((request(a, b), addr(10, p as u32)));
        }
        for p in w..w + WINDOW {
            let (a, b) = (2 * p as u32 + 1, 2 * p as u32 + 2);
            out.push((request(b, a), addr(172, p as u32)));
        }
    }
    out
}

struct Driver {
    engine: Engine,
    stream: Vec<([u8; 8], SocketAddr)>,
    pos: usize,
    now: u64,
    in_this_ms: u32,
    requests_per_ms: u32,
    next_expiry: u64,
    out: [u8; MAX_REPLY_LEN],
}

impl Driver {
    fn new(background: usize, replay_capacity: usize, per_source: u32) -> Driver {
        let mut engine = Engine::new(&EngineConfig {
            ttl_ms: MAX_LIFETIME_MS,
            replay_capacity,
            max_pending_per_source: per_source,
            seed: Some(1),
            ..EngineConfig::default()
        })
        .expect("engine config");
        // Registrations whose partners never come: IDs from a range the
        // stream never uses.
        for i in 0..background as u32 {
            let o = engine.handle(&request(0x8000_0000 | i, 0xc000_0000 | i), addr(192, i), 0);
            assert_eq!(o, Outcome::Registered);
        }
        Driver {
            engine,
            stream: stream(),
            pos: 0,
            now: 0,
            in_this_ms: 0,
            requests_per_ms: REQUESTS_PER_MS,
            next_expiry: 0,
            out: [0; MAX_REPLY_LEN],
        }
    }

    /// Handles one window's worth of requests (2 * WINDOW).
    #[inline(never)]
    fn window(&mut self) {
        for _ in 0..2 * WINDOW {
            let (datagram, src) = self.stream[self.pos];
            self.pos += 1;
            if self.pos == self.stream.len() {
                self.pos = 0;
            }
            match self.engine.handle(&datagram, src, self.now) {
                Outcome::Matched {
                    waiting,
                    completing,
                } => {
                    black_box(waiting.reply.emit(&mut self.out));
                    black_box(&self.out);
                    black_box(completing.reply.emit(&mut self.out));
                    black_box(&self.out);
                }
                Outcome::Replayed(send) => {
                    black_box(send.reply.emit(&mut self.out));
                    black_box(&self.out);
                }
                other => {
                    black_box(other);
                }
            }
            self.in_this_ms += 1;
            if self.in_this_ms == self.requests_per_ms {
                self.in_this_ms = 0;
                self.now += 1;
                if self.now >= self.next_expiry {
                    let owed = self.engine.expire(self.now);
                    self.next_expiry = self.now + if owed { 1 } else { EXPIRY_TICK_MS };
                }
            }
        }
    }
}

fn engine(c: &mut Criterion) {
    const REPLAY_DEFAULT: usize = 1 << 20;
    assert_eq!(EngineConfig::default().replay_capacity, REPLAY_DEFAULT);
    let per_source_default = EngineConfig::default().max_pending_per_source;
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(2 * WINDOW as u64));
    group.sample_size(50);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, background, replay, per_source) in [
        ("empty", 0, REPLAY_DEFAULT, per_source_default),
        (
            "pending_1e6",
            BACKGROUND,
            REPLAY_DEFAULT,
            per_source_default,
        ),
        ("replay_full", 0, 1 << 18, per_source_default),
        ("empty_no_per_source_limit", 0, REPLAY_DEFAULT, 0),
    ] {
        let mut d = Driver::new(background, replay, per_source);
        group.bench_function(BenchmarkId::new("requests", name), |b| {
            b.iter(|| d.window())
        });
        d.engine.update_gauges();
        let c = d.engine.counters;
        println!(
            "engine/requests/{name}: {} requests: {} matched, {} registered, {} replayed, \
             {} table_full, {} replay_full; {} pending, {} in replay cache, {} MiB of tables",
            c.received,
            c.matched,
            c.registered,
            c.replayed,
            c.table_full,
            c.replay_full,
            d.engine.pending(),
            d.engine.replay_entries(),
            d.engine.allocated_bytes() >> 20,
        );
    }
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
