//! Which member owns a pair: rendezvous (highest random weight) hashing of
//! the unordered pair over the live members.
//!
//! Both halves of a pair, `(A, B)` and `(B, A)`, have one [`PairKey`]: the
//! hash of `{min(A, B), max(A, B)}` (the seed format's 4-byte IDs compared
//! bytewise, as the engine does; v2's 64-bit IDs as numbers). Each member
//! has a hash of its IP address ([`member_hash`]). The owner is the live
//! member with the highest [`score`]; when a member joins, only the keys it
//! now scores highest on move (about 1/N of them), and when one leaves, only
//! its own keys move, each to its runner-up. No coordination: every member
//! (and a client that knows the members, `psync-client --server a,b,c`)
//! computes the same owner from the same list.
//!
//! The functions here are part of the protocol between clients and servers
//! (docs/cluster.md writes them down), so they never change: a fixed mixer
//! (the splitmix64 finalizer), no secret seed. A client that picks its IDs
//! can aim its pairs at one member; it could as well send there directly.

use std::net::{IpAddr, SocketAddr};

use crate::wire::v2;

/// The unordered pair a request belongs to, hashed: the same for both halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey(pub u64);

/// Domain tags, so a seed pair and a v2 pair never share a key by design.
const TAG_SEED: u64 = 0x7073_796e_6331_0001; // "psync1" and a format number
const TAG_V2: u64 = 0x7073_796e_6332_0002;
const TAG_MEMBER: u64 = 0x7073_796e_636d_0003;

/// The splitmix64 finalizer: a bijection on u64 whose outputs look
/// independent for nearby inputs.
#[inline]
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of a seed pair: its two 4-byte IDs, lower (bytewise) first.
#[inline]
pub fn seed_pair_key(a: [u8; 4], b: [u8; 4]) -> PairKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&lo);
    v[4..].copy_from_slice(&hi);
    PairKey(mix(TAG_SEED ^ u64::from_be_bytes(v)))
}

/// The key of a v2 pair: its two 64-bit IDs, lower first.
#[inline]
pub fn v2_pair_key(a: u64, b: u64) -> PairKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    PairKey(mix(mix(TAG_V2 ^ lo) ^ hi))
}

/// The pair key of a request datagram, seed (exactly 8 bytes) or v2
/// (exactly [`v2::REQUEST_LEN`] bytes with a v2 request header); `None` for
/// anything else, and for a request whose two IDs are equal (it can never
/// match anywhere: the member that received it drops it). Reads nothing
/// before checking the length; never panics.
#[inline]
pub fn pair_key(datagram: &[u8]) -> Option<PairKey> {
    if let Ok(d) = <&[u8; 8]>::try_from(datagram) {
        let a = [d[0], d[1], d[2], d[3]];
        let b = [d[4], d[5], d[6], d[7]];
        return (a != b).then(|| seed_pair_key(a, b));
    }
    let view = v2::RequestView::new_checked(datagram).ok()?;
    let pair = view.pair();
    (!pair.is_self_pair()).then(|| v2_pair_key(pair.self_id, pair.peer_id))
}

/// A member's hash: of its IP address only (an IPv4 address as its
/// IPv4-mapped IPv6 form), so that a client that knows the members by the
/// addresses it sends to computes the same owner as the members, who know
/// each other by their cluster addresses. One member per IP address.
pub fn member_hash(ip: IpAddr) -> u64 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let hi = u64::from_be_bytes(o[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(o[8..].try_into().expect("8 bytes"));
    mix(mix(TAG_MEMBER ^ hi) ^ lo)
}

/// A member's weight for a key; the highest weight owns the key. Distinct
/// member hashes never tie: `mix` is a bijection.
#[inline]
pub fn score(key: PairKey, member: u64) -> u64 {
    mix(key.0 ^ member)
}

/// The index of the owner among `members` (their [`member_hash`]es), or
/// `None` when the list is empty.
#[inline]
pub fn owner_index(key: PairKey, members: &[u64]) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (i, &m) in members.iter().enumerate() {
        let s = score(key, m);
        match best {
            Some((b, _)) if b >= s => {}
            _ => best = Some((s, i)),
        }
    }
    best.map(|(_, i)| i)
}

