//! The lean path: the common cases of a seed-format request from an IPv4
//! address, received directly, handled on the slot's raw bytes.
//!
//! Almost every request a busy server handles is one of four cases: a new
//! registration into a table with room, the partner's request that matches
//! it, a retransmit after the match, a refresh from the same address.
//! [`Engine::process_v4`] does those four without decoding the slot into a
//! [`super::State`] or the address into the general [`super::Addr`], and
//! hands each outcome on where it builds it (a `Matched` outcome moved
//! through the general path's returns cost about 80 instructions). The
//! rest (an expired entry, a crowded table, a prefix with a limit of its
//! own, a peer that moved, relays) goes to the general path's steps with
//! the slot already found. The property test
//! `lean_path_agrees_with_general` holds the two paths to the same
//! outcomes, counters, source estimates and waiting times.

use std::net::{SocketAddr, SocketAddrV4};

use super::pair::{v4_bytes, v4_socket, Addr, Millis, PairEntry, PairKey, Side};
use super::source::{Level, Packed};
use super::{is_expired, At, Engine, Leave, Outcome, Transmit};
use crate::wire::Reply;

impl Engine {
    /// A seed request for `key` (of the IPv4 family) straight from `src`
    /// at `now`, the `k`-th of its batch: handles it and calls `done(k,
    /// outcome)`. Its common cases are handled here on the slot's bytes,
    /// the outcome built in place; the rare ones go to the general path's
    /// steps with the slot already found, as [`Engine::process`] would
    /// take them. The request is already counted as received.
    #[inline(always)]
    pub(super) fn process_v4(
        &mut self,
        key: &PairKey,
        src: SocketAddrV4,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        debug_assert_eq!(key.kind, 0, "the lean path takes IPv4 seed keys only");
        let me = v4_bytes(src);
        let i = match self.pairs.find(key.hash, |e| e.is_key(key)) {
            Ok(i) => i,
            Err(slot) => {
                if self.crowded() {
                    return self.register_v4_general(key, me, slot, now, k, done);
                }
                let counted: Packed = match self.books.sources.as_mut() {
                    None => Packed::default(),
                    Some(s) => match s.admit_v4(u32::from(*src.ip())) {
                        None => return self.register_v4_general(key, me, slot, now, k, done),
                        Some(Ok(counted)) => counted,
                        Some(Err(level)) => return self.refuse_v4(level, k, done),
                    },
                };
                let expires = now.wrapping_add(self.ttl);
                let entry = PairEntry::pending(key, Addr::V4(me), 0, 0, expires, counted);
                self.pairs.insert_at(slot, key.hash, entry);
                self.books.pending += 1;
                self.books.counters.registered += 1;
                return done(k, &Outcome::Registered { evicted: None });
            }
        };
        let e = self.pairs.get(i);
        if is_expired(e.expires(), now) {
            // Dead: forget it, and register afresh in its very slot.
            return self.register_afresh(key, me, i, now, k, done);
        }
        match e.waiting() {
            None => {
                let (addr, via, (src_port, dst_port), peer) = e.v4_matched(key.side);
                if addr != me || via != 0 {
                    return self.restart_v4(i, key, me, now, k, done);
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
                let old = e.v4_addr(0);
                if old[..4] != me[..4] {
                    // From another address: its count moves there.
                    return self.refresh_moved_v4(i, key, old, me, now, k, done);
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
    }

    // The other cases, each out of line with its own call to `done`, so
    // that the hot path holds no call site for an outcome it did not build
    // (one cost the common cases 12 instructions a request). All are rare
    // but a crowded table's registrations, which make room first and cost
    // far more than a call.

    /// An expired entry for `key` at `i`: forgotten, and the request from
    /// `me` registered afresh in its slot ([`Engine::process`]'s way).
    #[cold]
    #[inline(never)]
    fn register_afresh(
        &mut self,
        key: &PairKey,
        me: [u8; 6],
        i: usize,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        let e = *self.pairs.get(i);
        self.books.forget(&e, Leave::Expired);
        done(
            k,
            &self.register(key, Addr::V4(me), 0, 0, now, (key.hash, At::Dead(i))),
        );
    }

    /// A registration whose lookup ended on the empty `slot`, left to
    /// [`Engine::register`]: a crowded table, or a prefix with a limit of
    /// its own.
    #[cold]
    #[inline(never)]
    fn register_v4_general(
        &mut self,
        key: &PairKey,
        me: [u8; 6],
        slot: usize,
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        done(
            k,
            &self.register(key, Addr::V4(me), 0, 0, now, (key.hash, At::Empty(slot))),
        );
    }

    /// A registration refused at a prefix's limit ([`Engine::refuse`]).
    #[cold]
    #[inline(never)]
    fn refuse_v4(&mut self, level: Level, k: usize, done: &mut impl FnMut(usize, &Outcome)) {
        done(k, &self.refuse(level));
    }

    /// A remembered match's request from another address or relay: the
    /// pair starts afresh ([`Engine::restart`]).
    #[cold]
    #[inline(never)]
    fn restart_v4(
        &mut self,
        i: usize,
        key: &PairKey,
        me: [u8; 6],
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        done(k, &self.restart(i, key, Addr::V4(me), 0, 0, now));
    }

    /// A refresh from another address than the waiting one's, whose count
    /// moves there ([`Engine::refresh`]).
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn refresh_moved_v4(
        &mut self,
        i: usize,
        key: &PairKey,
        old: [u8; 6],
        me: [u8; 6],
        now: Millis,
        k: usize,
        done: &mut impl FnMut(usize, &Outcome),
    ) {
        done(
            k,
            &self.refresh(i, key, Addr::V4(old), Addr::V4(me), 0, 0, now),
        );
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
