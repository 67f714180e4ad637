//! The NAT lab: psync across real Linux NATs.
//!
//! Each test builds its own copy of the topology in `natlab/lab.rs` (network
//! namespaces, veth pairs, nftables masquerade with a stateful forward
//! filter, three routers between the NATs) and runs the real `psync-server`
//! and `psync-client` binaries inside it with `ip netns exec`. The lab is
//! torn down on drop, also when a test fails.
//!
//! | test | case |
//! |---|---|
//! | `lab_behaves_like_home_routers` | raw-UDP check of the lab itself |
//! | `port_preserving_nats_connect` | 1: >= 19 of 20 pairs connect |
//! | `random_port_nats_fail_cleanly` | 2: symmetric NATs, no mapping: exit 4 in time, every client |
//! | `birthday_connects_random_to_preserving` | 3: one of each: birthday probing, >= 19 of 20 |
//! | `ten_percent_loss_still_connects` | 4: 10% loss, >= 19 of 20 |
//! | `netcat_flow_across_nats` | 5: the original README's `nc` flow |
//! | `server_restart_while_registering` | 6: SIGTERM and restart |
//! | `port_mapping_connects_two_random_nats` | 7: symmetric NATs, miniupnpd on A: >= 19 of 20 |
//! | `birthday_with_loss` | 3 with 10% loss: >= 19 of 20 |
//! | `port_mapping_with_loss` | 7 with 10% loss: >= 19 of 20 |
//! | `random_nats_with_loss_fail_cleanly` | 2 with 10% loss: exit 4 in time, every client |
//! | `random_nats_with_v2_fail_at_once` | 2 with v2: each knows the partner is hard, exit 4 at once |
//! | `same_nat_connects_with_v2` | 8: two peers behind NAT A (no hairpin), v2: >= 19 of 20 on local addresses |
//! | `same_nat_with_loss` | 8 with 10% loss: >= 19 of 20 |
//! | `same_hard_nat_connects_with_v2` | 8 behind a random NAT (both hard): >= 19 of 20 |
//! | `same_nat_without_v2_says_why` | 8 with the seed format: exit 4 saying why, every client |
//!
//! The server answers STUN on `--stun-port` and every client passes it, so
//! clients classify their NATs. Each success case prints its connect time
//! (p50/p99 over the clients that connected) and the datagrams each side sent.
//!
//! Needs root, `ip` and `nft` (and `nc` for the netcat case, `miniupnpd` from
//! Debian's `miniupnpd-nftables` for the port-mapping cases). Without them
//! every test prints one line saying why and passes; with
//! `PSYNC_NAT_LAB=require` it fails instead.
//!
//! Run: `sudo PSYNC_NAT_LAB=require cargo test --test natlab -- --nocapture`
//! (`--nocapture` shows the measured success rates).
//! `PSYNC_NAT_LAB_CLIENT_ARGS` adds arguments to every `psync-client`.

#[path = "natlab/lab.rs"]
mod lab;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lab::{
    public, skip_reason, Lab, LabConfig, Nat, Node, Proc, CLIENT_A2_IP, CLIENT_A_IP, NAT_A_PUBLIC,
    NAT_B_PUBLIC, SERVER_IP,
};
use psync::auth::{encode_token, issue_token, Key};
use psync::wire::v2::Pair;
use psync::{PeerId, Reply, Request};

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_psync-server");
const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_psync-client");

/// The server's port inside the lab (its namespace is private, so a fixed
/// port cannot collide with anything).
const SERVER_PORT: u16 = 4949;
/// The server's second STUN port, which classification asks.
const STUN_PORT: u16 = 3478;

/// Upper bound on a server's life in any test; the lab is far quicker.
const SERVER_LIFETIME: Duration = Duration::from_secs(150);

/// How long a server may take to print its "listening" line on a loaded
/// machine before the test gives up.
const SERVER_START: Duration = Duration::from_secs(30);

/// Trials per success-rate case (the issue asks for at least 19 of 20).
const TRIALS: usize = 20;
/// Successes required of [`TRIALS`].
const REQUIRED: usize = 19;
/// Pairs at a time in the port-mapping cases: miniupnpd, single-threaded
/// and logging every rule it walks, answers 20 simultaneous PCP requests
/// too slowly for the clients' bounded wait (9 to 13 of 20 pairs connected
/// when all ran at once); a home router rarely sees more than one at a time.
const MAPPING_BATCH: usize = 5;
/// Pairs in a case that must fail (every client must exit 4 in time).
const FAIL_PAIRS: usize = 10;

/// `--timeout` of a client expected to connect: ample for a lossy path and a
/// busy machine, short enough that a broken client fails the lab quickly.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// `--timeout` of a client expected to fail (its whole run lasts this long).
const FAIL_TIMEOUT_SECS: u64 = 4;
/// How far past its `--timeout` a client may run before the lab calls it
/// hung and kills it. The client promises one second; the rest is slack for
/// a loaded two-core machine.
const HANG_GRACE: Duration = Duration::from_secs(5);

/// How long the server stays down in the restart case.
const DOWNTIME: Duration = Duration::from_secs(1);

/// How long to wait for a datagram that must arrive in the sanity checks.
const ARRIVAL: Duration = Duration::from_secs(5);

