//! The punch state machine: one attempt's paths to the partner, from the
//! server's reply to a proven path or a report of what was seen.
//!
//! Sans-IO, like quinn-proto's `Connection` and the server's engine: it owns
//! no socket and reads no clock. The driver feeds it datagrams
//! ([`Punch::handle`]) and the time ([`Punch::handle_timeout`]), executes its
//! [`Command`]s (bind the seed socket, open the birthday sockets) and reports
//! back ([`Punch::socket_opened`]), sends what [`Punch::poll_transmit`] returns
//! from the socket it names, and sleeps until [`Punch::poll_timeout`]. The
//! attempt is over when [`Punch::outcome`] is set.
//!
//! A *path* is a local socket and a partner address; paths are made from the
//! reply (seed, observed), by birthday probing, and from where the partner's
//! valid datagrams actually come from (the partner's NAT may have changed
//! the port). When both peers are behind one public address (one NAT, which
//! rarely hairpins), the partner's local addresses that protocol v2 relays
//! are probed first, and a valid datagram from any local address of the
//! partner opens a path of its own (`local`). The rules, step by step, are
//! in [`super`]'s module docs.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::birthday::PortSequence;
use super::config::{Birthday, Strategy, OPENER_LEAD, PROBE_INTERVAL, SAME_NAT_WAIT};
use super::nat::{NatType, Roles};
use crate::wire::peer::{Header, Kind, HEADER_LEN};
use crate::wire::{PeerId, Reply};

/// How long the deciding peer waits for the echo of its `done`.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);
/// How far the wait for the echo of `done` may run past the deadline.
pub const CONFIRM_GRACE: Duration = Duration::from_millis(500);
/// Extra time the punch window gives birthday probing after the easy side's
/// last probe, for the answer to come back and the path to be proven.
pub const BIRTHDAY_TAIL: Duration = Duration::from_millis(500);
/// Most random probes sent in one call when the driver woke late: keeps a
/// stalled process from bursting its whole backlog at once.
const BIRTHDAY_BURST: u32 = 16;

/// A local socket, as the state machine names it; the driver owns the real one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketId {
    /// The registration socket: the observed path, STUN, and the easy side's
    /// birthday probes (they must leave from the port the server saw).
    Main,
    /// Bound to the server-chosen `src_port`.
    Seed,
    /// One of the hard side's birthday sockets.
    Birthday(u16),
}

/// Bytes a [`Transmit`] holds: the longest datagram the client sends before
/// the session, a v2 registration (punch datagrams are one header).
pub const TRANSMIT_LEN: usize = crate::wire::v2::REQUEST_LEN;
const _: () = assert!(HEADER_LEN <= TRANSMIT_LEN);

/// A datagram to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// From which socket.
    pub socket: SocketId,
    /// To where.
    pub to: SocketAddr,
    /// A low TTL (or hop limit) for an opener; `None` for the default.
    pub ttl: Option<u8>,
    /// The bytes: `len` of them.
    pub buf: [u8; TRANSMIT_LEN],
    /// How many bytes of `buf` to send.
    pub len: usize,
}

impl Transmit {
    /// The datagram.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Something the driver must do for the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Bind [`SocketId::Seed`] to this local port (the server's `src_port`).
    BindSeed {
        /// The port.
        port: u16,
    },
    /// Open [`SocketId::Birthday`] sockets `0..count`, each on a free port.
    OpenBirthday {
        /// How many.
        count: u16,
    },
}

