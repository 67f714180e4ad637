//! STUN Binding (RFC 8489): the one request and the one answer psync needs to
//! tell a peer its public address, and nothing else.
//!
//! The server answers Binding requests on its port (and on `--stun-port`), so
//! that a psync client can classify its NAT and a WebRTC/ICE stack can use
//! psync-server as its STUN server. The client builds requests and reads
//! answers with the same code.
//!
//! | message | bytes | layout |
//! |---|---|---|
//! | header | 20 | type, length of what follows, magic cookie `2112a442`, 12-byte transaction ID |
//! | attribute | 4 + value, padded to 4 | type, value length, value |
//! | Binding request | 20 (28 with FINGERPRINT) | header only, or header + FINGERPRINT |
//! | Binding success | 32 / 44 (IPv4 / IPv6), +8 with FINGERPRINT | header + XOR-MAPPED-ADDRESS [+ FINGERPRINT] |
//!
//! [`answer`] is the server's whole policy: a well-formed Binding request gets
//! the shortest success response (FINGERPRINT only if the request carried
//! one); anything else that looks like STUN is refused with a [`Refusal`] the
//! server counts. It never answers a response, an indication, another method,
//! a request with a bad FINGERPRINT, or one with a comprehension-required
//! attribute it does not know (RFC 8489 asks for a 420 error response there;
//! psync stays silent instead, because an error response would be longer than
//! such a request: see PROTOCOL.md, "STUN").
//!
//! Like the rest of [`crate::wire`]: no I/O, no allocation, no panics on
//! untrusted input; every read is behind a length check.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

/// The fixed header's fields.
mod field {
    use std::ops::Range;
    /// Two zero bits, then the 14-bit message type (class and method).
    pub const TYPE: Range<usize> = 0..2;
    /// Length of the attributes that follow the header, a multiple of 4.
    pub const LENGTH: Range<usize> = 2..4;
    /// [`super::MAGIC_COOKIE`].
    pub const COOKIE: Range<usize> = 4..8;
    /// Chosen by the requester, echoed by the answer.
    pub const TRANSACTION: Range<usize> = 8..20;
    /// An attribute's type, relative to the attribute's start.
    pub const ATTR_TYPE: Range<usize> = 0..2;
    /// An attribute's value length (without padding).
    pub const ATTR_LEN: Range<usize> = 2..4;
    /// XOR-MAPPED-ADDRESS value: a reserved byte, then the family.
    pub const XMA_FAMILY: usize = 1;
    /// XOR-MAPPED-ADDRESS value: the port XOR the cookie's top half.
    pub const XMA_PORT: Range<usize> = 2..4;
    /// XOR-MAPPED-ADDRESS value: the address XOR the cookie (and transaction).
    pub const XMA_ADDR: usize = 4;
}

/// Length of the STUN header.
pub const HEADER_LEN: usize = field::TRANSACTION.end;
/// Length of an attribute's type and length fields.
pub const ATTR_HEADER_LEN: usize = field::ATTR_LEN.end;
/// The fixed value at bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
/// Message type of a Binding request.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding success response.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// MAPPED-ADDRESS (RFC 3489 servers send it instead of the XOR form).
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS: the requester's address as the server saw it.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// FINGERPRINT: CRC-32 of the message before it, XOR [`FINGERPRINT_XOR`].
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// What the CRC-32 is XORed with ("STUN" in ASCII).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// A whole FINGERPRINT attribute: header and 4-byte CRC.
pub const FINGERPRINT_LEN: usize = ATTR_HEADER_LEN + 4;
/// Family byte of an IPv4 address attribute.
const FAMILY_V4: u8 = 0x01;
/// Family byte of an IPv6 address attribute.
const FAMILY_V6: u8 = 0x02;
/// XOR-MAPPED-ADDRESS value length for IPv4: reserved, family, port, address.
const XMA_V4_LEN: usize = field::XMA_ADDR + 4;
/// XOR-MAPPED-ADDRESS value length for IPv6.
const XMA_V6_LEN: usize = field::XMA_ADDR + 16;
/// The longest answer [`answer`] writes: IPv6 XOR-MAPPED-ADDRESS and FINGERPRINT.
pub const MAX_ANSWER_LEN: usize = HEADER_LEN + ATTR_HEADER_LEN + XMA_V6_LEN + FINGERPRINT_LEN;
/// Length of a Binding request from [`binding_request`] with a FINGERPRINT.
pub const REQUEST_LEN: usize = HEADER_LEN + FINGERPRINT_LEN;
/// Attribute types from 0x8000 up may be ignored by a receiver that does not
/// know them; below it, it must understand them or refuse the message.
const COMPREHENSION_OPTIONAL: u16 = 0x8000;

