//! The whole connect as one sans-IO state machine: for each attempt, a fresh
//! main socket, NAT classification, a router port mapping when the NAT is not
//! easy, registration, then the [`Punch`]; and the retry rules between
//! attempts. The mio driver ([`super::driver`]) only moves bytes, opens
//! sockets and asks the router.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand_xoshiro::rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::config::{ClientConfig, HOLD_LIMIT, PORT_MAPPING_LIFETIME};
use super::nat::{self, Classifier, NatReport, NatType};
use super::punch::{
    Command, Likely, Outcome, Proven, Punch, PunchParams, SocketId, Transmit, TRANSMIT_LEN,
};
use super::registration::{Answer, Registration};
use super::report::{ConnectReport, V2Report};
use super::ClientError;
use crate::wire::v2;
use crate::wire::Reply;

/// Something the driver must do.
#[derive(Clone, Debug)]
pub enum Action {
    /// Open a fresh main socket (closing the previous attempt's sockets and
    /// deleting its port mapping); answer with [`Connector::main_socket_opened`].
    NewAttempt,
    /// A punch command (seed socket, birthday sockets); answer each socket
    /// with [`Connector::socket_opened`].
    Punch(Command),
    /// Ask the router for a mapping (blocking, bounded); answer with
    /// [`Connector::port_mapped`].
    MapPort(super::portmap::Request),
    /// Have the main socket report ICMP errors (on while talking to the
    /// server, so a dead port is noticed; off before punching, when the
    /// partner's NAT may answer early probes with them); report them with
    /// [`Connector::recv_error`].
    IcmpErrors(bool),
}

/// What the router said, as the connector needs it (the driver keeps the lease).
#[derive(Clone, Debug, Default)]
pub struct MapSummary {
    /// The public address mapped to our main socket, if granted.
    pub mapped: Option<SocketAddr>,
    /// Each protocol and its answer.
    pub tried: Vec<(String, String)>,
}

/// A connect that succeeded.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The proven path.
    pub proven: Proven,
    /// The server's reply of the winning attempt.
    pub reply: Reply,
    /// Our nonce of that attempt.
    pub nonce: u64,
    /// Whether we decided.
    pub decider: bool,
    /// Registrations made.
    pub attempts: u32,
}

enum Phase {
    Opening,
    Classify(Box<Classifier>),
    Mapping,
    Register(Box<Registration>),
    Punch(Box<Punch>),
    Over,
}

/// The connect state machine; see the module docs.
pub struct Connector {
    cfg: ClientConfig,
    epoch: Instant,
    deadline: Instant,
    rng: Xoshiro256PlusPlus,
    attempt: u32,
    made: u32,
    phase: Phase,
    actions: VecDeque<Action>,
    transmits: VecDeque<Transmit>,
    local: Option<SocketAddr>,
    /// The address of ours the route to the server leaves from (a v2 host
    /// candidate), as the driver found it.
    host: Option<IpAddr>,
    nat: Option<NatType>,
    mapped: Option<SocketAddr>,
    report: ConnectReport,
    notes: Vec<String>,
    likely: Option<Likely>,
    last_error: String,
    nonce: u64,
    reply: Option<Reply>,
    result: Option<Result<Finished, ClientError>>,
}

impl Connector {
    /// Starts at `now`, with `seed` for nonces, transaction IDs and the
    /// birthday ports (the driver draws it from the OS).
    pub fn new(cfg: ClientConfig, now: Instant, seed: u64) -> Connector {
        let deadline = now + cfg.timeout;
        let mut c = Connector {
            cfg,
            epoch: now,
            deadline,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            attempt: 1,
            made: 0,
            phase: Phase::Opening,
            actions: VecDeque::new(),
            transmits: VecDeque::new(),
            local: None,
            host: None,
            nat: None,
            mapped: None,
            report: ConnectReport::default(),
            notes: Vec::new(),
            likely: None,
            last_error: String::new(),
            nonce: 0,
            reply: None,
            result: None,
        };
        c.actions.push_back(Action::NewAttempt);
        c
    }

