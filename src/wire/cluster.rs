//! The cluster's server-to-server datagrams: forward, forwarded reply and
//! heartbeat, byte for byte.
//!
//! Members of a cluster (`src/cluster/`) talk over their own UDP socket
//! (`--cluster-bind`), never the clients' port. Every datagram is
//! [`HEADER_LEN`] bytes of header, a body that depends on the type, and a
//! [`MAC_LEN`]-byte MAC over everything before it, made with the cluster
//! key ([`crate::cluster::ClusterKey`] computes and checks it; this module
//! only lays out the bytes).
//!
//! | message | type | bytes | sent by |
//! |---|---|---|---|
//! | forward | 1 | [`FORWARD_MIN_LEN`] to [`FORWARD_MAX_LEN`] | the member a client sent to → the pair's owner |
//! | reply | 2 | the same bounds | the owner → the member that forwarded, which sends it to the client |
//! | heartbeat | 3 | [`HEARTBEAT_LEN`] = 72 | every member → every other, every `--cluster-timeout` / 4 |
//!
//! The header names the sender (its cluster address), the sender's
//! incarnation (when its process started), a sequence number per sending
//! thread (`lane`) and the time it was sent, so that a receiver can refuse
//! a captured datagram later (see `src/cluster/replay.rs`).
//!
//! [`View::new_checked`] checks the length, magic, version and type (and
//! the length the type demands) before anything else is read; its
//! accessors then cannot fail, except the address reads, which validate.
//! [`View::to_repr`] checks every reserved byte and address. [`Message::emit`]
//! writes into a caller's buffer and never allocates. Nothing here panics on
//! any input; an accepted datagram emits back to the very same bytes
//! (MAC included, once the same key seals it). Integers are big-endian.
//! `PROTOCOL.md` ("Cluster") has the byte tables.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first four bytes of every cluster datagram: ASCII `PSCL`. Neither a
/// seed request (8 bytes), STUN (first byte 0x00-0x03) nor v2 (`PSYN`).
pub const MAGIC: [u8; 4] = *b"PSCL";
/// The version byte this module speaks.
pub const VERSION: u8 = 1;
/// Bytes of the MAC that ends every datagram (HMAC-SHA256, truncated).
pub const MAC_LEN: usize = 16;
/// Bytes of one address slot (the same layout as v2's: family, zero, port, IP).
pub const ADDR_LEN: usize = 20;
/// Most bytes a forward or reply carries: the longest request or reply of
/// any psync format (v2's 152), with room to spare for a later one.
pub const MAX_PAYLOAD: usize = 256;

/// Byte offsets of every field; the lengths below derive from them.
pub mod field {
    use std::ops::Range;

    /// A run of bytes inside a datagram.
    pub type Field = Range<usize>;

    /// [`super::MAGIC`].
    pub const MAGIC: Field = 0..4;
    /// [`super::VERSION`].
    pub const VERSION: usize = 4;
    /// The message type, a [`super::Kind`].
    pub const TYPE: usize = 5;
    /// The sending thread of the sender: sequence numbers count per lane.
    pub const LANE: usize = 6;
    /// Reserved, zero.
    pub const RESERVED: usize = 7;
    /// The sender's cluster address (an address slot): who it claims to be.
    pub const SENDER: Field = 8..8 + super::ADDR_LEN;
    /// When the sender's process started, Unix milliseconds, u64: a restart
    /// has a larger incarnation, and resets the sender's sequence numbers.
    pub const INCARNATION: Field = SENDER.end..SENDER.end + 8;
    /// The sender's sequence number on this lane, u64, from 1.
    pub const SEQ: Field = INCARNATION.end..INCARNATION.end + 8;
    /// When it was sent, Unix milliseconds, u64.
    pub const SENT: Field = SEQ.end..SEQ.end + 8;

    /// Forward and reply: the client's address (an address slot): where the
    /// request came from, and where the reply must go.
    pub const CLIENT: Field = SENT.end..SENT.end + super::ADDR_LEN;
    /// Forward and reply: where the carried request or reply starts; it runs
    /// to the MAC.
    pub const PAYLOAD: usize = CLIENT.end;

    /// Heartbeat: 0 alive, 1 leaving (SIGTERM: re-home my keys now).
    pub const STATUS: usize = SENT.end;
    /// Heartbeat: reserved, zero.
    pub const HEARTBEAT_RESERVED: Field = STATUS + 1..STATUS + 4;

