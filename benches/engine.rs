//! The engine alone: requests per second from datagram to encoded replies,
//! with no socket, against an empty table, against 10^6 pending
//! registrations, and against a table kept full.
//!
//! The stream is peer pairs: a window of 1024 first halves `(a, b)`, each
//! from its own IPv4 address, then the 1024 second halves `(b, a)`, each of
//! which matches and has its two replies encoded into a buffer, as the
//! server would before `sendmmsg`. Requests go to [`Engine::handle_batch`] in
//! batches of 64, the server's default `--batch`, exactly as the server hands
//! them over.
//!
//! Time is simulated: the clock advances 1 ms per 40 requests and
//! [`Engine::expire`] runs every 10 ms of it (every 1 ms while it owes work),
//! as the server's expiry tick does. Each match is remembered for the 5 s
//! replay lifetime, so about 100k remembered matches churn in the table, as
//! they would at 40k requests/s. The registration lifetime is 24 h so that
//! the 10^6 background registrations stay pending however long Criterion
//! runs; all other settings are `EngineConfig::default()` (capacity 2^20,
//! the default per-source limits).
//!
//! Cases:
//! - `empty`: the table holds only the stream's own pairs;
//! - `pending_1e6`: 10^6 background registrations wait beside them (capacity
//!   2^21, room for both: waiting registrations and remembered matches share
//!   the table; its 117 MiB are still less than the 297 MiB of the separate
//!   tables of the first engine);
//! - `replay_full`: capacity 2^16, so remembered matches fill the table and
//!   every new registration takes the oldest remembered match's slot (the
//!   replay cut short, counted in `replay_full`);
//! - `empty_no_limits`: the per-source limits off (no counts kept), to show
//!   what their bookkeeping costs.
//!
//! Run with `cargo bench --bench engine`. `PSYNC_ENGINE_WINDOWS=N` (N >= 1;
//! anything else stops the bench with a message) stops
//! each case's stream after N windows (later iterations do nothing), so that
//! a count of instructions covers the same requests in every build
//! (`benches/instructions.sh`); never set it for a timing.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use psync::engine::{SourceLimits, MAX_LIFETIME_MS};
use psync::wire::MAX_REPLY_LEN;
use psync::{Engine, EngineConfig, Outcome, PeerId, Request};

/// Requests per `handle_batch` call: the server's default `--batch`.
const BATCH: usize = 64;

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
    /// Windows still to handle (`PSYNC_ENGINE_WINDOWS`, else unbounded).
    windows_left: u64,
}

impl Driver {
    fn new(background: usize, capacity: usize, limits: SourceLimits) -> Driver {
        let mut engine = Engine::new(&EngineConfig {
            capacity,
            ttl_ms: MAX_LIFETIME_MS,
            limits,
            seed: Some(1),
            ..EngineConfig::default()
        })
        .expect("engine config");
        // Registrations whose partners never come: IDs from a range the
        // stream never uses.
        for i in 0..background as u32 {
            let o = engine.handle(&request(0x8000_0000 | i, 0xc000_0000 | i), addr(192, i), 0);
            assert_eq!(o, Outcome::Registered { evicted: None });
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
            windows_left: match std::env::var("PSYNC_ENGINE_WINDOWS") {
                Err(_) => u64::MAX,
                Ok(v) => match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        panic!("PSYNC_ENGINE_WINDOWS={v}: expected a number of windows, 1 or more")
                    }
                },
            },
        }
    }

    /// Handles one window's worth of requests (2 * WINDOW).
    #[inline(never)]
    fn window(&mut self) {
        if self.windows_left == 0 {
            return;
        }
        self.windows_left -= 1;
        let mut done = 0;
        while done < 2 * WINDOW {
            // A batch never straddles a millisecond tick, like a received
            // batch, which is handled at one `now`.
            let n = BATCH
                .min(2 * WINDOW - done)
                .min((self.requests_per_ms - self.in_this_ms) as usize);
            let pos = self.pos;
            let stream = &self.stream;
            let len = stream.len();
            let out = &mut self.out;
            self.engine.handle_batch(
                n,
                |k| {
                    let (d, a) = &stream[(pos + k) % len];
                    Some((&d[..], *a))
                },
                self.now,
                |_, o| match o {
                    Outcome::Matched {
                        waiting,
                        completing,
                    } => {
                        black_box(waiting.reply.emit(out));
                        black_box(&*out);
                        black_box(completing.reply.emit(out));
                        black_box(&*out);
                    }
                    Outcome::Replayed(t) => {
                        black_box(t.reply.emit(out));
                        black_box(&*out);
                    }
                    _ => {}
                },
            );
            self.pos = (pos + n) % len;
            done += n;
            self.in_this_ms += n as u32;
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
    let default_capacity = EngineConfig::default().capacity;
    let limits = SourceLimits::default();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(2 * WINDOW as u64));
    group.sample_size(50);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, background, capacity, limits) in [
        ("empty", 0, default_capacity, limits),
        // Room for the 10^6 beside the stream's own pairs.
        ("pending_1e6", BACKGROUND, 2 * default_capacity, limits),
        ("replay_full", 0, 1 << 16, limits),
        ("empty_no_limits", 0, default_capacity, SourceLimits::OFF),
    ] {
        let mut d = Driver::new(background, capacity, limits);
        group.bench_function(BenchmarkId::new("requests", name), |b| {
            b.iter(|| d.window())
        });
        let c = d.engine.counters();
        println!(
            "engine/requests/{name}: {} requests: {} matched, {} registered, {} replayed, \
             {} table_full, {} replay_full, {} evicted; {} pending, {} remembered, {} MiB of tables",
            c.received,
            c.matched,
            c.registered,
            c.replayed,
            c.table_full,
            c.replay_full,
            c.evicted,
            d.engine.pending(),
            d.engine.replay_entries(),
            d.engine.allocated_bytes() >> 20,
        );
    }
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
