//! Registration: send the request until the server answers with the
//! partner's address. Sans-IO: the caller sends what [`Registration::poll_transmit`]
//! returns from the main socket and feeds back what arrives from the server.
//!
//! The request is the seed format's 8 bytes ([`Registration::new`]) or a
//! protocol v2 request with a token ([`Registration::new_v2`]). It is
//! retransmitted with backoff (250 ms doubling to 2 s, or to an eighth of
//! the connect's timeout if that is shorter, and once more just before the
//! timeout) until a reply arrives. The server stays silent until the partner registers, so "no
//! reply" means either no server or no partner (or, with v2, a token the
//! server refused: it says nothing to those either). A reply of the wrong
//! size or family is an error ([`super::ClientError::BadReply`]), never a
//! crash.
//!
//! v2 cookies (PROTOCOL.md, "The cookie exchange"): a cookie reply's cookie
//! goes into every later request. A cookie belongs to the address, not the
//! pair, so it is taken from any cookie reply from the server; only one that
//! echoes our own pair makes the request go again at once, at most once per
//! retransmit interval (so forged cookie replies cannot make it send faster
//! than twice its schedule).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::ClientError;
use crate::wire::v2;
use crate::wire::{stun, PeerId, Reply, Request};

/// First registration retransmit delay; doubled after each send.
pub const REGISTER_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest registration retransmit delay: the server's pending lifetime is
/// 30 s by default, so a 2 s refresh keeps the registration alive with margin.
pub const REGISTER_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// The retransmit that the backoff would send after the deadline goes this
/// long before it instead: its answer can still arrive (a round trip), and
/// one more try is what a short `--timeout` under loss lacks. Measured in the
/// NAT lab (10% loss each way at the core, `--timeout 4`, a 700 ms router
/// wait first): with tries at 0.25, 0.5, 1 and 2 s after the first, 1 of 300
/// clients never heard the server (each try fails with odds of about 0.19).
pub const LAST_CALL: Duration = Duration::from_millis(300);
/// The backoff stops at this fraction of the connect's timeout when that is
/// below [`REGISTER_BACKOFF_CAP`] (never below [`REGISTER_BACKOFF_START`]):
/// a 4 s timeout then gets a try every 500 ms instead of two or three in
/// all, and the default 10 s one every 1.25 s.
pub const BACKOFF_TIMEOUT_DIVISOR: u32 = 8;
/// How long the server's port may refuse (ICMP port unreachable) before the
/// client gives up with [`ClientError::Refused`]: long enough for a server
/// that is restarting (the NAT lab restarts one for 1 s), short next to the
/// default 10 s timeout. While refused, the client retries every
/// [`REGISTER_BACKOFF_START`].
pub const REFUSED_GRACE: Duration = Duration::from_secs(2);

/// Bytes of the longest request: a v2 request.
pub const MAX_REQUEST_LEN: usize = v2::REQUEST_LEN;

/// What the server said: the seed-format reply the punch needs, and with v2
/// the whole v2 reply (our public address, the partner's info and
/// candidates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The partner's address and the two ports.
    pub reply: Reply,
    /// The v2 reply it came in, if v2.
    pub v2: Option<v2::Reply>,
}

/// Requests one cluster member may leave unanswered before the next member
/// is tried (about 1.75 s at the backoff above). The members forward to
/// the pair's owner whichever is asked, so moving on is safe; it costs a
/// fresh rendezvous only if a match's reply was lost that many times.
pub const FALLBACK_AFTER: u32 = 3;

/// Sans-IO registration with one server, or with the members of a cluster
/// (the pair's owner first, then the others, each tried in turn when the
/// one before stays silent or refuses).
#[derive(Debug)]
pub struct Registration {
    server: SocketAddr,
    /// Cluster members to fall back to, in the order to try them
    /// (`server` is the one in use; it is also among them).
    servers: Vec<SocketAddr>,
    /// Requests sent to `server` since it last answered or was chosen.
    unanswered: u32,
    request: [u8; MAX_REQUEST_LEN],
    len: usize,
    /// The v2 request, kept to put a cookie in it.
    v2: Option<v2::Request>,
    /// Cookie replies taken.
    cookies: u32,
    /// The scheduled send a cookie reply pulled forward to now (kept, so the
    /// early send does not shift the schedule).
    pulled: Option<Instant>,
    /// A cookie reply already made a request go early in this interval.
    early_spent: bool,
    next_send: Instant,
    backoff: Duration,
    /// The longest backoff ([`Registration::with_deadline`]).
    cap: Duration,
    /// When the last try before the deadline goes, if there is a deadline.
    last_call: Option<Instant>,
    sent: u32,
    /// Since when every registration sent was refused.
    refused_since: Option<Instant>,
    /// Whether the latest one was: a send that draws no refusal ends the streak.
    refused_latest: bool,
}

