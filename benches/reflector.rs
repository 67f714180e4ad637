//! psync-server against a stateless UDP reflector: server CPU per pair at
//! saturation, measured alternately in one run.
//!
//! A *reflector* is the least a server can do with the same traffic: it
//! receives each 8-byte request with `recvmmsg` and answers it at once with a
//! 20-byte reply to its source with `sendmmsg`, through the very
//! `psync::sys::{RecvBatch, SendQueue}` psync uses, in the same kind of `mio`
//! loop. Per pair it moves the same four datagrams psync does (two requests
//! in, two replies out) and keeps no state, so its CPU per pair is the
//! kernel's floor; psync's own work (engine, table, limiter, loop) is the
//! difference.
//!
//! Both run in this process for the whole run, each on its own thread
//! (named, so that its CPU time can be read from `/proc/self/task/*/`),
//! bound to the first CPU the process may use, and take turns: one client
//! thread bound to the second drives one server at a time with a closed
//! loop of [`WINDOW`] pairs in flight, batched through the same `psync::sys`
//! calls, from [`SOCKETS`] sockets on distinct 127.x.y.1 addresses
//! (distinct /24s, so psync's default per-source pending limits stay on; no
//! source holds more than a few registrations). Turns are short and
//! alternate (psync first in odd rounds, the reflector in even ones: P R R
//! P P R ...), so that what the machine does meanwhile (other tenants,
//! frequency) falls on both alike; on this shared VM single turns still
//! differ by 20% either way, but 64 rounds of 250-ms turns give a whole-run
//! ratio that repeats within a few percent (1.066 to 1.108 in seven runs of
//! one build, docs/performance.md). psync keeps its state from turn to
//! turn, as a server does, and the whole-run figure charges each server
//! all the CPU its threads used from the first turn to the last (psync's
//! expiry sweeps between its turns included). psync runs with
//! `ServerConfig::default()` except `--rate-limit 0`: a rate limit of 100
//! datagrams/s per source would throttle a loopback flood from 64 sources.
//!
//! Run with `cargo bench --bench reflector`. Variables: `PSYNC_REFLECT_ROUNDS`
//! (default 64), `PSYNC_REFLECT_TURN_MS` (default 250),
//! `PSYNC_REFLECT_PIN=0` (leave the threads unbound); for diagnosis, off the
//! default flags, `PSYNC_REFLECT_CAPACITY` (psync's `--capacity`) and
//! `PSYNC_REFLECT_LIMITS=0` (no per-source limits). Prints each round, then
//! the whole run's CPU per pair of each and their ratio (the figure), the
//! median and range of the rounds' ratios, each server's CPU outside its
//! own turns (psync's expiry sweeps and timers while the reflector runs,
//! which the figure charges it), and a 95% bootstrap interval of the
//! figure: with the default 64 rounds it is about ±5 points wide on this
//! machine, so telling 1.05 from 1.08 takes `PSYNC_REFLECT_ROUNDS=1024`
//! (about 11 minutes).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/running.rs"]
mod running;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use psync::limit::RateLimit;
use psync::sys::{self, RecvBatch, SendQueue};
use psync::wire::{Reply, REQUEST_LEN};
use psync::{PeerId, Request, ServerConfig};

/// Client sockets, each on its own 127.x.y.1 address.
const SOCKETS: usize = 64;
/// Pairs in flight: enough that the server always has a batch waiting.
const WINDOW: u64 = 512;
/// Datagrams per `recvmmsg`/`sendmmsg`, as the server's default `--batch`.
const BATCH: usize = 64;
/// After a turn, how long the client waits for what is in flight to land
/// (loopback answers in well under a millisecond; a server's backlog at
/// saturation is a few hundred datagrams).
const DRAIN: Duration = Duration::from_millis(50);
/// No reply for this long: what was in flight is lost; start afresh.
const STALL: Duration = Duration::from_millis(300);

