//! The engine with protocol v2 against the seed format, measured in one run,
//! alternating, so that a machine shared with other work weighs on both
//! alike (Criterion runs one benchmark after the other). Three variants, each
//! the same stream of pairs (a window of 1024 registrations, then their 1024
//! partners, each from its own address), replies emitted:
//!
//! - `seed`: 8-byte requests through [`Engine::handle_batch`];
//! - `v2`: admitted v2 requests (already parsed and verified) through
//!   [`Engine::handle_batch_v2`]: the engine's own cost;
//! - `v2+gate`: 152-byte datagrams through the admission gate (parse, token
//!   MAC) and then the engine: everything a server does for v2 but I/O.
//!
//! Run with `cargo bench --bench v2_vs_seed` (ROUNDS=N to change the 15
//! rounds). It prints ns per request for each variant (median, min, max
//! over the rounds) and the ratios of the medians. Benches measure, tests
//! assert: nothing here fails on a number.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use psync::auth::{Key, KeySet};
use psync::engine::SourceLimits;
use psync::limit::RateLimit;
use psync::server::gate::{AuthConfig, Clock, Gate, Verdict};
use psync::stats::IoCounters;
use psync::wire::v2;
use psync::wire::MAX_REPLY_LEN;
use psync::{Engine, EngineConfig, Outcome, PeerId, Request};

const BATCH: usize = 64;
const WINDOW: usize = 1024;
/// Pairs before the stream repeats: 2^16 pairs are 3.3 s at 40 requests per
/// simulated ms, past the 1 s replay lifetime, so a repeated pair registers
/// afresh.
const CYCLE_PAIRS: usize = 1 << 16;
const REQUESTS_PER_MS: usize = 40;
/// Requests per round and variant.
const ROUND: usize = 100 * 2 * WINDOW;
const NOW: u64 = 1_700_000_000;

fn addr(net: u8, i: u32) -> SocketAddr {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(net, b, c, d),
        1024 + (i % 60_000) as u16,
    ))
}

/// `(self_id, peer_id, source)` of every request, in order.
fn stream() -> Vec<(u32, u32, SocketAddr)> {
    let mut out = Vec::with_capacity(2 * CYCLE_PAIRS);
    for w in (0..CYCLE_PAIRS).step_by(WINDOW) {
        for p in w..w + WINDOW {
            out.push((2 * p as u32 + 1, 2 * p as u32 + 2, addr(10, p as u32)));
        }
        for p in w..w + WINDOW {
            out.push((2 * p as u32 + 2, 2 * p as u32 + 1, addr(172, p as u32)));
        }
    }
    out
}

fn engine() -> Engine {
    Engine::new(&EngineConfig {
        capacity: 1 << 20,
        replay_ttl_ms: 1000,
        limits: SourceLimits::OFF,
        seed: Some(1),
        ..EngineConfig::default()
    })
    .expect("engine config")
}

/// One variant's state: its engine, clock and place in its stream.
struct Run {
    engine: Engine,
    now: u64,
    pos: usize,
}

