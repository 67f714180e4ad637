//! Protocol v2 served end to end, over real loopback sockets: tokens
//! checked and their failures counted, v2 beside the seed format (or the
//! seed format refused), no reply longer than its request (IPv4 and IPv6,
//! byte counts asserted), and the cookie exchange under pressure.
//!
//! The key rotation through SIGHUP, the hijack with real `psync-client`
//! processes and the forged flood are in `tests/auth_attacks.rs`.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use psync::auth::{issue_token, Key, KeySet};
use psync::limit::RateLimit;
use psync::server::gate::AuthConfig;
use psync::wire::v2::{self, Candidate, CandidateKind, Candidates, ClientInfo, Pair, Response};
use psync::ServerConfig;
use util::{assert_accounted, config, recv, request, socket, TestServer};

const WAIT: Duration = Duration::from_secs(2);
/// How long a test waits to be sure that nothing comes back.
const SILENCE: Duration = Duration::from_millis(300);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key(id: u32) -> Key {
    Key::new(id, &[id as u8 ^ 0x5a; 32]).unwrap()
}

fn auth(require_auth: bool) -> AuthConfig {
    AuthConfig {
        keys: Some(Arc::new(KeySet::from_keys([key(1), key(2)]).unwrap())),
        require_auth,
        ..AuthConfig::default()
    }
}

fn auth_config(require_auth: bool) -> ServerConfig {
    ServerConfig {
        auth: auth(require_auth),
        ..config()
    }
}

/// A v2 request for `pair` with a token from `key`, valid for a minute.
fn v2_request(key: &Key, pair: Pair, info: u8, candidates: &[SocketAddr]) -> [u8; 152] {
    v2_request_with(key, pair, now() + 60, info, candidates, None)
}

fn v2_request_with(
    key: &Key,
    pair: Pair,
    expiry: u64,
    info: u8,
    candidates: &[SocketAddr],
    cookie: Option<v2::Cookie>,
) -> [u8; 152] {
    let list: Vec<Candidate> = candidates
        .iter()
        .map(|&addr| Candidate {
            kind: CandidateKind::HOST,
            addr,
        })
        .collect();
    v2::Request {
        token: issue_token(key, pair, expiry),
        cookie,
        info: ClientInfo(info),
        candidates: Candidates::from_slice(&list).unwrap(),
    }
    .to_bytes()
}

/// Receives one datagram and checks it is no longer than `request_len`
/// (no amplification), then parses it as a v2 response.
fn recv_v2(s: &UdpSocket, request_len: usize) -> Option<(usize, Response)> {
    let bytes = recv(s)?;
    assert!(
        bytes.len() <= request_len,
        "a {}-byte reply to a {request_len}-byte request",
        bytes.len()
    );
    Some((
        bytes.len(),
        Response::parse(&bytes).expect("a valid v2 response"),
    ))
}

fn has_ipv6() -> bool {
    UdpSocket::bind("[::1]:0").is_ok()
}

/// A v2 pair over IPv4 and over IPv6: both replies are 152 bytes for
/// 152-byte requests, and say who the partner is, who the asker is, the
/// partner's client info, and (to the waiter only) the completer's
/// candidates; a retransmit gets the same reply again.
#[test]
fn a_v2_pair_matches_and_no_reply_is_longer_than_its_request() {
    let families: &[&str] = if has_ipv6() {
        &["127.0.0.1", "::1"]
    } else {
        eprintln!("IPv6 part skipped: this host has no IPv6 loopback");
        &["127.0.0.1"]
    };
    let binds: Vec<String> = families
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), 0).to_string())
        .collect();
    let binds: Vec<&str> = binds.iter().map(|s| s.as_str()).collect();
    let server = TestServer::start_on(auth_config(false), &binds);
    for (i, ip) in families.iter().enumerate() {
        let to = server.addrs[i];
        let (a, b) = (socket(ip, WAIT), socket(ip, WAIT));
        let (ida, idb) = (0x51f0_c2a9_e4d3_b817 + i as u64, 0x0bd1_e5a2_c4f6_a390);
        let cands: Vec<SocketAddr> = vec![
            "10.1.2.3:4000".parse().unwrap(),
            "[fd00::7]:4001".parse().unwrap(),
            "192.168.1.9:4002".parse().unwrap(),
            "[2001:db8::1:2:3]:65535".parse().unwrap(),
        ];
        let ra = v2_request(&key(1), Pair::new(ida, idb), 0x01, &[]);
        let rb = v2_request(&key(2), Pair::new(idb, ida), 0x06, &cands);
        a.send_to(&ra, to).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        b.send_to(&rb, to).unwrap();
        let (na, Response::Reply(wa)) = recv_v2(&a, ra.len()).expect("waiter answered") else {
            panic!("not a match reply")
        };
        let (nb, Response::Reply(wb)) = recv_v2(&b, rb.len()).expect("completer answered") else {
            panic!("not a match reply")
        };
        assert_eq!((na, nb), (152, 152));
        assert_eq!(
            (wa.pair, wb.pair),
            (Pair::new(ida, idb), Pair::new(idb, ida))
        );
        assert_eq!(
            (wa.peer, wa.your_addr),
            (b.local_addr().unwrap(), a.local_addr().unwrap())
        );
        assert_eq!(
            (wb.peer, wb.your_addr),
            (a.local_addr().unwrap(), b.local_addr().unwrap())
        );
        assert_eq!((wa.src_port, wa.dst_port), (wb.dst_port, wb.src_port));
        assert_eq!(
            (wa.peer_info, wb.peer_info),
            (ClientInfo(0x06), ClientInfo(0x01))
        );
        assert_eq!(wa.peer_candidates.as_slice().len(), 4);
        assert_eq!(
            wa.peer_candidates
                .as_slice()
                .iter()
                .map(|c| c.addr)
                .collect::<Vec<_>>(),
            cands
        );
        assert!(wb.peer_candidates.is_empty());
        // The completer's retransmit: the same 152 bytes again.
        b.send_to(&rb, to).unwrap();
        let again = recv(&b).expect("replay");
        assert_eq!(again, wb.to_bytes());
    }
    let c = server.stop();
    assert_eq!(c.engine.matched, families.len() as u64);
    assert_eq!(c.engine.replayed, families.len() as u64);
    assert_eq!(c.io.v2_admitted, 3 * families.len() as u64);
    assert_accounted(&c);
}

