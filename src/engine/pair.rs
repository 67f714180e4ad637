//! One pair's slot in the engine's table, and the store for IPv6 matches.
//!
//! A pair `{A, B}` has one slot for its whole life: while one side waits
//! (*pending*) and, after the match, while its replies are remembered for
//! replay (*matched*). So a request costs one probe whatever it turns out to
//! be: a registration, a refresh, a match or a retransmit.
//!
//! The slot is 36 bytes, packed (alignment 1):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..8 | tag | the pair's key: the two IDs in byte order (seed format) |
//! | 8..12 | check | more key bits for formats whose key is wider than 64 bits; 0 for the seed format |
//! | 12..16 | expires | ms on the engine's clock |
//! | 16 | meta | bits 0-1 state (1: lo side waits, 2: hi side waits, 3: matched), bit 2 IPv6, bit 3 format v2, bits 4-7 the waiter's client info |
//! | 17 | via | the waiter's (pending) or the lo side's (matched) relay: 0 direct |
//! | 18..36 | data | pending: the waiter's address (6 or 18 bytes), and for IPv4 where its source counters are (10 bytes, [`Packed`]); matched IPv4: lo address, hi address, lo's two ports, hi's relay, both infos; matched IPv6: an index into [`V6Matches`], lo's two ports, hi's relay, both infos |
//!
//! "lo" and "hi" are the pair's two sides, the lower and the higher ID.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::source::Packed;
use crate::table::Entry;

/// Milliseconds on the engine's clock, truncated to 32 bits and compared
/// with wrapping arithmetic.
pub(super) type Millis = u32;

const STATE: u8 = 0b11;
const PENDING_LO: u8 = 1;
const PENDING_HI: u8 = 2;
const MATCHED: u8 = 3;
/// The bits of `meta` that are part of the key.
pub(super) const KIND: u8 = 0b1100;
/// `meta` bit: an IPv6 pair.
pub(super) const KIND_V6: u8 = 0b0100;
/// `meta` bit: a pair of the v2 format.
pub(super) const KIND_V2: u8 = 0b1000;

/// One side of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The lower ID.
    Lo,
    /// The higher ID.
    Hi,
}

impl Side {
    /// The other side of the pair.
    #[inline]
    pub fn other(self) -> Side {
        match self {
            Side::Lo => Side::Hi,
            Side::Hi => Side::Lo,
        }
    }
}

/// A pair's key and the side a request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PairKey {
    pub tag: u64,
    pub check: u32,
    /// [`KIND_V6`] and [`KIND_V2`] bits.
    pub kind: u8,
    pub side: Side,
    /// The table's keyed hash of [`PairKey::hash_input`], worked out once
    /// by the engine's key builders when the request is classified.
    pub hash: u64,
}

impl PairKey {
    /// The value the table hashes.
    #[inline]
    pub fn hash_input(&self) -> u64 {
        hash_input(self.tag, self.check, self.kind)
    }
}

#[inline]
fn hash_input(tag: u64, check: u32, kind: u8) -> u64 {
    tag ^ (u64::from(check) | u64::from(kind) << 32).rotate_left(23)
}

/// A peer's address as a slot stores it: IPv4 in 6 bytes, IPv6 in 18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Addr {
    V4([u8; 6]),
    V6([u8; 18]),
}

impl Addr {
    #[inline]
    pub fn from_socket(a: SocketAddr) -> Addr {
        match a {
            SocketAddr::V4(a) => Addr::V4(v4_bytes(a)),
            SocketAddr::V6(a) => {
                let mut b = [0u8; 18];
                b[..16].copy_from_slice(&a.ip().octets());
                b[16..].copy_from_slice(&a.port().to_be_bytes());
                Addr::V6(b)
            }
        }
    }

    #[inline]
    pub fn to_socket(self) -> SocketAddr {
        match self {
            Addr::V4(b) => v4_socket(b),
            Addr::V6(b) => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[..16]);
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    u16::from_be_bytes([b[16], b[17]]),
                    0,
                    0,
                ))
            }
        }
    }

    #[inline]
    pub fn ip(self) -> IpAddr {
        self.to_socket().ip()
    }
}