/// A transaction ID: 96 random bits chosen by the requester.
pub type TransactionId = [u8; 12];

/// Why a datagram was not answered or not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not STUN at all: too short, top bits set, or no magic cookie.
    NotStun,
    /// The length field disagrees with the datagram, or an attribute runs
    /// past the end, or a known attribute has the wrong size.
    Malformed,
    /// A FINGERPRINT that does not match, or that is not the last attribute.
    BadFingerprint,
    /// STUN, but not a Binding request (a response, an indication, another method).
    NotBindingRequest,
    /// A comprehension-required attribute psync does not implement (the type is given).
    UnknownAttribute(u16),
    /// An answer with the wrong type or transaction, or without an address.
    NotOurAnswer,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Refusal::NotStun => f.write_str("not a STUN message"),
            Refusal::Malformed => f.write_str("malformed STUN message"),
            Refusal::BadFingerprint => f.write_str("STUN FINGERPRINT does not match"),
            Refusal::NotBindingRequest => f.write_str("not a STUN Binding request"),
            Refusal::UnknownAttribute(t) => {
                write!(f, "unknown comprehension-required STUN attribute {t:#06x}")
            }
            Refusal::NotOurAnswer => f.write_str("not an answer to our Binding request"),
        }
    }
}

impl std::error::Error for Refusal {}

/// True when `datagram` claims to be STUN: at least a header, the two top
/// bits zero and the magic cookie in place. No psync seed request (8 bytes)
/// passes; random bytes pass with odds of 2^-34.
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[0] & 0xc0 == 0
        && u32::from_be_bytes(array(datagram, field::COOKIE)) == MAGIC_COOKIE
}

/// A checked view of one STUN message: the header is present, the length
/// field matches the datagram and is a multiple of 4, and every attribute
/// fits inside it. Values are read only through this view.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    buf: &'a [u8],
}

impl<'a> Message<'a> {
    /// Checks `datagram` and wraps it.
    pub fn new_checked(datagram: &'a [u8]) -> Result<Message<'a>, Refusal> {
        if !is_stun(datagram) {
            return Err(Refusal::NotStun);
        }
        let length = usize::from(u16::from_be_bytes(array(datagram, field::LENGTH)));
        if length % 4 != 0 || HEADER_LEN + length != datagram.len() {
            return Err(Refusal::Malformed);
        }
        let msg = Message { buf: datagram };
        for attr in msg.attributes() {
            attr?;
        }
        Ok(msg)
    }

    /// The message type (class and method), top bits already zero.
    pub fn message_type(&self) -> u16 {
        u16::from_be_bytes(array(self.buf, field::TYPE))
    }

    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        array(self.buf, field::TRANSACTION)
    }

    /// The attributes in order: `(type, value, offset of the attribute)`, or
    /// an error at the first one that runs past the end.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            buf: self.buf,
            at: HEADER_LEN,
        }
    }

    /// Checks the FINGERPRINT if there is one: `Ok(true)` when present and
    /// right, `Ok(false)` when absent. It must be the last attribute.
    pub fn check_fingerprint(&self) -> Result<bool, Refusal> {
        for attr in self.attributes() {
            let (ty, value, at) = attr?;
            if ty != ATTR_FINGERPRINT {
                continue;
            }
            if value.len() != 4 || at + FINGERPRINT_LEN != self.buf.len() {
                return Err(Refusal::BadFingerprint);
            }
            // The CRC covers the message up to the attribute, with the header's
            // length field as it is (it already counts the FINGERPRINT).
            let want = crc32fast::hash(&self.buf[..at]) ^ FINGERPRINT_XOR;
            return if u32::from_be_bytes(array(value, 0..4)) == want {
                Ok(true)
            } else {
                Err(Refusal::BadFingerprint)
            };
        }
        Ok(false)
    }

    /// The address of the first XOR-MAPPED-ADDRESS, or else of the first
    /// MAPPED-ADDRESS; `None` if neither is present and well-formed.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        let tid = self.transaction_id();
        let mut plain = None;
        for (ty, value, _) in self.attributes().flatten() {
            match ty {
                ATTR_XOR_MAPPED_ADDRESS => return decode_address(value, Some(&tid)),
                ATTR_MAPPED_ADDRESS if plain.is_none() => plain = decode_address(value, None),
                _ => {}
            }
        }
        plain
    }
}