/// Without --require-auth, seed and v2 pairs are served side by side on one
/// port, and a seed request never meets a v2 one. With it, seed requests
/// get nothing and are counted; v2 still works.
#[test]
fn both_formats_side_by_side_unless_auth_is_required() {
    let server = TestServer::start(auth_config(false));
    let to = server.addr();
    let (a, b, c, d) = (
        socket("127.0.0.1", WAIT),
        socket("127.0.0.1", WAIT),
        socket("127.0.0.1", WAIT),
        socket("127.0.0.1", WAIT),
    );
    // Seed (1, 2) and v2 (2, 1): no match between them.
    a.send_to(&request(1, 2), to).unwrap();
    c.send_to(&v2_request(&key(1), Pair::new(2, 1), 0, &[]), to)
        .unwrap();
    c.set_read_timeout(Some(SILENCE)).unwrap();
    assert!(recv(&c).is_none(), "a v2 request met a seed request");
    // Each completes with its own kind.
    b.send_to(&request(2, 1), to).unwrap();
    d.send_to(&v2_request(&key(2), Pair::new(1, 2), 0, &[]), to)
        .unwrap();
    assert_eq!(recv(&a).map(|r| r.len()), Some(20));
    assert_eq!(recv(&b).map(|r| r.len()), Some(20));
    c.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(recv(&c).map(|r| r.len()), Some(152));
    assert_eq!(recv(&d).map(|r| r.len()), Some(152));
    let counters = server.stop();
    assert_eq!(counters.engine.matched, 2);
    assert_eq!(counters.io.seed_refused, 0);
    assert_accounted(&counters);

    let server = TestServer::start(auth_config(true));
    let to = server.addr();
    a.send_to(&request(1, 2), to).unwrap();
    b.send_to(&request(2, 1), to).unwrap();
    a.set_read_timeout(Some(SILENCE)).unwrap();
    b.set_read_timeout(Some(SILENCE)).unwrap();
    assert!(
        recv(&a).is_none() && recv(&b).is_none(),
        "seed served under --require-auth"
    );
    c.send_to(&v2_request(&key(1), Pair::new(2, 1), 0, &[]), to)
        .unwrap();
    d.send_to(&v2_request(&key(2), Pair::new(1, 2), 0, &[]), to)
        .unwrap();
    assert_eq!(recv(&c).map(|r| r.len()), Some(152));
    assert_eq!(recv(&d).map(|r| r.len()), Some(152));
    let counters = server.stop();
    assert_eq!((counters.io.seed_refused, counters.engine.matched), (2, 1));
    assert_accounted(&counters);
}

