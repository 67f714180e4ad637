//! Garbage flood against the real `psync-server` binary on loopback.
//!
//! Starts the binary, sends a few hundred thousand datagrams of random sizes
//! (0 to 65,507 bytes, mostly small) from a handful of sockets, and checks:
//! - the flooding sockets never receive a single byte (no reply to garbage,
//!   and none to the few random 8-byte requests mixed in, which register but
//!   never match);
//! - pairs from fresh sockets still match afterwards, with correct replies;
//! - the server's resident memory (VmRSS) after the flood is within a small
//!   slack of what it was after a warm-up round of the same traffic;
//! - after SIGTERM, the final counters account for every datagram: what the
//!   server counted as received plus what the kernel dropped at its socket
//!   (the `drops` column of /proc/net/udp) is exactly what was sent, and
//!   `bad_size` (with `v2_malformed` for the 152-byte ones) lies between the
//!   non-8-byte datagrams sent minus those drops
//!   and the non-8-byte datagrams sent.
//!
//! Bounded: at most `FLOOD` datagrams and `FLOOD_BUDGET` of sending; the test
//! stops the server itself (and kills it if the test fails midway).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use psync::wire::{PeerId, Reply, Request, REQUEST_LEN};

mod util;

use util::recv;

/// Datagrams in the measured flood ("a few hundred thousand").
const FLOOD: u64 = 300_000;
/// Datagrams in the warm-up round that precedes the first memory sample.
const WARMUP: u64 = 40_000;
/// Sending stops after this long even if `FLOOD` was not reached (slow CI).
const FLOOD_BUDGET: Duration = Duration::from_secs(15);
/// Sockets the flood comes from.
const FLOODERS: usize = 4;
/// Pairs matched after the flood, each from two fresh sockets.
const PAIRS: usize = 300;
/// Pairs matched during warm-up (so the replay table is touched before the
/// first memory sample too).
const WARMUP_PAIRS: usize = 50;
/// Largest UDP payload over IPv4.
const MAX_UDP: usize = 65_507;
/// Resident memory may grow this much between the samples. The tables are
/// allocated at start, but their control bytes are zero pages that become
/// resident when first written; the warm-up writes most of them. 4 MiB is
/// far below what any per-datagram leak would show over 300,000 datagrams
/// (13 bytes each would exceed it).
const RSS_SLACK_KIB: u64 = 4 * 1024;
/// One part in this many flood datagrams is a random 8-byte request.
const REQUEST_SHARE: u64 = 100;
/// How long a pair's peer waits for its reply before retransmitting.
const REPLY_WAIT: Duration = Duration::from_millis(1000);
/// Retransmits before a pair counts as failed.
const TRIES: usize = 5;

/// xorshift64*: a tiny PRNG so the test needs no extra dependency; the seed
/// is printed so a failure can be replayed with `PSYNC_FLOOD_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// The server child process; killed and reaped if the test ends early.
struct ServerProcess {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start() -> (ServerProcess, SocketAddr) {
        let exe = env!("CARGO_BIN_EXE_psync-server");
        let mut args = vec![
            "-4",
            "-p",
            "0",
            "--bind",
            "127.0.0.1",
            "--stats-interval",
            "0",
        ];
        // All traffic here comes from 127.0.0.1. If this build has per-source
        // limits, switch them off (as the README says for load tests): this
        // test is about garbage, not about the limiter.
        let help = Command::new(exe)
            .arg("--help")
            .output()
            .expect("run --help");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in [
            "--rate-limit",
            "--max-pending-per-ip",
            "--max-pending-per-v4-24",
            "--max-pending-per-v6-56",
            "--max-pending-per-v6-48",
        ] {
            if help.contains(flag) {
                args.extend([flag, "0"]);
            }
        }
        let mut child = Command::new(exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psync-server");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ServerProcess { child, stderr: rx };
        let line = server.line_with("psync-server: listening on udp ");
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        (server, addr)
    }