impl Registration {
    /// Starts registering `self_id` for `peer_id` at `now`, in the seed format.
    pub fn new(server: SocketAddr, self_id: PeerId, peer_id: PeerId, now: Instant) -> Registration {
        let mut request = [0u8; MAX_REQUEST_LEN];
        let seed = Request { self_id, peer_id }.emit();
        request[..seed.len()].copy_from_slice(&seed);
        Registration::with_bytes(server, request, seed.len(), None, now)
    }

    /// Starts registering with the v2 `request` (token, client info,
    /// candidates; its cookie, if any, is replaced by what the server gives)
    /// at `now`.
    pub fn new_v2(server: SocketAddr, request: v2::Request, now: Instant) -> Registration {
        let mut bytes = [0u8; MAX_REQUEST_LEN];
        let len = request.emit(&mut bytes);
        Registration::with_bytes(server, bytes, len, Some(request), now)
    }

    fn with_bytes(
        server: SocketAddr,
        request: [u8; MAX_REQUEST_LEN],
        len: usize,
        v2: Option<v2::Request>,
        now: Instant,
    ) -> Registration {
        Registration {
            server,
            servers: vec![server],
            unanswered: 0,
            request,
            len,
            v2,
            cookies: 0,
            pulled: None,
            early_spent: false,
            next_send: now,
            backoff: REGISTER_BACKOFF_START,
            cap: REGISTER_BACKOFF_CAP,
            last_call: None,
            sent: 0,
            refused_since: None,
            refused_latest: false,
        }
    }

    /// The same registration, with the other members of a cluster to try
    /// after [`FALLBACK_AFTER`] unanswered requests or a refusal.
    pub fn with_fallbacks(mut self, fallbacks: &[SocketAddr]) -> Registration {
        self.servers
            .extend(fallbacks.iter().filter(|&&f| f != self.server));
        self
    }

    /// The same registration, paced for a connect bounded by `timeout` that
    /// ends at `deadline`: the backoff stops at `timeout` /
    /// [`BACKOFF_TIMEOUT_DIVISOR`] (250 ms to 2 s), and a try that would
    /// fall after `deadline` - [`LAST_CALL`] goes then instead.
    pub fn with_deadline(mut self, timeout: Duration, deadline: Instant) -> Registration {
        self.cap =
            (timeout / BACKOFF_TIMEOUT_DIVISOR).clamp(REGISTER_BACKOFF_START, REGISTER_BACKOFF_CAP);
        self.last_call = deadline.checked_sub(LAST_CALL);
        self
    }

    /// The server the next request goes to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Moves on to the next cluster member, if there are others.
    fn next_server(&mut self) {
        if self.servers.len() > 1 {
            let i = self
                .servers
                .iter()
                .position(|&s| s == self.server)
                .unwrap_or(0);
            self.server = self.servers[(i + 1) % self.servers.len()];
            log::info!("no answer yet; trying cluster member {}", self.server);
        }
        self.unanswered = 0;
    }

