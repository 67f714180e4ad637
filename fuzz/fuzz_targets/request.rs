//! Fuzz target `request`: the wire parsers on arbitrary bytes.
//!
//! `Request::parse` and `Reply::parse` must never panic, must reject with the
//! right error, and whatever they accept must emit back to the same bytes
//! (for an IPv6 reply, up to the flowinfo and scope fields, which psync never
//! sends and `emit` writes as zero).
#![no_main]

use libfuzzer_sys::fuzz_target;
use psync::wire::{
    Reply, Request, WireError, MAX_REPLY_LEN, REPLY_V4_LEN, REPLY_V6_LEN, REQUEST_LEN,
};

/// Bytes of an IPv6 reply that `emit` always writes as zero: flowinfo, scope_id.
const V6_UNSENT: [std::ops::Range<usize>; 2] = [8..12, 28..32];

fuzz_target!(|data: &[u8]| {
    check_request(data);
    check_reply(data);
});

fn check_request(data: &[u8]) {
    match Request::parse(data) {
        Ok(req) => {
            assert_eq!(data.len(), REQUEST_LEN);
            assert_ne!(req.self_id, req.peer_id);
            assert_eq!(req.emit()[..], data[..], "emit is not the parsed bytes");
            let other = req.counterpart();
            assert_eq!(Request::parse(&other.emit()), Ok(other));
            assert_eq!(other.counterpart(), req);
            assert_ne!(req.key(), other.key());
        }
        Err(WireError::BadSize(n)) => {
            assert_eq!(n, data.len());
            assert_ne!(n, REQUEST_LEN);
        }
        Err(WireError::SelfPair) => {
            assert_eq!(data.len(), REQUEST_LEN);
            assert_eq!(data[..4], data[4..]);
        }
        Err(e) => panic!("request parse gave a reply error: {e:?}"),
    }
}

fn check_reply(data: &[u8]) {
    match Reply::parse(data) {
        Ok(reply) => {
            assert_ne!(reply.src_port, 0);
            assert_ne!(reply.dst_port, 0);
            assert_ne!(reply.src_port, reply.dst_port);
            assert_eq!(reply.len(), data.len());
            let mut buf = [0xa5u8; MAX_REPLY_LEN];
            let n = reply.emit(&mut buf);
            assert_eq!(n, data.len());
            let mut want = [0u8; MAX_REPLY_LEN];
            want[..n].copy_from_slice(data);
            if n == REPLY_V6_LEN {
                for r in V6_UNSENT {
                    want[r].fill(0);
                }
            }
            assert_eq!(buf[..n], want[..n], "emit(parse(x)) differs from x");
            let again = Reply::parse(&buf[..n]).expect("an emitted reply parses");
            assert_eq!(again.src_port, reply.src_port);
            assert_eq!(again.dst_port, reply.dst_port);
            assert_eq!(again.peer.ip(), reply.peer.ip());
            assert_eq!(again.peer.port(), reply.peer.port());
        }
        Err(WireError::BadSize(n)) => {
            assert_eq!(n, data.len());
            // Right length, so the only size fault is nonzero sin_zero padding.
            if n == REPLY_V4_LEN {
                assert!(data[12..20].iter().any(|&b| b != 0));
            } else {
                assert_ne!(n, REPLY_V6_LEN);
            }
        }
        Err(WireError::BadFamily(f)) => {
            assert!(data.len() == REPLY_V4_LEN || data.len() == REPLY_V6_LEN);
            assert_eq!(f, u16::from_le_bytes([data[4], data[5]]));
        }
        Err(WireError::BadPorts) => {
            let src = u16::from_le_bytes([data[0], data[1]]);
            let dst = u16::from_le_bytes([data[2], data[3]]);
            assert!(src == 0 || dst == 0 || src == dst);
        }
        Err(WireError::SelfPair) => panic!("reply parse gave a request error"),
    }
}