/// An IPv4 address and port as a slot keeps them ([`Addr::V4`]): the
/// address's 4 bytes, then the port big-endian.
#[inline]
pub(super) fn v4_bytes(a: SocketAddrV4) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[..4].copy_from_slice(&a.ip().octets());
    b[4..].copy_from_slice(&a.port().to_be_bytes());
    b
}

/// The socket address of [`v4_bytes`].
#[inline]
pub(super) fn v4_socket(b: [u8; 6]) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

/// What a slot holds, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Pending {
        waiter: Side,
        addr: Addr,
        via: u8,
        info: u8,
    },
    Matched(Match),
}

/// A remembered match: both sides' addresses, relays, infos, and the lo
/// side's ports (the hi side's are the same two, swapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Match {
    pub lo: Addr,
    pub hi: Addr,
    pub lo_via: u8,
    pub hi_via: u8,
    pub lo_info: u8,
    pub hi_info: u8,
    /// The lo side's `(src_port, dst_port)`.
    pub lo_ports: (u16, u16),
}

impl Match {
    /// `(address, relay, info)` of one side.
    pub fn side(&self, s: Side) -> (Addr, u8, u8) {
        match s {
            Side::Lo => (self.lo, self.lo_via, self.lo_info),
            Side::Hi => (self.hi, self.hi_via, self.hi_info),
        }
    }

    /// `(src_port, dst_port)` of one side.
    pub fn ports(&self, s: Side) -> (u16, u16) {
        match s {
            Side::Lo => self.lo_ports,
            Side::Hi => (self.lo_ports.1, self.lo_ports.0),
        }
    }
}

/// One pair's slot. See the module docs for the layout.
#[derive(Clone, Copy, Default)]
pub(super) struct PairEntry {
    tag: [u8; 8],
    check: [u8; 4],
    expires: [u8; 4],
    meta: u8,
    via: u8,
    data: [u8; 18],
}

impl Entry for PairEntry {
    #[inline]
    fn hash_input(&self) -> u64 {
        hash_input(
            u64::from_ne_bytes(self.tag),
            u32::from_ne_bytes(self.check),
            self.meta & KIND,
        )
    }
}

impl PairEntry {
    /// A pending entry: `key.side` waits at `addr` until `expires`; an
    /// IPv4 waiter's source counters are at `counted` (see
    /// [`PairEntry::counted_at`]).
    pub fn pending(
        key: &PairKey,
        addr: Addr,
        via: u8,
        info: u8,
        expires: Millis,
        counted: Packed,
    ) -> PairEntry {
        let mut e = PairEntry {
            tag: key.tag.to_ne_bytes(),
            check: key.check.to_ne_bytes(),
            expires: expires.to_ne_bytes(),
            meta: key.kind,
            via: 0,
            data: [0; 18],
        };
        e.set_pending(key.side, addr, via, info, expires, counted);
        e
    }

    /// For a pending IPv4 entry, where its waiter's source counters are, as
    /// given when it was made pending (meaningless when per-source limits
    /// are off); `None` for a match or an IPv6 entry.
    #[inline]
    pub fn counted_at(&self) -> Option<Packed> {
        if self.is_matched() || self.is_v6() {
            return None;
        }
        let mut p = [0u8; 10];
        p.copy_from_slice(&self.data[6..16]);
        Some(p)
    }

    #[inline]
    pub fn is_key(&self, key: &PairKey) -> bool {
        self.tag == key.tag.to_ne_bytes()
            && self.check == key.check.to_ne_bytes()
            && self.meta & KIND == key.kind
    }

    #[inline]
    pub fn expires(&self) -> Millis {
        Millis::from_ne_bytes(self.expires)
    }

    #[inline]
    pub fn is_v6(&self) -> bool {
        self.meta & KIND_V6 != 0
    }

    #[inline]
    pub fn is_matched(&self) -> bool {
        self.meta & STATE == MATCHED
    }

    /// The key bits and sides, for reporting what was evicted.
    pub fn tag(&self) -> u64 {
        u64::from_ne_bytes(self.tag)
    }

    /// The entry's `meta` kind bits.
    pub fn kind(&self) -> u8 {
        self.meta & KIND
    }

