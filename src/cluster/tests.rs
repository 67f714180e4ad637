//! The cluster state machine, and a whole cluster simulated in memory:
//! three members, each with a real [`Engine`], exchanging real sealed
//! datagrams through a queue that stands for the network.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::engine::{Engine, EngineConfig, Outcome, SourceLimits, Transmit};
use crate::wire::cluster::{field, MAX_LEN};
use crate::wire::{PeerId, Reply, Request, MAX_REPLY_LEN};

const T0: Now = Now {
    mono_ms: 1_000,
    unix_ms: 1_700_000_000_000,
};

fn at(ms: u64) -> Now {
    Now {
        mono_ms: T0.mono_ms + ms,
        unix_ms: T0.unix_ms + ms,
    }
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key() -> ClusterKey {
    let secret: Vec<u8> = (0u8..32).collect();
    ClusterKey::new(&[&secret]).unwrap()
}

fn config(bind: SocketAddr) -> ClusterConfig {
    ClusterConfig {
        bind,
        members: MemberSource::Static(Vec::new()),
        timeout: Duration::from_secs(2),
        key: key(),
    }
}

/// A member in the simulation: where clients send to, and its parts.
struct Node {
    client_addr: SocketAddr,
    cluster: Cluster,
    sealer: Sealer,
    engine: Engine,
}

/// What went over the simulated network.
#[derive(Default)]
struct Wire {
    /// Cluster datagrams in flight: (destination cluster address, bytes).
    cluster: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Datagrams sent to clients: (from the member's client address, to, bytes).
    to_clients: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every cluster datagram ever sent, with its kind.
    sent: Vec<(Kind, Vec<u8>)>,
}

struct Sim {
    nodes: Vec<Node>,
    wire: Wire,
    now: Now,
}

fn cluster_addr(i: usize) -> SocketAddr {
    SocketAddr::new(format!("10.0.0.{}", i + 2).parse().unwrap(), 1025)
}

impl Sim {
    fn new(n: usize) -> Sim {
        let list: Vec<SocketAddr> = (0..n).map(cluster_addr).collect();
        let nodes = (0..n)
            .map(|i| {
                let mut cluster = Cluster::new(&config(cluster_addr(i)), T0);
                cluster.set_members(&list, T0);
                let engine = Engine::new(&EngineConfig {
                    capacity: 1 << 14,
                    seed: Some(i as u64 + 1),
                    limits: SourceLimits::OFF,
                    ..Default::default()
                })
                .unwrap();
                Node {
                    client_addr: SocketAddr::new(cluster_addr(i).ip(), 1024),
                    sealer: cluster.sealer(1),
                    cluster,
                    engine,
                }
            })
            .collect();
        Sim {
            nodes,
            wire: Wire::default(),
            now: T0,
        }
    }

    fn node_of(&self, cluster: SocketAddr) -> usize {
        self.nodes
            .iter()
            .position(|n| n.cluster.me() == cluster)
            .expect("a member's address")
    }

    /// A client datagram arrives at member `i`.
    fn client_sends(&mut self, i: usize, client: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        let node = &mut self.nodes[i];
        let owner = pair_key(bytes).map(|k| node.cluster.routes().owner(k));
        match owner {
            Some(Owner::Member(via)) => {
                let to = node.cluster.routes().member(via).expect("a live member");
                let mut buf = [0u8; MAX_LEN];
                let n = node
                    .sealer
                    .forward(client, bytes, now.unix_ms, &mut buf)
                    .unwrap();
                self.wire.sent.push((Kind::Forward, buf[..n].to_vec()));
                self.wire.cluster.push_back((to, buf[..n].to_vec()));
            }
            _ => {
                let outcome = node.engine.handle(bytes, client, now.mono_ms);
                Self::answer(node, &mut self.wire, &outcome, now);
            }
        }
    }

    /// Sends what the engine said: straight to the client, or back through
    /// the member that forwarded the request.
    fn answer(node: &mut Node, wire: &mut Wire, outcome: &Outcome, now: Now) {
        let mut send = |t: &Transmit| {
            let mut reply = [0u8; MAX_REPLY_LEN];
            let len = t.reply.emit(&mut reply);
            if t.via == 0 {
                wire.to_clients
                    .push((node.client_addr, t.to, reply[..len].to_vec()));
            } else {
                let to = node.cluster.routes().member(t.via).expect("a member");
                let mut buf = [0u8; MAX_LEN];
                let n = node
                    .sealer
                    .reply(t.to, &reply[..len], now.unix_ms, &mut buf)
                    .unwrap();
                wire.sent.push((Kind::Reply, buf[..n].to_vec()));
                wire.cluster.push_back((to, buf[..n].to_vec()));
            }
        };
        match outcome {
            Outcome::Matched {
                waiting,
                completing,
            } => {
                send(waiting);
                send(completing);
            }
            Outcome::Replayed(t) => send(t),
            _ => {}
        }
    }

    /// Delivers cluster datagrams until none is in flight.
    fn run(&mut self) {
        while let Some((to, bytes)) = self.wire.cluster.pop_front() {
            let i = self.node_of(to);
            self.deliver(i, &bytes);
        }
    }

    fn deliver(&mut self, i: usize, bytes: &[u8]) -> Received<'static> {
        let now = self.now;
        let node = &mut self.nodes[i];
        let received = node.cluster.receive(bytes, now);
        match received {
            Received::Request {
                via,
                client,
                request,
            } => {
                let outcome = node
                    .engine
                    .handle_relayed(request, client, via, now.mono_ms);
                Self::answer(node, &mut self.wire, &outcome, now);
            }
            Received::Reply { client, reply } => {
                self.wire
                    .to_clients
                    .push((node.client_addr, client, reply.to_vec()));
            }
            _ => {}
        }
        // The payload borrows `bytes`; the tests only look at the variant.
        match received {
            Received::Request { via, client, .. } => Received::Request {
                via,
                client,
                request: &[],
            },
            Received::Reply { client, .. } => Received::Reply { client, reply: &[] },
            Received::Heartbeat => Received::Heartbeat,
            Received::Rejected(r) => Received::Rejected(r),
        }
    }
}

/// A small deterministic generator for the spray.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn client(n: u32) -> SocketAddr {
    SocketAddr::new(
        format!("198.51.{}.{}", (n >> 8) & 0xff, n & 0xff)
            .parse()
            .unwrap(),
        10_000 + (n % 50_000) as u16,
    )
}

