//! Which worker serves a datagram: a classic BPF program the kernel runs on
//! every datagram that reaches a `SO_REUSEPORT` group, and its twin in Rust.
//!
//! The two halves of a pair come from different addresses, so the kernel's
//! own choice (a hash of the 4-tuple) would send them to different workers,
//! where they never meet. The program instead reads the pair's two IDs from
//! the payload and returns a function of them that is
//! - **symmetric**: `(A, B)` and `(B, A)` give the same worker;
//! - **keyed**: it mixes the IDs with multipliers drawn at start, so a client
//!   without them cannot choose its worker, nor put many pairs on one worker
//!   on purpose.
//!
//! The function, in wrapping `u32` arithmetic, with four secret odd keys:
//! ```text
//! seed request (8 bytes):    a = word(0), b = word(4)
//! v2 request (152 bytes):    a = word(8) * kf + word(12), b = word(16) * kf + word(20)
//! lo, hi = min(a, b), max(a, b)
//! h = lo * k1 + hi
//! h ^= h >> 16; h *= k2; h ^= h >> 15; h *= k3; h ^= h >> 16
//! worker = h % workers
//! ```
//! where `word(i)` is the big-endian `u32` at byte `i` (classic BPF loads
//! words in network order). Ordering the IDs (rather than combining them
//! with `+`, `^` or `*`, which are symmetric too) keeps the first step
//! injective on unordered pairs, so no two pairs collide whatever the keys:
//! `a ^ b` alone would let a client keep it constant and pile every pair on
//! one worker, and even `a + b`, `a ^ b` and `a * b` together are unchanged
//! when both IDs flip their top bit. Folding a v2 ID's two halves with a
//! secret multiplier (not with `^`) does the same for 64-bit IDs.
//!
//! Any other datagram (a bad size, STUN) makes the program return a number
//! beyond any group, and the kernel falls back to its 4-tuple hash: some
//! worker drops, counts or answers it as a single server would.
//!
//! The kernel maps the result to the group's sockets in the order they
//! joined it, and renumbers the group when one leaves (the last moves into
//! the gap): the server binds all of a group's sockets before it serves and
//! closes none of them until it exits. This module is pure (the program is
//! data); `sys::attach_reuseport_cbpf` attaches it.

use crate::sys::BpfInsn;

/// Bytes of a seed request.
const SEED_LEN: u32 = crate::wire::REQUEST_LEN as u32;
/// Bytes of a protocol v2 request.
const V2_LEN: u32 = crate::wire::v2::REQUEST_LEN as u32;
/// What the program returns for a datagram it does not steer: beyond any
/// group, so the kernel uses its own hash (and never a socket that joined
/// the group later, as any smaller number might be).
const UNSTEERED: u32 = u32::MAX;

/// The four secret multipliers, all odd (so each multiplication is a
/// bijection of `u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    /// Folds a v2 ID's high half into its low half.
    pub fold: u32,
    /// Weighs the smaller ID.
    pub k1: u32,
    /// First mixing multiplier.
    pub k2: u32,
    /// Second mixing multiplier.
    pub k3: u32,
}

impl Keys {
    /// Keys from 128 random bits (forced odd).
    pub fn from_bits(bits: u128) -> Keys {
        let w = |i: u32| (bits >> (32 * i)) as u32 | 1;
        Keys {
            fold: w(0),
            k1: w(1),
            k2: w(2),
            k3: w(3),
        }
    }
}

/// The steering function for a group of `workers` sockets: the program and
/// its twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steering {
    workers: u32,
    keys: Keys,
}

impl Steering {
    /// Steering over `workers` sockets (at least 1) with `keys`.
    pub fn new(workers: u32, keys: Keys) -> Steering {
        Steering {
            workers: workers.max(1),
            keys,
        }
    }

