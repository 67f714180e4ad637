//! The server over real loopback sockets: exact reply bytes, port
//! assignment, replay, expiry, bad input, capacity, and many pairs at once.

mod util;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use psync::wire::Reply;
use util::{assert_accounted, config, recv, request, socket, TestServer};

const WAIT: Duration = Duration::from_secs(2);
/// How long a test waits to be sure no reply comes. Loopback answers in
/// microseconds; this is the margin, not a measurement.
const SILENCE: Duration = Duration::from_millis(300);

/// Registers `a` then `b` as a pair and returns (reply to a, reply to b).
fn pair(server: SocketAddr, a: &UdpSocket, b: &UdpSocket, ids: (u32, u32)) -> (Vec<u8>, Vec<u8>) {
    a.send_to(&request(ids.0, ids.1), server).unwrap();
    // Make sure `a` is the waiting peer: its request must arrive first. The
    // server answers nothing to a lone registration, so wait a moment.
    std::thread::sleep(Duration::from_millis(20));
    b.send_to(&request(ids.1, ids.0), server).unwrap();
    (
        recv(a).expect("reply to the waiting peer"),
        recv(b).expect("reply to the completing peer"),
    )
}

fn port_of(reply: &[u8]) -> (u16, u16) {
    (
        u16::from_le_bytes([reply[0], reply[1]]),
        u16::from_le_bytes([reply[2], reply[3]]),
    )
}

#[test]
fn ipv4_reply_bytes_are_exact() {
    let server = TestServer::start(config());
    let (a, b) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", WAIT));
    let (ra, rb) = pair(server.addr(), &a, &b, (0xdead_beef, 0xcafe_babe));
    assert_eq!(ra.len(), 20);
    assert_eq!(rb.len(), 20);
    let (p1, p2) = port_of(&ra);
    // The waiting peer gets {P1, P2}, the completing one {P2, P1}.
    assert_eq!(port_of(&rb), (p2, p1));
    assert_ne!(p1, p2);
    assert!(p1 >= 1024 && p2 >= 1024);
    let mut want_a = vec![0u8; 20];
    want_a[0..4].copy_from_slice(&ra[0..4]);
    want_a[4..6].copy_from_slice(&2u16.to_le_bytes());
    want_a[6..8].copy_from_slice(&b.local_addr().unwrap().port().to_be_bytes());
    want_a[8..12].copy_from_slice(&[127, 0, 0, 1]);
    assert_eq!(ra, want_a, "reply to the waiting peer names the completer");
    let mut want_b = vec![0u8; 20];
    want_b[0..4].copy_from_slice(&rb[0..4]);
    want_b[4..6].copy_from_slice(&2u16.to_le_bytes());
    want_b[6..8].copy_from_slice(&a.local_addr().unwrap().port().to_be_bytes());
    want_b[8..12].copy_from_slice(&[127, 0, 0, 1]);
    assert_eq!(rb, want_b, "reply to the completer names the waiting peer");
    let c = server.stop();
    assert_eq!(
        (c.engine.registered, c.engine.matched, c.io.sent),
        (1, 1, 2)
    );
}

#[test]
fn ipv6_reply_bytes_are_exact() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let server = TestServer::start_on(config(), &["127.0.0.1:0", "[::1]:0"]);
    let v6 = server.addrs[1];
    let (a, b) = (socket("::1", WAIT), socket("::1", WAIT));
    let (ra, rb) = pair(v6, &a, &b, (1, 2));
    assert_eq!(ra.len(), 32);
    let (p1, p2) = port_of(&ra);
    assert_eq!(port_of(&rb), (p2, p1));
    let mut want = vec![0u8; 32];
    want[0..4].copy_from_slice(&ra[0..4]);
    want[4..6].copy_from_slice(&10u16.to_le_bytes());
    want[6..8].copy_from_slice(&b.local_addr().unwrap().port().to_be_bytes());
    want[12..28].copy_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    assert_eq!(ra, want);
    assert_eq!(
        Reply::parse(&rb).unwrap().peer,
        a.local_addr().unwrap(),
        "the completer learns the waiting peer's address"
    );
}

#[test]
fn families_never_match_each_other() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let server = TestServer::start_on(config(), &["127.0.0.1:0", "[::1]:0"]);
    let a = socket("127.0.0.1", SILENCE);
    let b = socket("::1", SILENCE);
    a.send_to(&request(5, 6), server.addrs[0]).unwrap();
    b.send_to(&request(6, 5), server.addrs[1]).unwrap();
    assert_eq!(recv(&a), None);
    assert_eq!(recv(&b), None);
    let c = server.stop();
    assert_eq!(
        (c.engine.registered, c.engine.matched, c.engine.pending),
        (2, 0, 2)
    );
}

