//! The peer handshake: what two psync clients send each other once the
//! server has introduced them (punching, proving the path, and the session).
//!
//! Every peer-to-peer datagram starts with one 40-byte header, all numbers
//! little-endian; only `data` carries a payload after it:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..4 | magic | `psHP` ("psync hole punch") |
//! | 4 | version | 1 |
//! | 5 | kind | [`Kind`] |
//! | 6..8 | reserved | zero when sent, ignored when read |
//! | 8..12 | from | the sender's peer ID |
//! | 12..16 | to | the receiver's peer ID |
//! | 16..24 | nonce | the sender's random nonce for this attempt, never 0 |
//! | 24..32 | echo | the partner's nonce being answered (0 if none) |
//! | 32..36 | stamp | the sender's clock in microseconds (wraps) |
//! | 36..40 | echo stamp | the stamp being answered, for the round trip |
//!
//! [`Packet`] is the checked view (lengths and constants verified before any
//! field is read); [`Header`] is the parsed form with `parse` and `emit`.
//! `PROTOCOL.md` ("Peer handshake") has the exchange itself. No I/O, no
//! allocation, no panic on untrusted input.

use std::fmt;
use std::ops::Range;

use super::PeerId;

/// Field offsets of the header.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const RESERVED: Range<usize> = 6..8;
    pub const FROM: Range<usize> = 8..12;
    pub const TO: Range<usize> = 12..16;
    pub const NONCE: Range<usize> = 16..24;
    pub const ECHO: Range<usize> = 24..32;
    pub const STAMP: Range<usize> = 32..36;
    pub const ECHO_STAMP: Range<usize> = 36..40;
    pub const PAYLOAD: usize = ECHO_STAMP.end;
}

/// Length of the header every peer-to-peer datagram starts with.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// "psync hole punch".
pub const MAGIC: [u8; 4] = *b"psHP";
/// The only version so far.
pub const VERSION: u8 = 1;

/// What a datagram means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// "Are you there?": answered at once with `Reply`.
    Probe = 1,
    /// Answer to a probe; echoes its nonce and stamp.
    Reply = 2,
    /// The deciding peer picked this path; the other echoes it.
    Done = 3,
    /// Payload follows the header.
    Data = 4,
    /// Keeps NAT mappings open during a quiet session.
    Keepalive = 5,
    /// The sender has no more data.
    Bye = 6,
    /// `Bye` received.
    ByeAck = 7,
}

impl Kind {
    /// The kind with this byte value.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Probe,
            2 => Kind::Reply,
            3 => Kind::Done,
            4 => Kind::Data,
            5 => Kind::Keepalive,
            6 => Kind::Bye,
            7 => Kind::ByeAck,
            _ => return None,
        })
    }
}

/// Why a datagram is not a peer handshake datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerError {
    /// Shorter than the header (the length is given).
    TooShort(usize),
    /// Not `psHP`.
    BadMagic,
    /// A version this client does not speak.
    BadVersion(u8),
    /// An unknown kind byte.
    BadKind(u8),
    /// A payload on a kind that carries none.
    UnexpectedPayload,
    /// A zero sender nonce (nonces are drawn nonzero).
    ZeroNonce,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PeerError::TooShort(n) => {
                write!(f, "{n} bytes is shorter than the {HEADER_LEN}-byte header")
            }
            PeerError::BadMagic => f.write_str("not a psync peer datagram (magic)"),
            PeerError::BadVersion(v) => write!(f, "peer datagram version {v}"),
            PeerError::BadKind(k) => write!(f, "unknown peer datagram kind {k}"),
            PeerError::UnexpectedPayload => f.write_str("payload on a kind that carries none"),
            PeerError::ZeroNonce => f.write_str("zero nonce"),
        }
    }
}

impl std::error::Error for PeerError {}