#[test]
fn sprayed_halves_match_and_each_reply_comes_from_where_its_client_sent() {
    let mut sim = Sim::new(3);
    let mut rng = Lcg(42);
    let pairs = 3000u32;
    // Which member each client sent to.
    let mut sent_to: HashMap<SocketAddr, usize> = HashMap::new();
    for p in 0..pairs {
        let req = Request {
            self_id: PeerId::from_u32(2 * p + 1),
            peer_id: PeerId::from_u32(2 * p + 2),
        };
        let (ca, cb) = (client(2 * p), client(2 * p + 1));
        let (ma, mb) = (rng.next() as usize % 3, rng.next() as usize % 3);
        sent_to.insert(ca, ma);
        sent_to.insert(cb, mb);
        sim.client_sends(ma, ca, &req.emit());
        sim.client_sends(mb, cb, &req.counterpart().emit());
        sim.run();
    }
    let mut replies: HashMap<SocketAddr, Reply> = HashMap::new();
    for (from, to, bytes) in &sim.wire.to_clients {
        let member = sent_to[to];
        assert_eq!(
            *from, sim.nodes[member].client_addr,
            "reply to {to} from {from}"
        );
        let r = Reply::parse(bytes).unwrap();
        assert!(replies.insert(*to, r).is_none(), "two replies to {to}");
    }
    assert_eq!(replies.len(), 2 * pairs as usize, "every client answered");
    for p in 0..pairs {
        let (ca, cb) = (client(2 * p), client(2 * p + 1));
        let (ra, rb) = (replies[&ca], replies[&cb]);
        assert_eq!(ra.peer, cb);
        assert_eq!(rb.peer, ca);
        assert_eq!((ra.src_port, ra.dst_port), (rb.dst_port, rb.src_port));
    }
    // Forwards: at most one per client datagram, and the owners matched
    // every pair exactly once.
    let forwards = sim
        .wire
        .sent
        .iter()
        .filter(|(k, _)| *k == Kind::Forward)
        .count();
    assert!(forwards <= 2 * pairs as usize);
    assert!(
        forwards > pairs as usize,
        "with 3 members most halves travel: {forwards}"
    );
    let matched: u64 = sim.nodes.iter().map(|n| n.engine.counters().matched).sum();
    assert_eq!(matched, u64::from(pairs));
    let fwd_in: u64 = sim
        .nodes
        .iter()
        .map(|n| n.cluster.counters().forwarded_in)
        .sum();
    assert_eq!(fwd_in as usize, forwards);
    // Each member owns about a third of the pairs.
    for n in &sim.nodes {
        let m = n.engine.counters().matched;
        assert!(m > u64::from(pairs) / 4 && m < u64::from(pairs) / 2, "{m}");
    }
}