/// What one attempt needs to know.
#[derive(Clone, Debug)]
pub struct PunchParams {
    /// This peer.
    pub self_id: PeerId,
    /// The partner.
    pub peer_id: PeerId,
    /// Our random nonce for this attempt (nonzero).
    pub nonce: u64,
    /// The clock origin of the stamps in our headers.
    pub epoch: Instant,
    /// The server's reply.
    pub reply: Reply,
    /// Strategies to try.
    pub strategies: Vec<Strategy>,
    /// Opener TTL; 0 for none.
    pub opener_ttl: u8,
    /// How long to punch before giving up (stretched for birthday probing).
    pub window: Duration,
    /// Longest hold of a path while nothing is heard.
    pub hold_limit: Duration,
    /// Nothing may run past this (plus [`CONFIRM_GRACE`] for the echo of done).
    pub deadline: Instant,
    /// Our NAT.
    pub our_nat: NatType,
    /// The birthday roles (from [`super::nat::roles`]).
    pub roles: Roles,
    /// Birthday counts.
    pub birthday: Birthday,
    /// Seed of the easy side's random port sequence.
    pub seed: u64,
    /// More public addresses of the partner to probe from the main socket,
    /// and to accept its datagrams from: its router mapping, which protocol
    /// v2 carries. Empty with the seed protocol.
    pub partner_candidates: Vec<SocketAddr>,
    /// The partner's local (host) addresses, which protocol v2 carries:
    /// probed first from the main socket when `same_nat`, never otherwise.
    pub partner_local: Vec<SocketAddr>,
    /// Our public IP is the partner's: both peers are behind one NAT. Then
    /// the `local` strategy probes `partner_local` at once, and a valid
    /// datagram from any address on the main socket is the partner speaking
    /// from its LAN (the peer-reflexive candidate of ICE, RFC 8445 7.3.1.3):
    /// the partner that got our addresses reaches us even when we did not
    /// get its own.
    pub same_nat: bool,
    /// Protocol v2 is in use (for the failure's likely cause only).
    pub v2: bool,
    /// The partner's NAT as protocol v2 told it (`None`: not told).
    pub partner_nat: Option<NatType>,
}

/// One path being punched.
#[derive(Clone, Debug)]
pub struct Path {
    /// How the path came about.
    pub strategy: Strategy,
    /// Our end.
    pub socket: SocketId,
    /// Where probes go; moves to where the partner actually speaks from.
    pub target: SocketAddr,
    /// Where the path first pointed.
    pub expected: SocketAddr,
    /// Sends only openers until the partner is heard (or the hold ends).
    pub held: bool,
    /// A hard-side birthday path: silent after its opener until it hears
    /// the partner (probing 256 of them would flood the partner's NAT).
    pub quiet: bool,
    /// Openers repeated while holding (the first one is not counted).
    pub held_openers: u32,
    /// Normal probes sent.
    pub sent: u32,
    /// Valid datagrams received.
    pub heard: u32,
    /// The partner's probe arrived here.
    pub heard_probe: bool,
    /// Our nonce came back here.
    pub acked: bool,
    /// Round trip of the first answered probe.
    pub rtt: Option<Duration>,
}

/// A proven path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proven {
    /// The winning path's strategy.
    pub strategy: Strategy,
    /// Its socket.
    pub socket: SocketId,
    /// The partner's address on it.
    pub target: SocketAddr,
    /// The partner's nonce.
    pub peer_nonce: u64,
    /// Round trip, if measured.
    pub rtt: Option<Duration>,
}

/// The likely cause of a failed punch, from the least to the most telling
/// evidence: the most telling one seen on any path of any attempt is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Likely {
    /// Nothing at all came back.
    Silent,
    /// Our easy side probed random ports of the partner and none answered.
    PartnerHard,
    /// Our hard side waited to be found and never was.
    BothHard,
    /// Our probes were answered, the partner's never arrived.
    NoPeerProbe,
    /// The partner's packets arrived but ours never reached it.
    OneWay,
    /// The partner spoke from another port than the server saw.
    PeerMoved,
    /// Both directions worked but nobody confirmed.
    Unconfirmed,
    /// Both peers are behind one public address, and the seed protocol
    /// carries no local address.
    SameNatSeed,
    /// Both peers are behind one public address, and no local address of
    /// the partner answered.
    SameNatSilent,
    /// Both NATs are hard and unmapped (known in advance).
    Hopeless,
}

impl Likely {
    fn of(p: &Path, decider: bool) -> Likely {
        if p.heard == 0 {
            Likely::Silent
        } else if p.target != p.expected && !p.acked {
            Likely::PeerMoved
        } else if !p.acked {
            Likely::OneWay
        } else if !decider {
            Likely::Unconfirmed
        } else {
            Likely::NoPeerProbe
        }
    }