impl Run {
    /// Runs `ROUND` requests in batches, one simulated ms per
    /// `REQUESTS_PER_MS`, `step(engine, pos, n, now)` handling each batch.
    fn round(&mut self, len: usize, mut step: impl FnMut(&mut Engine, usize, usize, u64)) -> f64 {
        let t = Instant::now();
        let mut done = 0;
        while done < ROUND {
            let n = BATCH.min(ROUND - done);
            step(&mut self.engine, self.pos, n, self.now);
            self.pos = (self.pos + n) % len;
            done += n;
            if done % REQUESTS_PER_MS < n {
                self.now += 1;
                self.engine.expire(self.now);
            }
        }
        t.elapsed().as_nanos() as f64 / ROUND as f64
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either: run quickly then.
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(15);
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { rounds };

    let key = Key::new(1, &[7; 32]).unwrap();
    let keys = Arc::new(KeySet::from_keys([key.clone()]).unwrap());
    let ids = stream();
    let seed: Vec<([u8; 8], SocketAddr)> = ids
        .iter()
        .map(|&(a, b, src)| {
            let r = Request {
                self_id: PeerId::from_u32(a),
                peer_id: PeerId::from_u32(b),
            };
            (r.emit(), src)
        })
        .collect();
    let v2_pair =
        |a: u32, b: u32| v2::Pair::new(u64::from(a) << 32 | 0xabc, u64::from(b) << 32 | 0xabc);
    let v2_reqs: Vec<(v2::Request, SocketAddr)> = ids
        .iter()
        .map(|&(a, b, src)| {
            let r = v2::Request {
                token: key.issue(v2_pair(a, b), NOW + 3600),
                cookie: None,
                info: v2::ClientInfo(1),
                candidates: v2::Candidates::EMPTY,
            };
            (r, src)
        })
        .collect();
    let v2_bytes: Vec<([u8; 152], SocketAddr)> = v2_reqs
        .iter()
        .map(|(r, src)| (r.to_bytes(), *src))
        .collect();
    let auth = AuthConfig {
        keys: Some(keys),
        ..AuthConfig::default()
    };
    let mut gate = Gate::new(&auth, RateLimit::OFF, [1, 2], &[3; 32]).unwrap();
    let mut io = IoCounters::default();
    let mut admitted: Vec<(v2::Request, SocketAddr)> = Vec::with_capacity(BATCH);

    let mut runs = [
        Run {
            engine: engine(),
            now: 0,
            pos: 0,
        },
        Run {
            engine: engine(),
            now: 0,
            pos: 0,
        },
        Run {
            engine: engine(),
            now: 0,
            pos: 0,
        },
    ];
    let mut times: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut out = [0u8; v2::MAX_LEN];
    for round in 0..rounds + 1 {
        // Round 0 warms every variant up and is not counted.
        let t_seed = runs[0].round(seed.len(), |e, pos, n, now| {
            e.handle_batch(
                n,
                |k| {
                    let (d, a) = &seed[(pos + k) % seed.len()];
                    Some((&d[..], *a))
                },
                now,
                |_, o| emit_seed(o, &mut out),
            )
        });
        let t_v2 = runs[1].round(v2_reqs.len(), |e, pos, n, now| {
            e.handle_batch_v2(
                n,
                |k| {
                    let (r, a) = &v2_reqs[(pos + k) % v2_reqs.len()];
                    Some((r, *a))
                },
                now,
                |_, o| emit_v2(o, &mut out),
            )
        });
        let t_gate = runs[2].round(v2_bytes.len(), |e, pos, n, now| {
            let clock = Clock {
                unix_secs: NOW,
                millis: now as u32,
            };
            admitted.clear();
            for k in 0..n {
                let (d, a) = &v2_bytes[(pos + k) % v2_bytes.len()];
                if let Verdict::CheckToken(r) = gate.admit(&d[..], *a, true, clock, &mut io) {
                    admitted.push((r, *a));
                }
            }
            gate.check_tokens(&mut admitted, NOW, &mut io);
            e.handle_batch_v2(
                admitted.len(),
                |k| admitted.get(k).map(|(r, a)| (r, *a)),
                now,
                |_, o| emit_v2(o, &mut out),
            )
        });
        if round > 0 {
            times[0].push(t_seed);
            times[1].push(t_v2);
            times[2].push(t_gate);
        }
    }
    for (i, r) in runs.iter().enumerate() {
        let c = r.engine.counters();
        assert!(
            c.matched > 0 && c.matched * 2 + c.replayed >= c.received / 2,
            "variant {i}: {c:?}"
        );
    }
    assert_eq!(
        io.auth_failed_bad_mac + io.auth_failed_expired + io.auth_failed_unknown_key,
        0
    );
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let s = stats(&mut times[0]);
    let e = stats(&mut times[1]);
    let g = stats(&mut times[2]);
    println!(
        "ns per request over {rounds} alternating rounds of {ROUND} requests (median, min-max):"
    );
    println!("  seed      {:7.1}  {:7.1}-{:7.1}", s.0, s.1, s.2);
    println!("  v2        {:7.1}  {:7.1}-{:7.1}", e.0, e.1, e.2);
    println!("  v2+gate   {:7.1}  {:7.1}-{:7.1}", g.0, g.1, g.2);
    println!(
        "ratios of medians: v2/seed {:.2}, v2+gate/seed {:.2}; requests/s: seed {:.2}M, v2 {:.2}M, v2+gate {:.2}M",
        e.0 / s.0,
        g.0 / s.0,
        1e3 / s.0,
        1e3 / e.0,
        1e3 / g.0
    );
}

fn emit_seed(o: &Outcome, out: &mut [u8]) {
    let out: &mut [u8; MAX_REPLY_LEN] = (&mut out[..MAX_REPLY_LEN]).try_into().unwrap();
    match o {
        Outcome::Matched {
            waiting,
            completing,
        } => {
            black_box(waiting.reply.emit(out));
            black_box(completing.reply.emit(out));
        }
        Outcome::Replayed(t) => {
            black_box(t.reply.emit(out));
        }
        _ => {}
    }
    black_box(&*out);
}

fn emit_v2(o: &Outcome<v2::Reply>, out: &mut [u8]) {
    match o {
        Outcome::Matched {
            waiting,
            completing,
        } => {
            black_box(waiting.reply.emit(out));
            black_box(completing.reply.emit(out));
        }
        Outcome::Replayed(t) => {
            black_box(t.reply.emit(out));
        }
        _ => {}
    }
    black_box(&*out);
}