#[test]
fn a_retransmit_is_replayed_through_its_forwarder() {
    let mut sim = Sim::new(3);
    // Find a pair owned by member 2, then send its halves to members 0 and 1.
    let routes = sim.nodes[0].cluster.routes().clone();
    let req = (1u32..)
        .map(|i| Request {
            self_id: PeerId::from_u32(i),
            peer_id: PeerId::from_u32(i + 1_000_000),
        })
        .find(|r| match routes.owner(pair_key(&r.emit()).unwrap()) {
            Owner::Member(v) => routes.member(v) == Some(cluster_addr(2)),
            Owner::Me => false,
        })
        .unwrap();
    let (ca, cb) = (client(1), client(2));
    sim.client_sends(0, ca, &req.emit());
    sim.run();
    sim.client_sends(1, cb, &req.counterpart().emit());
    sim.run();
    assert_eq!(sim.wire.to_clients.len(), 2);
    let first_a = sim
        .wire
        .to_clients
        .iter()
        .find(|(_, to, _)| *to == ca)
        .unwrap()
        .clone();
    assert_eq!(first_a.0, sim.nodes[0].client_addr);
    // A's reply was lost: it asks member 0 again and gets the same reply from it.
    sim.client_sends(0, ca, &req.emit());
    sim.run();
    assert_eq!(sim.wire.to_clients.len(), 3);
    assert_eq!(sim.wire.to_clients[2], first_a);
    assert_eq!(sim.nodes[2].engine.counters().replayed, 1);
    assert_eq!(sim.nodes[2].engine.counters().matched, 1);
    // The owner saw the client addresses, not the forwarders'.
    assert_eq!(Reply::parse(&first_a.2).unwrap().peer, cb);
}

#[test]
fn views_that_disagree_cost_a_retransmit_never_a_loop() {
    let mut sim = Sim::new(3);
    // Member 1 believes member 0 is gone; members 0 and 2 believe all three.
    let list: Vec<SocketAddr> = [1, 2].iter().map(|&i| cluster_addr(i)).collect();
    sim.nodes[1].cluster.set_members(&list, T0);
    let mut forwarded_again = 0;
    let mut rng = Lcg(7);
    for p in 0..500u32 {
        let req = Request {
            self_id: PeerId::from_u32(p * 2 + 10),
            peer_id: PeerId::from_u32(p * 2 + 11),
        };
        for (half, c) in [(req, client(2 * p)), (req.counterpart(), client(2 * p + 1))] {
            let m = rng.next() as usize % 3;
            let before = sim
                .wire
                .sent
                .iter()
                .filter(|(k, _)| *k == Kind::Forward)
                .count();
            sim.client_sends(m, c, &half.emit());
            let after_send = sim
                .wire
                .sent
                .iter()
                .filter(|(k, _)| *k == Kind::Forward)
                .count();
            sim.run();
            let after_run = sim
                .wire
                .sent
                .iter()
                .filter(|(k, _)| *k == Kind::Forward)
                .count();
            assert!(after_send - before <= 1);
            forwarded_again += after_run - after_send;
        }
    }
    assert_eq!(
        forwarded_again, 0,
        "a forwarded request was forwarded again"
    );
    // Member 1 rejects forwards from member 0, which it does not list.
    assert!(sim.nodes[1].cluster.counters().rejected_unknown_sender > 0);
}

