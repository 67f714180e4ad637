//! Property tests of the protocol v2 wire format, run in CI: the same
//! properties as the `v2` fuzz target (one oracle, `fuzz/common/v2_check.rs`,
//! serves both).
//!
//! - `parse(emit(x)) == x` for every request, reply and cookie reply,
//!   with IPv4 and IPv6 addresses, any candidate list, any client info;
//! - no byte string makes a parser panic, and none is accepted at a wrong
//!   length or in a non-canonical form: arbitrary bytes, bytes behind a
//!   valid header, and valid messages with one byte changed, cut or extended;
//! - no reply is longer than a request (the amplification promise).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use psync::wire::v2::{
    Candidate, CandidateKind, Candidates, ClientInfo, Cookie, CookieReply, Pair, Reply, Request,
    Token, COOKIE_LEN, MAC_LEN, MAX_CANDIDATES, REQUEST_LEN,
};

#[path = "../fuzz/common/v2_check.rs"]
mod v2_check;

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        // IPv4-mapped IPv6, what a dual-stack socket reports.
        any::<[u8; 4]>().prop_map(|b| IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped())),
    ]
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn candidates() -> impl Strategy<Value = Candidates> {
    prop::collection::vec(
        (any::<u8>(), addr()).prop_map(|(k, addr)| Candidate {
            kind: CandidateKind(k),
            addr,
        }),
        0..=MAX_CANDIDATES,
    )
    .prop_map(|list| Candidates::from_slice(&list).expect("at most four, ports nonzero"))
}

fn pair() -> impl Strategy<Value = Pair> {
    prop_oneof![
        (any::<u64>(), any::<u64>()),
        // Small IDs and edge values, so IDs share bytes.
        (0u64..4, prop_oneof![Just(u64::MAX), 0u64..4]),
    ]
    .prop_filter("a pair has two IDs", |(a, b)| a != b)
    .prop_map(|(a, b)| Pair::new(a, b))
}

fn cookie() -> impl Strategy<Value = Cookie> {
    any::<[u8; COOKIE_LEN]>().prop_filter_map("zero is no cookie", Cookie::new)
}

fn request() -> impl Strategy<Value = Request> {
    (
        pair(),
        any::<u32>(),
        any::<u64>(),
        any::<[u8; MAC_LEN]>(),
        prop::option::of(cookie()),
        any::<u8>(),
        candidates(),
    )
        .prop_map(
            |(pair, key_id, expiry, mac, cookie, info, candidates)| Request {
                token: Token {
                    pair,
                    key_id,
                    expiry,
                    mac,
                },
                cookie,
                info: ClientInfo(info),
                candidates,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    (
        pair(),
        1..=u16::MAX,
        1..=u16::MAX,
        addr(),
        addr(),
        any::<u8>(),
        candidates(),
    )
        .prop_filter("ports differ", |t| t.1 != t.2)
        .prop_map(
            |(pair, src_port, dst_port, peer, your_addr, info, peer_candidates)| Reply {
                pair,
                src_port,
                dst_port,
                peer,
                your_addr,
                peer_info: ClientInfo(info),
                peer_candidates,
            },
        )
}

/// The bytes of any valid v2 message.
fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        request().prop_map(|r| r.to_bytes().to_vec()),
        reply().prop_map(|r| r.to_bytes().to_vec()),
        (pair(), cookie())
            .prop_map(|(pair, cookie)| CookieReply { pair, cookie }.to_bytes().to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_round_trips(r in request()) {
        v2_check::check_request(&r);
    }

    #[test]
    fn reply_round_trips(r in reply()) {
        v2_check::check_reply(&r);
    }

    #[test]
    fn cookie_reply_round_trips(pair in pair(), cookie in cookie()) {
        v2_check::check_cookie_reply(&CookieReply { pair, cookie });
    }

    /// Every reply a request can cause fits in the request's length, whatever
    /// the families and candidates (the server answers with one of these).
    #[test]
    fn replies_are_never_longer_than_requests(req in request(), rep in reply()) {
        let mut buf = [0u8; REQUEST_LEN];
        let asked = req.emit(&mut buf);
        prop_assert!(rep.emit(&mut buf) <= asked);
    }

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..=REQUEST_LEN + 8)) {
        v2_check::check_datagram(&data);
    }

    /// Bytes behind a valid header, at and around every message length, so
    /// the field checks run rather than the magic check.
    #[test]
    fn bytes_behind_a_header(
        ty in 0u8..5,
        len in prop_oneof![Just(40usize), Just(152), 0usize..200],
        fill in prop::collection::vec(any::<u8>(), 200),
        zeros in any::<bool>(),
    ) {
        let mut data = v2_check::header(ty).to_vec();
        let body = len.saturating_sub(data.len());
        if zeros {
            // Mostly zero bodies get past the reserved-byte checks.
            data.extend(fill[..body].iter().map(|&b| if b < 16 { b } else { 0 }));
        } else {
            data.extend_from_slice(&fill[..body]);
        }
        data.truncate(len);
        v2_check::check_datagram(&data);
    }

    /// Valid messages with one byte changed, or cut short, or extended.
    #[test]
    fn mutated_messages(
        msg in message(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        how in 0u8..3,
    ) {
        let mut data = msg;
        match how {
            0 => {
                let i = at.index(data.len());
                data[i] ^= xor;
            }
            1 => data.truncate(at.index(data.len())),
            _ => data.push(xor),
        }
        v2_check::check_datagram(&data);
    }
}