    /// The request, if one is due at `now`; schedules the next.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        if now < self.next_send {
            return None;
        }
        if self.unanswered >= FALLBACK_AFTER {
            self.next_server();
        }
        self.unanswered += 1;
        if !self.refused_latest {
            self.refused_since = None;
        }
        self.refused_latest = false;
        if let Some(due) = self.pulled.take() {
            // Pulled forward by a cookie reply: the schedule stays as it was.
            self.next_send = due;
            self.early_spent = true;
        } else {
            self.next_send = now + self.backoff;
            self.backoff = (self.backoff * 2).min(self.cap);
            self.early_spent = false;
            if let Some(last) = self.last_call {
                if self.next_send > last && now + REGISTER_BACKOFF_START <= last {
                    self.next_send = last;
                }
            }
        }
        self.sent += 1;
        Some(&self.request[..self.len])
    }

    /// Cookie replies taken so far (v2).
    pub fn cookies(&self) -> u32 {
        self.cookies
    }

    /// When the next request is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_send
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// The server's port refused a registration (an ICMP port unreachable
    /// surfaced as `ECONNREFUSED`). After [`REFUSED_GRACE`] of nothing but
    /// refusals this is the error to end with; until then the next request
    /// goes out within [`REGISTER_BACKOFF_START`].
    pub fn refused(&mut self, now: Instant) -> Option<ClientError> {
        let since = *self.refused_since.get_or_insert(now);
        if !self.refused_latest && since == now {
            log::warn!(
                "{}: connection refused (nothing listens there?); retrying for {} ms \
                 in case the server is restarting",
                self.server,
                REFUSED_GRACE.as_millis()
            );
        }
        self.refused_latest = true;
        // Another member may be up: try it at once.
        if self.servers.len() > 1 {
            self.next_server();
        }
        if now.duration_since(since) >= REFUSED_GRACE {
            return Some(ClientError::Refused {
                server: self.server,
            });
        }
        self.next_send = self.next_send.min(now + REGISTER_BACKOFF_START);
        self.backoff = REGISTER_BACKOFF_START;
        None
    }

    /// A datagram from `from` at `now`: `None` if it is not the server's
    /// reply (another source, a STUN answer, a v2 cookie reply, which this
    /// takes, or a v2 reply for another pair), else the reply or why it is
    /// bad.
    pub fn handle(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Option<Result<Answer, ClientError>> {
        if !self.servers.contains(&from) || stun::is_stun(datagram) {
            return None;
        }
        let Some(mine) = self.v2 else {
            return Some(check_reply(datagram, from).map(|reply| Answer { reply, v2: None }));
        };
        let bad = |reason: String| {
            Some(Err(ClientError::BadReply {
                server: self.server,
                reason,
            }))
        };
        match v2::Response::parse(datagram) {
            Ok(v2::Response::Cookie(c)) => {
                // The member answers: no reason to move on.
                self.unanswered = 0;
                self.take_cookie(c, mine, now);
                None
            }
            Ok(v2::Response::Reply(r)) if r.pair != mine.pair() => {
                log::debug!("ignored a v2 reply for another pair ({:?})", r.pair);
                None
            }
            Ok(v2::Response::Reply(r)) => {
                if r.peer.is_ipv4() != self.server.is_ipv4() {
                    return bad(format!(
                        "v2 reply carries an {} partner address for an {} registration",
                        if r.peer.is_ipv4() { "IPv4" } else { "IPv6" },
                        if self.server.is_ipv4() {
                            "IPv4"
                        } else {
                            "IPv6"
                        },
                    ));
                }
                let reply = Reply {
                    src_port: r.src_port,
                    dst_port: r.dst_port,
                    peer: r.peer,
                };
                Some(Ok(Answer { reply, v2: Some(r) }))
            }
            Err(e) => bad(format!(
                "{} bytes that are no v2 reply ({e}); does the server run with --auth-key-file?",
                datagram.len()
            )),
        }
    }

    /// Puts the cookie of `c` in our request; if `c` answers our own pair,
    /// sends again now (once per retransmit interval).
    fn take_cookie(&mut self, c: v2::CookieReply, mut mine: v2::Request, now: Instant) {
        mine.cookie = Some(c.cookie);
        self.len = mine.emit(&mut self.request);
        self.v2 = Some(mine);
        self.cookies += 1;
        if c.pair == mine.pair()
            && !self.early_spent
            && self.pulled.is_none()
            && now < self.next_send
        {
            self.pulled = Some(self.next_send);
            self.next_send = now;
        }
    }
}

