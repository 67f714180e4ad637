//! The punch state machine against a simulated network of two NATs, without
//! sockets: easy and hard NATs (address- and port-dependent filtering; the
//! hard one picks a random port per destination), openers that leave their
//! own NAT and die before the other, loss, and a fixed one-way delay.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest, ProptestConfig};
use rand_xoshiro::rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::*;
use crate::client::birthday::{PORT_LO, PORT_RANGE};
use crate::client::config::{Birthday, HOLD_LIMIT};
use crate::client::nat::roles;

const ONE_WAY: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Keeps the local port for every destination.
    Easy,
    /// A random public port per (socket, destination).
    Hard,
}

/// One side: its NAT, its mappings and its filter.
struct Side {
    ip: IpAddr,
    nat: Behaviour,
    /// (socket, remote) -> public port.
    out: HashMap<(SocketId, SocketAddr), u16>,
    /// (public port, remote) -> socket: what the filter lets in.
    inbound: HashMap<(u16, SocketAddr), SocketId>,
    local_port: HashMap<SocketId, u16>,
    punch: Punch,
    sent: u32,
}

impl Side {
    fn local(&self, s: SocketId) -> u16 {
        self.local_port[&s]
    }

    /// The public source of a datagram from `s` to `to`, making the mapping.
    fn map(&mut self, s: SocketId, to: SocketAddr, rng: &mut Xoshiro256PlusPlus) -> SocketAddr {
        let port = match self.out.get(&(s, to)) {
            Some(&p) => p,
            None => {
                let p = match self.nat {
                    Behaviour::Easy => self.local(s),
                    Behaviour::Hard => loop {
                        let p = PORT_LO + (rng.next_u32() % PORT_RANGE) as u16;
                        if !self.out.values().any(|&q| q == p) {
                            break p;
                        }
                    },
                };
                self.out.insert((s, to), p);
                self.inbound.insert((p, to), s);
                p
            }
        };
        SocketAddr::new(self.ip, port)
    }
}

struct Sim {
    sides: [Side; 2],
    rng: Xoshiro256PlusPlus,
    loss_percent: u32,
    /// (arrival, seq) -> (to side, from, to port, datagram)
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: BTreeMap<u64, (usize, SocketAddr, u16, Vec<u8>)>,
    seq: u64,
}

const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 4949);

fn params(
    self_id: u32,
    peer_id: u32,
    reply: Reply,
    t0: Instant,
    our: NatType,
    seed: u64,
) -> PunchParams {
    PunchParams {
        self_id: PeerId::from_u32(self_id),
        peer_id: PeerId::from_u32(peer_id),
        nonce: seed | 1,
        epoch: t0,
        reply,
        strategies: Strategy::ALL.to_vec(),
        opener_ttl: 2,
        window: Duration::from_secs(3),
        hold_limit: HOLD_LIMIT,
        deadline: t0 + Duration::from_secs(10),
        our_nat: our,
        roles: roles(our, None, Birthday::DEFAULT.delay),
        birthday: Birthday::DEFAULT,
        seed,
        partner_candidates: Vec::new(),
        partner_local: Vec::new(),
        same_nat: false,
        v2: false,
        partner_nat: None,
    }
}

