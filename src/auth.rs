//! Tokens and cookies for protocol v2: issue them and check them.
//!
//! Pure: no I/O, no clock, no randomness. The time is an argument (Unix
//! seconds), key material comes in as bytes (the caller reads the key file
//! and draws random cookie secrets), and nothing here logs.
//!
//! **Tokens** let an application's backend decide who may meet whom. The
//! backend, which knows both users, gives each peer a token for its own
//! direction of the pair:
//!
//! ```text
//! mac = HMAC-SHA256(key, key_id ‖ expiry ‖ self_id ‖ peer_id)[..16]
//!       (u32, u64, u64, u64, all big-endian: 28 bytes of input)
//! ```
//!
//! The server matches a pair only when both halves carry valid tokens. A
//! token for the other direction `(peer, self)`, or for another pair, is a
//! bad MAC by construction: the IDs are inside the MAC. [`KeySet::verify`]
//! tells the three failures apart ([`TokenError`]) so a server can count them,
//! and compares MACs in constant time. Expiry allows [`CLOCK_SKEW_SECS`] of
//! clock difference between the backend and the server.
//!
//! **Cookies** validate a client's address statelessly, as DNS cookies
//! (RFC 7873) and QUIC's Retry do: a cookie is the time epoch and a truncated
//! MAC of the client's IP and port under a server secret
//! ([`CookieSecret`]). Only someone who receives datagrams at that address
//! can learn it, so a server can keep traffic from validated addresses apart
//! from traffic that may be forged. It is valid in the epoch it was made in
//! and the next ([`COOKIE_EPOCH_SECS`] each).
//!
//! `docs/auth.md` is the operator's guide; `PROTOCOL.md` has the byte layouts
//! and test vectors.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::digest::generic_array::GenericArray;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::wire::v2::{Cookie, Pair, Token, COOKIE_LEN, MAC_LEN, TOKEN_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Shortest key or cookie secret accepted: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key or cookie secret accepted: one SHA-256 block (longer keys
/// would only be hashed down to 32 bytes first).
pub const MAX_KEY_LEN: usize = 64;
/// Most keys a key set holds. Rotation needs two or three; the bound keeps a
/// mistaken file (a pasted list of thousands) from becoming a slow lookup.
pub const MAX_KEYS: usize = 256;
/// How far past its expiry a token is still accepted, for clocks that
/// disagree. NTP keeps hosts within milliseconds; an unsynchronised VM
/// drifts seconds a day. 30 s covers that and is small next to the
/// lifetimes backends issue (minutes).
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Length of a cookie epoch. A cookie is valid in its epoch and the next, so
/// for 60 to 120 s: longer than a pair waits (30 s by default), short enough
/// that a captured cookie soon stops working.
pub const COOKIE_EPOCH_SECS: u64 = 60;
/// Characters in a token's text form (44 bytes in unpadded base64url).
pub const TOKEN_TEXT_LEN: usize = (TOKEN_LEN * 4).div_ceil(3);

/// Bytes of a cookie that carry its epoch (the rest is the MAC).
const COOKIE_EPOCH_LEN: usize = 4;
/// The cookie MAC's input starts with this label, so that a cookie can never
/// be mistaken for a token MAC even if an operator reuses a secret.
const COOKIE_LABEL: &[u8; 16] = b"psync v2 cookie\0";
/// Bytes of a token MAC's input.
const TOKEN_INPUT_LEN: usize = 4 + 8 + 8 + 8;

/// base64url without padding when writing; padding optional when reading.
const TOKEN_TEXT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A secret of the wrong length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Shorter than [`MIN_KEY_LEN`] (its length is given).
    TooShort(usize),
    /// Longer than [`MAX_KEY_LEN`] (its length is given).
    TooLong(usize),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = match self {
            KeyError::TooShort(n) | KeyError::TooLong(n) => n,
        };
        write!(
            f,
            "secret is {n} bytes; it must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes"
        )
    }
}

impl std::error::Error for KeyError {}

fn hmac_key(secret: &[u8]) -> Result<HmacSha256, KeyError> {
    if secret.len() < MIN_KEY_LEN {
        return Err(KeyError::TooShort(secret.len()));
    }
    if secret.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(secret.len()));
    }
    // HMAC takes a key of any length; the bounds above are ours.
    Ok(HmacSha256::new_from_slice(secret).expect("HMAC accepts every key length"))
}

/// The SHA-256 initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];
/// Bytes of a SHA-256 block.
const BLOCK: usize = 64;