/// Seals a forward as member `from` would, with any key and times.
fn forge(from: SocketAddr, key: &ClusterKey, seq: u64, sent_ms: u64, incarnation: u64) -> Vec<u8> {
    let msg = Message {
        header: Header {
            kind: Kind::Forward,
            lane: 3,
            sender: from,
            incarnation,
            seq,
            sent_ms,
        },
        body: Body::Forward {
            client: a("198.51.100.7:4949"),
            request: &[1, 0, 0, 0, 2, 0, 0, 0],
        },
    };
    let mut buf = [0u8; MAX_LEN];
    let n = msg.emit(&mut buf).unwrap();
    key.seal(&mut buf[..n]);
    buf[..n].to_vec()
}

#[test]
fn bad_forwards_have_no_effect_and_are_counted() {
    let mut sim = Sim::new(2);
    let from = cluster_addr(1);
    let good = forge(from, &key(), 1, T0.unix_ms, T0.unix_ms);
    let mut unsigned = good.clone();
    let n = unsigned.len();
    unsigned[n - 16..].fill(0);
    let wrong_key = forge(
        from,
        &ClusterKey::new(&[&[9u8; 32]]).unwrap(),
        2,
        T0.unix_ms,
        T0.unix_ms,
    );
    let stale = forge(
        from,
        &key(),
        3,
        T0.unix_ms - MAX_CLOCK_SKEW_MS - 1,
        T0.unix_ms - 60_000,
    );
    let future = forge(
        from,
        &key(),
        4,
        T0.unix_ms + MAX_CLOCK_SKEW_MS + 1,
        T0.unix_ms,
    );
    let stranger = forge(a("10.9.9.9:1025"), &key(), 5, T0.unix_ms, T0.unix_ms);
    let myself = forge(cluster_addr(0), &key(), 6, T0.unix_ms, T0.unix_ms);
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 1);
    let cases: Vec<(&str, Vec<u8>, Rejection)> = vec![
        ("no MAC", unsigned, Rejection::BadMac),
        ("wrong key", wrong_key, Rejection::BadMac),
        ("stale", stale, Rejection::Stale),
        ("from the future", future, Rejection::Stale),
        ("unknown sender", stranger, Rejection::UnknownSender),
        (
            "claims to be the receiver",
            myself,
            Rejection::UnknownSender,
        ),
        ("truncated", truncated, Rejection::BadMac),
        ("garbage", vec![0x55; 100], Rejection::Malformed),
        (
            "a seed request",
            vec![1, 0, 0, 0, 2, 0, 0, 0],
            Rejection::Malformed,
        ),
    ];
    for (what, bytes, why) in &cases {
        assert_eq!(sim.deliver(0, bytes), Received::Rejected(*why), "{what}");
    }
    assert_eq!(
        sim.nodes[0].engine.counters().received,
        0,
        "nothing reached the engine"
    );
    // The good one goes through once; replayed verbatim it is refused.
    assert!(matches!(
        sim.deliver(0, &good),
        Received::Request { via: _, .. }
    ));
    assert_eq!(
        sim.deliver(0, &good),
        Received::Rejected(Rejection::Replayed)
    );
    assert_eq!(sim.nodes[0].engine.counters().received, 1);
    let c = sim.nodes[0].cluster.counters();
    assert_eq!(c.rejected_bad_mac, 3);
    assert_eq!(c.rejected_stale, 2);
    assert_eq!(c.rejected_unknown_sender, 2);
    assert_eq!(c.rejected_malformed, 2);
    assert_eq!(c.rejected_replayed, 1);
    assert_eq!(c.rejected(), 10);
    assert_eq!(c.forwarded_in, 1);
    assert!(sim.wire.to_clients.is_empty());
}

