//! Protocol v2: the authenticated request, the match reply and the cookie
//! reply, byte for byte.
//!
//! v2 lives beside the seed format on the same port. A server tells the two
//! apart by length first (a seed request is exactly 8 bytes, a v2 request
//! exactly [`REQUEST_LEN`]) and then by the header every v2 message starts
//! with: the magic `PSYN`, the version 2 and a message type.
//!
//! | message | type | bytes | sent by |
//! |---|---|---|---|
//! | [`Request`] | 1 | [`REQUEST_LEN`] = 152 | peer → server |
//! | [`Reply`] | 2 | [`REPLY_LEN`] = 152 | server → peer, once the partner is there |
//! | [`CookieReply`] | 3 | [`COOKIE_REPLY_LEN`] = 40 | server → peer, to validate its address |
//!
//! No amplification: every reply is at most as long as the request that
//! causes it, for IPv4 and IPv6 alike (all addresses use one 20-byte slot),
//! which a `const` assertion below keeps true.
//!
//! Each message has a checked view ([`RequestView`], [`ReplyView`],
//! [`CookieReplyView`]) whose constructor checks the length, magic, version
//! and type, after which its accessors cannot fail, and a representation
//! ([`Request`], [`Reply`], [`CookieReply`]) with `parse` (which also checks
//! every reserved byte, count and address) and `emit` (into a caller's
//! buffer, never allocating). Parsers never panic on any input; an accepted
//! datagram always emits back to the very same bytes. Multi-byte integers are
//! big-endian (network order), unlike the seed format's little-endian ports.
//!
//! The MAC and cookie inside are computed and checked by [`crate::auth`];
//! this module only carries their bytes. `PROTOCOL.md` has the byte tables.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

/// The first four bytes of every v2 message: ASCII `PSYN`. Its first byte
/// (0x50) also keeps v2 apart from STUN, whose messages start with 0x00-0x03.
pub const MAGIC: [u8; 4] = *b"PSYN";
/// The protocol version byte this module speaks.
pub const VERSION: u8 = 2;

/// Bytes of the message authentication code in a token (HMAC-SHA256 truncated).
pub const MAC_LEN: usize = 16;
/// Bytes of an address-validation cookie.
pub const COOKIE_LEN: usize = 16;
/// Bytes of one address slot (family, kind, port, IP).
pub const ADDR_LEN: usize = 20;
/// Candidate address slots in a request (the sender's) and in a reply (the partner's).
pub const MAX_CANDIDATES: usize = 4;

/// Byte offsets of every field, as ranges; the lengths below derive from them.
pub mod field {
    use std::ops::Range;

    /// A run of bytes inside a message.
    pub type Field = Range<usize>;

    /// Header of every message: [`super::MAGIC`].
    pub const MAGIC: Field = 0..4;
    /// Header: the version byte, [`super::VERSION`].
    pub const VERSION: usize = 4;
    /// Header: the message type, a [`super::MessageType`].
    pub const TYPE: usize = 5;
    /// Header: reserved for flags, zero.
    pub const FLAGS: Field = 6..8;
    /// Every message: the sender's ID (in replies: the asker's own ID), u64.
    pub const SELF_ID: Field = FLAGS.end..FLAGS.end + 8;
    /// Every message: the partner's ID, u64.
    pub const PEER_ID: Field = SELF_ID.end..SELF_ID.end + 8;

    /// Request: the ID of the key that made the token's MAC, u32.
    pub const KEY_ID: Field = PEER_ID.end..PEER_ID.end + 4;
    /// Request: the token's expiry in Unix seconds, u64.
    pub const EXPIRY: Field = KEY_ID.end..KEY_ID.end + 8;
    /// Request: the token's MAC.
    pub const MAC: Field = EXPIRY.end..EXPIRY.end + super::MAC_LEN;
    /// Request: the whole token (`self_id` to `mac`), which is also what the
    /// token's text form encodes, so a client copies it verbatim.
    pub const TOKEN: Field = SELF_ID.start..MAC.end;
    /// Request: the address-validation cookie, all zero when the sender has none.
    pub const COOKIE: Field = MAC.end..MAC.end + super::COOKIE_LEN;
    /// Request: the sender's [`super::ClientInfo`] byte.
    pub const CLIENT_INFO: usize = COOKIE.end;
    /// Request: how many candidate slots are used (0 to 4).
    pub const CANDIDATE_COUNT: usize = CLIENT_INFO + 1;
    /// Request: reserved, zero.
    pub const REQUEST_RESERVED: Field = CANDIDATE_COUNT + 1..CANDIDATE_COUNT + 3;
    /// Request: the sender's candidate address slots; unused ones are zero.
    pub const CANDIDATES: Field =
        REQUEST_RESERVED.end..REQUEST_RESERVED.end + super::MAX_CANDIDATES * super::ADDR_LEN;

    /// Reply: the port the asker should send from, u16, nonzero.
    pub const SRC_PORT: Field = PEER_ID.end..PEER_ID.end + 2;
    /// Reply: the port to send to on the partner, u16, nonzero, not `src_port`.
    pub const DST_PORT: Field = SRC_PORT.end..SRC_PORT.end + 2;
    /// Reply: the partner's public address as the server saw it (slot, kind 0).
    pub const PEER_ADDR: Field = DST_PORT.end..DST_PORT.end + super::ADDR_LEN;
    /// Reply: the asker's own public address as the server saw it (slot, kind 0).
    pub const YOUR_ADDR: Field = PEER_ADDR.end..PEER_ADDR.end + super::ADDR_LEN;
    /// Reply: bits 0-3 of the partner's [`super::ClientInfo`] byte (4-7 zero).
    pub const PEER_INFO: usize = YOUR_ADDR.end;
    /// Reply: how many partner candidate slots are used (0 to 4).
    pub const PEER_CANDIDATE_COUNT: usize = PEER_INFO + 1;
    /// Reply: reserved, zero.
    pub const REPLY_RESERVED: Field = PEER_CANDIDATE_COUNT + 1..PEER_CANDIDATE_COUNT + 3;
    /// Reply: the partner's candidate slots; unused ones are zero.
    pub const PEER_CANDIDATES: Field =
        REPLY_RESERVED.end..REPLY_RESERVED.end + super::MAX_CANDIDATES * super::ADDR_LEN;

    /// Cookie reply: the cookie to put in the next requests.
    pub const REPLY_COOKIE: Field = PEER_ID.end..PEER_ID.end + super::COOKIE_LEN;

    /// Address slot, relative to its start: 0 empty, 4 IPv4, 6 IPv6.
    pub const ADDR_FAMILY: usize = 0;
    /// Address slot: a [`super::CandidateKind`] (zero outside candidate lists).
    pub const ADDR_KIND: usize = 1;
    /// Address slot: the port, u16.
    pub const ADDR_PORT: Field = 2..4;
    /// Address slot: 16 bytes of IPv6, or 4 bytes of IPv4 then 12 zero bytes.
    pub const ADDR_IP: Field = 4..super::ADDR_LEN;
}