    /// The cause in words.
    pub fn explain(self) -> &'static str {
        match self {
            Likely::Silent => "nothing came back from the peer: likely a NAT that changes ports per destination (symmetric), or a firewall dropping inbound UDP, on either side",
            Likely::PartnerHard => "nothing came back from the peer, not even to birthday probes of its ports: its NAT likely changes ports per destination and it opened no ports toward us (an old client, or its NAT filters by address)",
            Likely::BothHard => "our NAT changes ports per destination and no router port mapping was granted; nothing came from the peer, so its NAT is likely hard too: no direct path can exist (a relay is needed, or port mapping on either router)",
            Likely::NoPeerProbe => "our probes were answered but the peer's own probes never arrived: heavy loss",
            Likely::OneWay => "the peer's packets arrived but ours never reached it: likely our NAT changes ports per destination, or a firewall drops our outbound UDP",
            Likely::PeerMoved => "the peer's packets came from another port than the server saw: its NAT changes ports per destination (symmetric)",
            Likely::Unconfirmed => "both directions worked but the deciding peer never confirmed a path: heavy loss, or it gave up",
            Likely::SameNatSeed => "both peers are behind the same public address, and its NAT does not send traffic for its own public address back inside (no hairpinning); protocol v2 (--token) carries local addresses that connect peers behind one NAT",
            Likely::SameNatSilent => "both peers are behind the same public address, which does not hairpin, and no local address of the peer answered: the peers are on different local networks behind that NAT, a local firewall drops UDP, or neither got the other's local addresses (a lost server reply)",
            Likely::Hopeless => "both NATs change ports per destination and neither has a port mapping: no direct path can exist",
        }
    }
}

/// What a failed attempt saw, for the exit-4 message and the JSON report.
#[derive(Clone, Debug, Default)]
pub struct AttemptReport {
    /// Strategies that sent anything.
    pub tried: Vec<Strategy>,
    /// One line per path (and per birthday role).
    pub notes: Vec<String>,
    /// The most telling cause seen.
    pub likely: Option<Likely>,
    /// Registering again cannot help (both sides hard, or known hopeless).
    pub final_verdict: bool,
}

/// How an attempt ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// A path is proven both ways.
    Connected(Proven),
    /// The window ran out.
    Failed(AttemptReport),
}

/// Counts of what birthday probing did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BirthdayStats {
    /// Hard side: sockets opened.
    pub sockets: u16,
    /// Easy side: random ports probed.
    pub probes: u32,
    /// Paths that a birthday probe opened (either side).
    pub meetings: u32,
}

/// The easy side's random probing.
#[derive(Debug)]
struct EasyProber {
    ports: PortSequence,
    next: Instant,
    interval: Duration,
    limit: u32,
    stopped: bool,
}

/// One attempt's punching; see the module docs.
#[derive(Debug)]
pub struct Punch {
    p: PunchParams,
    decider: bool,
    started: Instant,
    window_end: Instant,
    paths: Vec<Path>,
    transmits: VecDeque<Transmit>,
    commands: VecDeque<Command>,
    next_probe: Instant,
    hold_until: Option<Instant>,
    peer_nonce: u64,
    heard_peer: bool,
    won: Option<(usize, Instant)>,
    easy: Option<EasyProber>,
    stats: BirthdayStats,
    notes: Vec<String>,
    outcome: Option<Outcome>,
    /// Both strategies of the lead/hold rule are on.
    both: bool,
}

