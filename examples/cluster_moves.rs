//! How many pairs change owner when a cluster member joins or leaves
//! (docs/cluster.md, "Measured"): rendezvous hashing over N members, a
//! million random pair keys, N from 2 to 16.
//!
//! `cargo run --release --example cluster_moves`
//!
//! Prints, per N: the share of keys that move when an (N+1)th member joins
//! (ideal 1/(N+1), all to the newcomer), the share that move when one of N
//! leaves (ideal 1/N, only the leaver's), and the largest member's share
//! of all keys (ideal 1/N).

use std::net::{IpAddr, Ipv4Addr};

use psync::cluster::owner::{member_hash, owner_index, seed_pair_key};

fn members(n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| member_hash(IpAddr::V4(Ipv4Addr::new(10, 1, 0, i as u8 + 1))))
        .collect()
}

fn main() {
    const KEYS: u32 = 1_000_000;
    // Random-looking IDs, the same for every N.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let keys: Vec<_> = (0..KEYS)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed_pair_key(((x >> 32) as u32).to_le_bytes(), (x as u32).to_le_bytes())
        })
        .collect();
    println!("members  join_moves (ideal)  leave_moves (ideal)  largest_share (ideal)");
    for n in 2..=16usize {
        let now = members(n);
        let joined = members(n + 1);
        // The member that leaves: the middle one.
        let mut left = now.clone();
        left.remove(n / 2);
        let (mut join_moved, mut leave_moved) = (0u32, 0u32);
        let mut share = vec![0u32; n];
        for &k in &keys {
            let o = owner_index(k, &now).expect("members");
            share[o] += 1;
            let j = owner_index(k, &joined).expect("members");
            if j != o {
                assert_eq!(j, n, "a key moved to an old member on a join");
                join_moved += 1;
            }
            let l = owner_index(k, &left).expect("members");
            let l = now.iter().position(|&m| m == left[l]).expect("a member");
            if l != o {
                assert_eq!(o, n / 2, "a key of a staying member moved on a leave");
                leave_moved += 1;
            }
        }
        let pct = |c: u32| 100.0 * f64::from(c) / f64::from(KEYS);
        println!(
            "{n:7}  {:6.2}% ({:5.2}%)    {:6.2}% ({:5.2}%)     {:6.2}% ({:5.2}%)",
            pct(join_moved),
            100.0 / (n + 1) as f64,
            pct(leave_moved),
            100.0 / n as f64,
            pct(*share.iter().max().unwrap()),
            100.0 / n as f64
        );
    }
}
