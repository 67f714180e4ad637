//! Fills a psync-server's table with one-sided registrations from many
//! IPv4 sources, within the server's default limits, to measure its memory
//! with the table full (`loadgen/memory.sh` runs it).
//!
//! `cargo run --release --example fill_table -- SERVER N`
//!
//! Sources are 127.x.y.z addresses (all of 127.0.0.0/8 is local), ten per
//! /24 and 200 registrations each: within the default limits (256 per
//! address, 2048 per /24) and the default rate limit's burst (200).
//! Datagrams go out in rounds of one registration per source, paced so that
//! the server's receive buffer is not overrun; a registration repeated later
//! is a refresh, so the caller can run this twice to make up for losses.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const PER_SOURCE: u32 = 200;
const SOURCES_PER_24: u32 = 10;
/// Registrations per second, about what one loopback sender can push
/// without overrunning a 4 MiB receive buffer.
const RATE: u64 = 150_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fill_table SERVER N";
    let server: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let n: u32 = args.next().expect(usage).parse().expect(usage);
    let sources = n.div_ceil(PER_SOURCE);
    let sockets: Vec<UdpSocket> = (0..sources)
        .map(|k| {
            // Source k: address k % 10 + 1 of the /24 number k / 10.
            let net = k / SOURCES_PER_24;
            let ip = Ipv4Addr::new(
                127,
                100 + (net / 256) as u8,
                (net % 256) as u8,
                (k % SOURCES_PER_24 + 1) as u8,
            );
            UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"))
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    for r in 0..PER_SOURCE {
        for (k, s) in sockets.iter().enumerate() {
            let id = (k as u32) * PER_SOURCE + r;
            if id >= n {
                continue;
            }
            // IDs from a range a pair never uses: (2i+1, 2i+2) never matches
            // because (2i+2, 2i+1) is never sent.
            let mut req = [0u8; 8];
            req[..4].copy_from_slice(&(2 * id + 1).to_le_bytes());
            req[4..].copy_from_slice(&(2 * id + 2).to_le_bytes());
            s.send_to(&req, server).expect("send");
            sent += 1;
            if sent % 1000 == 0 {
                let due = start + Duration::from_micros(sent * 1_000_000 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    eprintln!(
        "fill_table: {sent} registrations from {sources} sources in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
