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
//! Both run in this process on their own thread (named, so that their CPU
//! time can be read from `/proc/self/task/*/stat`), one at a time, both in
//! each round, psync first in odd rounds and the reflector first in even
//! ones (so that neither always gets the second turn, whatever the machine
//! does between the two), each bound to the first CPU the process may use;
//! one client thread bound to the second drives each with a
//! closed loop of [`WINDOW`] pairs in flight, batched through the same
//! `psync::sys` calls, from [`SOCKETS`] sockets on distinct 127.x.y.1
//! addresses (distinct /24s, so psync's default per-source pending limits
//! stay on; no source holds more than a few registrations). psync runs with
//! `ServerConfig::default()` except `--rate-limit 0`: a rate limit of 100
//! datagrams/s per source would throttle a loopback flood from 64 sources.
//!
//! Run with `cargo bench --bench reflector` (rounds and seconds per round:
//! `PSYNC_REFLECT_ROUNDS`, default 6; `PSYNC_REFLECT_SECS`, default 3;
//! `PSYNC_REFLECT_PIN=0` leaves the threads unbound). Prints each round
//! (with which server ran first) and the median ratio of psync's CPU per
//! pair to the reflector's.

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
use psync::{Counters, PeerId, Request, ServerConfig};

/// Client sockets, each on its own 127.x.y.1 address.
const SOCKETS: usize = 64;
/// Pairs in flight: enough that the server always has a batch waiting.
const WINDOW: u64 = 512;
/// Datagrams per `recvmmsg`/`sendmmsg`, as the server's default `--batch`.
const BATCH: usize = 64;
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
        std::thread::sleep(Duration::from_millis(200));
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

/// One server's run of a round.
struct Run {
    /// Pairs per second the client completed.
    rate: f64,
    /// The server's CPU (its threads) per completed pair.
    us_per_pair: f64,
    /// psync's final counters (none for the reflector).
    counters: Option<Counters>,
}

/// psync, default flags but the rate limit, for `secs` under `client`.
fn run_psync(client: &mut Client, secs: Duration, cpu: Option<usize>) -> Run {
    let cfg = ServerConfig {
        bind: vec!["127.0.0.1:0".parse().unwrap()],
        stats_interval: None,
        rate_limit: RateLimit::OFF,
        ..ServerConfig::default()
    };
    let server = running::Running::start(&cfg, SERVER_THREAD, cpu);
    std::thread::sleep(Duration::from_millis(100));
    let cpu0 = cpu::thread_cpu(|n| cpu::is_server(n, SERVER_THREAD)).unwrap_or_default();
    let t = Instant::now();
    let pairs = client.run(server.addr, secs);
    let took = t.elapsed();
    let cpu = cpu::thread_cpu(|n| cpu::is_server(n, SERVER_THREAD)).unwrap_or_default() - cpu0;
    let c = server.stop();
    Run {
        rate: pairs as f64 / took.as_secs_f64(),
        us_per_pair: cpu.as_secs_f64() * 1e6 / pairs.max(1) as f64,
        counters: Some(c),
    }
}

/// The reflector for `secs` under `client`.
fn run_reflector(client: &mut Client, secs: Duration, cpu: Option<usize>) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, thread) = reflector(stop.clone(), cpu);
    std::thread::sleep(Duration::from_millis(100));
    let cpu0 = cpu::thread_cpu(|n| n == REFLECTOR_THREAD).unwrap_or_default();
    let t = Instant::now();
    let pairs = client.run(addr, secs);
    let took = t.elapsed();
    let cpu = cpu::thread_cpu(|n| n == REFLECTOR_THREAD).unwrap_or_default() - cpu0;
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    Run {
        rate: pairs as f64 / took.as_secs_f64(),
        us_per_pair: cpu.as_secs_f64() * 1e6 / pairs.max(1) as f64,
        counters: None,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too:
    // then only a smoke round.
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench {
        env("PSYNC_REFLECT_ROUNDS", 6, 1..=1000)
    } else {
        1
    };
    let secs = Duration::from_secs(if bench {
        env("PSYNC_REFLECT_SECS", 3, 1..=600)
    } else {
        1
    });
    // The server under test on one CPU, the client on another, each bound
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
    let mut client = Client::new();
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        // Odd rounds run psync first, even rounds the reflector: whatever
        // the machine does to the second of two runs (caches, frequency,
        // neighbours) falls on each side equally often.
        let psync_first = round % 2 == 1;
        let (p, r) = if psync_first {
            let p = run_psync(&mut client, secs, server_cpu);
            (p, run_reflector(&mut client, secs, server_cpu))
        } else {
            let r = run_reflector(&mut client, secs, server_cpu);
            (run_psync(&mut client, secs, server_cpu), r)
        };
        let ratio = p.us_per_pair / r.us_per_pair;
        ratios.push(ratio);
        let c = p.counters.expect("psync's counters");
        println!(
            "round {round} ({} first): psync {:.0} pairs/s, {:.2} us CPU/pair \
             (matched {}, replay_full {}, table_full {}, per-source limited {}); \
             reflector {:.0} pairs/s, {:.2} us CPU/pair; ratio {ratio:.3}",
            if psync_first { "psync" } else { "reflector" },
            p.rate,
            p.us_per_pair,
            c.engine.matched,
            c.engine.replay_full,
            c.engine.table_full,
            c.engine.per_ip_limit + c.engine.per_prefix_limit,
            r.rate,
            r.us_per_pair,
        );
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
    println!(
        "psync / reflector CPU per pair: median {median:.3}, min {:.3}, max {:.3} over {} rounds",
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    );
    let _ = io::Write::flush(&mut io::stdout());
}