/// Bytes of the header every v2 message starts with.
pub const HEADER_LEN: usize = field::FLAGS.end;
/// Bytes of a request.
pub const REQUEST_LEN: usize = field::CANDIDATES.end;
/// Bytes of a match reply.
pub const REPLY_LEN: usize = field::PEER_CANDIDATES.end;
/// Bytes of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = field::REPLY_COOKIE.end;
/// Bytes of a token: the pair, key ID, expiry and MAC.
pub const TOKEN_LEN: usize = field::TOKEN.end - field::TOKEN.start;
/// The longest v2 message. A server must receive into buffers longer than
/// this (at least one byte more), or it cannot tell a request from a longer
/// datagram cut to this length.
pub const MAX_LEN: usize = REQUEST_LEN;

// The promises the layout makes, checked when the crate compiles.
const _: () = {
    // No amplification: no reply is longer than the request that causes it.
    assert!(REPLY_LEN <= REQUEST_LEN);
    assert!(COOKIE_REPLY_LEN <= REQUEST_LEN);
    assert!(MAX_LEN >= REPLY_LEN && MAX_LEN >= COOKIE_REPLY_LEN);
    // No v2 message has a seed message's length (8, 20, 32 bytes).
    let seed = [
        super::seed::REQUEST_LEN,
        super::seed::REPLY_V4_LEN,
        super::seed::REPLY_V6_LEN,
    ];
    let mut i = 0;
    while i < seed.len() {
        assert!(seed[i] != REQUEST_LEN && seed[i] != REPLY_LEN && seed[i] != COOKIE_REPLY_LEN);
        i += 1;
    }
    // The token is the contiguous run the text form encodes.
    assert!(TOKEN_LEN == 8 + 8 + 4 + 8 + MAC_LEN);
    assert!(REQUEST_LEN == 152 && REPLY_LEN == 152 && COOKIE_REPLY_LEN == 40);
};

/// The message type, byte 5 of the header. Values 4-255 are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// A peer asks to meet its partner ([`Request`]).
    Request = 1,
    /// The server tells a peer where its partner is ([`Reply`]).
    Reply = 2,
    /// The server asks a peer to repeat its request with a cookie ([`CookieReply`]).
    CookieReply = 3,
}

impl MessageType {
    /// The type a byte names, if any.
    pub const fn from_u8(b: u8) -> Option<MessageType> {
        match b {
            1 => Some(MessageType::Request),
            2 => Some(MessageType::Reply),
            3 => Some(MessageType::CookieReply),
            _ => None,
        }
    }

    /// The length every message of this type has.
    pub const fn message_len(self) -> usize {
        match self {
            MessageType::Request => REQUEST_LEN,
            MessageType::Reply => REPLY_LEN,
            MessageType::CookieReply => COOKIE_REPLY_LEN,
        }
    }
}

/// Why a datagram is not a valid v2 message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// The datagram's length (given) is not the message's length.
    BadSize(usize),
    /// The first four bytes are not [`MAGIC`].
    BadMagic,
    /// The version byte (given) is not [`VERSION`].
    BadVersion(u8),
    /// The type byte (given) is unknown, or not the one the caller expects.
    BadType(u8),
    /// A reserved byte or an unused address slot is not zero.
    Reserved,
    /// A request or reply whose two IDs are equal: it could never match.
    SelfPair,
    /// A candidate count (given) above [`MAX_CANDIDATES`].
    TooManyCandidates(u8),
    /// An address slot with an unknown family, port 0, a nonzero IPv4 tail,
    /// or, where an address is required, an empty slot.
    BadAddress,
    /// Reply ports that are zero or equal.
    BadPorts,
    /// A cookie reply whose cookie is all zero.
    NoCookie,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BadSize(n) => write!(f, "v2 datagram of {n} bytes has the wrong size"),
            Error::BadMagic => f.write_str("not a psync v2 message (bad magic)"),
            Error::BadVersion(v) => write!(f, "psync protocol version {v} is not 2"),
            Error::BadType(t) => write!(f, "unexpected v2 message type {t}"),
            Error::Reserved => f.write_str("a reserved field is not zero"),
            Error::SelfPair => f.write_str("self_id equals peer_id"),
            Error::TooManyCandidates(n) => {
                write!(f, "{n} candidates; at most {MAX_CANDIDATES} fit")
            }
            Error::BadAddress => f.write_str("malformed address slot"),
            Error::BadPorts => f.write_str("reply ports are zero or equal"),
            Error::NoCookie => f.write_str("cookie reply without a cookie"),
        }
    }
}

impl std::error::Error for Error {}

/// A directed pair of 64-bit IDs: "I am `self_id` and I want to meet
/// `peer_id`". Its [`counterpart`](Pair::counterpart) is what the partner
/// sends; [`unordered`](Pair::unordered) is the same for both halves.
///
/// Why 64 bits: with `n` pairs waiting at once, two different pairs are
/// confused only if both their IDs collide, probability about
/// `n² / 2^128` (3×10⁻²³ at n = 10⁸). Even one shared ID among the `2n`
/// random IDs, which alone confuses nothing, has probability about
/// `(2n)² / 2^65` = 1.1×10⁻³ at n = 10⁸; with 32-bit IDs it is an even bet
/// at n ≈ 4×10⁴.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    /// The sender's own ID.
    pub self_id: u64,
    /// The ID of the peer the sender wants to meet.
    pub peer_id: u64,
}

impl Pair {
    /// The pair `(self_id, peer_id)`.
    pub const fn new(self_id: u64, peer_id: u64) -> Pair {
        Pair { self_id, peer_id }
    }

    /// The pair the partner sends: the two IDs swapped.
    pub const fn counterpart(self) -> Pair {
        Pair {
            self_id: self.peer_id,
            peer_id: self.self_id,
        }
    }

    /// `(min, max)` of the two IDs: equal for a pair and its counterpart.
    pub const fn unordered(self) -> (u64, u64) {
        if self.self_id <= self.peer_id {
            (self.self_id, self.peer_id)
        } else {
            (self.peer_id, self.self_id)
        }
    }

    /// True when both IDs are the same, which can never match.
    pub const fn is_self_pair(self) -> bool {
        self.self_id == self.peer_id
    }

    fn read(buf: &[u8]) -> Pair {
        Pair {
            self_id: u64::from_be_bytes(array(buf, field::SELF_ID)),
            peer_id: u64::from_be_bytes(array(buf, field::PEER_ID)),
        }
    }

    fn write(self, buf: &mut [u8]) {
        buf[field::SELF_ID].copy_from_slice(&self.self_id.to_be_bytes());
        buf[field::PEER_ID].copy_from_slice(&self.peer_id.to_be_bytes());
    }
}

/// A token as the request carries it: the pair it is for, the key that made
/// it, when it expires, and its MAC. [`crate::auth`] makes and checks the
/// MAC; its text form (what `psync-client --token` takes) is these
/// [`TOKEN_LEN`] bytes in base64url ([`crate::auth::encode_token`]).
///
/// `Debug` does not print the MAC: a token is a credential until it expires.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    /// The directed pair the token admits; `(peer, self)` needs its own token.
    pub pair: Pair,
    /// The ID of the key that made the MAC.
    pub key_id: u32,
    /// Unix time in seconds after which the token is refused.
    pub expiry: u64,
    /// HMAC-SHA256 over key_id, expiry, self_id, peer_id, first 16 bytes.
    pub mac: [u8; MAC_LEN],
}