#[test]
fn captured_datagrams_are_useless_later() {
    let mut sim = Sim::new(2);
    let from = cluster_addr(1);
    let inc = T0.unix_ms;
    let d1 = forge(from, &key(), 1, T0.unix_ms, inc);
    // Sent before the receiver started: its filter cannot know it, so refused.
    let before_start = forge(from, &key(), 2, T0.unix_ms - 1, inc - 1);
    assert_eq!(
        sim.deliver(0, &before_start),
        Received::Rejected(Rejection::Stale)
    );
    assert!(matches!(sim.deliver(0, &d1), Received::Request { .. }));
    // Later, within the clock window: the filter refuses it.
    sim.now = at(MAX_CLOCK_SKEW_MS - 1);
    assert_eq!(sim.deliver(0, &d1), Received::Rejected(Rejection::Replayed));
    // After the window: the timestamp refuses it.
    sim.now = at(MAX_CLOCK_SKEW_MS + 1);
    assert_eq!(sim.deliver(0, &d1), Received::Rejected(Rejection::Stale));
    // Reordered within a lane is fine; a restart (new incarnation) starts
    // the sender's sequence numbers over, and its old incarnation is stale.
    let now = sim.now.unix_ms;
    assert!(matches!(
        sim.deliver(0, &forge(from, &key(), 10, now, inc)),
        Received::Request { .. }
    ));
    assert!(matches!(
        sim.deliver(0, &forge(from, &key(), 8, now, inc)),
        Received::Request { .. }
    ));
    let restarted = forge(from, &key(), 1, now, now - 100);
    assert!(matches!(
        sim.deliver(0, &restarted),
        Received::Request { .. }
    ));
    assert_eq!(
        sim.deliver(0, &forge(from, &key(), 11, now, inc)),
        Received::Rejected(Rejection::Stale)
    );
    // A sender whose clock went back at its restart is heard again once
    // its newer incarnation has been silent for the timeout.
    sim.now = at(MAX_CLOCK_SKEW_MS + 1 + 2_001);
    let now = sim.now.unix_ms;
    assert!(matches!(
        sim.deliver(0, &forge(from, &key(), 1, now, inc + 5)),
        Received::Request { .. }
    ));
}

#[test]
fn every_byte_of_a_forward_is_covered() {
    let mut sim = Sim::new(2);
    let good = forge(cluster_addr(1), &key(), 1, T0.unix_ms, T0.unix_ms);
    for i in 0..good.len() {
        let mut d = good.clone();
        d[i] ^= 0x01;
        let r = sim.deliver(0, &d);
        assert!(matches!(r, Received::Rejected(_)), "byte {i}: {r:?}");
    }
    assert_eq!(sim.nodes[0].engine.counters().received, 0);
    // Lane, sequence and time fields are covered as well as the payload.
    assert!(field::SEQ.end < good.len());
}

fn heartbeats(c: &mut Cluster, now: Now) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_LEN];
    while let Some((to, n)) = c.poll_transmit(now, &mut buf) {
        out.push((to, buf[..n].to_vec()));
    }
    out
}

#[test]
fn heartbeats_go_to_every_listed_member_each_quarter_timeout() {
    let mut sim = Sim::new(3);
    let hb = heartbeats(&mut sim.nodes[0].cluster, T0);
    let to: Vec<SocketAddr> = hb.iter().map(|(t, _)| *t).collect();
    assert_eq!(to, vec![cluster_addr(1), cluster_addr(2)]);
    assert!(heartbeats(&mut sim.nodes[0].cluster, at(499)).is_empty());
    assert_eq!(heartbeats(&mut sim.nodes[0].cluster, at(500)).len(), 2);
    assert_eq!(
        sim.nodes[0].cluster.poll_timeout(at(500)),
        T0.mono_ms + 1000
    );
    for (to, bytes) in hb {
        let i = sim.node_of(to);
        assert_eq!(sim.deliver(i, &bytes), Received::Heartbeat);
    }
    assert_eq!(sim.nodes[1].cluster.counters().heartbeats_in, 1);
}

