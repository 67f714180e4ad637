//! `--workers` over real sockets on this machine (whatever its core count):
//! thousands of pairs from many sockets over four workers, IPv4 and IPv6;
//! replay, refresh, expiry and bad input as with one worker; the balance
//! read from `/metrics`; per-source limits across workers; a panicking
//! worker; SIGTERM on the binary.
#![cfg(all(target_os = "linux", not(feature = "portable-io")))]

mod util;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use psync::engine::SourceLimits;
use psync::limit::RateLimit;
use psync::server::steering::Steering;
use psync::wire::Reply;
use psync::{Server, ServerConfig};
use util::{assert_accounted, config, recv, request, socket, TestServer};

const WAIT: Duration = Duration::from_secs(2);
/// How long a test waits to be sure no reply comes.
const SILENCE: Duration = Duration::from_millis(300);

fn workers(n: usize) -> ServerConfig {
    let mut cfg = config();
    cfg.workers = n;
    cfg
}

fn has_ipv6() -> bool {
    UdpSocket::bind("[::1]:0").is_ok()
}

/// GET /metrics, the body.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` reads `want` (the workers publish their counters
/// between batches), or gives the last page after `patience`.
fn scrape_within(addr: SocketAddr, series: &str, want: f64, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        let page = scrape(addr);
        if value(&page, series) == Some(want) || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`scrape_within`] for a count that must come.
fn scrape_until(addr: SocketAddr, series: &str, want: f64) -> String {
    scrape_within(addr, series, want, Duration::from_secs(10))
}

/// A cheap generator for IDs (xorshift).
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

