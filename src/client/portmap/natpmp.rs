//! NAT-PMP (RFC 6886) messages: the external-address request, which tells
//! whether the router speaks NAT-PMP at all, and UDP mapping requests.
//! Pure codec; [`super`] does the I/O.

use std::net::Ipv4Addr;
use std::ops::Range;

/// The router's NAT-PMP (and PCP) port.
pub const PORT: u16 = 5351;
/// Protocol version 0.
const VERSION: u8 = 0;
/// Opcode: what is your external address?
const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode: map a UDP port.
const OP_MAP_UDP: u8 = 1;
/// Responses set the top bit of the opcode.
const RESPONSE: u8 = 128;

mod field {
    use std::ops::Range;
    pub const VERSION: usize = 0;
    pub const OPCODE: usize = 1;
    /// Requests: reserved; responses: result code.
    pub const RESULT: Range<usize> = 2..4;
    // 4..8: seconds since the router's epoch (unused: psync never renews).
    /// External-address response.
    pub const EXTERNAL_IP: Range<usize> = 8..12;
    /// Mapping request: after the reserved bytes.
    pub const REQ_INTERNAL_PORT: Range<usize> = 4..6;
    pub const REQ_EXTERNAL_PORT: Range<usize> = 6..8;
    pub const REQ_LIFETIME: Range<usize> = 8..12;
    /// Mapping response.
    pub const INTERNAL_PORT: Range<usize> = 8..10;
    pub const EXTERNAL_PORT: Range<usize> = 10..12;
    pub const LIFETIME: Range<usize> = 12..16;
}

/// Length of the external-address request.
pub const ADDRESS_REQUEST_LEN: usize = field::OPCODE + 1;
/// Length of the external-address response.
pub const ADDRESS_RESPONSE_LEN: usize = field::EXTERNAL_IP.end;
/// Length of a mapping request.
pub const MAP_REQUEST_LEN: usize = field::REQ_LIFETIME.end;
/// Length of a mapping response.
pub const MAP_RESPONSE_LEN: usize = field::LIFETIME.end;

/// The external-address request.
pub fn address_request() -> [u8; ADDRESS_REQUEST_LEN] {
    [VERSION, OP_EXTERNAL_ADDRESS]
}

/// A UDP mapping request; lifetime 0 (with external port 0) deletes.
pub fn map_request(
    internal_port: u16,
    external_port: u16,
    lifetime_secs: u32,
) -> [u8; MAP_REQUEST_LEN] {
    let mut b = [0u8; MAP_REQUEST_LEN];
    b[field::VERSION] = VERSION;
    b[field::OPCODE] = OP_MAP_UDP;
    b[field::REQ_INTERNAL_PORT].copy_from_slice(&internal_port.to_be_bytes());
    b[field::REQ_EXTERNAL_PORT].copy_from_slice(&external_port.to_be_bytes());
    b[field::REQ_LIFETIME].copy_from_slice(&lifetime_secs.to_be_bytes());
    b
}

/// Why a response is not a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not a NAT-PMP response to our request (size, version, opcode, port).
    NotOurs,
    /// The router refused, with this result code (1 unsupported version,
    /// 2 not authorized, 3 network failure, 4 out of resources, 5 unsupported opcode).
    Refused(u16),
}

fn check(b: &[u8], len: usize, opcode: u8) -> Result<(), Error> {
    if b.len() < len || b[field::VERSION] != VERSION || b[field::OPCODE] != RESPONSE | opcode {
        return Err(Error::NotOurs);
    }
    match u16::from_be_bytes(array(b, field::RESULT)) {
        0 => Ok(()),
        code => Err(Error::Refused(code)),
    }
}

/// Reads an external-address response.
pub fn parse_address_response(b: &[u8]) -> Result<Ipv4Addr, Error> {
    check(b, ADDRESS_RESPONSE_LEN, OP_EXTERNAL_ADDRESS)?;
    Ok(Ipv4Addr::from(array::<4>(b, field::EXTERNAL_IP)))
}

/// A granted mapping: the external port and the lifetime in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The router's external port.
    pub external_port: u16,
    /// Seconds the mapping lasts.
    pub lifetime: u32,
}

/// Reads a mapping response for `internal_port`.
pub fn parse_map_response(b: &[u8], internal_port: u16) -> Result<Granted, Error> {
    check(b, MAP_RESPONSE_LEN, OP_MAP_UDP)?;
    if u16::from_be_bytes(array(b, field::INTERNAL_PORT)) != internal_port {
        return Err(Error::NotOurs);
    }
    Ok(Granted {
        external_port: u16::from_be_bytes(array(b, field::EXTERNAL_PORT)),
        lifetime: u32::from_be_bytes(array(b, field::LIFETIME)),
    })
}

/// True for a NAT-PMP response with result 1, "unsupported version": what a
/// NAT-PMP-only router answers to PCP.
pub fn is_unsupported_version(b: &[u8]) -> bool {
    b.len() >= 4 && b[field::VERSION] == VERSION && u16::from_be_bytes(array(b, field::RESULT)) == 1
}

fn array<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[range]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_match_rfc_6886_layout() {
        assert_eq!(address_request(), [0, 0]);
        assert_eq!(
            map_request(40001, 51234, 120),
            [0, 1, 0, 0, 0x9c, 0x41, 0xc8, 0x22, 0, 0, 0, 120]
        );
    }

    #[test]
    fn responses_parse_and_refusals_carry_the_code() {
        let addr = [0, 128, 0, 0, 0, 0, 0, 9, 11, 0, 10, 2];
        assert_eq!(
            parse_address_response(&addr),
            Ok(Ipv4Addr::new(11, 0, 10, 2))
        );
        let map = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x9c, 0x41, 0xc8, 0x22, 0, 0, 0, 120,
        ];
        assert_eq!(
            parse_map_response(&map, 40001),
            Ok(Granted {
                external_port: 51234,
                lifetime: 120
            })
        );
        assert_eq!(parse_map_response(&map, 40002), Err(Error::NotOurs));
        let mut refused = map;
        refused[3] = 2;
        assert_eq!(parse_map_response(&refused, 40001), Err(Error::Refused(2)));
        assert_eq!(parse_map_response(&map[..15], 40001), Err(Error::NotOurs));
        assert_eq!(parse_address_response(&map), Err(Error::NotOurs));
        assert!(is_unsupported_version(&[0, 130, 0, 1]));
        assert!(!is_unsupported_version(&[2, 129, 0, 1]));
    }
}
