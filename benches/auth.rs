//! Protocol v2 costs per datagram: parsing a request, emitting a reply, and
//! the two MACs a server may compute (token, cookie), next to the seed
//! request's parse in `benches/wire.rs`.
//!
//! A server computes at most one cookie MAC and one token MAC per v2
//! datagram, after the rate limit; these are the floor of that work. It
//! checks the tokens of a received batch together
//! (`verify_token/batch_of_64`, per token), which overlaps their SHA-256
//! compressions.
//! Run with `cargo bench --bench auth`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use psync::auth::{CookieSecret, Key, KeySet};
use psync::wire::v2::{
    Candidate, CandidateKind, Candidates, ClientInfo, Pair, Reply, Request, MAX_LEN,
};

const NOW: u64 = 1_700_000_000;

fn auth(c: &mut Criterion) {
    let mut group = c.benchmark_group("v2");
    group.throughput(Throughput::Elements(1));

    let keys = KeySet::from_keys([
        Key::new(1, &[1; 32]).unwrap(),
        Key::new(2, &[2; 32]).unwrap(),
    ])
    .unwrap();
    let client: SocketAddr = "198.51.100.7:4949".parse().unwrap();
    let secret = CookieSecret::new(&[9; 32]).unwrap();
    let pair = Pair::new(0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
    let token = keys.get(2).unwrap().issue(pair, NOW + 600);
    let request = Request {
        token,
        cookie: Some(secret.issue(client, NOW)),
        info: ClientInfo::UNKNOWN,
        candidates: Candidates::from_slice(&[Candidate {
            kind: CandidateKind::HOST,
            addr: "192.168.1.20:40000".parse().unwrap(),
        }])
        .unwrap(),
    }
    .to_bytes();

    group.bench_function("parse_request", |b| {
        b.iter(|| Request::parse(black_box(&request[..])))
    });

    let reply = Reply {
        pair,
        src_port: 12345,
        dst_port: 54321,
        peer: "[2001:db8::1]:4948".parse().unwrap(),
        your_addr: "[2001:db8::2]:80".parse().unwrap(),
        peer_info: ClientInfo::UNKNOWN,
        peer_candidates: Candidates::EMPTY,
    };
    let mut buf = [0u8; MAX_LEN];
    group.bench_function("emit_reply", |b| {
        b.iter(|| {
            let n = black_box(&reply).emit(&mut buf);
            black_box(&buf);
            n
        })
    });

    group.bench_function("verify_token/ok", |b| {
        b.iter(|| keys.verify(black_box(&token), NOW))
    });
    let mut forged = token;
    forged.mac[0] ^= 1;
    group.bench_function("verify_token/bad_mac", |b| {
        b.iter(|| keys.verify(black_box(&forged), NOW))
    });
    let unknown = psync::wire::v2::Token { key_id: 3, ..token };
    group.bench_function("verify_token/unknown_key", |b| {
        b.iter(|| keys.verify(black_box(&unknown), NOW))
    });

    // What the server does per received batch: 64 tokens checked together,
    // their compressions overlapped (the figure is per token).
    let batch: Vec<psync::wire::v2::Token> = (0..64u64)
        .map(|i| keys.get(2).unwrap().issue(Pair::new(i, i + 1), NOW + 600))
        .collect();
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("verify_token/batch_of_64", |b| {
        b.iter(|| {
            let mut ok = 0u32;
            keys.verify_batch(
                batch.len(),
                |k| &batch[k],
                NOW,
                |_, r| ok += u32::from(r.is_ok()),
            );
            ok
        })
    });
    group.throughput(Throughput::Elements(1));

    let cookie = secret.issue(client, NOW);
    group.bench_function("issue_cookie", |b| {
        b.iter(|| secret.issue(black_box(client), NOW))
    });
    group.bench_function("verify_cookie", |b| {
        b.iter(|| secret.verify(black_box(&cookie), black_box(client), NOW))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Sub-microsecond routines: one second per benchmark is plenty.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    targets = auth
}
criterion_main!(benches);