/// A checked view of a peer datagram: once built, every accessor is in bounds
/// and the magic, version, kind, payload rule and nonce are valid.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> Packet<'a> {
    /// Checks `datagram` and wraps it.
    pub fn new_checked(datagram: &'a [u8]) -> Result<Packet<'a>, PeerError> {
        if datagram.len() < HEADER_LEN {
            return Err(PeerError::TooShort(datagram.len()));
        }
        if datagram[field::MAGIC] != MAGIC {
            return Err(PeerError::BadMagic);
        }
        if datagram[field::VERSION] != VERSION {
            return Err(PeerError::BadVersion(datagram[field::VERSION]));
        }
        let kind = Kind::from_byte(datagram[field::KIND])
            .ok_or(PeerError::BadKind(datagram[field::KIND]))?;
        if kind != Kind::Data && datagram.len() != HEADER_LEN {
            return Err(PeerError::UnexpectedPayload);
        }
        let packet = Packet {
            buf: datagram,
            kind,
        };
        if packet.nonce() == 0 {
            return Err(PeerError::ZeroNonce);
        }
        Ok(packet)
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The sender's ID.
    pub fn from(&self) -> PeerId {
        PeerId(array(self.buf, field::FROM))
    }

    /// The receiver's ID.
    pub fn to(&self) -> PeerId {
        PeerId(array(self.buf, field::TO))
    }

    /// The sender's nonce.
    pub fn nonce(&self) -> u64 {
        u64::from_le_bytes(array(self.buf, field::NONCE))
    }

    /// The nonce being answered.
    pub fn echo(&self) -> u64 {
        u64::from_le_bytes(array(self.buf, field::ECHO))
    }

    /// The sender's stamp.
    pub fn stamp(&self) -> u32 {
        u32::from_le_bytes(array(self.buf, field::STAMP))
    }

    /// The stamp being answered.
    pub fn echo_stamp(&self) -> u32 {
        u32::from_le_bytes(array(self.buf, field::ECHO_STAMP))
    }

    /// What follows the header (empty unless `Data`).
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[field::PAYLOAD..]
    }
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the datagram means.
    pub kind: Kind,
    /// The sender.
    pub from: PeerId,
    /// The receiver.
    pub to: PeerId,
    /// The sender's nonce for this attempt (nonzero).
    pub nonce: u64,
    /// The partner nonce being answered, or 0.
    pub echo: u64,
    /// The sender's microsecond clock.
    pub stamp: u32,
    /// The stamp being answered, or 0.
    pub echo_stamp: u32,
}