#[test]
fn silence_leaving_and_return_change_the_owners() {
    let mut sim = Sim::new(3);
    let live = |s: &Sim, i: usize| s.nodes[i].cluster.routes().live_len();
    assert_eq!(live(&sim, 0), 3, "listed members count as live at first");
    let g0 = sim.nodes[0].cluster.routes().generation();
    // Members 1 and 2 keep sending heartbeats to 0 for 1.5 s; then 2 stops.
    for t in (0..=1500).step_by(500) {
        sim.now = at(t);
        for i in [1, 2] {
            for (to, b) in heartbeats(&mut sim.nodes[i].cluster, sim.now) {
                if to == cluster_addr(0) {
                    sim.deliver(0, &b);
                }
            }
        }
    }
    for t in (2000..=3600).step_by(100) {
        sim.now = at(t);
        for (to, b) in heartbeats(&mut sim.nodes[1].cluster, sim.now) {
            if to == cluster_addr(0) {
                sim.deliver(0, &b);
            }
        }
        sim.nodes[0].cluster.tick(sim.now);
    }
    assert_eq!(live(&sim, 0), 2, "member 2 timed out");
    assert!(sim.nodes[0].cluster.routes().generation() > g0);
    let status = sim.nodes[0].cluster.members(sim.now);
    let m2 = status.iter().find(|m| m.addr == cluster_addr(2)).unwrap();
    assert!(!m2.live);
    assert!(m2.heard_ms_ago.unwrap() >= 2000);
    // No pair is owned by member 2 any more.
    let routes = sim.nodes[0].cluster.routes().clone();
    for i in 0..2000u32 {
        let k = owner::seed_pair_key(i.to_le_bytes(), (i + 1).to_be_bytes());
        if let Owner::Member(v) = routes.owner(k) {
            assert_ne!(routes.member(v), Some(cluster_addr(2)));
        }
    }
    // Member 1 drains: one leaving heartbeat and it is out at once.
    sim.nodes[1].cluster.leave(sim.now);
    let mine = sim.nodes[1]
        .cluster
        .routes()
        .live
        .iter()
        .any(|&(_, via)| via == 0);
    assert!(!mine, "a leaving member owns nothing");
    let hb = heartbeats(&mut sim.nodes[1].cluster, sim.now);
    let to0 = hb
        .iter()
        .find(|(t, _)| *t == cluster_addr(0))
        .unwrap()
        .1
        .clone();
    assert_eq!(to0[field::STATUS], 1);
    assert_eq!(sim.deliver(0, &to0), Received::Heartbeat);
    assert_eq!(live(&sim, 0), 1, "only member 0 left");
    // A new process at member 1's address (a new incarnation) is live again.
    let mut again = Cluster::new(&config(cluster_addr(1)), sim.now);
    again.set_members(&[cluster_addr(0), cluster_addr(1)], sim.now);
    let hb = heartbeats(&mut again, sim.now);
    assert_eq!(sim.deliver(0, &hb[0].1), Received::Heartbeat);
    assert_eq!(live(&sim, 0), 2);
}

#[test]
fn a_member_dropped_from_the_list_gets_nothing_and_keeps_its_index() {
    let mut sim = Sim::new(3);
    let via_of = |c: &Cluster, addr: SocketAddr| {
        c.members(T0).iter().find(|m| m.addr == addr).map(|m| m.via)
    };
    let via2 = via_of(&sim.nodes[0].cluster, cluster_addr(2)).unwrap();
    let change = sim.nodes[0]
        .cluster
        .set_members(&[cluster_addr(0), cluster_addr(1)], T0);
    assert_eq!(change.removed, 1);
    assert!(change.me_listed);
    let routes = sim.nodes[0].cluster.routes();
    assert_eq!(routes.live_len(), 2);
    assert_eq!(routes.member(via2), None);
    // Its forwards are refused now.
    let d = forge(cluster_addr(2), &key(), 1, T0.unix_ms, T0.unix_ms);
    assert_eq!(
        sim.deliver(0, &d),
        Received::Rejected(Rejection::UnknownSender)
    );
    // Listed again (DNS record back): same relay index, live again.
    let all: Vec<SocketAddr> = (0..3).map(cluster_addr).collect();
    let change = sim.nodes[0].cluster.set_members(&all, at(10));
    assert_eq!(change.added, 1);
    assert_eq!(via_of(&sim.nodes[0].cluster, cluster_addr(2)), Some(via2));
    assert_eq!(sim.nodes[0].cluster.routes().live_len(), 3);
    // Other families and this member's own IP on another port are ignored.
    let change = sim.nodes[0].cluster.set_members(
        &[cluster_addr(0), a("[::1]:1025"), a("10.0.0.2:9999")],
        at(20),
    );
    assert_eq!(change.ignored, 2);
    assert_eq!(sim.nodes[0].cluster.routes().live_len(), 1);
}