/// Runs `pairs` pairs between `sockets` client sockets on `ip` against
/// `server`, in waves in which each unordered socket pair carries at most
/// one pair (replies carry no IDs: the receiving socket and the partner
/// named tell which pair a reply is for). Every reply is checked; missing
/// ones are asked for again (the replay answers). Returns the pairs matched.
fn pairs_from_many_sockets(server: SocketAddr, ip: &str, pairs: usize) -> usize {
    const SOCKETS: usize = 32;
    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| {
            let s = socket(ip, Duration::from_millis(1));
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let addrs: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
    let index: HashMap<SocketAddr, usize> =
        addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let mut socket_pairs = Vec::new();
    for a in 0..SOCKETS {
        for b in a + 1..SOCKETS {
            socket_pairs.push((a, b));
        }
    }
    let mut ids = Ids(0x5eed_0000 ^ server.port() as u64);
    let mut done = 0;
    let mut first_id = 1u32;
    let mut buf = [0u8; 64];
    while done < pairs {
        let wave = (pairs - done).min(200);
        // A different set of socket pairs each wave.
        let start = ids.next() as usize % socket_pairs.len();
        let wave_pairs: Vec<(usize, usize)> = (0..wave)
            .map(|k| socket_pairs[(start + k * 2) % socket_pairs.len()])
            .collect();
        let distinct: HashSet<_> = wave_pairs.iter().collect();
        assert_eq!(distinct.len(), wave);
        // by (receiver, partner) -> (pair, which side: 0 = a, 1 = b)
        let mut expect: HashMap<(usize, usize), usize> = HashMap::new();
        let mut got: Vec<[Option<Reply>; 2]> = vec![[None, None]; wave];
        let reqs: Vec<([u8; 8], [u8; 8])> = (0..wave)
            .map(|k| {
                let (x, y) = (first_id + 2 * k as u32, first_id + 2 * k as u32 + 1);
                (request(x, y), request(y, x))
            })
            .collect();
        first_id += 2 * wave as u32;
        for (k, &(a, b)) in wave_pairs.iter().enumerate() {
            expect.insert((a, b), k);
            expect.insert((b, a), k);
        }
        let send = |k: usize, side: usize| {
            let (a, b) = wave_pairs[k];
            let (s, r) = if side == 0 {
                (a, reqs[k].0)
            } else {
                (b, reqs[k].1)
            };
            socks[s].send_to(&r, server).unwrap();
        };
        for k in 0..wave {
            send(k, 0);
            send(k, 1);
        }
        for attempt in 0..5 {
            let deadline = Instant::now() + Duration::from_millis(500 + 500 * attempt);
            while got.iter().any(|g| g.iter().any(Option::is_none)) && Instant::now() < deadline {
                let mut any = false;
                for (i, s) in socks.iter().enumerate() {
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        any = true;
                        assert_eq!(from, server, "a reply from the server's address");
                        let r = Reply::parse(&buf[..n]).expect("a valid reply");
                        let j = *index.get(&r.peer).expect("the partner is one of ours");
                        let k = *expect
                            .get(&(i, j))
                            .unwrap_or_else(|| panic!("socket {i} was told of {j}: not its pair"));
                        let side = usize::from(wave_pairs[k].0 != i);
                        match got[k][side] {
                            None => got[k][side] = Some(r),
                            Some(old) => assert_eq!(old, r, "a replay differs from the reply"),
                        }
                    }
                }
                if !any {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let missing: Vec<(usize, usize)> = (0..wave)
                .flat_map(|k| (0..2).map(move |s| (k, s)))
                .filter(|&(k, s)| got[k][s].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            for (k, s) in missing {
                send(k, s);
            }
        }
        for (k, g) in got.iter().enumerate() {
            let (Some(ra), Some(rb)) = (g[0], g[1]) else {
                panic!("pair {k} of the wave got no reply");
            };
            assert_eq!((ra.src_port, ra.dst_port), (rb.dst_port, rb.src_port));
            assert_ne!(ra.src_port, ra.dst_port);
        }
        done += wave;
    }
    done
}

#[test]
fn thousands_of_pairs_over_four_workers_ipv4_and_ipv6() {
    let v6 = has_ipv6();
    let binds: &[&str] = if v6 {
        &["127.0.0.1:0", "[::1]:0"]
    } else {
        &["127.0.0.1:0"]
    };
    let server = TestServer::start_on(workers(4), binds);
    let mut total = pairs_from_many_sockets(server.addrs[0], "127.0.0.1", 3000);
    if v6 {
        total += pairs_from_many_sockets(server.addrs[1], "::1", 2000);
    } else {
        eprintln!("IPv6 part skipped: this host has no IPv6 loopback");
    }
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.matched as usize, total);
    assert_eq!(c.io.send_dropped + c.io.send_errors, 0);
}

#[test]
fn replay_refresh_expiry_and_bad_input_as_with_one_worker() {
    let mut cfg = workers(4);
    cfg.engine.ttl_ms = 300;
    let server = TestServer::start(cfg);
    let to = server.addr();
    // Sixteen pairs, so that every worker has some.
    let mut expected_replays = 0;
    for p in 0..16u32 {
        let (a, b) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", WAIT));
        let (x, y) = (100 + 2 * p, 101 + 2 * p);
        a.send_to(&request(x, y), to).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        b.send_to(&request(y, x), to).unwrap();
        let (ra, rb) = (recv(&a).expect("reply"), recv(&b).expect("reply"));
        assert_eq!(Reply::parse(&ra).unwrap().peer, b.local_addr().unwrap());
        // Retransmits get the identical reply.
        a.send_to(&request(x, y), to).unwrap();
        assert_eq!(recv(&a), Some(ra));
        b.send_to(&request(y, x), to).unwrap();
        assert_eq!(recv(&b), Some(rb));
        expected_replays += 2;
    }
    // Refresh: a pending peer that moves is answered at its new address.
    let mut moved = Vec::new();
    for p in 0..8u32 {
        let (old, new, b) = (
            socket("127.0.0.1", SILENCE),
            socket("127.0.0.1", WAIT),
            socket("127.0.0.1", WAIT),
        );
        let (x, y) = (1000 + 2 * p, 1001 + 2 * p);
        old.send_to(&request(x, y), to).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        new.send_to(&request(x, y), to).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        b.send_to(&request(y, x), to).unwrap();
        let rb = Reply::parse(&recv(&b).expect("reply")).unwrap();
        assert_eq!(rb.peer, new.local_addr().unwrap());
        assert!(recv(&new).is_some());
        moved.push(old);
    }
    // The old addresses heard nothing (it would have come by now).
    for old in &moved {
        old.set_nonblocking(true).unwrap();
        assert_eq!(recv(old), None);
    }
    // Expiry: registrations older than the ttl are gone; the late partner
    // registers afresh and hears nothing.
    let lonely: Vec<UdpSocket> = (0..8).map(|_| socket("127.0.0.1", SILENCE)).collect();
    for (p, s) in lonely.iter().enumerate() {
        s.send_to(&request(5000 + 2 * p as u32, 5001 + 2 * p as u32), to)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(700));
    let late = socket("127.0.0.1", SILENCE);
    for p in 0..8u32 {
        late.send_to(&request(5001 + 2 * p, 5000 + 2 * p), to)
            .unwrap();
    }
    assert_eq!(recv(&late), None);
    // Anything for the lonely ones would have come by now.
    for s in &lonely {
        s.set_nonblocking(true).unwrap();
        assert_eq!(recv(s), None);
    }
    // Bad sizes and self-pairs: no reply.
    let bad = socket("127.0.0.1", SILENCE);
    for len in [0usize, 1, 7, 9, 20, 152, 400] {
        bad.send_to(&vec![7u8; len], to).unwrap();
    }
    for id in [1u32, 77, 0xffff_ffff] {
        bad.send_to(&request(id, id), to).unwrap();
    }
    assert_eq!(recv(&bad), None);
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.matched, 16 + 8);
    assert_eq!(c.engine.replayed, expected_replays);
    assert_eq!(c.engine.refreshed, 8);
    // 152 bytes is a v2 request's size: not one, so malformed v2.
    assert_eq!(c.engine.bad_size, 6);
    assert_eq!(c.io.v2_malformed, 1);
    assert_eq!(c.engine.self_pair, 3);
    // The late partners wait, or have expired in turn by now.
    assert!(c.engine.expired >= 8);
    assert_eq!(c.engine.expired + c.engine.pending, 16);
    assert_eq!(c.engine.registered, 16 + 8 + 8 + 8);
}

#[test]
fn a_uniform_load_is_balanced_across_workers() {
    let mut cfg = workers(4);
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start(cfg);
    let metrics = server.metrics_addr.unwrap();
    let socks: Vec<UdpSocket> = (0..8).map(|_| socket("127.0.0.1", SILENCE)).collect();
    let mut ids = Ids(42);
    const SENT: usize = 8000;
    for k in 0..SENT {
        let (x, y) = (ids.next(), ids.next());
        socks[k % socks.len()]
            .send_to(&request(x, y | 1), server.addr())
            .unwrap();
        if k % 500 == 499 {
            // Paced, so no socket buffer overflows on a busy machine.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let page = scrape_until(metrics, "psync_received_total", SENT as f64);
    assert_eq!(
        value(&page, "psync_received_total"),
        Some(SENT as f64),
        "{page}"
    );
    assert_eq!(value(&page, "psync_workers"), Some(4.0));
    let shares: Vec<f64> = (0..4)
        .map(|k| {
            value(
                &page,
                &format!("psync_worker_received_total{{worker=\"{k}\"}}"),
            )
            .expect("a worker series")
        })
        .collect();
    for s in &shares {
        let ratio = s / (SENT as f64 / 4.0);
        assert!((0.8..=1.2).contains(&ratio), "worker shares {shares:?}");
    }
    assert_eq!(shares.iter().sum::<f64>(), SENT as f64);
}

/// `count` distinct pairs, as (self, peer) IDs, whose requests the server's
/// steering sends to `worker`.
fn pairs_on(steering: &Steering, worker: u32, count: usize, salt: u64) -> Vec<(u32, u32)> {
    let mut ids = Ids(salt);
    let mut out = Vec::new();
    while out.len() < count {
        let (x, y) = (ids.next(), ids.next());
        if x != y && steering.worker(&request(x, y)) == Some(worker) {
            out.push((x, y));
        }
    }
    out
}

fn with_limits(n: usize, per_ip: u32, rate: RateLimit) -> ServerConfig {
    let mut cfg = workers(n);
    cfg.engine.limits = SourceLimits {
        per_ip,
        ..SourceLimits::OFF
    };
    cfg.rate_limit = rate;
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    cfg
}

/// One source spraying pairs over all workers holds at most its pending
/// limit in all; one whose pairs all land on one worker gets the whole
/// limit there (after a retransmit or two, as the share moves).
#[test]
fn the_pending_limit_holds_across_workers() {
    const LIMIT: u32 = 16;
    let mut cfg = with_limits(4, LIMIT, RateLimit::OFF);
    cfg.bind = vec!["127.0.0.1:0".parse().unwrap()];
    let server = Server::bind(&cfg).unwrap();
    let steering = server.steering().expect("four workers steer");
    let server = TestServer::from_server(server);
    let metrics = server.metrics_addr.unwrap();
    // The sprayer: 100 pairs with random IDs, sent five times over.
    let sprayer = socket("127.0.0.2", SILENCE);
    let mut ids = Ids(7);
    let sprayed: Vec<(u32, u32)> = (0..100).map(|_| (ids.next(), ids.next() | 1)).collect();
    for _ in 0..5 {
        for &(x, y) in &sprayed {
            sprayer.send_to(&request(x, y), server.addr()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let page = scrape_until(metrics, "psync_received_total", 500.0);
    let held = value(&page, "psync_pending").unwrap();
    assert!(
        held <= f64::from(LIMIT) && held >= f64::from(LIMIT) / 2.0,
        "the sprayer holds {held} of its {LIMIT}"
    );
    // The concentrated source: 16 pairs that all land on worker 2, sent
    // until they are all held (each round a retransmit, as a client does).
    let focused = socket("127.0.0.3", SILENCE);
    let mine = pairs_on(&steering, 2, LIMIT as usize + 1, 99);
    let before = held;
    let mut rounds = 0;
    let mut page;
    loop {
        for &(x, y) in &mine[..LIMIT as usize] {
            focused.send_to(&request(x, y), server.addr()).unwrap();
        }
        rounds += 1;
        page = scrape_within(
            metrics,
            "psync_pending",
            before + f64::from(LIMIT),
            Duration::from_millis(300),
        );
        if value(&page, "psync_pending") == Some(before + f64::from(LIMIT)) || rounds == 20 {
            break;
        }
    }
    assert_eq!(
        value(&page, "psync_pending"),
        Some(before + f64::from(LIMIT)),
        "after {rounds} rounds:\n{page}"
    );
    // And not one more.
    let (x, y) = mine[LIMIT as usize];
    for _ in 0..3 {
        focused.send_to(&request(x, y), server.addr()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.pending as f64, before + f64::from(LIMIT));
    assert!(c.engine.per_ip_limit > 0);
}

/// The rate limit across workers: a source spraying over all of them gets
/// no more than the burst plus the rate in all; one whose datagrams all land
/// on one worker gets a whole burst there once its share has moved.
#[test]
fn the_rate_limit_holds_across_workers() {
    let rate = RateLimit {
        per_second: 40,
        burst: 40,
        sources: 1024,
    };
    let mut cfg = with_limits(4, 0, rate);
    cfg.bind = vec!["127.0.0.1:0".parse().unwrap()];
    let server = Server::bind(&cfg).unwrap();
    let steering = server.steering().expect("four workers steer");
    let server = TestServer::from_server(server);
    let metrics = server.metrics_addr.unwrap();
    // The sprayer: 400 datagrams for random pairs, as fast as it can.
    let sprayer = socket("127.0.0.2", SILENCE);
    let mut ids = Ids(11);
    let start = Instant::now();
    for _ in 0..400 {
        sprayer
            .send_to(&request(ids.next(), ids.next() | 1), server.addr())
            .unwrap();
    }
    let page = scrape_until(metrics, "psync_received_total", 400.0);
    let span = start.elapsed().as_secs_f64();
    let limited = value(&page, "psync_dropped_total{reason=\"rate_limited\"}").unwrap();
    let allowed = 400.0 - limited;
    // The burst, the rate over the time it took, and rounding (one per worker).
    let most = 40.0 + 40.0 * span + 4.0;
    assert!(
        allowed <= most,
        "the sprayer got {allowed} datagrams through in {span:.2} s (at most {most:.0})"
    );
    // The focused source: bursts of 40 for pairs on worker 1, a second
    // apart (the bucket refills), until one passes whole.
    let focused = socket("127.0.0.3", SILENCE);
    let mine = pairs_on(&steering, 1, 40, 5);
    let mut received = 400.0;
    let mut passed = false;
    for _ in 0..8 {
        let before = value(
            &scrape_until(metrics, "psync_received_total", received),
            "psync_dropped_total{reason=\"rate_limited\"}",
        )
        .unwrap();
        for &(x, y) in &mine {
            focused.send_to(&request(x, y), server.addr()).unwrap();
        }
        received += 40.0;
        let page = scrape_until(metrics, "psync_received_total", received);
        let after = value(&page, "psync_dropped_total{reason=\"rate_limited\"}").unwrap();
        if after == before {
            passed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert!(passed, "a whole burst of 40 never passed on one worker");
    let c = server.stop();
    assert_accounted(&c);
}

/// A worker that panics takes the server down with an error that names it.
#[test]
fn a_worker_that_panics_stops_the_server() {
    let mut cfg = workers(2);
    cfg.bind = vec!["127.0.0.1:0".parse().unwrap()];
    let mut server = Server::bind(&cfg).unwrap();
    server.on_reload(Box::new(|| {
        let apply: psync::server::Apply = Arc::new(|t| {
            if t.worker == 1 {
                panic!("a test asked worker 1 to panic");
            }
        });
        Ok(("a reload that panics".into(), apply))
    }));
    let handle = server.shutdown_handle();
    let addr = server.local_addrs()[0];
    let thread = std::thread::spawn(move || server.run());
    // It serves first.
    let (a, b) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", WAIT));
    a.send_to(&request(1, 2), addr).unwrap();
    b.send_to(&request(2, 1), addr).unwrap();
    assert!(recv(&a).is_some() && recv(&b).is_some());
    handle.reload();
    let err = thread.join().unwrap().expect_err("run fails");
    let msg = err.to_string();
    assert!(
        msg.contains("worker 1 panicked: a test asked worker 1 to panic"),
        "{msg}"
    );
}

/// The binary with four workers: SIGTERM gives one summed set of final
/// counters and the per-worker split, and exits 0.
#[test]
fn sigterm_with_four_workers_exits_0_with_summed_counters() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_psync-server"))
        .args(["-4", "-p", "0", "--bind", "127.0.0.1", "--workers", "4"])
        .args([
            "--rate-limit",
            "0",
            "--max-pending-per-ip",
            "0",
            "--capacity",
            "4096",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr: SocketAddr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
        if let Some(a) = line.trim().strip_prefix("psync-server: listening on udp ") {
            break a.parse().unwrap();
        }
    };
    for p in 0..40u32 {
        let (a, b) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", WAIT));
        a.send_to(&request(10 + 2 * p, 11 + 2 * p), addr).unwrap();
        b.send_to(&request(11 + 2 * p, 10 + 2 * p), addr).unwrap();
        assert!(recv(&a).is_some() && recv(&b).is_some());
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our child.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(
        rest.contains("final counters: received=80 ") && rest.contains(" matched=40 "),
        "{rest}"
    );
    let split = rest
        .lines()
        .find_map(|l| l.strip_prefix("psync-server: per worker: received "))
        .expect("the per-worker line");
    let received: u64 = split
        .split(',')
        .next()
        .unwrap()
        .split('/')
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert_eq!(received, 80, "{split}");
}