impl Token {
    /// The token's [`TOKEN_LEN`] bytes, as they sit in the request from byte 8.
    pub fn to_bytes(&self) -> [u8; TOKEN_LEN] {
        let mut out = [0u8; TOKEN_LEN];
        // Write through a request-shaped scratch so the ranges are the real ones.
        let mut scratch = [0u8; REQUEST_LEN];
        self.write(&mut scratch);
        out.copy_from_slice(&scratch[field::TOKEN]);
        out
    }

    /// The token in `bytes`, laid out as [`Token::to_bytes`] writes it.
    pub fn from_bytes(bytes: &[u8; TOKEN_LEN]) -> Token {
        let mut scratch = [0u8; REQUEST_LEN];
        scratch[field::TOKEN].copy_from_slice(bytes);
        Token::read(&scratch)
    }

    fn read(buf: &[u8]) -> Token {
        Token {
            pair: Pair::read(buf),
            key_id: u32::from_be_bytes(array(buf, field::KEY_ID)),
            expiry: u64::from_be_bytes(array(buf, field::EXPIRY)),
            mac: array(buf, field::MAC),
        }
    }

    fn write(&self, buf: &mut [u8]) {
        self.pair.write(buf);
        buf[field::KEY_ID].copy_from_slice(&self.key_id.to_be_bytes());
        buf[field::EXPIRY].copy_from_slice(&self.expiry.to_be_bytes());
        buf[field::MAC].copy_from_slice(&self.mac);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("pair", &self.pair)
            .field("key_id", &self.key_id)
            .field("expiry", &self.expiry)
            .field("mac", &format_args!("<{MAC_LEN} bytes>"))
            .finish()
    }
}

/// An address-validation cookie ([`crate::auth::CookieSecret`] makes and
/// checks them). Never all zero: a request with a zero cookie field has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cookie([u8; COOKIE_LEN]);

impl Cookie {
    /// The cookie with these bytes, or `None` if they are all zero (no cookie).
    pub fn new(bytes: [u8; COOKIE_LEN]) -> Option<Cookie> {
        (bytes != [0; COOKIE_LEN]).then_some(Cookie(bytes))
    }

    /// The cookie's bytes.
    pub fn as_bytes(&self) -> &[u8; COOKIE_LEN] {
        &self.0
    }
}

/// How a peer's NAT maps ports, as the peer learned it (RFC 4787 terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// The peer has not found out.
    Unknown,
    /// One public port for every destination ("easy" NAT, or no NAT).
    EndpointIndependent,
    /// A new public port per destination ("hard" NAT, symmetric).
    EndpointDependent,
    /// The value 3, reserved for later use.
    Reserved,
}

/// What a peer tells its partner about itself, through the server: one byte
/// the server relays verbatim from each peer's request into its partner's
/// reply.
///
/// | bits | meaning |
/// |---|---|
/// | 0-1 | [`Mapping`]: 0 unknown, 1 endpoint-independent, 2 endpoint-dependent, 3 reserved |
/// | 2 | the peer holds a port mapping on its router (NAT-PMP, PCP or UPnP); it is among its candidates |
/// | 3 | reserved: senders write 0, receivers ignore it; the server relays it |
/// | 4-7 | reserved: senders write 0, receivers ignore them; the server does not relay them |
///
/// The server never interprets this byte and relays bits 0-3 (it keeps four
/// bits per side), so a meaning for bit 3 needs no server upgrade.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientInfo(pub u8);

impl ClientInfo {
    /// Nothing known: the byte 0.
    pub const UNKNOWN: ClientInfo = ClientInfo(0);
    const MAPPING_MASK: u8 = 0b11;
    const PORT_MAPPED: u8 = 1 << 2;

    /// The byte for this mapping behaviour and port-mapping state.
    pub const fn new(mapping: Mapping, port_mapped: bool) -> ClientInfo {
        let m = match mapping {
            Mapping::Unknown => 0,
            Mapping::EndpointIndependent => 1,
            Mapping::EndpointDependent => 2,
            Mapping::Reserved => 3,
        };
        ClientInfo(m | if port_mapped { Self::PORT_MAPPED } else { 0 })
    }

    /// The peer's NAT mapping behaviour.
    pub const fn mapping(self) -> Mapping {
        match self.0 & Self::MAPPING_MASK {
            0 => Mapping::Unknown,
            1 => Mapping::EndpointIndependent,
            2 => Mapping::EndpointDependent,
            _ => Mapping::Reserved,
        }
    }

    /// True when the peer holds a port mapping on its router.
    pub const fn port_mapped(self) -> bool {
        self.0 & Self::PORT_MAPPED != 0
    }
}

/// Where a candidate address came from (byte 1 of its slot). The server
/// relays it verbatim; values 4-255 are reserved and relayed as well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CandidateKind(pub u8);

impl CandidateKind {
    /// Not said.
    pub const UNSPECIFIED: CandidateKind = CandidateKind(0);
    /// An address of one of the peer's own interfaces (for peers behind the same NAT).
    pub const HOST: CandidateKind = CandidateKind(1);
    /// A public address its router mapped for it (NAT-PMP, PCP, UPnP IGD).
    pub const MAPPED: CandidateKind = CandidateKind(2);
    /// Its public address as some other server (a STUN server) saw it.
    pub const REFLEXIVE: CandidateKind = CandidateKind(3);
}

/// One address a peer may be reached at, as it claims (the server does not
/// check candidates; a client treats them as hints to probe, at a bounded rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Where the address came from.
    pub kind: CandidateKind,
    /// The address. Only the IP and port are sent: an IPv6 flow label or
    /// scope ID means nothing on the partner's host and is sent as zero.
    pub addr: SocketAddr,
}

const NO_CANDIDATE: Candidate = Candidate {
    kind: CandidateKind::UNSPECIFIED,
    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
};

/// Up to [`MAX_CANDIDATES`] candidate addresses, held inline (no allocation).
#[derive(Clone, Copy)]
pub struct Candidates {
    len: u8,
    slots: [Candidate; MAX_CANDIDATES],
}

impl Candidates {
    /// No candidates.
    pub const EMPTY: Candidates = Candidates {
        len: 0,
        slots: [NO_CANDIDATE; MAX_CANDIDATES],
    };

    /// The candidates in `list`, or `None` if there are more than [`MAX_CANDIDATES`]
    /// or one has port 0 (which the wire cannot carry).
    pub fn from_slice(list: &[Candidate]) -> Option<Candidates> {
        let mut out = Candidates::EMPTY;
        for c in list {
            out.push(*c).ok()?;
        }
        Some(out)
    }

    /// Adds a candidate; gives it back if the list is full or its port is 0.
    /// Its flow label and scope ID are dropped (see [`Candidate::addr`]).
    pub fn push(&mut self, c: Candidate) -> Result<(), Candidate> {
        let i = usize::from(self.len);
        if i >= MAX_CANDIDATES || c.addr.port() == 0 {
            return Err(c);
        }
        self.slots[i] = Candidate {
            kind: c.kind,
            addr: SocketAddr::new(c.addr.ip(), c.addr.port()),
        };
        self.len += 1;
        Ok(())
    }