/// What a client does with the members it knows (`psync-client --server`
/// with several addresses): the address among `servers` that owns the pair
/// of `request`, to send to first. `None` when the request has no pair key
/// or the list is empty.
pub fn owner_of(request: &[u8], servers: &[SocketAddr]) -> Option<SocketAddr> {
    let key = pair_key(request)?;
    let best = servers
        .iter()
        .max_by_key(|s| score(key, member_hash(s.ip())))?;
    Some(*best)
}

/// `servers` in the order a client tries them for `request`: the owner
/// first, then by falling score (each the owner if those before it were
/// gone). Unchanged when the request has no pair key.
pub fn rank(request: &[u8], servers: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut v = servers.to_vec();
    if let Some(key) = pair_key(request) {
        v.sort_by_key(|s| std::cmp::Reverse(score(key, member_hash(s.ip()))));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn members(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| member_hash(IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8))))
            .collect()
    }

    #[test]
    fn both_halves_have_one_key() {
        let a = seed_pair_key([1, 0, 0, 0], [2, 0, 0, 0]);
        assert_eq!(a, seed_pair_key([2, 0, 0, 0], [1, 0, 0, 0]));
        assert_eq!(pair_key(&[1, 0, 0, 0, 2, 0, 0, 0]), Some(a));
        assert_eq!(pair_key(&[2, 0, 0, 0, 1, 0, 0, 0]), Some(a));
        assert_eq!(v2_pair_key(5, 9), v2_pair_key(9, 5));
        assert_ne!(seed_pair_key([0; 4], [1, 0, 0, 0]), v2_pair_key(0, 1));
    }

    #[test]
    fn only_requests_have_keys() {
        assert_eq!(pair_key(&[]), None);
        assert_eq!(pair_key(&[1, 2, 3, 4, 1, 2, 3, 4]), None, "self pair");
        assert_eq!(pair_key(&[1; 9]), None);
        assert_eq!(pair_key(&[0; v2::REQUEST_LEN]), None, "no v2 header");
        let req = v2::Request {
            token: v2::Token {
                pair: v2::Pair::new(0x0102, 0x0304),
                key_id: 1,
                expiry: 2,
                mac: [0; v2::MAC_LEN],
            },
            cookie: None,
            info: v2::ClientInfo(0),
            candidates: v2::Candidates::default(),
        };
        let bytes = req.to_bytes();
        assert_eq!(pair_key(&bytes), Some(v2_pair_key(0x0304, 0x0102)));
        let mut other = req;
        other.token.pair = other.token.pair.counterpart();
        assert_eq!(pair_key(&other.to_bytes()), pair_key(&bytes));
    }

    /// Values a third-party client must reproduce (docs/cluster.md).
    #[test]
    fn the_functions_are_pinned() {
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let m = member_hash(ip);
        assert_eq!(m, member_hash("::ffff:127.0.0.2".parse().unwrap()));
        let k = seed_pair_key([1, 0, 0, 0], [2, 0, 0, 0]);
        assert_eq!(score(k, m), mix(k.0 ^ m));
    }

    #[test]
    fn owners_are_balanced() {
        let ms = members(5);
        let mut count = [0usize; 5];
        let n = 100_000u32;
        for i in 0..n {
            let k = seed_pair_key(i.to_le_bytes(), (i + n).to_le_bytes());
            count[owner_index(k, &ms).unwrap()] += 1;
        }
        let fair = n as usize / 5;
        for c in count {
            assert!(c.abs_diff(fair) < fair / 20, "{count:?}");
        }
    }

    #[test]
    fn the_client_picks_the_members_owner() {
        let servers: Vec<SocketAddr> = ["127.0.0.2:1024", "127.0.0.3:1024", "127.0.0.4:1024"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let hashes: Vec<u64> = servers.iter().map(|s| member_hash(s.ip())).collect();
        for i in 0..1000u32 {
            let req = crate::wire::Request {
                self_id: crate::wire::PeerId::from_u32(i),
                peer_id: crate::wire::PeerId::from_u32(i + 5000),
            };
            let bytes = req.emit();
            let k = pair_key(&bytes).unwrap();
            assert_eq!(
                owner_of(&bytes, &servers),
                Some(servers[owner_index(k, &hashes).unwrap()])
            );
            assert_eq!(
                owner_of(&req.counterpart().emit(), &servers),
                owner_of(&bytes, &servers)
            );
        }
        assert_eq!(owner_of(&[1; 8], &servers), None);
        let req = crate::wire::Request {
            self_id: crate::wire::PeerId::from_u32(3),
            peer_id: crate::wire::PeerId::from_u32(4),
        }
        .emit();
        let ranked = rank(&req, &servers);
        assert_eq!(Some(ranked[0]), owner_of(&req, &servers));
        assert_eq!(ranked.len(), 3);
        // Without the owner, the runner-up owns the pair.
        let rest: Vec<SocketAddr> = servers
            .iter()
            .copied()
            .filter(|s| *s != ranked[0])
            .collect();
        assert_eq!(owner_of(&req, &rest), Some(ranked[1]));
        assert_eq!(owner_of(&[1, 0, 0, 0, 2, 0, 0, 0], &[]), None);
    }

    proptest! {
        /// A member joining takes about 1/(N+1) of the keys, and every key
        /// that moves, moves to it.
        #[test]
        fn a_join_moves_only_keys_to_the_newcomer(n in 1usize..12, seed in any::<u32>()) {
            let before = members(n);
            let after = members(n + 1);
            let keys = 6000u32;
            let mut moved = 0usize;
            for i in 0..keys {
                let k = seed_pair_key((seed ^ i).to_le_bytes(), (i.wrapping_mul(7) ^ 1).to_be_bytes());
                let (a, b) = (owner_index(k, &before).unwrap(), owner_index(k, &after).unwrap());
                if a != b {
                    prop_assert_eq!(b, n, "a key moved to an old member");
                    moved += 1;
                }
            }
            let expect = keys as f64 / (n + 1) as f64;
            prop_assert!((moved as f64 - expect).abs() < expect * 0.15 + 40.0, "moved {} of {}, expected {}", moved, keys, expect);
        }

        /// A member leaving moves only its own keys.
        #[test]
        fn a_leave_moves_only_the_leavers_keys(n in 2usize..12, gone in any::<prop::sample::Index>(), seed in any::<u32>()) {
            let before = members(n);
            let g = gone.index(n);
            let mut after = before.clone();
            after.remove(g);
            for i in 0..3000u32 {
                let k = seed_pair_key((seed ^ i).to_le_bytes(), (i ^ 0xabcd).to_be_bytes());
                let a = owner_index(k, &before).unwrap();
                let b = owner_index(k, &after).unwrap();
                let b_in_before = before.iter().position(|&m| m == after[b]).unwrap();
                if a != g {
                    prop_assert_eq!(a, b_in_before, "a key of a staying member moved");
                }
            }
        }

        /// Both halves of any pair, in either format, pick the same owner.
        #[test]
        fn both_halves_pick_the_same_owner(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), x in any::<u64>(), y in any::<u64>(), n in 1usize..20) {
            let ms = members(n);
            let mut ab = [0u8; 8];
            ab[..4].copy_from_slice(&a);
            ab[4..].copy_from_slice(&b);
            let mut ba = [0u8; 8];
            ba[..4].copy_from_slice(&b);
            ba[4..].copy_from_slice(&a);
            prop_assert_eq!(pair_key(&ab), pair_key(&ba));
            if let Some(k) = pair_key(&ab) {
                prop_assert!(owner_index(k, &ms).is_some());
            }
            prop_assert_eq!(owner_index(v2_pair_key(x, y), &ms), owner_index(v2_pair_key(y, x), &ms));
        }

        /// No input panics the key function.
        #[test]
        fn any_bytes_are_survived(d in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = pair_key(&d);
        }
    }
}