const SERVER_THREAD: &str = "psync-srv";
const REFLECTOR_THREAD: &str = "reflector";
/// The stateless reflector: every 8-byte request gets a 20-byte reply.
fn reflector(stop: Arc<AtomicBool>, cpu: Option<usize>) -> (SocketAddr, JoinHandle<u64>) {
    let (std_socket, _) =
        sys::bind_udp("127.0.0.1:0".parse().unwrap(), 4 << 20, 4 << 20).expect("bind");
    let addr = std_socket.local_addr().unwrap();
    let thread = std::thread::Builder::new()
        .name(REFLECTOR_THREAD.into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                sys::pin_current_thread(cpu).expect("pin the reflector thread");
            }
            let mut socket = UdpSocket::from_std(std_socket);
            let mut poll = Poll::new().unwrap();
            poll.registry()
                .register(&mut socket, Token(0), Interest::READABLE)
                .unwrap();
            let mut events = Events::with_capacity(8);
            let mut recv = RecvBatch::new(BATCH);
            let mut queue = SendQueue::new(BATCH * 32, BATCH);
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
                // As psync's worker loop: a short batch found the socket
                // empty, and the next datagram raises a new edge, so one
                // receive call per wake-up unless the batch came back full.
                while let Ok(n) = recv.recv(&socket) {
                    for k in 0..n {
                        let Some(d) = recv.get(k) else { continue };
                        if d.data.len() != REQUEST_LEN {
                            continue;
                        }
                        let reply = Reply {
                            src_port: 1024,
                            dst_port: 1025,
                            peer: d.from,
                        };
                        // Encoded straight into the queue, as psync does.
                        if queue.push_with(d.from, |slot| reply.emit(slot)) {
                            answered += 1;
                        }
                    }
                    if queue.len() >= BATCH {
                        queue.flush(&socket);
                    }
                    if n < BATCH {
                        break;
                    }
                }
                queue.flush(&socket);
            }
            answered
        })
        .expect("spawn reflector");
    (addr, thread)
}

/// A closed-loop client: pairs `(a, b)` from one socket and `(b, a)` from
/// the next, any reply counting.
struct Client {
    poll: Poll,
    sockets: Vec<UdpSocket>,
    queues: Vec<SendQueue>,
    recv: RecvBatch,
    next_id: u32,
    next_socket: usize,
}

impl Client {
    fn new() -> Client {
        let poll = Poll::new().unwrap();
        let mut sockets = Vec::new();
        for k in 0..SOCKETS {
            let ip = format!("127.{}.{}.1", 10 + k / 200, k % 200);
            let (s, _) = sys::bind_udp(format!("{ip}:0").parse().unwrap(), 4 << 20, 4 << 20)
                .expect("bind client socket (127.0.0.0/8 is local)");
            let mut s = UdpSocket::from_std(s);
            poll.registry()
                .register(&mut s, Token(k), Interest::READABLE)
                .unwrap();
            sockets.push(s);
        }
        Client {
            poll,
            queues: (0..SOCKETS)
                .map(|_| SendQueue::new(4 * WINDOW as usize, BATCH))
                .collect(),
            sockets,
            recv: RecvBatch::with_buf_len(BATCH, 64),
            next_id: 1,
            next_socket: 0,
        }
    }

    /// Runs for `secs` against `server`; returns pairs completed (replies / 2).
    fn run(&mut self, server: SocketAddr, secs: Duration) -> u64 {
        let mut events = Events::with_capacity(SOCKETS);
        let mut inflight = 0u64;
        let mut replies = 0u64;
        let start = Instant::now();
        let mut progress = start;
        while start.elapsed() < secs {
            while inflight < 2 * WINDOW {
                let x = self.next_socket;
                let y = (x + 1) % SOCKETS;
                self.next_socket = (x + 2) % SOCKETS;
                let (a, b) = (self.next_id, self.next_id.wrapping_add(1));
                self.next_id = self.next_id.wrapping_add(2) | 1;
                let req = |s: u32, p: u32| {
                    Request {
                        self_id: PeerId::from_u32(s),
                        peer_id: PeerId::from_u32(p),
                    }
                    .emit()
                };
                self.queues[x].push(server, &req(a, b));
                self.queues[y].push(server, &req(b, a));
                inflight += 2;
            }
            for (q, s) in self.queues.iter_mut().zip(&self.sockets) {
                q.flush(s);
            }
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(10)));
            let mut got = 0;
            for s in &self.sockets {
                while let Ok(n) = self.recv.recv(s) {
                    got += n as u64;
                }
            }
            replies += got;
            inflight = inflight.saturating_sub(got);
            let now = Instant::now();
            if got > 0 {
                progress = now;
            } else if now - progress > STALL {
                inflight = 0;
                progress = now;
            }
        }
        // Let what is in flight land before the next round.
        std::thread::sleep(DRAIN);
        for s in &self.sockets {
            while self.recv.recv(s).is_ok() {}
        }
        replies / 2
    }
}

/// A number from the environment, `default` when unset; a value that is not
/// a number in `range` stops the bench with a message.
fn env(name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    match v.parse() {
        Ok(n) if range.contains(&n) => n,
        _ => panic!("{name}={v}: expected a number in {range:?}"),
    }
}

/// The CPU of the psync server's threads (its control thread and workers).
fn psync_cpu() -> Duration {
    cpu::thread_cpu(|n| cpu::is_server(n, SERVER_THREAD)).unwrap_or_default()
}

