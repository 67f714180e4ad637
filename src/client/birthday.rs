//! Birthday probing's arithmetic and the easy side's port sequence.
//!
//! The hard side holds `n` mapped ports somewhere in a range of `N` (64,512
//! for Linux masquerade, 1024-65535); the easy side probes `k` distinct ports
//! of that range. No probe meets with probability
//! `C(N-n, k) / C(N, k) = prod_{j<k} (1 - n / (N - j))`, about
//! `exp(-k n / N)`. With n = 256 and k = 3072 (the default) that is 5 in a
//! million, and the first meeting comes after `(N + 1) / (n + 1)`, about
//! 251, probes on average. [`success_probability`] and [`expected_probes`] compute
//! these; `docs/nat-traversal.md` has the table.

use rand_xoshiro::rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Lowest port a NAT hands out when it picks at random (Linux keeps ports
/// below 1024 for sources below 1024, which clients never use).
pub const PORT_LO: u16 = 1024;
/// Ports in `PORT_LO..=65535`.
pub const PORT_RANGE: u32 = 65536 - PORT_LO as u32;

/// Probability that `probes` distinct random ports of a range of `range`
/// include at least one of the hard side's `sockets` mapped ports.
pub fn success_probability(sockets: u32, probes: u32, range: u32) -> f64 {
    let (n, big_n) = (f64::from(sockets), f64::from(range));
    let mut miss = 1.0;
    for j in 0..probes.min(range) {
        let left = big_n - f64::from(j);
        if left <= n {
            return 1.0;
        }
        miss *= 1.0 - n / left;
    }
    1.0 - miss
}

/// Mean number of probes until the first meeting (drawing without repeats).
pub fn expected_probes(sockets: u32, range: u32) -> f64 {
    (f64::from(range) + 1.0) / (f64::from(sockets) + 1.0)
}

/// Random ports of [`PORT_LO`]`..=65535` in random order, never the same
/// twice, and a record of which were drawn.
pub struct PortSequence {
    rng: Xoshiro256PlusPlus,
    drawn: Box<[u64; 1024]>,
    count: u32,
}

impl PortSequence {
    /// A sequence from `seed`.
    pub fn new(seed: u64) -> PortSequence {
        PortSequence {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            drawn: Box::new([0; 1024]),
            count: 0,
        }
    }

    /// The next port not drawn before; `None` once the range is exhausted.
    pub fn next_port(&mut self) -> Option<u16> {
        if self.count >= PORT_RANGE {
            return None;
        }
        loop {
            // Rejection sampling: 2^16 % PORT_RANGE ports would be favoured
            // by a plain modulo.
            let r = (self.rng.next_u32() >> 16) as u16;
            if r < PORT_LO || self.was_drawn(r) {
                continue;
            }
            self.drawn[usize::from(r >> 6)] |= 1 << (r & 63);
            self.count += 1;
            return Some(r);
        }
    }

    /// Whether `port` has been drawn.
    pub fn was_drawn(&self, port: u16) -> bool {
        self.drawn[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    /// Ports drawn so far.
    pub fn count(&self) -> u32 {
        self.count
    }
}

impl std::fmt::Debug for PortSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortSequence({} drawn)", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_documented_odds() {
        let p = success_probability(256, 2048, PORT_RANGE);
        assert!((p - 0.9997).abs() < 0.0001, "{p}");
        // The default budget, and what is left of it when the hard side
        // starts 2 s late at 1000 probes/s (1.4 s of probes spent).
        let p = success_probability(256, 3072, PORT_RANGE);
        assert!(1.0 - p < 1e-5, "{p}");
        let p = success_probability(256, 3072 - 1400, PORT_RANGE);
        assert!((p - 0.9987).abs() < 0.0005, "{p}");
        // Tailscale's figure: 256 ports and 1024 probes meet about 98% of the time.
        let p = success_probability(256, 1024, PORT_RANGE);
        assert!((p - 0.982).abs() < 0.002, "{p}");
        let e = expected_probes(256, PORT_RANGE);
        assert!((e - 251.0).abs() < 1.0, "{e}");
        assert_eq!(success_probability(1, PORT_RANGE, PORT_RANGE), 1.0);
        assert_eq!(success_probability(0, 100, PORT_RANGE), 0.0);
    }

    #[test]
    fn exhausts_the_range_without_repeats() {
        let mut s = PortSequence::new(1);
        let mut seen = vec![false; 65536];
        while let Some(p) = s.next_port() {
            assert!(p >= PORT_LO);
            assert!(!seen[usize::from(p)], "{p} twice");
            seen[usize::from(p)] = true;
            assert!(s.was_drawn(p));
        }
        assert_eq!(s.count(), PORT_RANGE);
    }

    proptest! {
        #[test]
        fn drawn_ports_are_recorded_and_others_not(seed: u64, k in 1usize..3000) {
            let mut s = PortSequence::new(seed);
            let ports: Vec<u16> = (0..k).map(|_| s.next_port().unwrap()).collect();
            let mut sorted = ports.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), k);
            for p in PORT_LO..=u16::MAX {
                prop_assert_eq!(s.was_drawn(p), sorted.binary_search(&p).is_ok());
            }
        }
    }
}