/// HMAC-SHA256 with the key's two pad blocks already compressed (RFC 2104:
/// `H(K ^ opad ‖ H(K ^ ipad ‖ m))`, the key zero-padded to a block, as every
/// key here is at most one block). A message of at most 55 bytes then costs
/// exactly two compressions, and [`KeySet::verify_batch`] runs many at once
/// so that they overlap. Checked against the `hmac` crate and RFC 4231.
#[derive(Clone)]
struct Pads {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Pads {
    fn new(secret: &[u8]) -> Pads {
        debug_assert!(secret.len() <= BLOCK);
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, b) in secret.iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let mut inner = SHA256_IV;
        let mut outer = SHA256_IV;
        sha2::compress256(&mut inner, &[GenericArray::from(ipad)]);
        sha2::compress256(&mut outer, &[GenericArray::from(opad)]);
        Pads { inner, outer }
    }
}

/// The last (only) block of a message of `len` <= 55 bytes that follows one
/// block already hashed: the message, 0x80, zeros, the bit length.
fn final_block(block: &mut [u8; BLOCK], len: usize) {
    block[len] = 0x80;
    block[len + 1..BLOCK - 8].fill(0);
    let bits = ((BLOCK + len) as u64) * 8;
    block[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
}

/// One token key: an ID and a secret shared with the application's backend.
/// The HMAC state is keyed once here, so a MAC costs two SHA-256 blocks.
/// `Debug` shows the ID only.
#[derive(Clone)]
pub struct Key {
    id: u32,
    mac: HmacSha256,
    pads: Pads,
}

impl Key {
    /// The key `id` with this secret ([`MIN_KEY_LEN`] to [`MAX_KEY_LEN`] bytes).
    pub fn new(id: u32, secret: &[u8]) -> Result<Key, KeyError> {
        Ok(Key {
            id,
            mac: hmac_key(secret)?,
            pads: Pads::new(secret),
        })
    }

    /// The key's ID, which tokens name.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A token for `pair` (one direction), valid until `expiry` (Unix seconds).
    pub fn issue(&self, pair: Pair, expiry: u64) -> Token {
        let full = self.keyed(self.id, expiry, pair).finalize().into_bytes();
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&full[..MAC_LEN]);
        Token {
            pair,
            key_id: self.id,
            expiry,
            mac,
        }
    }

    /// True when the token's MAC is this key's for the token's fields
    /// (compared in constant time). Does not look at the time.
    pub fn mac_matches(&self, token: &Token) -> bool {
        self.keyed(token.key_id, token.expiry, token.pair)
            .verify_truncated_left(&token.mac)
            .is_ok()
    }

    fn keyed(&self, key_id: u32, expiry: u64, pair: Pair) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(&token_mac_input(key_id, expiry, pair));
        m
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The 28 bytes a token's MAC covers: `key_id ‖ expiry ‖ self_id ‖ peer_id`,
/// big-endian.
pub fn token_mac_input(key_id: u32, expiry: u64, pair: Pair) -> [u8; TOKEN_INPUT_LEN] {
    let mut input = [0u8; TOKEN_INPUT_LEN];
    input[0..4].copy_from_slice(&key_id.to_be_bytes());
    input[4..12].copy_from_slice(&expiry.to_be_bytes());
    input[12..20].copy_from_slice(&pair.self_id.to_be_bytes());
    input[20..28].copy_from_slice(&pair.peer_id.to_be_bytes());
    input
}

/// Issues a token for `pair` with `key`, valid until `expiry` (Unix
/// seconds): the call a backend written in Rust makes. Give each peer the
/// token for its own direction: `(a, b)` to `a`, `(b, a)` to `b`.
///
/// ```
/// use psync::auth::{decode_token, encode_token, issue_token, Key, KeySet};
/// use psync::wire::v2::Pair;
///
/// let key = Key::new(1, b"a secret of 16 bytes or more").unwrap();
/// let token = issue_token(&key, Pair::new(1, 2), 1_700_000_600);
/// let text = encode_token(&token); // what psync-client --token takes
/// assert_eq!(decode_token(&text), Ok(token));
///
/// let keys = KeySet::from_keys([key]).unwrap();
/// assert_eq!(keys.verify(&token, 1_700_000_000), Ok(1));
/// ```
pub fn issue_token(key: &Key, pair: Pair, expiry: u64) -> Token {
    key.issue(pair, expiry)
}

/// Why a token was refused. The server drops the request without a reply
/// (no oracle) and counts it under [`TokenError::label`].
///
/// The checks run in this order, cheapest first: key ID, expiry, MAC. So a
/// forged token that names an unknown key or a past expiry is counted as
/// that, not as a bad MAC. A token for the other direction or another pair
/// is a [`TokenError::BadMac`]: the pair is inside the MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenError {
    /// No key with the token's key ID is loaded (retired, or never known).
    UnknownKey,
    /// The token's expiry is more than [`CLOCK_SKEW_SECS`] in the past.
    Expired,
    /// The MAC is wrong: forged, corrupted, made with another key, or for
    /// another pair or the other direction.
    BadMac,
}

impl TokenError {
    /// Every reason, in [`TokenError::index`] order.
    pub const ALL: [TokenError; 3] = [
        TokenError::UnknownKey,
        TokenError::Expired,
        TokenError::BadMac,
    ];

