//! The NAT lab: psync across real Linux NATs.
//!
//! Each test builds its own copy of the topology in `natlab/lab.rs` (network
//! namespaces, veth pairs, nftables masquerade with a stateful forward
//! filter, three routers between the NATs) and runs the real `psync-server`
//! and `psync-client` binaries inside it with `ip netns exec`. The lab is
//! torn down on drop, also when a test fails.
//!
//! Needs root, `ip` and `nft` (and `nc` for the netcat case). Without them
//! every test prints one line saying why and passes; with
//! `PSYNC_NAT_LAB=require` it fails instead.
//!
//! Run: `sudo PSYNC_NAT_LAB=require cargo test --test natlab -- --nocapture`
//! (`--nocapture` shows the measured success rates).

#[path = "natlab/lab.rs"]
mod lab;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use lab::{
    public, server_limit_flags, skip_reason, Lab, LabConfig, Nat, Node, Proc, CLIENT_A_IP,
    NAT_A_PUBLIC, NAT_B_PUBLIC, SERVER_IP,
};
use psync::{PeerId, Reply, Request};

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_psync-server");

/// The server's port inside the lab (its namespace is private, so a fixed
/// port cannot collide with anything).
const SERVER_PORT: u16 = 4949;

/// Upper bound on a server's life in any test; the lab is far quicker.
const SERVER_LIFETIME: Duration = Duration::from_secs(150);

/// How long a server may take to print its "listening" line on a loaded
/// machine before the test gives up.
const SERVER_START: Duration = Duration::from_secs(30);

/// How long to wait for a datagram that must arrive in the sanity checks.
const ARRIVAL: Duration = Duration::from_secs(5);

/// Starts `psync-server -4 -p SERVER_PORT` in the server namespace and waits
/// until it listens. Small tables: the lab registers a few dozen pairs.
fn start_server(lab: &Lab) -> Proc {
    let port = SERVER_PORT.to_string();
    let mut args = vec![
        "-4",
        "-p",
        &port,
        "--capacity",
        "4096",
        "--replay-capacity",
        "4096",
        "--stats-interval",
        "0",
    ];
    args.extend_from_slice(server_limit_flags(SERVER_BIN));
    let mut server = lab.spawn(Node::Server, SERVER_BIN, &args, None, SERVER_LIFETIME);
    assert!(
        server.wait_stderr("psync-server: listening on udp", SERVER_START),
        "psync-server did not start in the lab: {}",
        server.stderr_so_far()
    );
    server
}

fn request(self_id: u32, peer_id: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(self_id),
        peer_id: PeerId::from_u32(peer_id),
    }
    .emit()
}

/// Sends one datagram from `node` with `nc` (`-q0`: quit right after stdin's
/// EOF) from `sport` to `dst:dport`, with `ttl` if given.
fn nc_send(lab: &Lab, node: Node, sport: u16, dst: Ipv4Addr, dport: u16, ttl: Option<u8>) {
    let (sport, dst, dport) = (sport.to_string(), dst.to_string(), dport.to_string());
    let ttl = ttl.map(|t| t.to_string());
    let mut args = vec!["-u", "-q0", "-p", &sport];
    if let Some(ttl) = &ttl {
        args.extend(["-M", ttl]);
    }
    args.extend([dst.as_str(), dport.as_str()]);
    let exit = lab
        .spawn(node, "nc", &args, Some(b"x"), Duration::from_secs(10))
        .finish();
    assert_eq!(
        exit.code(),
        Some(0),
        "{} failed: {}",
        exit.name,
        exit.stderr_text()
    );
}