impl Sim {
    /// Both sides registered from their main socket (local port 40000+i)
    /// with the server; the server picked ports 2000/3000.
    fn new(nats: [Behaviour; 2], loss_percent: u32, seed: u64) -> Sim {
        let t0 = Instant::now();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let ips: [IpAddr; 2] = [
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        ];
        let mut publics = [SERVER; 2];
        let mut outs: [HashMap<(SocketId, SocketAddr), u16>; 2] = Default::default();
        for i in 0..2 {
            let port = match nats[i] {
                Behaviour::Easy => 40000 + i as u16,
                Behaviour::Hard => PORT_LO + (rng.next_u32() % PORT_RANGE) as u16,
            };
            outs[i].insert((SocketId::Main, SERVER), port);
            publics[i] = SocketAddr::new(ips[i], port);
        }
        let nat_type = |b| match b {
            Behaviour::Easy => NatType::Easy,
            Behaviour::Hard => NatType::Hard,
        };
        let ports = [(2000, 3000), (3000, 2000)];
        let sides = [0usize, 1].map(|i| {
            let reply = Reply {
                src_port: ports[i].0,
                dst_port: ports[i].1,
                peer: publics[1 - i],
            };
            let mut local_port = HashMap::new();
            local_port.insert(SocketId::Main, 40000 + i as u16);
            Side {
                ip: ips[i],
                nat: nats[i],
                out: outs[i].clone(),
                inbound: HashMap::new(),
                local_port,
                punch: Punch::new(
                    params(
                        1 + i as u32,
                        2 - i as u32,
                        reply,
                        t0,
                        nat_type(nats[i]),
                        seed.wrapping_add(i as u64),
                    ),
                    t0,
                ),
                sent: 0,
            }
        });
        let mut sim = Sim {
            sides,
            rng,
            loss_percent,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
        };
        for i in 0..2 {
            sim.run_side(i, t0);
        }
        sim
    }

    /// Executes commands and sends transmits of side `i` at `now`.
    fn run_side(&mut self, i: usize, now: Instant) {
        while let Some(c) = self.sides[i].punch.poll_command() {
            match c {
                Command::BindSeed { port } => {
                    self.sides[i].local_port.insert(SocketId::Seed, port);
                    self.sides[i]
                        .punch
                        .socket_opened(SocketId::Seed, Ok(()), now);
                }
                Command::OpenBirthday { count } => {
                    for k in 0..count {
                        let id = SocketId::Birthday(k);
                        self.sides[i].local_port.insert(id, 50000 + k);
                        self.sides[i].punch.socket_opened(id, Ok(()), now);
                    }
                }
            }
        }
        while let Some(t) = self.sides[i].punch.poll_transmit() {
            self.sides[i].sent += 1;
            let from = self.sides[i].map(t.socket, t.to, &mut self.rng);
            // Openers die between the NATs; the rest may be lost.
            if t.ttl.is_some() || self.rng.next_u32() % 100 < self.loss_percent {
                continue;
            }
            let other = 1 - i;
            if t.to.ip() != self.sides[other].ip {
                continue;
            }
            self.seq += 1;
            self.in_flight
                .insert(self.seq, (other, from, t.to.port(), t.data().to_vec()));
            self.queue.push(Reverse((now + ONE_WAY, self.seq)));
        }
    }

    /// Runs until both outcomes are in or the simulated time passes `limit`.
    fn run(&mut self, limit: Duration) -> Instant {
        let t0 = self.sides[0].punch.started();
        let mut now = t0;
        loop {
            let done = self.sides.iter().all(|s| s.punch.outcome().is_some());
            if done || now > t0 + limit {
                return now;
            }
            let next_timer = self
                .sides
                .iter()
                .filter_map(|s| s.punch.poll_timeout())
                .min();
            let next_arrival = self.queue.peek().map(|Reverse((t, _))| *t);
            now = match (next_timer, next_arrival) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => return now,
            };
            while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
                if t > now {
                    break;
                }
                self.queue.pop();
                let (side, from, port, buf) = self.in_flight.remove(&seq).unwrap();
                let s = &mut self.sides[side];
                if let Some(&socket) = s.inbound.get(&(port, from)) {
                    s.punch.handle(now, socket, from, &buf);
                }
                self.run_side(side, now);
            }
            for i in 0..2 {
                if self.sides[i].punch.poll_timeout().is_some_and(|t| t <= now) {
                    self.sides[i].punch.handle_timeout(now);
                }
                self.run_side(i, now);
            }
        }
    }

    fn proven(&self, i: usize) -> Option<Proven> {
        match self.sides[i].punch.outcome()? {
            Outcome::Connected(p) => Some(*p),
            Outcome::Failed(_) => None,
        }
    }

    /// Both connected, and on the two ends of one path.
    fn same_path(&mut self) -> bool {
        let (Some(a), Some(b)) = (self.proven(0), self.proven(1)) else {
            return false;
        };
        let a_pub = self.sides[0].out.get(&(a.socket, a.target)).copied();
        let b_pub = self.sides[1].out.get(&(b.socket, b.target)).copied();
        a_pub.map(|p| SocketAddr::new(self.sides[0].ip, p)) == Some(b.target)
            && b_pub.map(|p| SocketAddr::new(self.sides[1].ip, p)) == Some(a.target)
    }
}

