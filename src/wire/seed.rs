//! The seed format: the original C psync's 8-byte request and its 20/32-byte
//! replies, byte for byte.
//!
//! | message | bytes | layout |
//! |---|---|---|
//! | request | 8 | `self_id[4]`, `peer_id[4]` (opaque; numeric IDs are little-endian) |
//! | IPv4 reply | 20 | `src_port` LE, `dst_port` LE, Linux `sockaddr_in` of the partner |
//! | IPv6 reply | 32 | `src_port` LE, `dst_port` LE, Linux `sockaddr_in6` of the partner |
//!
//! `PROTOCOL.md` at the repository root has the full byte tables.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;

/// Length of a request datagram.
pub const REQUEST_LEN: usize = 8;
/// Length of a reply to a peer that registered over IPv4.
pub const REPLY_V4_LEN: usize = 20;
/// Length of a reply to a peer that registered over IPv6.
pub const REPLY_V6_LEN: usize = 32;
/// The longest message psync sends; a buffer this long fits any reply.
pub const MAX_REPLY_LEN: usize = REPLY_V6_LEN;

/// `AF_INET` as Linux numbers it; the C client reads the reply as a Linux struct.
pub const AF_INET_LINUX: u16 = 2;
/// `AF_INET6` as Linux numbers it.
pub const AF_INET6_LINUX: u16 = 10;

const SELF_ID: Range<usize> = 0..4;
const PEER_ID: Range<usize> = 4..8;

const SRC_PORT: Range<usize> = 0..2;
const DST_PORT: Range<usize> = 2..4;
const FAMILY: Range<usize> = 4..6;
const SIN_PORT: Range<usize> = 6..8;
// sockaddr_in: 4 address bytes, then 8 bytes of sin_zero.
const SIN_ADDR: Range<usize> = 8..12;
const SIN_ZERO: Range<usize> = 12..20;
// sockaddr_in6: flowinfo, 16 address bytes, scope_id.
const SIN6_FLOWINFO: Range<usize> = 8..12;
const SIN6_ADDR: Range<usize> = 12..28;
const SIN6_SCOPE_ID: Range<usize> = 28..32;

/// A peer identifier: four opaque bytes, compared bytewise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PeerId(pub [u8; 4]);

impl PeerId {
    /// The ID a Rust or C client on a little-endian host sends for the number `n`.
    pub const fn from_u32(n: u32) -> PeerId {
        PeerId(n.to_le_bytes())
    }

    /// The number a little-endian client meant by these bytes.
    pub const fn to_u32(self) -> u32 {
        u32::from_le_bytes(self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_u32())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_u32())
    }
}

/// Why a datagram was not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The datagram has the wrong length (the length is given).
    BadSize(usize),
    /// A request whose `self_id` equals its `peer_id`: it could never match.
    SelfPair,
    /// A reply whose address family field is not the one its length implies.
    BadFamily(u16),
    /// A reply with a port of zero, or two equal ports.
    BadPorts,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::BadSize(n) => write!(f, "datagram of {n} bytes has the wrong size"),
            WireError::SelfPair => f.write_str("self_id equals peer_id"),
            WireError::BadFamily(fam) => write!(f, "reply has unexpected address family {fam}"),
            WireError::BadPorts => f.write_str("reply ports are zero or equal"),
        }
    }
}

impl std::error::Error for WireError {}

/// A rendezvous request: "I am `self_id` and I want to meet `peer_id`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// The sender's own ID.
    pub self_id: PeerId,
    /// The ID of the peer the sender wants to meet.
    pub peer_id: PeerId,
}

impl Request {
    /// Parses a request; anything but exactly 8 bytes, or a self-pair, is an error.
    pub fn parse(datagram: &[u8]) -> Result<Request, WireError> {
        let bytes: &[u8; REQUEST_LEN] = datagram
            .try_into()
            .map_err(|_| WireError::BadSize(datagram.len()))?;
        let req = Request {
            self_id: PeerId([bytes[0], bytes[1], bytes[2], bytes[3]]),
            peer_id: PeerId([bytes[4], bytes[5], bytes[6], bytes[7]]),
        };
        if req.self_id == req.peer_id {
            return Err(WireError::SelfPair);
        }
        Ok(req)
    }