    fn addr_at(&self, at: usize) -> Addr {
        if self.is_v6() {
            let mut b = [0u8; 18];
            b.copy_from_slice(&self.data[..18]);
            Addr::V6(b)
        } else {
            let mut b = [0u8; 6];
            b.copy_from_slice(&self.data[at..at + 6]);
            Addr::V4(b)
        }
    }

    /// Decodes the slot; IPv6 matches read their addresses from `v6`.
    #[inline]
    pub fn state(&self, v6: &V6Matches) -> State {
        let st = self.meta & STATE;
        if st != MATCHED {
            return State::Pending {
                waiter: if st == PENDING_LO { Side::Lo } else { Side::Hi },
                addr: self.addr_at(0),
                via: self.via,
                info: self.meta >> 4,
            };
        }
        let d = &self.data;
        let (lo, hi, ports_at) = if self.is_v6() {
            let (lo, hi) = v6.get(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]));
            (Addr::V6(lo), Addr::V6(hi), 4)
        } else {
            (self.addr_at(0), self.addr_at(6), 12)
        };
        State::Matched(Match {
            lo,
            hi,
            lo_via: self.via,
            hi_via: d[16],
            lo_info: d[17] & 0xf,
            hi_info: d[17] >> 4,
            lo_ports: (
                u16::from_ne_bytes([d[ports_at], d[ports_at + 1]]),
                u16::from_ne_bytes([d[ports_at + 2], d[ports_at + 3]]),
            ),
        })
    }

    /// The waiting side's address, if a side other than `side` waits (the
    /// request from `side` will match it). Reads only this slot.
    #[inline]
    pub fn waiter_other_than(&self, side: Side) -> Option<Addr> {
        let waiter = self.waiting()?;
        (waiter != side).then(|| self.addr_at(0))
    }

    /// The side that waits, or `None` for a match.
    #[inline]
    pub fn waiting(&self) -> Option<Side> {
        match self.meta & STATE {
            PENDING_LO => Some(Side::Lo),
            PENDING_HI => Some(Side::Hi),
            _ => None,
        }
    }

    /// An IPv4 slot's address at byte `at` of its data (0: the waiter's, or
    /// a match's lo side; 6: a match's hi side), as [`Addr::V4`] holds it.
    #[inline]
    pub fn v4_addr(&self, at: usize) -> [u8; 6] {
        let mut b = [0u8; 6];
        b.copy_from_slice(&self.data[at..at + 6]);
        b
    }

    /// For an IPv4 match: `side`'s address, relay and `(src_port,
    /// dst_port)`, and its partner's address.
    #[inline]
    pub fn v4_matched(&self, side: Side) -> ([u8; 6], u8, (u16, u16), [u8; 6]) {
        let d = &self.data;
        let lo_ports = (
            u16::from_ne_bytes([d[12], d[13]]),
            u16::from_ne_bytes([d[14], d[15]]),
        );
        match side {
            Side::Lo => (self.v4_addr(0), self.via, lo_ports, self.v4_addr(6)),
            Side::Hi => (
                self.v4_addr(6),
                d[16],
                (lo_ports.1, lo_ports.0),
                self.v4_addr(0),
            ),
        }
    }

    /// The relay of the waiter (pending) or of the lo side (matched).
    #[inline]
    pub fn via(&self) -> u8 {
        self.via
    }

    /// For an IPv6 match: the index of its addresses in [`V6Matches`].
    pub fn v6_index(&self) -> Option<u32> {
        (self.is_matched() && self.is_v6()).then(|| {
            let d = &self.data;
            u32::from_ne_bytes([d[0], d[1], d[2], d[3]])
        })
    }

    /// Makes the slot pending: `side` waits at `addr` until `expires`; an
    /// IPv4 waiter's source counters are at `counted` (ignored for IPv6).
    /// An IPv6 match's stored addresses must be freed by the caller first.
    pub fn set_pending(
        &mut self,
        side: Side,
        addr: Addr,
        via: u8,
        info: u8,
        expires: Millis,
        counted: Packed,
    ) {
        let st = match side {
            Side::Lo => PENDING_LO,
            Side::Hi => PENDING_HI,
        };
        self.meta = (self.meta & KIND) | st | (info & 0xf) << 4;
        self.via = via;
        self.expires = expires.to_ne_bytes();
        self.data = [0; 18];
        match addr {
            Addr::V4(b) => {
                self.data[..6].copy_from_slice(&b);
                self.data[6..16].copy_from_slice(&counted);
            }
            Addr::V6(b) => self.data.copy_from_slice(&b),
        }
    }

    /// Makes an IPv4 slot a match, remembered until `expires`: the lo and
    /// hi sides' addresses and relays, and the lo side's ports; both infos
    /// 0 (the seed format has none). [`PairEntry::set_matched`] for the lean
    /// path.
    #[inline]
    pub fn set_matched_v4(
        &mut self,
        lo: ([u8; 6], u8),
        hi: ([u8; 6], u8),
        lo_ports: (u16, u16),
        expires: Millis,
    ) {
        self.meta = (self.meta & KIND) | MATCHED;
        self.via = lo.1;
        self.expires = expires.to_ne_bytes();
        let d = &mut self.data;
        d[..6].copy_from_slice(&lo.0);
        d[6..12].copy_from_slice(&hi.0);
        d[12..14].copy_from_slice(&lo_ports.0.to_ne_bytes());
        d[14..16].copy_from_slice(&lo_ports.1.to_ne_bytes());
        d[16] = hi.1;
        d[17] = 0;
    }

    /// Makes the slot a match, remembered until `expires`. For IPv6 the
    /// addresses go to `v6` at `index` (allocated by the caller).
    pub fn set_matched(&mut self, m: &Match, expires: Millis, v6: &mut V6Matches, index: u32) {
        self.meta = (self.meta & KIND) | MATCHED;
        self.via = m.lo_via;
        self.expires = expires.to_ne_bytes();
        let mut d = [0u8; 18];
        let ports_at = match (m.lo, m.hi) {
            (Addr::V4(lo), Addr::V4(hi)) => {
                d[..6].copy_from_slice(&lo);
                d[6..12].copy_from_slice(&hi);
                12
            }
            (Addr::V6(lo), Addr::V6(hi)) => {
                v6.set(index, lo, hi);
                d[..4].copy_from_slice(&index.to_ne_bytes());
                4
            }
            _ => unreachable!("a pair never mixes families"),
        };
        d[ports_at..ports_at + 2].copy_from_slice(&m.lo_ports.0.to_ne_bytes());
        d[ports_at + 2..ports_at + 4].copy_from_slice(&m.lo_ports.1.to_ne_bytes());
        d[16] = m.hi_via;
        d[17] = (m.lo_info & 0xf) | (m.hi_info & 0xf) << 4;
        self.data = d;
    }
}