#[test]
fn two_easy_nats_connect_by_normal_punching_without_random_probes() {
    let mut sim = Sim::new([Behaviour::Easy, Behaviour::Easy], 0, 1);
    sim.run(Duration::from_secs(12));
    assert!(sim.same_path());
    let (a, b) = (sim.proven(0).unwrap(), sim.proven(1).unwrap());
    assert_eq!(a.strategy, b.strategy);
    assert_ne!(a.strategy, Strategy::Birthday);
    for s in &sim.sides {
        assert_eq!(
            s.punch.birthday_stats().probes,
            0,
            "probed random ports needlessly"
        );
        assert!(s.sent < 40, "{} datagrams", s.sent);
    }
}

#[test]
fn easy_and_hard_meet_by_birthday_probing() {
    for seed in 1..=5 {
        let mut sim = Sim::new([Behaviour::Easy, Behaviour::Hard], 0, seed);
        sim.run(Duration::from_secs(12));
        assert!(sim.same_path(), "seed {seed}");
        assert_eq!(sim.proven(0).unwrap().strategy, Strategy::Birthday);
        assert_eq!(sim.proven(1).unwrap().strategy, Strategy::Birthday);
        let easy = sim.sides[0].punch.birthday_stats();
        let hard = sim.sides[1].punch.birthday_stats();
        assert_eq!(hard.sockets, 256);
        assert!(easy.probes > 0 && easy.probes <= 2048);
        assert_eq!(easy.meetings + hard.meetings, 2, "{easy:?} {hard:?}");
    }
}

#[test]
fn two_hard_nats_fail_with_the_verdict() {
    let mut sim = Sim::new([Behaviour::Hard, Behaviour::Hard], 0, 3);
    sim.run(Duration::from_secs(12));
    for s in &sim.sides {
        let Some(Outcome::Failed(r)) = s.punch.outcome() else {
            panic!("connected through two hard NATs?");
        };
        assert_eq!(r.likely, Some(Likely::BothHard));
        assert!(r.final_verdict);
        assert!(r.tried.contains(&Strategy::Birthday));
    }
}

#[test]
fn known_hopeless_pair_fails_at_once() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: SERVER,
    };
    let mut p = params(1, 2, reply, t0, NatType::Hard, 1);
    p.roles = roles(NatType::Hard, Some(NatType::Hard), Duration::ZERO);
    let mut punch = Punch::new(p, t0);
    assert!(
        matches!(punch.outcome(), Some(Outcome::Failed(r)) if r.likely == Some(Likely::Hopeless))
    );
    assert!(punch.poll_transmit().is_none());
    assert!(punch.poll_command().is_none());
}

#[test]
fn foreign_datagrams_are_ignored() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.2:40001".parse().unwrap(),
    };
    let mut punch = Punch::new(params(1, 2, reply, t0, NatType::Easy, 1), t0);
    let probe = |from: u32, to: u32| {
        Header {
            kind: Kind::Probe,
            from: PeerId::from_u32(from),
            to: PeerId::from_u32(to),
            nonce: 7,
            echo: 0,
            stamp: 0,
            echo_stamp: 0,
        }
        .to_bytes()
    };
    while punch.poll_transmit().is_some() {}
    // Wrong IDs, wrong source IP, garbage: no answer, no path.
    punch.handle(t0, SocketId::Main, reply.peer, &probe(3, 1));
    punch.handle(t0, SocketId::Main, reply.peer, &probe(2, 3));
    punch.handle(
        t0,
        SocketId::Main,
        "192.0.2.9:40001".parse().unwrap(),
        &probe(2, 1),
    );
    punch.handle(t0, SocketId::Main, reply.peer, b"garbage");
    assert!(punch.poll_transmit().is_none());
    // The partner: answered at once, with its nonce echoed.
    punch.handle(t0, SocketId::Main, reply.peer, &probe(2, 1));
    let t = punch.poll_transmit().expect("a reply");
    let (h, _) = Header::parse(t.data()).unwrap();
    assert_eq!(
        (h.kind, h.echo, t.to, t.ttl),
        (Kind::Reply, 7, reply.peer, None)
    );
}