    /// A short name for counters and metrics labels (`auth_failed{reason=...}`).
    pub const fn label(self) -> &'static str {
        match self {
            TokenError::UnknownKey => "unknown_key",
            TokenError::Expired => "expired",
            TokenError::BadMac => "bad_mac",
        }
    }

    /// A dense index (0, 1, 2) for an array of counters.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::UnknownKey => "token names a key that is not loaded",
            TokenError::Expired => "token has expired",
            TokenError::BadMac => "token MAC does not match (wrong key, pair or direction)",
        })
    }
}

impl std::error::Error for TokenError {}

/// The keys a server accepts tokens from, by ID; several at once so keys can
/// rotate. Built from a key file ([`KeySet::parse`]) or from keys.
///
/// Key file format (`docs/auth.md`): one key per line, `KEY_ID SECRET_HEX`:
/// the ID a decimal number from 0 to 4294967295, the secret 16 to 64 bytes in
/// hex (`openssl rand -hex 32`). Blank lines are skipped; `#` starts a comment
/// anywhere. IDs must be unique; at least one key, at most [`MAX_KEYS`]. The
/// key listed last is the one `psync-token` issues with by default.
#[derive(Clone, Debug)]
pub struct KeySet {
    /// Sorted by ID.
    keys: Vec<Key>,
    /// The ID of the key listed last.
    last: u32,
}

impl KeySet {
    /// The keys given, or `None` if there are none, more than [`MAX_KEYS`],
    /// or two with one ID. The last one given is [`KeySet::last`].
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> Option<KeySet> {
        let mut keys: Vec<Key> = keys.into_iter().collect();
        let last = keys.last()?.id;
        if keys.len() > MAX_KEYS {
            return None;
        }
        keys.sort_by_key(|k| k.id);
        if keys.windows(2).any(|w| w[0].id == w[1].id) {
            return None;
        }
        Some(KeySet { keys, last })
    }

    /// Parses a key file's text. Errors name the line and never quote a
    /// secret.
    pub fn parse(text: &str) -> Result<KeySet, KeyFileError> {
        let mut keys: Vec<(usize, Key)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or_default();
            let mut words = content.split_whitespace();
            let (Some(id_text), Some(secret_hex), None) =
                (words.next(), words.next(), words.next())
            else {
                let found = content.split_whitespace().count();
                if found == 0 {
                    continue;
                }
                return Err(KeyFileError::Fields { line, found });
            };
            let id = parse_key_id(id_text).ok_or_else(|| KeyFileError::BadId {
                line,
                text: id_text.chars().take(20).collect(),
            })?;
            let secret = decode_hex(secret_hex).ok_or(KeyFileError::BadHex { line, id })?;
            let key = Key::new(id, &secret).map_err(|_| KeyFileError::BadLength {
                line,
                id,
                len: secret.len(),
            })?;
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.id == id) {
                return Err(KeyFileError::DuplicateId {
                    line,
                    id,
                    first: *first,
                });
            }
            if keys.len() == MAX_KEYS {
                return Err(KeyFileError::TooMany { line });
            }
            keys.push((line, key));
        }
        KeySet::from_keys(keys.into_iter().map(|(_, k)| k)).ok_or(KeyFileError::Empty)
    }

    /// The key with this ID.
    pub fn get(&self, id: u32) -> Option<&Key> {
        self.keys
            .binary_search_by_key(&id, |k| k.id)
            .ok()
            .map(|i| &self.keys[i])
    }

    /// The key listed last in the file: the newest by convention, and the
    /// one to issue with unless told otherwise.
    pub fn last(&self) -> &Key {
        self.get(self.last).expect("the last key is in the set")
    }

    /// The key IDs, in increasing order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    /// How many keys there are (at least one).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a key set has at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a token at time `now` (Unix seconds): its key is loaded, it has
    /// not expired (allowing [`CLOCK_SKEW_SECS`]), and its MAC matches. On
    /// success returns the key ID that signed it. Costs one binary search and,
    /// past the cheap checks, two SHA-256 blocks; allocates nothing.
    pub fn verify(&self, token: &Token, now: u64) -> Result<u32, TokenError> {
        // The cheap refusals without the batch's scratch.
        self.precheck(token, now)?;
        let mut result = Err(TokenError::BadMac);
        self.verify_batch(1, |_| token, now, |_, r| result = r);
        result
    }

    /// [`KeySet::verify`] for `n` tokens (`token(k)` gives the k-th), calling
    /// `done(k, result)` for each, in order. The same results, at about half
    /// the cost per token: an HMAC is two SHA-256 compressions, the second
    /// waiting for the first, and here the compressions of up to
    /// [`VERIFY_LANES`] tokens are issued side by side so that the CPU
    /// overlaps them (measured: `cargo bench --bench auth`). Allocates
    /// nothing; MACs are compared in constant time.
    pub fn verify_batch<'t>(
        &self,
        n: usize,
        token: impl Fn(usize) -> &'t Token,
        now: u64,
        mut done: impl FnMut(usize, Result<u32, TokenError>),
    ) {
        let mut base = 0;
        while base < n {
            let m = (n - base).min(VERIFY_LANES);
            let mut state = [[0u32; 8]; VERIFY_LANES];
            let mut block = [GenericArray::from([0u8; BLOCK]); VERIFY_LANES];
            let mut keys: [Result<&Key, TokenError>; VERIFY_LANES] =
                [Err(TokenError::BadMac); VERIFY_LANES];
            for k in 0..m {
                let t = token(base + k);
                keys[k] = self.precheck(t, now);
                if let Ok(key) = keys[k] {
                    let input = token_mac_input(t.key_id, t.expiry, t.pair);
                    let b: &mut [u8; BLOCK] = block[k].as_mut();
                    b[..input.len()].copy_from_slice(&input);
                    final_block(b, input.len());
                    state[k] = key.pads.inner;
                }
            }
            for k in 0..m {
                if keys[k].is_ok() {
                    sha2::compress256(&mut state[k], std::slice::from_ref(&block[k]));
                }
            }
            for k in 0..m {
                if let Ok(key) = keys[k] {
                    let b: &mut [u8; BLOCK] = block[k].as_mut();
                    for (i, w) in state[k].iter().enumerate() {
                        b[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
                    }
                    final_block(b, 32);
                    state[k] = key.pads.outer;
                }
            }
            for k in 0..m {
                if keys[k].is_ok() {
                    sha2::compress256(&mut state[k], std::slice::from_ref(&block[k]));
                }
            }
            for k in 0..m {
                let result = keys[k].and_then(|key| {
                    let mut mac = [0u8; 32];
                    for (i, w) in state[k].iter().enumerate() {
                        mac[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
                    }
                    if bool::from(mac[..MAC_LEN].ct_eq(&token(base + k).mac)) {
                        Ok(key.id)
                    } else {
                        Err(TokenError::BadMac)
                    }
                });
                done(base + k, result);
            }
            base += m;
        }
    }

    /// The cheap checks, in order: the key is loaded, the token has not
    /// expired (allowing [`CLOCK_SKEW_SECS`]).
    fn precheck(&self, token: &Token, now: u64) -> Result<&Key, TokenError> {
        let key = self.get(token.key_id).ok_or(TokenError::UnknownKey)?;
        if now > token.expiry.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::Expired);
        }
        Ok(key)
    }
}