    /// Address slot, relative to its start: 4 IPv4, 6 IPv6.
    pub const ADDR_FAMILY: usize = 0;
    /// Address slot: reserved, zero (v2 puts a candidate kind here).
    pub const ADDR_ZERO: usize = 1;
    /// Address slot: the port, u16, nonzero.
    pub const ADDR_PORT: Field = 2..4;
    /// Address slot: 16 bytes of IPv6, or 4 bytes of IPv4 then 12 zero bytes.
    pub const ADDR_IP: Field = 4..super::ADDR_LEN;
}

/// Bytes of the header every cluster datagram starts with.
pub const HEADER_LEN: usize = field::SENT.end;
/// Shortest forward or reply: one byte carried.
pub const FORWARD_MIN_LEN: usize = field::PAYLOAD + 1 + MAC_LEN;
/// Longest forward or reply: [`MAX_PAYLOAD`] bytes carried.
pub const FORWARD_MAX_LEN: usize = field::PAYLOAD + MAX_PAYLOAD + MAC_LEN;
/// Bytes of a heartbeat.
pub const HEARTBEAT_LEN: usize = field::HEARTBEAT_RESERVED.end + MAC_LEN;
/// The longest cluster datagram: a buffer this long holds any of them.
pub const MAX_LEN: usize = FORWARD_MAX_LEN;

const _: () = {
    assert!(HEADER_LEN == 52);
    assert!(HEARTBEAT_LEN == 72);
    assert!(field::PAYLOAD == 72);
    // A forward of a seed request (8 bytes) is 96 bytes, of a v2 request 240.
    assert!(field::PAYLOAD + 8 + MAC_LEN == 96);
    assert!(field::PAYLOAD + super::v2::REQUEST_LEN + MAC_LEN == 240);
    assert!(MAX_PAYLOAD >= super::v2::MAX_LEN && MAX_PAYLOAD >= super::seed::MAX_REPLY_LEN);
    // Fits a receive buffer of psync::sys (512 bytes) with room to spare.
    assert!(MAX_LEN < 512);
};

/// The message type, byte 5. Values 0 and 4-255 are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A client's request, forwarded to the pair's owner.
    Forward = 1,
    /// A reply for a client, sent back to the member that forwarded its request.
    Reply = 2,
    /// "I am alive" (or "I am leaving"), to every other member.
    Heartbeat = 3,
}

impl Kind {
    /// The kind a byte names, if any.
    pub const fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Forward),
            2 => Some(Kind::Reply),
            3 => Some(Kind::Heartbeat),
            _ => None,
        }
    }
}

/// Why a datagram is not a valid cluster datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// A length (given) the type does not allow.
    BadSize(usize),
    /// The first four bytes are not [`MAGIC`].
    BadMagic,
    /// The version byte (given) is not [`VERSION`].
    BadVersion(u8),
    /// The type byte (given) is unknown.
    BadType(u8),
    /// A reserved byte is not zero.
    Reserved,
    /// An address slot with an unknown family, port 0, or a nonzero IPv4 tail.
    BadAddress,
    /// A heartbeat status (given) other than 0 or 1.
    BadStatus(u8),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BadSize(n) => write!(f, "cluster datagram of {n} bytes has the wrong size"),
            Error::BadMagic => f.write_str("not a psync cluster datagram (bad magic)"),
            Error::BadVersion(v) => write!(f, "psync cluster version {v} is not {VERSION}"),
            Error::BadType(t) => write!(f, "unknown cluster message type {t}"),
            Error::Reserved => f.write_str("a reserved field is not zero"),
            Error::BadAddress => f.write_str("malformed address slot"),
            Error::BadStatus(s) => write!(f, "unknown heartbeat status {s}"),
        }
    }
}

impl std::error::Error for Error {}

/// What every cluster datagram says about its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// The message type.
    pub kind: Kind,
    /// The sending thread; sequence numbers count per lane.
    pub lane: u8,
    /// The sender's cluster address, as the other members list it.
    pub sender: SocketAddr,
    /// When the sender's process started (Unix ms).
    pub incarnation: u64,
    /// The sender's sequence number on `lane`, from 1.
    pub seq: u64,
    /// When the datagram was sent (Unix ms, the sender's clock).
    pub sent_ms: u64,
}