/// Protocol v2's candidates (here a LAN address, as for two peers behind
/// one NAT that does not hairpin): probed from the main socket, and the
/// partner's datagrams from them are accepted and answered there.
#[test]
fn partner_candidates_are_probed_and_accepted() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.2:40001".parse().unwrap(),
    };
    let lan: SocketAddr = "192.168.1.20:40001".parse().unwrap();
    let mut p = params(1, 2, reply, t0, NatType::Easy, 1);
    p.partner_candidates = vec![lan];
    let mut punch = Punch::new(p, t0);
    punch.handle_timeout(t0 + Duration::from_millis(150));
    let mut to_lan = 0;
    while let Some(t) = punch.poll_transmit() {
        if t.to == lan && t.socket == SocketId::Main {
            to_lan += 1;
        }
    }
    assert!(to_lan >= 1, "the candidate was not probed");
    let probe = Header {
        kind: Kind::Probe,
        from: PeerId::from_u32(2),
        to: PeerId::from_u32(1),
        nonce: 7,
        echo: 0,
        stamp: 0,
        echo_stamp: 0,
    }
    .to_bytes();
    punch.handle(t0 + Duration::from_millis(160), SocketId::Main, lan, &probe);
    let answered = std::iter::from_fn(|| punch.poll_transmit())
        .any(|t| t.to == lan && Header::parse(t.data()).is_ok_and(|(h, _)| h.kind == Kind::Reply));
    assert!(answered, "the candidate's probe was not answered");
}

fn probe_from(from: u32, to: u32, nonce: u64) -> [u8; HEADER_LEN] {
    Header {
        kind: Kind::Probe,
        from: PeerId::from_u32(from),
        to: PeerId::from_u32(to),
        nonce,
        echo: 0,
        stamp: 0,
        echo_stamp: 0,
    }
    .to_bytes()
}

/// Two peers behind one NAT (the server saw the same public IP for both):
/// the partner's local address is probed at once, before any opener lead,
/// from the main socket, and its answer makes a `local` path.
#[test]
fn same_nat_probes_local_addresses_first() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.1:40002".parse().unwrap(),
    };
    let lan: SocketAddr = "10.1.0.3:40002".parse().unwrap();
    let mut p = params(1, 2, reply, t0, NatType::Easy, 1);
    p.partner_local = vec![lan];
    p.same_nat = true;
    p.v2 = true;
    let mut punch = Punch::new(p, t0);
    let first = punch.poll_transmit().expect("a datagram at once");
    assert_eq!(
        (first.to, first.socket, first.ttl),
        (lan, SocketId::Main, None)
    );
    assert_eq!(punch.paths()[0].strategy, Strategy::Local);
    assert!(!punch.paths()[0].held);
    while punch.poll_transmit().is_some() {}
    punch.handle(t0, SocketId::Main, lan, &probe_from(2, 1, 7));
    let t = punch.poll_transmit().expect("answered");
    assert_eq!(t.to, lan);
    assert_eq!(Header::parse(t.data()).unwrap().0.kind, Kind::Reply);
}