/// Parses the server's reply and checks its family against the server's.
pub fn check_reply(datagram: &[u8], server: SocketAddr) -> Result<Reply, ClientError> {
    let reply = Reply::parse(datagram).map_err(|e| ClientError::BadReply {
        server,
        reason: e.to_string(),
    })?;
    if reply.peer.is_ipv4() != server.is_ipv4() {
        return Err(ClientError::BadReply {
            server,
            reason: format!(
                "{}-byte reply carries an {} partner address for an {} registration",
                datagram.len(),
                if reply.peer.is_ipv4() { "IPv4" } else { "IPv6" },
                if server.is_ipv4() { "IPv4" } else { "IPv6" },
            ),
        });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule under a deadline: the backoff stops at an eighth of the
    /// timeout, and the try the backoff would send after the deadline goes
    /// [`LAST_CALL`] before it instead.
    #[test]
    fn retransmits_fit_the_timeout() {
        let server: SocketAddr = "198.18.0.2:4949".parse().unwrap();
        let schedule = |timeout_ms: u64| {
            let t0 = Instant::now();
            let timeout = Duration::from_millis(timeout_ms);
            let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0)
                .with_deadline(timeout, t0 + timeout);
            let mut at = Vec::new();
            let mut now = t0;
            while now < t0 + timeout {
                if r.poll_transmit(now).is_some() {
                    at.push((now - t0).as_millis() as u64);
                }
                now = r.poll_timeout();
            }
            at
        };
        assert_eq!(
            schedule(10_000),
            [0, 250, 750, 1750, 3000, 4250, 5500, 6750, 8000, 9250, 9700]
        );
        assert_eq!(
            schedule(4000),
            [0, 250, 750, 1250, 1750, 2250, 2750, 3250, 3700]
        );
        // Without a deadline: 250 ms doubling to 2 s.
        let t0 = Instant::now();
        let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        let mut gaps = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            assert!(r.poll_transmit(now).is_some());
            gaps.push((r.poll_timeout() - now).as_millis());
            now = r.poll_timeout();
        }
        assert_eq!(gaps, [250, 500, 1000, 2000, 2000, 2000]);
    }

    #[test]
    fn a_silent_or_refusing_member_is_left_for_the_next() {
        let owner: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let others: [SocketAddr; 2] = [
            "192.0.2.2:1024".parse().unwrap(),
            "192.0.2.3:1024".parse().unwrap(),
        ];
        let t0 = Instant::now();
        let mut r = Registration::new(owner, PeerId::from_u32(1), PeerId::from_u32(2), t0)
            .with_fallbacks(&others);
        let mut to = Vec::new();
        let mut now = t0;
        for _ in 0..7 {
            assert!(r.poll_transmit(now).is_some());
            to.push(r.server());
            now = r.poll_timeout();
        }
        assert_eq!(
            &to[..3],
            &[owner; 3],
            "the owner first, {FALLBACK_AFTER} times"
        );
        assert_eq!(&to[3..6], &[others[0]; 3]);
        assert_eq!(to[6], others[1]);
        // A refusal moves on at once; replies count from any member.
        assert!(r.refused(now).is_none());
        assert_eq!(r.server(), owner);
        let reply = [0u8; 20];
        assert!(r.handle(others[0], &reply, now).is_some());
        assert!(r
            .handle("192.0.2.9:1024".parse().unwrap(), &reply, now)
            .is_none());
        // One server: never moves.
        let mut one = Registration::new(owner, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        for _ in 0..6 {
            one.poll_transmit(one.poll_timeout());
            assert_eq!(one.server(), owner);
        }
    }

    #[test]
    fn backs_off_from_250_ms_to_2_s() {
        let t0 = Instant::now();
        let server = "192.0.2.1:1024".parse().unwrap();
        let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        let mut sends = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(9) {
            if r.poll_transmit(t).is_some() {
                sends.push((t - t0).as_millis());
            }
            t = r.poll_timeout();
        }
        assert_eq!(sends, [0, 250, 750, 1750, 3750, 5750, 7750]);
        assert_eq!(r.sent(), 7);
        assert_eq!(r.poll_transmit(t0), None);
    }

    #[test]
    fn a_port_that_keeps_refusing_ends_after_the_grace() {
        let t0 = Instant::now();
        let server = "192.0.2.1:1024".parse().unwrap();
        let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        let mut t = t0;
        let err = loop {
            assert!(r.poll_transmit(t).is_some());
            if let Some(e) = r.refused(t) {
                break e;
            }
            t = r.poll_timeout();
            assert!(r.poll_timeout() - t0 <= REFUSED_GRACE + REGISTER_BACKOFF_START);
        };
        assert_eq!(err.exit_code(), 3);
        assert!(t - t0 >= REFUSED_GRACE);
        // One answered send (no refusal) ends the streak.
        let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        r.poll_transmit(t0);
        assert!(r.refused(t0).is_none());
        let t1 = r.poll_timeout();
        r.poll_transmit(t1);
        let t2 = t1 + REFUSED_GRACE;
        r.poll_transmit(t2);
        assert!(
            r.refused(t2).is_none(),
            "a send without refusal restarts the grace"
        );
    }

    #[test]
    fn only_the_servers_non_stun_datagrams_count() {
        let t0 = Instant::now();
        let server: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let mut r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        let reply = Reply {
            src_port: 2000,
            dst_port: 3000,
            peer: "198.51.100.7:4949".parse().unwrap(),
        };
        let mut buf = [0u8; crate::wire::MAX_REPLY_LEN];
        let n = reply.emit(&mut buf);
        assert!(r
            .handle("192.0.2.2:1024".parse().unwrap(), &buf[..n], t0)
            .is_none());
        assert_eq!(
            r.handle(server, &buf[..n], t0).unwrap().unwrap().reply,
            reply
        );
        let mut stun_answer = [0u8; stun::MAX_ANSWER_LEN];
        let m = stun::write_success(&[1; 12], server, false, &mut stun_answer);
        assert!(r.handle(server, &stun_answer[..m], t0).is_none());
        assert!(r.handle(server, &buf[..19], t0).unwrap().is_err());
    }

    #[test]
    fn reply_of_the_other_family_is_an_error() {
        let reply = Reply {
            src_port: 2000,
            dst_port: 3000,
            peer: "[2001:db8::1]:4000".parse().unwrap(),
        };
        let mut buf = [0u8; crate::wire::MAX_REPLY_LEN];
        let n = reply.emit(&mut buf);
        let server: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let err = check_reply(&buf[..n], server).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("IPv6"), "{err}");
        let err = check_reply(&buf[..19], server).unwrap_err();
        assert!(err.to_string().contains("wrong size"), "{err}");
    }

    fn v2_request(pair: v2::Pair) -> v2::Request {
        let key = crate::auth::Key::new(1, &[7; 32]).unwrap();
        v2::Request {
            token: key.issue(pair, 1_700_000_000),
            cookie: None,
            info: v2::ClientInfo(1),
            candidates: v2::Candidates::EMPTY,
        }
    }

    #[test]
    fn v2_sends_the_request_and_reads_the_v2_reply() {
        let t0 = Instant::now();
        let server: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let pair = v2::Pair::new(0x1122_3344_5566_7788, 9);
        let req = v2_request(pair);
        let mut r = Registration::new_v2(server, req, t0);
        assert_eq!(r.poll_transmit(t0), Some(&req.to_bytes()[..]));
        let reply = v2::Reply {
            pair,
            src_port: 2000,
            dst_port: 3000,
            peer: "198.51.100.7:4949".parse().unwrap(),
            your_addr: "203.0.113.9:5000".parse().unwrap(),
            peer_info: v2::ClientInfo(2),
            peer_candidates: v2::Candidates::EMPTY,
        };
        let a = r.handle(server, &reply.to_bytes(), t0).unwrap().unwrap();
        assert_eq!(a.v2, Some(reply));
        assert_eq!(
            (a.reply.peer, a.reply.src_port, a.reply.dst_port),
            (reply.peer, 2000, 3000)
        );
        // A reply for another pair is not ours; a seed reply is an error.
        let other = v2::Reply {
            pair: pair.counterpart(),
            ..reply
        };
        assert!(r.handle(server, &other.to_bytes(), t0).is_none());
        let seed = Reply {
            src_port: 2000,
            dst_port: 3000,
            peer: reply.peer,
        };
        let mut buf = [0u8; crate::wire::MAX_REPLY_LEN];
        let n = seed.emit(&mut buf);
        let err = r.handle(server, &buf[..n], t0).unwrap().unwrap_err();
        assert!(err.to_string().contains("--auth-key-file"), "{err}");
    }

    #[test]
    fn a_cookie_reply_goes_into_every_request_and_resends_once_early() {
        let t0 = Instant::now();
        let server: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let pair = v2::Pair::new(1, 2);
        let mut r = Registration::new_v2(server, v2_request(pair), t0);
        r.poll_transmit(t0).unwrap();
        let due = r.poll_timeout();
        let cookie = v2::Cookie::new([5; 16]).unwrap();
        let t1 = t0 + Duration::from_millis(10);
        // A cookie reply for another pair: cookie taken, no early send.
        let foreign = v2::CookieReply {
            pair: v2::Pair::new(8, 9),
            cookie,
        };
        assert!(r.handle(server, &foreign.to_bytes(), t1).is_none());
        assert_eq!(r.poll_timeout(), due);
        assert_eq!(r.poll_transmit(t1), None);
        // One for our pair: sent again at once, with the cookie.
        let mine = v2::CookieReply { pair, cookie };
        assert!(r.handle(server, &mine.to_bytes(), t1).is_none());
        let sent = r.poll_transmit(t1).unwrap().to_vec();
        assert_eq!(v2::Request::parse(&sent).unwrap().cookie, Some(cookie));
        // More cookie replies in the same interval: no faster than that.
        for k in 2..20 {
            assert!(r
                .handle(server, &mine.to_bytes(), t1 + Duration::from_millis(k))
                .is_none());
        }
        assert_eq!(r.poll_transmit(t1 + Duration::from_millis(30)), None);
        assert_eq!(r.poll_timeout(), due);
        assert!(r.poll_transmit(due).is_some());
        assert_eq!(r.cookies(), 20);
        assert_eq!(r.sent(), 3);
    }
}
