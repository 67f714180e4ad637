//! `psync-client` and `psync::client` over loopback against an in-process
//! server: both strategies, `--pipe`, lost replies, bad replies, no server,
//! failed punches with re-registration, bad usage.

mod util;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use psync::client::{connect, ClientConfig, Strategy};
use psync::PeerId;
use util::TestServer;

/// Kills a client that is still running after this long: a hang guard, not a
/// timing assertion (every run below has a much smaller --timeout).
const HANG_GUARD: Duration = Duration::from_secs(40);

fn client(server: SocketAddr, self_id: &str, peer_id: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_psync-client"));
    cmd.args([
        "--server",
        &server.to_string(),
        "--self",
        self_id,
        "--peer",
        peer_id,
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Waits for the child (killing it past [`HANG_GUARD`]) and collects its output.
fn finish(mut child: Child) -> Finished {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            panic!("psync-client hung past {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        code: status.code(),
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

/// A field of the flat JSON object the client prints, as text without quotes.
fn field(json: &str, key: &str) -> String {
    let start = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + key.len()
        + 3;
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim_matches('"').to_string()
}

fn port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().unwrap().port()
}

/// Runs two clients against `server` with the same extra flags; both must connect.
fn connect_pair(server: SocketAddr, extra: &[&str]) -> (String, String) {
    let mut args = vec!["--json", "--timeout", "10"];
    args.extend_from_slice(extra);
    let a = client(server, "1", "2", &args).spawn().unwrap();
    let b = client(server, "0x2", "1", &args).spawn().unwrap();
    let (a, b) = (finish(a), finish(b));
    assert_eq!(a.code, Some(0), "client a: {}", a.stderr);
    assert_eq!(b.code, Some(0), "client b: {}", b.stderr);
    for side in [&a, &b] {
        assert!(
            side.stderr.contains("connected via "),
            "no connected line: {}",
            side.stderr
        );
    }
    (a.stdout, b.stdout)
}

#[test]
fn two_clients_connect_via_observed() {
    let server = TestServer::start(util::config());
    // Openers off here, so the normal-TTL probe path is exercised too.
    let (a, b) = connect_pair(
        server.addr(),
        &["--strategy", "observed", "--opener-ttl", "0"],
    );
    assert_eq!(field(&a, "strategy"), "observed");
    assert_eq!(field(&b, "strategy"), "observed");
    // No NAT on loopback: each reached the other at the address the server saw.
    assert_eq!(field(&a, "peer"), field(&b, "local"));
    assert_eq!(field(&b, "peer"), field(&a, "local"));
    assert_eq!(field(&a, "peer_public"), field(&a, "peer"));
    assert_eq!(field(&a, "attempts"), "1");
    let counters = server.stop();
    assert_eq!(counters.engine.matched, 1);
}

#[test]
fn two_clients_connect_via_seed() {
    let server = TestServer::start(util::config());
    let (a, b) = connect_pair(server.addr(), &["--strategy", "seed"]);
    assert_eq!(field(&a, "strategy"), "seed");
    assert_eq!(field(&b, "strategy"), "seed");
    // Each bound the src_port it was given and reached the other's src_port.
    assert_eq!(port(&field(&a, "local")).to_string(), field(&a, "src_port"));
    assert_eq!(port(&field(&b, "local")).to_string(), field(&b, "src_port"));
    assert_eq!(field(&a, "dst_port"), field(&b, "src_port"));
    assert_eq!(field(&a, "peer"), field(&b, "local"));
    assert_ne!(field(&a, "peer_public"), field(&a, "peer"));
}

#[test]
fn both_strategies_agree_on_one_path() {
    let server = TestServer::start(util::config());
    for _ in 0..3 {
        let (a, b) = connect_pair(server.addr(), &[]);
        let strategy = field(&a, "strategy");
        assert_eq!(strategy, field(&b, "strategy"), "a: {a} b: {b}");
        assert_eq!(field(&a, "peer"), field(&b, "local"));
        assert_eq!(field(&b, "peer"), field(&a, "local"));
    }
}

#[test]
fn pipe_carries_data_both_ways() {
    let server = TestServer::start(util::config());
    let spawn = |me: &str, peer: &str| {
        client(server.addr(), me, peer, &["--pipe", "--timeout", "10"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut a = spawn("7", "8");
    let mut b = spawn("8", "7");
    let from_a = "line one from a\nline two from a\n";
    let from_b: String = (0..200).map(|i| format!("b says {i}\n")).collect();
    // Each side's stdin ends after its data; the session ends when both have.
    let mut a_in = a.stdin.take().unwrap();
    let mut b_in = b.stdin.take().unwrap();
    a_in.write_all(from_a.as_bytes()).unwrap();
    drop(a_in);
    // Small writes so b's data spans many datagrams.
    for line in from_b.lines() {
        b_in.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
    drop(b_in);
    let (a, b) = (finish(a), finish(b));
    assert_eq!(a.code, Some(0), "a: {}", a.stderr);
    assert_eq!(b.code, Some(0), "b: {}", b.stderr);
    assert_eq!(b.stdout, from_a);
    assert_eq!(a.stdout, from_b);
}

#[test]
fn library_connect_send_recv() {
    let server = TestServer::start(util::config());
    let cfg = |me: u32, peer: u32| {
        let mut c = ClientConfig::new(server.addr(), PeerId::from_u32(me), PeerId::from_u32(peer));
        c.strategy = Some(Strategy::Observed);
        c
    };
    let (ca, cb) = (cfg(0xdead_beef, 5), cfg(5, 0xdead_beef));
    let t = std::thread::spawn(move || {
        let conn = connect(&cb).expect("b connects");
        let mut buf = [0u8; 64];
        let n = conn
            .recv(&mut buf, Duration::from_secs(10))
            .unwrap()
            .expect("b hears a");
        conn.send(&buf[..n]).unwrap();
        buf[..n].to_vec()
    });
    let conn = connect(&ca).expect("a connects");
    assert_eq!(conn.strategy, Strategy::Observed);
    assert_eq!(conn.attempts, 1);
    // b may still be finishing its handshake: send until it echoes.
    let mut buf = [0u8; 64];
    let echoed = (0..50).find_map(|_| {
        conn.send(b"ping").unwrap();
        conn.recv(&mut buf, Duration::from_millis(200)).unwrap()
    });
    assert_eq!(echoed.map(|n| &buf[..n]), Some(&b"ping"[..]));
    assert_eq!(t.join().unwrap(), b"ping");
}

/// A UDP relay between clients and the server: each client gets its own
/// upstream socket (so the server sees distinct sources), only the server's
/// datagrams are relayed back, and the first `drop_first` replies to each
/// client are dropped.
struct Relay {
    addr: SocketAddr,
    dropped: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(server: SocketAddr, drop_first: usize) -> Relay {
        let down = UdpSocket::bind("127.0.0.1:0").unwrap();
        down.set_nonblocking(true).unwrap();
        let addr = down.local_addr().unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dropped.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut ups: HashMap<SocketAddr, (UdpSocket, usize)> = HashMap::new();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let mut idle = true;
                while let Ok((n, from)) = down.recv_from(&mut buf) {
                    idle = false;
                    let (up, _) = ups.entry(from).or_insert_with(|| {
                        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
                        up.set_nonblocking(true).unwrap();
                        (up, 0)
                    });
                    up.send_to(&buf[..n], server).unwrap();
                }
                for (client, (up, seen)) in ups.iter_mut() {
                    while let Ok((n, from)) = up.recv_from(&mut buf) {
                        idle = false;
                        if from != server {
                            continue;
                        }
                        *seen += 1;
                        if *seen <= drop_first {
                            d.fetch_add(1, Ordering::Relaxed);
                        } else {
                            down.send_to(&buf[..n], client).unwrap();
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Relay {
            addr,
            dropped,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn registration_survives_dropped_replies() {
    let server = TestServer::start(util::config());
    let relay = Relay::start(server.addr(), 2);
    // Seed: the relay hides the clients' real addresses, so observed cannot work.
    // The clients get their replies at their own retransmit times, which a
    // loaded machine can spread by seconds: a long punch window keeps that
    // skew from costing a second attempt.
    let (a, b) = connect_pair(relay.addr, &["--strategy", "seed", "--punch-window", "8"]);
    assert_eq!(field(&a, "attempts"), "1");
    assert_eq!(field(&b, "attempts"), "1");
    assert_eq!(relay.dropped.load(Ordering::Relaxed), 4);
    drop(relay);
    let counters = server.stop();
    assert_eq!(counters.engine.matched, 1);
    // Each client got its reply only by retransmitting: two replays apiece at least.
    assert!(counters.engine.replayed >= 4, "{counters}");
}

#[test]
fn failed_punch_reregisters_then_exits_4() {
    let server = TestServer::start(util::config());
    let relay = Relay::start(server.addr(), 0);
    // Observed through the relay sends to the relay's upstream sockets, which
    // pass nothing but server replies: the punch cannot work.
    let args = [
        "--strategy",
        "observed",
        "--attempts",
        "2",
        "--punch-window",
        "1",
        "--timeout",
        "8",
    ];
    let a = client(relay.addr, "1", "2", &args).spawn().unwrap();
    let b = client(relay.addr, "2", "1", &args).spawn().unwrap();
    for side in [finish(a), finish(b)] {
        assert_eq!(side.code, Some(4), "{}", side.stderr);
        assert!(
            side.stderr.contains("after 2 attempt(s)"),
            "{}",
            side.stderr
        );
        assert!(side.stderr.contains("tried: observed"), "{}", side.stderr);
        assert!(side.stderr.contains("nothing came back"), "{}", side.stderr);
    }
    drop(relay);
    // The retry came from new sockets, so the server matched afresh, not replayed.
    assert_eq!(server.stop().engine.matched, 2);
}

/// A fake server that answers every request with `reply`; returns its address
/// and a count of requests seen.
fn fake_server(reply: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let addr = s.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            count.fetch_add(1, Ordering::Relaxed);
            if !reply.is_empty() {
                let _ = s.send_to(&reply, from);
            }
        }
    });
    (addr, seen)
}

#[test]
fn bad_replies_exit_1_with_a_message() {
    let good = psync::Reply {
        src_port: 2000,
        dst_port: 3000,
        peer: "127.0.0.1:4000".parse().unwrap(),
    };
    let mut v4 = [0u8; psync::wire::MAX_REPLY_LEN];
    good.emit(&mut v4);
    let mut bad_family = v4[..20].to_vec();
    bad_family[4] = 10;
    let v6 = psync::Reply {
        peer: "[::1]:4000".parse().unwrap(),
        ..good
    };
    let mut v6_bytes = [0u8; psync::wire::MAX_REPLY_LEN];
    v6.emit(&mut v6_bytes);
    let cases: [(Vec<u8>, &str); 4] = [
        (v4[..19].to_vec(), "wrong size"),
        ([&v4[..20], &[0u8; 20][..]].concat(), "wrong size"),
        (bad_family, "unexpected address family 10"),
        (v6_bytes.to_vec(), "IPv6 partner address"),
    ];
    for (reply, expect) in cases {
        let (addr, _) = fake_server(reply);
        let out = finish(client(addr, "1", "2", &["--timeout", "5"]).spawn().unwrap());
        assert_eq!(out.code, Some(1), "{expect}: {}", out.stderr);
        assert!(
            out.stderr.contains("bad reply from the rendezvous server")
                && out.stderr.contains(expect),
            "{expect}: {}",
            out.stderr
        );
    }
}

#[test]
fn no_server_exits_3_after_retransmitting() {
    // A socket that never answers: no ICMP, so the client must time out.
    let (addr, seen) = fake_server(Vec::new());
    let started = Instant::now();
    let out = finish(client(addr, "1", "2", &["--timeout", "1"]).spawn().unwrap());
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("no reply from the rendezvous server"),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Sent at 0, 250 and 750 ms; allow a slow start to miss one.
    assert!(
        seen.load(Ordering::Relaxed) >= 2,
        "{} requests",
        seen.load(Ordering::Relaxed)
    );
}

#[test]
fn bad_usage_exits_2() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (me, peer, extra) in [
        ("1", "1", &[][..]),
        ("0xZZ", "1", &[][..]),
        ("4294967296", "1", &[][..]),
        ("1", "2", &["--strategy", "magic"][..]),
        ("1", "2", &["--attempts", "0"][..]),
    ] {
        let out = finish(client(addr, me, peer, extra).spawn().unwrap());
        assert_eq!(out.code, Some(2), "{me} {peer} {extra:?}: {}", out.stderr);
        assert!(!out.stderr.is_empty());
    }
    let out = finish(
        Command::new(env!("CARGO_BIN_EXE_psync-client"))
            .args(["--server", "no-port-here", "--self", "1", "--peer", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}

#[test]
fn pipe_ends_with_exit_1_when_the_peer_goes_silent() {
    let server = TestServer::start(util::config());
    // b connects and exits at once; a's session then hears nothing.
    let mut a = client(
        server.addr(),
        "3",
        "4",
        &["--pipe", "--keepalive", "0.2", "--silence", "1"],
    )
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    let a_in = a.stdin.take().unwrap();
    let b = finish(client(server.addr(), "4", "3", &[]).spawn().unwrap());
    assert_eq!(b.code, Some(0), "b: {}", b.stderr);
    let a = finish(a);
    drop(a_in);
    assert_eq!(a.code, Some(1), "a: {}", a.stderr);
    assert!(a.stderr.contains("went silent"), "a: {}", a.stderr);
}

#[test]
fn two_clients_connect_over_ipv6() {
    if let Err(e) = UdpSocket::bind("[::1]:0") {
        eprintln!("skipped: no IPv6 loopback here ({e})");
        return;
    }
    let server = TestServer::start_on(util::config(), &["[::1]:0"]);
    for strategy in ["seed", "observed"] {
        let (a, b) = connect_pair(server.addr(), &["--strategy", strategy]);
        assert_eq!(field(&a, "strategy"), strategy);
        assert!(field(&a, "peer").starts_with("[::1]:"), "{a}");
        assert_eq!(field(&a, "peer"), field(&b, "local"));
    }
}

// ---------------------------------------------------------------------------
// Holding a path: the side that does not lead a path sends only openers on it
// until it hears the partner. Seen from a test socket that plays the partner
// and reads each datagram's TTL (IP_RECVTTL), since on loopback an opener
// arrives like any other datagram.

/// The TTL the tests give openers; loopback's default is 64.
const OPENER_TTL: i32 = 3;

/// A socket that plays the partner and reports the TTL of what it receives.
fn ttl_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let on: libc::c_int = 1;
    // SAFETY: the fd is a live UDP socket owned by `s`; the option value is a
    // c_int on the stack whose size is passed alongside it.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_IP,
            libc::IP_RECVTTL,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_RECVTTL: {}", std::io::Error::last_os_error());
    s
}

/// One datagram seen by the partner socket.
struct Seen {
    kind: u8,
    ttl: i32,
    nonce: [u8; 8],
    echo: [u8; 8],
    from: SocketAddr,
}

/// Receives one psync datagram and its TTL, or `None` after `timeout`.
fn recv_seen(s: &UdpSocket, timeout: Duration) -> Option<Seen> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 2048];
    let mut control = [0u64; 8];
    let mut from: libc::sockaddr_in = libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below refers to a local
    // that outlives the recvmsg call, with its true length. The cmsg walk uses
    // the libc macros over the control buffer the kernel just filled, and
    // reads the TTL only from a header of type IP_TTL (an int, per ip(7)).
    #[allow(unsafe_code)]
    let (n, ttl) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let (n, e) = loop {
            let n = libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(s), &mut msg, 0);
            let e = std::io::Error::last_os_error();
            if n >= 0 || e.kind() != std::io::ErrorKind::Interrupted {
                break (n, e);
            }
        };
        if n < 0 {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "recvmsg: {e}"
            );
            return None;
        }
        let mut ttl = -1;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_TTL {
                ttl = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (n as usize, ttl)
    };
    assert_eq!(n, 40, "only 40-byte handshake datagrams expected");
    assert_eq!(&buf[..4], b"psHP");
    let ip = std::net::Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
    Some(Seen {
        kind: buf[5],
        ttl,
        nonce: buf[16..24].try_into().unwrap(),
        echo: buf[24..32].try_into().unwrap(),
        from: SocketAddr::from((ip, u16::from_be(from.sin_port))),
    })
}

/// A handshake datagram from peer 1 to peer 2 (the layout in src/client.rs).
fn from_peer_1(kind: u8, nonce: [u8; 8], echo: [u8; 8]) -> [u8; 40] {
    let mut d = [0u8; 40];
    d[..4].copy_from_slice(b"psHP");
    d[4] = 1;
    d[5] = kind;
    d[8..12].copy_from_slice(&1u32.to_le_bytes());
    d[12..16].copy_from_slice(&2u32.to_le_bytes());
    d[16..24].copy_from_slice(&nonce);
    d[24..32].copy_from_slice(&echo);
    d
}

/// A fake server whose reply sends the client's observed path to `partner`.
fn server_pointing_at(partner: &UdpSocket) -> SocketAddr {
    let reply = psync::Reply {
        // Unused with --strategy observed, but the reply must be valid.
        src_port: 9,
        dst_port: 10,
        peer: partner.local_addr().unwrap(),
    };
    let mut bytes = [0u8; psync::wire::MAX_REPLY_LEN];
    let n = reply.emit(&mut bytes);
    fake_server(bytes[..n].to_vec()).0
}

const PROBE: u8 = 1;
const REPLY: u8 = 2;
const DONE: u8 = 3;

#[test]
fn held_path_sends_only_openers_until_the_peer_is_heard() {
    let partner = ttl_socket();
    let server = server_pointing_at(&partner);
    // Peer 2 does not decide, so with one strategy it holds the path. The hold
    // lasts 2 s; the test speaks well before that.
    let ttl = OPENER_TTL.to_string();
    let args = [
        "--json",
        "--strategy",
        "observed",
        "--opener-ttl",
        &ttl,
        "--attempts",
        "1",
        "--punch-window",
        "9",
        "--timeout",
        "10",
    ];
    let mut child = client(server, "2", "1", &args).spawn().unwrap();
    let Some(first) = recv_seen(&partner, Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("no opener arrived: {}", finish(child).stderr);
    };
    let mut openers = 1;
    let quiet_until = Instant::now() + Duration::from_millis(400);
    while let Some(seen) = recv_seen(
        &partner,
        quiet_until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ) {
        assert_eq!(
            (seen.kind, seen.ttl),
            (PROBE, OPENER_TTL),
            "the holding side sent a normal datagram before hearing the peer"
        );
        openers += 1;
        if Instant::now() >= quiet_until {
            break;
        }
    }
    assert_eq!(first.ttl, OPENER_TTL);
    assert!(
        openers >= 2,
        "openers are repeated while holding: {openers}"
    );
    // Now the partner speaks: the client must answer and probe normally.
    let nonce = 0x5eed_u64.to_le_bytes();
    partner
        .send_to(&from_peer_1(PROBE, nonce, [0; 8]), first.from)
        .unwrap();
    let (mut replied, mut probed) = (false, false);
    while !(replied && probed) {
        let seen = recv_seen(&partner, Duration::from_secs(5)).expect("no answer to the probe");
        match seen.kind {
            REPLY if seen.echo == nonce => {
                assert_ne!(seen.ttl, OPENER_TTL, "a reply goes out at the normal TTL");
                replied = true;
            }
            PROBE if seen.ttl != OPENER_TTL => probed = true,
            _ => {}
        }
    }
    // Decide for the client, as peer 1 would; it echoes done and connects.
    partner
        .send_to(&from_peer_1(DONE, nonce, first.nonce), first.from)
        .unwrap();
    let done = finish(child);
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(field(&done.stdout, "strategy"), "observed");
}

#[test]
fn a_hold_with_no_word_from_the_peer_ends_in_normal_probes() {
    let partner = ttl_socket();
    let server = server_pointing_at(&partner);
    let ttl = OPENER_TTL.to_string();
    // A 0.6 s window caps the hold at 0.4 s; the partner never answers.
    let args = [
        "--strategy",
        "observed",
        "--opener-ttl",
        &ttl,
        "--attempts",
        "1",
        "--punch-window",
        "0.6",
        "--timeout",
        "3",
    ];
    let mut child = client(server, "2", "1", &args).spawn().unwrap();
    let Some(first) = recv_seen(&partner, Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("no opener arrived: {}", finish(child).stderr);
    };
    assert_eq!((first.kind, first.ttl), (PROBE, OPENER_TTL));
    let mut normal = 0;
    while let Some(seen) = recv_seen(&partner, Duration::from_secs(2)) {
        if seen.ttl != OPENER_TTL {
            normal += 1;
        }
    }
    let done = finish(child);
    assert_eq!(done.code, Some(4), "{}", done.stderr);
    assert!(normal > 0, "the hold never ended: {}", done.stderr);
    assert!(
        done.stderr.contains("openers while holding"),
        "{}",
        done.stderr
    );
}