/// The CPU of the reflector's thread.
fn reflector_cpu() -> Duration {
    cpu::thread_cpu(|n| n == REFLECTOR_THREAD).unwrap_or_default()
}

/// One server's turn: pairs completed and the server's CPU meanwhile.
struct Turn {
    pairs: u64,
    cpu: Duration,
    /// The other server's CPU meanwhile: for psync, what it does between
    /// its turns (expiry sweeps, timers), which the whole run charges it.
    other: Duration,
    /// How long the client drove it (the drain after it not included).
    drove: Duration,
}

impl Turn {
    fn us_per_pair(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.pairs.max(1) as f64
    }

    fn rate(&self) -> f64 {
        self.pairs as f64 / self.drove.as_secs_f64()
    }
}

/// Drives the server at `addr` for `secs`, charging it what `cpu` reads
/// and noting what `other` (the other server's) reads meanwhile.
fn turn(
    client: &mut Client,
    addr: SocketAddr,
    secs: Duration,
    cpu: fn() -> Duration,
    other: fn() -> Duration,
) -> Turn {
    let (cpu0, other0) = (cpu(), other());
    let pairs = client.run(addr, secs);
    Turn {
        drove: secs,
        pairs,
        cpu: cpu() - cpu0,
        other: other() - other0,
    }
}

/// A round's ratio: psync's CPU per pair in its turn over the reflector's.
fn ratio(p: &Turn, r: &Turn) -> f64 {
    p.us_per_pair() / r.us_per_pair()
}

/// Resamplings of the rounds for [`interval`].
const RESAMPLES: usize = 2000;