/// What follows the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Body<'a> {
    /// A client's request for the owner's engine.
    Forward {
        /// The client's public address, the request's source.
        client: SocketAddr,
        /// The request's bytes, verbatim (1 to [`MAX_PAYLOAD`]).
        request: &'a [u8],
    },
    /// A reply for a client, to be sent from the member it sent to.
    Reply {
        /// Where the reply goes: the client's public address.
        client: SocketAddr,
        /// The reply's bytes, verbatim (1 to [`MAX_PAYLOAD`]).
        reply: &'a [u8],
    },
    /// Liveness.
    Heartbeat {
        /// The sender is shutting down: stop counting it as a member now.
        leaving: bool,
    },
}

/// A whole cluster datagram but its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Message<'a> {
    /// Sender, time and sequence.
    pub header: Header,
    /// The message.
    pub body: Body<'a>,
}

impl Message<'_> {
    /// Bytes this message takes on the wire, MAC included; `None` when a
    /// payload is empty or longer than [`MAX_PAYLOAD`] (nothing to emit).
    pub fn len(&self) -> Option<usize> {
        match self.body {
            Body::Forward { request: p, .. } | Body::Reply { reply: p, .. } => (1..=MAX_PAYLOAD)
                .contains(&p.len())
                .then_some(field::PAYLOAD + p.len() + MAC_LEN),
            Body::Heartbeat { .. } => Some(HEARTBEAT_LEN),
        }
    }

    /// Always false; present because `len` is.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into the front of `buf` with a zero MAC and
    /// returns its length (MAC included); the caller seals it with the
    /// cluster key. The header's `kind` is taken from the body. `None` (and
    /// nothing written) when the payload is empty or too long, or `buf`
    /// is shorter than the message.
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let len = self.len()?;
        let out = buf.get_mut(..len)?;
        out.fill(0);
        out[field::MAGIC].copy_from_slice(&MAGIC);
        out[field::VERSION] = VERSION;
        out[field::TYPE] = self.kind() as u8;
        out[field::LANE] = self.header.lane;
        write_addr(&mut out[field::SENDER], self.header.sender);
        out[field::INCARNATION].copy_from_slice(&self.header.incarnation.to_be_bytes());
        out[field::SEQ].copy_from_slice(&self.header.seq.to_be_bytes());
        out[field::SENT].copy_from_slice(&self.header.sent_ms.to_be_bytes());
        match self.body {
            Body::Forward { client, request: p } | Body::Reply { client, reply: p } => {
                write_addr(&mut out[field::CLIENT], client);
                out[field::PAYLOAD..field::PAYLOAD + p.len()].copy_from_slice(p);
            }
            Body::Heartbeat { leaving } => out[field::STATUS] = u8::from(leaving),
        }
        Some(len)
    }

    /// The kind the body is.
    pub fn kind(&self) -> Kind {
        match self.body {
            Body::Forward { .. } => Kind::Forward,
            Body::Reply { .. } => Kind::Reply,
            Body::Heartbeat { .. } => Kind::Heartbeat,
        }
    }
}