/// Iterator over a message's attributes; see [`Message::attributes`].
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8], usize), Refusal>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        let start = self.at;
        let Some(head) = self.buf.get(start..start + ATTR_HEADER_LEN) else {
            self.at = self.buf.len();
            return Some(Err(Refusal::Malformed));
        };
        let ty = u16::from_be_bytes(array(head, field::ATTR_TYPE));
        let len = usize::from(u16::from_be_bytes(array(head, field::ATTR_LEN)));
        let value_start = start + ATTR_HEADER_LEN;
        let padded = (len + 3) & !3;
        let Some(value) = self.buf.get(value_start..value_start + len) else {
            self.at = self.buf.len();
            return Some(Err(Refusal::Malformed));
        };
        if value_start + padded > self.buf.len() {
            self.at = self.buf.len();
            return Some(Err(Refusal::Malformed));
        }
        self.at = value_start + padded;
        Some(Ok((ty, value, start)))
    }
}

/// The server's policy: if `request` is a Binding request psync answers,
/// writes the success response for a requester seen at `from` into the front
/// of `out` and returns its length. The response is as short as RFC 8489
/// allows: XOR-MAPPED-ADDRESS, plus FINGERPRINT only if the request had one.
pub fn answer(
    request: &[u8],
    from: SocketAddr,
    out: &mut [u8; MAX_ANSWER_LEN],
) -> Result<usize, Refusal> {
    let msg = Message::new_checked(request)?;
    if msg.message_type() != BINDING_REQUEST {
        return Err(Refusal::NotBindingRequest);
    }
    for attr in msg.attributes() {
        let (ty, _, _) = attr?;
        if ty < COMPREHENSION_OPTIONAL {
            return Err(Refusal::UnknownAttribute(ty));
        }
    }
    let fingerprint = msg.check_fingerprint()?;
    Ok(write_success(&msg.transaction_id(), from, fingerprint, out))
}