/// The key the protocol v2 cases' server holds and their tokens are issued
/// with (its ID; the secret is [`lab_key`]'s).
const KEY_ID: u32 = 1;

fn lab_key() -> Key {
    Key::new(KEY_ID, &[0x5c; 32]).expect("a 32-byte key")
}

/// Starts `psync-server -4 -p SERVER_PORT --stun-port STUN_PORT` in the server namespace and waits
/// until it listens. Small tables: the lab registers a few dozen pairs. No
/// per-source limits: every peer behind one NAT shares its public address,
/// and the lab runs many pairs through each NAT at once.
fn start_server(lab: &Lab) -> Proc {
    start_server_with(lab, &[])
}

/// [`start_server`] that also serves protocol v2 with [`lab_key`] from a key
/// file (mode 600, as the server demands), written as docs/auth.md says.
fn start_v2_server(lab: &mut Lab) -> Proc {
    let secret: String = [0x5cu8; 32].iter().map(|b| format!("{b:02x}")).collect();
    let path = lab.private_file("auth.keys", &format!("{KEY_ID} {secret}\n"));
    let path = path.display().to_string();
    start_server_with(lab, &["--auth-key-file", &path])
}

fn start_server_with(lab: &Lab, extra: &[&str]) -> Proc {
    let port = SERVER_PORT.to_string();
    let stun = STUN_PORT.to_string();
    let mut args = vec![
        "-4",
        "-p",
        &port,
        "--stun-port",
        &stun,
        "--capacity",
        "8192",
        "--stats-interval",
        "0",
        "--rate-limit",
        "0",
        "--max-pending-per-ip",
        "0",
    ];
    args.extend_from_slice(extra);
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
            ..LabConfig::default()
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

    // NAT A does not hairpin: ca2's mapping 11.0.10.2:40007 (made by sending
    // to the server) is not reachable from ca behind the same NAT; the
    // datagram reaches NAT A and stops there. ca2 is reachable on the LAN.
    nc_send(&lab, Node::ClientA2, 40007, SERVER_IP, 5003, None);
    assert!(
        lab.wait_seen(Node::Server, ARRIVAL, |&s| s == (NAT_A_PUBLIC, 40007, 5003)),
        "the server never saw ca2's datagram"
    );
    nc_send(&lab, Node::ClientA, 40008, NAT_A_PUBLIC, 40007, None);
    assert!(
        lab.wait_seen(Node::NatA, ARRIVAL, |&s| s == (CLIENT_A_IP, 40008, 40007)),
        "ca's datagram to its own NAT's public address never reached NAT A"
    );
    nc_send(&lab, Node::ClientA, 40009, CLIENT_A2_IP, 40007, None);
    assert!(
        lab.wait_seen(Node::ClientA2, ARRIVAL, |&s| s
            == (CLIENT_A_IP, 40009, 40007)),
        "ca cannot reach ca2 on the LAN; ca2 saw {:?}",
        lab.seen(Node::ClientA2)
    );
    assert!(
        !lab.seen(Node::ClientA2).iter().any(|s| s.1 == 40008),
        "NAT A hairpinned a datagram to its public address: the same-NAT cases prove nothing"
    );
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

/// Starts `psync-client` in `node` with `--json` and `--timeout secs`, plus
/// any arguments in `PSYNC_NAT_LAB_CLIENT_ARGS` (for experiments: with
/// `--opener-ttl 0 --attempts 1` case 1 shows the conntrack race the opener
/// defeats).
fn client(lab: &Lab, node: Node, self_id: u32, peer_id: u32, timeout_secs: u64) -> Proc {
    let ids = [
        "--self".to_string(),
        self_id.to_string(),
        "--peer".to_string(),
        peer_id.to_string(),
    ];
    client_with(lab, node, &ids, timeout_secs)
}

/// [`client`] that speaks protocol v2, with a token for `self_id -> peer_id`
/// issued by [`lab_key`] (the client takes its IDs from the token).
fn v2_client(lab: &Lab, node: Node, self_id: u64, peer_id: u64, timeout_secs: u64) -> Proc {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + 600;
    let token = encode_token(&issue_token(
        &lab_key(),
        Pair::new(self_id, peer_id),
        expiry,
    ));
    client_with(lab, node, &["--token".to_string(), token], timeout_secs)
}

/// A client with these identity arguments (`--self`/`--peer` or `--token`).
fn client_with(lab: &Lab, node: Node, ids: &[String], timeout_secs: u64) -> Proc {
    let server = format!("{SERVER_IP}:{SERVER_PORT}");
    let (timeout, stun) = (timeout_secs.to_string(), STUN_PORT.to_string());
    let args = [
        "--server",
        &server,
        "--stun-port",
        &stun,
        "--timeout",
        &timeout,
        "--json",
    ];
    let extra = std::env::var("PSYNC_NAT_LAB_CLIENT_ARGS").unwrap_or_default();
    let args: Vec<&str> = args
        .into_iter()
        .chain(ids.iter().map(String::as_str))
        .chain(extra.split_whitespace())
        .collect();
    let deadline = Duration::from_secs(timeout_secs) + HANG_GRACE;
    lab.spawn(node, CLIENT_BIN, &args, None, deadline)
}

/// Where the two clients of each pair run, what each must end up connected
/// to, and which protocol they speak.
#[derive(Clone, Copy, Debug)]
struct Pairing {
    /// Side A's namespace.
    a: Node,
    /// Side B's namespace.
    b: Node,
    /// The IP side A must connect to (B's public or local address).
    a_reaches: Ipv4Addr,
    /// The IP side B must connect to.
    b_reaches: Ipv4Addr,
    /// Protocol v2 with tokens (else the seed format with `--self/--peer`).
    v2: bool,
}

/// One client behind each NAT, the seed format.
const ACROSS: Pairing = Pairing {
    a: Node::ClientA,
    b: Node::ClientB,
    a_reaches: NAT_B_PUBLIC,
    b_reaches: NAT_A_PUBLIC,
    v2: false,
};

/// Both clients behind NAT A (which does not hairpin): they can meet only
/// on the LAN, at each other's local address.
const SAME_NAT: Pairing = Pairing {
    a: Node::ClientA,
    b: Node::ClientA2,
    a_reaches: CLIENT_A2_IP,
    b_reaches: CLIENT_A_IP,
    v2: false,
};

/// Runs `n` pairs at once, pair `i` with IDs `base + 2i` (behind NAT A) and
/// `base + 2i + 1` (behind NAT B), and returns each pair's exits.
///
/// Pairs run concurrently because each pair is independent: its own IDs,
/// its own sockets, and so its own conntrack entries in each NAT.
fn run_pairs(lab: &Lab, n: usize, base: u32, timeout_secs: u64) -> Vec<(lab::Exit, lab::Exit)> {
    run_pairs_batched(lab, ACROSS, n, n, base, timeout_secs)
}

/// [`run_pairs`], at most `batch` pairs at a time (a home router's
/// port-mapping daemon is not built for 20 clients mapping at once), on
/// `pairing`'s nodes. With v2, pair `i`'s IDs are 64-bit: `base + 2i` and
/// `base + 2i + 1` in the low half, a fixed pattern in the high half.
fn run_pairs_batched(
    lab: &Lab,
    pairing: Pairing,
    n: usize,
    batch: usize,
    base: u32,
    timeout_secs: u64,
) -> Vec<(lab::Exit, lab::Exit)> {
    let mut out = Vec::with_capacity(n);
    let ids: Vec<u32> = (0..n as u32).collect();
    for chunk in ids.chunks(batch.max(1)) {
        let procs: Vec<(Proc, Proc)> = chunk
            .iter()
            .map(|&i| {
                let (a, b) = (base + 2 * i, base + 2 * i + 1);
                if pairing.v2 {
                    let wide = |id: u32| 0x5a17_c0de_0000_0000 | u64::from(id);
                    (
                        v2_client(lab, pairing.a, wide(a), wide(b), timeout_secs),
                        v2_client(lab, pairing.b, wide(b), wide(a), timeout_secs),
                    )
                } else {
                    (
                        client(lab, pairing.a, a, b, timeout_secs),
                        client(lab, pairing.b, b, a, timeout_secs),
                    )
                }
            })
            .collect();
        out.extend(
            procs
                .into_iter()
                .map(|(mut a, mut b)| (a.finish(), b.finish())),
        );
    }
    out
}

/// The string or number value of `key` in the client's one-line JSON.
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    match rest.strip_prefix('"') {
        Some(s) => s.split('"').next(),
        None => rest.split([',', '}']).next(),
    }
}

