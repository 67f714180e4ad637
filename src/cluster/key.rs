//! The cluster key: the secret every member shares, which makes and checks
//! the MAC that ends every cluster datagram.
//!
//! ```text
//! mac = HMAC-SHA256(key, datagram[..len - 16])[..16]
//! ```
//!
//! The key file (`--cluster-key-file`, never the command line, where `ps`
//! would show it) holds one or more secrets in hex, one a line, 16 to 64
//! bytes each (`openssl rand -hex 32`); blank lines and `#` comments are
//! skipped. A member seals with the first and accepts any of them, so a key
//! rotates without a flag day: add the new key second everywhere, then
//! move it first everywhere, then remove the old one (each step a rolling
//! restart: the key file is read at start only). MACs are compared in
//! constant time.
//!
//! Pure: the caller reads the file.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::cluster::MAC_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Longest secret: one SHA-256 block.
pub const MAX_KEY_LEN: usize = 64;
/// Most secrets in a key file: rotation needs two.
pub const MAX_KEYS: usize = 4;

/// The keyed MAC states, the sealing one first. `Debug` shows no secret.
#[derive(Clone)]
pub struct ClusterKey {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} secrets)", self.keys.len())
    }
}

/// What is wrong with a key file; never quotes a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// No secret at all.
    #[error("no key: the file must hold a secret in hex (`openssl rand -hex 32` makes one)")]
    Empty,
    /// A line that is not hex.
    #[error("line {line}: the secret is not hex (an even number of 0-9, a-f; `openssl rand -hex 32` makes one)")]
    BadHex {
        /// The line, from 1.
        line: usize,
    },
    /// A secret of the wrong length.
    #[error(
        "line {line}: the secret is {len} bytes; it must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes"
    )]
    BadLength {
        /// The line, from 1.
        line: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// More than [`MAX_KEYS`] secrets.
    #[error("line {line}: more than {MAX_KEYS} secrets")]
    TooMany {
        /// The line of the first secret too many.
        line: usize,
    },
}

