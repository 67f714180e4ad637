//! Fuzz target `engine`: the matching engine fed an arbitrary sequence of
//! datagrams (seed format) and admitted protocol v2 requests from a small
//! set of IPv4 and IPv6 sources, with arbitrary time steps and expiry turns,
//! under an arbitrary small configuration.
//!
//! The properties live in `fuzz/common/engine_check.rs`, shared with the CI
//! property test `tests/engine_props.rs`: no panic; an invalid datagram is
//! always `Outcome::Dropped`; every reply goes to an address that sent a valid
//! request; `pending()` never exceeds capacity; the engine agrees with a
//! `HashMap` model of pending registrations and remembered matches.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use psync::engine::SourceLimits;
use psync::wire::v2;
use psync::wire::PeerId;
use psync::{EngineConfig, Request};

#[path = "../common/engine_check.rs"]
mod engine_check;

use engine_check::{source, v2_request, Checker, Op, SOURCES};

/// Longest run: enough for tables to fill, expire and refill many times.
const MAX_OPS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((cfg, start)) = config(&mut u) else {
        return;
    };
    let mut checker = Checker::new(&cfg, start);
    for _ in 0..MAX_OPS {
        // `Unstructured` keeps yielding defaults once drained; stop there, or
        // every short input would run MAX_OPS identical steps.
        if u.is_empty() {
            break;
        }
        match op(&mut u) {
            Ok(op) => checker.step(&op),
            Err(_) => break,
        }
    }
});

/// A small valid configuration, so that tables fill and ports collide.
fn config(u: &mut Unstructured) -> Result<(EngineConfig, u64)> {
    let port_lo = u.int_in_range(1..=65534)?;
    let port_hi = if u.arbitrary()? {
        port_lo + 1
    } else {
        u.int_in_range(port_lo + 1..=65535)?
    };
    let (ipv4, ipv6) = match u.int_in_range(0..=2)? {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    let limits = if u.arbitrary()? {
        SourceLimits::OFF
    } else {
        SourceLimits {
            per_ip: u.int_in_range(0..=4)?,
            v4_24: u.int_in_range(0..=6)?,
            v6_56: u.int_in_range(0..=6)?,
            v6_48: u.int_in_range(0..=8)?,
        }
    };
    let cfg = EngineConfig {
        capacity: u.int_in_range(1..=16)?,
        ttl_ms: u.int_in_range(1..=5000)?,
        replay_ttl_ms: u.int_in_range(1..=5000)?,
        port_lo,
        port_hi,
        seed: Some(u.arbitrary()?),
        ipv4,
        ipv6,
        limits,
    };
    // Any start, including just below the engine's 32-bit clock wrap.
    let start = match u.int_in_range(0..=2)? {
        0 => 0,
        1 => u64::from(u32::MAX) - u64::from(u.int_in_range(0u32..=10_000)?),
        _ => u64::from(u.arbitrary::<u32>()?),
    };
    Ok((cfg, start))
}

fn op(u: &mut Unstructured) -> Result<Op> {
    let dt = match u.int_in_range(0..=3)? {
        0 => 0,
        1 | 2 => u.int_in_range(0..=200)?,
        _ => u.int_in_range(0..=10_000)?,
    };
    let src = u.choose_index(SOURCES.len())?;
    Ok(match u.int_in_range(0..=19)? {
        // Mostly requests among four IDs: pairs, self-pairs, refreshes.
        0..=8 => {
            let id = |u: &mut Unstructured| -> Result<PeerId> {
                Ok(PeerId::from_u32(u.int_in_range(0..=3)?))
            };
            let req = Request {
                self_id: id(u)?,
                peer_id: id(u)?,
            };
            Op::Datagram {
                datagram: req.emit().to_vec(),
                src,
                dt,
            }
        }
        9..=11 => Op::Datagram {
            datagram: u.arbitrary()?,
            src,
            dt,
        },
        12 | 13 => Op::Retransmit {
            waiter: u.arbitrary()?,
            dt,
        },
        // v2 among four IDs, two of which look like seed IDs.
        14..=17 => {
            const IDS: [u64; 4] = [0, 1, 1 << 32 | 1, u64::MAX];
            let pair = v2::Pair::new(
                IDS[u.int_in_range(0..=3)?],
                IDS[u.int_in_range(0..=3)?],
            );
            let mut candidates = v2::Candidates::EMPTY;
            for i in 0..u.int_in_range(0..=4)? {
                let c = v2::Candidate {
                    kind: v2::CandidateKind(u.arbitrary()?),
                    addr: source(src + i + 1),
                };
                // Port 0 cannot be carried: such a candidate is left out.
                let _ = candidates.push(c);
            }
            Op::V2 {
                request: v2_request(pair, u.arbitrary()?, candidates),
                src,
                dt,
            }
        }
        _ => Op::Expire { dt },
    })
}