    /// The next stderr line that starts with `prefix` (others are echoed).
    fn line_with(&mut self, prefix: &str) -> String {
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => eprintln!("server: {line}"),
                Err(e) => panic!("waiting for {prefix:?} on the server's stderr: {e}"),
            }
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends SIGTERM, waits for a clean exit, returns the final counters.
    fn terminate(mut self) -> HashMap<String, u64> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: kill(2) takes plain integers; the pid is our own child,
        // not yet reaped, so it cannot name another process.
        let ret = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(ret, 0, "kill: {}", std::io::Error::last_os_error());
        let line = self.line_with("psync-server: final counters: ");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "server exited with {status}");
        line.trim_start_matches("psync-server: final counters: ")
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

/// Datagrams the kernel dropped at the UDP socket bound to `addr`: the last
/// column of its line in /proc/net/udp (local address in hex, as the kernel
/// stores it: little-endian IP on x86, then the port).
fn kernel_drops(addr: SocketAddr) -> u64 {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .unwrap_or_else(|| panic!("{local} not in /proc/net/udp"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// What was sent, by kind.
#[derive(Default, Debug)]
struct Sent {
    /// Every datagram to the server, pairs included.
    total: u64,
    /// Datagrams whose length is not 8: each must count as `bad_size`.
    wrong_size: u64,
    /// Random 8-byte datagrams in the flood.
    random_requests: u64,
}

/// Sends `count` flood datagrams (or until `deadline`) round-robin over the
/// flooders, checking every so often that none of them got anything back.
fn flood(
    server: SocketAddr,
    flooders: &[UdpSocket],
    rng: &mut Rng,
    noise: &[u8],
    count: u64,
    deadline: Instant,
    sent: &mut Sent,
) -> u64 {
    let mut done = 0;
    while done < count && Instant::now() < deadline {
        let len = match rng.below(100) {
            0..=84 => rng.below(65) as usize,
            85..=96 => 65 + rng.below(2048 - 65) as usize,
            _ => 2048 + rng.below((MAX_UDP - 2048 + 1) as u64) as usize,
        };
        let mut req = [0u8; REQUEST_LEN];
        let datagram: &[u8] = if rng.below(REQUEST_SHARE) == 0 {
            req.copy_from_slice(&rng.next().to_le_bytes());
            &req
        } else {
            // Random bytes at a random offset of a random buffer; never 8 long.
            let len = if len == REQUEST_LEN { len + 1 } else { len };
            let at = rng.below((noise.len() - len + 1) as u64) as usize;
            &noise[at..at + len]
        };
        let socket = &flooders[done as usize % flooders.len()];
        match socket.send_to(datagram, server) {
            Ok(_) => {
                sent.total += 1;
                if datagram.len() == REQUEST_LEN {
                    sent.random_requests += 1;
                } else {
                    sent.wrong_size += 1;
                }
            }
            // Loopback can refuse a send under memory pressure; such a
            // datagram never reached the server and is not counted.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => panic!("flood send: {e}"),
        }
        done += 1;
        if done % 10_000 == 0 {
            assert_silent(flooders);
        }
    }
    done
}

/// Fails if any flooding socket has received anything.
fn assert_silent(flooders: &[UdpSocket]) {
    let mut buf = [0u8; 64];
    for s in flooders {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => panic!("a flooding socket got {n} bytes from {from}"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("recv on a flooding socket: {e}"),
        }
    }
}

/// Matches `pairs` pairs from fresh sockets, retransmitting as a client
/// would, and checks each reply. Returns the number of pairs matched.
fn match_pairs(server: SocketAddr, rng: &mut Rng, pairs: usize, sent: &mut Sent) -> usize {
    let mut matched = 0;
    for _ in 0..pairs {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        b.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        // Random 32-bit IDs, distinct; the flood's random requests could
        // collide only with a chance of about 2^-64 per pair.
        let (x, y) = loop {
            let v = rng.next();
            let (x, y) = (v as u32, (v >> 32) as u32);
            if x != y {
                break (x, y);
            }
        };
        let ra = Request {
            self_id: PeerId::from_u32(x),
            peer_id: PeerId::from_u32(y),
        };
        let mut replies = None;
        for _ in 0..TRIES {
            // Same socket, so `a`'s request is queued first and `a` waits.
            a.send_to(&ra.emit(), server).unwrap();
            b.send_to(&ra.counterpart().emit(), server).unwrap();
            sent.total += 2;
            if let (Some(ga), Some(gb)) = (recv(&a), recv(&b)) {
                replies = Some((ga, gb));
                break;
            }
        }
        let Some((ga, gb)) = replies else { continue };
        let ga = Reply::parse(&ga).expect("reply to the waiting peer parses");
        let gb = Reply::parse(&gb).expect("reply to the completing peer parses");
        assert_eq!(ga.peer, b.local_addr().unwrap(), "a told the wrong partner");
        assert_eq!(gb.peer, a.local_addr().unwrap(), "b told the wrong partner");
        assert_eq!(ga.src_port, gb.dst_port, "ports not complementary");
        assert_eq!(ga.dst_port, gb.src_port, "ports not complementary");
        assert_ne!(ga.src_port, ga.dst_port);
        assert!(
            ga.src_port >= 1024 && ga.dst_port >= 1024,
            "ports outside the default range"
        );
        matched += 1;
    }
    matched
}

#[test]
fn garbage_flood_gets_no_reply_and_leaves_matching_and_memory_intact() {
    let seed = std::env::var("PSYNC_FLOOD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("flood: seed {seed} (set PSYNC_FLOOD_SEED to replay)");
    let mut rng = Rng(seed);
    let noise: Vec<u8> = (0..(MAX_UDP + 4096) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();

    let started = Instant::now();
    let (server, addr) = ServerProcess::start();
    let flooders: Vec<UdpSocket> = (0..FLOODERS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut sent = Sent::default();

    // Warm-up: the same traffic, so first-touch pages are resident before
    // the first sample. The pairs after it also prove the server has read
    // everything sent before them (one socket, one queue, in order).
    let deadline = Instant::now() + FLOOD_BUDGET;
    flood(
        addr, &flooders, &mut rng, &noise, WARMUP, deadline, &mut sent,
    );
    let warm = match_pairs(addr, &mut rng, WARMUP_PAIRS, &mut sent);
    assert_eq!(warm, WARMUP_PAIRS, "pairs failed to match during warm-up");
    let rss_warm = server.rss_kib();

    let deadline = Instant::now() + FLOOD_BUDGET;
    let t = Instant::now();
    let flooded = flood(
        addr, &flooders, &mut rng, &noise, FLOOD, deadline, &mut sent,
    );
    let flood_time = t.elapsed();
    assert!(
        flooded >= FLOOD / 10,
        "only {flooded} datagrams sent in {FLOOD_BUDGET:?}"
    );

    let matched = match_pairs(addr, &mut rng, PAIRS, &mut sent);
    assert_eq!(matched, PAIRS, "pairs failed to match after the flood");
    let rss_end = server.rss_kib();
    assert_silent(&flooders);
    let drops = kernel_drops(addr);

    let c = server.terminate();
    eprintln!(
        "flood: {flooded} datagrams in {flood_time:?}; sent {sent:?}; kernel drops {drops}; \
         VmRSS {rss_warm} KiB after warm-up, {rss_end} KiB at the end; total {:?}",
        started.elapsed()
    );
    eprintln!("flood: final counters {c:?}");
    let get = |k: &str| {
        *c.get(k)
            .unwrap_or_else(|| panic!("no {k} in the final counters"))
    };

    assert!(
        rss_end <= rss_warm + RSS_SLACK_KIB,
        "VmRSS grew from {rss_warm} KiB to {rss_end} KiB"
    );
    // Every datagram was either read by the server or dropped by the kernel.
    assert_eq!(get("recv_errors"), 0);
    assert_eq!(
        get("received") + drops,
        sent.total,
        "received + kernel drops != sent"
    );
    // A wrong-size datagram of exactly the v2 request's length is v2 to the
    // server, and dropped as a malformed one.
    let bad = get("bad_size") + get("v2_malformed");
    assert!(bad > 0);
    assert!(
        bad <= sent.wrong_size,
        "bad_size {bad} > {} sent",
        sent.wrong_size
    );
    assert!(
        bad + drops >= sent.wrong_size,
        "bad_size {bad} + drops {drops} < {} wrong-size datagrams sent",
        sent.wrong_size
    );
    // Only the pairs matched: the random requests registered (or were
    // self-pairs) and were never answered.
    assert_eq!(get("matched"), (WARMUP_PAIRS + PAIRS) as u64);
    assert!(get("registered") + get("self_pair") <= sent.random_requests + get("matched"));
    assert_eq!(get("sent"), 2 * get("matched") + get("replayed"));
}
