//! The request format a run speaks: the seed format's 8 bytes, or protocol
//! v2 with a token for every request (`--auth-key-file`), so that v2 can be
//! load-tested against the server's admission gate.
//!
//! A v2 request carries 64-bit IDs: the pair's 32-bit IDs (see `pairs`) in
//! the low half and a number drawn per run in the high half, and a token
//! issued with the key file's last key ([`psync::auth::KeySet::last`]),
//! valid until the run is long over. Issuing costs one HMAC per request on
//! the load generator's side (about 0.3 µs), which its CPU figure includes.
//! A v2 reply is checked as the seed reply is (partner, ports), and also for
//! the asker's pair and its own address (`your_addr`).

use std::net::SocketAddr;

use psync::auth::Key;
use psync::wire::v2;
use psync::wire::{Reply, Request};

use crate::pairs::Wrong;

/// Bytes of the longest request sent.
pub const MAX_REQUEST: usize = v2::REQUEST_LEN;

/// What a run sends and expects back.
#[derive(Clone, Debug)]
pub enum Format {
    /// 8-byte requests, 20/32-byte replies.
    Seed,
    /// 152-byte v2 requests with tokens, 152-byte replies.
    V2 {
        /// The key tokens are issued with.
        key: Box<Key>,
        /// The tokens' expiry, Unix seconds.
        expiry: u64,
        /// The high 32 bits of every ID of this run.
        high: u64,
    },
}

impl Format {
    /// The 64-bit v2 pair standing for the seed-format `req`.
    fn pair(high: u64, req: &Request) -> v2::Pair {
        v2::Pair::new(
            high << 32 | u64::from(req.self_id.to_u32()),
            high << 32 | u64::from(req.peer_id.to_u32()),
        )
    }

    /// Writes the request standing for `req` into `buf`; returns its length.
    pub fn encode(&self, req: &Request, buf: &mut [u8; MAX_REQUEST]) -> usize {
        match self {
            Format::Seed => {
                let b = req.emit();
                buf[..b.len()].copy_from_slice(&b);
                b.len()
            }
            Format::V2 { key, expiry, high } => v2::Request {
                token: key.issue(Format::pair(*high, req), *expiry),
                cookie: None,
                info: v2::ClientInfo::UNKNOWN,
                candidates: v2::Candidates::EMPTY,
            }
            .emit(buf),
        }
    }

    /// Reads a reply that arrived at `at` (whole: `len` is its real length)
    /// as the seed-format reply it stands for, or says what is wrong with it.
    pub fn decode(&self, data: &[u8], len: usize, at: SocketAddr) -> Result<Reply, Wrong> {
        if len != data.len() {
            return Err(Wrong::Malformed);
        }
        match self {
            Format::Seed => Reply::parse(data).map_err(|_| Wrong::Malformed),
            Format::V2 { high, .. } => {
                // A cookie reply means the server runs with a rate limit:
                // not a load test's setting, and not a reply.
                let r = v2::Reply::parse(data).map_err(|_| Wrong::Malformed)?;
                if r.your_addr != at
                    || r.pair.self_id >> 32 != *high
                    || r.pair.peer_id >> 32 != *high
                {
                    return Err(Wrong::NotOurs);
                }
                Ok(Reply {
                    src_port: r.src_port,
                    dst_port: r.dst_port,
                    peer: r.peer,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psync::wire::PeerId;

    #[test]
    fn v2_requests_carry_a_valid_token_and_replies_are_checked() {
        let key = Key::new(3, &[1; 32]).unwrap();
        let f = Format::V2 {
            key: Box::new(key.clone()),
            expiry: 2_000_000_000,
            high: 0xabcd,
        };
        let req = Request {
            self_id: PeerId::from_u32(7),
            peer_id: PeerId::from_u32(8),
        };
        let mut buf = [0u8; MAX_REQUEST];
        let n = f.encode(&req, &mut buf);
        let parsed = v2::Request::parse(&buf[..n]).unwrap();
        assert_eq!(
            parsed.pair(),
            v2::Pair::new(0xabcd_0000_0007, 0xabcd_0000_0008)
        );
        let keys = psync::auth::KeySet::from_keys([key]).unwrap();
        assert_eq!(keys.verify(&parsed.token, 1_900_000_000), Ok(3));
        let at: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let reply = v2::Reply {
            pair: parsed.pair(),
            src_port: 2000,
            dst_port: 3000,
            peer: "127.0.0.1:5000".parse().unwrap(),
            your_addr: at,
            peer_info: v2::ClientInfo::UNKNOWN,
            peer_candidates: v2::Candidates::EMPTY,
        };
        let b = reply.to_bytes();
        assert_eq!(f.decode(&b, b.len(), at).unwrap().peer, reply.peer);
        assert_eq!(
            f.decode(&b, b.len(), "127.0.0.1:1".parse().unwrap()),
            Err(Wrong::NotOurs)
        );
        assert_eq!(f.decode(&b, 200, at), Err(Wrong::Malformed));
        assert_eq!(Format::Seed.decode(&b, b.len(), at), Err(Wrong::Malformed));
    }
}