/// The partner that did not get our local addresses (its server reply
/// carried none) still finds us: our probes reach it from our LAN address,
/// which it has never heard of; behind one NAT it answers them there. The
/// same datagram is ignored when the public addresses differ.
#[test]
fn same_nat_answers_the_partner_from_an_unknown_local_address() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.1:40002".parse().unwrap(),
    };
    let lan: SocketAddr = "10.1.0.3:40002".parse().unwrap();
    for same_nat in [false, true] {
        let mut p = params(1, 2, reply, t0, NatType::Easy, 1);
        p.same_nat = same_nat;
        p.v2 = true;
        let mut punch = Punch::new(p, t0);
        while punch.poll_transmit().is_some() {}
        // Wrong IDs are ignored either way.
        punch.handle(t0, SocketId::Main, lan, &probe_from(3, 1, 7));
        assert!(punch.poll_transmit().is_none());
        punch.handle(t0, SocketId::Main, lan, &probe_from(2, 1, 7));
        let answered = std::iter::from_fn(|| punch.poll_transmit()).any(|t| t.to == lan);
        assert_eq!(answered, same_nat);
        let local = punch
            .paths()
            .iter()
            .any(|p| p.strategy == Strategy::Local && p.target == lan);
        assert_eq!(local, same_nat);
        // The observed path still points at the public address.
        assert!(punch
            .paths()
            .iter()
            .any(|p| p.strategy == Strategy::Observed && p.target == reply.peer));
    }
}

/// Behind one NAT with the seed protocol, the failure says why, and it is
/// final: registering again cannot bring local addresses.
#[test]
fn same_nat_without_v2_fails_saying_so() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.1:40002".parse().unwrap(),
    };
    for v2 in [false, true] {
        let mut p = params(1, 2, reply, t0, NatType::Easy, 1);
        p.same_nat = true;
        p.v2 = v2;
        p.roles = Roles {
            hard: false,
            easy: None,
            hopeless: false,
        };
        let mut punch = Punch::new(p, t0);
        while punch.outcome().is_none() {
            while punch.poll_transmit().is_some() {}
            let now = punch.poll_timeout().unwrap();
            punch.handle_timeout(now);
        }
        let Some(Outcome::Failed(r)) = punch.outcome() else {
            panic!("connected to nobody?")
        };
        let want = if v2 {
            Likely::SameNatSilent
        } else {
            Likely::SameNatSeed
        };
        assert_eq!(r.likely, Some(want));
        assert_eq!(r.final_verdict, !v2);
        assert!(want.explain().contains("same public address"));
    }
    assert!(Likely::SameNatSeed
        .explain()
        .contains("protocol v2 (--token)"));
}

/// Two peers behind one NAT that does not hairpin connect on their local
/// addresses through the simulated LAN, whichever of them got the other's
/// addresses (the server relays the completer's to the waiter only).
#[test]
fn same_nat_peers_connect_when_only_one_knows_the_other() {
    for knows in [0usize, 1] {
        let t0 = Instant::now();
        let public: IpAddr = "203.0.113.1".parse().unwrap();
        let lan: [SocketAddr; 2] = [
            "10.1.0.2:40000".parse().unwrap(),
            "10.1.0.3:40001".parse().unwrap(),
        ];
        let mut punches: Vec<Punch> = (0..2)
            .map(|i| {
                let reply = Reply {
                    src_port: 2000,
                    dst_port: 3000,
                    peer: SocketAddr::new(public, 40001 - i as u16),
                };
                let mut p = params(
                    1 + i as u32,
                    2 - i as u32,
                    reply,
                    t0,
                    NatType::Easy,
                    9 + i as u64,
                );
                p.same_nat = true;
                p.v2 = true;
                p.roles = Roles {
                    hard: false,
                    easy: None,
                    hopeless: false,
                };
                if i == knows {
                    p.partner_local = vec![lan[1 - i]];
                }
                Punch::new(p, t0)
            })
            .collect();
        let mut now = t0;
        for _ in 0..200 {
            // Deliver what each sends on the LAN at once; the public
            // address does not hairpin (dropped). Other sockets: dropped.
            for i in 0..2 {
                while let Some(t) = punches[i].poll_transmit() {
                    if t.socket == SocketId::Main && t.to == lan[1 - i] {
                        punches[1 - i].handle(now, SocketId::Main, lan[i], t.data());
                    }
                }
            }
            if punches.iter().all(|p| p.outcome().is_some()) {
                break;
            }
            now = punches
                .iter()
                .filter_map(|p| p.poll_timeout())
                .min()
                .unwrap_or(now);
            for p in &mut punches {
                p.handle_timeout(now);
            }
        }
        for (i, p) in punches.iter().enumerate() {
            match p.outcome() {
                Some(Outcome::Connected(c)) => {
                    assert_eq!((c.strategy, c.target), (Strategy::Local, lan[1 - i]))
                }
                other => panic!("side {i} (knows {knows}): {other:?}"),
            }
        }
    }
}