impl ClusterKey {
    /// A key from secrets, the first sealing; each must be
    /// [`MIN_KEY_LEN`] to [`MAX_KEY_LEN`] bytes. `Err` gives the index and
    /// length of the first bad one, or `(0, 0)` for none at all.
    pub fn new(secrets: &[&[u8]]) -> Result<ClusterKey, (usize, usize)> {
        if secrets.is_empty() || secrets.len() > MAX_KEYS {
            return Err((secrets.len(), 0));
        }
        let mut keys = Vec::with_capacity(secrets.len());
        for (i, s) in secrets.iter().enumerate() {
            if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&s.len()) {
                return Err((i, s.len()));
            }
            keys.push(HmacSha256::new_from_slice(s).expect("HMAC takes any key length"));
        }
        Ok(ClusterKey { keys })
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<ClusterKey, KeyFileError> {
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let secret = decode_hex(content).ok_or(KeyFileError::BadHex { line })?;
            if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&secret.len()) {
                return Err(KeyFileError::BadLength {
                    line,
                    len: secret.len(),
                });
            }
            if secrets.len() == MAX_KEYS {
                return Err(KeyFileError::TooMany { line });
            }
            secrets.push(secret);
        }
        let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
        ClusterKey::new(&refs).map_err(|_| KeyFileError::Empty)
    }

    /// How many secrets are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a key has at least one secret.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Writes the MAC of `datagram[..len - MAC_LEN]` into its last
    /// [`MAC_LEN`] bytes, with the first secret. Two SHA-256 blocks for a
    /// forward of a seed request; never allocates.
    ///
    /// # Panics
    /// If `datagram` is shorter than [`MAC_LEN`].
    pub fn seal(&self, datagram: &mut [u8]) {
        let (signed, mac) = datagram.split_at_mut(datagram.len() - MAC_LEN);
        let mut m = self.keys[0].clone();
        m.update(signed);
        mac.copy_from_slice(&m.finalize().into_bytes()[..MAC_LEN]);
    }

    /// True when `mac` is the MAC of `signed` under any of the secrets
    /// (compared in constant time).
    pub fn verify(&self, signed: &[u8], mac: &[u8; MAC_LEN]) -> bool {
        self.keys.iter().any(|k| {
            let mut m = k.clone();
            m.update(signed);
            m.verify_truncated_left(mac).is_ok()
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cluster::tests::{
        forward_message, heartbeat_message, reply_message, FORWARD_FIXTURE, HEARTBEAT_FIXTURE,
        REPLY_FIXTURE,
    };
    use crate::wire::cluster::MAX_LEN;

    pub(crate) fn test_key() -> ClusterKey {
        let secret: Vec<u8> = (0u8..32).collect();
        ClusterKey::new(&[&secret]).unwrap()
    }

    #[test]
    fn the_fixtures_are_sealed_with_the_test_key() {
        let key = test_key();
        for (msg, fixture) in [
            (forward_message(), &FORWARD_FIXTURE[..]),
            (reply_message(), &REPLY_FIXTURE[..]),
            (heartbeat_message(), &HEARTBEAT_FIXTURE[..]),
        ] {
            let mut buf = [0u8; MAX_LEN];
            let n = msg.emit(&mut buf).unwrap();
            key.seal(&mut buf[..n]);
            assert_eq!(&buf[..n], fixture, "{:?}", msg.kind());
            let (signed, mac) = fixture.split_at(n - MAC_LEN);
            assert!(key.verify(signed, mac.try_into().unwrap()));
        }
    }

    #[test]
    fn any_change_breaks_the_mac() {
        let key = test_key();
        let n = FORWARD_FIXTURE.len();
        for i in 0..n {
            let mut d = FORWARD_FIXTURE;
            d[i] ^= 1;
            let (signed, mac) = d.split_at(n - MAC_LEN);
            assert!(!key.verify(signed, mac.try_into().unwrap()), "byte {i}");
        }
        let other = ClusterKey::new(&[&[7u8; 16]]).unwrap();
        let (signed, mac) = FORWARD_FIXTURE.split_at(n - MAC_LEN);
        assert!(!other.verify(signed, mac.try_into().unwrap()));
        assert!(!key.verify(signed, &[0; MAC_LEN]));
    }

    #[test]
    fn rotation_accepts_the_second_secret() {
        let old: Vec<u8> = (0u8..32).collect();
        let new = [9u8; 32];
        let rotating = ClusterKey::new(&[&new, &old]).unwrap();
        let (signed, mac) = FORWARD_FIXTURE.split_at(FORWARD_FIXTURE.len() - MAC_LEN);
        assert!(rotating.verify(signed, mac.try_into().unwrap()));
        let mut d = FORWARD_FIXTURE;
        rotating.seal(&mut d);
        assert_ne!(d, FORWARD_FIXTURE, "seals with the first secret");
        let (signed, mac) = d.split_at(d.len() - MAC_LEN);
        assert!(!test_key().verify(signed, mac.try_into().unwrap()));
    }

    #[test]
    fn key_files() {
        let hex32 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let k = ClusterKey::parse(&format!("# cluster key\n\n  {hex32}  # current\n")).unwrap();
        assert_eq!(k.len(), 1);
        let (signed, mac) = FORWARD_FIXTURE.split_at(FORWARD_FIXTURE.len() - MAC_LEN);
        assert!(k.verify(signed, mac.try_into().unwrap()));
        assert_eq!(ClusterKey::parse("").err(), Some(KeyFileError::Empty));
        assert_eq!(
            ClusterKey::parse("# nothing\n").err(),
            Some(KeyFileError::Empty)
        );
        assert_eq!(
            ClusterKey::parse("\n0011223344556677889900112233445\n").err(),
            Some(KeyFileError::BadHex { line: 2 })
        );
        assert_eq!(
            ClusterKey::parse("zz").err(),
            Some(KeyFileError::BadHex { line: 1 })
        );
        assert_eq!(
            ClusterKey::parse("00112233445566778899aabbccddee").err(),
            Some(KeyFileError::BadLength { line: 1, len: 15 })
        );
        assert_eq!(
            ClusterKey::parse(&"ab".repeat(65)).err(),
            Some(KeyFileError::BadLength { line: 1, len: 65 })
        );
        let five = format!("{hex32}\n").repeat(5);
        assert_eq!(
            ClusterKey::parse(&five).err(),
            Some(KeyFileError::TooMany { line: 5 })
        );
        // Errors never quote the secret.
        let e = ClusterKey::parse("00112233445566778899aabbccddeeXX").unwrap_err();
        assert!(!e.to_string().contains("0011"), "{e}");
        assert!(!format!("{k:?}").contains("00"));
    }
}
