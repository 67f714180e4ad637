//! The lean path: the common cases of a seed-format request from an IPv4
//! address, received directly, handled on the slot's raw bytes.
//!
//! Almost every request a busy server handles is one of four cases: a new
//! registration into a table with room, the partner's request that matches
//! it, a retransmit after the match, a refresh from the same address.
//! [`Engine::process_v4`] does those four without decoding the slot into a
//! [`super::State`] or the address into the general [`super::Addr`], and
//! leaves everything else (an expired entry, a crowded table, a prefix with
//! a limit of its own, a peer that moved, relays) to [`Engine::process`],
//! having changed nothing. `batches_agree_with_one_by_one` and the
//! property test against the `HashMap` oracle hold it to the same outcomes.

use std::net::{SocketAddr, SocketAddrV4};

use super::pair::{Addr, Millis, PairEntry, PairKey, Side};
use super::source::Packed;
use super::{is_expired, Engine, Outcome, Transmit};
use crate::wire::Reply;

/// An IPv4 address and port as a slot keeps them: the address's 4 bytes,
/// then the port big-endian.
#[inline]
fn v4_bytes(a: SocketAddrV4) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[..4].copy_from_slice(&a.ip().octets());
    b[4..].copy_from_slice(&a.port().to_be_bytes());
    b
}

#[inline]
fn v4_socket(b: [u8; 6]) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        [b[0], b[1], b[2], b[3]].into(),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

impl Engine {
    /// A seed request for `key` (of the IPv4 family) straight from `src`
    /// at `now`, the `k`-th of its batch, in its common cases: handles it
    /// and calls `done(k, outcome)`, with the outcome built in place. False,
    /// with nothing changed, for the other cases, which [`Engine::process`]
    /// handles. The request is already counted as received.
    #[inline(always)]
    pub(super) fn process_v4(
        &mut self,
        key: &PairKey,
        src: SocketAddrV4,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) -> bool {
        let me = v4_bytes(src);
        let i = match self.pairs.find(key.hash, |e| e.is_key(key)) {
            Ok(i) => i,
            Err(slot) => {
                if self.crowded() {
                    return false;
                }
                let counted: Packed = match self.books.sources.as_mut() {
                    None => Packed::default(),
                    Some(s) => match s.admit_v4(u32::from(*src.ip())) {
                        None => return false,
                        Some(Ok(counted)) => counted,
                        Some(Err(level)) => {
                            done(k, &self.refuse(level));
                            return true;
                        }
                    },
                };
                let expires = now.wrapping_add(self.ttl);
                let entry = PairEntry::pending(key, Addr::V4(me), 0, 0, expires, counted);
                self.pairs.insert_at(slot, key.hash, entry);
                self.books.pending += 1;
                self.books.counters.registered += 1;
                done(k, &Outcome::Registered { evicted: None });
                return true;
            }
        };
        let e = self.pairs.get(i);
        if is_expired(e.expires(), now) {
            return false;
        }
        match e.waiting() {
            None => {
                let (addr, via, (src_port, dst_port), peer) = e.v4_matched(key.side);
                if addr != me || via != 0 {
                    return false;
                }
                self.books.counters.replayed += 1;
                done(
                    k,
                    &Outcome::Replayed(Transmit {
                        to: SocketAddr::V4(src),
                        via: 0,
                        reply: Reply {
                            src_port,
                            dst_port,
                            peer: v4_socket(peer),
                        },
                    }),
                );
            }
            Some(waiter) if waiter == key.side => {
                // A refresh from another address moves its count: rare.
                if e.v4_addr(0)[..4] != me[..4] {
                    return false;
                }
                let counted = e.counted_at().unwrap_or_default();
                let expires = now.wrapping_add(self.ttl);
                self.pairs
                    .get_mut(i)
                    .set_pending(key.side, Addr::V4(me), 0, 0, expires, counted);
                self.books.counters.refreshed += 1;
                done(k, &Outcome::Refreshed);
            }
            Some(_) => self.complete_v4(i, key, src, now, k, done),
        }
        true
    }

    /// [`Engine::complete`] on the lean path: the request from `src`
    /// completes the IPv4 pair waiting in slot `i`.
    #[inline(always)]
    fn complete_v4(
        &mut self,
        i: usize,
        key: &PairKey,
        src: SocketAddrV4,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        let e = self.pairs.get(i);
        let (waddr, wvia, wexpires) = (e.v4_addr(0), e.via(), e.expires());
        let wcounted = e.counted_at();
        let (p1, p2) = self.pick_ports();
        self.wait
            .record(now.wrapping_sub(wexpires.wrapping_sub(self.ttl)));
        if let (Some(s), Some(c)) = (self.books.sources.as_mut(), wcounted) {
            s.remove_packed(&c);
        }
        // The waiter gets (P1, P2), the completer (P2, P1).
        let me = (v4_bytes(src), 0);
        let (lo, hi, lo_ports) = match key.side {
            Side::Lo => (me, (waddr, wvia), (p2, p1)),
            Side::Hi => ((waddr, wvia), me, (p1, p2)),
        };
        let expires = now.wrapping_add(self.replay_ttl);
        self.pairs
            .get_mut(i)
            .set_matched_v4(lo, hi, lo_ports, expires);
        let books = &mut self.books;
        books.pending -= 1;
        books.remembered += 1;
        books.counters.matched += 1;
        let waiter = v4_socket(waddr);
        let completer = SocketAddr::V4(src);
        done(
            k,
            &Outcome::Matched {
                waiting: Transmit {
                    to: waiter,
                    via: wvia,
                    reply: Reply {
                        src_port: p1,
                        dst_port: p2,
                        peer: completer,
                    },
                },
                completing: Transmit {
                    to: completer,
                    via: 0,
                    reply: Reply {
                        src_port: p2,
                        dst_port: p1,
                        peer: waiter,
                    },
                },
            },
        );
    }
}
