//! End to end over loopback: pairs matched per second by an in-process
//! [`psync::Server`] at `--batch` 1, 8, 32 and 64.
//!
//! The server runs on its own thread, bound to 127.0.0.1:0. One client
//! thread drives [`SOCKETS`] nonblocking sockets; each keeps up to
//! [`WINDOW`] pairs in flight, sending both halves of a pair (`(a, b)` then
//! `(b, a)`, each ID pair used once) and counting the two replies that come
//! back. A pair counts when both replies have arrived. The window keeps the
//! server's receive queue non-empty, so the server's batch size decides how
//! many datagrams each `recvmmsg`/`sendmmsg` moves.
//!
//! Per-source limits are off (every client shares 127.0.0.1); the rest is
//! `ServerConfig::default()` but for a 1 s replay lifetime with room for
//! 2^20 replay entries, sized for this rate.
//!
//! The client uses plain `send`/`recv` (one syscall per datagram: batching
//! the client would need `unsafe`, which lives only in the library's `sys`
//! module), so on a 2-core machine the client's syscalls share the limit
//! with the server's, and pairs/s shows the client's limit as much as the
//! server's. So the bench also prints the server's own CPU time per pair:
//! the thread it runs on and its worker threads, which run the packet loop
//! (from `/proc/self/task/*/schedstat`, in nanoseconds; see `common/cpu.rs`).
//! That is what batching changes.
//!
//! Run with `cargo bench --bench server`.

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/running.rs"]
mod running;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use psync::limit::RateLimit;
use psync::{PeerId, Request, ServerConfig};
use running::Running;

/// Client sockets, each its own source address (port) to the server.
const SOCKETS: usize = 4;
/// Pairs in flight per socket: 2 * SOCKETS * WINDOW = 512 datagrams queued
/// at most, far below what the 4 MiB socket buffers hold, so nothing is
/// lost and the server always has a full batch waiting.
const WINDOW: usize = 64;
/// No reply for this long means datagrams were lost: give up on them.
const STALL: Duration = Duration::from_millis(500);

/// The server thread's name, to find its CPU time in /proc.
const SERVER_THREAD: &str = "psync-bench-srv";

/// CPU time (user + system) the server has used: the thread the bench runs
/// it on and its worker threads, which run the packet loop.
fn server_cpu() -> Option<Duration> {
    cpu::thread_cpu(|n| cpu::is_server(n, SERVER_THREAD))
}

fn start(batch: usize) -> Running {
    let mut cfg = ServerConfig {
        bind: vec!["127.0.0.1:0".parse().unwrap()],
        batch,
        stats_interval: None,
        // Every client here shares 127.0.0.1: a per-source limit would
        // measure the limiter, not the server.
        rate_limit: RateLimit::OFF,
        ..ServerConfig::default()
    };
    // Sized for the rate: ~150k pairs/s remembered for 1 s.
    cfg.engine.capacity = 1 << 18;
    cfg.engine.replay_ttl_ms = 1_000;
    cfg.engine.limits = psync::engine::SourceLimits::OFF;
    cfg.engine.seed = Some(5);
    Running::start(&cfg, SERVER_THREAD, None)
}

fn request(self_id: u32, peer_id: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(self_id),
        peer_id: PeerId::from_u32(peer_id),
    }
    .emit()
}

struct Client {
    sockets: Vec<UdpSocket>,
    next_id: u32,
    lost: u64,
}

impl Client {
    fn new(server: SocketAddr) -> Client {
        let sockets = (0..SOCKETS)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("client socket");
                s.connect(server).expect("connect");
                s.set_nonblocking(true).expect("nonblocking");
                s
            })
            .collect();
        Client {
            sockets,
            next_id: 1,
            lost: 0,
        }
    }

    /// Matches `pairs` pairs and returns how long it took.
    fn run(&mut self, pairs: u64) -> Duration {
        let mut to_start = pairs;
        // Replies still expected, per socket.
        let mut waiting = [0u64; SOCKETS];
        let mut buf = [0u8; 64];
        let start = Instant::now();
        let mut progress = start;
        loop {
            let mut moved = false;
            for (s, owed) in self.sockets.iter().zip(waiting.iter_mut()) {
                while to_start > 0 && *owed < 2 * WINDOW as u64 {
                    let (a, b) = (self.next_id, self.next_id.wrapping_add(1));
                    self.next_id = self.next_id.wrapping_add(2) | 1;
                    // A full socket buffer would be a client problem;
                    // count the pair as lost rather than retry.
                    if s.send(&request(a, b)).is_err() || s.send(&request(b, a)).is_err() {
                        self.lost += 1;
                    } else {
                        *owed += 2;
                    }
                    to_start -= 1;
                }
                loop {
                    match s.recv(&mut buf) {
                        Ok(_) => {
                            *owed = owed.saturating_sub(1);
                            moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("client recv: {e}"),
                    }
                }
            }
            if to_start == 0 && waiting.iter().all(|&w| w == 0) {
                break;
            }
            let now = Instant::now();
            if moved {
                progress = now;
            } else if now - progress > STALL {
                self.lost += waiting.iter().sum::<u64>() / 2;
                waiting = [0; SOCKETS];
                if to_start == 0 {
                    break;
                }
            }
        }
        start.elapsed()
    }
}

fn server(c: &mut Criterion) {
    let mut group = c.benchmark_group("server");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for batch in [1, 8, 32, 64] {
        let server = start(batch);
        let mut client = Client::new(server.addr);
        group.bench_function(BenchmarkId::new("pairs", format!("batch_{batch}")), |b| {
            b.iter_custom(|pairs| client.run(pairs))
        });
        let cpu = server_cpu();
        let counters = server.stop();
        println!(
            "server/pairs/batch_{batch}: {} received, {} matched, {} sent, {} send_dropped, \
             {} replay_full; client lost {} pairs",
            counters.received,
            counters.engine.matched,
            counters.io.sent,
            counters.io.send_dropped,
            counters.engine.replay_full,
            client.lost
        );
        if let Some(cpu) = cpu {
            let per_pair = cpu.as_secs_f64() / counters.engine.matched.max(1) as f64;
            println!(
                "server/pairs/batch_{batch}: server thread CPU {:.2} s for {} pairs: \
                 {:.2} us per pair, so {:.0}k pairs/s per server core if clients kept up",
                cpu.as_secs_f64(),
                counters.engine.matched,
                per_pair * 1e6,
                1e-3 / per_pair,
            );
        }
    }
    group.finish();
}

criterion_group!(benches, server);
criterion_main!(benches);