/// A checked view of a cluster datagram: its length fits its type, and
/// magic, version and type are right. Nothing is authenticated yet: check
/// the MAC ([`View::signed`], [`View::mac`]) before believing any field.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> View<'a> {
    /// Checks length bounds first, then magic, version, type, and the
    /// length that type demands.
    pub fn new_checked(datagram: &'a [u8]) -> Result<View<'a>, Error> {
        let len = datagram.len();
        if !(HEARTBEAT_LEN.min(FORWARD_MIN_LEN)..=MAX_LEN).contains(&len) {
            return Err(Error::BadSize(len));
        }
        if datagram[field::MAGIC] != MAGIC {
            return Err(Error::BadMagic);
        }
        if datagram[field::VERSION] != VERSION {
            return Err(Error::BadVersion(datagram[field::VERSION]));
        }
        let ty = datagram[field::TYPE];
        let kind = Kind::from_u8(ty).ok_or(Error::BadType(ty))?;
        let fits = match kind {
            Kind::Forward | Kind::Reply => (FORWARD_MIN_LEN..=FORWARD_MAX_LEN).contains(&len),
            Kind::Heartbeat => len == HEARTBEAT_LEN,
        };
        if !fits {
            return Err(Error::BadSize(len));
        }
        Ok(View {
            buf: datagram,
            kind,
        })
    }

    /// The message type.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The sending thread.
    pub fn lane(&self) -> u8 {
        self.buf[field::LANE]
    }

    /// Who the sender claims to be (validated slot).
    pub fn sender(&self) -> Result<SocketAddr, Error> {
        read_addr(&self.buf[field::SENDER])
    }

    /// The sender's incarnation.
    pub fn incarnation(&self) -> u64 {
        u64::from_be_bytes(array(self.buf, field::INCARNATION.start))
    }

    /// The sender's sequence number on its lane.
    pub fn seq(&self) -> u64 {
        u64::from_be_bytes(array(self.buf, field::SEQ.start))
    }

    /// When it was sent (Unix ms, the sender's clock).
    pub fn sent_ms(&self) -> u64 {
        u64::from_be_bytes(array(self.buf, field::SENT.start))
    }

    /// Everything the MAC covers: the datagram but its last [`MAC_LEN`] bytes.
    pub fn signed(&self) -> &'a [u8] {
        &self.buf[..self.buf.len() - MAC_LEN]
    }

    /// The MAC, the datagram's last [`MAC_LEN`] bytes.
    pub fn mac(&self) -> &'a [u8; MAC_LEN] {
        let start = self.buf.len() - MAC_LEN;
        self.buf[start..]
            .try_into()
            .expect("new_checked guarantees room for the MAC")
    }

    /// The header, validated.
    pub fn header(&self) -> Result<Header, Error> {
        if self.buf[field::RESERVED] != 0 {
            return Err(Error::Reserved);
        }
        Ok(Header {
            kind: self.kind,
            lane: self.lane(),
            sender: self.sender()?,
            incarnation: self.incarnation(),
            seq: self.seq(),
            sent_ms: self.sent_ms(),
        })
    }

    /// Validates every field and returns the message (its payload borrows
    /// the datagram).
    pub fn to_repr(&self) -> Result<Message<'a>, Error> {
        let header = self.header()?;
        let buf = self.buf;
        let body = match self.kind {
            Kind::Forward | Kind::Reply => {
                let client = read_addr(&buf[field::CLIENT])?;
                let payload = &buf[field::PAYLOAD..buf.len() - MAC_LEN];
                if self.kind == Kind::Forward {
                    Body::Forward {
                        client,
                        request: payload,
                    }
                } else {
                    Body::Reply {
                        client,
                        reply: payload,
                    }
                }
            }
            Kind::Heartbeat => {
                if buf[field::HEARTBEAT_RESERVED].iter().any(|&b| b != 0) {
                    return Err(Error::Reserved);
                }
                let leaving = match buf[field::STATUS] {
                    0 => false,
                    1 => true,
                    s => return Err(Error::BadStatus(s)),
                };
                Body::Heartbeat { leaving }
            }
        };
        Ok(Message { header, body })
    }
}

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Reads a 20-byte address slot that must hold an address.
fn read_addr(slot: &[u8]) -> Result<SocketAddr, Error> {
    let ip_bytes: [u8; 16] = array(slot, field::ADDR_IP.start);
    let port = u16::from_be_bytes(array(slot, field::ADDR_PORT.start));
    if slot[field::ADDR_ZERO] != 0 {
        return Err(Error::Reserved);
    }
    let ip = match slot[field::ADDR_FAMILY] {
        FAMILY_V4 if ip_bytes[4..].iter().all(|&b| b == 0) => IpAddr::V4(Ipv4Addr::new(
            ip_bytes[0],
            ip_bytes[1],
            ip_bytes[2],
            ip_bytes[3],
        )),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(ip_bytes)),
        _ => return Err(Error::BadAddress),
    };
    if port == 0 {
        return Err(Error::BadAddress);
    }
    Ok(SocketAddr::new(ip, port))
}

/// Writes a 20-byte address slot. Flow labels and scope IDs are not sent.
fn write_addr(slot: &mut [u8], addr: SocketAddr) {
    slot.fill(0);
    slot[field::ADDR_PORT].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            slot[field::ADDR_FAMILY] = FAMILY_V4;
            slot[field::ADDR_IP.start..field::ADDR_IP.start + 4].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            slot[field::ADDR_FAMILY] = FAMILY_V6;
            slot[field::ADDR_IP].copy_from_slice(&ip.octets());
        }
    }
}