    /// The candidates, in the order they were added.
    pub fn as_slice(&self) -> &[Candidate] {
        &self.slots[..usize::from(self.len)]
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `count` used slots from `slots`; the rest must be zero.
    fn read(count: u8, slots: &[u8]) -> Result<Candidates, Error> {
        if usize::from(count) > MAX_CANDIDATES {
            return Err(Error::TooManyCandidates(count));
        }
        let mut out = Candidates::EMPTY;
        for (i, slot) in slots.chunks_exact(ADDR_LEN).enumerate() {
            if i < usize::from(count) {
                let (kind, addr) = read_addr(slot)?.ok_or(Error::BadAddress)?;
                out.slots[i] = Candidate {
                    kind: CandidateKind(kind),
                    addr,
                };
            } else if slot.iter().any(|&b| b != 0) {
                return Err(Error::Reserved);
            }
        }
        out.len = count;
        Ok(out)
    }

    /// Writes the count into `count` and every slot (unused ones zero).
    fn write(&self, count: &mut u8, slots: &mut [u8]) {
        *count = self.len;
        for (i, slot) in slots.chunks_exact_mut(ADDR_LEN).enumerate() {
            match self.as_slice().get(i) {
                Some(c) => write_addr(slot, c.kind.0, Some(c.addr)),
                None => slot.fill(0),
            }
        }
    }
}

impl Default for Candidates {
    fn default() -> Self {
        Candidates::EMPTY
    }
}

impl PartialEq for Candidates {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Candidates {}

impl std::hash::Hash for Candidates {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl fmt::Debug for Candidates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A v2 request: "here is my token for `token.pair`; tell me where my
/// partner is, and tell my partner this about me".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// The token, which also names the pair.
    pub token: Token,
    /// The cookie the server gave this address, if it has one.
    pub cookie: Option<Cookie>,
    /// Relayed to the partner in its reply.
    pub info: ClientInfo,
    /// The sender's own candidate addresses, relayed to the partner.
    pub candidates: Candidates,
}

impl Request {
    /// The directed pair the request is for.
    pub fn pair(&self) -> Pair {
        self.token.pair
    }

    /// Parses a request: exactly [`REQUEST_LEN`] bytes, a v2 header of type
    /// 1, reserved bytes and unused slots zero, distinct IDs, valid
    /// candidates. The token is not verified here ([`crate::auth`] does that).
    pub fn parse(datagram: &[u8]) -> Result<Request, Error> {
        RequestView::new_checked(datagram)?.to_repr()
    }

    /// Writes the request into the front of `buf` and returns [`REQUEST_LEN`].
    ///
    /// # Panics
    /// If `buf` is shorter than [`REQUEST_LEN`].
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..REQUEST_LEN];
        out.fill(0);
        write_header(out, MessageType::Request);
        self.token.write(out);
        if let Some(c) = &self.cookie {
            out[field::COOKIE].copy_from_slice(c.as_bytes());
        }
        out[field::CLIENT_INFO] = self.info.0;
        let (head, slots) = out.split_at_mut(field::CANDIDATES.start);
        self.candidates
            .write(&mut head[field::CANDIDATE_COUNT], slots);
        REQUEST_LEN
    }

    /// The request's bytes.
    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        self.emit(&mut out);
        out
    }
}

/// The match reply: where the partner is, where the asker is, and what the
/// partner said about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The asker's pair, as in its request (not the partner's).
    pub pair: Pair,
    /// The local port the asker should send from (the seed's strategy).
    pub src_port: u16,
    /// The port on the partner to send to (the partner's `src_port`).
    pub dst_port: u16,
    /// The partner's public address, as the server saw it.
    pub peer: SocketAddr,
    /// The asker's own public address, as the server saw it (so a client
    /// learns it without STUN).
    pub your_addr: SocketAddr,
    /// Bits 0-3 of the partner's [`ClientInfo`] byte (bits 4-7 zero).
    pub peer_info: ClientInfo,
    /// The partner's candidates, verbatim: in the waiter's reply, those of
    /// the request that completed the pair; none in the completer's reply
    /// or in a replay (the server stores none; PROTOCOL.md).
    pub peer_candidates: Candidates,
}

impl Reply {
    /// Parses a match reply, as a client does: exactly [`REPLY_LEN`] bytes,
    /// a v2 header of type 2, distinct IDs, valid ports and addresses.
    pub fn parse(datagram: &[u8]) -> Result<Reply, Error> {
        ReplyView::new_checked(datagram)?.to_repr()
    }

    /// Writes the reply into the front of `buf` and returns [`REPLY_LEN`].
    /// Never allocates. IPv6 flow labels and scope IDs are sent as zero.
    ///
    /// # Panics
    /// If `buf` is shorter than [`REPLY_LEN`] (servers own buffers of [`MAX_LEN`]).
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..REPLY_LEN];
        out.fill(0);
        write_header(out, MessageType::Reply);
        self.pair.write(out);
        out[field::SRC_PORT].copy_from_slice(&self.src_port.to_be_bytes());
        out[field::DST_PORT].copy_from_slice(&self.dst_port.to_be_bytes());
        write_addr(&mut out[field::PEER_ADDR], 0, Some(self.peer));
        write_addr(&mut out[field::YOUR_ADDR], 0, Some(self.your_addr));
        out[field::PEER_INFO] = self.peer_info.0;
        let (head, slots) = out.split_at_mut(field::PEER_CANDIDATES.start);
        self.peer_candidates
            .write(&mut head[field::PEER_CANDIDATE_COUNT], slots);
        REPLY_LEN
    }

    /// The reply's bytes.
    pub fn to_bytes(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        self.emit(&mut out);
        out
    }
}

/// The cookie reply: "send your request again with this cookie". It echoes
/// the request's pair so the client can tell which request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CookieReply {
    /// The pair of the request it answers.
    pub pair: Pair,
    /// The cookie to carry from now on.
    pub cookie: Cookie,
}

impl CookieReply {
    /// Parses a cookie reply: exactly [`COOKIE_REPLY_LEN`] bytes, a v2 header
    /// of type 3, a nonzero cookie. (The IDs are an echo and not checked.)
    pub fn parse(datagram: &[u8]) -> Result<CookieReply, Error> {
        CookieReplyView::new_checked(datagram)?.to_repr()
    }

    /// Writes the cookie reply into the front of `buf` and returns
    /// [`COOKIE_REPLY_LEN`]. Never allocates.
    ///
    /// # Panics
    /// If `buf` is shorter than [`COOKIE_REPLY_LEN`].
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..COOKIE_REPLY_LEN];
        out.fill(0);
        write_header(out, MessageType::CookieReply);
        self.pair.write(out);
        out[field::REPLY_COOKIE].copy_from_slice(self.cookie.as_bytes());
        COOKIE_REPLY_LEN
    }

    /// The cookie reply's bytes.
    pub fn to_bytes(&self) -> [u8; COOKIE_REPLY_LEN] {
        let mut out = [0u8; COOKIE_REPLY_LEN];
        self.emit(&mut out);
        out
    }
}

/// Anything a v2 server sends a peer.
// A client holds one at a time, on the stack; boxing the reply would
// allocate per datagram.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// The partner is there.
    Reply(Reply),
    /// Repeat the request with this cookie.
    Cookie(CookieReply),
}