/// Tokens whose MACs [`KeySet::verify_batch`] computes side by side. Past a
/// few, more lanes gain nothing (the CPU overlaps only so much); 16 keeps
/// the scratch (1.5 KiB) on the stack.
pub const VERIFY_LANES: usize = 16;

/// What is wrong with a key file, and on which line (counted from 1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// A line that is neither blank, a comment, nor `KEY_ID SECRET_HEX`.
    #[error("line {line}: expected 'KEY_ID SECRET_HEX', found {found} fields")]
    Fields {
        /// The line.
        line: usize,
        /// How many whitespace-separated words it has.
        found: usize,
    },
    /// A key ID that is not a decimal number in range.
    #[error("line {line}: key ID '{text}' is not a whole number from 0 to 4294967295")]
    BadId {
        /// The line.
        line: usize,
        /// The ID as written (at most 20 characters of it).
        text: String,
    },
    /// A secret that is not hex (the secret itself is not repeated).
    #[error("line {line}: the secret of key {id} is not hex (an even number of 0-9, a-f; `openssl rand -hex 32` makes one)")]
    BadHex {
        /// The line.
        line: usize,
        /// The key's ID.
        id: u32,
    },
    /// A secret outside [`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] bytes.
    #[error("line {line}: the secret of key {id} is {len} bytes; it must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes")]
    BadLength {
        /// The line.
        line: usize,
        /// The key's ID.
        id: u32,
        /// The secret's length in bytes.
        len: usize,
    },
    /// Two keys with one ID.
    #[error("line {line}: key ID {id} is already used on line {first}")]
    DuplicateId {
        /// The line of the second use.
        line: usize,
        /// The ID.
        id: u32,
        /// The line of the first use.
        first: usize,
    },
    /// More than [`MAX_KEYS`] keys.
    #[error("line {line}: more than {MAX_KEYS} keys")]
    TooMany {
        /// The line of the first key too many.
        line: usize,
    },
    /// No key at all.
    #[error("no keys: the file has no 'KEY_ID SECRET_HEX' line")]
    Empty,
}

fn parse_key_id(s: &str) -> Option<u32> {
    // Digits only: u32::from_str would also take a leading '+'.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    s.as_bytes()
        .chunks_exact(2)
        .map(|d| Some((digit(d[0])? * 16 + digit(d[1])?) as u8))
        .collect()
}

