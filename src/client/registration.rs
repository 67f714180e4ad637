//! Registration: send the 8-byte request until the server answers with the
//! partner's address. Sans-IO: the caller sends what [`Registration::poll_transmit`]
//! returns from the main socket and feeds back what arrives from the server.
//!
//! The request is retransmitted with backoff (250 ms doubling to 2 s) until a
//! reply arrives. The server stays silent until the partner registers, so "no
//! reply" means either no server or no partner. A reply of the wrong size or
//! family is an error ([`super::ClientError::BadReply`]), never a crash.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::ClientError;
use crate::wire::{stun, PeerId, Reply, Request, REQUEST_LEN};

/// First registration retransmit delay; doubled after each send.
pub const REGISTER_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest registration retransmit delay: the server's pending lifetime is
/// 30 s by default, so a 2 s refresh keeps the registration alive with margin.
pub const REGISTER_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long the server's port may refuse (ICMP port unreachable) before the
/// client gives up with [`ClientError::Refused`]: long enough for a server
/// that is restarting (the NAT lab restarts one for 1 s), short next to the
/// default 10 s timeout. While refused, the client retries every
/// [`REGISTER_BACKOFF_START`].
pub const REFUSED_GRACE: Duration = Duration::from_secs(2);

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
    request: [u8; REQUEST_LEN],
    next_send: Instant,
    backoff: Duration,
    sent: u32,
    /// Since when every registration sent was refused.
    refused_since: Option<Instant>,
    /// Whether the latest one was: a send that draws no refusal ends the streak.
    refused_latest: bool,
}

impl Registration {
    /// Starts registering `self_id` for `peer_id` at `now`.
    pub fn new(server: SocketAddr, self_id: PeerId, peer_id: PeerId, now: Instant) -> Registration {
        Registration::with_fallbacks(server, &[], self_id, peer_id, now)
    }

    /// As [`Registration::new`], with the other members of a cluster to
    /// try after [`FALLBACK_AFTER`] unanswered requests or a refusal.
    pub fn with_fallbacks(
        server: SocketAddr,
        fallbacks: &[SocketAddr],
        self_id: PeerId,
        peer_id: PeerId,
        now: Instant,
    ) -> Registration {
        let mut servers = vec![server];
        servers.extend(fallbacks.iter().filter(|&&f| f != server));
        Registration {
            server,
            servers,
            unanswered: 0,
            request: Request { self_id, peer_id }.emit(),
            next_send: now,
            backoff: REGISTER_BACKOFF_START,
            sent: 0,
            refused_since: None,
            refused_latest: false,
        }
    }

    /// The request, if one is due at `now`; schedules the next.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<[u8; REQUEST_LEN]> {
        if now < self.next_send {
            return None;
        }
        if !self.refused_latest {
            self.refused_since = None;
        }
        self.refused_latest = false;
        if self.unanswered >= FALLBACK_AFTER {
            self.next_server();
        }
        self.unanswered += 1;
        self.next_send = now + self.backoff;
        self.backoff = (self.backoff * 2).min(REGISTER_BACKOFF_CAP);
        self.sent += 1;
        Some(self.request)
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

    /// A datagram from `from`: `None` if it is not the server's reply (another
    /// source, or a STUN answer), else the reply or why it is bad.
    pub fn handle(&self, from: SocketAddr, datagram: &[u8]) -> Option<Result<Reply, ClientError>> {
        if !self.servers.contains(&from) || stun::is_stun(datagram) {
            return None;
        }
        Some(check_reply(datagram, from))
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

    #[test]
    fn a_silent_or_refusing_member_is_left_for_the_next() {
        let owner: SocketAddr = "192.0.2.1:1024".parse().unwrap();
        let others: [SocketAddr; 2] = [
            "192.0.2.2:1024".parse().unwrap(),
            "192.0.2.3:1024".parse().unwrap(),
        ];
        let t0 = Instant::now();
        let mut r = Registration::with_fallbacks(
            owner,
            &others,
            PeerId::from_u32(1),
            PeerId::from_u32(2),
            t0,
        );
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
        assert!(r.handle(others[0], &reply).is_some());
        assert!(r
            .handle("192.0.2.9:1024".parse().unwrap(), &reply)
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
        let r = Registration::new(server, PeerId::from_u32(1), PeerId::from_u32(2), t0);
        let reply = Reply {
            src_port: 2000,
            dst_port: 3000,
            peer: "198.51.100.7:4949".parse().unwrap(),
        };
        let mut buf = [0u8; crate::wire::MAX_REPLY_LEN];
        let n = reply.emit(&mut buf);
        assert!(r
            .handle("192.0.2.2:1024".parse().unwrap(), &buf[..n])
            .is_none());
        assert_eq!(r.handle(server, &buf[..n]).unwrap().unwrap(), reply);
        let mut stun_answer = [0u8; stun::MAX_ANSWER_LEN];
        let m = stun::write_success(&[1; 12], server, false, &mut stun_answer);
        assert!(r.handle(server, &stun_answer[..m]).is_none());
        assert!(r.handle(server, &buf[..19]).unwrap().is_err());
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
}