impl Response {
    /// Parses a reply or a cookie reply, told apart by the type byte.
    pub fn parse(datagram: &[u8]) -> Result<Response, Error> {
        let ty = check_header(datagram)?;
        match ty {
            MessageType::Reply => Reply::parse(datagram).map(Response::Reply),
            MessageType::CookieReply => CookieReply::parse(datagram).map(Response::Cookie),
            MessageType::Request => Err(Error::BadType(ty as u8)),
        }
    }

    /// The pair of the request this answers.
    pub fn pair(&self) -> Pair {
        match self {
            Response::Reply(r) => r.pair,
            Response::Cookie(c) => c.pair,
        }
    }
}

/// A checked view of a request: [`REQUEST_LEN`] bytes with a v2 header of
/// type 1. Its accessors read fields without validating their contents;
/// [`RequestView::to_repr`] does that.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    buf: &'a [u8; REQUEST_LEN],
}

impl<'a> RequestView<'a> {
    /// Checks the length first (so a server's `bad_size` is the length's
    /// fault), then magic, version and type.
    pub fn new_checked(datagram: &'a [u8]) -> Result<RequestView<'a>, Error> {
        let buf: &[u8; REQUEST_LEN] = datagram
            .try_into()
            .map_err(|_| Error::BadSize(datagram.len()))?;
        expect_type(buf, MessageType::Request)?;
        Ok(RequestView { buf })
    }

    /// The pair, as sent.
    pub fn pair(&self) -> Pair {
        Pair::read(self.buf)
    }

    /// The token, as sent.
    pub fn token(&self) -> Token {
        Token::read(self.buf)
    }

    /// The cookie field, `None` when all zero.
    pub fn cookie(&self) -> Option<Cookie> {
        Cookie::new(array(self.buf, field::COOKIE))
    }

    /// The client-info byte.
    pub fn client_info(&self) -> ClientInfo {
        ClientInfo(self.buf[field::CLIENT_INFO])
    }

    /// The candidate count byte, unchecked.
    pub fn candidate_count(&self) -> u8 {
        self.buf[field::CANDIDATE_COUNT]
    }

    /// The whole datagram.
    pub fn as_bytes(&self) -> &'a [u8; REQUEST_LEN] {
        self.buf
    }

    /// Validates every field and returns the request.
    pub fn to_repr(&self) -> Result<Request, Error> {
        check_zero(&self.buf[field::FLAGS])?;
        check_zero(&self.buf[field::REQUEST_RESERVED])?;
        let token = self.token();
        if token.pair.is_self_pair() {
            return Err(Error::SelfPair);
        }
        let candidates = Candidates::read(self.candidate_count(), &self.buf[field::CANDIDATES])?;
        Ok(Request {
            token,
            cookie: self.cookie(),
            info: self.client_info(),
            candidates,
        })
    }
}

/// A checked view of a match reply: [`REPLY_LEN`] bytes with a v2 header of type 2.
#[derive(Clone, Copy, Debug)]
pub struct ReplyView<'a> {
    buf: &'a [u8; REPLY_LEN],
}

impl<'a> ReplyView<'a> {
    /// Checks length, magic, version and type.
    pub fn new_checked(datagram: &'a [u8]) -> Result<ReplyView<'a>, Error> {
        let buf: &[u8; REPLY_LEN] = datagram
            .try_into()
            .map_err(|_| Error::BadSize(datagram.len()))?;
        expect_type(buf, MessageType::Reply)?;
        Ok(ReplyView { buf })
    }

    /// The asker's pair.
    pub fn pair(&self) -> Pair {
        Pair::read(self.buf)
    }

    /// The whole datagram.
    pub fn as_bytes(&self) -> &'a [u8; REPLY_LEN] {
        self.buf
    }

    /// Validates every field and returns the reply.
    pub fn to_repr(&self) -> Result<Reply, Error> {
        let buf = self.buf;
        check_zero(&buf[field::FLAGS])?;
        check_zero(&buf[field::REPLY_RESERVED])?;
        let pair = self.pair();
        if pair.is_self_pair() {
            return Err(Error::SelfPair);
        }
        let src_port = u16::from_be_bytes(array(buf, field::SRC_PORT));
        let dst_port = u16::from_be_bytes(array(buf, field::DST_PORT));
        if src_port == 0 || dst_port == 0 || src_port == dst_port {
            return Err(Error::BadPorts);
        }
        let peer = read_plain_addr(&buf[field::PEER_ADDR])?;
        let your_addr = read_plain_addr(&buf[field::YOUR_ADDR])?;
        let peer_candidates = Candidates::read(
            buf[field::PEER_CANDIDATE_COUNT],
            &buf[field::PEER_CANDIDATES],
        )?;
        Ok(Reply {
            pair,
            src_port,
            dst_port,
            peer,
            your_addr,
            peer_info: ClientInfo(buf[field::PEER_INFO]),
            peer_candidates,
        })
    }
}

/// A checked view of a cookie reply: [`COOKIE_REPLY_LEN`] bytes with a v2
/// header of type 3.
#[derive(Clone, Copy, Debug)]
pub struct CookieReplyView<'a> {
    buf: &'a [u8; COOKIE_REPLY_LEN],
}

impl<'a> CookieReplyView<'a> {
    /// Checks length, magic, version and type.
    pub fn new_checked(datagram: &'a [u8]) -> Result<CookieReplyView<'a>, Error> {
        let buf: &[u8; COOKIE_REPLY_LEN] = datagram
            .try_into()
            .map_err(|_| Error::BadSize(datagram.len()))?;
        expect_type(buf, MessageType::CookieReply)?;
        Ok(CookieReplyView { buf })
    }

    /// The echoed pair.
    pub fn pair(&self) -> Pair {
        Pair::read(self.buf)
    }

    /// Validates every field and returns the cookie reply.
    pub fn to_repr(&self) -> Result<CookieReply, Error> {
        check_zero(&self.buf[field::FLAGS])?;
        let cookie = Cookie::new(array(self.buf, field::REPLY_COOKIE)).ok_or(Error::NoCookie)?;
        Ok(CookieReply {
            pair: self.pair(),
            cookie,
        })
    }
}

/// Checks magic and version of a datagram of any length and returns its type.
fn check_header(datagram: &[u8]) -> Result<MessageType, Error> {
    let Some(head) = datagram.get(..HEADER_LEN) else {
        return Err(Error::BadSize(datagram.len()));
    };
    if head[field::MAGIC] != MAGIC {
        return Err(Error::BadMagic);
    }
    if head[field::VERSION] != VERSION {
        return Err(Error::BadVersion(head[field::VERSION]));
    }
    MessageType::from_u8(head[field::TYPE]).ok_or(Error::BadType(head[field::TYPE]))
}

/// Checks the header of a datagram whose length the caller already matched to `want`.
fn expect_type(buf: &[u8], want: MessageType) -> Result<(), Error> {
    let ty = check_header(buf)?;
    if ty != want {
        return Err(Error::BadType(ty as u8));
    }
    Ok(())
}

fn write_header(out: &mut [u8], ty: MessageType) {
    out[field::MAGIC].copy_from_slice(&MAGIC);
    out[field::VERSION] = VERSION;
    out[field::TYPE] = ty as u8;
}

fn check_zero(bytes: &[u8]) -> Result<(), Error> {
    if bytes.iter().any(|&b| b != 0) {
        return Err(Error::Reserved);
    }
    Ok(())
}

const FAMILY_NONE: u8 = 0;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Reads a 20-byte address slot: `None` for an empty (all-zero) slot, else
/// the kind byte and the address.
fn read_addr(slot: &[u8]) -> Result<Option<(u8, SocketAddr)>, Error> {
    let ip_bytes: [u8; 16] = array(slot, field::ADDR_IP);
    let port = u16::from_be_bytes(array(slot, field::ADDR_PORT));
    let kind = slot[field::ADDR_KIND];
    let ip = match slot[field::ADDR_FAMILY] {
        FAMILY_NONE => {
            return if slot.iter().all(|&b| b == 0) {
                Ok(None)
            } else {
                Err(Error::BadAddress)
            };
        }
        FAMILY_V4 => {
            if ip_bytes[4..].iter().any(|&b| b != 0) {
                return Err(Error::BadAddress);
            }
            IpAddr::V4(Ipv4Addr::new(
                ip_bytes[0],
                ip_bytes[1],
                ip_bytes[2],
                ip_bytes[3],
            ))
        }
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(ip_bytes)),
        _ => return Err(Error::BadAddress),
    };
    if port == 0 {
        return Err(Error::BadAddress);
    }
    Ok(Some((kind, SocketAddr::new(ip, port))))
}