#[test]
fn a_member_not_in_its_own_list_forwards_everything() {
    let mut c = Cluster::new(&config(cluster_addr(0)), T0);
    assert_eq!(c.routes().owner(PairKey(1)), Owner::Me, "alone: owns all");
    let change = c.set_members(&[cluster_addr(1), cluster_addr(2)], T0);
    assert!(!change.me_listed);
    for k in 0..100 {
        assert!(matches!(c.routes().owner(PairKey(k)), Owner::Member(_)));
    }
}

#[test]
fn relay_indexes_are_reused_last() {
    let mut c = Cluster::new(&config(cluster_addr(0)), T0);
    let via = |c: &Cluster, addr: SocketAddr| {
        c.members(T0).iter().find(|m| m.addr == addr).map(|m| m.via)
    };
    c.set_members(&[a("10.1.0.1:1025")], T0);
    let first = via(&c, a("10.1.0.1:1025")).unwrap();
    c.set_members(&[a("10.1.0.2:1025")], T0);
    let second = via(&c, a("10.1.0.2:1025")).unwrap();
    assert_ne!(first, second, "a fresh index while one is free");
    // 300 members one after another: never more than 255 listed, no panic.
    for i in 0..300u32 {
        let m = SocketAddr::new(
            format!("10.2.{}.{}", i / 200, i % 200 + 1).parse().unwrap(),
            1025,
        );
        c.set_members(&[m], at(u64::from(i)));
        assert!(via(&c, m).is_some());
    }
    let many: Vec<SocketAddr> = (0..300u32)
        .map(|i| {
            SocketAddr::new(
                format!("10.3.{}.{}", i / 200, i % 200 + 1).parse().unwrap(),
                1025,
            )
        })
        .collect();
    let change = c.set_members(&many, at(400));
    assert_eq!(change.ignored, 300 - MAX_PEERS);
    assert_eq!(c.routes().live_len(), MAX_PEERS);
}

#[test]
fn sealers_count_per_lane() {
    let c = Cluster::new(&config(cluster_addr(0)), T0);
    let mut s1 = c.sealer(1);
    let mut s2 = c.sealer(2);
    let mut buf = [0u8; MAX_LEN];
    for expect in 1..=3u64 {
        let n = s1
            .forward(a("198.51.100.1:1"), &[1; 8], T0.unix_ms, &mut buf)
            .unwrap();
        let v = View::new_checked(&buf[..n]).unwrap();
        assert_eq!((v.lane(), v.seq()), (1, expect));
    }
    let n = s2
        .reply(a("198.51.100.1:1"), &[2; 20], T0.unix_ms, &mut buf)
        .unwrap();
    let v = View::new_checked(&buf[..n]).unwrap();
    assert_eq!((v.lane(), v.seq(), v.kind()), (2, 1, Kind::Reply));
    assert_eq!((s1.forwarded, s2.replies), (3, 1));
    assert!(s1
        .forward(a("198.51.100.1:1"), &[], T0.unix_ms, &mut buf)
        .is_none());
}

#[test]
fn replies_to_impossible_clients_are_refused() {
    let mut sim = Sim::new(2);
    let mut s = sim.nodes[1].cluster.sealer(1);
    let mut buf = [0u8; MAX_LEN];
    let n = s
        .reply(a("224.0.0.1:5000"), &[1; 20], T0.unix_ms, &mut buf)
        .unwrap();
    assert_eq!(
        sim.deliver(0, &buf[..n]),
        Received::Rejected(Rejection::Malformed)
    );
}