/// The lab itself, checked with raw UDP before psync is trusted to it: NAT A
/// keeps ports and filters unsolicited inbound datagrams, a TTL-4 opener
/// creates NAT A's mapping but dies before NAT B, and NAT B changes ports per
/// destination.
#[test]
fn lab_behaves_like_home_routers() {
    if skip_reason("lab_behaves_like_home_routers", &["nc"]).is_some() {
        return;
    }
    let lab = Lab::build(
        "sanity",
        LabConfig {
            nat_a: Nat::PortPreserving,
            nat_b: Nat::Random,
            core_loss_percent: 0,
        },
    );

    // Outbound: the server sees NAT A's public address and the same port.
    nc_send(&lab, Node::ClientA, 40001, SERVER_IP, 5000, None);
    assert!(
        lab.wait_seen(Node::Server, ARRIVAL, |&s| s == (NAT_A_PUBLIC, 40001, 5000)),
        "server never saw ca's datagram as 198.18.11.2:40001; saw {:?}",
        lab.seen(Node::Server)
    );
    assert!(
        !lab.seen(Node::Server).iter().any(|s| s.0 == CLIENT_A_IP),
        "a private address reached the server: masquerade is not working"
    );

    // Inbound: from a port the client never sent to, the datagram reaches NAT
    // A and stops there; the reply from the port it did send to gets through.
    // Sent in this order on one path, so once the second has arrived the first
    // would have too.
    nc_send(&lab, Node::Server, 5001, NAT_A_PUBLIC, 40001, None);
    nc_send(&lab, Node::Server, 5000, NAT_A_PUBLIC, 40001, None);
    assert!(
        lab.wait_seen(Node::ClientA, ARRIVAL, |&s| s == (SERVER_IP, 5000, 40001)),
        "the server's reply never reached ca; ca saw {:?}",
        lab.seen(Node::ClientA)
    );
    assert!(
        lab.seen(Node::NatA).contains(&(SERVER_IP, 5001, 40001)),
        "the unsolicited datagram never reached NAT A"
    );
    assert!(
        !lab.seen(Node::ClientA).iter().any(|s| s.1 == 5001),
        "NAT A forwarded an unsolicited datagram: the stateful filter is not working"
    );

    // A TTL-4 opener leaves NAT A (three routers lie between the NATs) but
    // never reaches NAT B; TTL 64 does.
    nc_send(&lab, Node::ClientA, 40003, NAT_B_PUBLIC, 6000, Some(4));
    nc_send(&lab, Node::ClientA, 40004, NAT_B_PUBLIC, 6000, None);
    assert!(
        lab.wait_seen(Node::NatB, ARRIVAL, |&s| s == (NAT_A_PUBLIC, 40004, 6000)),
        "a TTL-64 datagram from ca never reached NAT B; NAT B saw {:?}",
        lab.seen(Node::NatB)
    );
    assert!(
        !lab.seen(Node::NatB).iter().any(|s| s.1 == 40003),
        "the TTL-4 opener reached NAT B: too few hops between the NATs"
    );
    // ... and yet the opener opened NAT A: B's answer to it gets through.
    nc_send(&lab, Node::NatB, 6000, NAT_A_PUBLIC, 40003, None);
    assert!(
        lab.wait_seen(Node::ClientA, ARRIVAL, |&s| s
            == (NAT_B_PUBLIC, 6000, 40003)),
        "the TTL-4 opener did not create NAT A's mapping; ca saw {:?}",
        lab.seen(Node::ClientA)
    );

    // NAT A maps one socket to one public port for every destination
    // (endpoint-independent); NAT B ('masquerade random') does not.
    nc_send(&lab, Node::ClientA, 40001, SERVER_IP, 5002, None);
    nc_send(&lab, Node::ClientB, 40001, SERVER_IP, 5000, None);
    nc_send(&lab, Node::ClientB, 40001, SERVER_IP, 5002, None);
    let from_b = |dport: u16| {
        let mut port = None;
        let found = lab.wait_seen(Node::Server, ARRIVAL, |&(ip, sport, d)| {
            let hit = ip == NAT_B_PUBLIC && d == dport;
            if hit {
                port = Some(sport);
            }
            hit
        });
        assert!(found, "the server never saw cb's datagram to port {dport}");
        port.unwrap()
    };
    let (b1, b2) = (from_b(5000), from_b(5002));
    assert!(
        lab.seen(Node::Server)
            .contains(&(NAT_A_PUBLIC, 40001, 5002)),
        "NAT A changed the port for a second destination"
    );
    // A random choice could repeat a port, but only with odds of about one in
    // 64 thousand.
    assert_ne!(b1, b2, "NAT B kept one public port for two destinations");
    eprintln!("natlab: sanity: NAT B mapped cb port 40001 to {b1} and {b2}");
}

/// Case 5: the original README's flow, the raw 8 bytes sent with netcat from
/// behind each NAT; each peer gets a 20-byte reply naming the other's public
/// address and port, and the two replies' ports mirror each other.
#[test]
fn netcat_flow_across_nats() {
    if skip_reason("netcat_flow_across_nats", &["nc"]).is_some() {
        return;
    }
    let lab = Lab::build("netcat", LabConfig::default());
    let _server = start_server(&lab);
    let server_port = SERVER_PORT.to_string();
    let server_ip = SERVER_IP.to_string();
    // `-w1`: nc quits after a second without traffic, so both start together.
    let nc = |node, sport: &str, req: [u8; 8]| {
        lab.spawn(
            node,
            "nc",
            &["-u", "-w1", "-p", sport, &server_ip, &server_port],
            Some(&req),
            Duration::from_secs(20),
        )
    };
    let mut a = nc(Node::ClientA, "40001", request(0xdead_beef, 0xcafe_babe));
    let mut b = nc(Node::ClientB, "40002", request(0xcafe_babe, 0xdead_beef));
    let (a, b) = (a.finish(), b.finish());
    let reply = |exit: &lab::Exit| {
        assert!(!exit.timed_out, "{} hung", exit.name);
        Reply::parse(&exit.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: not a 20-byte reply ({e}): {:02x?}; stderr: {}",
                exit.name,
                exit.stdout,
                exit.stderr_text()
            )
        })
    };
    let (ra, rb) = (reply(&a), reply(&b));
    assert_eq!(a.stdout.len(), 20);
    assert_eq!(b.stdout.len(), 20);
    assert_eq!(ra.peer, SocketAddr::V4(public(NAT_B_PUBLIC, 40002)));
    assert_eq!(rb.peer, SocketAddr::V4(public(NAT_A_PUBLIC, 40001)));
    assert_eq!((ra.src_port, ra.dst_port), (rb.dst_port, rb.src_port));
    eprintln!(
        "natlab: netcat: ca got {:?}, cb got {:?}",
        (ra.src_port, ra.dst_port, ra.peer),
        (rb.src_port, rb.dst_port, rb.peer)
    );
}