/// Writes a Binding success response carrying `mapped`; returns its length.
pub fn write_success(
    tid: &TransactionId,
    mapped: SocketAddr,
    fingerprint: bool,
    out: &mut [u8; MAX_ANSWER_LEN],
) -> usize {
    let value_len = match mapped {
        SocketAddr::V4(_) => XMA_V4_LEN,
        SocketAddr::V6(_) => XMA_V6_LEN,
    };
    let attr_end = HEADER_LEN + ATTR_HEADER_LEN + value_len;
    let len = attr_end + if fingerprint { FINGERPRINT_LEN } else { 0 };
    write_header(out, BINDING_SUCCESS, len, tid);
    let attr = &mut out[HEADER_LEN..attr_end];
    attr[field::ATTR_TYPE].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    attr[field::ATTR_LEN].copy_from_slice(&(value_len as u16).to_be_bytes());
    let value = &mut attr[ATTR_HEADER_LEN..];
    value[0] = 0;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
    value[field::XMA_PORT].copy_from_slice(&port.to_be_bytes());
    match mapped.ip() {
        IpAddr::V4(ip) => {
            value[field::XMA_FAMILY] = FAMILY_V4;
            for (i, b) in ip.octets().iter().enumerate() {
                value[field::XMA_ADDR + i] = b ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            value[field::XMA_FAMILY] = FAMILY_V6;
            for (i, b) in ip.octets().iter().enumerate() {
                let key = if i < 4 { cookie[i] } else { tid[i - 4] };
                value[field::XMA_ADDR + i] = b ^ key;
            }
        }
    }
    if fingerprint {
        append_fingerprint(&mut out[..len]);
    }
    len
}

/// Writes a Binding request with transaction `tid` (and a FINGERPRINT if
/// asked) into the front of `out`; returns its length (20 or 28).
pub fn binding_request(
    tid: &TransactionId,
    fingerprint: bool,
    out: &mut [u8; REQUEST_LEN],
) -> usize {
    let len = if fingerprint { REQUEST_LEN } else { HEADER_LEN };
    write_header(out, BINDING_REQUEST, len, tid);
    if fingerprint {
        append_fingerprint(&mut out[..len]);
    }
    len
}

/// Reads the answer to our request `tid`: the mapped address it reports.
/// The FINGERPRINT is checked if present; other attributes are ignored
/// (a client that sent no credentials has nothing to check them against).
pub fn parse_success(datagram: &[u8], tid: &TransactionId) -> Result<SocketAddr, Refusal> {
    let msg = Message::new_checked(datagram)?;
    if msg.message_type() != BINDING_SUCCESS || msg.transaction_id() != *tid {
        return Err(Refusal::NotOurAnswer);
    }
    msg.check_fingerprint()?;
    msg.mapped_address().ok_or(Refusal::NotOurAnswer)
}

/// Header with the length field for a message of `total` bytes.
fn write_header(out: &mut [u8], ty: u16, total: usize, tid: &TransactionId) {
    out[field::TYPE].copy_from_slice(&ty.to_be_bytes());
    out[field::LENGTH].copy_from_slice(&((total - HEADER_LEN) as u16).to_be_bytes());
    out[field::COOKIE].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[field::TRANSACTION].copy_from_slice(tid);
}

/// Fills the last [`FINGERPRINT_LEN`] bytes of `msg` (whose header already
/// counts them) with the FINGERPRINT attribute.
fn append_fingerprint(msg: &mut [u8]) {
    let at = msg.len() - FINGERPRINT_LEN;
    let crc = crc32fast::hash(&msg[..at]) ^ FINGERPRINT_XOR;
    let attr = &mut msg[at..];
    attr[field::ATTR_TYPE].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    attr[field::ATTR_LEN].copy_from_slice(&4u16.to_be_bytes());
    attr[ATTR_HEADER_LEN..].copy_from_slice(&crc.to_be_bytes());
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `tid` given means the XOR form.
fn decode_address(value: &[u8], tid: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *value.get(field::XMA_FAMILY)?;
    let mut port = u16::from_be_bytes(value.get(field::XMA_PORT).map(|p| array(p, 0..2))?);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (family, value.len()) {
        (FAMILY_V4, XMA_V4_LEN) => {
            let mut o: [u8; 4] = array(value, field::XMA_ADDR..XMA_V4_LEN);
            if tid.is_some() {
                for (b, k) in o.iter_mut().zip(cookie) {
                    *b ^= k;
                }
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (FAMILY_V6, XMA_V6_LEN) => {
            let mut o: [u8; 16] = array(value, field::XMA_ADDR..XMA_V6_LEN);
            if let Some(tid) = tid {
                for (i, b) in o.iter_mut().enumerate() {
                    *b ^= if i < 4 { cookie[i] } else { tid[i - 4] };
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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

    /// Hex with whitespace to bytes, for the RFC's dumps.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    /// RFC 5769 §2.1: a Binding request with SOFTWARE, PRIORITY,
    /// ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY and FINGERPRINT.
    const RFC5769_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    /// RFC 5769 §2.2: XOR-MAPPED-ADDRESS 192.0.2.1:32853.
    const RFC5769_V4_RESPONSE: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 08 00 01 a1 47 e1 12 a6 43
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
        80 28 00 04 c0 7d 4c 96";

    /// RFC 5769 §2.3: XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    const RFC5769_V6_RESPONSE: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
        80 28 00 04 c8 fb 0b 4c";

    const RFC5769_TID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// What psync's server sends for the RFC's transaction and address, with
    /// and without FINGERPRINT (checked against the RFC's XOR bytes above).
    const V4_ANSWER: [u8; 32] = [
        0x01, 0x01, 0x00, 0x0c, // Binding success, 12 bytes of attributes
        0x21, 0x12, 0xa4, 0x42, // magic cookie
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae, // transaction
        0x00, 0x20, 0x00, 0x08, // XOR-MAPPED-ADDRESS, 8 bytes
        0x00, 0x01, 0xa1, 0x47, // IPv4, port 32853 ^ 0x2112
        0xe1, 0x12, 0xa6, 0x43, // 192.0.2.1 ^ cookie
    ];

    /// The answer shown in PROTOCOL.md is this fixture.
    #[test]
    fn protocol_md_shows_the_answer() {
        let doc = include_str!("../../PROTOCOL.md");
        let marker = "<!-- fixture:stun-answer -->";
        let block = &doc[doc.find(marker).expect("marker in PROTOCOL.md") + marker.len()..];
        let body = &block[block.find("```text\n").unwrap() + 8..];
        let body = &body[..body.find("```").unwrap()];
        let bytes: Vec<u8> = body
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        assert_eq!(bytes, V4_ANSWER);
    }

    #[test]
    fn rfc5769_request_is_parsed_and_its_fingerprint_checks() {
        let req = hex(RFC5769_REQUEST);
        assert_eq!(req.len(), 108);
        let msg = Message::new_checked(&req).unwrap();
        assert_eq!(msg.message_type(), BINDING_REQUEST);
        assert_eq!(msg.transaction_id(), RFC5769_TID);
        assert_eq!(msg.check_fingerprint(), Ok(true));
        let types: Vec<u16> = msg.attributes().map(|a| a.unwrap().0).collect();
        assert_eq!(types, [0x8022, 0x0024, 0x8029, 0x0006, 0x0008, 0x8028]);
        // PRIORITY (0x0024) is comprehension-required and psync does not do
        // ICE checks: no answer, a counted refusal.
        let mut out = [0u8; MAX_ANSWER_LEN];
        let from = "192.0.2.1:32853".parse().unwrap();
        assert_eq!(
            answer(&req, from, &mut out),
            Err(Refusal::UnknownAttribute(0x0024))
        );
        let mut bad = req.clone();
        bad[107] ^= 1;
        assert_eq!(
            Message::new_checked(&bad).unwrap().check_fingerprint(),
            Err(Refusal::BadFingerprint)
        );
    }

    #[test]
    fn rfc5769_responses_give_the_mapped_address() {
        let v4 = hex(RFC5769_V4_RESPONSE);
        assert_eq!(v4.len(), 80);
        assert_eq!(
            parse_success(&v4, &RFC5769_TID),
            Ok("192.0.2.1:32853".parse().unwrap())
        );
        let v6 = hex(RFC5769_V6_RESPONSE);
        assert_eq!(v6.len(), 92);
        assert_eq!(
            parse_success(&v6, &RFC5769_TID),
            Ok("[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap())
        );
        let mut other = RFC5769_TID;
        other[0] ^= 1;
        assert_eq!(parse_success(&v4, &other), Err(Refusal::NotOurAnswer));
    }

    #[test]
    fn answer_matches_the_rfc_xor_bytes() {
        let mut req = [0u8; REQUEST_LEN];
        let n = binding_request(&RFC5769_TID, false, &mut req);
        assert_eq!(n, HEADER_LEN);
        let mut out = [0u8; MAX_ANSWER_LEN];
        let from = "192.0.2.1:32853".parse().unwrap();
        let len = answer(&req[..n], from, &mut out).unwrap();
        assert_eq!(out[..len], V4_ANSWER);
        // The IPv6 XOR bytes are the RFC's too.
        let from6 = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        let len6 = answer(&req[..n], from6, &mut out).unwrap();
        assert_eq!(len6, 44);
        let rfc = hex(RFC5769_V6_RESPONSE);
        assert_eq!(out[20..44], rfc[36..60]);
    }

    #[test]
    fn fingerprint_only_when_the_request_had_one() {
        let mut req = [0u8; REQUEST_LEN];
        let n = binding_request(&RFC5769_TID, true, &mut req);
        assert_eq!(n, 28);
        assert_eq!(
            Message::new_checked(&req).unwrap().check_fingerprint(),
            Ok(true)
        );
        let mut out = [0u8; MAX_ANSWER_LEN];
        let from = "192.0.2.1:32853".parse().unwrap();
        let len = answer(&req, from, &mut out).unwrap();
        assert_eq!(len, 40);
        assert_eq!(out[..32], {
            let mut head = V4_ANSWER;
            head[3] = 0x14; // the length now counts the FINGERPRINT
            head
        });
        assert_eq!(out[32..36], [0x80, 0x28, 0x00, 0x04]);
        assert_eq!(parse_success(&out[..len], &RFC5769_TID), Ok(from));
        let from6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(answer(&req, from6, &mut out), Ok(MAX_ANSWER_LEN));
        assert_eq!(parse_success(&out, &RFC5769_TID), Ok(from6));
    }

    #[test]
    fn non_requests_and_malformed_messages_are_refused() {
        let mut out = [0u8; MAX_ANSWER_LEN];
        let from = "192.0.2.1:1".parse().unwrap();
        let mut req = [0u8; REQUEST_LEN];
        let n = binding_request(&RFC5769_TID, false, &mut req);
        // A seed request, garbage, a truncated header.
        assert_eq!(answer(&[1; 8], from, &mut out), Err(Refusal::NotStun));
        assert_eq!(answer(&[0; 20], from, &mut out), Err(Refusal::NotStun));
        assert_eq!(answer(&req[..19], from, &mut out), Err(Refusal::NotStun));
        // Responses and indications are never answered.
        let v4 = hex(RFC5769_V4_RESPONSE);
        assert_eq!(answer(&v4, from, &mut out), Err(Refusal::NotBindingRequest));
        let mut ind = req;
        ind[1] = 0x11;
        assert_eq!(
            answer(&ind[..n], from, &mut out),
            Err(Refusal::NotBindingRequest)
        );
        // Top bits set: not STUN (psync v2 and other protocols live there).
        let mut top = req;
        top[0] = 0x40;
        assert_eq!(answer(&top[..n], from, &mut out), Err(Refusal::NotStun));
        // Length field off by 4, or not a multiple of 4.
        let mut long = [0u8; 24];
        long[..20].copy_from_slice(&req[..20]);
        assert_eq!(answer(&long, from, &mut out), Err(Refusal::Malformed));
        long[3] = 4;
        // 4 bytes of attribute space holding a header that claims 8 bytes.
        long[20..24].copy_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        assert_eq!(answer(&long, from, &mut out), Err(Refusal::Malformed));
        long[3] = 2;
        assert_eq!(answer(&long, from, &mut out), Err(Refusal::Malformed));
        // A comprehension-optional attribute is ignored.
        long[3] = 4;
        long[20..24].copy_from_slice(&[0x80, 0x22, 0x00, 0x00]);
        assert_eq!(answer(&long, from, &mut out), Ok(32));
        // FINGERPRINT not last.
        let mut fp_first = [0u8; 32];
        let m = binding_request(&RFC5769_TID, true, &mut req);
        fp_first[..m].copy_from_slice(&req[..m]);
        fp_first[3] = 12;
        fp_first[28..32].copy_from_slice(&[0x80, 0x22, 0x00, 0x00]);
        assert_eq!(
            answer(&fp_first, from, &mut out),
            Err(Refusal::BadFingerprint)
        );
    }

    #[test]
    fn parse_never_panics_on_prefixes_and_bit_flips() {
        let v6 = hex(RFC5769_V6_RESPONSE);
        for n in 0..v6.len() {
            let _ = parse_success(&v6[..n], &RFC5769_TID);
            let _ = Message::new_checked(&v6[..n]);
        }
        for i in 0..v6.len() {
            for bit in 0..8 {
                let mut m = v6.clone();
                m[i] ^= 1 << bit;
                let _ = parse_success(&m, &RFC5769_TID);
                let mut out = [0u8; MAX_ANSWER_LEN];
                let _ = answer(&m, "192.0.2.1:1".parse().unwrap(), &mut out);
            }
        }
    }
}