impl Header {
    /// Parses a datagram into its header and payload.
    pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), PeerError> {
        let p = Packet::new_checked(datagram)?;
        Ok((
            Header {
                kind: p.kind(),
                from: p.from(),
                to: p.to(),
                nonce: p.nonce(),
                echo: p.echo(),
                stamp: p.stamp(),
                echo_stamp: p.echo_stamp(),
            },
            p.payload(),
        ))
    }

    /// Writes the header into the front of `buf` and returns [`HEADER_LEN`].
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`]; callers own buffers at least
    /// that long.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..HEADER_LEN];
        out[field::MAGIC].copy_from_slice(&MAGIC);
        out[field::VERSION] = VERSION;
        out[field::KIND] = self.kind as u8;
        out[field::RESERVED].fill(0);
        out[field::FROM].copy_from_slice(&self.from.0);
        out[field::TO].copy_from_slice(&self.to.0);
        out[field::NONCE].copy_from_slice(&self.nonce.to_le_bytes());
        out[field::ECHO].copy_from_slice(&self.echo.to_le_bytes());
        out[field::STAMP].copy_from_slice(&self.stamp.to_le_bytes());
        out[field::ECHO_STAMP].copy_from_slice(&self.echo_stamp.to_le_bytes());
        HEADER_LEN
    }

    /// The header as a datagram of its own.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.emit(&mut out);
        out
    }
}

/// Copies a fixed-size field out of a buffer whose length the caller checked.
fn array<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[range]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe from peer 1 to peer 2 (the example in PROTOCOL.md).
    const PROBE_FIXTURE: [u8; HEADER_LEN] = [
        b'p', b's', b'H', b'P', // magic
        1, 1, 0, 0, // version, kind probe, reserved
        1, 0, 0, 0, // from 1
        2, 0, 0, 0, // to 2
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // nonce
        0, 0, 0, 0, 0, 0, 0, 0, // echo
        0xe8, 0x03, 0, 0, // stamp 1000 µs
        0, 0, 0, 0, // echo stamp
    ];

    /// Peer 2's reply to it, 250 µs later on its own clock.
    const REPLY_FIXTURE: [u8; HEADER_LEN] = [
        b'p', b's', b'H', b'P', // magic
        1, 2, 0, 0, // version, kind reply, reserved
        2, 0, 0, 0, // from 2
        1, 0, 0, 0, // to 1
        0x09, 0, 0, 0, 0, 0, 0, 0, // nonce 9
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // echo of 1's nonce
        0xfa, 0, 0, 0, // stamp 250 µs
        0xe8, 0x03, 0, 0, // echo stamp 1000 µs
    ];

    fn probe() -> Header {
        Header {
            kind: Kind::Probe,
            from: PeerId::from_u32(1),
            to: PeerId::from_u32(2),
            nonce: 0x1122_3344_5566_7788,
            echo: 0,
            stamp: 1000,
            echo_stamp: 0,
        }
    }

    #[test]
    fn header_matches_fixtures() {
        assert_eq!(probe().to_bytes(), PROBE_FIXTURE);
        assert_eq!(Header::parse(&PROBE_FIXTURE), Ok((probe(), &[][..])));
        let reply = Header {
            kind: Kind::Reply,
            from: PeerId::from_u32(2),
            to: PeerId::from_u32(1),
            nonce: 9,
            echo: 0x1122_3344_5566_7788,
            stamp: 250,
            echo_stamp: 1000,
        };
        assert_eq!(reply.to_bytes(), REPLY_FIXTURE);
        assert_eq!(Header::parse(&REPLY_FIXTURE), Ok((reply, &[][..])));
    }

    /// The dumps in PROTOCOL.md are these fixtures.
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
        assert_eq!(dump("peer-probe"), PROBE_FIXTURE);
        assert_eq!(dump("peer-reply"), REPLY_FIXTURE);
    }

    #[test]
    fn header_rejects_foreign_datagrams() {
        assert_eq!(
            Header::parse(&PROBE_FIXTURE[..39]),
            Err(PeerError::TooShort(39))
        );
        assert_eq!(Header::parse(&[0u8; 20]), Err(PeerError::TooShort(20)));
        let mut long = [0u8; HEADER_LEN + 1];
        long[..HEADER_LEN].copy_from_slice(&PROBE_FIXTURE);
        assert_eq!(Header::parse(&long), Err(PeerError::UnexpectedPayload));
        long[field::KIND] = Kind::Data as u8;
        assert_eq!(Header::parse(&long).map(|(_, p)| p.len()), Ok(1));
        for (i, v, want) in [
            (0, b'x', PeerError::BadMagic),
            (4, 2, PeerError::BadVersion(2)),
            (5, 0, PeerError::BadKind(0)),
            (5, 8, PeerError::BadKind(8)),
        ] {
            let mut bad = PROBE_FIXTURE;
            bad[i] = v;
            assert_eq!(Header::parse(&bad), Err(want), "byte {i} = {v}");
        }
        let mut zero = PROBE_FIXTURE;
        zero[field::NONCE].fill(0);
        assert_eq!(Header::parse(&zero), Err(PeerError::ZeroNonce));
        // Reserved bytes are ignored on receipt.
        let mut reserved = PROBE_FIXTURE;
        reserved[6] = 0xff;
        assert_eq!(Header::parse(&reserved).map(|(h, _)| h), Ok(probe()));
    }

    #[test]
    fn every_prefix_and_bit_flip_parses_or_errs_without_panic() {
        for n in 0..=HEADER_LEN {
            let _ = Header::parse(&PROBE_FIXTURE[..n]);
        }
        for i in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut b = PROBE_FIXTURE;
                b[i] ^= 1 << bit;
                if let Ok((h, _)) = Header::parse(&b) {
                    assert_eq!(h.to_bytes()[..6], b[..6]);
                }
            }
        }
    }
}