    /// Sockets in the group.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The worker the program picks for `payload`, or `None` when it leaves
    /// the choice to the kernel's hash (any size but a request's).
    pub fn worker(&self, payload: &[u8]) -> Option<u32> {
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_be_bytes(payload.get(i..i + 4)?.try_into().ok()?))
        };
        let fold = |i: usize| -> Option<u32> {
            Some(
                word(i)?
                    .wrapping_mul(self.keys.fold)
                    .wrapping_add(word(i + 4)?),
            )
        };
        let (a, b) = match payload.len() as u32 {
            SEED_LEN => (word(0)?, word(4)?),
            V2_LEN => (fold(8)?, fold(16)?),
            _ => return None,
        };
        Some(self.of_pair(a, b))
    }

    /// The worker of the pair `{a, b}` (IDs as the program reads them).
    pub fn of_pair(&self, a: u32, b: u32) -> u32 {
        let (lo, hi) = if a > b { (b, a) } else { (a, b) };
        let mut h = lo.wrapping_mul(self.keys.k1).wrapping_add(hi);
        h ^= h >> 16;
        h = h.wrapping_mul(self.keys.k2);
        h ^= h >> 15;
        h = h.wrapping_mul(self.keys.k3);
        h ^= h >> 16;
        h % self.workers
    }

    /// The classic BPF program that computes [`Steering::worker`] in the
    /// kernel, for `SO_ATTACH_REUSEPORT_CBPF`.
    pub fn program(&self) -> Vec<BpfInsn> {
        let k = self.keys;
        let mut p = Asm::default();
        // Scratch memory: M[0] = a, M[1] = b, M[2] = spare.
        p.op(LD | W | LEN, 0);
        p.jump(JEQ | K, SEED_LEN, "seed", "not_seed");
        p.label("not_seed");
        p.jump(JEQ | K, V2_LEN, "v2", "unsteered");

        p.label("seed");
        p.op(LD | W | ABS, 0);
        p.op(ST, 0);
        p.op(LD | W | ABS, 4);
        p.op(ST, 1);
        p.goto("pair");

        p.label("v2");
        for (slot, at) in [(0, 8), (1, 16)] {
            p.op(LD | W | ABS, at + 4);
            p.op(MISC | TAX, 0);
            p.op(LD | W | ABS, at);
            p.op(ALU | MUL | K, k.fold);
            p.op(ALU | ADD | X, 0);
            p.op(ST, slot);
        }

        p.label("pair");
        p.op(LDX | W | MEM, 1);
        p.op(LD | W | MEM, 0);
        // A = a, X = b. Unsigned compare: a > b means lo = b, hi = a.
        p.jump(JGT | X, 0, "swap", "ordered");
        p.label("ordered");
        p.op(ALU | MUL | K, k.k1);
        p.op(ALU | ADD | X, 0);
        p.goto("mix");
        p.label("swap");
        p.op(ST, 2);
        p.op(MISC | TXA, 0);
        p.op(ALU | MUL | K, k.k1);
        p.op(LDX | W | MEM, 2);
        p.op(ALU | ADD | X, 0);

        p.label("mix");
        for (shift, mul) in [(16, Some(k.k2)), (15, Some(k.k3)), (16, None)] {
            // A ^= A >> shift
            p.op(ST, 0);
            p.op(ALU | RSH | K, shift);
            p.op(MISC | TAX, 0);
            p.op(LD | W | MEM, 0);
            p.op(ALU | XOR | X, 0);
            if let Some(m) = mul {
                p.op(ALU | MUL | K, m);
            }
        }
        p.op(ALU | MOD | K, self.workers);
        p.op(RET | A, 0);

        p.label("unsteered");
        p.op(RET | K, UNSTEERED);
        p.finish()
    }
}

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const ADD: u16 = 0x00;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JEQ: u16 = JMP | 0x10;
const JGT: u16 = JMP | 0x20;
const JA: u16 = JMP;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;