impl Punch {
    /// Starts punching at `now`: queues the openers and the socket commands.
    pub fn new(p: PunchParams, now: Instant) -> Punch {
        let decider = p.self_id < p.peer_id;
        let strategies = p.strategies.clone();
        let enabled = |s| strategies.contains(&s);
        let both = enabled(Strategy::Seed) && enabled(Strategy::Observed);
        let lead = if p.opener_ttl > 0 {
            OPENER_LEAD
        } else {
            Duration::ZERO
        };
        let birthday_on = enabled(Strategy::Birthday);
        let mut window = p.window;
        if birthday_on {
            let probing = p.birthday.probing_time() + BIRTHDAY_TAIL;
            if let Some(delay) = p.roles.easy {
                window = window.max(lead + delay + probing);
            }
            if p.roles.hard {
                // Waiting to be found costs nothing (the birthday sockets stay
                // quiet), and the easy partner may start late: when its server
                // reply is lost it gets it only with a later retransmit,
                // seconds later under heavy loss (seen in the lab: 6 s). So the
                // hard side waits until the deadline. Without the partner's
                // type (protocol v2) it cannot tell "late" from "hard too".
                window = window.max(p.deadline.saturating_duration_since(now));
            }
        }
        if p.same_nat && p.v2 && p.partner_local.is_empty() && enabled(Strategy::Local) {
            window = window.min(SAME_NAT_WAIT);
        }
        let window_end = (now + window).min(p.deadline);
        let mut punch = Punch {
            decider,
            started: now,
            window_end,
            paths: Vec::new(),
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
            next_probe: now + lead,
            hold_until: None,
            peer_nonce: 0,
            heard_peer: false,
            won: None,
            easy: None,
            stats: BirthdayStats::default(),
            notes: Vec::new(),
            outcome: None,
            both,
            p,
        };
        if punch.p.roles.hopeless {
            punch.outcome = Some(Outcome::Failed(AttemptReport {
                tried: Vec::new(),
                notes: vec!["both NATs are hard and unmapped (the partner said so)".into()],
                likely: Some(Likely::Hopeless),
                final_verdict: true,
            }));
            return punch;
        }
        if punch.p.same_nat && enabled(Strategy::Local) {
            // First, and at once: no NAT lies between the two, so there is no
            // race for an opener to prevent.
            let probe = punch.header(Kind::Probe, 0, 0, now);
            for c in punch.p.partner_local.clone() {
                let i = punch.add_path(Strategy::Local, SocketId::Main, c, now);
                punch.paths[i].sent += 1;
                punch.push(SocketId::Main, c, None, probe);
            }
        }
        if enabled(Strategy::Observed) {
            let peer = punch.p.reply.peer;
            punch.add_path(Strategy::Observed, SocketId::Main, peer, now);
            // A router mapping is probed like the observed address.
            for c in punch.p.partner_candidates.clone() {
                if c != peer {
                    punch.add_path(Strategy::Observed, SocketId::Main, c, now);
                }
            }
        }
        if enabled(Strategy::Seed) {
            punch.commands.push_back(Command::BindSeed {
                port: punch.p.reply.src_port,
            });
        }
        if birthday_on && punch.p.roles.hard {
            punch.commands.push_back(Command::OpenBirthday {
                count: punch.p.birthday.sockets,
            });
        }
        if birthday_on {
            if let Some(delay) = punch.p.roles.easy {
                let rate = punch.p.birthday.rate.max(1);
                punch.easy = Some(EasyProber {
                    ports: PortSequence::new(punch.p.seed),
                    next: now + lead + delay,
                    interval: Duration::from_secs(1) / rate,
                    limit: punch.p.birthday.probes,
                    stopped: false,
                });
            }
        }
        // Past this, a path still held starts probing normally. Capped so that
        // a short punch window still leaves a third of itself for probing.
        let hold = punch.p.hold_limit.min(punch.p.window * 2 / 3);
        if punch.paths.iter().any(|x| x.held)
            || punch
                .commands
                .iter()
                .any(|c| matches!(c, Command::BindSeed { .. }))
        {
            punch.hold_until = Some(now + hold);
        }
        punch
    }

    /// Whether this side leads `strategy`'s path (probes it at once) or holds
    /// it (openers only until it hears the partner). With seed and observed
    /// both on, each peer leads one: the deciding peer `observed`, the other
    /// `seed`; with one of them, the deciding peer leads it. A hard NAT never
    /// holds: it picks a new port for the partner anyway, so the race the
    /// hold prevents cannot hurt it.
    pub fn leads(strategy: Strategy, both: bool, decider: bool) -> bool {
        if both {
            (strategy == Strategy::Observed) == decider
        } else {
            decider
        }
    }