/// What a connected client reported.
struct Connected {
    strategy: String,
    attempts: u32,
    elapsed_ms: u64,
    datagrams_sent: u64,
}

/// Checks that a client exited 0 and proved a path to `other_nat` (the
/// other NAT's public address, or the partner's local address behind the
/// same NAT); the error says what happened instead.
fn connected(exit: &lab::Exit, other_nat: Ipv4Addr) -> Result<Connected, String> {
    let why = || {
        format!(
            "{}: exit {:?}{} after {} ms: {}",
            exit.name,
            exit.code(),
            if exit.timed_out {
                " (hung, killed)"
            } else {
                ""
            },
            exit.elapsed.as_millis(),
            exit.stderr_text().trim()
        )
    };
    if exit.code() != Some(0) {
        return Err(why());
    }
    let json = exit.stdout_text();
    let peer: SocketAddr = json_field(&json, "peer")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("{}: no peer in its JSON: {json}", exit.name))?;
    if peer.ip() != other_nat {
        return Err(format!(
            "{}: connected to {peer}, not to the other NAT {other_nat}: {json}",
            exit.name
        ));
    }
    let number = |key| {
        json_field(&json, key)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    };
    Ok(Connected {
        strategy: json_field(&json, "strategy").unwrap_or("?").to_string(),
        attempts: number("attempts") as u32,
        elapsed_ms: number("elapsed_ms"),
        datagrams_sent: number("datagrams_sent"),
    })
}