#[test]
fn retransmits_get_the_identical_reply() {
    let server = TestServer::start(config());
    let (a, b) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", WAIT));
    let (ra, rb) = pair(server.addr(), &a, &b, (10, 20));
    for _ in 0..3 {
        a.send_to(&request(10, 20), server.addr()).unwrap();
        assert_eq!(recv(&a).as_ref(), Some(&ra));
        b.send_to(&request(20, 10), server.addr()).unwrap();
        assert_eq!(recv(&b).as_ref(), Some(&rb));
    }
    // The same request from another address is a fresh registration: no reply.
    let c = socket("127.0.0.1", SILENCE);
    c.send_to(&request(10, 20), server.addr()).unwrap();
    assert_eq!(recv(&c), None);
    let counters = server.stop();
    assert_accounted(&counters);
    assert_eq!(counters.engine.replayed, 6);
    assert_eq!(counters.engine.matched, 1);
    assert_eq!(counters.engine.registered, 2);
}

#[test]
fn a_pending_peer_that_moves_is_answered_at_its_new_address() {
    let server = TestServer::start(config());
    let old = socket("127.0.0.1", SILENCE);
    let new = socket("127.0.0.1", WAIT);
    let b = socket("127.0.0.1", WAIT);
    old.send_to(&request(1, 2), server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    new.send_to(&request(1, 2), server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.send_to(&request(2, 1), server.addr()).unwrap();
    let rb = recv(&b).expect("completer answered");
    assert_eq!(Reply::parse(&rb).unwrap().peer, new.local_addr().unwrap());
    assert!(recv(&new).is_some());
    assert_eq!(recv(&old), None, "the stale address gets nothing");
    assert_eq!(server.stop().engine.refreshed, 1);
}

#[test]
fn registrations_expire() {
    let mut cfg = config();
    cfg.engine.ttl_ms = 150;
    let server = TestServer::start(cfg);
    let a = socket("127.0.0.1", SILENCE);
    let b = socket("127.0.0.1", SILENCE);
    a.send_to(&request(1, 2), server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    b.send_to(&request(2, 1), server.addr()).unwrap();
    assert_eq!(recv(&a), None);
    assert_eq!(recv(&b), None);
    // The sweep reclaims b's registration too once it expires: the table is
    // swept every quarter ttl, so three ttls are ample.
    std::thread::sleep(Duration::from_millis(450));
    let counters = server.stop();
    assert_eq!(counters.engine.matched, 0);
    assert_eq!(counters.engine.registered, 2);
    assert_eq!(counters.engine.expired, 2);
    assert_eq!(counters.engine.pending, 0);
}

#[test]
fn bad_input_gets_no_reply_and_is_counted() {
    let server = TestServer::start(config());
    let s = socket("127.0.0.1", SILENCE);
    let sizes = [0usize, 1, 4, 7, 9, 16, 17, 20, 32, 100, 1500, 9000, 65507];
    for &n in &sizes {
        s.send_to(&vec![0x5a; n], server.addr()).unwrap();
    }
    // A self-pair can never match.
    s.send_to(&request(3, 3), server.addr()).unwrap();
    // Pending partner for a bad-size twin: an 8-byte prefix inside a 9-byte
    // datagram must not match it.
    let waiting = socket("127.0.0.1", SILENCE);
    waiting.send_to(&request(7, 8), server.addr()).unwrap();
    let mut nine = request(8, 7).to_vec();
    nine.push(0);
    s.send_to(&nine, server.addr()).unwrap();
    assert_eq!(recv(&s), None);
    assert_eq!(recv(&waiting), None);
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.bad_size, sizes.len() as u64 + 1);
    assert_eq!(c.engine.self_pair, 1);
    assert_eq!(c.engine.registered, 1);
    assert_eq!(c.io.sent, 0);
}

#[test]
fn a_full_table_refuses_new_registrations_only() {
    let mut cfg = config();
    cfg.engine.capacity = 4;
    let server = TestServer::start(cfg);
    let waiting: Vec<UdpSocket> = (0..4).map(|_| socket("127.0.0.1", WAIT)).collect();
    for (i, s) in waiting.iter().enumerate() {
        s.send_to(&request(100 + i as u32, 200 + i as u32), server.addr())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    // A fifth registration, and its partner: both refused, neither answered.
    let x = socket("127.0.0.1", SILENCE);
    let y = socket("127.0.0.1", SILENCE);
    x.send_to(&request(900, 901), server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    y.send_to(&request(901, 900), server.addr()).unwrap();
    assert_eq!(recv(&x), None);
    assert_eq!(recv(&y), None);
    // The registrations already held still match.
    let partner = socket("127.0.0.1", WAIT);
    partner.send_to(&request(200, 100), server.addr()).unwrap();
    assert!(recv(&partner).is_some());
    assert!(recv(&waiting[0]).is_some());
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.table_full, 2);
    assert_eq!(c.engine.matched, 1);
    assert_eq!(c.engine.pending, 3);
}

/// Thousands of pairs between many sockets, all in flight together; every
/// reply must name the right partner with complementary ports.
#[test]
fn thousands_of_pairs_get_exactly_the_right_replies() {
    const SOCKETS: usize = 64;
    const ROUNDS: usize = 50; // 64 * 50 / 2 = 1600 pairs per direction pattern
    let server = TestServer::start(config());
    let socks: Vec<UdpSocket> = (0..SOCKETS).map(|_| socket("127.0.0.1", WAIT)).collect();
    let addrs: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
    let mut pairs = 0u64;
    for round in 0..ROUNDS {
        // Pair socket i with socket (i + shift) for a rotating shift, so every
        // round has each socket in exactly one pair.
        let shift = 1 + round % (SOCKETS - 1);
        let mut expect: HashMap<usize, (SocketAddr, u32)> = HashMap::new();
        let mut used = [false; SOCKETS];
        let mut order = Vec::new();
        for i in 0..SOCKETS {
            let j = (i + shift) % SOCKETS;
            if used[i] || used[j] {
                continue;
            }
            used[i] = true;
            used[j] = true;
            let id = (round * SOCKETS + i) as u32 * 2 + 1_000_000;
            expect.insert(i, (addrs[j], id));
            expect.insert(j, (addrs[i], id + 1));
            order.push((i, j, id));
        }
        for &(i, _, id) in &order {
            socks[i]
                .send_to(&request(id, id + 1), server.addr())
                .unwrap();
        }
        for &(_, j, id) in &order {
            socks[j]
                .send_to(&request(id + 1, id), server.addr())
                .unwrap();
        }
        let mut ports = HashMap::new();
        for &(i, j, _) in &order {
            for k in [i, j] {
                let r = recv(&socks[k])
                    .unwrap_or_else(|| panic!("round {round}: no reply for socket {k}"));
                let reply = Reply::parse(&r).expect("well-formed reply");
                assert_eq!(reply.peer, expect[&k].0, "round {round}: wrong partner");
                ports.insert(k, (reply.src_port, reply.dst_port));
            }
            assert_eq!(ports[&i].0, ports[&j].1);
            assert_eq!(ports[&i].1, ports[&j].0);
            pairs += 1;
        }
    }
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.matched, pairs);
    assert_eq!(c.io.sent, 2 * pairs);
    assert_eq!(
        c.io.send_dropped + c.io.send_errors + c.engine.table_full,
        0
    );
}

/// `--workers` has a range, and more than one needs the kernel's steering,
/// which the portable I/O fallback does not use.
#[test]
fn workers_out_of_range_or_unsupported_are_refused() {
    let bind = |workers: usize, capacity: usize| {
        let mut cfg = config();
        cfg.bind = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.workers = workers;
        cfg.engine.capacity = capacity;
        psync::Server::bind(&cfg).err().map(|e| e.to_string())
    };
    let max = psync::server::MAX_WORKERS;
    for bad in [0, max + 1] {
        let msg = bind(bad, 1024).expect("refused");
        assert!(msg.starts_with("--workers must be between 1 and"), "{msg}");
    }
    if cfg!(feature = "portable-io") || !cfg!(target_os = "linux") {
        let msg = bind(2, 1024).expect("refused");
        assert!(
            msg.starts_with("--workers 2: this build serves one worker only"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    } else {
        assert_eq!(bind(4, 1024), None);
        let msg = bind(4, 3).expect("refused");
        assert!(
            msg.starts_with("--capacity 3 is below --workers 4"),
            "{msg}"
        );
    }
    assert_eq!(bind(1, 1), None);
}