/// A tiny assembler: instructions with forward jumps to named labels,
/// resolved to classic BPF's relative offsets by [`Asm::finish`].
#[derive(Default)]
struct Asm {
    code: Vec<BpfInsn>,
    /// (instruction index, label of jt, label of jf); `ja` uses jt only.
    jumps: Vec<(usize, &'static str, Option<&'static str>)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push(BpfInsn {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn jump(&mut self, code: u16, k: u32, jt: &'static str, jf: &'static str) {
        self.jumps.push((self.code.len(), jt, Some(jf)));
        self.op(code, k);
    }

    fn goto(&mut self, to: &'static str) {
        self.jumps.push((self.code.len(), to, None));
        self.op(JA, 0);
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }

    fn finish(mut self) -> Vec<BpfInsn> {
        let at = |labels: &[(&str, usize)], name: &str| {
            labels
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, i)| i)
                .expect("every jump has its label")
        };
        for &(i, jt, jf) in &self.jumps {
            // Offsets count from the instruction after the jump; forward only.
            let off = |to: usize| to - (i + 1);
            match jf {
                Some(jf) => {
                    self.code[i].jt = u8::try_from(off(at(&self.labels, jt))).expect("short jump");
                    self.code[i].jf = u8::try_from(off(at(&self.labels, jf))).expect("short jump");
                }
                None => self.code[i].k = off(at(&self.labels, jt)) as u32,
            }
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steering(workers: u32) -> Steering {
        Steering::new(
            workers,
            Keys::from_bits(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
        )
    }

    fn seed(a: u32, b: u32) -> [u8; 8] {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&a.to_be_bytes());
        p[4..].copy_from_slice(&b.to_be_bytes());
        p
    }

    fn v2(a: u64, b: u64) -> Vec<u8> {
        let mut p = vec![0u8; crate::wire::v2::REQUEST_LEN];
        p[..4].copy_from_slice(b"PSYN");
        p[8..16].copy_from_slice(&a.to_be_bytes());
        p[16..24].copy_from_slice(&b.to_be_bytes());
        p
    }

    #[test]
    fn both_halves_of_a_pair_go_to_one_worker() {
        let s = steering(7);
        let mut x = 0x9e37_79b9u32;
        for _ in 0..10_000 {
            x = x.wrapping_mul(0x2c1b_3c6d).wrapping_add(0x297a_2d39);
            let y = x.rotate_left(13) ^ 0x5555;
            assert_eq!(s.worker(&seed(x, y)), s.worker(&seed(y, x)));
            let (a, b) = (u64::from(x) << 32 | u64::from(y), u64::from(y) * 3);
            assert_eq!(s.worker(&v2(a, b)), s.worker(&v2(b, a)));
            assert!(s.worker(&seed(x, y)).unwrap() < 7);
        }
    }

    #[test]
    fn other_sizes_are_left_to_the_kernel() {
        let s = steering(4);
        for len in [0, 1, 7, 9, 20, 28, 151, 153, 512] {
            assert_eq!(s.worker(&vec![1u8; len]), None, "{len} bytes");
        }
    }

    #[test]
    fn the_load_spreads_evenly() {
        // 40,000 random pairs over 4 workers: each within 5% of a quarter.
        let s = steering(4);
        let mut counts = [0u32; 4];
        let mut x = 1u64;
        for _ in 0..40_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let w = s.of_pair((x >> 32) as u32, x as u32);
            counts[w as usize] += 1;
        }
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn keys_move_pairs_and_constant_xor_does_not_pile_up() {
        // Pairs that keep a ^ b (or a + b) constant spread over the workers
        // like any others.
        let s = steering(4);
        let mut by_xor = [0u32; 4];
        let mut by_sum = [0u32; 4];
        for a in 0..4000u32 {
            by_xor[s.of_pair(a, a ^ 0xdead_beef) as usize] += 1;
            by_sum[s.of_pair(a, 0x1234_5678u32.wrapping_sub(a)) as usize] += 1;
        }
        for c in by_xor.iter().chain(&by_sum) {
            assert!((800..=1200).contains(c), "{by_xor:?} {by_sum:?}");
        }
        // Another set of keys puts about three pairs in four elsewhere.
        let t = Steering::new(4, Keys::from_bits(42));
        let moved = (0..4000u32)
            .filter(|&a| s.of_pair(a, a + 1) != t.of_pair(a, a + 1))
            .count();
        assert!((2700..=3300).contains(&moved), "{moved}");
    }

    #[test]
    fn the_program_is_well_formed() {
        for workers in [1, 2, 4, 64] {
            let p = steering(workers).program();
            // Classic BPF: at most 4096 instructions, ends in a return.
            assert!(p.len() < 100);
            assert_eq!(p.last().unwrap().code, RET | K);
            for (i, insn) in p.iter().enumerate() {
                if insn.code & 0x07 == JMP {
                    let reach = if insn.code == JA {
                        insn.k as usize
                    } else {
                        usize::from(insn.jt.max(insn.jf))
                    };
                    assert!(i + 1 + reach < p.len(), "jump {i} leaves the program");
                }
            }
            assert!(p.iter().any(|i| i.code == ALU | MOD | K && i.k == workers));
        }
    }

    /// The kernel runs the program and puts each datagram on the socket the
    /// twin predicts: a few thousand random seed and v2 requests through a
    /// real group of 4 on loopback, IPv4 and IPv6.
    #[cfg(all(target_os = "linux", not(feature = "portable-io")))]
    #[test]
    fn the_kernel_agrees_with_the_twin() {
        use std::collections::HashMap;
        use std::net::UdpSocket;
        use std::time::{Duration, Instant};

        for ip in ["127.0.0.1", "::1"] {
            let any: std::net::SocketAddr = format!("[{ip}]:0")
                .replace("[127.0.0.1]", "127.0.0.1")
                .parse()
                .unwrap();
            let Ok(client) = UdpSocket::bind(any) else {
                eprintln!("skipped {ip}: no such loopback here");
                continue;
            };
            let s = steering(4);
            let group = crate::sys::bind_udp_group(any, 4, 1 << 20, 0).unwrap();
            crate::sys::attach_reuseport_cbpf(&group[0].0, &s.program()).unwrap();
            let to = group[0].0.local_addr().unwrap();
            let mut x = 0x1234_5678_9abc_def0u64 ^ u64::from(to.port());
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut expected: HashMap<Vec<u8>, Option<u32>> = HashMap::new();
            let mut got = [0usize; 4];
            for wave in 0..6 {
                let mut sent = 0;
                for k in 0..500 {
                    let payload = match k % 5 {
                        0 => v2(next(), next()),
                        // Odd sizes: the kernel's hash picks, any socket will do.
                        1 if k % 25 == 1 => vec![(wave * 7 + k) as u8; 9 + k % 13],
                        _ => seed(next() as u32, next() as u32).to_vec(),
                    };
                    expected.insert(payload.clone(), s.worker(&payload));
                    client.send_to(&payload, to).unwrap();
                    sent += 1;
                }
                // Drain every socket until the wave is in.
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut received = 0;
                let mut buf = [0u8; 512];
                while received < sent && Instant::now() < deadline {
                    let mut any_read = false;
                    for (i, (sock, _)) in group.iter().enumerate() {
                        while let Ok(n) = sock.recv(&mut buf) {
                            any_read = true;
                            received += 1;
                            got[i] += 1;
                            let want = expected
                                .get(&buf[..n])
                                .unwrap_or_else(|| panic!("unknown datagram of {n} bytes"));
                            if let Some(w) = want {
                                assert_eq!(
                                    *w as usize, i,
                                    "{ip}: a {n}-byte request landed on socket {i}, the twin says {w}"
                                );
                            }
                        }
                    }
                    if !any_read {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                assert_eq!(received, sent, "{ip}: wave {wave} arrived whole");
            }
            // Every socket of the group took its part of the load.
            assert!(got.iter().all(|&n| n > 500), "{ip}: {got:?}");
        }
    }
}