/// With `PSYNC_NAT_LAB_RECORD=FILE`, appends one line per client to FILE:
/// `case<TAB>side<TAB>exit<TAB>elapsed_ms<TAB>datagrams_sent<TAB>strategy`
/// (`-` when it did not connect), for the table in docs/nat-traversal.md
/// (`tests/natlab/table.py` makes it).
fn record(case: &str, side: &str, exit: &lab::Exit) {
    let Ok(path) = std::env::var("PSYNC_NAT_LAB_RECORD") else {
        return;
    };
    let json = exit.stdout_text();
    let strategy = match exit.code() {
        Some(0) => json_field(&json, "strategy").unwrap_or("-"),
        _ => "-",
    };
    let line = format!(
        "{case}\t{side}\t{}\t{}\t{}\t{strategy}\n",
        exit.code().map_or(-1, |c| c),
        json_field(&json, "elapsed_ms")
            .map_or_else(|| exit.elapsed.as_millis().to_string(), str::to_string),
        json_field(&json, "datagrams_sent").unwrap_or("0")
    );
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// What a success-rate case measured.
struct Rate {
    ok: usize,
    strategies: std::collections::BTreeMap<String, usize>,
    /// Pairs where the A side connected by birthday probing.
    birthday_a: usize,
}

/// Runs [`TRIALS`] pairs, prints the success rate, connect time p50/p99 over
/// the clients that connected, the datagrams each side sent and how the
/// successes connected; returns the pairs where both sides connected.
fn success_rate(lab: &Lab, case: &str) -> Rate {
    success_rate_batched(lab, ACROSS, case, TRIALS)
}

/// [`success_rate`] on `pairing`'s nodes, at most `batch` pairs at a time.
fn success_rate_batched(lab: &Lab, pairing: Pairing, case: &str, batch: usize) -> Rate {
    let started = Instant::now();
    let pairs = run_pairs_batched(lab, pairing, TRIALS, batch, 1000, CONNECT_TIMEOUT_SECS);
    let mut ok = 0;
    let mut birthday_a = 0;
    let mut strategies = std::collections::BTreeMap::new();
    let mut retried = 0;
    let mut elapsed = Vec::new();
    let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
    for (a, b) in &pairs {
        record(case, "A", a);
        record(case, "B", b);
        match (
            connected(a, pairing.a_reaches),
            connected(b, pairing.b_reaches),
        ) {
            (Ok(ca), Ok(cb)) => {
                ok += 1;
                birthday_a += usize::from(ca.strategy == "birthday");
                sent_a.push(ca.datagrams_sent);
                sent_b.push(cb.datagrams_sent);
                for c in [ca, cb] {
                    *strategies.entry(c.strategy).or_insert(0) += 1;
                    retried += usize::from(c.attempts > 1);
                    elapsed.push(c.elapsed_ms);
                }
            }
            (ra, rb) => {
                for err in [ra.err(), rb.err()].into_iter().flatten() {
                    eprintln!("natlab: {case}: failed trial: {err}");
                }
            }
        }
    }
    if std::env::var("PSYNC_NAT_LAB_DEBUG").is_ok() {
        let (a, b) = &pairs[0];
        eprintln!(
            "natlab: {case}: pair 0 JSON:\n{}{}",
            a.stdout_text(),
            b.stdout_text()
        );
    }
    for v in [&mut elapsed, &mut sent_a, &mut sent_b] {
        v.sort_unstable();
    }
    eprintln!(
        "natlab: {case}: {ok}/{TRIALS} pairs connected; connect p50 {} ms, p99 {} ms; \
         datagrams sent per client: A p50 {} max {}, B p50 {} max {}; \
         clients by strategy {strategies:?}, {retried} re-registered; case took {} ms",
        percentile(&elapsed, 50),
        percentile(&elapsed, 99),
        percentile(&sent_a, 50),
        sent_a.last().copied().unwrap_or(0),
        percentile(&sent_b, 50),
        sent_b.last().copied().unwrap_or(0),
        started.elapsed().as_millis()
    );
    Rate {
        ok,
        strategies,
        birthday_a,
    }
}

/// Case 1: both peers behind port-preserving masquerade connect.
#[test]
fn port_preserving_nats_connect() {
    if skip_reason("port_preserving_nats_connect", &[]).is_some() {
        return;
    }
    let lab = Lab::build("pp", LabConfig::default());
    let _server = start_server(&lab);
    let r = success_rate(&lab, "case 1, port-preserving masquerade");
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
}

/// Case 4: 10% of UDP dropped at the core router; retransmits carry
/// registration and punch through.
#[test]
fn ten_percent_loss_still_connects() {
    if skip_reason("ten_percent_loss_still_connects", &[]).is_some() {
        return;
    }
    let lab = Lab::build(
        "loss",
        LabConfig {
            core_loss_percent: 10,
            ..LabConfig::default()
        },
    );
    let _server = start_server(&lab);
    let r = success_rate(&lab, "case 4, 10% loss at the core router");
    assert_loss_applied(&lab, "case 4");
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
}

/// Dozens of datagrams crossed the core; none dropped would mean the loss
/// rule never applied and the case proved nothing.
fn assert_loss_applied(lab: &Lab, case: &str) {
    let dropped = lab.core_dropped();
    eprintln!("natlab: {case}: the core router dropped {dropped} datagrams");
    assert!(dropped > 0, "the loss rule dropped nothing");
}

/// The headline of a client's error: its last line up to the per-attempt
/// details, which run to a kilobyte.
fn summary(stderr: &str) -> &str {
    let last = stderr.trim().lines().last().unwrap_or("");
    last.split(": attempt 1:").next().unwrap_or(last)
}

/// Checks that a client failed cleanly: exit 4 with a reason and a likely
/// cause, before the lab's hang deadline, its NAT type in the error and the
/// JSON agreeing with the STUN answers it got. Returns whether it named its
/// NAT hard with the cause that follows from it (what nearly every client in
/// the both-random cases must do, see [`NOT_HARD_ALLOWED`]); a client that
/// says `unknown` or `easy` must show the evidence for it.
fn failed_cleanly(exit: &lab::Exit) -> bool {
    let err = exit.stderr_text();
    assert!(
        !exit.timed_out,
        "{} hung past --timeout {FAIL_TIMEOUT_SECS} s: {err}",
        exit.name
    );
    assert_eq!(exit.code(), Some(4), "{}: {err}", exit.name);
    assert!(
        err.contains("psync-client:") && err.contains("punch") && err.contains("likely cause: "),
        "{}: exit 4 without a clear reason: {err:?}",
        exit.name
    );
    let json = exit.stdout_text();
    assert_eq!(json_field(&json, "ok"), Some("false"), "{json}");
    let public = json_field(&json, "public");
    let second = json_field(&json, "public_second");
    match json_field(&json, "type") {
        Some("hard") => {
            assert!(
                err.contains("our NAT: hard")
                    && err.contains("likely cause: our NAT changes ports"),
                "{}: exit 4 without the likely cause: {err:?}",
                exit.name
            );
            assert!(
                public.is_some_and(|p| p != "null")
                    && second.is_some_and(|s| s != "null")
                    && public != second,
                "{}: hard without two different public ports: {json}",
                exit.name
            );
            true
        }
        // Every request to one of the server's ports, or its answer, lost.
        Some("unknown") => {
            assert!(
                err.contains("our NAT: unknown (")
                    && (public == Some("null") || second == Some("null")),
                "{}: unknown with both STUN answers, or not saying so: {err:?} {json}",
                exit.name
            );
            assert!(
                err.contains("answered none of our requests")
                    || err.contains("answered no STUN request"),
                "{}: unknown without saying which port stayed silent: {err:?}",
                exit.name
            );
            false
        }
        // masquerade random drew one port for both flows.
        Some("easy") => {
            assert!(
                err.contains("our NAT: easy (one public port")
                    && public.is_some_and(|p| p != "null")
                    && public == second,
                "{}: easy without one public port to both server ports: {err:?} {json}",
                exit.name
            );
            false
        }
        other => panic!(
            "{}: NAT type {other:?} behind masquerade random: {json}",
            exit.name
        ),
    }
}

/// Clients of a both-random case that may name their NAT other than `hard`
/// (each with the evidence, see [`failed_cleanly`]). Two things make an honest
/// client say so, and neither is a fault:
/// - `easy`: `masquerade random` draws each flow's port uniformly from
///   1024-65535, so the flows to the server's two ports share one with
///   probability 1/64,512 (1.6e-5), with or without loss;
/// - `unknown`, under 10% loss each way: a STUN request and its answer both
///   cross the core 81% of the time, and the second port gets at least 7
///   tries after the main port answered (`SECOND_ANSWER_WAIT`), so all are
///   lost with probability 0.19^7 = 9e-6 (the main port's 10 tries: 6e-8).
///   Reproduced with 45% loss: 7 of 60 clients `unknown`, the rest `hard`.
///
/// About 2.5e-5 per client: demanding `hard` of all 20 failed about one run
/// in 2,000 (it was seen in CI); two of 20 is C(20,2) * (2.5e-5)^2 = 1.2e-7.
/// A client that misjudges its NAT even 1 time in 20 still fails this case
/// about one run in four, and one that always does, every time.
const NOT_HARD_ALLOWED: usize = 1;

/// Runs the both-random case in `lab`: every client must exit 4 in time.
fn random_nats_fail(lab: &Lab, case: &str) {
    let _server = start_server(lab);
    let pairs = run_pairs(lab, FAIL_PAIRS, 2000, FAIL_TIMEOUT_SECS);
    let mut elapsed = Vec::new();
    let mut sent = Vec::new();
    let mut not_hard = Vec::new();
    for (a, b) in &pairs {
        record(case, "A", a);
        record(case, "B", b);
        for e in [a, b] {
            if !failed_cleanly(e) {
                not_hard.push(format!("{}: {}", e.name, summary(&e.stderr_text())));
            }
            elapsed.push(e.elapsed.as_millis() as u64);
            sent.push(
                json_field(&e.stdout_text(), "datagrams_sent")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            );
        }
    }
    elapsed.sort_unstable();
    sent.sort_unstable();
    let (a, _) = &pairs[0];
    eprintln!(
        "natlab: {case}: {} clients exit 4 after p50 {} ms, max {} ms (--timeout {FAIL_TIMEOUT_SECS}); \
         datagrams sent per client p50 {} max {}: {}",
        pairs.len() * 2,
        percentile(&elapsed, 50),
        elapsed.last().copied().unwrap_or(0),
        percentile(&sent, 50),
        sent.last().copied().unwrap_or(0),
        summary(&a.stderr_text())
    );
    for n in &not_hard {
        eprintln!("natlab: {case}: not classified hard: {n}");
    }
    assert!(
        not_hard.len() <= NOT_HARD_ALLOWED,
        "{} clients did not name their NAT hard (at most {NOT_HARD_ALLOWED} may): {not_hard:#?}",
        not_hard.len()
    );
}

/// Case 2: both NATs pick a new port per destination (symmetric) and
/// neither router maps ports: no path can exist, and every client says so
/// with exit 4 within its timeout, naming its NAT hard (all but
/// [`NOT_HARD_ALLOWED`], which show why they could not tell).
#[test]
fn random_port_nats_fail_cleanly() {
    if skip_reason("random_port_nats_fail_cleanly", &[]).is_some() {
        return;
    }
    let lab = Lab::build(
        "rand",
        LabConfig {
            nat_a: Nat::Random,
            nat_b: Nat::Random,
            ..LabConfig::default()
        },
    );
    random_nats_fail(&lab, "case 2, random masquerade both sides, no mapping");
}

/// Case 2 with 10% loss.
#[test]
fn random_nats_with_loss_fail_cleanly() {
    if skip_reason("random_nats_with_loss_fail_cleanly", &[]).is_some() {
        return;
    }
    let lab = Lab::build(
        "randloss",
        LabConfig {
            nat_a: Nat::Random,
            nat_b: Nat::Random,
            core_loss_percent: 10,
            ..LabConfig::default()
        },
    );
    random_nats_fail(&lab, "case 2 with 10% loss");
    assert_loss_applied(&lab, "case 2 with 10% loss");
}

/// The birthday case: NAT A keeps ports (easy), NAT B picks a new port per
/// destination (hard). B opens 256 sockets toward A, A probes random ports
/// of B until one meets.
fn birthday_case(name: &str, case: &str, loss: u8) {
    let lab = Lab::build(
        name,
        LabConfig {
            nat_a: Nat::PortPreserving,
            nat_b: Nat::Random,
            core_loss_percent: loss,
            ..LabConfig::default()
        },
    );
    let _server = start_server(&lab);
    let r = success_rate(&lab, case);
    if loss > 0 {
        assert_loss_applied(&lab, case);
    }
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
    // The easy side (A) names every path its random probes made
    // `birthday`. The hard side may not: a probe can meet its main or seed
    // socket (one more port its NAT opened toward A, like each birthday
    // socket), and then it reports that path's name (about one pair in 100).
    assert!(
        r.birthday_a >= REQUIRED,
        "not connected by birthday probing: {} pairs, clients by strategy {:?}",
        r.birthday_a,
        r.strategies
    );
}

/// Case 3: one port-preserving NAT, one random: birthday probing connects.
#[test]
fn birthday_connects_random_to_preserving() {
    if skip_reason("birthday_connects_random_to_preserving", &[]).is_some() {
        return;
    }
    birthday_case(
        "bday",
        "case 3, port-preserving A and random B (birthday)",
        0,
    );
}

/// Case 3 with 10% loss.
#[test]
fn birthday_with_loss() {
    if skip_reason("birthday_with_loss", &[]).is_some() {
        return;
    }
    birthday_case("bdayloss", "case 3 with 10% loss", 10);
}

/// The port-mapping case: both NATs random, miniupnpd on NAT A. A's client
/// maps the port the server saw; B reaches it there.
fn port_mapping_case(name: &str, case: &str, loss: u8) {
    let mut lab = Lab::build(
        name,
        LabConfig {
            nat_a: Nat::Random,
            nat_b: Nat::Random,
            core_loss_percent: loss,
            upnp_a: true,
        },
    );
    let daemon = lab.start_miniupnpd(SERVER_START);
    let _server = start_server(&lab);
    let r = success_rate_batched(&lab, ACROSS, case, MAPPING_BATCH);
    if std::env::var("PSYNC_NAT_LAB_DEBUG").is_ok() {
        std::fs::write(format!("/tmp/miniupnpd-{name}.log"), daemon.stderr_so_far()).unwrap();
    }
    if loss > 0 {
        assert_loss_applied(&lab, case);
    }
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
    // Every client has exited: each deleted its mapping on the way out.
    let rules = lab.exec(
        Node::NatA,
        "nft",
        &["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
    );
    assert!(rules.ok, "nft list chain: {}", rules.stderr);
    let left = rules.stdout.matches("dnat").count();
    eprintln!("natlab: {case}: {left} port mappings left on NAT A after the clients exited");
    assert_eq!(left, 0, "mappings not released: {}", rules.stdout);
}

/// Case 7: both NATs random, miniupnpd on NAT A.
#[test]
fn port_mapping_connects_two_random_nats() {
    if skip_reason("port_mapping_connects_two_random_nats", &["miniupnpd"]).is_some() {
        return;
    }
    port_mapping_case("upnp", "case 7, random both sides, miniupnpd on A", 0);
}

/// Case 7 with 10% loss.
#[test]
fn port_mapping_with_loss() {
    if skip_reason("port_mapping_with_loss", &["miniupnpd"]).is_some() {
        return;
    }
    port_mapping_case("upnploss", "case 7 with 10% loss", 10);
}

/// The same-NAT case: both clients behind NAT A (port-preserving; it does
/// not hairpin, see the sanity test), speaking protocol v2, whose replies
/// carry local addresses. They must connect on the LAN, at each other's
/// local address (`local`).
fn same_nat_case(name: &str, case: &str, loss: u8) {
    let mut lab = Lab::build(
        name,
        LabConfig {
            core_loss_percent: loss,
            ..LabConfig::default()
        },
    );
    let _server = start_v2_server(&mut lab);
    let pairing = Pairing {
        v2: true,
        ..SAME_NAT
    };
    let r = success_rate_batched(&lab, pairing, case, TRIALS);
    if loss > 0 {
        assert_loss_applied(&lab, case);
    }
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
    assert!(
        r.strategies.get("local").copied().unwrap_or(0) >= 2 * REQUIRED,
        "not connected on the local addresses: {:?}",
        r.strategies
    );
}

/// Case 8: two peers behind one NAT, protocol v2.
#[test]
fn same_nat_connects_with_v2() {
    if skip_reason("same_nat_connects_with_v2", &[]).is_some() {
        return;
    }
    same_nat_case("same", "case 8, same NAT, protocol v2", 0);
}

/// Case 8 with 10% loss (on the way to the server: the LAN is clean).
#[test]
fn same_nat_with_loss() {
    if skip_reason("same_nat_with_loss", &[]).is_some() {
        return;
    }
    same_nat_case("sameloss", "case 8 with 10% loss", 10);
}

/// Case 8 behind a NAT that changes ports per destination: both peers are
/// hard, which protocol v2 tells each of them, yet they must not give up as
/// two hard NATs do: their local path needs no port.
#[test]
fn same_hard_nat_connects_with_v2() {
    if skip_reason("same_hard_nat_connects_with_v2", &[]).is_some() {
        return;
    }
    let mut lab = Lab::build(
        "samehard",
        LabConfig {
            nat_a: Nat::Random,
            ..LabConfig::default()
        },
    );
    let _server = start_v2_server(&mut lab);
    let pairing = Pairing {
        v2: true,
        ..SAME_NAT
    };
    let r = success_rate_batched(&lab, pairing, "case 8 behind a random NAT", TRIALS);
    assert!(
        r.ok >= REQUIRED,
        "only {} of {TRIALS} pairs connected",
        r.ok
    );
    assert!(
        r.strategies.get("local").copied().unwrap_or(0) >= 2 * REQUIRED,
        "not connected on the local addresses: {:?}",
        r.strategies
    );
}

/// Case 8 with the seed format, which carries no local address: nothing
/// can connect two peers behind a NAT that does not hairpin, and every
/// client says so in its exit-4 message.
#[test]
fn same_nat_without_v2_says_why() {
    if skip_reason("same_nat_without_v2_says_why", &[]).is_some() {
        return;
    }
    let lab = Lab::build("sameseed", LabConfig::default());
    let _server = start_server(&lab);
    let case = "case 8 with the seed format";
    let pairs = run_pairs_batched(
        &lab,
        SAME_NAT,
        FAIL_PAIRS,
        FAIL_PAIRS,
        3000,
        FAIL_TIMEOUT_SECS,
    );
    let mut elapsed = Vec::new();
    for (a, b) in &pairs {
        record(case, "A", a);
        record(case, "B", b);
        for e in [a, b] {
            let err = e.stderr_text();
            assert!(!e.timed_out, "{} hung: {err}", e.name);
            assert_eq!(e.code(), Some(4), "{}: {err}", e.name);
            assert!(
                err.contains("both peers are behind the same public address")
                    && err.contains("protocol v2 (--token)"),
                "{}: exit 4 without the likely cause: {err:?}",
                e.name
            );
            elapsed.push(e.elapsed.as_millis() as u64);
        }
    }
    elapsed.sort_unstable();
    eprintln!(
        "natlab: {case}: {} clients exit 4 after p50 {} ms, max {} ms (--timeout {FAIL_TIMEOUT_SECS}): {}",
        pairs.len() * 2,
        percentile(&elapsed, 50),
        elapsed.last().copied().unwrap_or(0),
        summary(&pairs[0].0.stderr_text())
    );
}

/// Case 2 with protocol v2: each reply tells the peer its partner's NAT
/// type, so both sides know at once that no path can exist and exit 4
/// without punching, naming the cause.
#[test]
fn random_nats_with_v2_fail_at_once() {
    if skip_reason("random_nats_with_v2_fail_at_once", &[]).is_some() {
        return;
    }
    let mut lab = Lab::build(
        "randv2",
        LabConfig {
            nat_a: Nat::Random,
            nat_b: Nat::Random,
            ..LabConfig::default()
        },
    );
    let _server = start_v2_server(&mut lab);
    let case = "case 2 with protocol v2";
    let pairing = Pairing { v2: true, ..ACROSS };
    let pairs = run_pairs_batched(
        &lab,
        pairing,
        FAIL_PAIRS,
        FAIL_PAIRS,
        4000,
        FAIL_TIMEOUT_SECS,
    );
    let (mut elapsed, mut sent) = (Vec::new(), Vec::new());
    for (a, b) in &pairs {
        record(case, "A", a);
        record(case, "B", b);
        for e in [a, b] {
            let err = e.stderr_text();
            assert!(!e.timed_out, "{} hung: {err}", e.name);
            assert_eq!(e.code(), Some(4), "{}: {err}", e.name);
            assert!(
                err.contains("our NAT: hard")
                    && err.contains("likely cause: both NATs change ports per destination"),
                "{}: exit 4 without the likely cause: {err:?}",
                e.name
            );
            let json = e.stdout_text();
            assert!(json.contains("\"partner_nat\":\"hard\""), "{json}");
            elapsed.push(e.elapsed.as_millis() as u64);
            sent.push(
                json_field(&json, "datagrams_sent")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            );
        }
    }
    elapsed.sort_unstable();
    sent.sort_unstable();
    eprintln!(
        "natlab: {case}: {} clients exit 4 after p50 {} ms, max {} ms (--timeout {FAIL_TIMEOUT_SECS}); \
         datagrams sent per client p50 {} max {}: {}",
        pairs.len() * 2,
        percentile(&elapsed, 50),
        elapsed.last().copied().unwrap_or(0),
        percentile(&sent, 50),
        sent.last().copied().unwrap_or(0),
        summary(&pairs[0].0.stderr_text())
    );
}

/// Case 6: the server is stopped (SIGTERM) while the peers behind NAT A wait
/// for their partners, and started again after the partners have begun
/// registering. Every registration the first server held is lost; the
/// clients recover by retransmitting to the new one.
#[test]
fn server_restart_while_registering() {
    if skip_reason("server_restart_while_registering", &[]).is_some() {
        return;
    }
    let lab = Lab::build("restart", LabConfig::default());
    const PAIRS: u32 = 2;
    // Counts registrations arriving at the server's host, whether or not a
    // server is listening, to report how many fell into the gap.
    lab.nft(Node::Server, &count_rules(SERVER_PORT))
        .expect("counter in the server namespace");
    let mut server = start_server(&lab);
    let a: Vec<Proc> = (0..PAIRS)
        .map(|i| {
            client(
                &lab,
                Node::ClientA,
                4000 + 2 * i,
                4001 + 2 * i,
                CONNECT_TIMEOUT_SECS,
            )
        })
        .collect();
    // Wait until the first server holds every A registration.
    let registered = |lab: &Lab, from: Ipv4Addr, n: usize| {
        lab.wait_seen(Node::Server, ARRIVAL, |_| {
            lab.seen(Node::Server)
                .iter()
                .filter(|s| s.0 == from && s.2 == SERVER_PORT)
                .count()
                >= n
        })
    };
    assert!(
        registered(&lab, NAT_A_PUBLIC, PAIRS as usize),
        "the A clients never registered"
    );
    lab::signal(server.pid(), lab::Signal::Term);
    let first = server.finish();
    assert_eq!(
        first.code(),
        Some(0),
        "SIGTERM did not stop the server cleanly: {}",
        first.stderr_text()
    );
    assert!(
        first.stderr_text().contains("final counters"),
        "the server did not shut down through its SIGTERM path: {}",
        first.stderr_text()
    );
    let down = Instant::now();
    let before = registrations(&lab);
    let b: Vec<Proc> = (0..PAIRS)
        .map(|i| {
            client(
                &lab,
                Node::ClientB,
                4001 + 2 * i,
                4000 + 2 * i,
                CONNECT_TIMEOUT_SECS,
            )
        })
        .collect();
    // The B clients register into the void (the port is closed) ...
    assert!(
        registered(&lab, NAT_B_PUBLIC, PAIRS as usize),
        "the B clients never tried to register"
    );
    // ... and keep trying while no server runs, for longer than a client's
    // first retransmit interval (~250 ms), then a new server starts on the
    // same port with empty tables.
    std::thread::sleep(DOWNTIME.saturating_sub(down.elapsed()));
    let lost = registrations(&lab) - before;
    let _second = start_server(&lab);
    let restarted_after = down.elapsed();
    let mut failures = Vec::new();
    for (mut a, mut b) in a.into_iter().zip(b) {
        let (a, b) = (a.finish(), b.finish());
        failures.extend(connected(&a, NAT_B_PUBLIC).err());
        failures.extend(connected(&b, NAT_A_PUBLIC).err());
    }
    eprintln!(
        "natlab: case 6, server restart: server down for {} ms, {lost} registrations \
         arrived meanwhile; {}/{} clients connected",
        restarted_after.as_millis(),
        2 * PAIRS as usize - failures.len(),
        2 * PAIRS
    );
    assert!(
        failures.is_empty(),
        "clients did not recover: {failures:#?}"
    );
}

/// A counter of UDP datagrams to `port`, for the server's namespace.
fn count_rules(port: u16) -> String {
    format!(
        "table ip psl_count {{
  counter registrations {{ }}
  chain input {{
    type filter hook input priority filter; policy accept;
    udp dport {port} counter name registrations
  }}
}}
"
    )
}

/// Datagrams counted by [`count_rules`] so far.
fn registrations(lab: &Lab) -> u64 {
    let out = lab.exec(
        Node::Server,
        "nft",
        &["list", "counter", "ip", "psl_count", "registrations"],
    );
    assert!(out.ok, "nft list counter: {}", out.stderr);
    out.stdout
        .split_once("packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("counter listing has packets")
}
