//! psync-server as a STUN server (RFC 8489 Binding) over loopback: answers on
//! the main port and on `stun_port`, exact byte counts (never longer than
//! needed), counted refusals with no reply, and the per-source rate limit.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use psync::wire::stun::{self, TransactionId};
use util::{recv, socket, TestServer};

const WAIT: Duration = Duration::from_secs(2);
/// How long to wait for a datagram that must not come.
const SILENCE: Duration = Duration::from_millis(300);

fn request(tid: u8, fingerprint: bool) -> (TransactionId, Vec<u8>) {
    let tid = [tid; 12];
    let mut buf = [0u8; stun::REQUEST_LEN];
    let n = stun::binding_request(&tid, fingerprint, &mut buf);
    (tid, buf[..n].to_vec())
}

fn ask(s: &UdpSocket, to: SocketAddr, tid: u8, fingerprint: bool) -> (usize, Option<Vec<u8>>) {
    let (_, req) = request(tid, fingerprint);
    s.send_to(&req, to).unwrap();
    (req.len(), recv(s))
}

fn with_stun_port() -> psync::ServerConfig {
    let mut cfg = util::config();
    cfg.stun_port = Some(0);
    cfg
}

#[test]
fn binding_requests_are_answered_on_both_ports_with_the_source_address() {
    let server = TestServer::start(with_stun_port());
    assert_eq!(server.stun_addrs.len(), 1);
    let (main, second) = (server.addr(), server.stun_addrs[0]);
    assert_ne!(main.port(), second.port());
    let s = socket("127.0.0.1", WAIT);
    let me = s.local_addr().unwrap();
    for (to, tid, fingerprint, want_len) in [
        (main, 1, false, 32),
        (main, 2, true, 40),
        (second, 3, false, 32),
        (second, 4, true, 40),
    ] {
        let (sent, got) = ask(&s, to, tid, fingerprint);
        let got = got.unwrap_or_else(|| panic!("no answer from {to}"));
        // IPv4: 20-byte header + 12-byte XOR-MAPPED-ADDRESS (+ 8 FINGERPRINT).
        assert_eq!(got.len(), want_len, "answer from {to}");
        assert!(got.len() <= sent + 12, "{sent} -> {}", got.len());
        assert_eq!(stun::parse_success(&got, &[tid; 12]), Ok(me));
        let msg = stun::Message::new_checked(&got).unwrap();
        assert_eq!(msg.check_fingerprint(), Ok(fingerprint));
    }
    let c = server.stop();
    assert_eq!(c.io.stun_answered, 4);
    assert_eq!(c.io.stun_refused, 0);
    assert_eq!(c.engine.bad_size, 0);
    util::assert_accounted(&c);
}

#[test]
fn over_ipv6_the_answer_is_44_bytes() {
    let Ok(probe) = UdpSocket::bind("[::1]:0") else {
        eprintln!("stun: skipping IPv6: ::1 unavailable");
        return;
    };
    drop(probe);
    let server = TestServer::start_on(util::config(), &["[::1]:0"]);
    let s = socket("::1", WAIT);
    let (_, got) = ask(&s, server.addr(), 5, false);
    let got = got.expect("answer over IPv6");
    assert_eq!(got.len(), 44);
    assert_eq!(
        stun::parse_success(&got, &[5; 12]),
        Ok(s.local_addr().unwrap())
    );
}

#[test]
fn everything_but_a_binding_request_is_a_counted_silent_drop() {
    let server = TestServer::start(with_stun_port());
    let (main, second) = (server.addr(), server.stun_addrs[0]);
    let s = socket("127.0.0.1", SILENCE);
    let (_, good) = request(9, true);
    let mut bad_fp = good.clone();
    bad_fp[27] ^= 1;
    let mut indication = good.clone();
    indication[1] = 0x11;
    let mut response = good.clone();
    response[1] = 0x01;
    response[0] = 0x01;
    let mut truncated = good.clone();
    truncated.truncate(24);
    // A request with a comprehension-required attribute psync does not do
    // (CHANGE-REQUEST, RFC 5780).
    let mut change = good[..20].to_vec();
    change[3] = 8;
    change.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6]);
    // Longer than the server's receive buffer: never answered.
    let mut huge = good[..20].to_vec();
    let pad = psync::sys::RECV_BUF_LEN;
    huge[2..4].copy_from_slice(&((pad + 4) as u16).to_be_bytes());
    huge.extend_from_slice(&[0x80, 0x22]);
    huge.extend_from_slice(&(pad as u16).to_be_bytes());
    huge.resize(20 + 4 + pad, b'x');
    let refused = [bad_fp, indication, response, truncated, change, huge];
    for to in [main, second] {
        for dgram in &refused {
            s.send_to(dgram, to).unwrap();
        }
    }
    // Not STUN at the STUN port: even a valid seed request is dropped there.
    s.send_to(&util::request(1, 2), second).unwrap();
    assert_eq!(recv(&s), None, "a refused datagram got an answer");
    let c = server.stop();
    assert_eq!(c.io.stun_refused, 2 * refused.len() as u64 + 1);
    assert_eq!(c.io.stun_answered, 0);
    assert_eq!(c.engine.registered, 0);
    util::assert_accounted(&c);
}

#[test]
fn answers_obey_the_per_source_rate_limit() {
    let mut cfg = with_stun_port();
    cfg.rate_limit = psync::limit::RateLimit {
        per_second: 1,
        burst: 5,
        sources: 64,
    };
    let server = TestServer::start(cfg);
    let s = socket("127.0.0.1", SILENCE);
    for i in 0..20u8 {
        let to = if i % 2 == 0 {
            server.addr()
        } else {
            server.stun_addrs[0]
        };
        let (_, req) = request(i, false);
        s.send_to(&req, to).unwrap();
    }
    let mut answers = 0;
    while recv(&s).is_some() {
        answers += 1;
    }
    let c = server.stop();
    // The burst (5), plus a token per second the test took to send.
    assert!((5..20).contains(&answers), "{answers} answers");
    assert_eq!(c.io.stun_answered, answers);
    assert_eq!(c.io.rate_limited, 20 - answers);
    util::assert_accounted(&c);
}