    fn add_path(
        &mut self,
        strategy: Strategy,
        socket: SocketId,
        target: SocketAddr,
        now: Instant,
    ) -> usize {
        let birthday_hard = strategy == Strategy::Birthday && socket != SocketId::Main;
        // Holding needs openers: without them the partner's probes could
        // never get in, and the hold would only cost time.
        let hold = if matches!(self.p.our_nat, NatType::Hard | NatType::HardMapped) {
            // A hard NAT picks a new port for the partner anyway, so the
            // race the hold prevents cannot hurt our own mapping. But while
            // an easy partner probes random ports of ours, our observed
            // probes (to its main socket, from a new port r of our NAT) hurt
            // its NAT: one lands there before its random probe to r leaves,
            // the probe then clashes with that inbound flow and gets another
            // public port, and Linux gives every later flow of that socket
            // the same other port, so none of its remaining probes can meet
            // the birthday sockets aimed at its real one. Seen in the lab in
            // about 1 easy-hard pair of 100 (NAT A's conntrack: 168 probes
            // from the right port, then 2,905 from another). So the hard
            // side holds that path until it hears the partner, unless the
            // partner is known to be reachable at its observed address
            // through a router mapping (it then needs these probes at once).
            strategy == Strategy::Observed
                && socket == SocketId::Main
                && self.p.roles.hard
                && self.p.partner_nat != Some(NatType::HardMapped)
        } else {
            !Self::leads(strategy, self.both, self.decider)
        };
        let held = !birthday_hard
            && strategy != Strategy::Local
            && self.p.opener_ttl > 0
            && hold
            && !self.heard_peer;
        self.paths.push(Path {
            strategy,
            socket,
            target,
            expected: target,
            held,
            quiet: birthday_hard,
            held_openers: 0,
            sent: 0,
            heard: 0,
            heard_probe: false,
            acked: false,
            rtt: None,
        });
        if birthday_hard || socket != SocketId::Main || strategy == Strategy::Observed {
            // A new local socket (or the observed path at the start) opens
            // its mapping with an opener: it leaves our NAT and dies before
            // the partner's, so the partner's NAT records nothing.
            self.send_opener(socket, target, now);
        }
        self.paths.len() - 1
    }

    fn header(&self, kind: Kind, echo: u64, echo_stamp: u32, now: Instant) -> [u8; HEADER_LEN] {
        Header {
            kind,
            from: self.p.self_id,
            to: self.p.peer_id,
            nonce: self.p.nonce,
            echo,
            // Microseconds, wrapping every 71 minutes: RTTs are differences.
            stamp: stamp(self.p.epoch, now),
            echo_stamp,
        }
        .to_bytes()
    }

    fn push(
        &mut self,
        socket: SocketId,
        to: SocketAddr,
        ttl: Option<u8>,
        header: [u8; HEADER_LEN],
    ) {
        let mut buf = [0u8; TRANSMIT_LEN];
        buf[..HEADER_LEN].copy_from_slice(&header);
        self.transmits.push_back(Transmit {
            socket,
            to,
            ttl,
            buf,
            len: HEADER_LEN,
        });
    }

    fn send_opener(&mut self, socket: SocketId, to: SocketAddr, now: Instant) {
        let probe = self.header(Kind::Probe, 0, 0, now);
        if self.p.opener_ttl > 0 {
            self.push(socket, to, Some(self.p.opener_ttl), probe);
        } else if matches!(socket, SocketId::Birthday(_)) {
            // No openers asked for: a birthday socket's mapping is made by a
            // normal probe instead (it may race the partner's NAT).
            self.push(socket, to, None, probe);
        }
    }

