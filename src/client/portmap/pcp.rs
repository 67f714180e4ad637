//! PCP (RFC 6887) messages: ANNOUNCE, which tells whether the router speaks
//! PCP, and MAP for UDP. Pure codec; [`super`] does the I/O. Addresses are
//! 16 bytes, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

/// PCP version 2 (NAT-PMP is 0, and shares the port).
const VERSION: u8 = 2;
/// ANNOUNCE opcode.
const OP_ANNOUNCE: u8 = 0;
/// MAP opcode.
const OP_MAP: u8 = 1;
/// The R bit: set in responses.
const RESPONSE: u8 = 0x80;
/// IANA protocol number of UDP.
const PROTO_UDP: u8 = 17;

mod field {
    use std::ops::Range;
    pub const VERSION: usize = 0;
    pub const OPCODE: usize = 1;
    /// Response: result code.
    pub const RESULT: usize = 3;
    pub const LIFETIME: Range<usize> = 4..8;
    /// Request: the client's address.
    pub const CLIENT_IP: Range<usize> = 8..24;
    /// End of the common header.
    pub const HEADER_END: usize = CLIENT_IP.end;
    /// MAP, relative to the opcode data.
    pub const NONCE: Range<usize> = 0..12;
    pub const PROTOCOL: usize = 12;
    pub const INTERNAL_PORT: Range<usize> = 16..18;
    pub const EXTERNAL_PORT: Range<usize> = 18..20;
    pub const EXTERNAL_IP: Range<usize> = 20..36;
    pub const MAP_END: usize = EXTERNAL_IP.end;
}

/// Length of an ANNOUNCE request (the common header alone).
pub const ANNOUNCE_LEN: usize = field::HEADER_END;
/// Length of a MAP request or response.
pub const MAP_LEN: usize = field::HEADER_END + field::MAP_END;

/// Why a response is not a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not a PCP response to our request.
    NotOurs,
    /// The router refused, with this result code (2 not authorized,
    /// 8 no resources, 11 cannot provide external, 12 address mismatch ...).
    Refused(u8),
}

fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

fn header(b: &mut [u8], opcode: u8, lifetime: u32, client: Ipv4Addr) {
    b[field::VERSION] = VERSION;
    b[field::OPCODE] = opcode;
    b[field::LIFETIME].copy_from_slice(&lifetime.to_be_bytes());
    b[field::CLIENT_IP].copy_from_slice(&mapped(client));
}

/// An ANNOUNCE request from `client`.
pub fn announce(client: Ipv4Addr) -> [u8; ANNOUNCE_LEN] {
    let mut b = [0u8; ANNOUNCE_LEN];
    header(&mut b, OP_ANNOUNCE, 0, client);
    b
}

/// A MAP request for UDP `internal_port` on `client`, suggesting
/// `external_port`; lifetime 0 deletes the mapping with this `nonce`.
pub fn map_request(
    client: Ipv4Addr,
    nonce: [u8; 12],
    internal_port: u16,
    external_port: u16,
    lifetime: u32,
) -> [u8; MAP_LEN] {
    let mut b = [0u8; MAP_LEN];
    header(&mut b, OP_MAP, lifetime, client);
    let m = &mut b[field::HEADER_END..];
    m[field::NONCE].copy_from_slice(&nonce);
    m[field::PROTOCOL] = PROTO_UDP;
    m[field::INTERNAL_PORT].copy_from_slice(&internal_port.to_be_bytes());
    m[field::EXTERNAL_PORT].copy_from_slice(&external_port.to_be_bytes());
    // No preference for the external address: the IPv4 "any" address.
    m[field::EXTERNAL_IP].copy_from_slice(&mapped(Ipv4Addr::UNSPECIFIED));
    b
}

fn check(b: &[u8], len: usize, opcode: u8) -> Result<(), Error> {
    if b.len() < len || b[field::VERSION] != VERSION || b[field::OPCODE] != RESPONSE | opcode {
        return Err(Error::NotOurs);
    }
    match b[field::RESULT] {
        0 => Ok(()),
        code => Err(Error::Refused(code)),
    }
}

/// Reads an ANNOUNCE response: `Ok` when the router speaks PCP.
pub fn parse_announce(b: &[u8]) -> Result<(), Error> {
    check(b, ANNOUNCE_LEN, OP_ANNOUNCE)
}

/// A granted mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The external address the router assigned.
    pub external_ip: IpAddr,
    /// The external port.
    pub external_port: u16,
    /// Seconds it lasts.
    pub lifetime: u32,
}

/// Reads a MAP response to our request with `nonce`.
pub fn parse_map(b: &[u8], nonce: &[u8; 12]) -> Result<Granted, Error> {
    check(b, MAP_LEN, OP_MAP)?;
    let m = &b[field::HEADER_END..];
    if m[field::NONCE] != nonce[..] || m[field::PROTOCOL] != PROTO_UDP {
        return Err(Error::NotOurs);
    }
    let ip = Ipv6Addr::from(array::<16>(m, field::EXTERNAL_IP));
    Ok(Granted {
        external_ip: match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        },
        external_port: u16::from_be_bytes(array(m, field::EXTERNAL_PORT)),
        lifetime: u32::from_be_bytes(array(b, field::LIFETIME)),
    })
}

fn array<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[range]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

    #[test]
    fn map_request_matches_rfc_6887_layout() {
        let b = map_request(CLIENT, [7; 12], 40001, 51234, 120);
        assert_eq!(b.len(), 60);
        assert_eq!(b[..8], [2, 1, 0, 0, 0, 0, 0, 120]);
        assert_eq!(
            b[8..24],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 0, 2]
        );
        assert_eq!(b[24..36], [7; 12]);
        assert_eq!(b[36..40], [17, 0, 0, 0]);
        assert_eq!(b[40..44], [0x9c, 0x41, 0xc8, 0x22]);
        assert_eq!(
            b[44..60],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(announce(CLIENT)[..4], [2, 0, 0, 0]);
    }

    #[test]
    fn responses_parse_and_refusals_carry_the_code() {
        let mut r = map_request(CLIENT, [7; 12], 40001, 51234, 120);
        r[1] = 0x81;
        r[3] = 0;
        r[44..60].copy_from_slice(&mapped(Ipv4Addr::new(11, 0, 10, 2)));
        assert_eq!(
            parse_map(&r, &[7; 12]),
            Ok(Granted {
                external_ip: IpAddr::V4(Ipv4Addr::new(11, 0, 10, 2)),
                external_port: 51234,
                lifetime: 120
            })
        );
        assert_eq!(parse_map(&r, &[8; 12]), Err(Error::NotOurs));
        assert_eq!(parse_map(&r[..59], &[7; 12]), Err(Error::NotOurs));
        r[3] = 11;
        assert_eq!(parse_map(&r, &[7; 12]), Err(Error::Refused(11)));
        let mut a = announce(CLIENT);
        a[1] = 0x80;
        assert_eq!(parse_announce(&a), Ok(()));
        a[0] = 0;
        assert_eq!(parse_announce(&a), Err(Error::NotOurs));
    }
}
