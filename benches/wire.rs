//! Wire-format costs: parsing one request, encoding one IPv4 and one IPv6 reply.
//!
//! Every datagram the server receives is parsed once and every match encodes
//! two replies, so these are the per-packet floor of the protocol layer.
//! Run with `cargo bench --bench wire`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use psync::wire::MAX_REPLY_LEN;
use psync::{PeerId, Reply, Request};

fn wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));

    let datagram = Request {
        self_id: PeerId::from_u32(0xdead_beef),
        peer_id: PeerId::from_u32(42),
    }
    .emit();
    group.bench_function("parse_request", |b| {
        b.iter(|| Request::parse(black_box(&datagram[..])))
    });

    for (name, peer) in [
        ("emit_reply/v4", "198.51.100.7:4949"),
        ("emit_reply/v6", "[2001:db8::1]:4948"),
    ] {
        let reply = Reply {
            src_port: 12345,
            dst_port: 54321,
            peer: peer.parse::<SocketAddr>().unwrap(),
        };
        let mut buf = [0u8; MAX_REPLY_LEN];
        group.bench_function(name, |b| {
            b.iter(|| {
                let n = black_box(&reply).emit(&mut buf);
                black_box(&buf);
                n
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Nanosecond routines: one second per benchmark is plenty.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    targets = wire
}
criterion_main!(benches);