/// Every way a token can fail is dropped without a reply and counted under
/// its reason; the partner waiting meanwhile is not disturbed.
#[test]
fn every_token_failure_is_dropped_and_counted() {
    let server = TestServer::start(auth_config(false));
    let to = server.addr();
    let (a, x) = (socket("127.0.0.1", WAIT), socket("127.0.0.1", SILENCE));
    let pair = Pair::new(10, 20);
    a.send_to(&v2_request(&key(1), pair, 0, &[]), to).unwrap();
    let good = v2_request(&key(1), pair.counterpart(), 0, &[]);
    // Unknown key: a key the server never had.
    x.send_to(&v2_request(&key(9), pair.counterpart(), 0, &[]), to)
        .unwrap();
    // Expired: past the expiry and the 30 s of skew.
    x.send_to(
        &v2_request_with(&key(1), pair.counterpart(), now() - 120, 0, &[], None),
        to,
    )
    .unwrap();
    // Bad MAC: the waiter's own token replayed for the other direction, a
    // token for another pair with these IDs pasted in, a flipped bit.
    let mut other_direction = v2_request(&key(1), pair, 0, &[]);
    other_direction[8..24].copy_from_slice(&good[8..24]);
    let mut other_pair = v2_request(&key(1), Pair::new(20, 11), 0, &[]);
    other_pair[8..24].copy_from_slice(&good[8..24]);
    let mut flipped = good;
    flipped[v2::field::MAC.end - 1] ^= 0x80;
    for bad in [other_direction, other_pair, flipped] {
        x.send_to(&bad, to).unwrap();
    }
    assert!(recv(&x).is_none(), "a refused token got an answer");
    a.set_read_timeout(Some(SILENCE)).unwrap();
    assert!(
        recv(&a).is_none(),
        "the waiter was answered for a refused token"
    );
    a.set_read_timeout(Some(WAIT)).unwrap();
    // The real partner still completes the pair.
    let b = socket("127.0.0.1", WAIT);
    b.send_to(&good, to).unwrap();
    assert_eq!(recv(&b).map(|r| r.len()), Some(152));
    assert_eq!(recv(&a).map(|r| r.len()), Some(152));
    let c = server.stop();
    assert_eq!(
        (
            c.io.auth_failed_unknown_key,
            c.io.auth_failed_expired,
            c.io.auth_failed_bad_mac,
            c.io.v2_admitted,
            c.engine.matched
        ),
        (1, 1, 3, 2, 1)
    );
    assert_accounted(&c);
}

/// Malformed v2 datagrams are dropped before any MAC and counted (sources
/// that cannot be a peer are the gate's unit tests: a socket cannot send
/// from port 0).
#[test]
fn malformed_v2_is_dropped_and_counted() {
    let server = TestServer::start(auth_config(false));
    let to = server.addr();
    let x = socket("127.0.0.1", SILENCE);
    let mut bad = v2_request(&key(1), Pair::new(1, 2), 0, &[]);
    bad[v2::field::CANDIDATE_COUNT] = 5;
    x.send_to(&bad, to).unwrap();
    let mut wrong_type = v2_request(&key(1), Pair::new(1, 2), 0, &[]);
    wrong_type[v2::field::TYPE] = 2;
    x.send_to(&wrong_type, to).unwrap();
    // 153 bytes: not v2 at all, the engine's bad_size.
    x.send_to(&[0x50; 153], to).unwrap();
    assert!(recv(&x).is_none());
    let c = server.stop();
    assert_eq!((c.io.v2_malformed, c.engine.bad_size), (2, 1));
    assert_accounted(&c);
}

/// Under pressure (the source over its rate) a v2 request without a cookie
/// gets a 40-byte cookie reply, and with the cookie it is served: all
/// replies no longer than the request, IPv4 and IPv6.
#[test]
fn under_pressure_the_cookie_exchange_serves_real_clients() {
    let families: &[&str] = if has_ipv6() {
        &["127.0.0.1:0", "[::1]:0"]
    } else {
        &["127.0.0.1:0"]
    };
    let cfg = ServerConfig {
        rate_limit: RateLimit {
            per_second: 1,
            burst: 1,
            sources: 64,
        },
        ..auth_config(false)
    };
    let server = TestServer::start_on(cfg, families);
    for (i, to) in server.addrs.clone().into_iter().enumerate() {
        let ip = to.ip().to_string();
        let (a, b) = (socket(&ip, WAIT), socket(&ip, WAIT));
        let pair = Pair::new(100 + i as u64, 200);
        // The first request spends the source's one token: it registers.
        let ra = v2_request(&key(1), pair, 0, &[]);
        a.send_to(&ra, to).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        // The second (same IP: same source) finds it spent: a cookie reply.
        let rb = v2_request(&key(1), pair.counterpart(), 0, &[]);
        b.send_to(&rb, to).unwrap();
        let (n, Response::Cookie(cookie)) = recv_v2(&b, rb.len()).expect("a cookie reply") else {
            panic!("not a cookie reply")
        };
        assert_eq!(n, 40);
        assert_eq!(cookie.pair, pair.counterpart());
        // Repeated with the cookie, at once: served from the validated budget.
        let with = v2_request_with(
            &key(1),
            pair.counterpart(),
            now() + 60,
            0,
            &[],
            Some(cookie.cookie),
        );
        b.send_to(&with, to).unwrap();
        let (n, Response::Reply(r)) = recv_v2(&b, with.len()).expect("served with the cookie")
        else {
            panic!("not a match reply")
        };
        assert_eq!((n, r.peer), (152, a.local_addr().unwrap()));
        assert_eq!(recv_v2(&a, ra.len()).map(|(n, _)| n), Some(152));
        // The cookie is bound to b's port: from a, it is no cookie.
        let from_a = v2_request_with(&key(1), pair, now() + 60, 0, &[], Some(cookie.cookie));
        a.send_to(&from_a, to).unwrap();
        assert!(matches!(
            recv_v2(&a, from_a.len()),
            Some((40, Response::Cookie(_)))
        ));
    }
    let c = server.stop();
    let n = families.len() as u64;
    assert_eq!(
        (c.io.cookie_sent, c.io.cookie_validated, c.engine.matched),
        (2 * n, n, n)
    );
    assert_accounted(&c);
}