/// A 95% bootstrap interval of the whole-run ratio (psync's CPU per pair
/// over the reflector's, each charged its CPU in its own turns and in the
/// other's): rounds drawn with replacement (a round's two turns together,
/// since they shared the machine's moment), each draw's ratio of sums,
/// and the 2.5th and 97.5th percentiles of those. It says what a run can
/// tell apart: on this shared VM single turns differ by 20% either way, so
/// 64 rounds leave the figure about ±5 points wide and 1,024 rounds about
/// ±1. The seed is fixed: the same rounds give the same interval. `None`
/// for fewer than 8 rounds.
fn interval(turns: &[(Turn, Turn)]) -> Option<(f64, f64)> {
    use rand_xoshiro::rand_core::{Rng, SeedableRng};
    let n = turns.len();
    if n < 8 {
        return None;
    }
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(15);
    let mut draws: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let mut sum = [0f64; 4];
            for _ in 0..n {
                let (p, r) = &turns[(rng.next_u64() % n as u64) as usize];
                sum[0] += (p.cpu + r.other).as_secs_f64();
                sum[1] += p.pairs as f64;
                sum[2] += (r.cpu + p.other).as_secs_f64();
                sum[3] += r.pairs as f64;
            }
            (sum[0] / sum[1].max(1.0)) / (sum[2] / sum[3].max(1.0))
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    Some((draws[RESAMPLES / 40], draws[RESAMPLES - 1 - RESAMPLES / 40]))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too:
    // then only a smoke round.
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench {
        env("PSYNC_REFLECT_ROUNDS", 64, 1..=10_000)
    } else {
        1
    };
    let turn_ms = if bench {
        env("PSYNC_REFLECT_TURN_MS", 250, 100..=600_000)
    } else {
        300
    };
    let secs = Duration::from_millis(turn_ms);
    // The servers under test on one CPU, the client on another, each bound
    // there (`PSYNC_REFLECT_PIN=0`: neither), so that neither migrates and
    // pays cold caches for it, as the measurement had them. With
    // one CPU, or where binding is not allowed, both run unbound.
    let cpus = sys::allowed_cpus().unwrap_or_default();
    let bind = env("PSYNC_REFLECT_PIN", 1, 0..=1) == 1 && cpus.len() >= 2;
    let server_cpu = match bind.then(|| sys::pin_current_thread(cpus[1])) {
        Some(Ok(())) => {
            println!(
                "servers bound to CPU {}, the client to CPU {}",
                cpus[0], cpus[1]
            );
            Some(cpus[0])
        }
        Some(Err(e)) => {
            println!("threads not bound to CPUs: {e}");
            None
        }
        None => {
            println!("threads not bound to CPUs");
            None
        }
    };
    let mut cfg = ServerConfig {
        bind: vec!["127.0.0.1:0".parse().unwrap()],
        stats_interval: None,
        rate_limit: RateLimit::OFF,
        ..ServerConfig::default()
    };
    // Diagnostics, off the measurement: a smaller table, or no
    // per-source limits, show what the table's size and the limits cost.
    let default_capacity = cfg.engine.capacity as u64;
    cfg.engine.capacity = env("PSYNC_REFLECT_CAPACITY", default_capacity, 1024..=1 << 26) as usize;
    if env("PSYNC_REFLECT_LIMITS", 1, 0..=1) == 0 {
        cfg.engine.limits = psync::engine::SourceLimits::OFF;
    }
    if cfg.engine.capacity as u64 != default_capacity || cfg.engine.limits.is_off() {
        println!(
            "psync with --capacity {} and per-source limits {} (not the default flags)",
            cfg.engine.capacity,
            if cfg.engine.limits.is_off() {
                "off"
            } else {
                "on"
            }
        );
    }
    // Both servers stay up for the whole run and take turns: short turns,
    // alternating, so that what the machine does meanwhile (other tenants,
    // frequency) falls on both alike. psync's state carries over from turn
    // to turn, as a server's does; what it does between its turns (expiry
    // sweeps) is charged to it in the whole-run figure.
    let server = running::Running::start(&cfg, SERVER_THREAD, server_cpu);
    let stop = Arc::new(AtomicBool::new(false));
    let (reflector_addr, reflector_thread) = reflector(stop.clone(), server_cpu);
    std::thread::sleep(Duration::from_millis(100));
    let mut client = Client::new();
    let (p_cpu0, r_cpu0) = (psync_cpu(), reflector_cpu());
    let mut turns = Vec::new();
    for round in 1..=rounds {
        // Odd rounds give psync the first turn, even rounds the reflector
        // (turns go P R R P P R ...): whatever the machine does to the
        // second of two turns falls on each side equally often.
        let psync_first = round % 2 == 1;
        let (p, r) = if psync_first {
            let p = turn(&mut client, server.addr, secs, psync_cpu, reflector_cpu);
            let r = turn(&mut client, reflector_addr, secs, reflector_cpu, psync_cpu);
            (p, r)
        } else {
            let r = turn(&mut client, reflector_addr, secs, reflector_cpu, psync_cpu);
            let p = turn(&mut client, server.addr, secs, psync_cpu, reflector_cpu);
            (p, r)
        };
        let ratio = ratio(&p, &r);
        println!(
            "round {round} ({} first): psync {:.0} pairs/s, {:.2} us CPU/pair; \
             reflector {:.0} pairs/s, {:.2} us CPU/pair; ratio {ratio:.3}",
            if psync_first { "psync" } else { "reflector" },
            p.rate(),
            p.us_per_pair(),
            r.rate(),
            r.us_per_pair(),
        );
        turns.push((p, r));
    }
    let (p_cpu, r_cpu) = (psync_cpu() - p_cpu0, reflector_cpu() - r_cpu0);
    stop.store(true, Ordering::Relaxed);
    reflector_thread.join().unwrap();
    let c = server.stop();
    let mut ratios: Vec<f64> = turns.iter().map(|(p, r)| ratio(p, r)).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
    println!(
        "psync: matched {}, replay_full {}, table_full {}, per-source limited {}",
        c.engine.matched,
        c.engine.replay_full,
        c.engine.table_full,
        c.engine.per_ip_limit + c.engine.per_prefix_limit,
    );
    let (p_pairs, r_pairs) = turns
        .iter()
        .fold((0u64, 0u64), |(a, b), (p, r)| (a + p.pairs, b + r.pairs));
    let p_us = p_cpu.as_secs_f64() * 1e6 / p_pairs.max(1) as f64;
    let r_us = r_cpu.as_secs_f64() * 1e6 / r_pairs.max(1) as f64;
    println!(
        "whole run ({n} rounds of {turn_ms}-ms turns, each server's CPU from start to end): \
         psync {p_us:.3} us CPU/pair, reflector {r_us:.3}; ratio {:.3}",
        p_us / r_us
    );
    println!(
        "psync / reflector CPU per pair, per round: median {median:.3}, min {:.3}, max {:.3}",
        ratios[0],
        ratios[n - 1],
    );
    let outside = |pick: fn(&(Turn, Turn)) -> (Duration, u64)| {
        let (cpu, pairs) = turns
            .iter()
            .map(pick)
            .fold((0.0, 0u64), |(c, n), (d, k)| (c + d.as_secs_f64(), n + k));
        cpu * 1e6 / pairs.max(1) as f64
    };
    println!(
        "CPU outside its own turns, per pair of its own: psync {:.3} us (expiry sweeps, timers), \
         the reflector {:.3} us",
        outside(|(p, r)| (r.other, p.pairs)),
        outside(|(p, r)| (p.other, r.pairs)),
    );
    if let Some((lo, hi)) = interval(&turns) {
        println!(
            "95% interval of the whole-run ratio (rounds resampled {RESAMPLES} times): \
             {lo:.3} to {hi:.3}"
        );
    }
    let _ = io::Write::flush(&mut io::stdout());
}
