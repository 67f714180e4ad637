//! One oracle for the v2 wire parsers, shared by the `v2` fuzz target
//! (`fuzz/fuzz_targets/v2.rs`) and the CI property test
//! (`tests/auth_v2_props.rs`), so both check exactly the same properties.
//!
//! For any bytes, [`check_datagram`] asserts:
//! - no parser panics;
//! - a parser accepts only its message's exact length, and what it accepts
//!   emits back to the very same bytes (the encoding is canonical);
//! - every error is the right one for the bytes (length, magic, version,
//!   type are checked in that order);
//! - no datagram is both a seed message and a v2 message;
//! - every reply is at most as long as any request.
//!
//! [`check_request`], [`check_reply`] and [`check_cookie_reply`] assert
//! `parse(emit(x)) == x` for a value built by the caller.
#![allow(dead_code)] // each driver uses a different part of it

use psync::wire::v2::{
    self, field, CookieReply, CookieReplyView, Error, Reply, ReplyView, Request, RequestView,
    Response, COOKIE_REPLY_LEN, HEADER_LEN, MAGIC, MAX_CANDIDATES, MAX_LEN, REPLY_LEN, REQUEST_LEN,
    VERSION,
};

/// The header of a v2 message of type `ty` (any byte).
pub fn header(ty: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[field::MAGIC].copy_from_slice(&MAGIC);
    h[field::VERSION] = VERSION;
    h[field::TYPE] = ty;
    h
}

/// The header error `data` must get from a parser of message type `ty`
/// whose length already matched, if any.
fn header_error(data: &[u8], ty: u8) -> Option<Error> {
    if data[field::MAGIC] != MAGIC {
        Some(Error::BadMagic)
    } else if data[field::VERSION] != VERSION {
        Some(Error::BadVersion(data[field::VERSION]))
    } else if data[field::TYPE] != ty {
        Some(Error::BadType(data[field::TYPE]))
    } else {
        None
    }
}

/// Checks every parser against arbitrary bytes.
pub fn check_datagram(data: &[u8]) {
    let req = Request::parse(data);
    let reply = Reply::parse(data);
    let cookie = CookieReply::parse(data);

    for (result_len, ty, err) in [
        (REQUEST_LEN, 1u8, req.err()),
        (REPLY_LEN, 2, reply.err()),
        (COOKIE_REPLY_LEN, 3, cookie.err()),
    ] {
        match err {
            None => {}
            Some(Error::BadSize(n)) => {
                assert_eq!(n, data.len());
                assert_ne!(n, result_len, "right length reported as a size error");
            }
            Some(e) => {
                assert_eq!(
                    data.len(),
                    result_len,
                    "{e:?} for a datagram of the wrong length"
                );
                if let Some(h) = header_error(data, ty) {
                    assert_eq!(e, h, "header faults come first, in order");
                } else {
                    assert!(
                        !matches!(
                            e,
                            Error::BadMagic | Error::BadVersion(_) | Error::BadType(_)
                        ),
                        "{e:?} for a good header"
                    );
                }
            }
        }
    }

    if let Ok(r) = req {
        assert_eq!(data.len(), REQUEST_LEN);
        assert_eq!(
            r.to_bytes()[..],
            data[..],
            "emit(parse(x)) != x for a request"
        );
        assert!(!r.pair().is_self_pair());
        assert!(r.candidates.len() <= MAX_CANDIDATES);
        let view = RequestView::new_checked(data).expect("an accepted request has a view");
        assert_eq!(view.pair(), r.pair());
        assert_eq!(view.token(), r.token);
        assert_eq!(view.cookie(), r.cookie);
        assert_eq!(view.client_info(), r.info);
        assert_eq!(usize::from(view.candidate_count()), r.candidates.len());
        assert_eq!(view.as_bytes()[field::TOKEN], r.token.to_bytes()[..]);
        assert_eq!(v2::Token::from_bytes(&r.token.to_bytes()), r.token);
    }
    if let Ok(r) = reply {
        assert_eq!(data.len(), REPLY_LEN);
        assert_eq!(
            r.to_bytes()[..],
            data[..],
            "emit(parse(x)) != x for a reply"
        );
        assert!(r.src_port != 0 && r.dst_port != 0 && r.src_port != r.dst_port);
        assert!(!r.pair.is_self_pair());
        assert_eq!(ReplyView::new_checked(data).unwrap().pair(), r.pair);
    }
    if let Ok(c) = cookie {
        assert_eq!(data.len(), COOKIE_REPLY_LEN);
        assert_eq!(
            c.to_bytes()[..],
            data[..],
            "emit(parse(x)) != x for a cookie reply"
        );
        assert_ne!(c.cookie.as_bytes(), &[0; v2::COOKIE_LEN]);
        assert_eq!(CookieReplyView::new_checked(data).unwrap().pair(), c.pair);
    }

    // Response agrees with the two parsers it combines.
    match Response::parse(data) {
        Ok(Response::Reply(r)) => assert_eq!(reply, Ok(r)),
        Ok(Response::Cookie(c)) => assert_eq!(cookie, Ok(c)),
        Err(_) => assert!(reply.is_err() && cookie.is_err()),
    }

    // Seed and v2 never claim the same datagram.
    let v2_any = req.is_ok() || reply.is_ok() || cookie.is_ok();
    let seed_any =
        psync::wire::Request::parse(data).is_ok() || psync::wire::Reply::parse(data).is_ok();
    assert!(!(v2_any && seed_any), "a datagram is both seed and v2");
}

/// `parse(emit(x)) == x` for a request, emitted into a buffer with room to spare.
pub fn check_request(r: &Request) {
    let mut buf = [0xa5u8; MAX_LEN + 16];
    let n = r.emit(&mut buf);
    assert_eq!(n, REQUEST_LEN);
    assert!(
        buf[n..].iter().all(|&b| b == 0xa5),
        "emit wrote past its length"
    );
    assert_eq!(Request::parse(&buf[..n]), Ok(*r));
    check_datagram(&buf[..n]);
}

/// `parse(emit(x)) == x` for a reply; and it is no longer than a request.
pub fn check_reply(r: &Reply) {
    let mut buf = [0xa5u8; MAX_LEN + 16];
    let n = r.emit(&mut buf);
    assert_eq!(n, REPLY_LEN);
    assert!(n <= REQUEST_LEN, "amplification");
    assert!(
        buf[n..].iter().all(|&b| b == 0xa5),
        "emit wrote past its length"
    );
    assert_eq!(Reply::parse(&buf[..n]), Ok(*r));
    assert_eq!(Response::parse(&buf[..n]), Ok(Response::Reply(*r)));
    check_datagram(&buf[..n]);
}

/// `parse(emit(x)) == x` for a cookie reply; and it is no longer than a request.
pub fn check_cookie_reply(c: &CookieReply) {
    let mut buf = [0xa5u8; MAX_LEN + 16];
    let n = c.emit(&mut buf);
    assert_eq!(n, COOKIE_REPLY_LEN);
    assert!(n <= REQUEST_LEN, "amplification");
    assert!(
        buf[n..].iter().all(|&b| b == 0xa5),
        "emit wrote past its length"
    );
    assert_eq!(CookieReply::parse(&buf[..n]), Ok(*c));
    assert_eq!(Response::parse(&buf[..n]), Ok(Response::Cookie(*c)));
    check_datagram(&buf[..n]);
}