    /// The next command for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The driver opened (or failed to open) a socket asked for by a command.
    pub fn socket_opened(&mut self, socket: SocketId, result: Result<(), String>, now: Instant) {
        let target = match socket {
            SocketId::Seed => SocketAddr::new(self.p.reply.peer.ip(), self.p.reply.dst_port),
            _ => self.p.reply.peer,
        };
        match (socket, result) {
            (SocketId::Seed, Ok(())) => {
                self.add_path(Strategy::Seed, socket, target, now);
            }
            (SocketId::Birthday(_), Ok(())) => {
                self.stats.sockets += 1;
                self.add_path(Strategy::Birthday, socket, target, now);
            }
            (SocketId::Seed, Err(e)) => self.notes.push(format!(
                "seed could not bind local port {}: {e}",
                self.p.reply.src_port
            )),
            (SocketId::Birthday(i), Err(e)) => {
                if i == 0 || self.stats.sockets == 0 {
                    self.notes
                        .push(format!("birthday could not open sockets: {e}"));
                }
            }
            (SocketId::Main, _) => {}
        }
        if self.hold_until.is_some()
            && !self.paths.iter().any(|x| x.held)
            && self.commands.is_empty()
        {
            self.hold_until = None;
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Punch::handle_timeout`] must run next; `None` once over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        let end = match self.won {
            Some((_, until)) => until,
            None => self.window_end,
        };
        let mut t = end.min(self.next_probe);
        if let Some(h) = self.hold_until {
            t = t.min(h);
        }
        if let Some(e) = &self.easy {
            if !e.stopped && self.won.is_none() {
                t = t.min(e.next);
            }
        }
        Some(t)
    }

    /// The result, once the attempt is over.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Birthday counts so far.
    pub fn birthday_stats(&self) -> BirthdayStats {
        let mut s = self.stats;
        s.probes = self.easy.as_ref().map_or(0, |e| e.ports.count());
        s
    }

    /// The paths, for tests and reports.
    pub fn paths(&self) -> &[Path] {
        &self.paths
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        if let Some((i, until)) = self.won {
            if now >= until {
                // No echo of done: the path is proven, go ahead.
                self.finish(i);
                return;
            }
        } else if now >= self.window_end {
            self.fail();
            return;
        }
        if self.hold_until.is_some_and(|t| now >= t) {
            self.release();
        }
        if now >= self.next_probe {
            self.probe_round(now);
            self.next_probe = now + PROBE_INTERVAL;
        }
        self.birthday_probes(now);
    }

    fn probe_round(&mut self, now: Instant) {
        if let Some((i, _)) = self.won {
            let done = self.header(Kind::Done, self.peer_nonce, 0, now);
            let (socket, to) = (self.paths[i].socket, self.paths[i].target);
            self.push(socket, to, None, done);
            return;
        }
        let probe = self.header(Kind::Probe, self.peer_nonce, 0, now);
        for k in 0..self.paths.len() {
            let p = &mut self.paths[k];
            if p.quiet {
                continue;
            }
            let (socket, to) = (p.socket, p.target);
            if p.held {
                // Keeps (or, if the first was lost, makes) our mapping
                // without touching the partner's NAT.
                p.held_openers += 1;
                let ttl = self.p.opener_ttl;
                self.push(socket, to, Some(ttl), probe);
            } else {
                p.sent += 1;
                self.push(socket, to, None, probe);
            }
        }
    }

    fn birthday_probes(&mut self, now: Instant) {
        let probe = self.header(Kind::Probe, self.peer_nonce, 0, now);
        let ip = self.p.reply.peer.ip();
        let won = self.won.is_some();
        let Some(e) = self.easy.as_mut() else { return };
        if e.stopped || won {
            return;
        }
        let mut burst = 0;
        let mut out = Vec::new();
        while now >= e.next && burst < BIRTHDAY_BURST {
            if e.ports.count() >= e.limit {
                e.stopped = true;
                break;
            }
            let Some(port) = e.ports.next_port() else {
                e.stopped = true;
                break;
            };
            out.push(SocketAddr::new(ip, port));
            e.next += e.interval;
            burst += 1;
        }
        if burst == BIRTHDAY_BURST && now >= e.next {
            // Behind schedule: drop the backlog rather than burst it.
            e.next = now + e.interval;
        }
        for to in out {
            self.push(SocketId::Main, to, None, probe);
        }
    }

    /// Ends the hold: every held path probes normally from the next round.
    fn release(&mut self) {
        for p in &mut self.paths {
            p.held = false;
        }
        self.hold_until = None;
    }

    fn is_partner(&self, ip: IpAddr) -> bool {
        ip == self.p.reply.peer.ip()
            || self.p.partner_candidates.iter().any(|c| c.ip() == ip)
            || self.p.partner_local.iter().any(|c| c.ip() == ip)
    }

    /// Whether a valid datagram on `socket` from an address we were not told
    /// of may be the partner on its LAN (see [`PunchParams::same_nat`]).
    fn reflexive(&self, socket: SocketId) -> bool {
        socket == SocketId::Main && self.p.same_nat && self.p.strategies.contains(&Strategy::Local)
    }

    /// A datagram that arrived on `socket` from `from` at `now`.
    pub fn handle(&mut self, now: Instant, socket: SocketId, from: SocketAddr, datagram: &[u8]) {
        if self.outcome.is_some() {
            return;
        }
        let Ok((h, _)) = Header::parse(datagram) else {
            return;
        };
        if h.from != self.p.peer_id
            || h.to != self.p.self_id
            || !(self.is_partner(from.ip()) || self.reflexive(socket))
        {
            return;
        }
        let Some(i) = self.path_for(socket, from, now) else {
            return;
        };
        self.heard_peer = true;
        self.peer_nonce = h.nonce;
        let our_nonce = self.p.nonce;
        {
            let p = &mut self.paths[i];
            if p.quiet {
                // A birthday probe met this socket: it becomes a normal path.
                p.quiet = false;
                self.stats.meetings += 1;
            }
        }
        match h.kind {
            Kind::Probe => {
                let p = &mut self.paths[i];
                p.heard += 1;
                p.heard_probe = true;
                let (s, to) = (p.socket, p.target);
                let answer = self.header(Kind::Reply, h.nonce, h.stamp, now);
                self.push(s, to, None, answer);
            }
            Kind::Reply if h.echo == our_nonce => {
                let us = stamp(self.p.epoch, now).wrapping_sub(h.echo_stamp);
                let p = &mut self.paths[i];
                p.heard += 1;
                p.acked = true;
                if p.rtt.is_none() {
                    p.rtt = Some(Duration::from_micros(u64::from(us)));
                }
            }
            Kind::Done if h.echo == our_nonce => {
                if self.decider {
                    if matches!(self.won, Some((w, _)) if w == i) {
                        self.finish(i);
                        return;
                    }
                } else {
                    let (s, to) = (self.paths[i].socket, self.paths[i].target);
                    let done = self.header(Kind::Done, h.nonce, h.stamp, now);
                    self.push(s, to, None, done);
                    self.finish(i);
                    return;
                }
            }
            // The partner is already in its session on the path we picked:
            // as good as the echo of done.
            Kind::Data | Kind::Keepalive | Kind::Bye if self.decider => {
                if matches!(self.won, Some((w, _)) if w == i) {
                    self.finish(i);
                    return;
                }
            }
            _ => {}
        }
        let p = &self.paths[i];
        if self.decider && self.won.is_none() && p.heard_probe && p.acked {
            let (s, to) = (p.socket, p.target);
            let done = self.header(Kind::Done, self.peer_nonce, 0, now);
            self.push(s, to, None, done);
            let until = (now + CONFIRM_WAIT).min(self.p.deadline + CONFIRM_GRACE);
            self.won = Some((i, until));
            self.next_probe = now + PROBE_INTERVAL;
        }
        // Anything from the partner (a normal-TTL packet: openers die on the
        // way) means it has its reply and its openers have left its NAT, on
        // every path at once: probing normally can no longer race them.
        if self.hold_until.is_some() {
            self.release();
            self.next_probe = now.min(self.next_probe);
        }
        // Heard: random probing has done its job or was never needed.
        if let Some(e) = self.easy.as_mut() {
            e.stopped = true;
        }
    }

    /// The path a datagram on `socket` from `from` belongs to, made if needed.
    fn path_for(&mut self, socket: SocketId, from: SocketAddr, now: Instant) -> Option<usize> {
        if let Some(i) = self
            .paths
            .iter()
            .position(|p| p.socket == socket && p.target == from)
        {
            return Some(i);
        }
        // An answer to one of the easy side's random probes: a new path.
        if socket == SocketId::Main {
            if let Some(e) = &self.easy {
                if e.ports.was_drawn(from.port()) {
                    self.stats.meetings += 1;
                    let i = self.add_path(Strategy::Birthday, SocketId::Main, from, now);
                    self.paths[i].held = false;
                    return Some(i);
                }
            }
        }
        // The partner on its LAN, from an address we were not told of.
        let public = from.ip() == self.p.reply.peer.ip()
            || self
                .p
                .partner_candidates
                .iter()
                .any(|c| c.ip() == from.ip());
        if !public && self.reflexive(socket) {
            return Some(self.add_path(Strategy::Local, socket, from, now));
        }
        // The partner speaks from another port than expected (its NAT
        // changed it, or a router mapping let it in): follow it.
        let i = self
            .paths
            .iter()
            .position(|p| p.socket == socket && p.strategy != Strategy::Local)?;
        self.paths[i].target = from;
        Some(i)
    }

    fn finish(&mut self, i: usize) {
        let p = &self.paths[i];
        self.outcome = Some(Outcome::Connected(Proven {
            strategy: p.strategy,
            socket: p.socket,
            target: p.target,
            peer_nonce: self.peer_nonce,
            rtt: p.rtt,
        }));
    }

    fn fail(&mut self) {
        let mut report = AttemptReport {
            tried: Vec::new(),
            notes: std::mem::take(&mut self.notes),
            likely: None,
            final_verdict: false,
        };
        report.tried = self.tried();
        for p in self
            .paths
            .iter()
            .filter(|p| p.strategy != Strategy::Birthday || p.heard > 0)
        {
            report.notes.push(path_note(p));
            report.likely = report.likely.max(Some(Likely::of(p, self.decider)));
        }
        let stats = self.birthday_stats();
        if self.stats.sockets > 0 {
            report.notes.push(format!(
                "birthday: waited to be found on {} sockets, {} met",
                self.stats.sockets, stats.meetings
            ));
            if !self.heard_peer {
                // Nothing at all: an easy partner would have probed us by now.
                report.likely = report.likely.max(Some(Likely::BothHard));
                report.final_verdict = true;
            }
        }
        if self.p.same_nat {
            // The most telling fact: nothing else could have worked without
            // a NAT that hairpins.
            if self.p.partner_local.is_empty() && self.p.strategies.contains(&Strategy::Local) {
                report.notes.push(if self.p.v2 {
                    "local: the server's reply carried no local address of the peer, and none of its probes reached us".into()
                } else {
                    "local: the seed protocol carries no local addresses".into()
                });
            }
            report.likely = report.likely.max(Some(if self.p.v2 {
                Likely::SameNatSilent
            } else {
                Likely::SameNatSeed
            }));
            // The seed protocol will never carry a local address: registering
            // again cannot help. With v2 it can (a lost reply's replay
            // carries none).
            report.final_verdict |= !self.p.v2;
        }
        if let Some(e) = &self.easy {
            report.notes.push(format!(
                "birthday: probed {} random ports of {}",
                e.ports.count(),
                self.p.reply.peer.ip()
            ));
            if !self.heard_peer && e.ports.count() > 0 {
                report.likely = report.likely.max(Some(Likely::PartnerHard));
            }
        }
        self.outcome = Some(Outcome::Failed(report));
    }

    /// The strategies this attempt used (a path, birthday sockets or probes).
    pub fn tried(&self) -> Vec<Strategy> {
        Strategy::ALL
            .into_iter()
            .filter(|&s| {
                self.p.strategies.contains(&s)
                    && (self.paths.iter().any(|p| p.strategy == s)
                        || (s == Strategy::Birthday
                            && (self.stats.sockets > 0
                                || self.easy.as_ref().is_some_and(|e| e.ports.count() > 0))))
            })
            .collect()
    }

    /// When punching began.
    pub fn started(&self) -> Instant {
        self.started
    }
}

fn stamp(epoch: Instant, now: Instant) -> u32 {
    now.saturating_duration_since(epoch).as_micros() as u32
}

fn path_note(p: &Path) -> String {
    let moved = if p.target != p.expected {
        format!(" (the peer spoke from {})", p.target)
    } else {
        String::new()
    };
    let held = if p.held_openers > 0 {
        format!(" after {} openers while holding", p.held_openers)
    } else {
        String::new()
    };
    format!(
        "{} to {}{moved}: {} probes sent{held}, {} answers",
        p.strategy, p.expected, p.sent, p.heard
    )
}

#[cfg(test)]
mod tests;
