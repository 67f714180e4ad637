//! Abuse resistance over real sockets: a flooding source is rate limited
//! while other sources keep matching; one source cannot hold more than its
//! share of the pending table. 127.0.0.0/8 is all local, so 127.0.0.N plays
//! a different source for each N.

mod util;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use psync::limit::RateLimit;
use psync::wire::Reply;
use util::{assert_accounted, config, recv, request, socket, TestServer};

/// Pairs between sources 127.0.0.10+ must all match while 127.0.0.2 floods
/// at ten times its rate.
#[test]
fn a_flood_from_one_source_does_not_stop_the_others() {
    let limit = RateLimit::default();
    let mut cfg = config();
    cfg.rate_limit = limit;
    cfg.engine.limits = psync::engine::SourceLimits::default();
    let server = TestServer::start(cfg);
    let addr = server.addr();

    let flood_rate = 10 * limit.per_second as u64;
    let flood = std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.2:0").unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        // Paced at ten times the limit for 1.5 s, every datagram a fresh
        // registration that would otherwise fill the table.
        while start.elapsed() < Duration::from_millis(1500) {
            let due = start.elapsed().as_micros() as u64 * flood_rate / 1_000_000;
            while sent < due {
                s.send_to(&request(sent as u32 + 1, u32::MAX - sent as u32), addr)
                    .unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    });

    // Meanwhile 40 pairs between ten other sources, spread over the flood.
    let mut pairs = 0;
    for round in 0..8u32 {
        for k in 0..5u32 {
            let a = socket(&format!("127.0.0.{}", 10 + 2 * k), Duration::from_secs(2));
            let b = socket(&format!("127.0.0.{}", 11 + 2 * k), Duration::from_secs(2));
            let id = 1_000_000 + round * 100 + k * 2;
            a.send_to(&request(id, id + 1), addr).unwrap();
            b.send_to(&request(id + 1, id), addr).unwrap();
            let ra = Reply::parse(&recv(&a).expect("pair answered during the flood")).unwrap();
            let rb = Reply::parse(&recv(&b).expect("pair answered during the flood")).unwrap();
            assert_eq!(ra.peer, b.local_addr().unwrap());
            assert_eq!(rb.peer, a.local_addr().unwrap());
            pairs += 1;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let flooded = flood.join().unwrap();
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.matched, pairs);
    assert!(flooded >= 1000, "the flood ran ({flooded} sent)");
    // The flood got its burst plus its rate, the rest was dropped.
    assert!(c.io.rate_limited > 0);
    assert!(
        c.engine.registered <= u64::from(limit.burst) + 2 * u64::from(limit.per_second) + 2 * pairs,
        "registered {} of {flooded} flood datagrams",
        c.engine.registered
    );
}

#[test]
fn one_source_cannot_fill_the_table() {
    let mut cfg = config();
    cfg.engine.capacity = 100;
    cfg.engine.limits = psync::engine::SourceLimits {
        per_ip: 10,
        ..psync::engine::SourceLimits::OFF
    };
    let server = TestServer::start(cfg);
    let hog = socket("127.0.0.2", Duration::from_millis(300));
    for i in 0..30u32 {
        hog.send_to(&request(i + 1, 1000 + i), server.addr())
            .unwrap();
    }
    // A retransmit of a held registration is a refresh, never refused.
    hog.send_to(&request(1, 1000), server.addr()).unwrap();
    assert_eq!(recv(&hog), None);
    // Everyone else still gets in and matches, including the hog's partners.
    let a = socket("127.0.0.3", Duration::from_secs(2));
    let b = socket("127.0.0.4", Duration::from_secs(2));
    a.send_to(&request(77, 78), server.addr()).unwrap();
    b.send_to(&request(78, 77), server.addr()).unwrap();
    assert!(recv(&a).is_some() && recv(&b).is_some());
    let partner = socket("127.0.0.5", Duration::from_secs(2));
    partner.send_to(&request(1000, 1), server.addr()).unwrap();
    assert!(recv(&partner).is_some());
    let c = server.stop();
    assert_accounted(&c);
    assert_eq!(c.engine.per_ip_limit, 20);
    assert_eq!(c.engine.refreshed, 1);
    assert_eq!(c.engine.matched, 2);
    assert_eq!(c.engine.pending, 9);
}