    /// Writes the request's 8 bytes.
    pub fn emit(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[SELF_ID].copy_from_slice(&self.self_id.0);
        out[PEER_ID].copy_from_slice(&self.peer_id.0);
        out
    }

    /// The request the partner sends: the two IDs swapped.
    pub fn counterpart(&self) -> Request {
        Request {
            self_id: self.peer_id,
            peer_id: self.self_id,
        }
    }

    /// Both IDs as one integer, the key of the pending table.
    pub fn key(&self) -> u64 {
        u64::from_le_bytes(self.emit())
    }
}

/// What the server tells a peer once its partner has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The local port this peer should send from (for the seed's strategy).
    pub src_port: u16,
    /// The port on the partner this peer should send to.
    pub dst_port: u16,
    /// The partner's public address and port, as the server saw it.
    pub peer: SocketAddr,
}

impl Reply {
    /// The length of this reply on the wire: 20 for IPv4, 32 for IPv6.
    pub fn len(&self) -> usize {
        match self.peer {
            SocketAddr::V4(_) => REPLY_V4_LEN,
            SocketAddr::V6(_) => REPLY_V6_LEN,
        }
    }

    /// Always false: a reply is never empty. Present because `len` is.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the reply into the front of `buf` and returns the bytes written.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Reply::len`]; callers own buffers of
    /// [`MAX_REPLY_LEN`] bytes.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        // Built in a local array of the whole reply's fixed size and copied
        // once: clearing a slice of either length was a `memset` call.
        let mut out = [0u8; MAX_REPLY_LEN];
        out[SRC_PORT].copy_from_slice(&self.src_port.to_le_bytes());
        out[DST_PORT].copy_from_slice(&self.dst_port.to_le_bytes());
        match self.peer {
            SocketAddr::V4(a) => {
                out[FAMILY].copy_from_slice(&AF_INET_LINUX.to_le_bytes());
                out[SIN_PORT].copy_from_slice(&a.port().to_be_bytes());
                out[SIN_ADDR].copy_from_slice(&a.ip().octets());
                buf[..REPLY_V4_LEN].copy_from_slice(&out[..REPLY_V4_LEN]);
                REPLY_V4_LEN
            }
            SocketAddr::V6(a) => {
                // flowinfo and scope_id stay zero: they mean nothing to the partner.
                out[FAMILY].copy_from_slice(&AF_INET6_LINUX.to_le_bytes());
                out[SIN_PORT].copy_from_slice(&a.port().to_be_bytes());
                out[SIN6_ADDR].copy_from_slice(&a.ip().octets());
                buf[..REPLY_V6_LEN].copy_from_slice(&out);
                REPLY_V6_LEN
            }
        }
    }

    /// Parses a reply, as a client does. The length picks the family; the
    /// family field, ports and padding are checked.
    pub fn parse(datagram: &[u8]) -> Result<Reply, WireError> {
        let (expect_family, peer) = match datagram.len() {
            REPLY_V4_LEN => {
                let port = u16::from_be_bytes(field(datagram, SIN_PORT));
                let ip = Ipv4Addr::from(field::<4>(datagram, SIN_ADDR));
                if datagram[SIN_ZERO].iter().any(|&b| b != 0) {
                    return Err(WireError::BadSize(datagram.len()));
                }
                (AF_INET_LINUX, SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            REPLY_V6_LEN => {
                let port = u16::from_be_bytes(field(datagram, SIN_PORT));
                let ip = Ipv6Addr::from(field::<16>(datagram, SIN6_ADDR));
                let flowinfo = u32::from_be_bytes(field(datagram, SIN6_FLOWINFO));
                let scope_id = u32::from_le_bytes(field(datagram, SIN6_SCOPE_ID));
                let addr = SocketAddrV6::new(ip, port, flowinfo, scope_id);
                (AF_INET6_LINUX, SocketAddr::V6(addr))
            }
            n => return Err(WireError::BadSize(n)),
        };
        let family = u16::from_le_bytes(field(datagram, FAMILY));
        if family != expect_family {
            return Err(WireError::BadFamily(family));
        }
        let src_port = u16::from_le_bytes(field(datagram, SRC_PORT));
        let dst_port = u16::from_le_bytes(field(datagram, DST_PORT));
        if src_port == 0 || dst_port == 0 || src_port == dst_port {
            return Err(WireError::BadPorts);
        }
        Ok(Reply {
            src_port,
            dst_port,
            peer,
        })
    }
}

/// Copies a fixed-size field out of a buffer whose length the caller checked.
fn field<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[range]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4_FIXTURE: [u8; 20] = [
        0x39, 0x30, // src_port 12345 LE
        0x31, 0xd4, // dst_port 54321 LE
        0x02, 0x00, // AF_INET LE
        0x13, 0x55, // sin_port 4949 BE
        198, 51, 100, 7, // sin_addr
        0, 0, 0, 0, 0, 0, 0, 0, // sin_zero
    ];

    const V6_FIXTURE: [u8; 32] = [
        0x00, 0x04, // src_port 1024 LE
        0xff, 0xff, // dst_port 65535 LE
        0x0a, 0x00, // AF_INET6 LE
        0x13, 0x54, // sin6_port 4948 BE
        0, 0, 0, 0, // flowinfo
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, // 2001:db8::1
        0, 0, 0, 0, // scope_id
    ];

    #[test]
    fn request_bytes_are_the_c_struct() {
        let req = Request::parse(&[0xef, 0xbe, 0xad, 0xde, 1, 0, 0, 0]).unwrap();
        assert_eq!(req.self_id.to_u32(), 0xdead_beef);
        assert_eq!(req.peer_id, PeerId::from_u32(1));
        assert_eq!(req.emit(), [0xef, 0xbe, 0xad, 0xde, 1, 0, 0, 0]);
        assert_eq!(req.counterpart().counterpart(), req);
        assert_ne!(req.key(), req.counterpart().key());
    }

    #[test]
    fn request_rejects_wrong_sizes_and_self_pairs() {
        for n in [0, 1, 7, 9, 20, 1500] {
            assert_eq!(Request::parse(&vec![1u8; n]), Err(WireError::BadSize(n)));
        }
        assert_eq!(
            Request::parse(&[1, 2, 3, 4, 1, 2, 3, 4]),
            Err(WireError::SelfPair)
        );
    }

    #[test]
    fn v4_reply_matches_fixture() {
        let reply = Reply {
            src_port: 12345,
            dst_port: 54321,
            peer: "198.51.100.7:4949".parse().unwrap(),
        };
        let mut buf = [0xaa; MAX_REPLY_LEN];
        assert_eq!(reply.emit(&mut buf), 20);
        assert_eq!(buf[..20], V4_FIXTURE);
        assert_eq!(Reply::parse(&V4_FIXTURE), Ok(reply));
    }

    #[test]
    fn v6_reply_matches_fixture() {
        let reply = Reply {
            src_port: 1024,
            dst_port: 65535,
            peer: "[2001:db8::1]:4948".parse().unwrap(),
        };
        let mut buf = [0xaa; MAX_REPLY_LEN];
        assert_eq!(reply.emit(&mut buf), 32);
        assert_eq!(buf, V6_FIXTURE);
        assert_eq!(Reply::parse(&V6_FIXTURE), Ok(reply));
    }

    #[test]
    fn reply_parse_rejects_bad_replies() {
        assert_eq!(Reply::parse(&V4_FIXTURE[..19]), Err(WireError::BadSize(19)));
        let mut bad = V4_FIXTURE;
        bad[4] = 10;
        assert_eq!(Reply::parse(&bad), Err(WireError::BadFamily(10)));
        let mut bad = V6_FIXTURE;
        bad[4] = 2;
        assert_eq!(Reply::parse(&bad), Err(WireError::BadFamily(2)));
        let mut bad = V4_FIXTURE;
        bad.copy_within(0..2, 2);
        assert_eq!(Reply::parse(&bad), Err(WireError::BadPorts));
        let mut bad = V4_FIXTURE;
        bad[19] = 1;
        assert_eq!(Reply::parse(&bad), Err(WireError::BadSize(20)));
    }
}