/// A hard side facing a partner that may probe random ports of it sends
/// its observed path nothing but low-TTL openers until it hears the
/// partner (its normal probes would make the partner's NAT move the
/// partner's probes to another port); facing a partner known to be mapped,
/// it probes at once.
#[test]
fn a_hard_side_holds_its_observed_path_unless_the_partner_is_mapped() {
    let t0 = Instant::now();
    let reply = Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "203.0.113.2:40001".parse().unwrap(),
    };
    for partner in [None, Some(NatType::Easy), Some(NatType::HardMapped)] {
        let mut p = params(1, 2, reply, t0, NatType::Hard, 1);
        p.roles = roles(NatType::Hard, partner, Birthday::DEFAULT.delay);
        p.partner_nat = partner;
        let mut punch = Punch::new(p, t0);
        let mut now = t0;
        let mut normal = 0;
        while now < t0 + Duration::from_millis(1500) {
            while let Some(t) = punch.poll_transmit() {
                if t.socket == SocketId::Main && t.to == reply.peer && t.ttl.is_none() {
                    normal += 1;
                }
            }
            now = punch.poll_timeout().unwrap();
            punch.handle_timeout(now);
        }
        let mapped = partner == Some(NatType::HardMapped);
        assert_eq!(normal > 0, mapped, "{partner:?}: {normal} normal probes");
    }
}

#[test]
fn exactly_one_peer_leads_each_path() {
    for both in [true, false] {
        for s in [Strategy::Seed, Strategy::Observed] {
            assert_ne!(
                Punch::leads(s, both, true),
                Punch::leads(s, both, false),
                "{s} both={both}"
            );
        }
    }
    for decider in [true, false] {
        assert_ne!(
            Punch::leads(Strategy::Seed, true, decider),
            Punch::leads(Strategy::Observed, true, decider)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the NATs, the loss and the seeds: each side ends by itself
    /// within its deadline (plus the grace for the echo of done), two
    /// connected sides are on the two ends of one path, and the random
    /// probes never exceed their budget.
    #[test]
    fn ends_in_time_and_never_on_different_paths(
        seed: u64,
        a_hard: bool,
        b_hard: bool,
        loss in 0u32..30,
    ) {
        let nat = |h| if h { Behaviour::Hard } else { Behaviour::Easy };
        let mut sim = Sim::new([nat(a_hard), nat(b_hard)], loss, seed);
        let t0 = sim.sides[0].punch.started();
        let end = sim.run(Duration::from_secs(20));
        prop_assert!(end <= t0 + Duration::from_secs(10) + CONFIRM_GRACE + ONE_WAY * 4);
        for s in &sim.sides {
            prop_assert!(s.punch.outcome().is_some());
            prop_assert!(s.punch.birthday_stats().probes <= Birthday::DEFAULT.probes);
        }
        if sim.proven(0).is_some() && sim.proven(1).is_some() {
            prop_assert!(sim.same_path());
        }
        if a_hard && b_hard {
            prop_assert!(sim.proven(0).is_none() && sim.proven(1).is_none());
        }
        if !a_hard && !b_hard && loss == 0 {
            prop_assert!(sim.same_path());
        }
    }

    /// Arbitrary bytes from anywhere never panic and never make a path.
    #[test]
    fn garbage_never_makes_a_path(data in proptest::collection::vec(any::<u8>(), 0..64), port: u16) {
        let t0 = Instant::now();
        let reply = Reply { src_port: 2000, dst_port: 3000, peer: "203.0.113.2:40001".parse().unwrap() };
        let mut punch = Punch::new(params(1, 2, reply, t0, NatType::Easy, 1), t0);
        let n = punch.paths().len();
        punch.handle(t0, SocketId::Main, SocketAddr::new(reply.peer.ip(), port), &data);
        prop_assert_eq!(punch.paths().len(), n);
    }
}