/// The text form of a token, what `psync-client --token` takes and
/// `psync-token` prints: its [`TOKEN_LEN`] bytes (pair, key ID, expiry, MAC,
/// as in the request) in base64url without padding, [`TOKEN_TEXT_LEN`]
/// characters. It is a credential: whoever holds it can register as that
/// half of the pair until it expires.
pub fn encode_token(token: &Token) -> String {
    TOKEN_TEXT.encode(token.to_bytes())
}

/// Reads a token's text form; surrounding whitespace and `=` padding are
/// allowed. The MAC is not checked here (the server does that).
pub fn decode_token(text: &str) -> Result<Token, TokenTextError> {
    let bytes = TOKEN_TEXT
        .decode(text.trim())
        .map_err(|_| TokenTextError::NotBase64)?;
    let bytes: &[u8; TOKEN_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| TokenTextError::BadLength(bytes.len()))?;
    let token = Token::from_bytes(bytes);
    if token.pair.is_self_pair() {
        return Err(TokenTextError::SelfPair);
    }
    Ok(token)
}

/// Why a token's text could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenTextError {
    /// Not base64url.
    #[error("token is not base64url text (A-Z, a-z, 0-9, '-', '_')")]
    NotBase64,
    /// Decodes to the wrong number of bytes (given).
    #[error(
        "token decodes to {0} bytes, not {TOKEN_LEN}: is it cut short or from another program?"
    )]
    BadLength(usize),
    /// Names the same ID twice.
    #[error("token is for a pair whose two IDs are equal")]
    SelfPair,
}

/// The server's secret for address-validation cookies. Random per server
/// process unless configured; servers of a cluster share one so a cookie
/// from one is good at another (when the client's NAT shows them the same
/// address). `Debug` shows nothing of it.
#[derive(Clone)]
pub struct CookieSecret {
    mac: HmacSha256,
}

/// Why a cookie was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CookieError {
    /// Made in an epoch other than the current or the previous one.
    Stale,
    /// Not made by this secret for this address (forged, or the client's
    /// address changed).
    BadMac,
}

impl CookieSecret {
    /// A cookie secret of [`MIN_KEY_LEN`] to [`MAX_KEY_LEN`] bytes. A server
    /// draws 32 random bytes at start unless one is configured.
    pub fn new(secret: &[u8]) -> Result<CookieSecret, KeyError> {
        Ok(CookieSecret {
            mac: hmac_key(secret)?,
        })
    }

    /// The epoch number of time `now` (Unix seconds). Wraps after 2^32
    /// epochs (8,000 years), which only the equality test below sees.
    pub fn epoch(now: u64) -> u32 {
        (now / COOKIE_EPOCH_SECS) as u32
    }

    /// The cookie for a client at `client`, at time `now`: the epoch (u32,
    /// big-endian) then the first 12 bytes of
    /// `HMAC-SHA256(secret, label ‖ epoch ‖ family ‖ ip[16] ‖ port)`.
    pub fn issue(&self, client: SocketAddr, now: u64) -> Cookie {
        let epoch = CookieSecret::epoch(now);
        let mut bytes = [0u8; COOKIE_LEN];
        bytes[..COOKIE_EPOCH_LEN].copy_from_slice(&epoch.to_be_bytes());
        let mac = self.keyed(epoch, client).finalize().into_bytes();
        bytes[COOKIE_EPOCH_LEN..].copy_from_slice(&mac[..COOKIE_LEN - COOKIE_EPOCH_LEN]);
        // All zero means "no cookie" on the wire. Only epoch 0 (the first
        // minute of 1970) with a zero MAC (chance 2^-96) could give that; a
        // wrong byte then makes it fail verification, which costs a retry.
        Cookie::new(bytes).unwrap_or_else(|| {
            bytes[COOKIE_LEN - 1] = 1;
            Cookie::new(bytes).expect("nonzero")
        })
    }

    /// Checks a cookie from `client` at time `now`: made in this epoch or
    /// the previous one, for this address, by this secret (constant-time
    /// comparison). Allocates nothing.
    pub fn verify(&self, cookie: &Cookie, client: SocketAddr, now: u64) -> Result<(), CookieError> {
        let bytes = cookie.as_bytes();
        let mut epoch_bytes = [0u8; COOKIE_EPOCH_LEN];
        epoch_bytes.copy_from_slice(&bytes[..COOKIE_EPOCH_LEN]);
        let epoch = u32::from_be_bytes(epoch_bytes);
        let current = CookieSecret::epoch(now);
        if epoch != current && epoch.wrapping_add(1) != current {
            return Err(CookieError::Stale);
        }
        self.keyed(epoch, client)
            .verify_truncated_left(&bytes[COOKIE_EPOCH_LEN..])
            .map_err(|_| CookieError::BadMac)
    }