/// Bytes of one IPv6 match record: the two sides' addresses.
const V6_RECORD: usize = 36;

/// The addresses of IPv6 matches, which do not fit a slot.
///
/// Records are handed out densely (a freed record is reused before a new one
/// is touched), from memory the OS maps only when first
/// written: it costs [`V6_RECORD`] bytes per IPv6 match held for replay, at
/// the most ever held at once, not per unit of capacity.
pub(super) struct V6Matches {
    bytes: Box<[u8]>,
    /// Head of the free list, 1-based (0: empty); the next index is kept in
    /// the first four bytes of each free record.
    free: u32,
    /// Records ever handed out (the high-water mark).
    high: u32,
    held: u32,
}

impl V6Matches {
    /// Reserves address space for `records` records; `None` if it cannot.
    pub fn try_new(records: usize) -> Option<V6Matches> {
        let bytes = crate::sys::try_zeroed_bytes(records.checked_mul(V6_RECORD)?)?;
        Some(V6Matches {
            bytes,
            free: 0,
            high: 0,
            held: 0,
        })
    }

    /// Bytes ever written: the high-water mark.
    pub fn touched_bytes(&self) -> usize {
        self.high as usize * V6_RECORD
    }

    /// A free record, or `None` when every record is held.
    pub fn alloc(&mut self) -> Option<u32> {
        let i = if self.free != 0 {
            let i = self.free - 1;
            let at = i as usize * V6_RECORD;
            let mut next = [0u8; 4];
            next.copy_from_slice(&self.bytes[at..at + 4]);
            self.free = u32::from_ne_bytes(next);
            i
        } else if (self.high as usize + 1) * V6_RECORD <= self.bytes.len() {
            self.high += 1;
            self.high - 1
        } else {
            return None;
        };
        self.held += 1;
        Some(i)
    }