    /// The clock origin.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True once the result is known: what arrives after it belongs to the
    /// session, not to the connect.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }

    /// The result, once known.
    pub fn result(&mut self) -> Option<Result<Finished, ClientError>> {
        self.result.take()
    }

    /// What was learned and tried so far.
    pub fn report(&self) -> &ConnectReport {
        &self.report
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.transmits.is_empty() {
            self.collect(now);
        }
        let t = self.transmits.pop_front()?;
        self.report.datagrams_sent += 1;
        Some(t)
    }

    fn collect(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Classify(c) => {
                while let Some(t) = c.poll_transmit(now) {
                    let mut buf = [0u8; TRANSMIT_LEN];
                    buf[..t.bytes.len()].copy_from_slice(&t.bytes);
                    self.transmits.push_back(Transmit {
                        socket: SocketId::Main,
                        to: t.to,
                        ttl: None,
                        buf,
                        len: t.bytes.len(),
                    });
                }
            }
            Phase::Register(r) => {
                let mut buf = [0u8; TRANSMIT_LEN];
                let len = r.poll_transmit(now).map(|req| {
                    buf[..req.len()].copy_from_slice(req);
                    req.len()
                });
                if let Some(len) = len {
                    // Asked after the send: it may have moved to the next member.
                    self.transmits.push_back(Transmit {
                        socket: SocketId::Main,
                        to: r.server(),
                        ttl: None,
                        buf,
                        len,
                    });
                }
            }
            Phase::Punch(p) => {
                while let Some(t) = p.poll_transmit() {
                    self.transmits.push_back(t);
                }
            }
            _ => {}
        }
    }

    /// When [`Connector::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = match &self.phase {
            Phase::Classify(c) => c.poll_timeout().unwrap_or(self.deadline),
            Phase::Register(r) => r.poll_timeout(),
            Phase::Punch(p) => return p.poll_timeout(),
            Phase::Opening | Phase::Mapping => return None,
            Phase::Over => return None,
        };
        Some(t.min(self.deadline))
    }

    /// The local IP the route to the server leaves from (the driver asks the
    /// kernel before each attempt); with v2 it is sent to the partner as a
    /// host candidate, for peers behind one NAT.
    pub fn host_ip(&mut self, ip: Option<IpAddr>) {
        self.host = ip.filter(|ip| !ip.is_unspecified());
    }

    /// The driver opened the attempt's main socket (bound to `local`).
    pub fn main_socket_opened(&mut self, now: Instant, local: Result<SocketAddr, ClientError>) {
        let local = match local {
            Ok(l) => l,
            Err(e) => return self.finish(Err(e)),
        };
        self.local = Some(local);
        self.mapped = None;
        self.actions.push_back(Action::IcmpErrors(true));
        // Classifying takes two server ports; with one, a STUN question
        // would only delay registration.
        if self.cfg.classify && self.cfg.stun_server().is_some() {
            let tids = [self.tid(), self.tid()];
            let wait = self
                .cfg
                .classify_wait
                .min(self.deadline.saturating_duration_since(now));
            self.phase = Phase::Classify(Box::new(Classifier::new(
                self.cfg.server,
                self.cfg.stun_server(),
                Some(local),
                tids,
                now,
                wait,
            )));
        } else {
            self.report.classification = NatReport {
                local: Some(local),
                attempted: false,
                ..NatReport::default()
            };
            self.after_classify(now);
        }
    }

    fn tid(&mut self) -> [u8; 12] {
        let mut t = [0u8; 12];
        self.rng.fill_bytes(&mut t);
        t
    }

    fn after_classify(&mut self, now: Instant) {
        if let Phase::Classify(c) = &self.phase {
            let found = c.report();
            let t = found.nat_type();
            // A later attempt that cannot classify keeps what an earlier one learned.
            if t != NatType::Unknown || self.nat.is_none() {
                self.nat = Some(t);
            }
            self.report.classification = found;
            let (sent_main, sent_second) = c.sent();
            log::info!(
                "NAT: {} (public {:?} to the server, {:?} to its STUN port; {} and {} requests, {} ms into the connect)",
                t,
                found.public,
                found.public_second,
                sent_main,
                sent_second,
                now.saturating_duration_since(self.epoch).as_millis()
            );
        }
        self.report.nat = self.nat;
        let nat = self.nat.unwrap_or(NatType::Unknown);
        let pm = self.cfg.port_mapping;
        let local = self.local.map_or(0, |l| l.port());
        // Only a NAT that is not known to be easy needs the router: an easy
        // one is found at its observed port anyway. The mapping must open the
        // port the server sees, so it needs the main port's STUN answer. A
        // server on our own host has no NAT in between (and tests must not
        // talk to real routers).
        let server = self.cfg.server;
        let public = self.report.classification.public;
        let wanted = pm.any()
            && nat != NatType::Easy
            && server.is_ipv4()
            && !server.ip().is_loopback()
            && local != 0;
        if let (true, Some(public)) = (wanted, public) {
            let external = public.port();
            let mut pm = pm;
            pm.wait = pm.wait.min(self.deadline.saturating_duration_since(now));
            self.phase = Phase::Mapping;
            self.actions
                .push_back(Action::MapPort(super::portmap::Request {
                    internal_port: local,
                    external_port: external,
                    protocols: pm,
                    lifetime: PORT_MAPPING_LIFETIME,
                    nonce_seed: self.rng.next_u64(),
                }));
        } else {
            self.start_register(now);
        }
    }

    /// The router's answer to [`Action::MapPort`].
    pub fn port_mapped(&mut self, now: Instant, summary: MapSummary) {
        self.report.mapping = summary.tried;
        let want = self.report.classification.public;
        if let (Some(m), Some(w)) = (summary.mapped, want) {
            if m.port() == w.port() {
                self.mapped = Some(m);
                self.report.mapped = Some(m);
                if self.nat == Some(NatType::Hard) {
                    self.nat = Some(NatType::HardMapped);
                    self.report.nat = self.nat;
                }
            }
        } else if summary.mapped.is_some() && want.is_none() {
            self.mapped = summary.mapped;
            self.report.mapped = summary.mapped;
        }
        self.start_register(now);
    }

    fn start_register(&mut self, now: Instant) {
        let r = match self.cfg.token {
            Some(token) => Registration::new_v2(self.cfg.server, self.v2_request(token), now),
            None => Registration::new(self.cfg.server, self.cfg.self_id, self.cfg.peer_id, now),
        }
        .with_fallbacks(&self.cfg.fallbacks)
        .with_deadline(self.cfg.timeout, self.deadline);
        self.phase = Phase::Register(Box::new(r));
    }

    /// Our v2 request: the token, what we know of our NAT, and our
    /// candidates: the local address toward the server (peers behind one
    /// NAT reach each other there) and the router's mapping.
    fn v2_request(&self, token: v2::Token) -> v2::Request {
        let mapping = match self.nat.unwrap_or(NatType::Unknown) {
            NatType::Unknown => v2::Mapping::Unknown,
            NatType::Easy => v2::Mapping::EndpointIndependent,
            NatType::Hard | NatType::HardMapped => v2::Mapping::EndpointDependent,
        };
        let mut candidates = v2::Candidates::EMPTY;
        let port = self.local.map_or(0, |l| l.port());
        if let (Some(ip), true) = (self.host, port != 0) {
            let _ = candidates.push(v2::Candidate {
                kind: v2::CandidateKind::HOST,
                addr: SocketAddr::new(ip, port),
            });
        }
        if let Some(m) = self.mapped {
            let _ = candidates.push(v2::Candidate {
                kind: v2::CandidateKind::MAPPED,
                addr: m,
            });
        }
        v2::Request {
            token,
            cookie: None,
            info: v2::ClientInfo::new(mapping, self.mapped.is_some()),
            candidates,
        }
    }

    /// A socket asked for by [`Action::Punch`] is open (or not).
    pub fn socket_opened(&mut self, now: Instant, socket: SocketId, result: Result<(), String>) {
        if let Phase::Punch(p) = &mut self.phase {
            p.socket_opened(socket, result, now);
        }
    }

    /// A send from the main socket failed (kept for the "no reply" message).
    pub fn send_failed(&mut self, socket: SocketId, error: &std::io::Error) {
        if socket == SocketId::Main {
            self.last_error = format!(" (last send error: {error})");
        }
    }

    /// A receive on `socket` failed (ICMP errors arrive this way).
    pub fn recv_error(&mut self, now: Instant, socket: SocketId, error: &std::io::Error) {
        if socket != SocketId::Main || error.kind() != std::io::ErrorKind::ConnectionRefused {
            return;
        }
        if let Phase::Register(r) = &mut self.phase {
            self.last_error = " (the server's port refused it)".into();
            if let Some(e) = r.refused(now) {
                self.finish(Err(e));
            }
        }
    }

    /// A datagram arrived on `socket` from `from`.
    pub fn handle(&mut self, now: Instant, socket: SocketId, from: SocketAddr, datagram: &[u8]) {
        match &mut self.phase {
            Phase::Classify(c) if socket == SocketId::Main => {
                c.handle(now, from, datagram);
                if c.is_done(now) {
                    self.after_classify(now);
                }
            }
            Phase::Register(r) if socket == SocketId::Main => match r.handle(from, datagram, now) {
                Some(Ok(answer)) => self.start_punch(now, answer),
                Some(Err(e)) => self.finish(Err(e)),
                None => {
                    self.report.cookies = r.cookies();
                    log::debug!("no reply yet: a datagram from {from} while registering");
                }
            },
            Phase::Punch(p) => {
                p.handle(now, socket, from, datagram);
                self.check_punch(now);
            }
            _ => {}
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Classify(c) if c.is_done(now) => self.after_classify(now),
            Phase::Register(_) if now >= self.deadline => {
                if self.attempt == 1 {
                    let mut last_error = std::mem::take(&mut self.last_error);
                    if let Some(t) = &self.cfg.token {
                        // A server stays as silent to a refused token as to
                        // a lone registration: say what else to check.
                        last_error.push_str(&format!(
                            " (protocol v2, peer ID {:#x}: a server also says nothing to a token it \
                             refuses: does its --auth-key-file hold key {}, and has the token, \
                             valid until Unix time {}, not expired?)",
                            t.pair.peer_id, t.key_id, t.expiry
                        ));
                    }
                    let err = ClientError::NoReply {
                        server: self.cfg.server,
                        peer: self.cfg.peer_id,
                        waited: now.saturating_duration_since(self.epoch),
                        last_error,
                    };
                    self.finish(Err(err));
                } else {
                    self.notes.push(format!(
                        "attempt {}: the server did not answer the new registration before the timeout (the peer stopped retrying?)",
                        self.attempt
                    ));
                    self.give_up();
                }
            }
            Phase::Punch(p) => {
                p.handle_timeout(now);
                self.check_punch(now);
            }
            _ => {}
        }
    }

    fn start_punch(&mut self, now: Instant, answer: Answer) {
        let reply = answer.reply;
        let mut partner_nat = self.cfg.partner_nat;
        let mut partner_candidates = Vec::new();
        let mut partner_local = Vec::new();
        let mut all_candidates = Vec::new();
        if let Some(r) = answer.v2 {
            for c in r.peer_candidates.as_slice() {
                all_candidates.push(c.addr);
                if c.kind == v2::CandidateKind::HOST {
                    partner_local.push(c.addr);
                } else {
                    partner_candidates.push(c.addr);
                }
            }
            let told = match (r.peer_info.mapping(), r.peer_info.port_mapped()) {
                (v2::Mapping::EndpointIndependent, _) => Some(NatType::Easy),
                (v2::Mapping::EndpointDependent, true) => Some(NatType::HardMapped),
                (v2::Mapping::EndpointDependent, false) => Some(NatType::Hard),
                _ => None,
            };
            partner_nat = partner_nat.or(told);
            log::info!(
                "v2: our public address {}, partner's NAT {}, {} partner candidate(s)",
                r.your_addr,
                told.map_or("unknown", NatType::name),
                all_candidates.len()
            );
            self.report.v2 = Some(V2Report {
                your_addr: r.your_addr,
                partner_nat: told,
                partner_candidates: all_candidates,
            });
        }
        self.made = self.attempt;
        self.report.attempts = self.attempt;
        log::info!(
            "attempt {}: peer {} at {}, src_port {}, dst_port {}",
            self.attempt,
            self.cfg.peer_id,
            reply.peer,
            reply.src_port,
            reply.dst_port
        );
        self.nonce = loop {
            let n = self.rng.next_u64();
            if n != 0 {
                break n;
            }
        };
        self.reply = Some(reply);
        let nat = self.nat.unwrap_or(NatType::Unknown);
        // Our public IP, as the server saw it (v2 says so in every reply; else
        // the classification's STUN answer from the same socket).
        let ours = answer.v2.map(|r| r.your_addr.ip()).or(self
            .report
            .classification
            .public
            .map(|a| a.ip()));
        let same_nat = ours == Some(reply.peer.ip()) && !reply.peer.ip().is_loopback();
        if same_nat {
            log::info!(
                "attempt {}: the peer is behind our own public address {}: {} local address(es) of it known",
                self.attempt,
                reply.peer.ip(),
                partner_local.len()
            );
        }
        let mut roles = nat::roles(nat, partner_nat, self.cfg.birthday.delay);
        if reply.peer.ip().is_loopback() || same_nat {
            // Behind one NAT, guessing ports of our own public address
            // cannot help (it does not hairpin, or the observed path works),
            // and both hard is no verdict: the local path needs no port.
            // No NAT on loopback: nothing to guess, and random probes of
            // 127.0.0.1 would hit unrelated local services.
            roles = nat::Roles {
                hard: false,
                easy: None,
                hopeless: false,
            };
        }
        let params = PunchParams {
            self_id: self.cfg.self_id,
            peer_id: self.cfg.peer_id,
            nonce: self.nonce,
            epoch: self.epoch,
            reply,
            strategies: self.cfg.strategies(),
            opener_ttl: self.cfg.opener_ttl,
            window: self.cfg.punch_window,
            hold_limit: HOLD_LIMIT,
            deadline: self.deadline,
            our_nat: nat,
            roles,
            birthday: self.cfg.birthday,
            seed: self.rng.next_u64(),
            partner_candidates,
            partner_local,
            same_nat,
            v2: self.cfg.token.is_some(),
            partner_nat,
        };
        self.actions.push_back(Action::IcmpErrors(false));
        let mut punch = Punch::new(params, now);
        while let Some(c) = punch.poll_command() {
            self.actions.push_back(Action::Punch(c));
        }
        self.phase = Phase::Punch(Box::new(punch));
        self.check_punch(now);
    }

    fn check_punch(&mut self, now: Instant) {
        let Phase::Punch(p) = &mut self.phase else {
            return;
        };
        let Some(outcome) = p.outcome().cloned() else {
            return;
        };
        // What the last step queued (the echo of done) still goes out.
        while let Some(t) = p.poll_transmit() {
            self.transmits.push_back(t);
        }
        let stats = p.birthday_stats();
        let tried = p.tried();
        self.report.birthday.sockets = self.report.birthday.sockets.max(stats.sockets);
        self.report.birthday.probes += stats.probes;
        self.report.birthday.meetings += stats.meetings;
        match outcome {
            Outcome::Connected(proven) => {
                self.add_tried(&tried);
                let Some(reply) = self.reply else { return };
                self.finish(Ok(Finished {
                    proven,
                    reply,
                    nonce: self.nonce,
                    decider: self.cfg.self_id < self.cfg.peer_id,
                    attempts: self.attempt,
                }));
            }
            Outcome::Failed(r) => {
                self.add_tried(&r.tried);
                log::info!("attempt {} failed: {}", self.attempt, r.notes.join("; "));
                self.notes
                    .push(format!("attempt {}: {}", self.attempt, r.notes.join("; ")));
                self.likely = self.likely.max(r.likely);
                if r.final_verdict || self.attempt >= self.cfg.attempts || now >= self.deadline {
                    self.give_up();
                } else {
                    // A new socket: the server replays the old reply (same
                    // ports, same partner address) to a retransmit from the
                    // same source, while a new source is a fresh registration.
                    self.attempt += 1;
                    self.phase = Phase::Opening;
                    self.actions.push_back(Action::NewAttempt);
                }
            }
        }
    }

    fn add_tried(&mut self, tried: &[super::config::Strategy]) {
        for s in tried {
            if !self.report.tried.contains(s) {
                self.report.tried.push(*s);
            }
        }
        self.report.tried.sort();
    }

    fn give_up(&mut self) {
        let mut tried: Vec<&str> = self.report.tried.iter().map(|s| s.name()).collect();
        if tried.is_empty() {
            tried = if self.likely == Some(Likely::Hopeless) {
                // Known in advance: nothing was sent to the partner.
                vec!["none"]
            } else {
                self.cfg.strategies().iter().map(|s| s.name()).collect()
            };
        }
        let mut reason = std::mem::take(&mut self.notes);
        if let Some(l) = self.likely {
            reason.push(format!("likely cause: {}", l.explain()));
        }
        let err = ClientError::Punch {
            attempts: self.made,
            tried: tried.join(", "),
            nat: self.report.nat_words(),
            reason: reason.join("; "),
        };
        self.finish(Err(err));
    }

    fn finish(&mut self, r: Result<Finished, ClientError>) {
        self.phase = Phase::Over;
        self.result = Some(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stun;
    use crate::wire::PeerId;
    use std::time::Duration;

    /// The next action that is not about ICMP error reports.
    fn next_action(c: &mut Connector) -> Option<Action> {
        loop {
            match c.poll_action()? {
                Action::IcmpErrors(_) => continue,
                a => return Some(a),
            }
        }
    }

    fn cfg() -> ClientConfig {
        let mut c = ClientConfig::new(
            "198.18.0.2:4949".parse().unwrap(),
            PeerId::from_u32(1),
            PeerId::from_u32(2),
        );
        c.stun_port = Some(3478);
        c
    }

    /// Answers every STUN request in `out` as a server seeing `public`.
    fn answer_stun(c: &mut Connector, now: Instant, public: [SocketAddr; 2]) {
        let mut sent = Vec::new();
        while let Some(t) = c.poll_transmit(now) {
            sent.push(t);
        }
        for t in sent {
            let msg = stun::Message::new_checked(t.data()).unwrap();
            let which = usize::from(t.to.port() == 3478);
            let mut out = [0u8; stun::MAX_ANSWER_LEN];
            let n = stun::write_success(&msg.transaction_id(), public[which], true, &mut out);
            c.handle(now, SocketId::Main, t.to, &out[..n]);
        }
    }

    #[test]
    fn classifies_then_maps_only_when_not_easy_then_registers() {
        for (public, want_map) in [
            (["203.0.113.5:40001", "203.0.113.5:40001"], false),
            (["203.0.113.5:51000", "203.0.113.5:52000"], true),
        ] {
            let t0 = Instant::now();
            let mut c = Connector::new(cfg(), t0, 1);
            assert!(matches!(c.poll_action(), Some(Action::NewAttempt)));
            c.main_socket_opened(t0, Ok("0.0.0.0:40001".parse().unwrap()));
            let public = public.map(|p| p.parse().unwrap());
            answer_stun(&mut c, t0, public);
            match next_action(&mut c) {
                Some(Action::MapPort(req)) => {
                    assert!(want_map);
                    assert_eq!((req.internal_port, req.external_port), (40001, 51000));
                    c.port_mapped(
                        t0,
                        MapSummary {
                            mapped: Some("203.0.113.5:51000".parse().unwrap()),
                            tried: vec![("pcp".into(), "mapped".into())],
                        },
                    );
                    assert_eq!(c.report().nat, Some(NatType::HardMapped));
                }
                None => assert!(!want_map),
                other => panic!("{other:?}"),
            }
            let t = c.poll_transmit(t0).expect("registration");
            assert_eq!((t.to, t.len), (cfg().server, 8));
        }
    }

    #[test]
    fn no_reply_is_exit_3_and_counts_every_datagram() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.classify = false;
        c.port_mapping.natpmp = false;
        c.port_mapping.pcp = false;
        c.port_mapping.upnp = false;
        c.timeout = Duration::from_secs(1);
        let mut c = Connector::new(c, t0, 1);
        c.poll_action();
        c.main_socket_opened(t0, Ok("0.0.0.0:40001".parse().unwrap()));
        assert!(next_action(&mut c).is_none());
        let mut now = t0;
        let mut sent = 0;
        loop {
            while c.poll_transmit(now).is_some() {
                sent += 1;
            }
            if let Some(r) = c.result() {
                let e = r.unwrap_err();
                assert_eq!(e.exit_code(), 3, "{e}");
                break;
            }
            now = c.poll_timeout().unwrap();
            c.handle_timeout(now);
        }
        assert_eq!(
            sent, 4,
            "requests at 0, 250, 500 and 750 ms (a 1 s timeout stops the backoff at 250 ms)"
        );
        assert_eq!(c.report().datagrams_sent, 4);
    }

    #[test]
    fn v2_registers_with_its_token_info_and_candidates_and_reads_the_reply() {
        let key = crate::auth::Key::new(1, &[3; 32]).unwrap();
        let pair = v2::Pair::new(0x51f0_c2a9_e4d3_b817, 0x0bd1_e5a2_c4f6_a390);
        let mut cfg = ClientConfig::with_token(
            "198.18.0.2:4949".parse().unwrap(),
            key.issue(pair, u64::MAX),
        );
        cfg.stun_port = Some(3478);
        cfg.port_mapping.natpmp = false;
        cfg.port_mapping.pcp = false;
        cfg.port_mapping.upnp = false;
        assert!(cfg.check().is_ok());
        let t0 = Instant::now();
        let mut c = Connector::new(cfg.clone(), t0, 1);
        c.poll_action();
        c.host_ip(Some("10.0.0.5".parse().unwrap()));
        c.main_socket_opened(t0, Ok("0.0.0.0:40001".parse().unwrap()));
        let easy = "203.0.113.5:40001".parse().unwrap();
        answer_stun(&mut c, t0, [easy, easy]);
        let t = c.poll_transmit(t0).expect("registration");
        let req = v2::Request::parse(t.data()).expect("a v2 request");
        assert_eq!(req.pair(), pair);
        assert_eq!(req.info.mapping(), v2::Mapping::EndpointIndependent);
        assert_eq!(
            req.candidates.as_slice(),
            [v2::Candidate {
                kind: v2::CandidateKind::HOST,
                addr: "10.0.0.5:40001".parse().unwrap()
            }]
        );
        // A cookie reply: the request goes again at once, with the cookie.
        let cookie = v2::Cookie::new([9; 16]).unwrap();
        let t1 = t0 + Duration::from_millis(5);
        c.handle(
            t1,
            SocketId::Main,
            cfg.server,
            &v2::CookieReply { pair, cookie }.to_bytes(),
        );
        let t = c.poll_transmit(t1).expect("sent again at once");
        assert_eq!(v2::Request::parse(t.data()).unwrap().cookie, Some(cookie));
        // The reply: the partner's candidates become paths, its info its NAT.
        let cand: SocketAddr = "192.168.7.9:5555".parse().unwrap();
        let reply = v2::Reply {
            pair,
            src_port: 2000,
            dst_port: 3000,
            // Behind our own public address: its local address is probed.
            peer: "203.0.113.5:4950".parse().unwrap(),
            your_addr: easy,
            peer_info: v2::ClientInfo::new(v2::Mapping::EndpointDependent, true),
            peer_candidates: v2::Candidates::from_slice(&[v2::Candidate {
                kind: v2::CandidateKind::HOST,
                addr: cand,
            }])
            .unwrap(),
        };
        c.handle(t1, SocketId::Main, cfg.server, &reply.to_bytes());
        let report = c.report().v2.clone().expect("v2 report");
        assert_eq!(report.your_addr, easy);
        assert_eq!(report.partner_nat, Some(NatType::HardMapped));
        assert_eq!(report.partner_candidates, [cand]);
        assert_eq!(c.report().cookies, 1);
        let mut to = Vec::new();
        while let Some(t) = c.poll_transmit(t1) {
            to.push(t.to);
        }
        assert!(to.contains(&cand), "the candidate is probed: {to:?}");
    }

    /// Two hard NATs are hopeless (exit 4 at once, from the partner's type
    /// in the reply), unless they are one NAT: then the local path needs
    /// no port, and the partner's local address is probed instead.
    #[test]
    fn v2_both_hard_is_hopeless_except_behind_one_nat() {
        let key = crate::auth::Key::new(1, &[3; 32]).unwrap();
        let pair = v2::Pair::new(0x51f0_c2a9_e4d3_b817, 0x0bd1_e5a2_c4f6_a390);
        for same_nat in [false, true] {
            let mut cfg = ClientConfig::with_token(
                "198.18.0.2:4949".parse().unwrap(),
                key.issue(pair, u64::MAX),
            );
            cfg.stun_port = Some(3478);
            cfg.port_mapping.natpmp = false;
            cfg.port_mapping.pcp = false;
            cfg.port_mapping.upnp = false;
            let t0 = Instant::now();
            let mut c = Connector::new(cfg.clone(), t0, 1);
            c.poll_action();
            c.host_ip(Some("10.0.0.5".parse().unwrap()));
            c.main_socket_opened(t0, Ok("0.0.0.0:40001".parse().unwrap()));
            let ours: SocketAddr = "203.0.113.5:51000".parse().unwrap();
            answer_stun(&mut c, t0, [ours, "203.0.113.5:52000".parse().unwrap()]);
            assert_eq!(c.report().nat, Some(NatType::Hard));
            assert!(c.poll_transmit(t0).is_some(), "registration");
            let cand: SocketAddr = "10.0.0.6:40002".parse().unwrap();
            let peer: SocketAddr = if same_nat {
                "203.0.113.5:53000".parse().unwrap()
            } else {
                "198.51.100.7:53000".parse().unwrap()
            };
            let reply = v2::Reply {
                pair,
                src_port: 2000,
                dst_port: 3000,
                peer,
                your_addr: ours,
                peer_info: v2::ClientInfo::new(v2::Mapping::EndpointDependent, false),
                peer_candidates: v2::Candidates::from_slice(&[v2::Candidate {
                    kind: v2::CandidateKind::HOST,
                    addr: cand,
                }])
                .unwrap(),
            };
            c.handle(t0, SocketId::Main, cfg.server, &reply.to_bytes());
            match c.result() {
                Some(Err(e)) => {
                    assert!(!same_nat, "{e}");
                    assert_eq!(e.exit_code(), 4);
                    assert!(e.to_string().contains("both NATs change ports"), "{e}");
                }
                None => {
                    assert!(same_nat);
                    let to: Vec<SocketAddr> = std::iter::from_fn(|| c.poll_transmit(t0))
                        .map(|t| t.to)
                        .collect();
                    assert_eq!(to.first(), Some(&cand), "probed first: {to:?}");
                }
                Some(Ok(_)) => panic!("connected to nobody"),
            }
        }
    }
}