    fn keyed(&self, epoch: u32, client: SocketAddr) -> HmacSha256 {
        // An IPv4 client seen through a dual-stack socket (::ffff:a.b.c.d)
        // gets the same cookie as through an IPv4 socket.
        let (family, ip) = match client.ip().to_canonical() {
            IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (6u8, v6.octets()),
        };
        let mut m = self.mac.clone();
        m.update(COOKIE_LABEL);
        m.update(&epoch.to_be_bytes());
        m.update(&[family]);
        m.update(&ip);
        m.update(&client.port().to_be_bytes());
        m
    }
}

impl fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        decode_hex(s).unwrap()
    }

    /// `HMAC-SHA256(key, data)` through the same keyed-state path the token
    /// code uses, checked against RFC 4231 test case 4 (25-byte key).
    #[test]
    fn hmac_is_rfc_4231_hmac_sha256() {
        let key: Vec<u8> = (1..=25).collect();
        let mut m = hmac_key(&key).unwrap().clone();
        m.update(&[0xcd; 50]);
        let want = hex("82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
        assert_eq!(m.finalize().into_bytes()[..], want[..]);
        // The same through the pads the batched verification uses.
        let pads = Pads::new(&key);
        let mut block = [0u8; BLOCK];
        block[..50].fill(0xcd);
        final_block(&mut block, 50);
        let mut state = pads.inner;
        sha2::compress256(&mut state, &[GenericArray::from(block)]);
        let mut block = [0u8; BLOCK];
        for (i, w) in state.iter().enumerate() {
            block[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
        }
        final_block(&mut block, 32);
        let mut state = pads.outer;
        sha2::compress256(&mut state, &[GenericArray::from(block)]);
        let got: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(got, want);
    }

    /// The first vector of contrib/token/vectors.txt and PROTOCOL.md (all of
    /// them are checked by tests/auth_python.rs; this one also by `openssl
    /// dgst -sha256 -mac HMAC`).
    #[test]
    fn token_vector() {
        let key = Key::new(1, &(0u8..32).collect::<Vec<_>>()).unwrap();
        let pair = Pair::new(1, 2);
        assert_eq!(
            token_mac_input(1, 1_700_000_000, pair)[..],
            hex("00000001000000006553f10000000000000000010000000000000002")[..]
        );
        let token = issue_token(&key, pair, 1_700_000_000);
        assert_eq!(token.mac[..], hex("5eef484269cadfbae5ed57358c7b19d4")[..]);
        assert_eq!(
            encode_token(&token),
            "AAAAAAAAAAEAAAAAAAAAAgAAAAEAAAAAZVPxAF7vSEJpyt-65e1XNYx7GdQ"
        );
    }

    fn keys() -> KeySet {
        KeySet::from_keys([
            Key::new(1, &[1; 32]).unwrap(),
            Key::new(2, &[2; 16]).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn verify_tells_the_reasons_apart() {
        let keys = keys();
        let now = 1_700_000_000;
        let pair = Pair::new(10, 20);
        let good = keys.get(1).unwrap().issue(pair, now + 60);
        assert_eq!(keys.verify(&good, now), Ok(1));
        // Expired, within and beyond the skew allowance.
        assert_eq!(keys.verify(&good, now + 60 + CLOCK_SKEW_SECS), Ok(1));
        assert_eq!(
            keys.verify(&good, now + 61 + CLOCK_SKEW_SECS),
            Err(TokenError::Expired)
        );
        // The other direction, another pair: bad MAC by construction.
        let reversed = Token {
            pair: pair.counterpart(),
            ..good
        };
        assert_eq!(keys.verify(&reversed, now), Err(TokenError::BadMac));
        let other = Token {
            pair: Pair::new(10, 21),
            ..good
        };
        assert_eq!(keys.verify(&other, now), Err(TokenError::BadMac));
        // A longer life, or another key's ID, breaks the MAC too.
        let stretched = Token {
            expiry: good.expiry + 1,
            ..good
        };
        assert_eq!(keys.verify(&stretched, now), Err(TokenError::BadMac));
        let renamed = Token { key_id: 2, ..good };
        assert_eq!(keys.verify(&renamed, now), Err(TokenError::BadMac));
        // Each bit of the MAC matters.
        for i in 0..MAC_LEN * 8 {
            let mut t = good;
            t.mac[i / 8] ^= 1 << (i % 8);
            assert_eq!(keys.verify(&t, now), Err(TokenError::BadMac));
        }
        let unknown = Token { key_id: 3, ..good };
        assert_eq!(keys.verify(&unknown, now), Err(TokenError::UnknownKey));
        // Expiry at u64::MAX does not overflow.
        let forever = keys.get(2).unwrap().issue(pair, u64::MAX);
        assert_eq!(keys.verify(&forever, u64::MAX), Ok(2));
        assert_eq!(
            TokenError::ALL.map(TokenError::index),
            [0, 1, 2],
            "index is dense"
        );
    }

    #[test]
    fn key_lengths() {
        assert_eq!(Key::new(0, &[0; 15]).err(), Some(KeyError::TooShort(15)));
        assert!(Key::new(0, &[0; 16]).is_ok());
        assert!(Key::new(0, &[0; 64]).is_ok());
        assert_eq!(Key::new(0, &[0; 65]).err(), Some(KeyError::TooLong(65)));
        assert_eq!(
            format!("{:?}", Key::new(9, &[7; 16]).unwrap()),
            "Key { id: 9, .. }"
        );
    }

    const K16: &str = "000102030405060708090a0b0c0d0e0f";

    #[test]
    fn key_file_parses() {
        let text = format!(
            "# psync keys\n\n  7 {K16}  # old\r\n3 {}\n",
            "AB".repeat(32)
        );
        let set = KeySet::parse(&text).unwrap();
        assert_eq!(set.ids().collect::<Vec<_>>(), [3, 7]);
        assert_eq!(set.last().id(), 3, "the key listed last");
        assert_eq!(set.len(), 2);
        let t = set.get(7).unwrap().issue(Pair::new(1, 2), 100);
        assert_eq!(
            t,
            Key::new(7, &hex(K16)).unwrap().issue(Pair::new(1, 2), 100)
        );
    }

    #[test]
    fn key_file_errors_name_the_line() {
        let cases: [(String, KeyFileError); 9] = [
            (String::new(), KeyFileError::Empty),
            ("# only a comment\n\n".into(), KeyFileError::Empty),
            (
                format!("1 {K16}\n1\n"),
                KeyFileError::Fields { line: 2, found: 1 },
            ),
            (
                format!("1 {K16} extra\n"),
                KeyFileError::Fields { line: 1, found: 3 },
            ),
            (
                format!("\n-1 {K16}\n"),
                KeyFileError::BadId {
                    line: 2,
                    text: "-1".into(),
                },
            ),
            (
                format!("4294967296 {K16}\n"),
                KeyFileError::BadId {
                    line: 1,
                    text: "4294967296".into(),
                },
            ),
            (
                format!("5 {K16}0\n"),
                KeyFileError::BadHex { line: 1, id: 5 },
            ),
            (
                "5 00112233445566778899aabbccddee\n".into(),
                KeyFileError::BadLength {
                    line: 1,
                    id: 5,
                    len: 15,
                },
            ),
            (
                format!("5 {K16}\n# c\n5 {K16}\n"),
                KeyFileError::DuplicateId {
                    line: 3,
                    id: 5,
                    first: 1,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(KeySet::parse(&text).err(), Some(want), "{text:?}");
        }
        let too_long = format!("1 {}\n", "00".repeat(65));
        assert_eq!(
            KeySet::parse(&too_long).err(),
            Some(KeyFileError::BadLength {
                line: 1,
                id: 1,
                len: 65
            })
        );
        let secret = "zz".repeat(16);
        let msg = KeySet::parse(&format!("1 {secret}"))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("line 1: "), "{msg}");
        assert!(
            !msg.contains(&secret),
            "an error must not quote a secret: {msg}"
        );
        let many: String = (0..=MAX_KEYS).map(|i| format!("{i} {K16}\n")).collect();
        assert_eq!(
            KeySet::parse(&many).err(),
            Some(KeyFileError::TooMany { line: MAX_KEYS + 1 })
        );
        assert!(KeySet::from_keys([]).is_none());
        let dup = [
            Key::new(1, &[1; 16]).unwrap(),
            Key::new(1, &[2; 16]).unwrap(),
        ];
        assert!(KeySet::from_keys(dup).is_none());
    }

    #[test]
    fn token_text_round_trips() {
        let key = Key::new(u32::MAX, &[9; 20]).unwrap();
        let token = key.issue(Pair::new(u64::MAX, 0), u64::MAX);
        let text = encode_token(&token);
        assert_eq!(text.len(), TOKEN_TEXT_LEN);
        assert_eq!(TOKEN_TEXT_LEN, 59);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(decode_token(&text), Ok(token));
        assert_eq!(decode_token(&format!("  {text}=\n")), Ok(token));
        assert_eq!(
            decode_token(&text[..56]),
            Err(TokenTextError::BadLength(42))
        );
        assert_eq!(decode_token("not base64!"), Err(TokenTextError::NotBase64));
        let plus = text.replacen(|c: char| c.is_ascii_alphanumeric(), "+", 1);
        assert_eq!(decode_token(&plus), Err(TokenTextError::NotBase64));
        let selfish = key.issue(Pair::new(5, 5), 1);
        assert_eq!(
            decode_token(&encode_token(&selfish)),
            Err(TokenTextError::SelfPair)
        );
    }

    #[test]
    fn cookies() {
        let secret = CookieSecret::new(&[42; 32]).unwrap();
        let other = CookieSecret::new(&[43; 32]).unwrap();
        let client: SocketAddr = "198.51.100.7:4949".parse().unwrap();
        let t0 = 1_700_000_000 / COOKIE_EPOCH_SECS * COOKIE_EPOCH_SECS; // an epoch's start
        let c = secret.issue(client, t0);
        assert_eq!(c.as_bytes()[..4], CookieSecret::epoch(t0).to_be_bytes());
        assert_eq!(
            c,
            secret.issue(client, t0 + COOKIE_EPOCH_SECS - 1),
            "one epoch, one cookie"
        );
        // Valid for the rest of its epoch and all of the next one.
        assert_eq!(secret.verify(&c, client, t0), Ok(()));
        assert_eq!(
            secret.verify(&c, client, t0 + 2 * COOKIE_EPOCH_SECS - 1),
            Ok(())
        );
        assert_eq!(
            secret.verify(&c, client, t0 + 2 * COOKIE_EPOCH_SECS),
            Err(CookieError::Stale)
        );
        assert_eq!(secret.verify(&c, client, t0 - 1), Err(CookieError::Stale));
        // Bound to the IP, the port and the secret.
        for moved in [
            "198.51.100.8:4949",
            "198.51.100.7:4950",
            "[2001:db8::7]:4949",
        ] {
            assert_eq!(
                secret.verify(&c, moved.parse().unwrap(), t0),
                Err(CookieError::BadMac),
                "{moved}"
            );
        }
        assert_eq!(other.verify(&c, client, t0), Err(CookieError::BadMac));
        // The same IPv4 client through a dual-stack socket.
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:4949".parse().unwrap();
        assert_eq!(secret.verify(&c, mapped, t0), Ok(()));
        // A forged epoch is caught by the MAC.
        let mut bytes = *c.as_bytes();
        bytes[3] ^= 1;
        let forged = Cookie::new(bytes).unwrap();
        let now = u64::from(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            * COOKIE_EPOCH_SECS;
        assert_eq!(
            secret.verify(&forged, client, now),
            Err(CookieError::BadMac)
        );
        assert!(CookieSecret::new(&[0; 15]).is_err());
        assert_eq!(format!("{secret:?}"), "CookieSecret(..)");
    }

    /// The batched verification (two compressions from precomputed pads)
    /// agrees with the `hmac` crate for keys of every allowed length and any
    /// token, alone and in batches that mix every failure.
    #[test]
    fn batched_verification_agrees_with_the_hmac_crate() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::default();
        runner
            .run(
                &(
                    proptest::collection::vec(any::<u8>(), MIN_KEY_LEN..=MAX_KEY_LEN),
                    any::<u32>(),
                    any::<u64>(),
                    any::<u64>(),
                    any::<u64>(),
                    any::<[u8; MAC_LEN]>(),
                ),
                |(secret, id, expiry, a, b, junk)| {
                    let key = Key::new(id, &secret).unwrap();
                    let keys = KeySet::from_keys([key.clone()]).unwrap();
                    let good = key.issue(Pair::new(a, b), expiry);
                    prop_assert!(key.mac_matches(&good));
                    prop_assert_eq!(keys.verify(&good, 0), Ok(id));
                    let forged = Token { mac: junk, ..good };
                    let want = if key.mac_matches(&forged) {
                        Ok(id)
                    } else {
                        Err(TokenError::BadMac)
                    };
                    prop_assert_eq!(keys.verify(&forged, 0), want);
                    Ok(())
                },
            )
            .unwrap();

        // A batch longer than the lanes, with every outcome, in order.
        let keys = keys();
        let now = 1_700_000_000;
        let mut tokens = Vec::new();
        for i in 0..(3 * VERIFY_LANES as u64 + 5) {
            let pair = Pair::new(i, i + 1);
            let key = keys.get(1 + (i % 2) as u32).unwrap();
            let mut t = key.issue(pair, now + 10);
            match i % 5 {
                1 => t.mac[3] ^= 4,
                2 => t.key_id = 99,
                3 => t.expiry = now - 31,
                4 => t.pair = pair.counterpart(),
                _ => {}
            }
            tokens.push(t);
        }
        let mut got = Vec::new();
        keys.verify_batch(tokens.len(), |k| &tokens[k], now, |k, r| got.push((k, r)));
        let want: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(k, t)| (k, keys.verify(t, now)))
            .collect();
        assert_eq!(got, want);
        for (k, r) in &got {
            let expected = match k % 5 {
                0 => Ok(1 + (*k % 2) as u32),
                2 => Err(TokenError::UnknownKey),
                3 => Err(TokenError::Expired),
                _ => Err(TokenError::BadMac),
            };
            assert_eq!(*r, expected, "token {k}");
        }
    }
}