/// Reads a slot that must hold an address and have kind 0 (a reply's
/// `peer` and `your_addr`).
fn read_plain_addr(slot: &[u8]) -> Result<SocketAddr, Error> {
    match read_addr(slot)? {
        Some((0, addr)) => Ok(addr),
        Some(_) => Err(Error::Reserved),
        None => Err(Error::BadAddress),
    }
}

/// Writes a 20-byte address slot (all zero for `None`).
fn write_addr(slot: &mut [u8], kind: u8, addr: Option<SocketAddr>) {
    slot.fill(0);
    let Some(addr) = addr else { return };
    slot[field::ADDR_KIND] = kind;
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

/// Copies a fixed-size field out of a buffer whose length the caller checked.
fn array<const N: usize>(buf: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[range]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with every field set: pair (0x0102030405060708,
    /// 0x1112131415161718), key 7, expiry 1700000000, MAC 0xa0..0xaf, cookie
    /// 0xc0..0xcf, client info 0x05 (endpoint-independent, port-mapped), two
    /// candidates: host 192.168.1.20:40000 and mapped [2001:db8::7]:4242.
    #[rustfmt::skip]
    const REQUEST_FIXTURE: [u8; REQUEST_LEN] = [
        b'P', b'S', b'Y', b'N', 2, 1, 0, 0,             // header: magic, version 2, type 1, flags
        1, 2, 3, 4, 5, 6, 7, 8,                         // self_id
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // peer_id
        0, 0, 0, 7,                                     // key_id 7
        0, 0, 0, 0, 0x65, 0x53, 0xf1, 0x00,             // expiry 1700000000
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, // mac
        0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
        0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, // cookie
        0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
        0x05, 2, 0, 0,                                  // client info, 2 candidates, reserved
        4, 1, 0x9c, 0x40, 192, 168, 1, 20,              // IPv4, host, port 40000, 192.168.1.20
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        6, 2, 0x10, 0x92, 0x20, 0x01, 0x0d, 0xb8,       // IPv6, mapped, port 4242, 2001:db8::7
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // unused slot
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // unused slot
    ];

    /// A reply over IPv4 to the request above: ports 12345/54321, partner
    /// 198.51.100.7:4949, asker 203.0.113.9:5000, partner info 0x02
    /// (endpoint-dependent), one partner candidate: host 10.0.0.2:7000.
    #[rustfmt::skip]
    const REPLY_V4_FIXTURE: [u8; REPLY_LEN] = [
        b'P', b'S', b'Y', b'N', 2, 2, 0, 0,             // header, type 2
        1, 2, 3, 4, 5, 6, 7, 8,                         // self_id (the asker)
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // peer_id
        0x30, 0x39, 0xd4, 0x31,                         // src_port 12345, dst_port 54321
        4, 0, 0x13, 0x55, 198, 51, 100, 7,              // peer: 198.51.100.7:4949
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        4, 0, 0x13, 0x88, 203, 0, 113, 9,               // your_addr: 203.0.113.9:5000
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x02, 1, 0, 0,                                  // peer info, 1 candidate, reserved
        4, 1, 0x1b, 0x58, 10, 0, 0, 2,                  // IPv4, host, 10.0.0.2:7000
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    /// A reply over IPv6: ports 1024/65535, partner [2001:db8::1]:4948,
    /// asker [2001:db8::2]:80, partner info 0, no candidates.
    #[rustfmt::skip]
    const REPLY_V6_FIXTURE: [u8; REPLY_LEN] = [
        b'P', b'S', b'Y', b'N', 2, 2, 0, 0,
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // self_id (the other half)
        1, 2, 3, 4, 5, 6, 7, 8,                         // peer_id
        0x04, 0x00, 0xff, 0xff,                         // src_port 1024, dst_port 65535
        6, 0, 0x13, 0x54, 0x20, 0x01, 0x0d, 0xb8,       // peer: [2001:db8::1]:4948
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        6, 0, 0x00, 0x50, 0x20, 0x01, 0x0d, 0xb8,       // your_addr: [2001:db8::2]:80
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
        0, 0, 0, 0,                                     // peer info, 0 candidates, reserved
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[rustfmt::skip]
    const COOKIE_REPLY_FIXTURE: [u8; COOKIE_REPLY_LEN] = [
        b'P', b'S', b'Y', b'N', 2, 3, 0, 0,             // header, type 3
        1, 2, 3, 4, 5, 6, 7, 8,                         // self_id echoed
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // peer_id echoed
        0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, // cookie
        0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
    ];

    const PAIR: Pair = Pair::new(0x0102_0304_0506_0708, 0x1112_1314_1516_1718);

    fn seq<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start + i as u8)
    }

    fn request() -> Request {
        Request {
            token: Token {
                pair: PAIR,
                key_id: 7,
                expiry: 1_700_000_000,
                mac: seq(0xa0),
            },
            cookie: Cookie::new(seq(0xc0)),
            info: ClientInfo::new(Mapping::EndpointIndependent, true),
            candidates: Candidates::from_slice(&[
                Candidate {
                    kind: CandidateKind::HOST,
                    addr: "192.168.1.20:40000".parse().unwrap(),
                },
                Candidate {
                    kind: CandidateKind::MAPPED,
                    addr: "[2001:db8::7]:4242".parse().unwrap(),
                },
            ])
            .unwrap(),
        }
    }

    fn reply_v4() -> Reply {
        Reply {
            pair: PAIR,
            src_port: 12345,
            dst_port: 54321,
            peer: "198.51.100.7:4949".parse().unwrap(),
            your_addr: "203.0.113.9:5000".parse().unwrap(),
            peer_info: ClientInfo::new(Mapping::EndpointDependent, false),
            peer_candidates: Candidates::from_slice(&[Candidate {
                kind: CandidateKind::HOST,
                addr: "10.0.0.2:7000".parse().unwrap(),
            }])
            .unwrap(),
        }
    }

    fn reply_v6() -> Reply {
        Reply {
            pair: PAIR.counterpart(),
            src_port: 1024,
            dst_port: 65535,
            peer: "[2001:db8::1]:4948".parse().unwrap(),
            your_addr: "[2001:db8::2]:80".parse().unwrap(),
            peer_info: ClientInfo::UNKNOWN,
            peer_candidates: Candidates::EMPTY,
        }
    }

    #[test]
    fn lengths_are_derived_from_the_fields() {
        assert_eq!(HEADER_LEN, 8);
        assert_eq!(field::TOKEN, 8..52);
        assert_eq!(TOKEN_LEN, 44);
        assert_eq!(field::CANDIDATES, 72..152);
        assert_eq!(field::PEER_CANDIDATES, 72..152);
        assert_eq!(REQUEST_LEN, 152);
        assert_eq!(REPLY_LEN, 152);
        assert_eq!(COOKIE_REPLY_LEN, 40);
        for ty in [
            MessageType::Request,
            MessageType::Reply,
            MessageType::CookieReply,
        ] {
            assert_eq!(MessageType::from_u8(ty as u8), Some(ty));
        }
    }

    #[test]
    fn request_matches_fixture() {
        let req = request();
        let mut buf = [0x5a; REQUEST_LEN + 8];
        assert_eq!(req.emit(&mut buf), REQUEST_LEN);
        assert_eq!(buf[..REQUEST_LEN], REQUEST_FIXTURE);
        assert_eq!(buf[REQUEST_LEN..], [0x5a; 8], "emit wrote past its length");
        assert_eq!(Request::parse(&REQUEST_FIXTURE), Ok(req));
        let view = RequestView::new_checked(&REQUEST_FIXTURE).unwrap();
        assert_eq!(view.pair(), PAIR);
        assert_eq!(view.token(), req.token);
        assert_eq!(view.token().to_bytes()[..], REQUEST_FIXTURE[field::TOKEN]);
        assert_eq!(Token::from_bytes(&view.token().to_bytes()), req.token);
        assert_eq!(view.candidate_count(), 2);
        assert!(view.client_info().port_mapped());
        assert_eq!(view.client_info().mapping(), Mapping::EndpointIndependent);
    }

    #[test]
    fn request_without_cookie_or_candidates() {
        let req = Request {
            cookie: None,
            candidates: Candidates::EMPTY,
            info: ClientInfo::UNKNOWN,
            ..request()
        };
        let bytes = req.to_bytes();
        assert_eq!(bytes[field::COOKIE], [0; COOKIE_LEN]);
        assert!(bytes[field::CLIENT_INFO..].iter().all(|&b| b == 0));
        assert_eq!(Request::parse(&bytes), Ok(req));
    }

    #[test]
    fn replies_match_fixtures() {
        for (reply, fixture) in [
            (reply_v4(), REPLY_V4_FIXTURE),
            (reply_v6(), REPLY_V6_FIXTURE),
        ] {
            let mut buf = [0x5a; MAX_LEN + 8];
            assert_eq!(reply.emit(&mut buf), REPLY_LEN);
            assert_eq!(buf[..REPLY_LEN], fixture);
            assert_eq!(buf[REPLY_LEN..], [0x5a; MAX_LEN + 8 - REPLY_LEN]);
            assert_eq!(Reply::parse(&fixture), Ok(reply));
            assert_eq!(Response::parse(&fixture), Ok(Response::Reply(reply)));
            assert_eq!(ReplyView::new_checked(&fixture).unwrap().pair(), reply.pair);
        }
    }

    #[test]
    fn cookie_reply_matches_fixture() {
        let cr = CookieReply {
            pair: PAIR,
            cookie: Cookie::new(seq(0xc0)).unwrap(),
        };
        let mut buf = [0x5a; MAX_LEN];
        assert_eq!(cr.emit(&mut buf), COOKIE_REPLY_LEN);
        assert_eq!(buf[..COOKIE_REPLY_LEN], COOKIE_REPLY_FIXTURE);
        assert_eq!(CookieReply::parse(&COOKIE_REPLY_FIXTURE), Ok(cr));
        assert_eq!(
            Response::parse(&COOKIE_REPLY_FIXTURE),
            Ok(Response::Cookie(cr))
        );
        let mut zero = COOKIE_REPLY_FIXTURE;
        zero[field::REPLY_COOKIE].fill(0);
        assert_eq!(CookieReply::parse(&zero), Err(Error::NoCookie));
    }

    /// The amplification promise with exact byte counts: each reply a v2
    /// request can cause, over IPv4 and IPv6, on the wire with IP and UDP
    /// headers, is no longer than the request (the table in PROTOCOL.md).
    #[test]
    fn no_reply_is_longer_than_its_request() {
        const UDP: usize = 8;
        const IPV4: usize = 20;
        const IPV6: usize = 40;
        let request = request().to_bytes().len();
        let mut buf = [0u8; MAX_LEN];
        let v4 = reply_v4().emit(&mut buf);
        let v6 = reply_v6().emit(&mut buf);
        let cookie = CookieReply {
            pair: PAIR,
            cookie: Cookie::new([0xff; COOKIE_LEN]).unwrap(),
        }
        .emit(&mut buf);
        assert_eq!((request, v4, v6, cookie), (152, 152, 152, 40));
        // IPv4: 180-byte request datagrams cause at most 180-byte replies.
        assert_eq!(request + UDP + IPV4, 180);
        assert_eq!(v4 + UDP + IPV4, 180);
        assert_eq!(cookie + UDP + IPV4, 68);
        // IPv6: 200 bytes in, at most 200 out.
        assert_eq!(request + UDP + IPV6, 200);
        assert_eq!(v6 + UDP + IPV6, 200);
        assert_eq!(cookie + UDP + IPV6, 88);
        // A reply with a full candidate list of IPv6 addresses is no longer.
        let mut full = reply_v6();
        for i in 0..MAX_CANDIDATES {
            full.peer_candidates
                .push(Candidate {
                    kind: CandidateKind::HOST,
                    addr: SocketAddr::new(
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16).into(),
                        9,
                    ),
                })
                .unwrap();
        }
        assert_eq!(full.emit(&mut buf), request);
    }

    #[test]
    fn the_wrong_length_is_a_size_error() {
        for n in [0, 1, 7, 8, 20, 32, 39, 40, 41, 151, 152, 153, 1500] {
            let data = vec![0u8; n];
            let size = |len| {
                if n == len {
                    Error::BadMagic
                } else {
                    Error::BadSize(n)
                }
            };
            assert_eq!(Request::parse(&data), Err(size(REQUEST_LEN)));
            assert_eq!(Reply::parse(&data), Err(size(REPLY_LEN)));
            assert_eq!(CookieReply::parse(&data), Err(size(COOKIE_REPLY_LEN)));
        }
        // A request cut or extended by a byte.
        assert_eq!(
            Request::parse(&REQUEST_FIXTURE[..151]),
            Err(Error::BadSize(151))
        );
        let mut long = REQUEST_FIXTURE.to_vec();
        long.push(0);
        assert_eq!(Request::parse(&long), Err(Error::BadSize(153)));
        // Response: short of a header, or a known header with the wrong length.
        assert_eq!(Response::parse(b"PS"), Err(Error::BadSize(2)));
        assert_eq!(
            Response::parse(&REPLY_V4_FIXTURE[..100]),
            Err(Error::BadSize(100))
        );
    }

    #[test]
    fn header_errors() {
        let mut bad = REQUEST_FIXTURE;
        bad[0] = b'Q';
        assert_eq!(Request::parse(&bad), Err(Error::BadMagic));
        let mut bad = REQUEST_FIXTURE;
        bad[field::VERSION] = 3;
        assert_eq!(Request::parse(&bad), Err(Error::BadVersion(3)));
        let mut bad = REQUEST_FIXTURE;
        bad[field::TYPE] = 9;
        assert_eq!(Request::parse(&bad), Err(Error::BadType(9)));
        // A reply (type 2) sent to a server is not a request, although the
        // lengths agree: servers never answer each other.
        assert_eq!(Request::parse(&REPLY_V4_FIXTURE), Err(Error::BadType(2)));
        assert_eq!(Reply::parse(&REQUEST_FIXTURE), Err(Error::BadType(1)));
        assert_eq!(Response::parse(&REQUEST_FIXTURE), Err(Error::BadType(1)));
        let mut bad = REQUEST_FIXTURE;
        bad[field::FLAGS.start] = 1;
        assert_eq!(Request::parse(&bad), Err(Error::Reserved));
        let mut bad = COOKIE_REPLY_FIXTURE;
        bad[field::FLAGS.end - 1] = 1;
        assert_eq!(CookieReply::parse(&bad), Err(Error::Reserved));
    }

    #[test]
    fn request_field_errors() {
        let mut bad = REQUEST_FIXTURE;
        bad.copy_within(field::SELF_ID, field::PEER_ID.start);
        assert_eq!(Request::parse(&bad), Err(Error::SelfPair));
        let mut bad = REQUEST_FIXTURE;
        bad[field::REQUEST_RESERVED.start] = 1;
        assert_eq!(Request::parse(&bad), Err(Error::Reserved));
        let mut bad = REQUEST_FIXTURE;
        bad[field::CANDIDATE_COUNT] = 5;
        assert_eq!(Request::parse(&bad), Err(Error::TooManyCandidates(5)));
        // Count 3 but the third slot is empty.
        let mut bad = REQUEST_FIXTURE;
        bad[field::CANDIDATE_COUNT] = 3;
        assert_eq!(Request::parse(&bad), Err(Error::BadAddress));
        // Count 1 but the second slot is used.
        let mut bad = REQUEST_FIXTURE;
        bad[field::CANDIDATE_COUNT] = 1;
        assert_eq!(Request::parse(&bad), Err(Error::Reserved));
        let first = field::CANDIDATES.start;
        let mut bad = REQUEST_FIXTURE;
        bad[first] = 5; // unknown family
        assert_eq!(Request::parse(&bad), Err(Error::BadAddress));
        let mut bad = REQUEST_FIXTURE;
        bad[first + 2..first + 4].fill(0); // port 0
        assert_eq!(Request::parse(&bad), Err(Error::BadAddress));
        let mut bad = REQUEST_FIXTURE;
        bad[first + 19] = 1; // IPv4 tail
        assert_eq!(Request::parse(&bad), Err(Error::BadAddress));
        // Unknown kinds and client-info bits are relayed, not refused.
        let mut odd = REQUEST_FIXTURE;
        odd[first + 1] = 200;
        odd[field::CLIENT_INFO] = 0xff;
        let req = Request::parse(&odd).unwrap();
        assert_eq!(req.candidates.as_slice()[0].kind, CandidateKind(200));
        assert_eq!(req.info.mapping(), Mapping::Reserved);
        assert_eq!(req.to_bytes(), odd);
    }

    #[test]
    fn reply_field_errors() {
        let mut bad = REPLY_V4_FIXTURE;
        bad[field::SRC_PORT].fill(0);
        assert_eq!(Reply::parse(&bad), Err(Error::BadPorts));
        let mut bad = REPLY_V4_FIXTURE;
        bad.copy_within(field::SRC_PORT, field::DST_PORT.start);
        assert_eq!(Reply::parse(&bad), Err(Error::BadPorts));
        let mut bad = REPLY_V4_FIXTURE;
        bad[field::PEER_ADDR].fill(0);
        assert_eq!(Reply::parse(&bad), Err(Error::BadAddress));
        let mut bad = REPLY_V4_FIXTURE;
        bad[field::YOUR_ADDR.start + field::ADDR_KIND] = 1;
        assert_eq!(Reply::parse(&bad), Err(Error::Reserved));
        let mut bad = REPLY_V4_FIXTURE;
        bad[field::REPLY_RESERVED.end - 1] = 1;
        assert_eq!(Reply::parse(&bad), Err(Error::Reserved));
        let mut bad = REPLY_V4_FIXTURE;
        bad.copy_within(field::SELF_ID, field::PEER_ID.start);
        assert_eq!(Reply::parse(&bad), Err(Error::SelfPair));
    }

    #[test]
    fn pair_directions() {
        let p = Pair::new(1, 2);
        assert_eq!(p.counterpart(), Pair::new(2, 1));
        assert_eq!(p.counterpart().counterpart(), p);
        assert_eq!(p.unordered(), (1, 2));
        assert_eq!(p.counterpart().unordered(), (1, 2));
        assert!(Pair::new(3, 3).is_self_pair());
    }

    #[test]
    fn candidates_hold_four_and_drop_scope() {
        let mut c = Candidates::EMPTY;
        let scoped = Candidate {
            kind: CandidateKind::HOST,
            addr: "[fe80::1%3]:9".parse().unwrap(),
        };
        c.push(scoped).unwrap();
        match c.as_slice()[0].addr {
            SocketAddr::V6(a) => assert_eq!(a.scope_id(), 0),
            SocketAddr::V4(_) => unreachable!(),
        }
        let zero_port = Candidate {
            kind: CandidateKind::HOST,
            addr: "10.0.0.1:0".parse().unwrap(),
        };
        assert_eq!(c.push(zero_port), Err(zero_port));
        for _ in 1..MAX_CANDIDATES {
            c.push(scoped).unwrap();
        }
        assert_eq!(c.push(scoped), Err(scoped));
        assert_eq!(c.len(), MAX_CANDIDATES);
        assert!(Candidates::from_slice(&[scoped; MAX_CANDIDATES + 1]).is_none());
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
        assert_eq!(dump("request"), REQUEST_FIXTURE);
        assert_eq!(dump("reply-v4"), REPLY_V4_FIXTURE);
        assert_eq!(dump("cookie-reply"), COOKIE_REPLY_FIXTURE);
    }

    #[test]
    fn token_debug_hides_the_mac() {
        let s = format!("{:?}", request().token);
        assert!(!s.contains("160"), "{s}"); // 0xa0
        assert!(s.contains("key_id: 7"), "{s}");
    }
}