    /// Returns record `i` to the free list.
    pub fn free(&mut self, i: u32) {
        let at = i as usize * V6_RECORD;
        self.bytes[at..at + 4].copy_from_slice(&self.free.to_ne_bytes());
        self.free = i + 1;
        self.held -= 1;
    }

    fn set(&mut self, i: u32, lo: [u8; 18], hi: [u8; 18]) {
        let at = i as usize * V6_RECORD;
        self.bytes[at..at + 18].copy_from_slice(&lo);
        self.bytes[at + 18..at + 36].copy_from_slice(&hi);
    }

    fn get(&self, i: u32) -> ([u8; 18], [u8; 18]) {
        let at = i as usize * V6_RECORD;
        let mut lo = [0u8; 18];
        let mut hi = [0u8; 18];
        lo.copy_from_slice(&self.bytes[at..at + 18]);
        hi.copy_from_slice(&self.bytes[at + 18..at + 36]);
        (lo, hi)
    }

    /// Records held now.
    #[cfg(test)]
    pub fn held(&self) -> u32 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: u8) -> PairKey {
        PairKey {
            tag: 0x1122_3344_5566_7788,
            check: 0,
            kind,
            side: Side::Hi,
            hash: 0,
        }
    }

    #[test]
    fn a_slot_is_36_bytes() {
        assert_eq!(std::mem::size_of::<PairEntry>(), 36);
        assert_eq!(std::mem::align_of::<PairEntry>(), 1);
    }

    #[test]
    fn pending_round_trips() {
        let mut v6 = V6Matches::try_new(4).unwrap();
        for (kind, a) in [(0, "192.0.2.1:4000"), (KIND_V6, "[2001:db8::7]:65535")] {
            let addr = Addr::from_socket(a.parse().unwrap());
            let e = PairEntry::pending(&key(kind), addr, 3, 9, 1234, [7; 10]);
            assert!(e.is_key(&key(kind)));
            assert!(!e.is_key(&key(kind ^ KIND_V2)));
            assert_eq!(e.expires(), 1234);
            assert_eq!(
                e.state(&v6),
                State::Pending {
                    waiter: Side::Hi,
                    addr,
                    via: 3,
                    info: 9
                }
            );
            assert_eq!(addr.to_socket(), a.parse().unwrap());
        }
        assert!(v6.alloc().is_some());
    }

    #[test]
    fn matched_round_trips_in_both_families() {
        let mut v6 = V6Matches::try_new(4).unwrap();
        for (kind, lo, hi) in [
            (0, "192.0.2.1:4000", "198.51.100.2:1"),
            (KIND_V6, "[2001:db8::7]:65535", "[2001:db8::8]:2"),
        ] {
            let m = Match {
                lo: Addr::from_socket(lo.parse().unwrap()),
                hi: Addr::from_socket(hi.parse().unwrap()),
                lo_via: 1,
                hi_via: 2,
                lo_info: 3,
                hi_info: 15,
                lo_ports: (1024, 65535),
            };
            let mut e = PairEntry::pending(&key(kind), m.lo, 0, 0, 5, [0; 10]);
            let index = if kind == KIND_V6 {
                v6.alloc().unwrap()
            } else {
                0
            };
            e.set_matched(&m, 99, &mut v6, index);
            assert!(e.is_matched() && e.is_key(&key(kind)));
            assert_eq!(e.state(&v6), State::Matched(m));
            assert_eq!(m.ports(Side::Hi), (65535, 1024));
            assert_eq!(e.v6_index(), (kind == KIND_V6).then_some(index));
        }
    }

    #[test]
    fn freed_records_are_reused_before_new_ones() {
        let mut v6 = V6Matches::try_new(3).unwrap();
        let a = v6.alloc().unwrap();
        let b = v6.alloc().unwrap();
        let c = v6.alloc().unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(v6.alloc(), None);
        v6.free(b);
        v6.free(a);
        assert_eq!(v6.alloc(), Some(a));
        assert_eq!(v6.alloc(), Some(b));
        assert_eq!(v6.held(), 3);
        assert_eq!(v6.touched_bytes(), 3 * V6_RECORD);
    }
}