/// Copies `N` bytes from `at` out of a buffer whose length the caller checked.
fn array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A forward of the seed request `(1, 2)` from client 198.51.100.7:4949,
    /// by member 10.0.0.2:1025 on lane 1, incarnation 1700000000000, seq
    /// 42, sent at 1700000000123; sealed with the key `00 01 .. 1f`.
    #[rustfmt::skip]
    pub(crate) const FORWARD_FIXTURE: [u8; 96] = [
        b'P', b'S', b'C', b'L', 1, 1, 1, 0,             // magic, version 1, forward, lane 1, reserved
        4, 0, 0x04, 0x01, 10, 0, 0, 2,                  // sender: 10.0.0.2:1025
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00,       // incarnation 1700000000000
        0, 0, 0, 0, 0, 0, 0, 42,                        // seq 42
        0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x7b,       // sent 1700000000123
        4, 0, 0x13, 0x55, 198, 51, 100, 7,              // client: 198.51.100.7:4949
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        1, 0, 0, 0, 2, 0, 0, 0,                         // the seed request (1, 2)
        0x7d, 0x4b, 0x39, 0x61, 0xed, 0x1b, 0x39, 0x1c, // MAC
        0x89, 0x09, 0x3d, 0xae, 0xd8, 0xd0, 0xa4, 0x9f,
    ];

    /// The owner's reply for that client: the seed reply (ports 12345/54321,
    /// partner 203.0.113.9:5000), by member [2001:db8::3]:1025, lane 0, seq
    /// 7, sent at 1700000000200, incarnation 1690000000000.
    #[rustfmt::skip]
    pub(crate) const REPLY_FIXTURE: [u8; 108] = [
        b'P', b'S', b'C', b'L', 1, 2, 0, 0,             // magic, version 1, reply, lane 0
        6, 0, 0x04, 0x01, 0x20, 0x01, 0x0d, 0xb8,       // sender: [2001:db8::3]:1025
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3,
        0, 0, 0x01, 0x89, 0x7b, 0xd9, 0x84, 0x00,       // incarnation 1690000000000
        0, 0, 0, 0, 0, 0, 0, 7,                         // seq 7
        0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0xc8,       // sent 1700000000200
        4, 0, 0x13, 0x55, 198, 51, 100, 7,              // client: 198.51.100.7:4949
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x39, 0x30, 0x31, 0xd4, 0x02, 0x00, 0x13, 0x88, // seed reply: ports, AF_INET, port 5000
        203, 0, 113, 9, 0, 0, 0, 0, 0, 0, 0, 0,         // 203.0.113.9, sin_zero
        0x61, 0x78, 0x51, 0xa7, 0x99, 0x1b, 0x0e, 0xfd, // MAC
        0x89, 0xa7, 0xf1, 0x4c, 0xad, 0xf8, 0x62, 0xe8,
    ];

    /// A leaving heartbeat from 10.0.0.2:1025, lane 0, seq 9, sent at
    /// 1700000000500, incarnation 1700000000000.
    #[rustfmt::skip]
    pub(crate) const HEARTBEAT_FIXTURE: [u8; HEARTBEAT_LEN] = [
        b'P', b'S', b'C', b'L', 1, 3, 0, 0,             // magic, version 1, heartbeat, lane 0
        4, 0, 0x04, 0x01, 10, 0, 0, 2,                  // sender: 10.0.0.2:1025
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00,       // incarnation 1700000000000
        0, 0, 0, 0, 0, 0, 0, 9,                         // seq 9
        0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x69, 0xf4,       // sent 1700000000500
        1, 0, 0, 0,                                     // status: leaving, reserved
        0xac, 0x68, 0x61, 0xe1, 0xef, 0x13, 0x55, 0x9b, // MAC
        0x8d, 0x22, 0x3e, 0x5e, 0xc5, 0x70, 0xb1, 0x78,
    ];

    pub(crate) fn forward_message() -> Message<'static> {
        Message {
            header: Header {
                kind: Kind::Forward,
                lane: 1,
                sender: "10.0.0.2:1025".parse().unwrap(),
                incarnation: 1_700_000_000_000,
                seq: 42,
                sent_ms: 1_700_000_000_123,
            },
            body: Body::Forward {
                client: "198.51.100.7:4949".parse().unwrap(),
                request: &[1, 0, 0, 0, 2, 0, 0, 0],
            },
        }
    }

    pub(crate) fn reply_message() -> Message<'static> {
        const REPLY: [u8; 20] = [
            0x39, 0x30, 0x31, 0xd4, 0x02, 0x00, 0x13, 0x88, 203, 0, 113, 9, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        Message {
            header: Header {
                kind: Kind::Reply,
                lane: 0,
                sender: "[2001:db8::3]:1025".parse().unwrap(),
                incarnation: 1_690_000_000_000,
                seq: 7,
                sent_ms: 1_700_000_000_200,
            },
            body: Body::Reply {
                client: "198.51.100.7:4949".parse().unwrap(),
                reply: &REPLY,
            },
        }
    }

    pub(crate) fn heartbeat_message() -> Message<'static> {
        Message {
            header: Header {
                kind: Kind::Heartbeat,
                lane: 0,
                sender: "10.0.0.2:1025".parse().unwrap(),
                incarnation: 1_700_000_000_000,
                seq: 9,
                sent_ms: 1_700_000_000_500,
            },
            body: Body::Heartbeat { leaving: true },
        }
    }

    /// The fixtures, with their MACs zeroed (what `emit` writes).
    fn unsealed(fixture: &[u8]) -> Vec<u8> {
        let mut v = fixture.to_vec();
        let n = v.len();
        v[n - MAC_LEN..].fill(0);
        v
    }

    #[test]
    fn lengths_are_derived_from_the_fields() {
        assert_eq!(HEADER_LEN, 52);
        assert_eq!(FORWARD_MIN_LEN, 89);
        assert_eq!(FORWARD_MAX_LEN, 72 + 256 + 16);
        assert_eq!(HEARTBEAT_LEN, 72);
        assert_eq!(FORWARD_FIXTURE.len(), 96);
        assert_eq!(REPLY_FIXTURE.len(), 72 + 20 + 16);
    }

    #[test]
    fn messages_emit_the_fixtures_and_parse_back() {
        for (msg, fixture) in [
            (forward_message(), &FORWARD_FIXTURE[..]),
            (reply_message(), &REPLY_FIXTURE[..]),
            (heartbeat_message(), &HEARTBEAT_FIXTURE[..]),
        ] {
            let mut buf = [0xeeu8; MAX_LEN];
            let n = msg.emit(&mut buf).unwrap();
            assert_eq!(n, fixture.len());
            assert_eq!(buf[..n], unsealed(fixture)[..], "{:?}", msg.kind());
            let view = View::new_checked(fixture).unwrap();
            assert_eq!(view.kind(), msg.kind());
            assert_eq!(view.to_repr(), Ok(msg));
            assert_eq!(view.signed(), &fixture[..fixture.len() - MAC_LEN]);
            assert_eq!(&view.mac()[..], &fixture[fixture.len() - MAC_LEN..]);
        }
    }

    #[test]
    fn emit_refuses_what_it_cannot_write() {
        let mut m = forward_message();
        let mut buf = [0u8; MAX_LEN];
        m.body = Body::Forward {
            client: "198.51.100.7:4949".parse().unwrap(),
            request: &[],
        };
        assert_eq!(m.emit(&mut buf), None);
        let long = [7u8; MAX_PAYLOAD + 1];
        m.body = Body::Forward {
            client: "198.51.100.7:4949".parse().unwrap(),
            request: &long,
        };
        assert_eq!(m.emit(&mut buf), None);
        m.body = Body::Forward {
            client: "198.51.100.7:4949".parse().unwrap(),
            request: &long[..MAX_PAYLOAD],
        };
        assert_eq!(m.emit(&mut buf), Some(MAX_LEN));
        assert_eq!(m.emit(&mut buf[..MAX_LEN - 1]), None);
    }

    #[test]
    fn sizes_are_checked_first() {
        for n in [0, 1, 7, 8, 20, 52, 71, MAX_LEN + 1, 1500] {
            let buf = vec![0u8; n];
            assert_eq!(
                View::new_checked(&buf).unwrap_err(),
                Error::BadSize(n),
                "{n}"
            );
        }
        // A heartbeat must be exactly 72 bytes; a forward at least 89.
        let mut hb = HEARTBEAT_FIXTURE.to_vec();
        hb.push(0);
        assert_eq!(View::new_checked(&hb).unwrap_err(), Error::BadSize(73));
        let mut fw = FORWARD_FIXTURE[..72].to_vec();
        assert!(View::new_checked(&fw).is_err());
        fw[field::TYPE] = 1;
        assert_eq!(View::new_checked(&fw).unwrap_err(), Error::BadSize(72));
    }

    #[test]
    fn header_errors() {
        let mut d = FORWARD_FIXTURE;
        d[0] = b'X';
        assert_eq!(View::new_checked(&d).unwrap_err(), Error::BadMagic);
        let mut d = FORWARD_FIXTURE;
        d[field::VERSION] = 2;
        assert_eq!(View::new_checked(&d).unwrap_err(), Error::BadVersion(2));
        for t in [0u8, 4, 255] {
            let mut d = FORWARD_FIXTURE;
            d[field::TYPE] = t;
            assert_eq!(View::new_checked(&d).unwrap_err(), Error::BadType(t));
        }
        // A v2 request is never taken for a cluster datagram.
        let v2 = [0x50u8; super::super::v2::REQUEST_LEN];
        assert_eq!(View::new_checked(&v2).unwrap_err(), Error::BadMagic);
    }

    #[test]
    fn field_errors() {
        let check = |d: &[u8]| View::new_checked(d).unwrap().to_repr().map(|m| m.header);
        let mut d = FORWARD_FIXTURE;
        d[field::RESERVED] = 1;
        assert_eq!(check(&d), Err(Error::Reserved));
        let mut d = FORWARD_FIXTURE;
        d[field::SENDER.start] = 5;
        assert_eq!(check(&d), Err(Error::BadAddress));
        let mut d = FORWARD_FIXTURE;
        d[field::SENDER.start + field::ADDR_ZERO] = 1;
        assert_eq!(check(&d), Err(Error::Reserved));
        let mut d = FORWARD_FIXTURE;
        d[field::CLIENT.start + 2..field::CLIENT.start + 4].fill(0);
        assert_eq!(check(&d), Err(Error::BadAddress));
        let mut d = FORWARD_FIXTURE;
        d[field::CLIENT.end - 1] = 1; // nonzero IPv4 tail
        assert_eq!(check(&d), Err(Error::BadAddress));
        let mut d = HEARTBEAT_FIXTURE;
        d[field::STATUS] = 2;
        assert_eq!(check(&d), Err(Error::BadStatus(2)));
        let mut d = HEARTBEAT_FIXTURE;
        d[field::HEARTBEAT_RESERVED.start] = 1;
        assert_eq!(check(&d), Err(Error::Reserved));
    }

    #[test]
    fn every_prefix_and_every_byte_flip_is_survived() {
        // No input panics: every truncation, and every single-byte change of
        // each fixture, either parses or is an error.
        for fixture in [
            &FORWARD_FIXTURE[..],
            &REPLY_FIXTURE[..],
            &HEARTBEAT_FIXTURE[..],
        ] {
            for n in 0..=fixture.len() {
                if let Ok(v) = View::new_checked(&fixture[..n]) {
                    let _ = v.to_repr();
                }
            }
            for i in 0..fixture.len() {
                for b in [0u8, 1, 0x7f, 0xff] {
                    let mut d = fixture.to_vec();
                    d[i] = b;
                    if let Ok(v) = View::new_checked(&d) {
                        if let Ok(m) = v.to_repr() {
                            // Accepted: emits back to the same bytes (MAC aside).
                            let mut out = [0u8; MAX_LEN];
                            let n = m.emit(&mut out).unwrap();
                            assert_eq!(out[..n - MAC_LEN], d[..d.len() - MAC_LEN]);
                        }
                    }
                }
            }
        }
    }

    /// The hex dumps in PROTOCOL.md are these fixtures, byte for byte.
    #[test]
    fn protocol_md_shows_the_fixtures() {
        let doc = include_str!("../../PROTOCOL.md");
        let dump = |name: &str| -> Vec<u8> {
            let marker = format!("<!-- fixture:{name} -->");
            let start = doc.find(&marker).expect("marker in PROTOCOL.md") + marker.len();
            let block = &doc[start..];
            let body = &block[block.find("```text\n").unwrap() + 8..];
            let body = &body[..body.find("```").unwrap()];
            body.lines()
                .flat_map(|l| l.split_once(':').unwrap().1.split_whitespace())
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect()
        };
        assert_eq!(dump("cluster-forward"), FORWARD_FIXTURE);
        assert_eq!(dump("cluster-reply"), REPLY_FIXTURE);
        assert_eq!(dump("cluster-heartbeat"), HEARTBEAT_FIXTURE);
    }
}
